"""Encoding passes: every id of a split exactly once over all ranks, rows gathered by id."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable, ContextManager

import torch

from scbch_dist import dist
from scbch_dist.data.format import DatasetMeta
from scbch_dist.data.pipeline import pass_batches, to_torch


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_of(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The autocast a run's forward passes ran under, from the precision it recorded with its codes
    (Accelerate's "no", "bf16" or "fp16"; "" in codes written before it was recorded: float32), for
    passes outside the run that must encode as it did (evaluate --encode, the search's queries).
    Accelerate's autocast is torch.autocast of that dtype on the device's type."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return contextlib.nullcontext if dtype is None else functools.partial(torch.autocast, device.type, dtype=dtype)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP (or similar) wrapper."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def encode_part(model: torch.nn.Module, root: Path, meta: DatasetMeta, split: str, *, batch_size: int,
                device: torch.device, workers: int = 0, autocast=None, transform=None,
                only=None) -> dict[str, torch.Tensor]:
    """This rank's part of an exactly-once pass over ``split``: ids and continuous codes, the model
    in eval mode. ``transform``: the deterministic loader transform of raw datasets (data.transforms);
    ``only``: a (count,) bool numpy mask of the ids to encode (default: all).

    Returns ``{"id": (n,), "h_img": (n, L) float32, "h_txt": (n, L) float32, "lab": (n, C) uint8}``.
    """
    was_training = model.training
    model.eval()
    net = unwrap(model)
    parts: dict[str, list] = {"id": [], "h_img": [], "h_txt": [], "lab": []}
    for batch in pass_batches(root, meta, split, batch_size=batch_size, rank=dist.rank(),
                              world=dist.world_size(), workers=workers, transform=transform, only=only):
        b = to_torch(batch, device)
        with (autocast or contextlib.nullcontext)():
            parts["h_img"].append(net.encode("img", b["img"]).float())
            parts["h_txt"].append(net.encode("txt", b["txt"], b.get("txt_mask")).float())
        parts["id"].append(b["id"])
        parts["lab"].append(b["lab"])
    model.train(was_training)
    empty = {"id": torch.zeros(0, dtype=torch.int64, device=device), "h_img": torch.zeros(0, net.bits, device=device),
             "h_txt": torch.zeros(0, net.bits, device=device),
             "lab": torch.zeros(0, meta.num_classes, dtype=torch.uint8, device=device)}
    return {k: torch.cat(v) if v else empty[k] for k, v in parts.items()}


def encode_split(model: torch.nn.Module, root: Path, meta: DatasetMeta, split: str, **kw) -> dict[str, torch.Tensor]:
    """Continuous codes of every sample of ``split``, ordered by id, the same on every rank."""
    return dist.gather_by_id(encode_part(model, root, meta, split, **kw), meta.splits[split].count)
