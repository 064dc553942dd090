"""The run state: what a run has done so far, typed, saved as JSON beside every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    history: list[dict] = field(default_factory=list)  # evaluations: {"epoch", "i2t", "t2i", "avg_map", ..., "curves"}
    diagnostics: list[dict] = field(default_factory=list)  # the method's epoch records: {"epoch", ...}
    chance_map: float | None = None  # mAP of a random ranking of the evaluation labels
    samples: int = 0  # training samples seen, all ranks
    train_seconds: float = 0.0
    hook_seconds: float = 0.0  # the method's epoch hooks (refreshes)
    eval_seconds: float = 0.0
    # a checkpoint taken inside an epoch (preemption): {"epoch" (0-based), "step" (steps done),
    # "record" (the epoch_start hook's entries), "seconds", "world"}; None at an epoch's end
    partial: dict | None = None
    log_bytes: int | None = None  # the size of log.txt when the checkpoint was written
    dataset: dict | None = None  # the dataset's fingerprint when the run began (data.fingerprint); None before 0.2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"run state has unknown fields {unknown}")
        return cls(**d)
