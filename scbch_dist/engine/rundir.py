"""What the engine does with a run folder (docs/engine.md, "The run folder"); where each file
lives is run.RunFolder's. The folder belongs to one run: RunLock holds it (pid, host, SLURM job,
start time; removed at exit).

A fresh run refuses a folder that holds another run unless told to overwrite it; a resumed run
may change only the keys that cannot change what is trained (SAFE_ON_RESUME), and its outputs
are cut back to its checkpoint, so that no record of an epoch appears twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator

from scbch_dist.config import flatten, migrate, read_run_config, save_config, to_dict
from scbch_dist.data.fingerprint import check_same_data, file_fingerprint
from scbch_dist.data.remote import configured_root
from scbch_dist.engine.checkpoint import (complete_checkpoints, has_checkpoint, latest_checkpoint, read_run_state,
                                          verify_checkpoint)
from scbch_dist.run import RunFolder
from scbch_dist.errors import RunDirError, ScbchError
from scbch_dist.atomic import atomic_write_bytes, atomic_write_text, remove_leftovers

# keys a resume may change: evaluation and output settings, the length of the run, the preflight
SAFE_ON_RESUME = ("train.epochs", "eval.every", "eval.topk", "run.dir", "run.method", "run.progress",
                  "run.tensorboard", "run.checkpoint", "run.keep_checkpoints", "run.save_codes", "data.verify",
                  "data.retries", "data.timeout", "data.cache", "data.cache_gb")


def safe_keys(method_class) -> tuple[str, ...]:
    """SAFE_ON_RESUME less the keys that shape the method's training (Method.schedule_keys). The
    method's own section (``scbch.*``) is never safe: it is what the method trains with."""
    return tuple(k for k in SAFE_ON_RESUME if k not in method_class.schedule_keys)


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a live pid from a reused one)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _slurm_job() -> str | None:
    """This SLURM job (or array task) and how often it was requeued: 'JOB[_TASK]#RESTARTS'."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    task = f"_{os.environ['SLURM_ARRAY_TASK_ID']}" if os.environ.get("SLURM_ARRAY_TASK_ID") else ""
    return f"{job}{task}#{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def _holder_gone(holder: dict) -> bool:
    """Whether the process named in a lock no longer runs: on this host, its pid is dead (or
    reused); on another host, it was an earlier incarnation of this SLURM job (a requeue: the same
    job with a higher restart count). A live process of the same incarnation keeps its lock."""
    if holder.get("host") != socket.gethostname():
        mine, theirs = _slurm_job(), holder.get("slurm_job")
        return bool(mine and theirs) and mine.split("#")[0] == theirs.split("#")[0] and mine != theirs
    pid = holder["pid"]
    if not isinstance(pid, int):
        return False  # an unreadable lock younger than a minute
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return holder.get("start_ticks") is not None and holder.get("start_ticks") != _start_ticks(pid)


PID_MAX = 1 << 22  # Linux's largest pid_max: a lock naming another number was not written by a run


def _a_pid(value) -> bool:
    """A process id as a lock holds it: an int (not a bool) from 1 to PID_MAX. Anything else
    (-1, whom os.kill takes for every process; 10**30, which it cannot take; true) is an unreadable
    lock, replaced once it is a minute old, never a holder alive for ever or a crash."""
    return type(value) is int and 1 <= value <= PID_MAX


@contextlib.contextmanager
def _folder_mutex(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself while a lock is read, judged and taken, so that two
    processes that both find a stale lock cannot both take it over (read, unlink and create are
    three steps). Where the file system has no flock for folders, the steps run unguarded."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the flock


class RunLock:
    """``run_dir/run.lock``, created exclusively; stale locks (their process is gone) are replaced.
    ``create``: make the folder if it is missing (a training run), or refuse (tools that read a run).
    The folders the lock made are removed again at release if nothing was left in them (a run that
    failed before it recorded anything), so no empty folder outlives a failed command."""

    def __init__(self, run_dir: Path, log: logging.Logger | None = None, *, create: bool = True):
        self.path, self.log, self.create, self.held = RunFolder(run_dir).lock, log, create, False
        self.made: list[Path] = []  # the folders acquire created, innermost first
        # what lock_and_prepare changed for a resume: the checkpoint it resumes and the config.yaml it
        # replaced (restore_config_of_unstarted_resume)
        self.resumed: tuple[str, bytes] | None = None

    def acquire(self) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            if not self.create:
                raise RunDirError(f"{folder}: no such run folder")
            missing = [p for p in [folder, *folder.parents] if not p.exists()]
            try:
                folder.mkdir(parents=True)
                self.made = missing
            except FileExistsError:
                pass
            except OSError as e:
                raise RunDirError(f"{folder}: cannot create the run folder ({e.strerror or e})") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": _slurm_job(),
              "start_ticks": _start_ticks(os.getpid()), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            with _folder_mutex(folder):
                self._take(me)
        except OSError as e:
            self.release()
            raise RunDirError(f"{folder}: cannot write there ({e.strerror or e}); a run needs a writable run.dir") from None

    def _take(self, me: dict) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is None or _holder_gone(holder):
                    if self.log is not None:
                        self.log.warning(f"{self.path}: removing " + ("an unreadable lock older than a minute"
                                         if holder is None else f"the stale lock of {_describe(holder)} (no longer running)"))
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunDirError(f"{self.path.parent} is in use by {_describe(holder)}; wait for that run, or "
                                  f"remove {self.path} if it is gone") from None
            self.held = True
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise RunDirError(f"{self.path}: could not take the lock (another process keeps taking it)")

    def _holder(self) -> dict | None:
        """The lock's holder; None for a lock that is unreadable and older than a minute (a lock
        unreadable now may be being written this instant: it counts as held)."""
        try:
            holder = json.loads(self.path.read_text())
            if isinstance(holder, dict) and _a_pid(holder.get("pid")) and isinstance(holder.get("host"), str):
                return holder
        except (OSError, ValueError):
            pass
        try:
            fresh = time.time() - self.path.stat().st_mtime < 60
        except OSError:
            return None
        return {"pid": "?", "host": "?", "started": "less than a minute ago"} if fresh else None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        for folder in self.made:  # innermost first; one that is not empty holds the run (or other files)
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "an unreadable lock"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def remove_run_outputs(run_dir: Path, log: logging.Logger | None = None) -> None:
    """Remove every output of a run (RunFolder.OUTPUTS, nothing else), its summary first."""
    removed = RunFolder(run_dir).outputs()
    for name in removed:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if removed and log is not None:
        log.warning(f"--overwrite: removed the earlier run's {', '.join(removed)} from {run_dir}")


def discard_unfinished(run_dir: Path) -> None:
    """After a fresh run failed before recording anything (no checkpoint, no metrics): remove what
    it wrote (config.yaml, log.txt, ...), so that the folder takes a new run without --overwrite."""
    if not any((run_dir / name).exists() for name in RunFolder.RESULTS):
        remove_run_outputs(run_dir)


def changed_keys(stored: dict, new: dict, safe: tuple[str, ...]) -> list[str]:
    """``key: old -> new`` for every flattened key whose value differs and is not in ``safe``.
    Keys the stored config lacks are settings added by a later version: they keep their defaults."""
    a, b = flatten(stored), flatten(new)
    return [f"{key}: {a[key]!r} -> {b.get(key, '<unset>')!r}" for key in sorted(a)
            if key not in safe and _normal(key, a[key]) != _normal(key, b.get(key, "<unset>"))]


def _normal(key: str, value):
    """Paths compare as paths ("data/x/" is "data/x")."""
    return os.path.normpath(value) if key == "data.root" and isinstance(value, str) and value else value


def cut_records_back_to(run_dir: Path, epoch: int, log_bytes: int | None) -> list[str]:
    """Cut metrics.jsonl back to the records of epochs <= ``epoch`` and log.txt back to
    ``log_bytes`` (their state when the checkpoint was written); returns what was cut, and the
    records that could not be read (kept: only a last line cut short by a kill is dropped)."""
    notes = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text(errors="replace").splitlines(keepends=True)
        kept = []
        for number, line in enumerate(lines, 1):
            record_epoch = _record_epoch(line)
            if record_epoch is None:
                if number == len(lines):
                    continue  # cut short by a kill
                notes.append(f"metrics.jsonl: line {number} is not a readable record; kept as it is")
                kept.append(line)
            elif record_epoch <= epoch:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(metrics, "".join(kept))
            notes.append(f"metrics.jsonl: {len(lines) - len(kept)} record(s) after epoch {epoch} removed")
    logfile = run_dir / "log.txt"
    if log_bytes is not None and logfile.is_file() and logfile.stat().st_size > log_bytes:
        notes.append(f"log.txt: {logfile.stat().st_size - log_bytes} bytes after the checkpoint removed")
        os.truncate(logfile, log_bytes)
    return notes


def _record_epoch(line: str) -> float | None:
    """The epoch of a metrics record; None for a line that is not one (cut short by a kill, or damaged)."""
    try:
        return float(json.loads(line)["epoch"])
    except (ValueError, TypeError, KeyError):
        return None


def set_summary_aside(run_dir: Path, epoch: int, log: logging.Logger) -> None:
    """A resumed run moves the summary of its earlier end aside (summary-epoch-NNNN.json): the
    result is kept, and until the resumed run ends no launcher takes the folder for finished."""
    kept = RunFolder(run_dir).set_summary_aside(epoch)
    if kept is not None:
        log.info(f"{run_dir}: the summary of epoch {epoch} kept as {kept.name}; {RunFolder.SUMMARY} follows when "
                 "this run ends")


def remove_interrupted_writes(run_dir: Path) -> list[Path]:
    """Remove what a killed run left: unfinished atomic writes and checkpoint folders that are not
    complete checkpoints up to the one checkpoints/latest names. (A STOP file stays: it may have
    been written for this run, which serves it at its first step and removes it.)"""
    removed = remove_leftovers(run_dir)
    root = run_dir / "checkpoints"
    kept = set(complete_checkpoints(run_dir))
    for folder in sorted(root.glob("epoch-*")) if root.is_dir() else []:
        if folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def make_checkpoint_latest(run_dir: Path, name: str, log: logging.Logger) -> None:
    """Make the complete checkpoint ``name`` the latest (--from-checkpoint): latest names it, and the
    checkpoints after it (one of which the user found damaged) are removed, each named in the log."""
    root = run_dir / "checkpoints"
    atomic_write_text(root / "latest", name + "\n")
    for folder in sorted(root.glob("epoch-*")):
        if folder.name > name:
            shutil.rmtree(folder)
            log.warning(f"--from-checkpoint {name}: removed the later checkpoint {folder}")


def lock_and_prepare(run_dir: Path, cfg, *, resume: bool, overwrite: bool, safe: tuple[str, ...],
                     log: logging.Logger, from_checkpoint: str | None = None) -> RunLock:
    """Main process, before anything is written: lock the folder for this run; for a resume, check
    the checkpoint's files against their digests, refuse changed settings and cut the outputs back
    to the checkpoint; for a fresh run, refuse a folder that holds another run unless
    ``overwrite``. Then remove what an interrupted run left and write config.yaml. Returns the held lock (release it
    when the run ends). ``from_checkpoint``: resume from this kept checkpoint instead of the latest."""
    lock = RunLock(run_dir, log)
    lock.acquire()
    try:
        if resume:
            if (run_dir / "config.yaml").is_file():
                lock.resumed = (_pointer(run_dir), (run_dir / "config.yaml").read_bytes())
            folder = latest_checkpoint(run_dir, from_checkpoint)
            if not verify_checkpoint(folder):
                log.warning(f"{folder}: no manifest.json (written by an earlier version): its files are not checked")
            _, state, stored = read_run_state(run_dir, from_checkpoint)
            root = configured_root(cfg.data)
            if (root / "meta.json").is_file():  # (a missing embedded dataset is written again, then checked)
                check_same_data(state.dataset, file_fingerprint(root), root, run_dir)
            changes = changed_keys(migrate(stored), to_dict(cfg), safe)  # (stored in an earlier layout, maybe)
            if changes:
                raise RunDirError(f"--resume {run_dir}: the run was trained with other settings ({'; '.join(changes)}); "
                                  f"a resume may change only {', '.join(safe)}; start a new run in another run.dir")
            begun = state.epoch + (state.partial is not None)
            if cfg.train.epochs < begun:
                raise RunDirError(f"--resume {run_dir}: train.epochs={cfg.train.epochs} is below the {begun} epoch(s) "
                                  f"this run has begun; give train.epochs={begun} or more")
            if from_checkpoint is not None:
                make_checkpoint_latest(run_dir, from_checkpoint, log)
            for note in cut_records_back_to(run_dir, state.epoch, state.log_bytes):
                log.info(f"{run_dir}: {note} (written after the checkpoint)")
        else:
            held = RunFolder(run_dir).outputs()
            if held and not overwrite:
                go_on = (f"continue it with --resume {run_dir}, " if has_checkpoint(run_dir) else
                         "it has no checkpoint to continue from; ")
                raise RunDirError(f"{run_dir} holds another run ({', '.join(held)}); {go_on}give this run another "
                                  "run.dir, or delete that run with --overwrite")
            remove_run_outputs(run_dir, log)
        for path in remove_interrupted_writes(run_dir):
            log.info(f"removed {path} (left by an interrupted run)")
        save_config(cfg, run_dir / "config.yaml")
    except BaseException:
        lock.release()
        raise
    return lock


def restore_config_of_unstarted_resume(run_dir: Path, lock: RunLock) -> None:
    """A resume that ends before its first checkpoint (the preflight refused a shard, a crash, a
    stop) puts back the config.yaml its claim replaced: the folder still holds the run as it was,
    and its codes.npz and index must go on matching its config (a resume with train.epochs=5 refused
    by the preflight left 5 there, and search then refused the finished run's codes)."""
    if lock.resumed is None:
        return
    pointer, config = lock.resumed
    if _pointer(run_dir) == pointer:
        atomic_write_bytes(run_dir / "config.yaml", config)


def _pointer(run_dir: Path) -> str:
    """What checkpoints/latest holds ("" without one)."""
    try:
        return (run_dir / "checkpoints" / "latest").read_text(errors="replace")
    except OSError:
        return ""


def refit_pending(run_dir: str | Path) -> bool:
    """A finished run (summary.json) that asks for a refit (eval.refit) its summary does not hold yet:
    a resume trains (or resumes) only the refit."""
    run_dir = Path(run_dir)
    try:
        settings = read_run_config(run_dir / "config.yaml").get("eval", {})
        wants = settings.get("refit", False) and settings.get("validation", 0) > 0  # (absent: an earlier version's run)
    except (OSError, ScbchError):
        return False  # the resume itself names what is wrong
    if not wants:
        return False
    return "refit" not in RunFolder(run_dir).read_summary()


def launch_state(run_dir: str | Path) -> str:
    """What a launcher (sweep, SLURM requeue) does with ``run_dir``: "done" (summary.json, and its
    refit where eval.refit asks for one: skip),
    "resume" (a checkpoint), "restart" (outputs of a run killed before its first checkpoint:
    start afresh with --overwrite) or "new"."""
    run_dir = Path(run_dir)
    if RunFolder(run_dir).finished:
        return "resume" if refit_pending(run_dir) else "done"
    if has_checkpoint(run_dir):
        return "resume"
    return "restart" if RunFolder(run_dir).outputs() else "new"
