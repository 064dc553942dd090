"""Launch a training run from inside a SLURM allocation, on one or many nodes.

    srun --ntasks-per-node=1 python -m scbch_dist.experiments.slurm --gpus-per-node 8 -- --config configs/X.yaml
    python -m scbch_dist.experiments.slurm --dry-run --gpus-per-node 8 -- --config configs/X.yaml

Each node runs one ``accelerate launch`` that starts one process per GPU. The machine rank, the
number of machines and the main address come from SLURM (SLURM_NODEID, SLURM_NNODES, the first
host of SLURM_JOB_NODELIST); the rendezvous port is derived from SLURM_JOB_ID, so array tasks that
share a node never collide on a fixed port. The run folder defaults to runs/<job>_<array task>, and
a run that already has a checkpoint there is resumed (requeue-safe).

Preemption (docs/distributed.md, "SLURM"): launch/slurm.sbatch asks SLURM for SIGUSR1 three
minutes before the time limit and passes it on to this launcher, which writes RUN_DIR/STOP; the
trainer finishes its step, writes a checkpoint and exits with status 75; the launcher of node 0
then requeues the job (``scontrol requeue``), and the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from scbch_dist import cli
from scbch_dist.engine.rundir import launch_state
from scbch_dist.engine.stop import STOP_FILE


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def rendezvous_port(job_id: str | int) -> int:
    """A port in [20000, 60000) that is a function of the job id (each array task has its own)."""
    return 20000 + int(job_id) % 40000


def run_dir_for(env: dict) -> str:
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID", "local")
    return f"runs/{job}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"


def accelerate_command(env: dict, gpus_per_node: int, train_args: list[str], *, accelerate_config: str,
                       run_dir: str | None = None, python: str = "python") -> list[str]:
    """The command this node runs: accelerate launch ... -m scbch_dist.train ARGS."""
    nodes = int(env.get("SLURM_NNODES", 1))
    node = int(env.get("SLURM_NODEID", 0))
    job = env.get("SLURM_JOB_ID", "0")
    head = first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
    run_dir = run_dir or run_dir_for(env)
    state = launch_state(run_dir)
    if state == "resume":
        args = ["--resume", run_dir, *[a for a in train_args if a not in ("--resume", "--overwrite")]]
        args = _drop_config(args)
    else:  # a run killed before its first checkpoint starts afresh
        args = [*train_args, "--set", f"run.dir={run_dir}", "--set", "run.progress=false",
                *(["--overwrite"] if state == "restart" else [])]
    return [python, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
            "--num_machines", str(nodes), "--machine_rank", str(node), "--num_processes", str(nodes * gpus_per_node),
            "--main_process_ip", head, "--main_process_port", str(rendezvous_port(job)),
            "-m", "scbch_dist.train", *args]


def requeue_command(env: dict) -> list[str] | None:
    """``scontrol requeue`` for this job (or array task); None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return ["scontrol", "requeue", f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"]
    if "SLURM_JOB_ID" in env:
        return ["scontrol", "requeue", env["SLURM_JOB_ID"]]
    return None


def requeue(env: dict) -> None:
    """Put this job back in the queue (node 0 only: one request per job)."""
    cmd = requeue_command(env)
    if cmd is not None and env.get("SLURM_NODEID", "0") == "0":
        print(f"scbch_dist.experiments.slurm: preempted; {shlex.join(cmd)}", file=sys.stderr)
        subprocess.run(cmd, check=False)


def supervise(cmd: list[str], run_dir: str, env: dict) -> int:
    """Run ``cmd``; on SIGUSR1 or SIGTERM ask the run to stop (RUN_DIR/STOP) and wait for its
    checkpoint; requeue the job when the run stopped for preemption. Returns the exit status."""
    asked = []

    def ask_to_stop(signum, frame):
        asked.append(signum)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        Path(run_dir, STOP_FILE).touch()

    # the launcher and its workers in their own session: the stop goes through the file, so a
    # signal to this task does not kill the accelerate launcher before the checkpoint is written
    child = subprocess.Popen(cmd, start_new_session=True)
    previous = {sig: signal.signal(sig, ask_to_stop) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # under accelerate launch the workers' 75 arrives as torchrun's 1: what says "preempted" is that
    # this launcher asked the run to stop and it did not finish (a STOP written by hand: no requeue)
    if asked and status != 0:
        requeue(env)
        return cli.EXIT_PREEMPTED
    return status


def _drop_config(args: list[str]) -> list[str]:
    """A resumed run takes its own config.yaml; --config does not apply."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--config":
            skip = True
            continue
        if a.startswith("--config="):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m scbch_dist.experiments.slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus-per-node", type=int, default=int(os.environ.get("SLURM_GPUS_ON_NODE", 1)))
    p.add_argument("--accelerate-config", default="accelerate_config.yaml")
    p.add_argument("--run-dir", help="default: runs/<job id>_<array task id>")
    p.add_argument("--dry-run", action="store_true", help="print the resolved command instead of running it")
    args = p.parse_args(own)
    env = dict(os.environ)
    run_dir = args.run_dir or run_dir_for(env)
    if launch_state(run_dir) == "done":
        print(f"scbch_dist.experiments.slurm: {run_dir}/summary.json exists; the run is finished", file=sys.stderr)
        return
    cmd = accelerate_command(env, args.gpus_per_node, train_args, accelerate_config=args.accelerate_config,
                             run_dir=run_dir, python=sys.executable)
    if args.dry_run:
        print(shlex.join(cmd))
        return
    sys.exit(supervise(cmd, run_dir, env))


def console() -> None:
    """The ``scbch-slurm`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-slurm")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.experiments.slurm")
