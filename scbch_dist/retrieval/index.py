"""A Hamming index over a finished run's codes (docs/search.md).

    python -m scbch_dist.retrieval.index build RUN_DIR [--split database] [--kind flat|hash|ivf|hnsw] [--nprobe 16 ...]
    python -m scbch_dist.retrieval.index check RUN_DIR [--split database] [--kind flat] [-k 10]

``build`` indexes both modalities' codes of one split of ``RUN_DIR/codes.npz`` with FAISS
(scbch_dist.retrieval.hamming) into ``RUN_DIR/index/<split>-<kind>/``:

    index.json       kind, settings, code length, count, build times, the sha256 of codes.npz, the
                     fingerprint of the model that wrote the codes, the run's config, its own sha256
    img.faissindex   the image codes' index (FAISS's binary index format)
    txt.faissindex   the text codes' index
    ids.npy          (N,) int64: the sample id at each index position
    manifest.json    every file above with its size and sha256 (digests.write_manifest): a damaged file is refused

The folder is written under a temporary name and renamed when complete, with the run folder
locked (run.lock) meanwhile. codes.npz must belong to the run: its config must be the run's
config.yaml (run.* output keys aside), or the build is refused naming the keys that differ.
An index whose codes.npz has changed since (a resumed run, another run's file) is refused when
it is opened.

``check`` measures the index against the exact Hamming ranking of ``metrics``: every exact kind
must give the same ids at every distance, ties by database order, and the mAP of its rankings
must equal the run's summary mAP; approximate kinds report recall@k (judged with --min-recall).
It exits 1 when a check fails (2: it could not run).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from scbch_dist import cli, metrics
from scbch_dist.retrieval import hamming
from scbch_dist.retrieval.hamming import HammingIndexError
from scbch_dist.config import IndexSettings
from scbch_dist.digests import IntegrityError, read_sealed_json, verify_manifest, write_manifest, write_sealed_json
from scbch_dist.engine.scoring import CODE_SPLITS, MODALITIES, RunCodes
from scbch_dist.errors import first_line
from scbch_dist.run import RunFolder
from scbch_dist.atomic import atomic_directory, atomic_save_npy

FORMAT = 1
SEARCH_KNOBS = ("nprobe", "ef_search", "hash_flips")  # settings a search may change without a rebuild
CHECK_FAILED = 1  # exit status of a check that ran and found a problem (2: it could not run, cli.EXIT_ERROR)
# check's own options (the index settings' bounds are hamming.SETTINGS). A k above the database's
# size is measured at that size (hamming.search asks FAISS for min(k, N) codes), so a large k costs
# nothing; its bound only refuses what is surely a slip (-k 1000000000000) instead of printing a
# recall@k that was measured at another k.
K = hamming.Bound("-k", 1, 1 << 20, "recall@k; a k above the database's size is measured at that size")
MIN_RECALL = hamming.Bound("--min-recall", 0.0, 1.0, "fail when recall@k is below this; 0: report only")


def index_dir(run_dir: str | Path, split: str, kind: str) -> Path:
    return Path(run_dir) / "index" / f"{split}-{kind}"


def settings_from(args: argparse.Namespace | dict | None) -> IndexSettings:
    """IndexSettings with the given fields overridden (argparse values of None are left out)."""
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    names = {f.name for f in fields(IndexSettings)}
    return IndexSettings(**{k: v for k, v in given.items() if k in names and v is not None})


def build(run_dir: str | Path, *, split: str = "database", settings: IndexSettings = IndexSettings(),
          log=print) -> Path:
    """Index both modalities of ``split``; returns the index folder. Locks the run folder."""
    from scbch_dist.engine.rundir import RunLock

    run_dir = Path(run_dir)
    if split not in CODE_SPLITS:
        raise HammingIndexError(f"--split {split!r}: {RunFolder.CODES} holds {' and '.join(CODE_SPLITS)}")
    hamming.check_settings(settings)  # before the lock: a refused setting leaves nothing behind
    with RunLock(run_dir, create=False):
        codes = RunCodes.load(run_dir)
        # every setting resolved, and refused, before a file is written (hash_flips against the
        # resolved hash_bits, nlist against the count)
        resolved = {m: hamming.resolve(settings, settings.kind, codes.bits, len(codes.codes[f"{split}_{m}"]))
                    for m in MODALITIES}
        target = index_dir(run_dir, split, settings.kind)
        record = {"format": FORMAT, "kind": settings.kind, "split": split, "bits": codes.bits,
                  "count": len(codes.labels[split]), "codes_sha256": codes.sha256, "model_sha256": codes.model_sha256,
                  "config": codes.config, "modalities": {}, "built": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "faiss": hamming.faiss_module().__version__}
        staged = target.parent / f".{target.name}.new.tmp"  # a temporary name: io.remove_leftovers knows it
        shutil.rmtree(staged, ignore_errors=True)  # what a killed build left
        with atomic_directory(staged) as tmp:
            for m in MODALITIES:
                data = codes.codes[f"{split}_{m}"]
                t0 = time.perf_counter()
                index = hamming.build(data, resolved[m], seed=settings.seed)
                seconds = time.perf_counter() - t0
                hamming.write(index, tmp / f"{m}.faissindex")
                record["modalities"][m] = {"file": f"{m}.faissindex", "settings": resolved[m].to_dict(),
                                           "build_seconds": round(seconds, 4)}
                log(f"{m}: {resolved[m].kind} index of {len(data)} codes of {codes.bits} bits in {seconds:.2f} s")
            atomic_save_npy(tmp / "ids.npy", np.arange(record["count"], dtype=np.int64))
            write_sealed_json(tmp / "index.json", record)
            write_manifest(tmp)  # the digests an opened index is checked against: a damaged file is never searched
        # swap the complete new folder in; the old one (an earlier build) goes only once the new one is whole
        if target.exists():
            old = target.parent / f".{target.name}.old.tmp"
            target.rename(old)
            staged.rename(target)
            shutil.rmtree(old)
        else:
            staged.rename(target)
    return target


@dataclass
class RunIndex:
    """An opened index: both modalities of one split, checked against the run's codes."""

    path: Path
    record: dict
    ids: np.ndarray  # (N,) int64
    indexes: dict  # "img" / "txt" -> faiss.IndexBinary
    settings: dict  # "img" / "txt" -> hamming.Resolved as searched

    @classmethod
    def open(cls, run_dir: str | Path, codes: RunCodes, *, split: str = "database", kind: str = "flat",
             overrides: dict | None = None) -> RunIndex:
        overrides = {k: v for k, v in (overrides or {}).items() if k in SEARCH_KNOBS and v is not None}
        for name, value in overrides.items():  # (check and search take them from their command line)
            hamming.SETTINGS[name].check(value)
        path = index_dir(run_dir, split, kind)
        if not (path / "index.json").is_file():
            raise HammingIndexError(f"{path}: no {kind} index of the {split} codes; build it: python -m scbch_dist.retrieval.index "
                                    f"build {run_dir} --split {split} --kind {kind}")
        try:
            verify_manifest(path)  # (an index built before manifests has none: read as it is)
            record = read_sealed_json(path / "index.json")
        except IntegrityError as e:
            raise HammingIndexError(f"{e}; rebuild the index: python -m scbch_dist.retrieval.index build {run_dir} --split {split} "
                                    f"--kind {kind}") from None
        rebuild = f"rebuild it: python -m scbch_dist.retrieval.index build {run_dir} --split {split} --kind {kind}"
        if record.get("format") != FORMAT:
            raise HammingIndexError(f"{path / 'index.json'}: index format {record.get('format')!r}, this version reads "
                                    f"{FORMAT}; {rebuild}")
        try:
            if record["codes_sha256"] != codes.sha256:
                raise HammingIndexError(f"{path}: built from other codes than {RunFolder(run_dir).codes} now holds "
                                        f"(built "
                                        f"{record['built']}, model {record['model_sha256'][:12] or '?'}; the codes now: "
                                        f"model {codes.model_sha256[:12] or '?'}); {rebuild}")
            ids = np.load(path / "ids.npy", allow_pickle=False)
            indexes, settings = {}, {}
            for m in MODALITIES:
                stored = record["modalities"][m]["settings"]
                resolved = hamming.Resolved(**{**stored, **{k: v for k, v in overrides.items() if k in stored}})
                indexes[m] = hamming.read(path / record["modalities"][m]["file"], resolved)
                settings[m] = resolved
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # an index of an earlier version, damaged
            if isinstance(e, HammingIndexError):
                raise
            raise HammingIndexError(f"{path}: not a readable index ({type(e).__name__}: {first_line(e)[:200]}); "
                                    f"{rebuild}") from None
        return cls(path, record, ids, indexes, settings)

    def search(self, modality: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Codes of ``modality``'s index nearest each query: (distances, ids), as hamming.search."""
        distances, positions = hamming.search(self.indexes[modality], queries, k)
        return distances, np.where(positions >= 0, self.ids[np.maximum(positions, 0)], -1)


# ----------------------------------------------------------------------------------------------
# check: the index against the exact ranking


def tie_aware_recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean over queries of the fraction of the k returned codes at a distance no greater than
    the exact k-th nearest one (so equally near codes count alike). ``found`` and ``exact``:
    (q, >=k) distances sorted ascending, -1 for missing."""
    kth = exact[:, k - 1:k]
    got = found[:, :k]
    return float(((got >= 0) & (got <= kth)).sum(1).mean() / k)


def check(run_dir: str | Path, *, split: str = "database", kind: str = "flat", k: int = 10,
          overrides: dict | None = None, max_entries: int = 50_000_000) -> list[dict]:
    """Per direction: whether the index ranks as ``metrics`` does (exact kinds), the mAP of its
    rankings against summary.json's final mAP, and recall@k against the exact search.
    Full rankings are compared while queries x database <= ``max_entries``; beyond, the first
    ``max_entries // N`` queries."""
    run_dir = Path(run_dir)
    K.check(k)
    codes = RunCodes.load(run_dir)
    index = RunIndex.open(run_dir, codes, split=split, kind=kind, overrides=overrides)
    other = "query" if split == "database" else "database"
    folder = RunFolder(run_dir)
    try:
        summary = folder.read_summary().get("final") or {} if folder.finished else {}
    except IntegrityError as e:
        raise HammingIndexError(str(e)) from None
    rows = []
    for direction, (q_mod, d_mod) in {"i2t": ("img", "txt"), "t2i": ("txt", "img")}.items():
        queries, database = codes.codes[f"{other}_{q_mod}"], codes.codes[f"{split}_{d_mod}"]
        n = len(database)
        q = min(len(queries), max(1, max_entries // n))
        t0 = time.perf_counter()
        distances = metrics.hamming_distances(queries[:q], database).numpy()
        exact_rank = np.argsort(distances, axis=1, kind="stable")  # metrics' index-tie ranking
        exact_dist = np.take_along_axis(distances, exact_rank, 1)
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        width = n if kind in hamming.EXACT_KINDS else min(n, max(k, 100))
        dist, ids = index.search(d_mod, queries[:q], width)
        t_index = time.perf_counter() - t0
        row = {"direction": direction, "queries": q, "database": n, "k": k,
               f"recall@{k}": tie_aware_recall(dist, exact_dist, min(k, n)),
               "index_ms_per_query": 1000 * t_index / q, "numpy_ms_per_query": 1000 * t_exact / q}
        if kind in hamming.EXACT_KINDS:
            row["same_ranking"] = bool(np.array_equal(ids, exact_rank) and np.array_equal(dist, exact_dist))
            ap = metrics.ranked_average_precision(ids, codes.labels[other][:q], codes.labels[split])
            row["map_from_index"] = float(np.nanmean(ap))
            if split == "database" and q == len(queries) and direction in summary:
                row["map_summary"] = summary[direction]["map"]
        rows.append(row)
    return rows


def failures(rows: list[dict], *, min_recall: float = 0.0) -> list[str]:
    """What ``check`` found wrong, one line each: an exact index that ranks otherwise than
    ``metrics``, an mAP from the index that is not the run's summary mAP, recall below ``min_recall``."""
    out = []
    for r in rows:
        where = f"{r['direction']} ({r['queries']} queries)"
        if r.get("same_ranking") is False:
            out.append(f"{where}: the index does not rank as the exact Hamming ranking does")
        # the summary's mAP may come from a blocked path of the ranking core, whose precision sums
        # agree with the one-block ranking's to rounding, not bit for bit
        if "map_summary" in r and abs(r["map_from_index"] - r["map_summary"]) > 1e-9:
            out.append(f"{where}: mAP from the index {r['map_from_index']:.6f}, {RunFolder.SUMMARY} says "
                       f"{r['map_summary']:.6f}")
        recall = r[f"recall@{r['k']}"]
        if recall < min_recall:
            out.append(f"{where}: recall@{r['k']} {recall:.4f} is below --min-recall {min_recall}")
    return out


# ----------------------------------------------------------------------------------------------
# command line


def _bounded(p: argparse.ArgumentParser, bound: hamming.Bound, dest: str, *, shown, kind: type = int,
             default=None) -> None:
    """An option whose --help states its range, from the bound that ``_check_options`` applies.
    The index settings default to None, which settings_from leaves to IndexSettings (or the index as built)."""
    p.add_argument(bound.flag, dest=dest, type=kind, default=default,
                   help=f"{bound.meaning}; {bound.low} to {bound.high} (default {shown})")


def _check_options(args: argparse.Namespace) -> None:
    """Every numeric option against its bound, before anything is read or written: FAISS aborts
    the process, never returns or allocates without limit on some values out of range."""
    for name, bound in hamming.SETTINGS.items():
        if getattr(args, name, None) is not None:
            bound.check(getattr(args, name))
    if args.command == "check":
        K.check(args.k)
        MIN_RECALL.check(args.min_recall)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.retrieval.index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = IndexSettings()
    b = sub.add_parser("build", help="index a run's codes")
    c = sub.add_parser("check", help="compare an index with the exact Hamming ranking")
    for q in (b, c):
        q.add_argument("run_dir", type=Path)
        q.add_argument("--split", default="database", choices=CODE_SPLITS)
        q.add_argument("--kind", default=d.kind, choices=hamming.KINDS)
    for name in SEARCH_KNOBS:  # search-time settings: check tries them on the built index
        _bounded(b, hamming.SETTINGS[name], name, shown=getattr(d, name))
        _bounded(c, hamming.SETTINGS[name], name, shown="as built")
    for name in ("nlist", "hnsw_m", "ef_construction", "hash_bits", "hash_tables", "seed"):
        _bounded(b, hamming.SETTINGS[name], name, shown=getattr(d, name))
    _bounded(c, K, "k", shown=10, default=10)
    _bounded(c, MIN_RECALL, "min_recall", shown=0.0, kind=float, default=0.0)
    args = p.parse_args(argv)
    _check_options(args)
    if args.command == "build":
        path = build(args.run_dir, split=args.split, settings=settings_from(args))
        print(f"wrote {path}", file=sys.stderr)
        return
    rows = check(args.run_dir, split=args.split, kind=args.kind, k=args.k, overrides=vars(args))
    print(f"| direction | queries | database | recall@{args.k} | same ranking as metrics | mAP from the index | "
          "summary mAP | index ms/query | numpy ms/query |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r["direction"], r["queries"], r["database"], f"{r[f'recall@{args.k}']:.4f}",
                 {True: "yes", False: "NO"}.get(r.get("same_ranking"), "-"),
                 f"{r['map_from_index']:.6f}" if "map_from_index" in r else "-",
                 f"{r['map_summary']:.6f}" if "map_summary" in r else "-",
                 f"{r['index_ms_per_query']:.3f}", f"{r['numpy_ms_per_query']:.3f}"]
        print("| " + " | ".join(str(x) for x in cells) + " |")
    found = failures(rows, min_recall=args.min_recall)
    for line in found:
        print(f"python -m scbch_dist.retrieval.index check: FAILED: {line}", file=sys.stderr)
    if found:
        sys.exit(CHECK_FAILED)


def console() -> None:
    """The ``scbch-index`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-index")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.retrieval.index")
