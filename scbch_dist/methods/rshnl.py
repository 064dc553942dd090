"""RSHNL (Pu et al., AAAI 2025) as a method: its towers (two hidden layers each, no bias in the last),
the class-centre generator, centre aggregation with self-paced weights (CAL) and contrastive hashing
on the gathered global batch (CHL), with the loss lamda L_cal + alpha L_chl (docs/methods.md, "RSHNL").

Settings: ``rshnl.*``. The per-id table ``self_paced_weights`` keeps each id's latest weight
v = max(0, 1 - l / gamma), for the diagnostics (the loss uses the batch's own).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import plots
from scbch_dist.losses import center_terms, chl_loss, self_paced
from scbch_dist.methods.base import EpochContext, Method, Step, TrainingSet, global_columns
from scbch_dist.metrics import roc_auc
from scbch_dist.models import ClassCentres, TowerSpec
from scbch_dist.id_table import IdTable


class RSHNL(Method):
    name = "rshnl"
    label = "RSHNL"
    terms = ("total", "cal", "chl")

    def __init__(self, cfg, train: TrainingSet):
        super().__init__(cfg, train)
        self.weights = IdTable(train.count, fill=1.0, device=train.device)

    def tower_spec(self) -> TowerSpec:
        return TowerSpec(img_depth=2, txt_depth=2, last_bias=False)

    def build_head(self) -> nn.Module:
        return ClassCentres(self.train.num_classes, self.cfg.model.hidden, self.cfg.model.bits)

    def tables(self) -> dict[str, IdTable]:
        return {"self_paced_weights": self.weights}

    def self_paced(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) weights CAL per sample: from rshnl.self_paced_from on."""
        return epoch >= self.cfg.rshnl.self_paced_from

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        s = self.cfg.rshnl
        cols = global_columns(out["h_img"], out["h_txt"], step.labels)
        n = cols.h_img.shape[0] if cols is not None else out["h_img"].shape[0]
        per_sample = center_terms(out["p_img"], out["p_txt"], step.labels, q=s.q)
        if self.self_paced(step.epoch):
            cal, _ = self_paced(per_sample, gamma=s.gamma, n_total=n)
        else:
            cal = per_sample.sum() / n
        chl = chl_loss(out["h_img"], out["h_txt"], tau=s.tau, q=s.q, columns=cols)
        return {"total": s.cal_weight * cal + s.chl_weight * chl, "cal": cal, "chl": chl}

    def after_batch(self, out: dict[str, torch.Tensor], step: Step) -> None:
        s = self.cfg.rshnl
        per_sample = center_terms(out["p_img"], out["p_txt"], step.labels, q=s.q)
        self.weights.update(step.ids, (1 - per_sample / s.gamma).clamp(min=0))

    def epoch_end(self, ctx: EpochContext) -> dict:
        weights = self.weights.values.cpu().numpy()
        diag = {**self_paced_diagnostics(weights, self.train.corrupted), "active": self.self_paced(ctx.epoch)}
        if ctx.is_main and ctx.evaluates:
            plots.plot_weight_histograms([(f"epoch {ctx.epoch + 1}", weights, self.train.corrupted)],
                                         ctx.run_dir / "plots" / "rshnl_weights.png", xlabel="self-paced weight")
        return {"rshnl": diag}

    def describe(self, record: dict) -> str:
        d = record["rshnl"]
        return f"self-paced mean {d['mean']:.3f} at 0 {d['zero_fraction']:.3f}" + (
            f" auc {d['auc']:.3f}" if "auc" in d else "")


def self_paced_diagnostics(weights: np.ndarray, corrupted: np.ndarray | None) -> dict:
    """Mean, fraction at weight 0 and, with noise, the clean and corrupted means, the fractions at 0
    and the ROC-AUC of the weights as a clean-vs-corrupted score."""
    out = {"mean": float(weights.mean()), "zero_fraction": float((weights == 0).mean())}
    if corrupted is not None and corrupted.any() and (~corrupted).any():
        out.update(clean_mean=float(weights[~corrupted].mean()), corrupted_mean=float(weights[corrupted].mean()),
                   clean_zero_fraction=float((weights[~corrupted] == 0).mean()),
                   corrupted_zero_fraction=float((weights[corrupted] == 0).mean()), auc=roc_auc(weights, ~corrupted))
    return out
