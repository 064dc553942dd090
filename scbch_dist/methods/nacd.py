"""NACD (Su et al., NeurIPS 2025) as a method: its settings (``nacd.*``), its classifier pair, the
per-id confidence table (an EMA after every batch, a neighbour reconstruction after every epoch past
the warm-up) and the class thresholds, with the loss L_cls + alpha CRCH + beta L_q (docs/methods.md,
"NACD"). The reconstruction searches the engine's bank (``bank.knn``, ``bank.refresh``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import dist, plots
from scbch_dist.losses import (class_thresholds, confidence_bce, confidence_from_neighbors, crch_loss, ema_confidence,
                               ema_weight, quantization_loss)
from scbch_dist.methods.base import (EpochContext, Method, Step, TrainingSet, check_values, global_batch_of,
                                     refresh_from_neighbours, noise_detection_stats)
from scbch_dist.models import Classifiers
from scbch_dist.id_table import IdTable


@dataclass
class NACDSettings:
    """The config section ``nacd.*``, as NACD's published code sets it (docs/methods.md, "NACD")."""

    alpha: float = 0.3  # weight of the contrastive term on reliable labels (CRCH)
    beta: float = 0.7  # weight of the quantisation term
    margin: float = 0.2  # CRCH margin m
    shift: float = 1.0  # CRCH shift s
    k: int = 20  # neighbours of the confidence reconstruction
    mix: float = 0.2  # lambda: share of the reconstruction in the new confidences
    warmup_epochs: int = 10  # epochs without reconstruction (the first follows epoch index 10)
    omega_start: float = 0.95  # EMA weight of the old confidence at epoch 0, moving linearly ...
    omega_end: float = 0.80  # ... to this at epoch E
    threshold: float = 0.5  # class thresholds until the first reconstruction


class NACD(Method):
    name = "nacd"
    label = "NACD"
    terms = ("total", "cls", "crch", "quant")
    settings_type = NACDSettings
    knn_key = "nacd.k"
    schedule_keys = ("train.epochs",)

    def __init__(self, cfg, train: TrainingSet):
        super().__init__(cfg, train)
        self.confidence = IdTable(train.count, (train.num_classes,), device=train.device)
        self.confidence.assign(train.labels.float())  # c starts at y: every candidate fully trusted
        # one row per class
        self.thresholds = IdTable(train.num_classes, fill=self.settings.threshold, device=train.device)

    @classmethod
    def check_settings(cls, settings: NACDSettings) -> None:
        check_values(cls.name, settings, at_least_one=("k",), not_negative=("alpha", "beta", "margin", "shift",
                                                                            "warmup_epochs"),
                     unit=("mix", "omega_start", "omega_end", "threshold"))

    @classmethod
    def build_head(cls, cfg, num_classes: int) -> nn.Module:
        return Classifiers(cfg.model.bits, num_classes)

    def tables(self) -> dict[str, IdTable]:
        return {"confidence": self.confidence, "thresholds": self.thresholds}

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        """With the confidences and thresholds as they stand before this batch's update."""
        s = self.settings
        c = self.confidence[step.ids]
        cols = global_batch_of(out["h_img"], out["h_txt"], step.labels)
        n = cols.h_img.shape[0] if cols is not None else None
        col_c = dist.gather_rows(c)[0] if cols is not None else None
        cls = confidence_bce(out["p_img"], out["p_txt"], c, n_total=n)
        crch = crch_loss(out["h_img"], out["h_txt"], step.labels, c, self.thresholds.values, margin=s.margin,
                         shift=s.shift, columns=cols, column_confidence=col_c)
        quant = quantization_loss(out["h_img"], out["h_txt"], n_total=n)
        return {"total": cls + s.alpha * crch + s.beta * quant, "cls": cls, "crch": crch, "quant": quant}

    def after_batch(self, out: dict[str, torch.Tensor], step: Step) -> None:
        s = self.settings
        omega = ema_weight(step.epoch, self.cfg.train.epochs, s.omega_start, s.omega_end)
        self.confidence.update(step.ids, ema_confidence(self.confidence[step.ids], out["p_img"], out["p_txt"],
                                                        step.labels, omega=omega))

    def epoch_end(self, ctx: EpochContext) -> dict:
        """After the warm-up: each rank reconstructs the confidences of its own ids from their k
        nearest neighbours in the bank, the rows are gathered by id, and the thresholds follow."""
        s = self.settings
        diag: dict = {}
        if ctx.epoch >= s.warmup_epochs:
            refresh = refresh_from_neighbours(self.cfg, ctx, s.k, lambda sims, index, own: confidence_from_neighbors(
                sims, index, self.confidence.values, self.train.labels, own_index=own, mix=s.mix))
            self.confidence.assign(refresh.values)
            self.thresholds.assign(class_thresholds(self.confidence.values))
            diag.update(source=refresh.source, seconds=refresh.seconds)
        confidence = self.confidence.values.cpu().numpy()
        diag.update(confidence_diagnostics(confidence, self.train.labels.cpu().numpy(), self.train.clean,
                                           self.thresholds.values.cpu().numpy()),
                    threshold_mean=float(self.thresholds.values.mean()))
        if ctx.is_main and ctx.evaluates and self.train.clean is not None:
            candidates = self.train.labels.cpu().numpy() > 0
            plots.plot_weight_histograms(
                [(f"epoch {ctx.epoch + 1}", confidence[candidates], ~(self.train.clean > 0)[candidates])],
                ctx.run_dir / "plots" / "nacd_confidence.png", xlabel="confidence of a candidate label",
                names=("true label", "false label"))
        return {"nacd": diag}

    def describe(self, record: dict) -> str:
        d = record["nacd"]
        if "auc" not in d:
            return f"confidence {d['candidate_mean']:.3f}"
        return f"confidence true {d['true_mean']:.3f} false {d['false_mean']:.3f} auc {d['auc']:.3f}"


def confidence_diagnostics(confidence: np.ndarray, labels: np.ndarray, clean: np.ndarray | None,
                           thresholds: np.ndarray | None = None) -> dict:
    """Over the candidate labels (y = 1): the mean confidence of true and of false ones, the
    ROC-AUC of the confidence as a true-vs-false score and, with the class ``thresholds`` (C,),
    the precision and recall of the labels NACD holds unreliable (confidence below its class's
    threshold) as false-label detection."""
    candidates = labels > 0
    out = {"candidate_mean": float(confidence[candidates].mean()) if candidates.any() else 0.0}
    if clean is None:
        return out
    unreliable = None if thresholds is None else (confidence < thresholds[None, :])[candidates]
    return {**out, **noise_detection_stats(confidence[candidates], (clean > 0)[candidates], names=("true", "false"),
                                flagged=unreliable)}
