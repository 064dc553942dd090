"""A fourth method written outside the package, for the engine tests: SCBCH's contrastive and
quantisation terms only (no classifier, no CSCC weights), with its own settings section
(``contrast_only.*``), plus a per-id table that counts how often each id was trained on (updated
after every batch) and an epoch-end hook that reads the bank and checks that every rank holds the
same table."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scbch_dist import dist
from scbch_dist.id_table import IdTable
from scbch_dist.losses import bsch_loss, quantization_loss
from scbch_dist.methods import EpochContext, Method, Step, check_values, global_batch_of, register


@dataclass
class ContrastOnlySettings:
    """The config section ``contrast_only.*``."""

    margin: float = 0.15  # BSCH margin
    shift: float = 0.8  # BSCH shift
    bsch_weight: float = 0.7
    quant_weight: float = 0.3


@register
class ContrastOnly(Method):
    name = "contrast_only"
    terms = ("total", "bsch", "quant")
    settings_type = ContrastOnlySettings

    @classmethod
    def check_settings(cls, settings: ContrastOnlySettings) -> None:
        check_values(cls.name, settings, not_negative=("margin", "shift", "bsch_weight", "quant_weight"))

    def __init__(self, cfg, train):
        super().__init__(cfg, train)
        self.visits = IdTable(train.count, device=train.device)

    def tables(self) -> dict[str, IdTable]:
        return {"visits": self.visits}

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        s = self.settings
        cols = global_batch_of(out["h_img"], out["h_txt"], step.labels)
        n = cols.h_img.shape[0] if cols is not None else None
        bsch = bsch_loss(out["h_img"], out["h_txt"], step.labels, margin=s.margin, shift=s.shift, columns=cols)
        quant = quantization_loss(out["h_img"], out["h_txt"], n_total=n)
        return {"total": s.bsch_weight * bsch + s.quant_weight * quant, "bsch": bsch, "quant": quant}

    def after_batch(self, out: dict[str, torch.Tensor], step: Step) -> None:
        self.visits.update(step.ids, self.visits[step.ids] + 1)

    def epoch_end(self, ctx: EpochContext) -> dict:
        bank = ctx.bank()
        v = self.visits.values.double()
        checksum = torch.stack([v.sum(), (v * torch.arange(len(v), dtype=torch.float64, device=v.device)).sum()])
        every_rank, _ = dist.gather_rows(checksum[None])
        return {"toy": {"visits_total": float(v.sum()), "visits_min": float(v.min()), "visits_max": float(v.max()),
                        "ranks_agree": bool((every_rank == every_rank[0]).all()), "bank_rows": int(bank.rows.shape[0]),
                        "bank_source": bank.source}}

    def describe(self, record: dict) -> str:
        return f"visits {record['toy']['visits_total']:.0f}"
