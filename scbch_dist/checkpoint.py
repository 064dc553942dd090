"""Checkpoints: one file per run, ``checkpoints/last.pt``, written atomically after every epoch.

It holds the model and optimizer states, the run state (completed epochs, evaluation history,
the CSCC weight table, the code memory, timings) and the resolved config; no RNG state, because the
data order, augmentation and dropout are functions of (seed, epoch, rank), so a run resumed at an
epoch boundary continues exactly as an uninterrupted run would. Under DeepSpeed ZeRO the optimizer state is partitioned over the ranks and
is not kept (``optimizer=None``): a resumed run restarts Adam's moments, and says so.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from scbch_dist.config import Config
from scbch_dist.io import atomic_save_with


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict,
                    cfg: Config, *, is_main: bool = True) -> None:
    if not is_main:
        return
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "state": state,
        "config": dataclasses.asdict(cfg),
    }
    atomic_save_with(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> dict:
    """Load into ``model`` and ``optimizer`` (before accelerator.prepare); return the run state.
    The optimizer state is skipped when ``optimizer`` is None or the checkpoint holds none."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return {**state, **payload["state"]}
