"""Checks before the first step (docs/engine.md, "Preflight"): what would otherwise fail hours
into a run (a neighbour count above the training count, a missing search backend, a corrupt or
inconsistent evaluation shard) fails now, in one line.

With ``data.verify`` (the default) every shard of every split is read once, its sha256 compared
with meta.json, its blocks validated, and the ids of each split counted over all ranks (dense,
unique); the training labels are compared with labels/clean.npy. Each rank reads its share of the
shards (rank r takes shards r, r + W, ...).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from scbch_dist import dist, knn
from scbch_dist.config import Config, ConfigError
from scbch_dist.data.format import SPLITS, ShardError, check_split
from scbch_dist.data.remote import RemoteRoot, is_remote
from scbch_dist.data.verify import check_evaluation_labels, check_id_counts, verify_shards
from scbch_dist.errors import ScbchError
from scbch_dist.methods import Method


def check_settings(cfg: Config, method: Method, count: int, device: torch.device) -> None:
    """The settings that depend on the data or the machine: the method's neighbour count below
    the training count, and its search backend loaded (a tiny search, so FAISS is imported now)."""
    key = type(method).knn_key
    if key is None:
        return
    section, name = key.split(".")
    k = getattr(getattr(cfg, section), name)
    if k >= count:
        raise ConfigError(f"{key}={k} must be below the training count ({count} samples: each sample's "
                          f"neighbours exclude itself)")
    try:
        backend = knn.resolve_backend(cfg.bank, device, count)
        # a tiny search: FAISS imported and its index type built now, not at the first refresh (the
        # backend's default settings: the configured nlist may exceed the 512 rows)
        rows = torch.nn.functional.normalize(torch.randn(512, 8, generator=torch.Generator().manual_seed(0)), dim=1)
        knn.neighbours(rows.to(device), rows.to(device), 1, self_index=torch.arange(512, device=device),
                       settings=knn.KnnSettings(knn=backend))
    except (RuntimeError, ImportError, ValueError) as e:
        raise ConfigError(f"bank.knn={cfg.bank.knn}: {str(e).splitlines()[0]}") from None


def check_data(root, meta, clean: np.ndarray, *, rank: int, world: int) -> tuple[dict, list[str]]:
    """Collective: every split read and checked, each rank its share of the shards. Raises the
    same error on every rank; returns {split: shards} counts for the log, and warnings."""
    error: ScbchError | None = None
    counts, labels = {}, {s: np.zeros(meta.num_classes + 1, dtype=np.int64) for s in SPLITS}
    try:
        for split in SPLITS:
            check_split(root, meta, split)
            mine = meta.splits[split].shards[rank::world]
            counts[split] = verify_shards(root, meta, split, mine, clean=clean if split == "train" else None,
                                          label_counts=labels[split])
    except ScbchError as e:
        error = e
    dist.raise_together(error, "preflight: another process found a problem in the dataset (its message is above)")
    for split in SPLITS:
        check_id_counts(root, meta, split, dist.sum_host(counts[split]))
    warnings = check_evaluation_labels(root, dist.sum_host(labels["query"]), dist.sum_host(labels["database"]))
    return {split: len(meta.splits[split].shards) for split in SPLITS}, warnings


def check_served(root: RemoteRoot, meta, *, rank: int, world: int) -> int:
    """Collective, for a dataset on a server: each rank asks for its share of the shards with a
    HEAD (is it there?); their digests and sample counts are checked as they stream, so nothing is
    read twice. Returns the number of shards asked about (0 for a pipe: a command has no cheap way
    to say)."""
    error: ScbchError | None = None
    asked = 0
    if not str(root).startswith("pipe:"):
        try:
            for split in SPLITS:
                for name in meta.splits[split].shards[rank::world]:
                    asked += 1
                    if (root / name).size() is None:
                        raise ShardError(f"{root / name}: shard of split {split!r} listed in meta.json is not on the "
                                         "server (HTTP 404)")
        except ScbchError as e:
            error = e
    dist.raise_together(error, "preflight: another process found a problem in the dataset (its message is above)")
    return int(dist.sum_host(np.array([asked]))[0])


def preflight(cfg: Config, data, method: Method, accelerator, log: logging.Logger) -> None:
    """Everything checked before the model is built; a problem is one line naming key, file or sample."""
    t0 = time.perf_counter()
    check_settings(cfg, method, data.train.count, accelerator.device)
    if is_remote(data.root):
        for split in SPLITS:
            check_split(data.root, data.meta, split)
        asked = check_served(data.root, data.meta, rank=accelerator.process_index, world=accelerator.num_processes)
        sums = ("each shard's sha256 and sample count checked as it streams" if all(data.meta.splits[s].sha256 for s in SPLITS)
                else "no sha256 in meta.json: shards are checked by their sample counts only (add them where the "
                     "dataset is written: python -m scbch_dist.data.verify ROOT --add-checksums)")
        log.info(f"preflight: a dataset on a server; {f'{asked} shards found (HEAD)' if asked else 'shards not asked for (pipe:)'}, "
                 f"none read ahead; {sums}; {time.perf_counter() - t0:.1f} s")
        return
    if not cfg.data.verify:
        for split in SPLITS:
            check_split(data.root, data.meta, split)
        log.info("preflight: settings checked; shards not read (data.verify=false)")
        return
    shards, warnings = check_data(data.root, data.meta, np.asarray(data.train.clean), rank=accelerator.process_index,
                                  world=accelerator.num_processes)
    for warning in warnings:
        log.warning(f"preflight: {warning}")
    sums = "sha256 checked" if all(data.meta.splits[s].sha256 for s in SPLITS) else \
        "no sha256 in meta.json (add them: python -m scbch_dist.data.verify ROOT --add-checksums)"
    log.info(f"preflight: {sum(shards.values())} shards of {', '.join(SPLITS)} read, ids dense and unique, "
             f"labels match labels/clean.npy, {sums}; {time.perf_counter() - t0:.1f} s")
