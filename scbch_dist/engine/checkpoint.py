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
        manifest.json        every file above with its size and sha256, written last
      epoch-0012-step-000040/  a checkpoint taken inside epoch 13 (preemption), as above plus
        rank-R.safetensors   each rank's part of the unfinished epoch: its loss sums and the
                             table rows it wrote since the last exchange

Nothing is unpickled as code: model and tables are safetensors, the run state JSON, and every
pickle Accelerate wrote is first opened with ``weights_only=True`` (plain tensors and containers
only), so a crafted file is refused by name before anything loads it. The exception is DeepSpeed,
which reads its own pytorch_model/ files itself. A checkpoint counts once ``latest`` names it, and
its files are on disk (fsynced) before that, so a crash mid-write leaves the previous one in force.
The newest ``run.keep_checkpoints`` complete checkpoints are kept. Every file is checked against
the manifest before a resume reads it: a corrupted checkpoint is refused by name, and a resume
falls back to an earlier one only when asked (``--from-checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import torch

from scbch_dist import dist
from scbch_dist.digests import (MANIFEST, IntegrityError, missing_digest, sealed_run, verify_listed, verify_manifest,
                                write_manifest)
from scbch_dist.engine.state import RunState
from scbch_dist.errors import ScbchError, first_line
from scbch_dist.atomic import atomic_save_with, atomic_write_json, atomic_write_text, fsync_tree, honour_umask_tree
from scbch_dist.engine.runlog import json_safe

FORMAT = 2  # 1: the single pickled checkpoints/last.pt of scbch_dist 0.1
MODEL_FILE = "model.safetensors"
NAME = re.compile(r"epoch-\d{4,}(-step-\d{6,})?")  # checkpoint folders; their names sort in training order


class CheckpointError(ScbchError, RuntimeError):
    pass


def portable_model_files(accelerator) -> None:
    """Make save_state / load_state keep the *unwrapped* model's keys (no DDP ``module.`` prefix),
    so a checkpoint resumes under any number of processes and loads into a bare model."""
    from safetensors.torch import load_model

    def save_hook(models, weights, output_dir):
        for i in range(len(weights)):  # empty under DeepSpeed, which writes its own files
            weights[i] = accelerator.unwrap_model(models[i]).state_dict()

    def load_hook(models, input_dir):
        path = Path(input_dir) / MODEL_FILE
        for model in models:  # one model (empty under DeepSpeed, which loads its own files)
            _reading(path, lambda: load_model(accelerator.unwrap_model(model), str(path)))
        models.clear()  # taken out of Accelerate's list: loaded here

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def model_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of a model's weights: every tensor's name, dtype, shape and bytes, in name order.
    Independent of the file format, so the codes of a run name the model that made them."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def checkpoint_name(state: RunState) -> str:
    """epoch-0012 after 12 epochs; epoch-0012-step-000040 after 40 steps of the 13th."""
    name = f"epoch-{state.epoch:04d}"
    return name if state.partial is None else f"{name}-step-{state.partial['step']:06d}"


def save_checkpoint(accelerator, run_dir: Path, state: RunState, tables: dict[str, torch.Tensor], config: dict,
                    rank_state: dict[str, torch.Tensor] | None = None, keep: int = 1) -> Path:
    """Collective: every rank calls it (DeepSpeed writes each rank's optimizer partition).
    ``rank_state``: this rank's part of an unfinished epoch (with ``state.partial``); ``keep``: how
    many complete checkpoints stay (the newest). A write that fails (disk full, read-only folder)
    is a CheckpointError on every rank, and the previous checkpoint stays in force."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    target = root / checkpoint_name(state)
    is_main = accelerator.is_main_process

    def attempt(write) -> None:
        """``write()``, its failure raised on every rank (no rank left waiting in a collective)."""
        error = None
        try:
            write()
        except Exception as e:  # noqa: BLE001 - disk full, permissions, safetensors' own errors: all named below
            if not _is_io_error(e):
                raise
            error = CheckpointError(f"{target}: writing the checkpoint failed ({_reason(e, root)}); "
                                    f"{_in_force(root)}; free the space or fix the folder, then resume with "
                                    f"--resume {run_dir}")
        dist.raise_together(error, f"{target}: writing the checkpoint failed on another process (its message is above)")

    def prepare() -> None:
        if is_main:
            if target.exists():  # the unfinished write of a run killed before it named this checkpoint
                shutil.rmtree(target)
            target.mkdir(parents=True)

    def write_files() -> None:
        accelerator.save_state(str(target))
        if rank_state is not None:
            atomic_save_with(target / f"rank-{accelerator.process_index}.safetensors",
                             lambda tmp: save_file({k: v.contiguous() for k, v in rank_state.items()}, str(tmp)))
        if is_main:
            atomic_save_with(target / "tables.safetensors",
                             lambda tmp: save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp)))
            atomic_write_json(target / "run_state.json",
                              json_safe({"format": FORMAT, "state": state.to_dict(), "config": config}))

    def publish() -> None:
        if is_main:
            honour_umask_tree(target)  # safetensors writes its files 0600
            write_manifest(target)  # every rank's files are written: the digests a resume checks
            fsync_tree(target)  # every file on disk before latest names the folder
            atomic_write_text(root / "latest", target.name + "\n")
            for old in complete_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    attempt(prepare)
    accelerator.wait_for_everyone()
    attempt(write_files)
    accelerator.wait_for_everyone()
    attempt(publish)
    return target


# torch.save's zip writer (optimizer.bin, random states) reports a failed write, a full disk above
# all, as a RuntimeError of its C++ check, without the system's reason: "[enforce fail at
# inline_container.cc:672] . unexpected pos 576 vs 534"
TORCH_WRITER_FAILURE = "[enforce fail at inline_container.cc"


def _is_io_error(e: BaseException) -> bool:
    """An OSError, or safetensors' error for one (it reports "os error 28" as a SafetensorError), or
    torch.save's writer failing (TORCH_WRITER_FAILURE)."""
    return (isinstance(e, OSError) or type(e).__name__ == "SafetensorError"
            or isinstance(e, RuntimeError) and str(e).startswith(TORCH_WRITER_FAILURE))


def _reason(e: BaseException, folder: Path | None = None) -> str:
    """One line for a write's or a read's failure; ``folder``: where a write failed."""
    from scbch_dist.cli import file_system_error

    if isinstance(e, OSError):
        return file_system_error(e)
    if folder is not None and isinstance(e, RuntimeError):  # torch.save names neither file nor reason: the space left says most
        try:
            free = f"{shutil.disk_usage(folder).free:,} bytes free there"
        except OSError:
            free = "the space left unknown"
        return f"torch.save could not write its archive: {first_line(e)}; {free}"
    return first_line(e)


def _in_force(root: Path) -> str:
    try:
        return f"{root / 'latest'} still names {latest_name(root)}"
    except (OSError, CheckpointError):
        return "no earlier checkpoint"


def latest_name(root: Path) -> str:
    """The checkpoint name ``root/latest`` holds; one that is no checkpoint name (a damaged file)
    is a CheckpointError naming it."""
    pointer = root / "latest"
    name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
    if not NAME.fullmatch(name):
        raise CheckpointError(f"{pointer}: holds {name[:40]!r}, not the name of a checkpoint (damaged); resume with "
                              f"--resume {root.parent} --from-checkpoint NAME, one of: {_kept(root)}")
    return name


def _kept(root: Path) -> str:
    """The checkpoint folders with a run state, by name: what --from-checkpoint can take."""
    return ", ".join(sorted(p.name for p in root.glob("epoch-*") if (p / "run_state.json").is_file())) or "none"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint folders up to the one ``latest`` names, in training order (oldest first).
    Folders after it are unfinished writes (a run killed before it named them)."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return []
    latest = latest_name(root)
    return sorted(p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name) and p.name <= latest
                  and (p / "run_state.json").is_file())


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume (sweeps and SLURM requeues resume then)."""
    return (Path(run_dir) / "checkpoints" / "latest").is_file()


def latest_checkpoint(run_dir: Path, name: str | None = None) -> Path:
    """The folder ``checkpoints/latest`` names (or the complete checkpoint ``name``); a clear error
    for every way it can be missing."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        if (root / "last.pt").is_file():
            raise CheckpointError(f"{root / 'last.pt'}: a checkpoint of the earlier format (one pickled file), which "
                                  "this version does not load; start a new run (or resume it with scbch_dist 0.1)")
        raise CheckpointError(f"{run_dir}: no checkpoint ({pointer} is missing)")
    if name is not None:  # (latest itself may be the damaged file)
        if not (NAME.fullmatch(name) and (root / name / "run_state.json").is_file()):
            raise CheckpointError(f"--from-checkpoint {name}: not a complete checkpoint of {run_dir}; it holds "
                                  f"{_kept(root)}")
        return root / name
    folder = root / latest_name(root)
    if not (folder / "run_state.json").is_file():
        raise CheckpointError(f"{pointer} names {folder.name!r}, which is not a complete checkpoint folder")
    return folder


def verify_checkpoint(folder: Path) -> bool:
    """Every file of a checkpoint against its manifest (False: written before manifests, not
    checked). A file that differs is refused by name, with the earlier checkpoints to fall back to;
    so is a checkpoint without its manifest in a run folder written with digests."""
    try:
        if not verify_manifest(folder):
            if sealed_run(folder.parent.parent):
                raise missing_digest(folder / MANIFEST, "manifest.json file")
            return False
        return True
    except IntegrityError as e:
        run_dir = folder.parent.parent
        earlier = [p.name for p in complete_checkpoints(run_dir) if p.name < folder.name]
        hint = (f"; resume from an earlier one with --resume {run_dir} --from-checkpoint {earlier[-1]}" if earlier
                else "; no earlier checkpoint is kept (run.keep_checkpoints)")
        raise CheckpointError(f"{e}{hint}") from None


def verify_model_file(folder: Path) -> None:
    """The checkpoint's model file against its manifest (readers that load only the model)."""
    try:
        if not verify_listed(folder, MODEL_FILE) and sealed_run(folder.parent.parent):
            raise missing_digest(folder / MANIFEST, "manifest.json file")
    except IntegrityError as e:
        raise CheckpointError(str(e)) from None


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
            raise CheckpointError(f"{path}: not a plain tensor file, refused without loading it "
                                  f"({first_line(e)})") from None


def read_run_state(run_dir: Path, name: str | None = None) -> tuple[Path, RunState, dict]:
    """The latest (or the named) checkpoint's folder, run state and config, without loading any tensor."""
    folder = latest_checkpoint(run_dir, name)
    path = folder / "run_state.json"
    try:
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {record.get('format')!r}, this version reads format {FORMAT}")
        return folder, RunState.from_dict(record["state"]), record["config"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable run state ({type(e).__name__}: {e})") from None


def load_checkpoint(accelerator, run_dir: Path) -> tuple[RunState, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Restore model, optimizer and RNG (after accelerator.prepare); returns the run state, the
    tables and, for a checkpoint taken inside an epoch, this rank's part of that epoch. The files
    are checked against the manifest before (rundir.lock_and_prepare); a file that still cannot be read is
    a CheckpointError naming it."""
    from safetensors.torch import load_file

    folder, state, _ = read_run_state(run_dir)
    if state.partial is not None and state.partial["world"] != accelerator.num_processes:
        raise CheckpointError(f"{folder}: written inside epoch {state.partial['epoch'] + 1} by {state.partial['world']} "
                              f"process(es); resume it with {state.partial['world']} (the data order of an epoch "
                              "depends on the number of processes; checkpoints at an epoch's end resume under any)")
    # DeepSpeed reads its own pytorch_model/ files (optimizer partitions) itself
    refuse_code_pickles(folder)
    _reading(folder, lambda: accelerator.load_state(str(folder)))
    tables = _reading(folder / "tables.safetensors", lambda: load_file(str(folder / "tables.safetensors")))
    rank_state = None
    if state.partial is not None:
        path = folder / f"rank-{accelerator.process_index}.safetensors"
        rank_state = _reading(path, lambda: load_file(str(path)))
    return state, tables, rank_state


def _reading(path: Path, read):
    """``read()``, a file that cannot be read (truncated, not the format) as a CheckpointError naming ``path``."""
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors, torch and Accelerate each raise their own kinds
        if not (_is_io_error(e) or isinstance(e, (RuntimeError, ValueError, KeyError, EOFError,
                                                     pickle.UnpicklingError))):
            raise
        raise CheckpointError(f"{path}: cannot be read back ({type(e).__name__}: {_reason(e)}); the checkpoint is "
                              "damaged") from None
