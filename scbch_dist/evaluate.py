"""Encode query and database splits, compute the ranking metrics, write codes and plots.

Each rank encodes a disjoint part of a split (the exactly-once pass); rows are gathered with
their ids and written into tables by id, so the order in which parts arrive never matters.
Metrics are computed once, from the complete tables.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from scbch_dist import dist, metrics
from scbch_dist.data.format import DatasetMeta
from scbch_dist.data.pipeline import pass_batches, to_torch
from scbch_dist.io import atomic_save_with
from scbch_dist.models import binary_codes


@torch.no_grad()
def encode_split(model: torch.nn.Module, root: Path, meta: DatasetMeta, split: str, *, batch_size: int,
                 device: torch.device, workers: int = 0, autocast=None) -> dict[str, torch.Tensor]:
    """Continuous codes of every sample of ``split``, ordered by id, on ``device``.

    Returns ``{"h_img": (n, L) float32, "h_txt": (n, L) float32, "lab": (n, C) uint8}``, the same
    complete tables on every rank.
    """
    was_training = model.training
    model.eval()
    net = model.module if hasattr(model, "module") else model
    ids, h_img, h_txt, labs = [], [], [], []
    for batch in pass_batches(root, meta, split, batch_size=batch_size, rank=dist.rank(),
                              world=dist.world_size(), workers=workers):
        b = to_torch(batch, device)
        with (autocast or contextlib.nullcontext)():
            ids.append(b["id"])
            h_img.append(net.encode("img", b["img"]).float())
            h_txt.append(net.encode("txt", b["txt"]).float())
            labs.append(b["lab"])
    model.train(was_training)
    bits = net.img_classifier.shape[0]
    parts = {
        "id": torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64, device=device),
        "h_img": torch.cat(h_img) if h_img else torch.zeros(0, bits, device=device),
        "h_txt": torch.cat(h_txt) if h_txt else torch.zeros(0, bits, device=device),
        "lab": torch.cat(labs) if labs else torch.zeros(0, meta.num_classes, dtype=torch.uint8, device=device),
    }
    counts = dist.all_counts(parts["id"].shape[0], device)
    gathered = {k: dist.gather_rows(v, counts=counts)[0] for k, v in parts.items()}
    n = meta.splits[split].count
    order = torch.full((n,), -1, dtype=torch.int64, device=device)
    order[gathered["id"]] = torch.arange(gathered["id"].shape[0], device=device)
    if (order < 0).any():
        raise RuntimeError(f"split {split!r}: the encoding pass missed id {int((order < 0).nonzero()[0])}")
    return {k: gathered[k][order] for k in ("h_img", "h_txt", "lab")}


def evaluate(model: torch.nn.Module, root: Path, meta: DatasetMeta, *, batch_size: int, device: torch.device,
             topk: list[int] = (), workers: int = 0, autocast=None) -> tuple[dict, dict]:
    """I2T (image queries against the text database) and T2I, relevance by clean labels.

    Returns ``(result, codes)``: result has ``i2t`` and ``t2i`` (each as metrics.retrieval_metrics
    returns), ``avg_map`` and ``avg_map_tie_aware``; codes holds the bool codes and labels.
    """
    enc = {s: encode_split(model, root, meta, s, batch_size=batch_size, device=device, workers=workers,
                           autocast=autocast) for s in ("query", "database")}
    codes = {f"{s}_{m}": binary_codes(enc[s][f"h_{m}"]).cpu().numpy() for s in enc for m in ("img", "txt")}
    codes["query_lab"] = enc["query"]["lab"].cpu().numpy()
    codes["database_lab"] = enc["database"]["lab"].cpu().numpy()
    result: dict = {}
    if dist.is_main():
        result["i2t"] = metrics.retrieval_metrics(codes["query_img"], codes["database_txt"], codes["query_lab"],
                                                  codes["database_lab"], topk=topk)
        result["t2i"] = metrics.retrieval_metrics(codes["query_txt"], codes["database_img"], codes["query_lab"],
                                                  codes["database_lab"], topk=topk)
        result["avg_map"] = (result["i2t"]["map"] + result["t2i"]["map"]) / 2
        result["avg_map_tie_aware"] = (result["i2t"]["map_tie_aware"] + result["t2i"]["map_tie_aware"]) / 2
    return result, codes


def save_codes(codes: dict, path: Path) -> None:
    """Packed codes (np.packbits along bits, big-endian bit order) and labels, by id."""
    arrays = {k: (np.packbits(v, axis=1) if k.endswith(("img", "txt")) else v) for k, v in codes.items()}
    arrays["bits"] = np.array(codes["query_img"].shape[1])

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
