"""Run output on the main process: console and ``log.txt`` lines, the JSON-lines metrics log, and
TensorBoard through Accelerate's tracker when tensorboard is installed."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

LOGGER_NAME = "scbch_dist"


def setup_logging(run_dir: Path | None, is_main: bool) -> logging.Logger:
    log = logging.getLogger(LOGGER_NAME)
    log.handlers.clear()
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s | %(levelname)s | %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    log.addHandler(console)
    if run_dir is not None and is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "log.txt")
        file.setFormatter(fmt)
        log.addHandler(file)
    return log


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def json_safe(obj: Any) -> Any:
    """JSON-safe: NaN/inf become null, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and mirrors scalars to trackers."""

    def __init__(self, path: Path, accelerator=None, enabled: bool = True):
        self.path, self.accelerator, self.enabled = path, accelerator, enabled

    def write(self, record: dict, step: int | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            scalars = {k: v for k, v in _flatten(record).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            self.accelerator.log(scalars, step=step)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        elif not isinstance(v, list):
            out[key] = v
    return out
