"""SCBCH (Peng et al., AAAI 2026) as a method: its settings (``scbch.*``), its classifiers, the CSCC
sample-weight table and its refresh, the objective 0.7 L_bsch + 0.3 L_q + 1.0 L_cscc
(docs/objective.md). The refresh searches the engine's bank (``bank.knn``, ``bank.refresh``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import plots
from scbch_dist.losses import scbch_loss, weights_from_neighbors
from scbch_dist.methods.base import (EpochContext, Method, Step, TrainingSet, check_values, global_batch_of,
                                     refresh_from_neighbours, noise_detection_stats)
from scbch_dist.models import Classifiers
from scbch_dist.id_table import IdTable


@dataclass
class SCBCHSettings:
    """The config section ``scbch.*``: the loss (docs/objective.md) and the CSCC sample weights."""

    margin: float = 0.15  # BSCH margin (MIRFlickr setting)
    shift: float = 0.8  # BSCH shift xi (MIRFlickr setting)
    bsch_weight: float = 0.7  # alpha
    quant_weight: float = 0.3  # beta
    cscc_weight: float = 1.0
    k: int = 20  # CSCC: neighbours per sample
    gamma: float = 0.5  # CSCC: base weight
    warmup_epochs: int = 5  # epochs trained with all weights 1


class SCBCH(Method):
    name = "scbch"
    label = "SCBCH"
    terms = ("total", "bsch", "quant", "cscc")
    settings_type = SCBCHSettings
    knn_key = "scbch.k"

    def __init__(self, cfg, train: TrainingSet):
        super().__init__(cfg, train)
        self.weights = IdTable(train.count, fill=1.0, device=train.device)
        # the first refresh's weights, kept for the before/after histogram (the paper's Fig. 6)
        self.first_weights = IdTable(train.count, fill=1.0, device=train.device)

    @classmethod
    def check_settings(cls, settings: SCBCHSettings) -> None:
        # a negative weight turns a loss term into a reward; a negative margin or shift moves the
        # thresholds to the wrong side of the positive pair (docs/objective.md): both train silently wrong
        check_values(cls.name, settings, at_least_one=("k",), unit=("gamma",),
                     not_negative=("margin", "shift", "bsch_weight", "quant_weight", "cscc_weight", "warmup_epochs"))

    @classmethod
    def build_head(cls, cfg, num_classes: int) -> nn.Module:
        return Classifiers(cfg.model.bits, num_classes)

    def tables(self) -> dict[str, IdTable]:
        return {"weights": self.weights, "first_weights": self.first_weights}

    def weighted(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) trains with CSCC weights: every epoch after the warm-up."""
        return epoch >= self.settings.warmup_epochs

    def epoch_start(self, ctx: EpochContext) -> dict:
        """The CSCC refresh: each rank searches the k nearest neighbours of its own ids in the bank,
        computes their weights, and the weights are gathered into the table by id. With one
        process this is exactly losses.cscc_weights."""
        if not self.weighted(ctx.epoch):
            return {}
        s = self.settings
        refresh = refresh_from_neighbours(self.cfg, ctx, s.k, lambda sims, index, own: weights_from_neighbors(
            sims, index, self.train.labels, own_index=own, gamma=s.gamma))
        self.weights.assign(refresh.values)
        weights = self.weights.values.cpu().numpy()
        diag = {**weight_diagnostics(weights, self.train.corrupted), "source": refresh.source,
                "seconds": refresh.seconds}
        if refresh.coverage is not None:
            diag["memory_coverage"] = refresh.coverage
        first = not self.first_weights.complete
        if first:
            self.first_weights.assign(self.weights.values)
        # drawn with the evaluations (a figure costs about as much as a refresh of 6000 rows)
        if ctx.is_main and (first or ctx.evaluates):
            self._plot(ctx, weights)
        return {"cscc_weights": diag}

    def _plot(self, ctx: EpochContext, weights: np.ndarray) -> None:
        first_epoch = self.settings.warmup_epochs + 1  # 1-based: the first epoch after the warm-up
        panels = [(f"first refresh (epoch {first_epoch})", self.first_weights.values.cpu().numpy(), self.train.corrupted)]
        if first_epoch != ctx.epoch + 1:
            panels.append((f"latest refresh (epoch {ctx.epoch + 1})", weights, self.train.corrupted))
        plots.plot_weight_histograms(panels, ctx.run_dir / "plots" / "cscc_weights.png")

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        weights = self.weights[step.ids] if self.weighted(step.epoch) else None
        s = self.settings
        return scbch_loss(out, step.labels, weights, margin=s.margin, shift=s.shift, bsch_weight=s.bsch_weight,
                          quant_weight=s.quant_weight, cscc_weight=s.cscc_weight,
                          columns=global_batch_of(out["h_img"], out["h_txt"], step.labels))

    def describe(self, record: dict) -> str:
        w = record.get("cscc_weights")
        if w is None:
            return ""
        return f"weights mean {w['mean']:.3f}" + (f" auc {w['auc']:.3f}" if "auc" in w else "")


def weight_diagnostics(weights: np.ndarray, corrupted: np.ndarray | None) -> dict:
    """Mean, range and, with noise, the clean and corrupted means and the ROC-AUC of the weights
    as a clean-vs-corrupted score."""
    out = {"mean": float(weights.mean()), "min": float(weights.min()), "max": float(weights.max())}
    return {**out, **noise_detection_stats(weights, ~corrupted if corrupted is not None else None)}
