"""Checkpoints through Accelerate, written after every epoch (docs/engine.md, "Checkpoints").

    run_dir/checkpoints/
      latest                 the name of the newest complete checkpoint, written last
      epoch-0012/
        model.safetensors    the unwrapped model (accelerator.save_state; under DeepSpeed its own
                             pytorch_model/ folder, optimizer partitions included)
        optimizer.bin        the optimizer state
        random_states_R.pkl  each rank's RNG state (Accelerate's; training reseeds per epoch anyway)
        tables.safetensors   the per-id tables: the method's, and the memory bank's
        run_state.json       the run state, the config, the format version

Nothing is unpickled as code: model and tables are safetensors, the run state JSON, and every
pickle Accelerate wrote is first opened with ``weights_only=True`` (plain tensors and containers
only), so a crafted file is refused by name before anything loads it. The exception is DeepSpeed,
which reads its own pytorch_model/ files itself. A checkpoint counts once ``latest`` names it, and
its files are on disk (fsynced) before that, so a crash mid-write leaves the previous one in force.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch

from scbch_dist.engine.state import RunState
from scbch_dist.io import atomic_save_with, atomic_write_json, atomic_write_text, fsync_tree
from scbch_dist.runlog import json_safe

FORMAT = 2  # 1: the single pickled checkpoints/last.pt of scbch_dist 0.1
MODEL_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    pass


def portable_model_files(accelerator) -> None:
    """Make save_state / load_state keep the *unwrapped* model's keys (no DDP ``module.`` prefix),
    so a checkpoint resumes under any number of processes and loads into a bare model."""
    from safetensors.torch import load_model

    def save_hook(models, weights, output_dir):
        for i in range(len(weights)):  # empty under DeepSpeed, which writes its own files
            weights[i] = accelerator.unwrap_model(models[i]).state_dict()

    def load_hook(models, input_dir):
        for model in models:  # one model (empty under DeepSpeed, which loads its own files)
            load_model(accelerator.unwrap_model(model), str(Path(input_dir) / MODEL_FILE))
        models.clear()  # taken out of Accelerate's list: loaded here

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, run_dir: Path, state: RunState, tables: dict[str, torch.Tensor], config: dict) -> Path:
    """Collective: every rank calls it (DeepSpeed writes each rank's optimizer partition)."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    target = root / f"epoch-{state.epoch:04d}"
    if accelerator.is_main_process:
        if target.exists():  # the unfinished write of a run killed before it named this checkpoint
            shutil.rmtree(target)
        target.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        atomic_save_with(target / "tables.safetensors",
                         lambda tmp: save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp)))
        atomic_write_json(target / "run_state.json",
                          json_safe({"format": FORMAT, "state": state.to_dict(), "config": config}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(target)  # every rank's files on disk before latest names the folder
        atomic_write_text(root / "latest", target.name + "\n")
        for old in root.glob("epoch-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
    return target


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume (sweeps and SLURM requeues resume then)."""
    return (Path(run_dir) / "checkpoints" / "latest").is_file()


def latest_checkpoint(run_dir: Path) -> Path:
    """The folder ``checkpoints/latest`` names; a clear error for every way it can be missing."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        if (root / "last.pt").is_file():
            raise CheckpointError(f"{root / 'last.pt'}: a checkpoint of the earlier format (one pickled file), which "
                                  "this version does not load; start a new run (or resume it with scbch_dist 0.1)")
        raise CheckpointError(f"{run_dir}: no checkpoint ({pointer} is missing)")
    folder = root / pointer.read_text().strip()
    if folder.parent != root or not (folder / "run_state.json").is_file():
        raise CheckpointError(f"{pointer} names {folder.name!r}, which is not a complete checkpoint folder")
    return folder


def refuse_code_pickles(folder: Path) -> None:
    """Open every pickle of ``folder`` with weights_only=True (tensors, numbers, strings, containers
    and numpy RNG state only); any other object is refused, naming the file, before it can run."""
    from accelerate.utils import load

    for path in sorted(folder.iterdir()):
        if path.suffix not in (".bin", ".pkl", ".pt"):
            continue
        try:
            load(path, map_location="cpu", mmap=True)
        except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: not a plain tensor file, refused without loading it ({first})") from None


def load_checkpoint(accelerator, run_dir: Path) -> tuple[RunState, dict[str, torch.Tensor], dict]:
    """Restore model, optimizer and RNG (after accelerator.prepare); returns the run state, the
    tables and the config the checkpoint was written with."""
    from safetensors.torch import load_file

    folder = latest_checkpoint(run_dir)
    record = json.loads((folder / "run_state.json").read_text())
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{folder / 'run_state.json'}: checkpoint format {record.get('format')!r}, "
                              f"this version reads format {FORMAT}")
    # DeepSpeed reads its own pytorch_model/ files (optimizer partitions) itself
    refuse_code_pickles(folder)
    accelerator.load_state(str(folder))
    tables = load_file(str(folder / "tables.safetensors"))
    return RunState.from_dict(record["state"]), tables, record["config"]
