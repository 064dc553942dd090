"""Label-noise models and noise tables.

Noise is a view over training ids: a table (N_train x C, uint8) that replaces the training labels
at load time. The shards keep the clean labels, which are used only for evaluation and
diagnostics, never for training.

``data.noise`` spellings (docs/data.md, "Noise"): ``none`` | ``mixed:RATE`` (the SCBCH paper's
protocol) | ``redundant:R`` (NACD's redundant annotations) | ``replace:R`` (RSHNL's symmetric
replacement), each seeded by ``data.noise_seed`` | ``file:PATH`` (published or exported tables).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scbch_dist import cli
from scbch_dist.data.format import DatasetMeta
from scbch_dist.data.labels import NoiseError, check_label_values, clean_training_labels
from scbch_dist.data.remote import is_remote
from scbch_dist.atomic import atomic_save_npy


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


def _multi_hot(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise NoiseError(f"labels must be (N, C), got shape {labels.shape}")
    return labels > 0


def _first_k(scores: np.ndarray, k: np.ndarray) -> np.ndarray:
    """(n, C) bool: in each row, the k[i] columns with the smallest scores (ties impossible with
    continuous scores): a uniform draw of k[i] columns without replacement."""
    rank = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1, kind="stable")
    return rank < k[:, None]


def redundant_noise(labels: np.ndarray, rate: float, *, seed: int) -> np.ndarray:
    """NACD's redundant annotations: every row i with n_i positives gains k_i = round_half_even(R n_i)
    false labels, at most C - n_i, drawn uniformly without replacement from its negatives; true labels
    are never removed.

    Args:
        labels: (N, C) multi-hot {0, 1}. rate: R >= 0. seed: the result is a function of (labels, R, seed).
    Returns:
        (N, C) uint8 noisy labels; ``labels`` is not modified.
    """
    y = _multi_hot(labels)
    if not (rate >= 0 and np.isfinite(rate)):
        raise NoiseError(f"redundant noise rate must be a finite number >= 0, got {rate}")
    n_pos = y.sum(1)
    k = np.minimum(np.round(rate * n_pos).astype(np.int64), y.shape[1] - n_pos)  # np.round: half to even
    scores = np.random.default_rng(seed).random(y.shape)
    scores[y] = 2.0  # positives rank after every negative, so the first k_i are negatives
    return (y | _first_k(scores, k)).astype(np.uint8)


def replacement_noise(labels: np.ndarray, rate: float, *, seed: int) -> np.ndarray:
    """RSHNL's symmetric replacement ("sym"): exactly floor(R N) rows chosen without replacement; each
    chosen row's label set becomes n_i classes drawn uniformly without replacement from all C classes
    (true ones may be drawn again), so cardinalities never change and at most floor(R N) rows do.

    Args:
        labels: (N, C) multi-hot {0, 1}. rate: R in [0, 1]. seed: as ``redundant_noise``.
    Returns:
        (N, C) uint8 noisy labels; ``labels`` is not modified.
    """
    y = _multi_hot(labels)
    if not 0.0 <= rate <= 1.0:
        raise NoiseError(f"replacement noise rate must be in [0, 1], got {rate}")
    n = y.shape[0]
    out = y.astype(np.uint8)
    chosen = min(n, math.floor(rate * n + 1e-9))  # the same floor guard as mixed_noise
    if chosen == 0:
        return out
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=chosen, replace=False))
    out[rows] = _first_k(rng.random((chosen, y.shape[1])), y[rows].sum(1)).astype(np.uint8)
    return out


NOISE_MODELS = {"mixed": mixed_noise, "redundant": redundant_noise, "replace": replacement_noise}


def noise_statistics(clean: np.ndarray, noisy: np.ndarray) -> dict:
    """What a noise table did to the clean labels: rows changed, labels added and removed per row,
    the fraction of candidate labels that are false, rows turned all-positive."""
    clean, noisy = np.asarray(clean) > 0, np.asarray(noisy) > 0
    added, removed = (noisy & ~clean).sum(1), (clean & ~noisy).sum(1)
    return {"rows": int(len(clean)), "rows_changed": int(((added + removed) > 0).sum()),
            "true_labels_per_row": float(clean.sum(1).mean()), "labels_added_per_row": float(added.mean()),
            "labels_removed_per_row": float(removed.mean()),
            "false_candidate_fraction": float(added.sum() / max(int(noisy.sum()), 1)),
            "rows_all_positive": int(noisy.all(1).sum())}


def save_noise_file(path: str | Path, noisy: np.ndarray, clean: np.ndarray) -> None:
    """Write a table in the published format (HDF5 ``result`` = noisy, ``True`` = clean training
    rows), which ``file:PATH`` reads back; atomically."""
    import h5py

    from scbch_dist.atomic import atomic_save_with

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("result", data=np.asarray(noisy, dtype=np.uint8))
            f.create_dataset("True", data=np.asarray(clean, dtype=np.uint8))

    atomic_save_with(path, write)


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
        check_label_values(f"{path}: dataset {key!r}", a)  # published files hold float64 0.0/1.0
    mismatch = np.flatnonzero((true.astype(np.uint8) != clean).any(axis=1))
    if len(mismatch):
        raise NoiseError(f"{path}: its clean labels ('True') differ from the dataset's training labels in "
                         f"{len(mismatch)} rows (first: training id {mismatch[0]}); wrong dataset or split?")
    return noisy.astype(np.uint8)


@dataclass
class NoiseSpec:
    kind: str  # none | mixed | redundant | replace | file
    rate: float = 0.0
    path: str = ""

    @property
    def name(self) -> str:
        if self.kind in NOISE_MODELS:
            return f"{self.kind}-{self.rate:g}"
        if self.kind == "file":
            return f"file-{Path(self.path).stem}"
        return "none"


def parse_noise(spec: str) -> NoiseSpec:
    spec = spec.strip()
    if spec in ("", "none", "clean"):
        return NoiseSpec("none")
    kind, _, arg = spec.partition(":")
    if kind in NOISE_MODELS:
        top = math.inf if kind == "redundant" else 1.0
        try:
            rate = float(arg)
        except ValueError:
            rate = math.nan
        if not 0.0 <= rate <= top:
            allowed = "a number >= 0" if kind == "redundant" else "a number in [0, 1]"
            raise NoiseError(f"data.noise={spec!r}: expected {kind}:RATE with RATE {allowed}")
        return NoiseSpec(kind, rate=rate)
    if kind == "file" and arg:
        return NoiseSpec("file", path=arg)
    raise NoiseError(f"data.noise={spec!r}: expected none, mixed:RATE, redundant:R, replace:R or file:PATH")


def _holds(path: Path, table: np.ndarray) -> bool:
    """Whether ``path`` is a readable .npy file holding exactly ``table``."""
    try:
        return np.array_equal(np.load(path, mmap_mode="r", allow_pickle=False), table)
    except (OSError, ValueError, EOFError):
        return False


def training_labels(root: str | Path, meta: DatasetMeta, spec: str, *, seed: int) -> tuple[np.ndarray, NoiseSpec]:
    """The (N_train, C) uint8 label table training reads, for ``data.noise`` = ``spec``.

    A generated table is built anew for every run (a function of the clean labels, the model, the
    rate and the seed; cheap even at 1M rows: docs/benchmarks.md, "Figures quoted in the code"), so
    no file can change what a run trains on. It is also written to ``labels/<name>-seed<seed>.npy``
    beside the shards, for inspection and other code bases, when that file is missing or holds
    something else.
    """
    noise = parse_noise(spec)
    clean = clean_training_labels(root, meta)
    if noise.kind == "none":
        return clean, noise
    if noise.kind == "file":
        return load_noise_file(noise.path, np.asarray(clean)), noise
    table = NOISE_MODELS[noise.kind](np.asarray(clean), noise.rate, seed=seed)
    if is_remote(root):  # the record is written beside local shards only
        return table, noise
    record = Path(root) / "labels" / f"{noise.name}-seed{seed}.npy"
    if not _holds(record, table):
        try:
            atomic_save_npy(record, table)
        except OSError:
            pass  # a read-only dataset folder
    return table, noise


def corrupted_rows(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """(N,) bool: rows whose training labels differ from the clean ones."""
    return (np.asarray(clean) != np.asarray(noisy)).any(axis=1)


def main(argv: list[str] | None = None) -> None:
    """Export a generated noise table in the published HDF5 format, for ``data.noise=file:PATH``
    and for other code bases."""
    import argparse
    import json

    from scbch_dist.data.format import read_meta

    p = argparse.ArgumentParser(prog="python -m scbch_dist.data.noise", description=main.__doc__)
    p.add_argument("--root", required=True, help="dataset folder (meta.json, labels/clean.npy)")
    p.add_argument("--noise", required=True, help="mixed:RATE, redundant:R or replace:R")
    p.add_argument("--seed", type=int, default=0, help="as data.noise_seed")
    p.add_argument("--out", required=True, help="HDF5 file to write (result = noisy, True = clean)")
    args = p.parse_args(argv)
    if parse_noise(args.noise).kind not in NOISE_MODELS:
        raise NoiseError(f"--noise {args.noise!r}: give a generated model (mixed:RATE, redundant:R, replace:R)")
    meta = read_meta(args.root)
    noisy, _ = training_labels(args.root, meta, args.noise, seed=args.seed)
    clean = np.asarray(clean_training_labels(args.root, meta))
    save_noise_file(args.out, noisy, clean)
    print(json.dumps({"wrote": args.out, **noise_statistics(clean, noisy)}, indent=2))


def console() -> None:
    """The ``scbch-noise`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-noise")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.data.noise")
