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

Methods run on every rank with this rank's rows; batch-coupled terms gather the global batch with
``global_columns``. Adding a method is one module here plus its config defaults; the engine does
not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn as nn

from scbch_dist import dist
from scbch_dist.config import Config
from scbch_dist.knn import SearchParams, knn
from scbch_dist.knn.sharded import knn_sharded
from scbch_dist.losses import Columns, wide
from scbch_dist.models import NoHead, TowerSpec
from scbch_dist.id_table import IdTable


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
    """The base: a method with no extra modules, no state and no hooks. Subclasses set ``name``
    (the value of ``method.name``), ``terms`` (the loss terms they return, "total" first) and
    override what they need."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # the report's row label unless run.method names a variant
    terms: ClassVar[tuple[str, ...]] = ("total",)
    # settings the engine checks for the method: the config key of its neighbour count (must be
    # below the training count), and the keys outside its section that shape its training, which
    # a resume may therefore not change (NACD's EMA schedule follows train.epochs)
    knn_key: ClassVar[str | None] = None
    schedule_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Config, train: TrainingSet):
        self.cfg, self.train = cfg, train

    def tower_spec(self) -> TowerSpec:
        return TowerSpec()

    def build_head(self) -> nn.Module:
        """The method's trainable modules on the codes: {h_img, h_txt} -> extra outputs. Built after
        the towers, under the run's seed."""
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


def search_params(cfg: Config) -> SearchParams:
    """knn.SearchParams from bank.* (the index is seeded by train.seed)."""
    b = cfg.bank
    return SearchParams(nlist=b.nlist, nprobe=b.nprobe, ef_search=b.ef_search, train_rows=b.train_rows,
                        exact_below=b.exact_below, seed=cfg.train.seed)


def neighbours(cfg: Config, bank: Bank, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest bank rows of each id this rank searches (``bank.own_ids``), each id's own
    row counting as similarity 0 (docs/objective.md); (sims, index), each (m, k), index holding ids.
    bank.knn chooses the search; a sharded bank is searched across the ranks (a collective)."""
    if bank.sharded:
        return knn_sharded(bank.rows, bank.rows, bank.own_ids, k, self_index=bank.own_ids, backend=cfg.bank.knn,
                           params=search_params(cfg))
    own = bank.own_ids
    everyone = own.shape[0] == bank.rows.shape[0] and bool((own == torch.arange(own.shape[0], device=own.device)).all())
    queries = bank.rows if everyone else bank.rows[own]  # one process searches every row: no copy of the bank
    return knn(queries, bank.rows, k, self_index=own, backend=cfg.bank.knn, params=search_params(cfg))


def global_columns(h_img: torch.Tensor, h_txt: torch.Tensor, labels: torch.Tensor) -> Columns | None:
    """Every rank's codes (with gradient) and labels, for a batch-coupled term computed as local rows
    against the global batch (losses.Columns); None in a single process, where the local rows are
    the whole batch."""
    if not dist.is_distributed():
        return None
    h_img, h_txt = wide(h_img), wide(h_txt)
    counts = dist.all_counts(h_img.shape[0], h_img.device)
    img_all, offset = dist.gather_rows(h_img, with_grad=True, counts=counts)
    txt_all, _ = dist.gather_rows(h_txt, with_grad=True, counts=counts)
    lab_all, _ = dist.gather_rows(labels, counts=counts)
    return Columns(img_all, txt_all, lab_all, offset)
