"""sha256 digests on everything a run writes and later reads back (docs/engine.md, "Integrity").

Four forms, one per kind of file:

- a folder (a checkpoint): ``manifest.json`` lists every file below it with its size and sha256;
- a JSON record (summary.json, index.json): the sha256 of its own canonical form, under "sha256";
- a text file (a run's config.yaml): a last comment line ``# sha256: <hex>`` of the lines above;
- arrays (codes.npz): the sha256 of their names, dtypes, shapes and bytes, stored beside them.

Reading checks the digest; a mismatch is an ``IntegrityError`` naming the file, never a silently
different result. Files written before digests existed carry none and are read as they are, but
only in a run folder of such a version: where the run's config.yaml carries its digest line
(``sealed_run``), a file without its digest had it removed, and is refused.
Checking a checkpoint on every read costs about a second at paper width (docs/benchmarks.md,
"Figures quoted in the code").
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from scbch_dist.errors import ScbchError
from scbch_dist.atomic import atomic_write_text

MANIFEST = "manifest.json"
DIGEST_KEY = "sha256"  # the key of a sealed JSON record's own digest
TEXT_DIGEST = re.compile(r"# sha256: ([0-9a-f]{64})\n\Z")  # the last line of a sealed text file
CHUNK = 1 << 20


class IntegrityError(ScbchError, ValueError):
    """A file differs from what was written (its digest), or cannot be read back; the message names it."""


def sha256_file(path: str | Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of named arrays: each name, dtype, shape and C-order bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# sealed JSON records


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(record: dict) -> dict:
    """``record`` as JSON reads it back (tuples as lists, keys as strings), with its digest under
    "sha256". ``record`` must be JSON-safe (runlog.json_safe)."""
    plain = json.loads(json.dumps(record))
    plain.pop(DIGEST_KEY, None)
    return {**plain, DIGEST_KEY: sha256_bytes(_canonical(plain))}


def write_sealed_json(path: str | Path, record: dict) -> dict:
    """Write ``record`` with its digest (atomically); returns what was written."""
    sealed = seal(record)
    atomic_write_text(path, json.dumps(sealed, indent=2) + "\n")
    return sealed


def sealed_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` was written by a version that seals what it writes: its config.yaml ends
    with the digest line. Every summary, codes file and checkpoint of such a folder carries its
    digest, so one without it had it removed (and maybe its content changed with it)."""
    path = Path(run_dir) / "config.yaml"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 200))
            return TEXT_DIGEST.search(f.read().decode("utf-8", errors="replace")) is not None
    except OSError:
        return False


def missing_digest(path: str | Path, what: str) -> IntegrityError:
    """The refusal of a file without its digest in a sealed run folder."""
    return IntegrityError(f"{path}: has no {what}, yet its run folder was written with digests (config.yaml "
                          "carries its own): the digest was removed, and what it guarded may have been changed with "
                          "it; restore the file, or write it again")


def read_sealed_json(path: str | Path, *, required: bool = False) -> dict:
    """A JSON object written by write_sealed_json, its digest checked and removed. A file that is
    not a JSON object, or whose digest differs, is an IntegrityError naming it; one without a
    digest (written before digests existed) is returned as it is, unless ``required`` (a file of a
    sealed run folder: ``sealed_run``)."""
    path = Path(path)
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise IntegrityError(f"{path}: not readable JSON ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise IntegrityError(f"{path}: not a JSON object")
    stored = record.pop(DIGEST_KEY, None)
    if stored is None and required:
        raise missing_digest(path, f'"{DIGEST_KEY}" field')
    if stored is not None and stored != sha256_bytes(_canonical(record)):
        raise IntegrityError(f"{path}: its content differs from the sha256 it was written with (changed or "
                             "corrupted since)")
    return record


# ----------------------------------------------------------------------------------------------
# sealed text files


def seal_text(text: str) -> str:
    """``text`` (ending in a newline) followed by ``# sha256: <hex of text>``."""
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}# sha256: {sha256_bytes(text.encode('utf-8'))}\n"


def check_text(path: str | Path) -> bool:
    """Check a text file written with seal_text; False for one without a digest line (written
    before digests existed, or by hand). A mismatch is an IntegrityError naming the file."""
    path = Path(path)
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    match = TEXT_DIGEST.search(text)
    if match is None:
        return False
    body = data[: len(data) - len(match.group(0).encode())]
    if sha256_bytes(body) != match.group(1):
        raise IntegrityError(f"{path}: changed since it was written (its last line holds the sha256 of the lines "
                             "above, which differs)")
    return True


# ----------------------------------------------------------------------------------------------
# folder manifests


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: str | Path) -> dict:
    """Record every file below ``folder`` (relative posix path -> bytes and sha256) in
    ``folder/manifest.json``, written atomically; returns the record."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in _files(folder)}
    return write_sealed_json(folder / MANIFEST, {"format": 1, "files": files})


def _read_manifest(folder: Path) -> tuple[Path, dict] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    files = read_sealed_json(path).get("files")
    if not isinstance(files, dict):
        raise IntegrityError(f"{path}: not a manifest (no 'files' object)")
    return path, files


def _check_entry(folder: Path, manifest: Path, name: str, entry: dict | None) -> None:
    file = folder / name
    if entry is None:
        raise IntegrityError(f"{file}: not listed in {manifest} (added after the folder was written)")
    if not file.is_file():
        raise IntegrityError(f"{file}: missing (listed in {manifest})")
    size = file.stat().st_size
    if size != entry.get("bytes"):
        raise IntegrityError(f"{file}: {size} bytes, {entry.get('bytes')} when it was written (truncated or "
                             "changed since)")
    if sha256_file(file) != entry.get("sha256"):
        raise IntegrityError(f"{file}: its sha256 differs from the one recorded in {manifest} when it was written "
                             "(corrupted or changed since)")


def verify_manifest(folder: str | Path) -> bool:
    """Check every file below ``folder`` against its manifest: each listed file present with its
    size and sha256, no file that the manifest does not list. False when the folder has no
    manifest (written before manifests existed); an IntegrityError naming the file otherwise."""
    folder = Path(folder)
    found = _read_manifest(folder)
    if found is None:
        return False
    manifest, files = found
    present = {p.relative_to(folder).as_posix() for p in _files(folder)}
    for name in sorted(set(files) | present):
        _check_entry(folder, manifest, name, files.get(name))
    return True


def verify_listed(folder: str | Path, name: str) -> bool:
    """Check one file of a folder against the folder's manifest (a reader that needs only that
    file); False when the folder has no manifest."""
    folder = Path(folder)
    found = _read_manifest(folder)
    if found is None:
        return False
    manifest, files = found
    _check_entry(folder, manifest, name, files.get(name))
    return True


def seal_folder(folder: str | Path) -> str:
    """Write ``folder``'s manifest; returns the sha256 of the manifest itself, for a record kept
    elsewhere (a dataset's meta.json records its Doc2Vec model folder's)."""
    write_manifest(folder)
    return sha256_file(Path(folder) / MANIFEST)


def check_sealed_folder(folder: str | Path, manifest_sha256: str, remedy: str) -> None:
    """``folder`` against the manifest sha256 recorded elsewhere: the manifest, then every file
    against it. An IntegrityError naming the file and ending in ``remedy``."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file() or sha256_file(manifest) != manifest_sha256:
        raise IntegrityError(f"{manifest}: {'missing' if not manifest.is_file() else 'not the manifest'} that was "
                             f"recorded for {folder} (replaced since?); {remedy}")
    try:
        verify_manifest(folder)
    except IntegrityError as e:
        raise IntegrityError(f"{e}; {remedy}") from None
