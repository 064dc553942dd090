"""Evaluation (docs/evaluation.md): encode query and database, compute the ranking metrics, write
the codes.

Each rank encodes a disjoint part of a split (the exactly-once pass); rows are gathered with
their ids and written into tables by id, so the order in which parts arrive never matters.
Metrics are computed once, from the complete tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from scbch_dist import dist, metrics
from scbch_dist.data.format import DatasetMeta
from scbch_dist.digests import arrays_sha256
from scbch_dist.engine.encode import encode_part
from scbch_dist.atomic import atomic_save_with
from scbch_dist.models import binary_codes


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n, L) bool -> (n, ceil(L/8)) uint8, most significant bit first (np.packbits' order)."""
    n, length = bits.shape
    padded = torch.zeros(n, -(-length // 8) * 8, dtype=torch.uint8, device=bits.device)
    padded[:, :length] = bits
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=bits.device)
    return (padded.view(n, padded.shape[1] // 8, 8) * weights).sum(2, dtype=torch.uint8)


def evaluate(model: torch.nn.Module, root: Path, meta: DatasetMeta, *, batch_size: int, device: torch.device,
             topk: list[int] = (), workers: int = 0, autocast=None, transform=None) -> tuple[dict, dict]:
    """I2T (image queries against the text database) and T2I, relevance by clean labels.

    Each rank encodes its part of query and database; the codes travel as packed bits (L/8 bytes
    a code) and the metrics are computed once, on the main process. Returns ``(result, codes)``:
    result has ``i2t`` and ``t2i`` (as metrics.retrieval_metrics returns), ``avg_map`` and
    ``avg_map_tie_aware`` (empty on other ranks); codes holds bool codes and labels by id.
    """
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
    result: dict = {}
    if dist.is_main():
        result["i2t"] = metrics.retrieval_metrics(codes["query_img"], codes["database_txt"], codes["query_lab"],
                                                  codes["database_lab"], topk=topk)
        result["t2i"] = metrics.retrieval_metrics(codes["query_txt"], codes["database_img"], codes["query_lab"],
                                                  codes["database_lab"], topk=topk)
        result["avg_map"] = (result["i2t"]["map"] + result["t2i"]["map"]) / 2
        result["avg_map_tie_aware"] = (result["i2t"]["map_tie_aware"] + result["t2i"]["map_tie_aware"]) / 2
    return result, codes


CODES_DIGEST = "sha256"  # the member of codes.npz that holds the digest of the others


def save_codes(codes: dict, path: Path, *, model_sha256: str = "", config: dict | None = None) -> None:
    """Packed codes (np.packbits along bits, big-endian bit order) and labels, by id; with the
    fingerprint of the model that made them and the run's config (JSON), which the Hamming index
    checks them against (docs/search.md), and the sha256 of all of it (digests.arrays_sha256),
    which every reader checks."""
    arrays = {k: (np.packbits(v, axis=1) if k.endswith(("img", "txt")) else v) for k, v in codes.items()}
    arrays["bits"] = np.array(codes["query_img"].shape[1])
    arrays["model_sha256"] = np.array(model_sha256)
    arrays["config"] = np.array(json.dumps(config or {}, sort_keys=True))
    arrays[CODES_DIGEST] = np.array(arrays_sha256(arrays))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_save_with(path, write)


HEADLINE = ("map", "map_tie_aware", "map_at_k", "map_at_k_tie_aware", "precision_at_k", "precision_at_k_tie_aware")


def summarize(result: dict) -> dict:
    """The headline numbers of one evaluation (per direction, plus the I2T/T2I averages)."""
    out = {d: {k: result[d][k] for k in HEADLINE if result[d][k] != {}} for d in ("i2t", "t2i")}
    out["avg_map"] = result["avg_map"]
    out["avg_map_tie_aware"] = result["avg_map_tie_aware"]
    return out


def curves(result: dict) -> dict:
    """Precision-recall over Hamming radius and over top-k, per direction."""
    return {d: {"pr_radius": result[d]["pr_radius"], "pr_topk": result[d]["pr_topk"]} for d in ("i2t", "t2i")}
