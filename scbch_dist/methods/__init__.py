"""Training methods on one engine (docs/methods.md). ``method.name`` selects one from ``METHODS``;
``register`` adds another (a new module, or a variant in a test) without touching the engine."""

from __future__ import annotations

from scbch_dist.methods.base import Bank, EpochContext, Method, Step, TrainingSet, global_columns
from scbch_dist.methods.nacd import NACD
from scbch_dist.methods.rshnl import RSHNL
from scbch_dist.methods.scbch import SCBCH

METHODS: dict[str, type[Method]] = {m.name: m for m in (SCBCH, NACD, RSHNL)}

__all__ = ["Bank", "EpochContext", "METHODS", "Method", "NACD", "RSHNL", "SCBCH", "Step", "TrainingSet", "get_method", "global_columns",
           "register"]


def register(method: type[Method]) -> type[Method]:
    """Make ``method`` selectable as ``method.name: <its name>`` (usable as a class decorator)."""
    if not method.name:
        raise ValueError(f"{method.__name__} has no name")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise KeyError(f"method.name must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]
