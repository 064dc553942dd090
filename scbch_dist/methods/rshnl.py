"""RSHNL (Pu et al., AAAI 2025) as a method: its settings (``rshnl.*``), its towers (two hidden layers
each, no bias in the last), the class-centre generator, centre aggregation with self-paced weights
(CAL) and contrastive hashing on the gathered global batch (CHL), with the loss lamda L_cal + alpha
L_chl (docs/methods.md, "RSHNL").

The per-id table ``self_paced_weights`` keeps each id's latest weight v = max(0, 1 - l / gamma),
for the diagnostics (the loss uses the batch's own).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import plots
from scbch_dist.losses import center_terms, chl_loss, self_paced
from scbch_dist.methods.base import EpochContext, Method, Step, TrainingSet, check_values, global_batch_of, noise_detection_stats
from scbch_dist.models import ClassCentres, TowerSpec
from scbch_dist.id_table import IdTable


@dataclass
class RSHNLSettings:
    """The config section ``rshnl.*``, as RSHNL's published code sets it (docs/methods.md, "RSHNL")."""

    q: float = 0.01  # of the GCE-MAE loss l_q
    gamma: float = 5.0  # self-paced threshold: samples with loss above it get weight 0
    self_paced_from: int = 5  # tp: the first epoch (0-based) with self-paced weights
    tau: float = 1.0  # temperature of the contrastive term
    cal_weight: float = 1.0  # lamda: centre aggregation (CAL)
    chl_weight: float = 0.1  # alpha: contrastive hashing (CHL)


class RSHNL(Method):
    name = "rshnl"
    label = "RSHNL"
    terms = ("total", "cal", "chl")
    settings_type = RSHNLSettings

    def __init__(self, cfg, train: TrainingSet):
        super().__init__(cfg, train)
        self.weights = IdTable(train.count, fill=1.0, device=train.device)

    @classmethod
    def check_settings(cls, settings: RSHNLSettings) -> None:
        check_values(cls.name, settings, positive=("q", "gamma", "tau"),
                     not_negative=("self_paced_from", "cal_weight", "chl_weight"))

    @classmethod
    def tower_spec(cls, cfg) -> TowerSpec:
        return TowerSpec(img_depth=2, txt_depth=2, last_bias=False)

    @classmethod
    def build_head(cls, cfg, num_classes: int) -> nn.Module:
        return ClassCentres(num_classes, cfg.model.hidden, cfg.model.bits)

    def tables(self) -> dict[str, IdTable]:
        return {"self_paced_weights": self.weights}

    def self_paced(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) weights CAL per sample: from rshnl.self_paced_from on."""
        return epoch >= self.settings.self_paced_from

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        s = self.settings
        cols = global_batch_of(out["h_img"], out["h_txt"], step.labels)
        n = cols.h_img.shape[0] if cols is not None else out["h_img"].shape[0]
        per_sample = center_terms(out["p_img"], out["p_txt"], step.labels, q=s.q)
        if self.self_paced(step.epoch):
            cal, _ = self_paced(per_sample, gamma=s.gamma, n_total=n)
        else:
            cal = per_sample.sum() / n
        chl = chl_loss(out["h_img"], out["h_txt"], tau=s.tau, q=s.q, columns=cols)
        return {"total": s.cal_weight * cal + s.chl_weight * chl, "cal": cal, "chl": chl}

    def after_batch(self, out: dict[str, torch.Tensor], step: Step) -> None:
        s = self.settings
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
    """Mean, fraction at weight 0 and, with noise, the clean and corrupted means, the fractions at 0,
    the ROC-AUC of the weights as a clean-vs-corrupted score, and the precision and recall of the
    rows at weight 0 (the ones self-paced learning leaves out) as corrupted-row detection."""
    out = {"mean": float(weights.mean()), "zero_fraction": float((weights == 0).mean())}
    groups = noise_detection_stats(weights, ~corrupted if corrupted is not None else None, flagged=weights == 0)
    if groups:
        groups.update(clean_zero_fraction=float((weights[~corrupted] == 0).mean()),
                      corrupted_zero_fraction=float((weights[corrupted] == 0).mean()))
    return {**out, **groups}
