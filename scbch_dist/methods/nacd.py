"""NACD (Su et al., NeurIPS 2025) as a method: its classifier pair, the per-id confidence table
(an EMA after every batch, a neighbour reconstruction after every epoch past the warm-up) and the
class thresholds, with the loss L_cls + alpha CRCH + beta L_q (docs/methods.md, "NACD").

Settings: ``nacd.*``; the reconstruction searches the engine's bank (``bank.knn``, ``bank.refresh``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import dist, plots
from scbch_dist.losses import (class_thresholds, confidence_bce, confidence_from_neighbors, crch_loss, ema_confidence,
                               ema_weight, quantization_loss)
from scbch_dist.methods.base import EpochContext, Method, Step, TrainingSet, global_columns, neighbours
from scbch_dist.metrics import roc_auc
from scbch_dist.models import Classifiers
from scbch_dist.id_table import IdTable


class NACD(Method):
    name = "nacd"
    label = "NACD"
    terms = ("total", "cls", "crch", "quant")
    knn_key = "nacd.k"
    schedule_keys = ("train.epochs",)

    def __init__(self, cfg, train: TrainingSet):
        super().__init__(cfg, train)
        self.confidence = IdTable(train.count, (train.num_classes,), device=train.device)
        self.confidence.assign(train.labels.float())  # c starts at y: every candidate fully trusted
        self.thresholds = IdTable(train.num_classes, fill=cfg.nacd.threshold, device=train.device)  # one row per class

    def build_head(self) -> nn.Module:
        return Classifiers(self.cfg.model.bits, self.train.num_classes)

    def tables(self) -> dict[str, IdTable]:
        return {"confidence": self.confidence, "thresholds": self.thresholds}

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        """With the confidences and thresholds as they stand before this batch's update."""
        s = self.cfg.nacd
        c = self.confidence[step.ids]
        cols = global_columns(out["h_img"], out["h_txt"], step.labels)
        n = cols.h_img.shape[0] if cols is not None else None
        col_c = dist.gather_rows(c)[0] if cols is not None else None
        cls = confidence_bce(out["p_img"], out["p_txt"], c, n_total=n)
        crch = crch_loss(out["h_img"], out["h_txt"], step.labels, c, self.thresholds.values, margin=s.margin,
                         shift=s.shift, columns=cols, column_confidence=col_c)
        quant = quantization_loss(out["h_img"], out["h_txt"], n_total=n)
        return {"total": cls + s.alpha * crch + s.beta * quant, "cls": cls, "crch": crch, "quant": quant}

    def after_batch(self, out: dict[str, torch.Tensor], step: Step) -> None:
        s = self.cfg.nacd
        omega = ema_weight(step.epoch, self.cfg.train.epochs, s.omega_start, s.omega_end)
        self.confidence.update(step.ids, ema_confidence(self.confidence[step.ids], out["p_img"], out["p_txt"],
                                                        step.labels, omega=omega))

    def epoch_end(self, ctx: EpochContext) -> dict:
        """After the warm-up: each rank reconstructs the confidences of its own ids from their k
        nearest neighbours in the bank, the rows are gathered by id, and the thresholds follow."""
        s = self.cfg.nacd
        diag: dict = {}
        if ctx.epoch >= s.warmup_epochs:
            t0 = time.perf_counter()
            bank = ctx.bank()
            with torch.no_grad():
                sims, index = neighbours(self.cfg, bank, s.k)
                own = confidence_from_neighbors(sims / 2, index, self.confidence.values, self.train.labels,
                                                own_index=bank.own_ids, mix=s.mix)
                self.confidence.assign(dist.gather_by_id({"id": bank.own_ids, "c": own}, self.train.count)["c"])
                self.thresholds.assign(class_thresholds(self.confidence.values))
            diag.update(source=bank.source, seconds=time.perf_counter() - t0)
        confidence = self.confidence.values.cpu().numpy()
        diag.update(confidence_diagnostics(confidence, self.train.labels.cpu().numpy(), self.train.clean),
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


def confidence_diagnostics(confidence: np.ndarray, labels: np.ndarray, clean: np.ndarray | None) -> dict:
    """Over the candidate labels (y = 1): the mean confidence of true and of false ones, and the
    ROC-AUC of the confidence as a true-vs-false score."""
    candidates = labels > 0
    out = {"candidate_mean": float(confidence[candidates].mean()) if candidates.any() else 0.0}
    if clean is None:
        return out
    scores, true = confidence[candidates], (clean > 0)[candidates]
    if true.any() and (~true).any():
        out.update(true_mean=float(scores[true].mean()), false_mean=float(scores[~true].mean()), auc=roc_auc(scores, true))
    return out
