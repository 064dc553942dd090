"""Label-noise models and noise tables.

Noise is a view over training ids: a table (N_train x C, uint8) that replaces the training labels
at load time. The shards keep the clean labels, which are used only for evaluation and
diagnostics, never for training.

``data.noise`` spellings: ``none`` | ``mixed:RATE`` (seeded by ``data.noise_seed``) | ``file:PATH``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scbch_dist.data.format import DatasetMeta
from scbch_dist.io import atomic_save_npy


class NoiseError(ValueError):
    pass


def mixed_noise(labels: np.ndarray, rate: float, *, seed: int) -> np.ndarray:
    """The published "mixed" protocol behind every table of the SCBCH paper.

    Choose exactly floor(rate * N) rows without replacement; in each, set one randomly chosen
    positive label to 0 and one randomly chosen (originally) negative label to 1, each step only
    if such a label exists. Rows keep their label count whenever both steps apply.

    Args:
        labels: (N, C) multi-hot {0, 1}.
        rate: fraction of rows to corrupt, in [0, 1].
        seed: the result is a function of (labels, rate, seed) only.
    Returns:
        (N, C) uint8 noisy labels; ``labels`` is not modified.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise NoiseError(f"labels must be (N, C), got shape {labels.shape}")
    if not 0.0 <= rate <= 1.0:
        raise NoiseError(f"noise rate must be in [0, 1], got {rate}")
    n = labels.shape[0]
    # floor with a guard: 0.29 * 100 is 28.999999999999996 in binary floating point
    n_noisy = min(n, math.floor(rate * n + 1e-9))
    out = (labels > 0).astype(np.uint8)
    if n_noisy == 0:
        return out
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=n_noisy, replace=False))
    y = out[rows].astype(bool)
    # a uniformly random member of each row's positives (negatives): argmax of uniform scores
    # restricted to the set; rows where the set is empty are skipped below
    pos_score = np.where(y, rng.random(y.shape), -1.0)
    neg_score = np.where(~y, rng.random(y.shape), -1.0)
    pos_pick = pos_score.argmax(axis=1)
    neg_pick = neg_score.argmax(axis=1)
    has_pos = y.any(axis=1)
    has_neg = (~y).any(axis=1)
    out[rows[has_pos], pos_pick[has_pos]] = 0
    out[rows[has_neg], neg_pick[has_neg]] = 1
    return out


def load_noise_file(path: str | Path, clean: np.ndarray) -> np.ndarray:
    """Published noisy labels: HDF5 with ``result`` (noisy) and ``True`` (clean) training rows.

    The file's ``True`` array must equal the dataset's clean training labels row for row:
    a mismatch means the file belongs to another dataset or split, which would silently
    train on the wrong labels.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise NoiseError(f"noise file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            for key in ("result", "True"):
                if key not in f:
                    raise NoiseError(f"{path}: dataset {key!r} missing (has: {', '.join(f.keys())})")
            noisy = np.asarray(f["result"][()])
            true = np.asarray(f["True"][()])
    except OSError as e:
        raise NoiseError(f"{path}: not a readable HDF5 file ({e})") from None
    if noisy.shape != clean.shape or true.shape != clean.shape:
        raise NoiseError(f"{path}: 'result' {noisy.shape} / 'True' {true.shape} do not match the "
                         f"dataset's training labels {clean.shape}")
    for key, a in (("result", noisy), ("True", true)):
        if not np.isin(a, (0, 1)).all():
            raise NoiseError(f"{path}: {key!r} is not multi-hot 0/1")
    mismatch = np.flatnonzero((true.astype(np.uint8) != clean).any(axis=1))
    if len(mismatch):
        raise NoiseError(f"{path}: its clean labels ('True') differ from the dataset's training labels in "
                         f"{len(mismatch)} rows (first: training id {mismatch[0]}); wrong dataset or split?")
    return noisy.astype(np.uint8)


@dataclass
class NoiseSpec:
    kind: str  # none | mixed | file
    rate: float = 0.0
    path: str = ""

    @property
    def name(self) -> str:
        if self.kind == "mixed":
            return f"mixed-{self.rate:g}"
        if self.kind == "file":
            return f"file-{Path(self.path).stem}"
        return "none"


def parse_noise(spec: str) -> NoiseSpec:
    spec = spec.strip()
    if spec in ("", "none", "clean"):
        return NoiseSpec("none")
    kind, _, arg = spec.partition(":")
    if kind == "mixed":
        try:
            rate = float(arg)
        except ValueError:
            raise NoiseError(f"data.noise={spec!r}: expected mixed:RATE with RATE a number in [0, 1]") from None
        if not 0.0 <= rate <= 1.0:
            raise NoiseError(f"data.noise={spec!r}: rate must be in [0, 1]")
        return NoiseSpec("mixed", rate=rate)
    if kind == "file" and arg:
        return NoiseSpec("file", path=arg)
    raise NoiseError(f"data.noise={spec!r}: expected none, mixed:RATE or file:PATH")


def clean_training_labels(root: str | Path, meta: DatasetMeta) -> np.ndarray:
    path = Path(root) / "labels" / "clean.npy"
    if not path.is_file():
        raise NoiseError(f"{path}: missing (every dataset folder carries its clean training labels)")
    clean = np.load(path, mmap_mode="r")
    want = (meta.splits["train"].count, meta.num_classes)
    if clean.shape != want:
        raise NoiseError(f"{path}: shape {clean.shape}, expected {want} (meta.json)")
    return clean


def training_labels(root: str | Path, meta: DatasetMeta, spec: str, *, seed: int) -> tuple[np.ndarray, NoiseSpec]:
    """The (N_train, C) uint8 label table training reads, for ``data.noise`` = ``spec``.

    Mixed tables are cached as ``labels/<name>-seed<seed>.npy`` beside the shards: the content is a
    function of (clean labels, rate, seed), so concurrent runs writing it race harmlessly.
    """
    noise = parse_noise(spec)
    clean = clean_training_labels(root, meta)
    if noise.kind == "none":
        return clean, noise
    if noise.kind == "file":
        return load_noise_file(noise.path, np.asarray(clean)), noise
    cache = Path(root) / "labels" / f"{noise.name}-seed{seed}.npy"
    if cache.is_file():
        table = np.load(cache, mmap_mode="r")
        if table.shape == clean.shape:
            return table, noise
    table = mixed_noise(np.asarray(clean), noise.rate, seed=seed)
    try:
        atomic_save_npy(cache, table)
    except OSError:
        pass  # a read-only dataset folder: the table is cheap to rebuild
    return table, noise


def corrupted_rows(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """(N,) bool: rows whose training labels differ from the clean ones."""
    return (np.asarray(clean) != np.asarray(noisy)).any(axis=1)
