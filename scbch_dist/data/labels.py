"""Label tables: loading and checking the (N_train, C) 0/1 tables a run trains on.

``labels/clean.npy`` (every dataset folder's clean training labels), the cached noise tables
``labels/<noise>-seed<S>.npy`` and imported noise files all pass through here. Both
``data.noise`` (which builds and reads tables) and ``data.verify`` (which checks a whole folder)
import this module; it imports neither, so the data modules form no import cycle.

Every problem is a NoiseError whose one-line message names the file, and for a bad value the row
(sample key) and the class column.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from scbch_dist.data.format import KEY_DIGITS, DatasetMeta
from scbch_dist.data.remote import dataset_root, is_remote
from scbch_dist.errors import ScbchError


class NoiseError(ScbchError, ValueError):
    """A bad noise setting, noise file or label table; the message names the file or setting."""


def sample_key(i: int) -> str:
    """The shard key of sample id ``i`` (zero-padded, as the shards spell it): what messages name."""
    return f"{int(i):0{KEY_DIGITS}d}"


def _reason(e: BaseException) -> str:
    """An exception's message on one line (numpy's may span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def load_label_file(path: str | Path) -> np.ndarray:
    """A label table from a .npy file, memory-mapped (read-only). A missing, truncated or
    unreadable file is a NoiseError naming it (np.load raises ValueError, EOFError or OSError)."""
    path = dataset_root(path)
    if not path.is_file():
        raise NoiseError(f"{path}: missing")
    remote = is_remote(path)
    data = path.read_bytes() if remote else None  # a server's file is read once, into memory
    with (io.BytesIO(data) if remote else open(path, "rb")) as f:
        if f.read(6) != b"\x93NUMPY":  # numpy would call any other file "pickled data"
            raise NoiseError(f"{path}: not a .npy file (no NumPy header)")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False) if remote else np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise NoiseError(f"{path}: not a readable .npy file ({_reason(e)})") from None


def check_label_values(where: str, table: np.ndarray) -> None:
    """Every entry of the (N, C) ``table`` is 0 or 1 (any numeric dtype: published HDF5 files hold
    float64). ``where`` starts the message (a file, or a file and its dataset)."""
    table = np.asarray(table)
    if table.dtype.kind not in "biuf":
        raise NoiseError(f"{where}: dtype {table.dtype} is not numeric (labels must be 0/1)")
    if table.dtype.kind == "b":
        return
    bad = (table != 0) & (table != 1)  # NaN is unequal to both: caught too
    if bad.any():
        row, col = np.unravel_index(int(np.argmax(bad)), bad.shape)  # the first, in row-major order
        value = table[row, col]
        shown = int(value) if table.dtype.kind in "iu" or float(value).is_integer() else float(value)
        raise NoiseError(f"{where}: row {sample_key(row)} class {col} has value {shown} (labels must be 0/1)")


def check_label_table(path: str | Path, table: np.ndarray, meta: DatasetMeta) -> None:
    """A label table of the training split: shape (N_train, C) as meta.json says, an integer or
    bool dtype, values only 0/1. Errors (NoiseError) name ``path``, and for a bad value the row
    (sample key) and the class column."""
    want = (meta.splits["train"].count, meta.num_classes)
    if table.shape != want:
        raise NoiseError(f"{path}: shape {table.shape}, expected {want} (training samples x classes of meta.json)")
    if table.dtype.kind not in "biu":
        raise NoiseError(f"{path}: dtype {table.dtype}, expected an integer or bool table of 0/1 labels")
    check_label_values(str(path), table)


def clean_training_labels(root: str | Path, meta: DatasetMeta) -> np.ndarray:
    """labels/clean.npy, memory-mapped: (N_train, C) 0/1. A missing, unreadable or truncated file,
    a wrong shape or dtype, or a value other than 0/1 is a NoiseError naming the file."""
    path = dataset_root(root) / "labels" / "clean.npy"
    if not path.is_file():
        raise NoiseError(f"{path}: missing (every dataset folder carries its clean training labels)")
    clean = load_label_file(path)
    check_label_table(path, clean, meta)
    return clean


VALIDATION_SEED = 20260  # the draw of the held-out rows: fixed, so every seed and method of a sweep shares them


def held_out_ids(count: int, rows: int) -> np.ndarray:
    """The ``rows`` training ids held out for model selection (eval.validation), sorted: a uniform
    draw that depends only on the training set's size, never on train.seed or the method."""
    if not 0 <= rows < count:
        raise ValueError(f"{rows} held-out rows of a training set of {count}")
    return np.sort(np.random.default_rng([VALIDATION_SEED, count]).choice(count, rows, replace=False))
