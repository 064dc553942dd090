"""SCBCH (Peng et al., AAAI 2026) as a method: its classifiers, the CSCC sample-weight table and its
refresh, the objective 0.7 L_bsch + 0.3 L_q + 1.0 L_cscc (docs/objective.md).

Settings: ``loss.*`` (margin, shift, term weights) and ``cscc.*`` (k, gamma, warm-up, search backend).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import dist, plots
from scbch_dist.losses import scbch_loss, weights_from_neighbors
from scbch_dist.methods.base import EpochContext, Method, Step, TrainingSet, global_columns, neighbours
from scbch_dist.metrics import roc_auc
from scbch_dist.models import Classifiers
from scbch_dist.id_table import IdTable


class SCBCH(Method):
    name = "scbch"
    label = "SCBCH"
    terms = ("total", "bsch", "quant", "cscc")
    knn_key = "cscc.k"

    def __init__(self, cfg, train: TrainingSet):
        super().__init__(cfg, train)
        self.weights = IdTable(train.count, fill=1.0, device=train.device)
        # the first refresh's weights, kept for the before/after histogram (the paper's Fig. 6)
        self.first_weights = IdTable(train.count, fill=1.0, device=train.device)

    def build_head(self) -> nn.Module:
        return Classifiers(self.cfg.model.bits, self.train.num_classes)

    def tables(self) -> dict[str, IdTable]:
        return {"weights": self.weights, "first_weights": self.first_weights}

    def weighted(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) trains with CSCC weights: every epoch after the warm-up."""
        return epoch >= self.cfg.cscc.warmup_epochs

    def epoch_start(self, ctx: EpochContext) -> dict:
        """The CSCC refresh: each rank searches the k nearest neighbours of its own ids in the bank,
        computes their weights, and the weights are gathered into the table by id. With one
        process this is exactly losses.cscc_weights."""
        if not self.weighted(ctx.epoch):
            return {}
        t0 = time.perf_counter()
        bank = ctx.bank()
        with torch.no_grad():
            sims, index = neighbours(self.cfg, bank, self.cfg.cscc.k)
            w = weights_from_neighbors(sims / 2, index, self.train.labels, own_index=bank.own_ids,
                                       gamma=self.cfg.cscc.gamma)
            self.weights.assign(dist.gather_by_id({"id": bank.own_ids, "w": w}, self.train.count)["w"])
        weights = self.weights.values.cpu().numpy()
        diag = {**weight_diagnostics(weights, self.train.corrupted), "source": bank.source,
                "seconds": time.perf_counter() - t0}
        if bank.coverage is not None:
            diag["memory_coverage"] = bank.coverage
        first = not self.first_weights.complete
        if first:
            self.first_weights.assign(self.weights.values)
        # drawn with the evaluations (a figure costs about as much as a refresh of 6000 rows)
        if ctx.is_main and (first or ctx.evaluates):
            self._plot(ctx, weights)
        return {"cscc_weights": diag}

    def _plot(self, ctx: EpochContext, weights: np.ndarray) -> None:
        first_epoch = self.cfg.cscc.warmup_epochs + 1  # 1-based: the first epoch after the warm-up
        panels = [(f"first refresh (epoch {first_epoch})", self.first_weights.values.cpu().numpy(), self.train.corrupted)]
        if first_epoch != ctx.epoch + 1:
            panels.append((f"latest refresh (epoch {ctx.epoch + 1})", weights, self.train.corrupted))
        plots.plot_weight_histograms(panels, ctx.run_dir / "plots" / "cscc_weights.png")

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        weights = self.weights[step.ids] if self.weighted(step.epoch) else None
        loss = self.cfg.loss
        return scbch_loss(out, step.labels, weights, margin=loss.margin, shift=loss.shift,
                          bsch_weight=loss.bsch_weight, quant_weight=loss.quant_weight,
                          cscc_weight=loss.cscc_weight,
                          columns=global_columns(out["h_img"], out["h_txt"], step.labels))

    def describe(self, record: dict) -> str:
        w = record.get("cscc_weights")
        if w is None:
            return ""
        return f"weights mean {w['mean']:.3f}" + (f" auc {w['auc']:.3f}" if "auc" in w else "")


def weight_diagnostics(weights: np.ndarray, corrupted: np.ndarray | None) -> dict:
    """Mean, range and, with noise, the clean and corrupted means and the ROC-AUC of the weights
    as a clean-vs-corrupted score."""
    out = {"mean": float(weights.mean()), "min": float(weights.min()), "max": float(weights.max())}
    if corrupted is not None and corrupted.any() and (~corrupted).any():
        out.update(clean_mean=float(weights[~corrupted].mean()), corrupted_mean=float(weights[corrupted].mean()),
                   auc=roc_auc(weights, ~corrupted))
    return out
