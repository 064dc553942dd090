"""Atomic file output: everything is written to a temporary name beside its target, flushed to
disk and renamed when complete, so a crash never leaves a half-written file under the final name."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_tree(tmp_path)  # the content is on disk before the name says it is complete
        os.replace(tmp_path, path)
        fsync_tree(path.parent, recursive=False)  # the new name itself
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_tree(path: str | Path, *, recursive: bool = True) -> None:
    """Flush ``path`` to disk: a file, or a folder (with ``recursive``, every file and folder below
    it too), so that a rename or a pointer written afterwards never names lost data."""
    path = Path(path)
    targets = [*path.rglob("*"), path] if path.is_dir() and recursive else [path]
    for target in targets:
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_with(path: str | Path, save: Callable[[Path], None]) -> None:
    """Atomic write through any saver that takes a path (torch.save, savefig, np.savez)."""
    with atomic_path(path) as tmp:
        save(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a whole folder under a temporary name; rename it onto ``path`` when complete.

    If another process created ``path`` meanwhile (two ranks preparing the same dataset), ours
    is discarded: both hold the same content by construction.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
