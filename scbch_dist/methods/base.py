"""The method interface: what a training method gives the engine, and what the engine gives it
(docs/methods.md).

A method
- may ask for its own tower layout (``tower_spec``) and builds its extra trainable modules
  (``build_head``: classifiers, class centres), which join the model;
- declares its per-id state (``tables``: SCBCH's sample weights, NACD's confidences) as
  ``IdTable``s, which the engine exchanges between ranks after every epoch, checkpoints and restores;
- computes the loss of a batch (``loss``), updates its state after the batch (``after_batch``)
  and at the start and end of every epoch (``epoch_start`` / ``epoch_end``), where it may ask the
  engine for the gathered [u, v] bank of the whole training set (``EpochContext.bank``);
- returns its diagnostics from the epoch hooks, as entries of the epoch's metrics record.

A method also owns its settings: a dataclass (``settings_type``) that is the config section named
after it (``scbch.*``, ``nacd.*``), with its defaults, and the value rules for it
(``check_settings``); the config asks the registry for them, so adding a method is one module and
neither the engine nor the config changes.

Methods run on every rank with this rank's rows; batch-coupled terms gather the global batch with
``global_batch_of``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import dist
from scbch_dist import knn
from scbch_dist.knn.sharded import knn_sharded
from scbch_dist.losses import GlobalBatch, at_least_float32
from scbch_dist.models import NoHead, TowerSpec
from scbch_dist.errors import ConfigError
from scbch_dist.id_table import IdTable
from scbch_dist.metrics import roc_auc

if TYPE_CHECKING:  # the config asks this package for the methods' settings: no import back at run time
    from scbch_dist.config import Config


@dataclass
class TrainingSet:
    """What a method may know of the training set. ``labels`` are the (possibly noisy) training
    labels, the only ones training may use; ``corrupted`` (rows whose labels differ from the
    clean ones, None without noise) and ``clean`` are for diagnostics only."""

    count: int  # N, ids 0..N-1
    num_classes: int  # C
    labels: torch.Tensor  # (N, C) uint8 on the training device
    corrupted: np.ndarray | None  # (N,) bool
    device: torch.device
    clean: np.ndarray | None = None  # (N, C) uint8 clean labels


@dataclass
class Step:
    """One training batch of this rank: its ids and their training labels."""

    epoch: int  # 0-based
    ids: torch.Tensor  # (b,) int64
    labels: torch.Tensor  # (b, C) uint8


@dataclass
class Bank:
    """The [u, v] rows (losses.cscc_bank_rows) of every training id, the same on every rank, and the
    ids whose neighbours this rank searches (every id is searched by exactly one rank).

    Sharded (``bank.shard``): ``rows`` is this rank's shard only, the rows of ``own_ids`` in that
    order; the shards of all ranks together are the bank (docs/distributed.md, "Sharded search").
    Neighbour indices are global ids either way."""

    rows: torch.Tensor  # (N, 2L) float32, or float16 above bank.float16_above; sharded: (m, 2L), row j is id own_ids[j]
    own_ids: torch.Tensor  # (m,) int64
    source: str  # "pass" (a fresh encoding in eval mode) | "memory" (rows from the training batches)
    seconds: float  # to build it
    coverage: float | None = None  # memory: the fraction of rows from the last epoch
    sharded: bool = False  # rows is this rank's shard (bank.shard)
    held_out: torch.Tensor | None = None  # (N,) bool by id: rows held out for validation, never a neighbour


@dataclass
class EpochContext:
    """What the engine offers the epoch hooks."""

    epoch: int  # 0-based; epoch_start runs before its batches, epoch_end after them
    epochs: int  # the run's total
    train: TrainingSet
    bank: Callable[[], Bank]  # builds (or reads) the bank on every rank: a collective
    run_dir: Path
    is_main: bool
    evaluates: bool = False  # whether this epoch ends with an evaluation: draw the method's figures then


class Method:
    """The base: a method with no settings, no extra modules, no state and no hooks. Subclasses set
    ``name`` (the value of ``method.name``, and the key of their config section), ``terms`` (the
    loss terms they return, "total" first) and override what they need."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # the report's row label unless run.method names a variant; "": the name
    terms: ClassVar[tuple[str, ...]] = ("total",)
    # the dataclass of the method's config section ``<name>.*`` (its defaults and comments), which
    # the method reads as ``self.settings``; None: the method has no settings
    settings_type: ClassVar[type | None] = None
    # settings the engine checks for the method: the config key of its neighbour count (must be
    # below the training count), and the keys outside its section that shape its training, which
    # a resume may therefore not change (NACD's EMA schedule follows train.epochs)
    knn_key: ClassVar[str | None] = None
    schedule_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, train: TrainingSet):
        self.cfg, self.train = cfg, train
        self.settings: Any = getattr(cfg, self.name) if self.settings_type is not None else None

    @classmethod
    def check_settings(cls, settings: Any) -> None:
        """The value rules of the method's section that a type check cannot express (config.validate
        calls it); a ConfigError naming the key (``scbch.k``) otherwise."""

    @classmethod
    def tower_spec(cls, cfg: Config) -> TowerSpec:
        """The hash towers' layout the method trains (hidden layers per modality, last-layer bias)."""
        return TowerSpec()

    @classmethod
    def build_head(cls, cfg: Config, num_classes: int) -> nn.Module:
        """The method's trainable modules on the codes: {h_img, h_txt} -> extra outputs. Built after
        the towers, under the run's seed (engine.setup.build_network)."""
        return NoHead()

    def tables(self) -> dict[str, IdTable]:
        """Per-id state, exchanged after every epoch and checkpointed by the engine."""
        return {}

    def epoch_start(self, ctx: EpochContext) -> dict:
        return {}

    def loss(self, out: dict[str, torch.Tensor], step: Step) -> dict[str, torch.Tensor]:
        """This rank's share of each loss term of the global batch (``terms``, each a scalar)."""
        raise NotImplementedError

    def after_batch(self, out: dict[str, torch.Tensor], step: Step) -> None:
        """State updates from this batch's (detached) outputs, after its loss, before the next."""

    def epoch_end(self, ctx: EpochContext) -> dict:
        return {}

    def describe(self, record: dict) -> str:
        """The method's part of the one-line epoch log, from the record its hooks filled."""
        return ""


def neighbours(cfg: Config, bank: Bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of each id this rank searches (``bank.own_ids``), each id's own
    row counting as similarity 0 (docs/objective.md); (sims, index), each (m, k), index holding ids.
    bank.* (a knn.KnnSettings) chooses the search, train.seed seeds an IVF's lists; a sharded bank
    is searched across the ranks (a collective)."""
    if bank.held_out is not None:
        return _neighbours_held_out(cfg, bank, k)
    if bank.sharded:
        return knn_sharded(bank.rows, bank.rows, bank.own_ids, k, self_index=bank.own_ids, settings=cfg.bank,
                           seed=cfg.train.seed)
    own = bank.own_ids
    everyone = own.shape[0] == bank.rows.shape[0] and bool((own == torch.arange(own.shape[0], device=own.device)).all())
    queries = bank.rows if everyone else bank.rows[own]  # one process searches every row: no copy of the bank
    return knn.neighbours(queries, bank.rows, k, self_index=own, settings=cfg.bank, seed=cfg.train.seed)


HELD_OUT_PENALTY = -8.0  # below any inner product of two bank rows z = [u, v] (in [-2, 2]) by 6


def _neighbours_held_out(cfg: Config, bank: Bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``neighbours`` with the held-out rows (eval.validation) never a neighbour, for every backend:
    one column more, 1 in every query and, in the searched rows, 0 for a training row and
    HELD_OUT_PENALTY for a held-out one, so that a query's product with a training row is unchanged
    and with a held-out row at least 6 below any training row's. Their own searches (as queries)
    are made and never used."""
    penalty = torch.where(bank.held_out, HELD_OUT_PENALTY, 0.0).to(bank.rows.dtype)
    rows_ids = bank.own_ids if bank.sharded else torch.arange(bank.rows.shape[0], device=bank.rows.device)
    base = torch.cat([bank.rows, penalty[rows_ids, None]], 1)
    queries = torch.cat([bank.rows[bank.own_ids] if not bank.sharded else bank.rows,
                         torch.ones(bank.own_ids.shape[0], 1, dtype=bank.rows.dtype, device=bank.rows.device)], 1)
    if bank.sharded:
        sims, index = knn_sharded(queries, base, bank.own_ids, k, self_index=bank.own_ids, settings=cfg.bank,
                                  seed=cfg.train.seed)
    else:
        sims, index = knn.neighbours(queries, base, k, self_index=bank.own_ids, settings=cfg.bank, seed=cfg.train.seed)
    trained = ~bank.held_out[bank.own_ids]
    if bank.held_out[index[trained]].any():
        raise ValueError(f"k={k} neighbours reach a held-out row: fewer than k training rows in the bank")
    return sims, index


def global_batch_of(h_img: torch.Tensor, h_txt: torch.Tensor, labels: torch.Tensor) -> GlobalBatch | None:
    """Every rank's codes (with gradient) and labels, for a batch-coupled term computed as local rows
    against the global batch (losses.GlobalBatch); None in a single process, where the local rows are
    the whole batch."""
    if not dist.is_distributed():
        return None
    h_img, h_txt = at_least_float32(h_img), at_least_float32(h_txt)
    counts = dist.all_counts(h_img.shape[0], h_img.device)
    img_all, offset = dist.gather_rows(h_img, with_grad=True, counts=counts)
    txt_all, _ = dist.gather_rows(h_txt, with_grad=True, counts=counts)
    lab_all, _ = dist.gather_rows(labels, counts=counts)
    return GlobalBatch(img_all, txt_all, lab_all, offset)


def check_values(section: str, settings: Any, *, at_least_one: tuple[str, ...] = (), positive: tuple[str, ...] = (),
                 not_negative: tuple[str, ...] = (), unit: tuple[str, ...] = ()) -> None:
    """The common value rules of a method's section, each a ConfigError naming ``section.key``:
    integers at least 1 (a count), numbers above 0, at least 0, and in [0, 1] (a share)."""
    rules = [(at_least_one, lambda v: v >= 1, "must be at least 1"), (positive, lambda v: v > 0, "must be positive"),
             (not_negative, lambda v: v >= 0, "must be >= 0"), (unit, lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")]
    for names, ok, rule in rules:
        for name in names:
            value = getattr(settings, name)
            if not ok(value):
                raise ConfigError(f"{section}.{name} {rule}, got {value}")


@dataclass
class Refresh:
    """Per-id values recomputed from each id's neighbours in the bank (``refresh_from_neighbours``)."""

    values: torch.Tensor  # (N, ...) the new value of every training id, in id order, on every rank
    source: str  # the bank's: "pass" | "memory"
    coverage: float | None  # the bank's (memory: the fraction of rows from the last epoch)
    seconds: float  # the bank, the search, the values and their gather


def refresh_from_neighbours(cfg: Config, ctx: EpochContext, k: int,
                            compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Refresh:
    """A refresh of per-id state (SCBCH's weights, NACD's confidences), a collective: the bank, the
    ``k`` nearest neighbours of this rank's ids (``neighbours``), ``compute(sims, index, own_ids)``
    -> (m, ...) values of those ids, and the values of every rank gathered by id. ``sims`` is the
    similarity of docs/objective.md, z z^T / 2 of the bank rows z = [u, v]: in [-1, 1]."""
    t0 = time.perf_counter()
    bank = ctx.bank()
    with torch.no_grad():
        sims, index = neighbours(cfg, bank, k)
        own = compute(sims / 2, index, bank.own_ids)
        values = dist.gather_by_id({"id": bank.own_ids, "values": own}, ctx.train.count)["values"]
    return Refresh(values, bank.source, bank.coverage, time.perf_counter() - t0)


def noise_detection_stats(scores: np.ndarray, positive: np.ndarray | None,
               names: tuple[str, str] = ("clean", "corrupted"), flagged: np.ndarray | None = None) -> dict:
    """How well ``scores`` tell the ``positive`` rows (clean rows, true labels) from the others: the
    mean of each group (``<name>_mean``) and the ROC-AUC of the scores as a positive-vs-other score.
    With ``flagged`` (the rows the method itself sets aside at its own threshold): the fraction
    flagged, and the precision (flagged rows that are not positive / flagged; NaN when none is)
    and recall (not-positive rows flagged / not-positive rows) of flagging as noise detection.
    Empty without both groups (no noise, or every row corrupted)."""
    if positive is None or positive.all() or not positive.any():
        return {}
    out = {f"{names[0]}_mean": float(scores[positive].mean()), f"{names[1]}_mean": float(scores[~positive].mean()),
           "auc": roc_auc(scores, positive)}
    if flagged is not None:
        caught = int((flagged & ~positive).sum())
        out.update(flagged_fraction=float(flagged.mean()),
                   flag_precision=caught / int(flagged.sum()) if flagged.any() else float("nan"),
                   flag_recall=caught / int((~positive).sum()))
    return out
