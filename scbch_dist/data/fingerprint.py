"""What a run was trained on, as digests: a run is bound to its data (docs/engine.md, "Integrity").

A run records the fingerprint of its dataset when it starts (in every checkpoint's run state); a
resume computes it again and refuses data that changed, naming what changed. The fingerprint:

    meta.json          sha256 of the file: counts, classes, shard names and the shards' own sha256
    shards             {split: [sha256 of each shard]} as meta.json lists them (to say which changed)
    labels/clean.npy   sha256 of the file: the clean training labels (evaluation's relevance too)
    training_labels    sha256 of the (N, C) table training reads: the noise model's output, or the noise file's
    vocab.json         sha256 of the file, for raw datasets (the tokenizer's words)

The shards' content is bound through meta.json's checksums, which the preflight checks against
the shards themselves (data.verify); a dataset without checksums binds only their names and counts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from scbch_dist.data.format import SPLITS, VOCAB_FILE, meta_path, read_meta
from scbch_dist.data.remote import dataset_root, is_remote
from scbch_dist.digests import arrays_sha256, sha256_file
from scbch_dist.errors import ScbchError


class DataChangedError(ScbchError):
    """A resumed run's dataset differs from the one it began with."""


def file_fingerprint(root: str | Path) -> dict:
    """The fingerprint of the files of dataset ``root`` (everything but the training labels, which
    need the noise model): what the run folder's claim compares before it changes anything."""
    root = dataset_root(root)
    meta = read_meta(root)
    out = {"meta.json": _sha256(meta_path(root)),
           "shards": {s: list(meta.splits[s].sha256) for s in SPLITS},
           "labels/clean.npy": _sha256(root / "labels" / "clean.npy")}
    if (root / VOCAB_FILE).is_file():
        out[VOCAB_FILE] = _sha256(root / VOCAB_FILE)
    return out


def _sha256(path) -> str:
    """A local file's sha256, or a server's file's (read once: these are small)."""
    return hashlib.sha256(path.read_bytes()).hexdigest() if is_remote(path) else sha256_file(path)


def dataset_fingerprint(root: str | Path, training_labels: np.ndarray) -> dict:
    """The fingerprint of dataset ``root`` as a run trains on it (``training_labels``: (N, C), after noise)."""
    return {**file_fingerprint(root),
            "training_labels": arrays_sha256({"labels": np.asarray(training_labels, dtype=np.uint8)})}


def changes(recorded: dict, current: dict) -> list[str]:
    """What differs between a recorded fingerprint and the ``current`` one (which may lack the
    training labels: then they are not compared), in words; empty when the data is the same."""
    out = []
    for split in SPLITS:
        old, new = recorded.get("shards", {}).get(split, []), current.get("shards", {}).get(split, [])
        if old and new and old != new:
            differ = sum(a != b for a, b in zip(old, new)) + abs(len(old) - len(new))
            out.append(f"{differ} of {len(old)} {split} shard(s)")
    for key in ("meta.json", "labels/clean.npy", VOCAB_FILE):
        if recorded.get(key) != current.get(key):
            out.append(key)
    if "training_labels" in current and recorded.get("training_labels") != current["training_labels"]:
        out.append("the training labels (the noise table or noise file gives other labels)")
    return out


def check_same_data(recorded: dict | None, current: dict, root: str | Path, run_dir: str | Path) -> bool:
    """Refuse a resume whose dataset changed since the run began; False when the run recorded no
    fingerprint (a checkpoint of an earlier version: not checked)."""
    if recorded is None:
        return False
    differ = changes(recorded, current)
    if differ:
        raise DataChangedError(f"--resume {run_dir}: the dataset at {root} is not the one this run began with "
                               f"({', '.join(differ)} changed); restore it, or train it as a new run in another run.dir")
    return True
