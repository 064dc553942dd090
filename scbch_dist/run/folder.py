"""A run's folder as a type: where each of a run's files lives, and the reading and writing of the
records other commands read back (docs/engine.md, "The run folder").

    run.lock        who holds the folder (engine.rundir.RunLock)
    config.yaml     the resolved config, sealed (config.save_config)
    summary.json    the finished run's results, sealed: its presence marks the run finished
    codes.npz       the final model's packed codes and labels, with their digest
    checkpoints/    epoch-NNNN/ folders and ``latest`` (engine.checkpoint)
    log.txt, metrics.jsonl, plots/, tensorboard/, index/ (retrieval.index), refit/ (a run folder)

Every module reaches these files through ``RunFolder``; no other module names codes.npz or
summary.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from scbch_dist.atomic import atomic_save_with
from scbch_dist.data.remote import configured_root, is_remote
from scbch_dist.digests import arrays_sha256, missing_digest, read_sealed_json, sealed_run, write_sealed_json
from scbch_dist.errors import CodesError, RunDirError, first_line

CODES_DIGEST = "sha256"  # the member of codes.npz that holds the digest of the others


def _inside(name: str) -> property:
    """A RunFolder attribute: the path of ``name`` in the folder."""
    return property(lambda self: self.path / name, doc=f"the folder's {name}")


class RunFolder:
    """The folder ``path`` of one run. Cheap to make: it reads nothing until asked."""

    CONFIG = "config.yaml"
    SUMMARY = "summary.json"
    CODES = "codes.npz"
    CHECKPOINTS = "checkpoints"
    LOCK = "run.lock"
    LOG = "log.txt"
    METRICS = "metrics.jsonl"
    STOP = "STOP"  # a stop request: the run checkpoints after its step (engine/stop.py)
    REFIT = "refit"  # RUN_DIR/refit: the run trained again on every row (eval.refit, scbch_dist.refit)
    # what a run writes; the summary first, so that a removal cut short never leaves a "finished" folder
    OUTPUTS = (SUMMARY, CHECKPOINTS, METRICS, CODES, LOG, "plots", "tensorboard", "index", REFIT, CONFIG)
    RESULTS = OUTPUTS[:4]  # the outputs that record training

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    config = _inside(CONFIG)
    summary = _inside(SUMMARY)
    codes = _inside(CODES)
    checkpoints = _inside(CHECKPOINTS)
    lock = _inside(LOCK)
    log = _inside(LOG)
    metrics = _inside(METRICS)
    stop = _inside(STOP)

    @property
    def refit(self) -> RunFolder:
        return RunFolder(self.path / self.REFIT)

    @property
    def finished(self) -> bool:
        """Whether the run has ended and written its summary."""
        return self.summary.is_file()

    @property
    def sealed(self) -> bool:
        """Whether a version that seals what it writes wrote the folder (digests.sealed_run)."""
        return sealed_run(self.path)

    def dataset(self, data: Any, given: str | Path | None = None, *, served_ok: bool = False) -> Path:
        """The run's dataset folder, for its config's ``data`` section: ``given`` if given, else
        data.root as the run saw it (a relative path is tried from here, then from the folder above
        the run folder). A data.root on a server is taken where ``served_ok`` (re-encoding streams
        its shards); search shows items from a local copy only."""
        if given is None and is_remote(data.root):
            if served_ok:
                return configured_root(data)
            raise RunDirError(f"the run's dataset is on a server (data.root={data.root}); search shows its items from "
                              "a local copy: give --data-root DIR")
        if given is not None:
            candidates = [Path(given)]
        else:
            root = Path(data.root)
            above = self.path.resolve().parent
            candidates = [root] if root.is_absolute() else [root, above / root, above.parent / root]
        for root in candidates:
            if (root / "meta.json").is_file():
                return root
        raise RunDirError(f"the run's dataset {data.root} (data.root) is not found from {Path.cwd()}; run from the "
                          "folder it was trained in, or give --data-root")

    def outputs(self) -> list[str]:
        """The names of OUTPUTS present (empty: the folder is free for a new run)."""
        return [name for name in self.OUTPUTS if (self.path / name).exists()]

    # -- summary.json ---------------------------------------------------------------------------

    def read_summary(self) -> dict:
        """The summary, its digest checked (required where the folder is sealed)."""
        return read_sealed_json(self.summary, required=self.sealed)

    def write_summary(self, summary: dict) -> None:
        write_sealed_json(self.summary, summary)

    def summary_has_digest(self) -> bool:
        """Whether summary.json carries its own digest (written by a sealing version), read as text:
        for the checks that decide whether the folder's other files must carry theirs."""
        try:
            return '"sha256"' in self.summary.read_text(errors="replace")
        except OSError:
            return False

    def set_summary_aside(self, epoch: int) -> Path | None:
        """Move the summary of an earlier end to summary-epoch-NNNN.json (a resumed run: the result is
        kept, and until the run ends again no launcher takes the folder for finished); the new name,
        or None without a summary."""
        if not self.summary.is_file():
            return None
        kept = self.path / f"{self.summary.stem}-epoch-{epoch:04d}{self.summary.suffix}"
        os.replace(self.summary, kept)
        return kept

    # -- codes.npz ------------------------------------------------------------------------------

    def write_codes(self, codes: dict[str, np.ndarray], *, model_sha256: str = "", config: dict | None = None,
                    precision: str = "no") -> None:
        """Packed codes (np.packbits along bits, big-endian bit order) and labels, by id; with the
        fingerprint of the model that made them, the precision of the passes that encoded them
        (Accelerate's "no", "bf16", "fp16": what re-encodes them, engine.encode.autocast_of) and the
        run's config (JSON), which the Hamming index checks them against (docs/search.md), and the
        sha256 of all of it (digests.arrays_sha256), which every reader checks. ``codes``:
        "{query,database}_{img,txt}" (n, L) bool and "{query,database}_lab" (n, C) uint8."""
        arrays = {k: (np.packbits(v, axis=1) if k.endswith(("img", "txt")) else v) for k, v in codes.items()}
        arrays["bits"] = np.array(codes["query_img"].shape[1])
        arrays["model_sha256"] = np.array(model_sha256)
        arrays["precision"] = np.array(precision)
        arrays["config"] = np.array(json.dumps(config or {}, sort_keys=True))
        arrays[CODES_DIGEST] = np.array(arrays_sha256(arrays))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **arrays)

        atomic_save_with(self.codes, write)

    def read_codes(self) -> dict[str, np.ndarray]:
        """Every array of codes.npz (packed as written), its digest checked (codes written before
        digests are read as they are). A damaged file is a CodesError naming it, with the way to
        write it again."""
        path = self.codes
        again = (f"delete it and write it again: python -m scbch_dist.train --resume {self.path} "
                 "--set run.save_codes=true")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        # Any exception: a damaged archive reaches zipfile and numpy's header parser, which raise far
        # more than OSError/ValueError (NotImplementedError for a compression-method byte, tokenize's
        # TokenError for a header byte: both found by the fuzz test); this block only parses the file.
        except Exception as e:  # noqa: BLE001
            if isinstance(e, (MemoryError, RecursionError)):
                raise
            raise CodesError(f"{path}: not a readable codes file ({type(e).__name__}: {first_line(e)}); {again}") from None
        stored = arrays.pop(CODES_DIGEST, None)
        if stored is None and self.sealed:  # written with its digest, which was removed
            raise CodesError(f"{missing_digest(path, f'{CODES_DIGEST!r} member')}; {again}")
        if stored is not None and str(stored) != arrays_sha256(arrays):
            raise CodesError(f"{path}: its content differs from the sha256 it was written with (corrupted); {again}")
        if "bits" not in arrays:
            raise CodesError(f"{path}: not a codes file (no 'bits'); {again}")
        return arrays
