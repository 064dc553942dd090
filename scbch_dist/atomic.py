"""Atomic file output: everything is written to a temporary name beside its target, flushed to
disk and renamed when complete, so a crash never leaves a half-written file under the final name.

Temporary names start with "." and end in ".tmp" (TMP_GLOB), so what a killed process left behind
can be found and removed. The files and folders made here get the modes the umask gives any
other file (0644 / 0755 under umask 022): mkstemp and mkdtemp alone would give 0600 / 0700, and
teammates on a shared filesystem could not read the results."""

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


TMP_GLOB = ".*.tmp"  # the names of unfinished atomic writes


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, *, folder: bool = False) -> None:
    """Give ``path`` the mode an ordinary open() or mkdir() would have given it."""
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


def honour_umask_tree(path: str | Path) -> None:
    """honour_umask for a folder and everything below it (files that libraries wrote 0600)."""
    mask = current_umask()
    for target in [Path(path), *Path(path).rglob("*")]:
        os.chmod(target, (0o777 if target.is_dir() else 0o666) & ~mask)


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
        honour_umask(tmp_path)  # after the saver: some (safetensors) create their file 0600 anew
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


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove the unfinished atomic writes (files or folders named TMP_GLOB) anywhere under
    ``folder``, left by a process killed mid-write; returns what was removed."""
    removed = sorted(Path(folder).rglob(TMP_GLOB)) if Path(folder).is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


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
        honour_umask(tmp, folder=True)
        fsync_tree(tmp)  # every file of the folder on disk before its name says it is complete
        try:
            os.rename(tmp, path)
            fsync_tree(path.parent, recursive=False)
        except OSError:
            if not path.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
