"""Check a whole dataset folder before trusting it with a long run.

    python -m scbch_dist.data.verify ROOT [--no-checksums] [--add-checksums]

Training reads every shard anyway and checks each block as it arrives (format.decode_group), but a
problem found in epoch 40 costs 39 epochs, and some problems are invisible to those checks: a shard
whose bytes changed after it was written (a flipped bit in a feature is still a finite number), an
id that occurs twice while another is missing, ``labels/clean.npy`` rows that no longer match the
shards, a noise table holding something other than 0/1. This module finds them in one pass:

- the sha256 of every shard against ``meta.json`` (datasets written before checksums existed have
  none; ``--add-checksums`` verifies the shards and then records them);
- every block of every shard through the training reader (widths, multi-hot labels, finite
  features, per-shard counts);
- ids: each id of 0..N-1 of each split exactly once;
- ``labels/clean.npy`` row for row against the training shards' ``lab.npy``;
- ``labels/clean.npy`` and every cached noise table: shape (N_train, C), integer dtype, only 0/1.

Every problem is a ShardError or NoiseError (label tables: data.labels) whose one-line message
names the file, the sample key and the field; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from scbch_dist import cli
from scbch_dist.data.format import SPLITS, DatasetMeta, ShardError, meta_path, read_meta, read_vocab, sha256_file
from scbch_dist.data.labels import check_label_table, clean_training_labels, load_label_file, sample_key
from scbch_dist.data.pipeline import read_blocks
from scbch_dist.digests import check_sealed_folder
from scbch_dist.atomic import atomic_write_json


def _reason(e: BaseException) -> str:
    """An exception's message on one line (numpy's and h5py's may span several)."""
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------------------------
# Shards and ids


def verify_shards(root: str | Path, meta: DatasetMeta, split: str, shards: list[str] | None = None, *,
                  clean: np.ndarray | None = None, checksums: bool = True,
                  label_counts: np.ndarray | None = None) -> np.ndarray:
    """Check the listed shards of ``split`` (default all, in meta.json order).

    Per shard: its sha256 against meta.json (when ``checksums`` and meta.json has them), then every
    block through the training reader (read_blocks), and, for the training split when ``clean``
    ((N_train, C), labels/clean.npy) is given, each block's labels against ``clean[ids]``.
    Returns ``id_counts``: (count,) int32, how often each id of the split occurred in these shards
    (processes that split the shards among them sum these before check_id_counts).
    ``label_counts``: (C + 1,) int64, if given, gets each class's positive rows added, and in its
    last entry the rows without any label (check_evaluation_labels reads them).
    """
    id_counts = np.zeros(meta.splits[split].count, dtype=np.int32)
    for name in meta.splits[split].shards if shards is None else shards:
        _verify_shard(Path(root), meta, split, name, clean if split == "train" else None, checksums, id_counts,
                      label_counts)
    return id_counts


def check_evaluation_labels(root: str | Path, query: np.ndarray, database: np.ndarray) -> list[str]:
    """The evaluation's relevance needs labels: refuse a query split without any label, or whose
    classes no database row has (every mAP would be undefined: NaN). ``query``, ``database``:
    label_counts of verify_shards, summed over all shards. Returns warnings (some query rows
    unlabelled: they are left out of the means)."""
    unlabelled = int(query[-1])
    if not query[:-1].any():
        raise ShardError(f"{meta_path(root)}: no query row has a label ({unlabelled} unlabelled): the evaluation's "
                         "relevance is label overlap, so every mAP would be undefined")
    if not (query[:-1].astype(bool) & database[:-1].astype(bool)).any():
        raise ShardError(f"{meta_path(root)}: no class of the query split occurs in the database split: no query "
                         "has a relevant item, so every mAP would be undefined")
    return [f"{unlabelled} query row(s) have no label: they have no relevant item and are left out of the mAP "
            "means"] if unlabelled else []


def _verify_shard(root: Path, meta: DatasetMeta, split: str, name: str, clean: np.ndarray | None,
                  checksums: bool, id_counts: np.ndarray, label_counts: np.ndarray | None = None) -> None:
    """verify_shards for one shard, adding its ids to ``id_counts`` in place (one (count,) array per
    split rather than per shard: a split may have millions of ids and thousands of shards)."""
    info = meta.splits[split]
    if name not in info.shards:
        raise ValueError(f"verify_shards: {name!r} is not a shard of split {split!r}")
    path = root / name
    if not path.is_file():
        raise ShardError(f"{path}: shard of split {split!r} listed in meta.json is missing")
    if checksums and info.sha256:
        got, want = sha256_file(path), info.sha256[info.shards.index(name)]
        if got != want:
            raise ShardError(f"{path}: sha256 {got[:12]}... differs from meta.json ({want[:12]}...): "
                             f"the file changed after it was written")
    # the digest is verify's own, checked above (or not, without checksums), not the reader's
    for block in read_blocks([str(path)], meta, split, check_digests=False):
        ids = block["id"]
        np.add.at(id_counts, ids, 1)  # not id_counts[ids] += 1, which counts an id repeated in a block once
        if label_counts is not None:
            label_counts[:-1] += block["lab"].sum(0, dtype=np.int64)
            label_counts[-1] += int((block["lab"].sum(1) == 0).sum())
        if clean is not None:
            differ = (np.asarray(clean[ids]) != block["lab"]).any(axis=1)
            if differ.any():
                key = sample_key(ids[int(np.argmax(differ))])
                raise ShardError(f"{root / 'labels' / 'clean.npy'}: row {key} differs from field 'lab.npy' of "
                                 f"sample {key} in {path}")


def check_id_counts(root: str | Path, meta: DatasetMeta, split: str, id_counts: np.ndarray) -> None:
    """Each id 0..count-1 of ``split`` occurred exactly once (``id_counts``: (count,), summed over
    every shard of the split). Names the first repeated id, else the first missing one."""
    id_counts = np.asarray(id_counts)
    if id_counts.shape != (meta.splits[split].count,):
        raise ValueError(f"check_id_counts: {id_counts.shape} counts for split {split!r} of "
                         f"{meta.splits[split].count} samples")
    repeated = np.flatnonzero(id_counts > 1)
    if len(repeated):
        i = int(repeated[0])
        raise ShardError(f"{root}: split {split!r}: sample {sample_key(i)} occurs {int(id_counts[i])} times "
                         f"(ids must be unique)")
    missing = np.flatnonzero(id_counts == 0)
    if len(missing):
        raise ShardError(f"{root}: split {split!r}: sample {sample_key(missing[0])} is missing "
                         f"(ids must be dense 0..N-1)")


# ----------------------------------------------------------------------------------------------
# Whole datasets


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    # disable=None: drawn on a terminal only, so captured output and batch logs stay clean
    return tqdm(total=total, desc="verify", unit="shard", disable=None if show else True)


def verify_dataset(root: str | Path, *, checksums: bool = True, progress: bool = True) -> dict:
    """Every check of this module on the dataset at ``root`` (module docstring).

    Returns ``{split: {"shards": n, "samples": n, "bytes": n, "checksums": bool}, "label_tables":
    [names], "seconds": s}``; "checksums" says whether the shards' sha256 were compared.
    """
    start = time.perf_counter()
    root = Path(root)
    meta = read_meta(root)
    clean = clean_training_labels(root, meta)  # loaded and checked with check_label_table
    tables = ["clean"]
    for path in sorted((root / "labels").glob("*.npy")):
        if path.name != "clean.npy":  # cached noise tables: training regenerates a bad one, but say so
            check_label_table(path, load_label_file(path), meta)
            tables.append(path.stem)
    if meta.raw:
        read_vocab(root)
    text = meta.source.get("text", {}) if isinstance(meta.source.get("text"), dict) else {}
    if text.get("model_manifest_sha256"):  # a Doc2Vec model is a pickle: its files against meta.json's digest
        check_sealed_folder((root / text["model"]).parent, text["model_manifest_sha256"], "extract the dataset again")
    summary: dict = {}
    with _progress(sum(len(meta.splits[s].shards) for s in SPLITS), progress) as bar:
        for split in SPLITS:
            info = meta.splits[split]
            if info.count == 0 or not info.shards:
                raise ShardError(f"{meta_path(root)}: split {split!r} is empty (0 samples)")
            id_counts = np.zeros(info.count, dtype=np.int32)
            for name in info.shards:  # one at a time, for the progress bar
                _verify_shard(root, meta, split, name, clean if split == "train" else None, checksums, id_counts)
                bar.update()
            check_id_counts(root, meta, split, id_counts)
            summary[split] = {"shards": len(info.shards), "samples": info.count,
                              "bytes": sum((root / name).stat().st_size for name in info.shards),
                              "checksums": bool(checksums and info.sha256)}
    summary["label_tables"] = tables
    summary["seconds"] = time.perf_counter() - start
    return summary


def _add_checksums(root: Path, progress: bool) -> tuple[int, dict]:
    """add_checksums, also returning the summary of the verification it ran first."""
    summary = verify_dataset(root, checksums=True, progress=progress)  # splits without sha256: by content
    path = meta_path(root)
    raw = json.loads(path.read_text(encoding="utf-8"))  # the file itself: every other entry kept as is
    meta = read_meta(root)
    hashed = 0
    for split in SPLITS:
        if meta.splits[split].sha256:
            continue  # verified against its checksums above
        raw["splits"][split]["sha256"] = [sha256_file(root / name) for name in meta.splits[split].shards]
        hashed += len(meta.splits[split].shards)
    if hashed:
        try:
            atomic_write_json(path, raw)
        except OSError as e:
            raise ShardError(f"{path}: cannot write the checksums ({_reason(e)})") from None
    return hashed, summary


def add_checksums(root: str | Path, *, progress: bool = False) -> int:
    """Record the sha256 of every shard in meta.json, for a dataset written before checksums
    existed. The dataset is verified first (its shards by content), so only shards that pass get
    a checksum; splits that already have checksums are verified against them and kept. Writes
    meta.json atomically; returns the number of shards hashed (0: nothing to add)."""
    return _add_checksums(Path(root), progress)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.data.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", type=Path, help="dataset folder (meta.json, shards, labels/)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-checksums", action="store_true",
                      help="skip the sha256 comparison (faster; content checks only)")
    mode.add_argument("--add-checksums", action="store_true",
                      help="verify, then record the sha256 of shards that have none in meta.json")
    args = p.parse_args(argv)
    if args.add_checksums:
        hashed, summary = _add_checksums(args.root, progress=True)
    else:
        hashed, summary = 0, verify_dataset(args.root, checksums=not args.no_checksums, progress=True)
    missing = []
    for split in SPLITS:
        s = summary[split]
        if s["checksums"]:
            state = "sha256 ok"
        elif args.add_checksums:
            state = "sha256 added"
        elif args.no_checksums:
            state = "sha256 not checked"
        else:
            state = "no sha256 in meta.json"
            missing.append(split)
        print(f"{split}: {s['shards']} shards, {s['samples']} samples, {state}")
    print(f"label tables: {', '.join(summary['label_tables'])}: ok")
    if hashed:
        print(f"{args.root}: added the sha256 of {hashed} shards to meta.json")
    elif missing and not args.add_checksums:
        print(f"note: meta.json has no sha256 for {', '.join(missing)}; "
              f"python -m scbch_dist.data.verify {args.root} --add-checksums records them")
    print(f"{args.root}: ok ({summary['seconds']:.1f} s)")


def console() -> None:
    """The ``scbch-verify`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-verify")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.data.verify")
