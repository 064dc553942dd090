"""Sweeps: a grid of datasets x methods x code lengths x noise settings x seeds, as a SLURM array
job or run locally (one run after another, or one per GPU).

    python -m scbch_dist.experiments.sweep GRID.yaml --slurm sweep.sbatch   # write the array job script
    python -m scbch_dist.experiments.sweep GRID.yaml --local [--gpus 0,1]   # run here
    python -m scbch_dist.experiments.sweep GRID.yaml --dry-run              # print what would run
    python -m scbch_dist.experiments.sweep GRID.yaml --task 7               # run task 7 (what each array task does)

A grid file:

    name: paper                     # runs go to <runs_dir>/<dataset>/<bits>bit_<noise>_seed<seed>
    runs_dir: runs/paper
    datasets: [flickr, nuswide]     # configs/<name>.yaml, or paths to config files
    methods: [scbch, nacd, rshnl]   # optional; runs then go to <runs_dir>/<dataset>/<method>/...
    bits: [16, 32, 64, 128]
    noise: [0.2, 0.5, 0.8]          # mixed-noise rates, or full specs ("redundant:1.0", "file:PATH", "none")
    seeds: [0]
    set: [train.epochs=50]          # overrides for every run; one of a method's section (scbch.k=10): its runs only
    slurm: {partition: gpu, time: "04:00:00", gres: "gpu:1", cpus_per_task: 8}

With ``methods``, a method other than scbch starts from configs/<method>-<dataset>.yaml (its
published settings) when that file exists, else from the dataset's config, with method.name set.
Every run is resumable: a run whose summary.json exists is skipped, one with a checkpoint resumes,
and one killed before its first checkpoint starts afresh (--overwrite). Array tasks are
preemption-safe: SLURM sends SIGUSR1 three minutes before the time limit, the script relays it to
the run (also one that comes before the run could catch it: ``experiments.slurm.warning_relay``),
the run checkpoints after its current step and the task requeues itself.
Task i is the i-th combination in the order datasets, methods, bits, noise, seeds.

Grid values end up in folder names, #SBATCH lines and command lines: a control character (newline,
tab, NUL, ...) anywhere in them, a slurm key that is not an option name or a backslash in a value
sbatch reads is refused naming the key; every value of the array script is shell-quoted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from scbch_dist import cli
from scbch_dist.config import ConfigError, find_config, read_yaml_mapping
from scbch_dist.engine.rundir import launch_state
from scbch_dist.errors import Preempted
from scbch_dist.experiments.slurm import IGNORING_USR1, warning_relay
from scbch_dist.methods import METHODS
from scbch_dist.run import RunFolder

CONFIG_DIR = Path("configs")  # a checkout's configs/ (a link to the packaged ones); else the packaged ones


@dataclass
class Grid:
    name: str
    datasets: list[str]
    bits: list[int]
    noise: list
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] | None = None  # None: the dataset configs' own method, no method level in run folders
    runs_dir: str = ""
    set: list[str] = field(default_factory=list)
    slurm: dict = field(default_factory=dict)

    def __post_init__(self):
        self.runs_dir = self.runs_dir or f"runs/{self.name}"


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    raw = read_yaml_mapping(path, "grid file")
    try:
        grid = Grid(**raw)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
    for key in ("datasets", "bits", "noise", "seeds") + (("methods",) if grid.methods is not None else ()):
        if not isinstance(getattr(grid, key), list) or not getattr(grid, key):
            raise ConfigError(f"{path}: {key!r} must be a non-empty list")
    for key in ("bits", "seeds"):
        bad = [v for v in getattr(grid, key) if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ConfigError(f"{path}: {key!r} holds {bad[0]!r}; give integers")
    check_grid(grid, path)
    return grid


_CONTROL_NAMES = {"\n": "newline", "\r": "carriage return", "\t": "tab", "\0": "NUL", "\x7f": "DEL"}
_SLURM_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _check_line(path: str | Path, key: str, value) -> None:
    """A grid value becomes part of folder names, #SBATCH lines and command lines: a control
    character (a newline above all) would cut a line of the batch script and run what follows."""
    bad = next((c for c in str(value) if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        what = _CONTROL_NAMES.get(bad, f"0x{ord(bad):02x}")
        raise ConfigError(f"{path}: {key} holds a control character ({what}); write it on one line, "
                          "without tabs or other control characters")


def check_grid(grid: Grid, path: str | Path) -> None:
    """Refuse what could break out of the array job script: control characters anywhere, slurm
    keys that are not option names, values sbatch would read otherwise than written."""
    _check_line(path, "name", grid.name)
    _check_line(path, "runs_dir", grid.runs_dir)
    for key in ("datasets", "methods", "noise", "set"):
        if key == "set" and not isinstance(grid.set, list):
            raise ConfigError(f"{path}: 'set' must be a list of key=value overrides")
        for i, value in enumerate(getattr(grid, key) or []):
            _check_line(path, f"{key}[{i}]", value)
    if not isinstance(grid.slurm, dict):
        raise ConfigError(f"{path}: 'slurm' must be a mapping of sbatch options (partition: gpu, ...)")
    for key, value in grid.slurm.items():
        if not isinstance(key, str) or not _SLURM_KEY.fullmatch(key):
            raise ConfigError(f"{path}: slurm key {key!r} is not an sbatch option name "
                              "(letters, digits, '-' and '_' only)")
        if value is not None and not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: slurm.{key} is {type(value).__name__}; give one string or number "
                              "(sbatch takes lists comma-separated: \"n1,n2\")")
        _check_line(path, f"slurm.{key}", value)
    # sbatch's directive parser takes a backslash as an escape even inside quotes, the shell does
    # not: no quoting makes both read such a value as written
    for key, value in [("name", grid.name), ("runs_dir", grid.runs_dir),
                       *((f"slurm.{k}", v) for k, v in grid.slurm.items())]:
        if "\\" in str(value):
            raise ConfigError(f"{path}: {key} holds a backslash, which sbatch reads as an escape in #SBATCH "
                              "lines; write the value without one")


def noise_spec(value) -> str:
    return f"mixed:{value}" if isinstance(value, (int, float)) else str(value)


def _noise_tag(value) -> str:
    spec = noise_spec(value)
    return spec.replace("mixed:", "noise").replace(":", "-").replace("/", "_")


@dataclass
class Run:
    task: int
    dataset: str
    method: str | None
    bits: int
    noise: str
    seed: int
    run_dir: Path

    def argv(self, grid: Grid) -> list[str]:
        """Arguments of ``python -m scbch_dist.train`` for this run (fresh or resumed)."""
        state = launch_state(self.run_dir)
        if state == "resume":
            return ["--resume", str(self.run_dir)]
        # a setting of a method's own section goes to that method's runs: with methods [scbch, nacd],
        # scbch.k=10 is not a setting of the nacd runs (train refuses one given to another method)
        mine = [s for s in grid.set if self.method is None or _section(s) not in METHODS or _section(s) == self.method]
        sets = [f"model.bits={self.bits}", f"data.noise={self.noise}", f"train.seed={self.seed}",
                f"run.dir={self.run_dir}", "run.progress=false", *mine]
        if self.method is not None:
            sets.insert(0, f"method.name={self.method}")
        return ["--config", str(config_path(self.dataset, self.method)), *[a for s in sets for a in ("--set", s)],
                *(["--overwrite"] if state == "restart" else [])]

    @property
    def done(self) -> bool:
        return launch_state(self.run_dir) == "done"


def _section(setting: str) -> str:
    """The section a ``key=value`` override sets ("scbch" for "scbch.k=10")."""
    return setting.split("=", 1)[0].split(".", 1)[0].strip()


def config_path(dataset: str, method: str | None = None) -> Path:
    """``flickr`` -> configs/flickr.yaml, or configs/<method>-flickr.yaml when it exists; a path to
    a .yaml file is taken as it is."""
    if dataset.endswith((".yaml", ".yml")):
        return Path(dataset)
    for name in ([f"{method}-{dataset}.yaml"] if method is not None else []) + [f"{dataset}.yaml"]:
        try:
            return find_config(CONFIG_DIR / name)
        except ConfigError:
            pass
    return CONFIG_DIR / f"{dataset}.yaml"  # missing: main names it


def expand(grid: Grid) -> list[Run]:
    runs = []
    combos = itertools.product(grid.datasets, grid.methods or [None], grid.bits, grid.noise, grid.seeds)
    for i, (dataset, method, bits, noise, seed) in enumerate(combos):
        folder = Path(grid.runs_dir) / Path(dataset).stem / (method or "")
        run_dir = folder / f"{bits}bit_{_noise_tag(noise)}_seed{seed}"
        runs.append(Run(i, dataset, method, int(bits), noise_spec(noise), int(seed), run_dir))
    return runs


def command(run: Run, grid: Grid, python: str = sys.executable) -> list[str]:
    return [python, "-m", "scbch_dist.train", *run.argv(grid)]


def slurm_script(grid: Grid, grid_path: str | Path, runs: list[Run], python: str = sys.executable) -> str:
    """An array job with one task per run; each task runs ``--task $SLURM_ARRAY_TASK_ID`` with
    ``$PYTHON``, by default ``python``: the interpreter that wrote the script (its environment, as
    on a cluster whose nodes share the file system), not whichever ``python`` a node's PATH has."""
    check_grid(grid, grid_path)  # a Grid built in code has not been through load_grid
    _check_line(grid_path, "the interpreter's path", python)
    opts = {"job-name": f"scbch-{grid.name}", "array": f"0-{len(runs) - 1}",
            # append: a requeued task's output follows its earlier incarnation's instead of replacing it
            "output": f"{grid.runs_dir}/slurm/%A_%a.out", "open-mode": "append", "requeue": None,
            # SIGUSR1 to this script 3 minutes before the time limit, relayed to the run: checkpoint, requeue
            "signal": "B:USR1@180"}
    for key, value in grid.slurm.items():
        opts[key.replace("_", "-")] = value
    lines = ["#!/usr/bin/env bash", f"# {len(runs)} runs of grid {grid.name!r}, written by python -m scbch_dist.experiments.sweep"]
    # sbatch reads directive values with shell-like quoting: a value with spaces, quotes or $(...)
    # stays one value, and shlex.quote leaves plain tokens (gpu:1, 04:00:00, %A_%a) as they are
    lines += [f"#SBATCH --{k}" if v is None else f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in opts.items()]
    task = f"\"$PYTHON\" -m scbch_dist.experiments.sweep {shlex.quote(str(grid_path))} --task \"$SLURM_ARRAY_TASK_ID\""
    lines += ["set -uo pipefail", "# each task is one run; a requeued task resumes from its checkpoint",
              "# the interpreter that wrote this script, unless PYTHON names another when submitting",
              f"PYTHON=${{PYTHON:-{shlex.quote(python)}}}", *warning_relay(f"{IGNORING_USR1} {task}")]
    return "\n".join(lines) + "\n"


def run_local(runs: list[Run], grid: Grid, gpus: list[str]) -> int:
    """Run every pending run: one after another, or one per listed GPU at a time."""
    pending = [r for r in runs if not r.done]
    print(f"{len(runs) - len(pending)} of {len(runs)} runs already done; {len(pending)} to go", file=sys.stderr)
    slots = gpus or [None]
    active: dict = {}
    failed = 0
    while pending or active:
        for slot in slots:
            if slot not in active and pending:
                run = pending.pop(0)
                env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}))
                print(f"[task {run.task}] {shlex.join(command(run, grid))}", file=sys.stderr)
                active[slot] = (run, subprocess.Popen(command(run, grid), env=env))
        for slot, (run, proc) in list(active.items()):
            if proc.poll() is not None:
                del active[slot]
                if proc.returncode:
                    failed += 1
                    print(f"[task {run.task}] failed with exit code {proc.returncode}", file=sys.stderr)
        time.sleep(0.2)
    return failed


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.experiments.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--slurm", metavar="OUT", help="write the SLURM array job script to OUT")
    mode.add_argument("--local", action="store_true", help="run the grid on this machine")
    mode.add_argument("--task", type=int, help="run one task (an array task's job)")
    mode.add_argument("--dry-run", action="store_true", help="print every run's command and the array script")
    p.add_argument("--gpus", default="", help="with --local: comma-separated GPU ids, one run per GPU at a time")
    args = p.parse_args(argv)
    grid = load_grid(args.grid)
    runs = expand(grid)
    missing = sorted({str(p) for r in runs if not (p := config_path(r.dataset, r.method)).is_file()})
    if missing:
        raise ConfigError(f"{args.grid}: config file(s) not found: {', '.join(missing)} (run from the repository root)")
    if args.dry_run:
        for run in runs:
            state = launch_state(run.run_dir)
            print(f"[task {run.task}] ({state}) {shlex.join(command(run, grid, 'python'))}")
        print(f"\n# --slurm would write:\n{slurm_script(grid, args.grid, runs)}")
    elif args.slurm:
        Path(grid.runs_dir, "slurm").mkdir(parents=True, exist_ok=True)  # SLURM opens --output before the job
        Path(args.slurm).write_text(slurm_script(grid, args.grid, runs))
        print(f"wrote {args.slurm}: {len(runs)} array tasks; submit with: sbatch {args.slurm}", file=sys.stderr)
    elif args.task is not None:
        if not 0 <= args.task < len(runs):
            raise ConfigError(f"--task {args.task} out of range 0..{len(runs) - 1}")
        run = runs[args.task]
        if run.done:
            print(f"[task {run.task}] done already: {RunFolder(run.run_dir).summary}", file=sys.stderr)
            return
        from scbch_dist.experiments.slurm import preempted, requeue
        from scbch_dist.train import main as train_main

        try:
            train_main(run.argv(grid))
        except Preempted as stopped:
            # SIGUSR1 before the time limit, or SIGTERM of a preemption: back in the queue; scancel's
            # SIGTERM ends the task
            if stopped.requeue:
                requeue(dict(os.environ))
            elif preempted(dict(os.environ)):
                requeue(dict(os.environ), "preempted")
            raise
    else:
        gpus = [g for g in args.gpus.split(",") if g]
        raise SystemExit(1 if run_local(runs, grid, gpus) else 0)


def console() -> None:
    """The ``scbch-sweep`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-sweep")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.experiments.sweep")
