"""A run's test-time scoring (docs/evaluation.md): encode query and database, compute the ranking
metrics, write the codes. (``scbch_dist.evaluate`` is the command that re-scores a finished run's
codes; it calls ``score_codes`` here.)

Each rank encodes a disjoint part of a split (the exactly-once pass); rows are gathered with
their ids and written into tables by id, so the order in which parts arrive never matters.
Every rank then scores its share of the queries against the whole database, and the main process
summarizes the gathered per-query rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scbch_dist import dist, metrics
from scbch_dist.data.format import DatasetMeta
from scbch_dist.config import migrate, read_run_config
from scbch_dist.digests import sha256_file
from scbch_dist.engine.rundir import changed_keys
from scbch_dist.errors import CodesError
from scbch_dist.run import RunFolder
from scbch_dist.metrics.table import PackedTable
from scbch_dist.engine.encode import AUTOCAST_DTYPES, encode_part
from scbch_dist.models import binary_codes


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n, L) bool -> (n, ceil(L/8)) uint8, most significant bit first (np.packbits' order)."""
    n, length = bits.shape
    padded = torch.zeros(n, -(-length // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :length] = bits
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (padded.view(n, padded.shape[1] // 8, 8) * weights).sum(2, dtype=torch.uint8)


DIRECTIONS = (("i2t", "img", "txt"), ("t2i", "txt", "img"))  # (name, query modality, database modality)


def encode_and_score(model: torch.nn.Module, root: Path, meta: DatasetMeta, *, batch_size: int, device: torch.device,
                     topk: list[int] = (), workers: int = 0, autocast=None,
                     transform=None) -> tuple[dict, dict]:
    """I2T (image queries against the text database) and T2I, relevance by clean labels:
    ``encode_codes`` then ``score_codes``. Returns ``(result, codes)`` (result empty on other ranks)."""
    codes = encode_codes(model, root, meta, batch_size=batch_size, device=device, workers=workers,
                         autocast=autocast, transform=transform)
    return score_codes(codes, codes["query_lab"], codes["database_lab"], topk=topk, device=device), codes


def encode_codes(model: torch.nn.Module, root: Path, meta: DatasetMeta, *, batch_size: int, device: torch.device,
                 workers: int = 0, autocast=None, transform=None) -> dict[str, np.ndarray]:
    """Collective: each rank encodes its part of query and database; the codes travel as packed
    bits (L/8 bytes a code) and every rank gets the whole: bool codes ``query_img``, ``query_txt``,
    ``database_img``, ``database_txt`` and labels ``query_lab``, ``database_lab``, by id."""
    codes: dict[str, np.ndarray] = {}
    for split in ("query", "database"):
        part = encode_part(model, root, meta, split, batch_size=batch_size, device=device, workers=workers,
                           autocast=autocast, transform=transform)
        bits = part["h_img"].shape[1]
        packed = {"id": part["id"], "lab": part["lab"],
                  "img": pack_bits(binary_codes(part["h_img"])), "txt": pack_bits(binary_codes(part["h_txt"]))}
        whole = dist.gather_by_id(packed, meta.splits[split].count)
        for m in ("img", "txt"):
            codes[f"{split}_{m}"] = np.unpackbits(whole[m].cpu().numpy(), axis=1, count=bits).astype(bool)
        codes[f"{split}_lab"] = whole["lab"].cpu().numpy()
    return codes


def score_codes(codes: dict[str, np.ndarray], query_labels: np.ndarray, db_labels: np.ndarray, *,
                topk: list[int] = (), device: torch.device = torch.device("cpu")) -> dict:
    """Collective: both directions of ``codes`` (``query_img`` ... ``database_txt``), every rank
    scoring its share of the queries (``ranking_metrics``). Returns on the main process ``i2t`` and
    ``t2i`` (as metrics.retrieval_metrics returns), ``avg_map`` and ``avg_map_tie_aware``; {} on the
    others."""
    result = {d: ranking_metrics(codes[f"query_{q}"], codes[f"database_{t}"], query_labels, db_labels, topk=topk,
                                 device=device) for d, q, t in DIRECTIONS}
    if not dist.is_main():
        return {}
    result["avg_map"] = (result["i2t"]["map"] + result["t2i"]["map"]) / 2
    result["avg_map_tie_aware"] = (result["i2t"]["map_tie_aware"] + result["t2i"]["map_tie_aware"]) / 2
    return result


def validate(model: torch.nn.Module, root: Path, meta: DatasetMeta, held_out: np.ndarray, labels: np.ndarray, *,
             select: str = "pairs", batch_size: int, device: torch.device, workers: int = 0, autocast=None,
             transform=None) -> dict:
    """Collective: the validation scores of eval.validation (docs/evaluation.md, "Selecting a model
    without the test set"). The held-out training rows ``held_out`` ((N,) bool) are encoded (the
    pass reads only them) and ordered by id. ``labels``: rows at even positions are the queries,
    rows at odd positions the database, relevance by the *noisy* training ``labels`` ((N, C)), the
    only labels a user has (``i2t``, ``t2i``: mAP@all, index ties and tie-aware, and their
    averages). ``pairs``: every held-out image against every held-out text, its own text the one
    relevant item, and back (tie-aware mean reciprocal rank). ``score`` is the one eval.select
    (``select``) names. Returns them on the main process, {} on the others."""
    ids = np.flatnonzero(held_out)
    part = encode_part(model, root, meta, "train", batch_size=batch_size, device=device, workers=workers,
                       autocast=autocast, transform=transform, only=held_out)
    position = torch.from_numpy(np.searchsorted(ids, part["id"].cpu().numpy())).to(device)
    bits = part["h_img"].shape[1]
    whole = dist.gather_by_id({"id": position, "img": pack_bits(binary_codes(part["h_img"])),
                               "txt": pack_bits(binary_codes(part["h_txt"]))}, len(ids))
    codes = {m: np.unpackbits(whole[m].cpu().numpy(), axis=1, count=bits).astype(bool) for m in ("img", "txt")}
    lab = np.asarray(labels)[ids]
    halves = {f"{split}_{m}": codes[m][start::2] for split, start in (("query", 0), ("database", 1)) for m in codes}
    result = score_codes(halves, lab[0::2], lab[1::2], device=device)
    if not dist.is_main():
        return {}
    out = {d: {"map": result[d]["map"], "map_tie_aware": result[d]["map_tie_aware"]} for d in ("i2t", "t2i")}
    out.update(avg_map=result["avg_map"], avg_map_tie_aware=result["avg_map_tie_aware"])
    # pairs: every held-out image against every held-out text, its own text the one relevant item,
    # and back: no label at all (V^2 distances, on the main process)
    out["pairs"] = {d: float(metrics.pair_reciprocal_rank(codes[q], codes[t]).mean()) for d, q, t in DIRECTIONS}
    out["pairs"]["avg"] = (out["pairs"]["i2t"] + out["pairs"]["t2i"]) / 2
    out["score"] = out["pairs"]["avg"] if select == "pairs" else out["avg_map"]
    out["rows"] = int(len(ids))
    return out


def ranking_metrics(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray,
                    *, topk: list[int] = (), device: torch.device = torch.device("cpu"),
                    db_chunk: int | None = None) -> dict:
    """Collective: metrics.retrieval_metrics over every rank. Each rank scores its contiguous share
    of the queries against the whole database (every rank holds it, or reads the same packed tables
    on disk, metrics.table) on ``torch.get_num_threads()`` threads, or with the torch kernels on a
    GPU; the per-query rows are gathered in rank order and the main process summarizes them: the
    numbers of one process, to the last bit. ``db_chunk``: database rows a block (None:
    metrics.DB_CHUNK). A database in tables on disk is streamed by the CPU kernels on every
    device: the GPU path holds the whole database in GPU memory. Returns the metrics on the main
    process, {} on the others."""
    share = dist.share(len(query_codes))
    if device.type == "cuda" and not isinstance(db_codes, PackedTable):  # (tables stream on the CPU)
        t = {k: torch.from_numpy(np.ascontiguousarray(v[share] if k.startswith("q") else v)).to(device)
             for k, v in (("qc", query_codes), ("dc", db_codes), ("ql", query_labels), ("dl", db_labels))}
        scores = metrics.score_queries_torch(t["qc"], t["dc"], t["ql"], t["dl"], topk=topk)
    else:
        scores = metrics.score_queries(query_codes[share], db_codes, query_labels[share], db_labels, topk=topk,
                                       threads=torch.get_num_threads(),
                                       db_chunk=metrics.DB_CHUNK if db_chunk is None else db_chunk)
    if dist.is_distributed():
        counts = dist.all_counts(len(scores.count), device)
        scores = metrics.QueryScores(*(dist.gather_rows(torch.from_numpy(getattr(scores, f)).to(device),
                                                        counts=counts)[0].cpu().numpy()
                                       for f in metrics.QueryScores.FIELDS))
    return metrics.summarize_scores(scores, len(db_codes), topk=topk) if dist.is_main() else {}


HEADLINE = ("map", "map_tie_aware", "map_at_k", "map_at_k_tie_aware", "precision_at_k", "precision_at_k_tie_aware",
            "recall_at_k", "ndcg_at_k")

SELECTION = {"final": "the last evaluation (the model a run ends with)",
             "best": "the evaluation of the highest avg_map on the test queries: selected on the test set, the "
                     "protocol of the published code and the papers' tables",
             "selected": "the evaluation of the highest validation score (eval.validation held-out training rows; "
                         "eval.select: 'pairs', the mean reciprocal rank of each row's own other modality, or "
                         "'labels', their mAP by noisy labels, half against half); the test set plays no part"}


def protocol(query_count: int, database_count: int, topk: list[int] = (), *, query_split: str = "query",
             database_split: str = "database", labels: str = "clean") -> dict:
    """The protocol card (docs/evaluation.md): what every number of an evaluation means, written
    beside the numbers in summary.json and in ``python -m scbch_dist.evaluate``'s JSON."""
    return {
        "directions": "i2t: image query codes against text database codes; t2i: text against image",
        "queries": f"{query_count} rows of the {query_split} split",
        "database": f"{database_count} rows of the {database_split} split",
        "relevance": f"a database item is relevant when it shares at least one {labels} label with the query; "
                     "queries with no relevant item are left out of every mean",
        "map": "mAP@all: AP over the whole ranked database, ties in Hamming distance broken by database index "
               "(a stable sort), averaged over queries",
        "map_tie_aware": "the same, as the exact expectation over random orders of tied items",
        "at_k": {"k": [int(k) for k in topk],
                 "map_at_k": "AP over the first K, normalised by the relevant items found there",
                 "precision_at_k": "relevant items among the first K / K",
                 "recall_at_k": "relevant items among the first K / all relevant items",
                 "ndcg_at_k": "DCG / ideal DCG over the first K, gain 2^s - 1 for s shared labels, "
                              "discount log2(position + 1), ties by index"},
        "curves": "pr_radius: precision and recall within Hamming radius 0..L; pr_topk: over the first k "
                  "items, 16 cut-offs from 1 to the database size",
        "selection": SELECTION,
    }


def summarize(result: dict) -> dict:
    """The headline numbers of one evaluation (per direction, plus the I2T/T2I averages)."""
    out = {d: {k: result[d][k] for k in HEADLINE if result[d][k] != {}} for d in ("i2t", "t2i")}
    out["avg_map"] = result["avg_map"]
    out["avg_map_tie_aware"] = result["avg_map_tie_aware"]
    return out


def curves(result: dict) -> dict:
    """Precision-recall over Hamming radius and over top-k, per direction."""
    return {d: {"pr_radius": result[d]["pr_radius"], "pr_topk": result[d]["pr_topk"]} for d in ("i2t", "t2i")}


CODE_SPLITS = ("query", "database")  # the splits codes.npz holds
MODALITIES = ("img", "txt")


def _config_without_outputs(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "run"}


@dataclass
class RunCodes:
    """A finished run's final codes (RunFolder.read_codes, unpacked to bool) and what identifies them."""

    run_dir: Path
    bits: int
    codes: dict[str, np.ndarray]  # "query_img", "query_txt", "database_img", "database_txt": (n, L) bool
    labels: dict[str, np.ndarray]  # "query", "database": (n, C) uint8
    model_sha256: str  # fingerprint of the weights that wrote them ("" for codes written before fingerprints)
    precision: str  # the autocast that encoded them: "no", "bf16", "fp16" ("": not recorded, float32)
    config: dict  # the run's resolved config
    sha256: str  # of the codes file

    @classmethod
    def load(cls, run_dir: str | Path) -> RunCodes:
        """The codes of the run in ``run_dir``, checked: their digest, and the config they were
        written with against the folder's config.yaml. CodesError where they cannot be the run's."""
        folder = RunFolder(run_dir)
        path = folder.codes
        if not folder.config.is_file():
            raise CodesError(f"{folder.path}: not a run folder (no {folder.CONFIG})")
        if not path.is_file():
            raise CodesError(f"{path}: missing; a run writes its codes after its last epoch (unless "
                             f"run.save_codes is false): write them with python -m scbch_dist.train --resume "
                             f"{folder.path} --set run.save_codes=true")
        # first: codes are compared with it below (its digest checked, an earlier layout migrated)
        run_config = read_run_config(folder.config)
        arrays = folder.read_codes()
        bits = int(arrays["bits"])
        try:
            codes = {f"{s}_{m}": np.unpackbits(arrays[f"{s}_{m}"], axis=1, count=bits).astype(bool)
                     for s in CODE_SPLITS for m in MODALITIES}
            labels = {s: np.asarray(arrays[f"{s}_lab"]) for s in CODE_SPLITS}
            stored = json.loads(str(arrays["config"])) if "config" in arrays else None
        except (ValueError, KeyError) as e:
            raise CodesError(f"{path}: not a codes file of this version ({type(e).__name__}: {e})") from None
        model_sha256 = str(arrays["model_sha256"]) if "model_sha256" in arrays else ""
        # codes written before the precision was recorded: the config's, where it named an autocast
        configured = (stored or {}).get("train", {}).get("mixed_precision")
        precision = str(arrays["precision"]) if "precision" in arrays else \
            configured if configured in AUTOCAST_DTYPES else ""
        if stored is not None:
            changed = changed_keys(_config_without_outputs(migrate(stored)), _config_without_outputs(run_config), ())
            if changed:
                raise CodesError(f"{path}: written by another run or an unfinished resume ({folder.CONFIG} differs: "
                                 f"{'; '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})")
        return cls(folder.path, bits, codes, labels, model_sha256, precision, run_config, sha256_file(path))
