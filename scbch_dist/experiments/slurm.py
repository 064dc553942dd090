"""Launch a training run from inside a SLURM allocation, on one or many nodes, GPU or CPU.

    srun --ntasks-per-node=1 python -m scbch_dist.experiments.slurm -- --config configs/X.yaml
    python -m scbch_dist.experiments.slurm --dry-run --gpus-per-node 8 -- --config configs/X.yaml

Each node runs one ``accelerate launch`` that starts one process per GPU, or, on a node without
GPUs, one CPU process (gloo). The machine rank, the number of machines and the main address come
from SLURM (SLURM_NODEID, SLURM_NNODES, the first host of SLURM_JOB_NODELIST); the rendezvous port
is derived from SLURM_JOB_ID, so array tasks that share a node never collide on a fixed port. The
run folder defaults to runs/<job>_<array task>, and a run that already has a checkpoint there is
resumed (requeue-safe).

Signals (docs/distributed.md, "SLURM events"): SIGUSR1 (launch/slurm.sbatch asks SLURM for it three
minutes before the time limit) and SIGTERM (scancel, preemption, the time limit itself) both make
this launcher write RUN_DIR/STOP; the trainer finishes its step, writes a checkpoint and exits with
status 75. The launcher of node 0 then requeues the job (``scontrol requeue``) after SIGUSR1, when
the run wrote a newer checkpoint than the one it started from (a job warned before it could make
progress is not requeued into the same fate again), and after a SIGTERM of preemption (SLURM shows
a PreemptTime; a job that ends inside the grace time is not requeued by SLURM). After scancel's
SIGTERM it does not: a cancelled job never comes back. SLURM may warn a job in its first second, and an
unhandled SIGUSR1 ends a Python process: the batch script starts this launcher with SIGUSR1 ignored
and writes a file when warned ($SCBCH_WARNING_FILE), and the launcher catches both signals before
it imports anything heavy (torch takes seconds), then reads the file; a warning that came that
early is served as soon as the run starts.
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
from scbch_dist.errors import LaunchError, ScbchError
from scbch_dist.run import RunFolder

# Only light modules above: the stop signals must be caught before torch is imported (main).

CPU_ACCELERATE_CONFIG = "configs/accelerate/cpu_2proc.yaml"  # use_cpu: true; the counts are given on the command line
GPU_ACCELERATE_CONFIG = "accelerate_config.yaml"
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def warning_relay(command: str) -> list[str]:
    """The lines of a batch script that run ``command`` (a shell command, run with SIGUSR1 ignored
    until the Python it starts catches it) and relay SLURM's time-limit warning to it: SLURM signals
    the batch shell only (``--signal=B:USR1@...``), possibly in the job's first second, so the shell
    writes $SCBCH_WARNING_FILE (cli.WARNING_FILE_VARIABLE) and passes the signal on once the command
    listens (cli.warned_before_start wrote $SCBCH_WARNING_FILE.listening). SIGTERM reaches
    every process of the job by itself; the shell waits for the command and exits with its status.
    launch/slurm.sbatch holds these lines for its srun; a sweep's array script is written with them."""
    return ["# SLURM may warn in the job's first second (it looks at its jobs every 30 s): the command starts",
            "# with SIGUSR1 ignored, so that an early warning cannot kill it, and reads this file once it",
            "# catches the signal itself (docs/distributed.md, \"SLURM events\")",
            f'export {cli.WARNING_FILE_VARIABLE}="${{TMPDIR:-/tmp}}/scbch-warning-${{SLURM_JOB_ID:-0}}-'
            '${SLURM_RESTART_COUNT:-0}-$$"',
            'CHILD=""',
            "# the signal is passed on only once the command listens (it wrote FILE.listening): until then",
            "# it may be a shell that srun started and that has not yet ignored SIGUSR1. Where the file",
            "# cannot be written, at once",
            "relay_warning() {",
            f'  {{ : > "${cli.WARNING_FILE_VARIABLE}"; }} 2>/dev/null && [ ! -e "${cli.WARNING_FILE_VARIABLE}.listening" ] && return',
            '  [ -z "$CHILD" ] || kill -USR1 "$CHILD" 2>/dev/null',
            "}",
            "trap relay_warning USR1",
            "trap ':' TERM  # SIGTERM went to every process of the job already: this shell waits for the command",
            f"{command} &",
            "CHILD=$!",
            "# `wait` returns early when a trapped signal arrives: wait again until the command has ended",
            "while true; do",
            '  wait "$CHILD"',
            "  status=$?",
            '  kill -0 "$CHILD" 2>/dev/null || break',
            "done",
            f'rm -f "${cli.WARNING_FILE_VARIABLE}" "${cli.WARNING_FILE_VARIABLE}.listening"',
            'exit "$status"']


IGNORING_USR1 = """bash -c 'trap "" USR1; exec "$@"' scbch"""  # runs "$@" with SIGUSR1 ignored (warning_relay)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise LaunchError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def rendezvous_port(job_id: str | int) -> int:
    """A port in [20000, 60000) that is a function of the job id (each array task has its own)."""
    return 20000 + int(job_id) % 40000


def slurm_int(env: dict, key: str, default: int, *, minimum: int = 0) -> int:
    """An integer SLURM variable; a value that is none (or below ``minimum``) is a LaunchError naming it."""
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"\d{1,9}", raw.strip()) or int(raw) < minimum:
        raise LaunchError(f"{key}={raw!r} is not a whole number >= {minimum}; run inside a SLURM allocation "
                          "or set it to one")
    return int(raw)


def node_gpus(env: dict) -> int:
    """The GPUs this node has for the job: SLURM's count (SLURM_GPUS_ON_NODE; SLURM_GPUS_PER_NODE,
    'N' or 'type:N'), else the CUDA devices torch sees; 0 on a CPU node."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        raw = env.get(key, "")
        if raw:
            count = raw.rsplit(":", 1)[-1]
            if not count.isdigit():
                raise LaunchError(f"{key}={raw!r}: cannot read a GPU count from it; give --gpus-per-node N")
            return int(count)
    import torch

    return torch.cuda.device_count()


def cpu_threads(env: dict) -> int:
    """Threads for the one CPU process of a node: OMP_NUM_THREADS if set, else the CPUs SLURM gave
    the task (SLURM_CPUS_PER_TASK, SLURM_CPUS_ON_NODE), else 1."""
    for key in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if env.get(key):
            return slurm_int(env, key, 1, minimum=1)
    return 1


def run_dir_for(env: dict) -> str:
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID", "local")
    return f"runs/{job}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"


def accelerate_command(env: dict, gpus_per_node: int, train_args: list[str], *, accelerate_config: str | None = None,
                       run_dir: str | None = None, python: str = "python") -> list[str]:
    """The command this node runs: ``accelerate launch ... -m scbch_dist.train ARGS``, one process
    per GPU, or one CPU process per node where ``gpus_per_node`` is 0; a single CPU process in
    all runs the trainer itself, without a launcher."""
    from scbch_dist.config import find_config  # imports torch: not at the top (main)
    from scbch_dist.engine.rundir import launch_state

    nodes = slurm_int(env, "SLURM_NNODES", 1, minimum=1)
    node = slurm_int(env, "SLURM_NODEID", 0)
    if node >= nodes:
        raise LaunchError(f"SLURM_NODEID={node} is not below SLURM_NNODES={nodes}")
    job = slurm_int(env, "SLURM_JOB_ID", 0)
    head = first_host(env.get("SLURM_JOB_NODELIST", "localhost"))
    run_dir = run_dir or run_dir_for(env)
    state = launch_state(run_dir)
    if state == "resume":
        args = ["--resume", run_dir, *[a for a in train_args if a not in ("--resume", "--overwrite")]]
        args = _drop_config(args)
    else:  # a run killed before its first checkpoint starts afresh
        args = [*train_args, "--set", f"run.dir={run_dir}", "--set", "run.progress=false",
                *(["--overwrite"] if state == "restart" else [])]
    per_node = gpus_per_node or 1
    if gpus_per_node == 0 and nodes == 1:
        return [python, "-m", "scbch_dist.train", *args]
    config = accelerate_config or str(find_config(CPU_ACCELERATE_CONFIG) if gpus_per_node == 0 else GPU_ACCELERATE_CONFIG)
    # on a CPU node the threads are the CPUs SLURM gave the task (accelerate would count the machine's)
    threads = ["--num_cpu_threads_per_process", str(cpu_threads(env))] if gpus_per_node == 0 else []
    return [python, "-m", "accelerate.commands.launch", "--config_file", config, *threads,
            "--num_machines", str(nodes), "--machine_rank", str(node), "--num_processes", str(nodes * per_node),
            "--main_process_ip", head, "--main_process_port", str(rendezvous_port(job)),
            "-m", "scbch_dist.train", *args]


def job_spec(env: dict) -> str | None:
    """This job as scontrol names it: JOB, or ARRAYJOB_TASK for an array task; None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def preempted(env: dict) -> bool:
    """Whether SLURM is preempting this job: ``scontrol show job`` gives it a PreemptTime from the
    SIGTERM that opens the grace time on. (scancel and the time limit leave it None.) A job that
    ends by itself inside the grace time is not requeued by SLURM, so its launcher requeues it."""
    job = job_spec(env)
    if job is None:
        return False
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return re.search(r"(?:^|\s)PreemptTime=(?!None)\S", out.stdout) is not None


def requeue_command(env: dict) -> list[str] | None:
    """``scontrol requeue`` for this job (or array task); None outside SLURM."""
    job = job_spec(env)
    return None if job is None else ["scontrol", "requeue", job]


def requeue(env: dict, why: str = "stopped before the time limit") -> None:
    """Put this job back in the queue (node 0 only: one request per job)."""
    cmd = requeue_command(env)
    if cmd is not None and env.get("SLURM_NODEID", "0") == "0":
        print(f"scbch_dist.experiments.slurm: {why}; {shlex.join(cmd)}", file=sys.stderr)
        subprocess.run(cmd, check=False)


def _checkpoint_name(run_dir: str) -> str:
    """The name ``checkpoints/latest`` holds ("" without one); names sort in training order."""
    from scbch_dist.engine.checkpoint import latest_name  # imports torch: not at the top (main)

    try:
        return latest_name(Path(run_dir) / "checkpoints")
    except (OSError, ScbchError):
        return ""


def _ignore_stop_signals() -> None:
    """In the launcher's child: SLURM signals every process of the step, and accelerate's and
    torchrun's launchers would die of SIGUSR1 (or, launching one process, of SIGTERM) before their
    workers wrote the checkpoint. Ignored here; the trainer installs its own handlers, and
    torchrun's agent its own for SIGTERM (it passes it on and waits for the workers)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def supervise(cmd: list[str], run_dir: str, env: dict, asked: list[int] | None = None) -> int:
    """Run ``cmd``; on SIGUSR1 or SIGTERM ask the run to stop (RUN_DIR/STOP) and wait for its
    checkpoint; requeue the job when SIGUSR1 asked and the run made progress. ``asked`` holds the
    signals that came before (main's): the run is asked to stop from its start. Returns the exit status."""
    asked = [] if asked is None else asked

    def write_stop() -> None:
        folder = RunFolder(run_dir)
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.stop.touch()

    def ask_to_stop(signum, frame):
        asked.append(signum)
        write_stop()

    started_from = _checkpoint_name(run_dir)
    previous = {sig: signal.signal(sig, ask_to_stop) for sig in STOP_SIGNALS}
    try:
        if asked:
            write_stop()
        child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=_ignore_stop_signals)
        status = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # under accelerate launch the workers' 75 arrives as torchrun's 1: what says "stopped" is that
    # this launcher asked the run to stop and it did not finish (a STOP written by hand: no requeue)
    if not asked or status == 0:
        return status
    if signal.SIGUSR1 not in asked:
        if preempted(env):  # inside SLURM's grace time: ended by itself, the job would not come back
            requeue(env, "preempted")
        else:
            print("scbch_dist.experiments.slurm: stopped by SIGTERM (scancel or the time limit); not requeued",
                  file=sys.stderr)
    elif _checkpoint_name(run_dir) <= started_from:
        print(f"scbch_dist.experiments.slurm: stopped before the time limit, but {run_dir} has no checkpoint newer "
              f"than the one it started from ({started_from or 'none'}); not requeued (is --signal's lead "
              "longer than --time?)", file=sys.stderr)
    else:
        requeue(env)
    return cli.EXIT_PREEMPTED


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
    asked: list[int] = []  # SLURM's signals from here on; the imports that follow take seconds
    previous = {sig: signal.signal(sig, lambda signum, frame: asked.append(signum)) for sig in STOP_SIGNALS}
    if cli.warned_before_start():
        asked.append(signal.SIGUSR1)
    try:
        launch(argv, asked)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch(argv: list[str] | None, asked: list[int]) -> None:
    """main's work, with the stop signals that have come so far in ``asked``."""
    from scbch_dist.engine.rundir import launch_state  # imports torch: after main caught the signals

    argv = sys.argv[1:] if argv is None else argv
    own, train_args = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="python -m scbch_dist.experiments.slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="processes per node, one per GPU; 0: one CPU process (gloo). Default: the GPUs SLURM "
                        "gave the node (SLURM_GPUS_ON_NODE), else those torch sees, else 0")
    p.add_argument("--accelerate-config", default=None,
                   help=f"default: {GPU_ACCELERATE_CONFIG} on GPU nodes, {CPU_ACCELERATE_CONFIG} on CPU nodes")
    p.add_argument("--run-dir", help="default: runs/<job id>_<array task id>")
    p.add_argument("--dry-run", action="store_true", help="print the resolved command instead of running it")
    args = p.parse_args(own)
    env = dict(os.environ)
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        raise LaunchError(f"--gpus-per-node {args.gpus_per_node}: give 0 (one CPU process a node) or more")
    gpus = node_gpus(env) if args.gpus_per_node is None else args.gpus_per_node
    if gpus == 0:  # torch would take every core of the machine, not the task's share
        env.setdefault("OMP_NUM_THREADS", str(cpu_threads(env)))
        os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    run_dir = args.run_dir or run_dir_for(env)
    if launch_state(run_dir) == "done":
        print(f"scbch_dist.experiments.slurm: {RunFolder(run_dir).summary} exists; the run is finished", file=sys.stderr)
        return
    cmd = accelerate_command(env, gpus, train_args, accelerate_config=args.accelerate_config,
                             run_dir=run_dir, python=sys.executable)
    if args.dry_run:
        print(shlex.join(cmd))
        return
    sys.exit(supervise(cmd, run_dir, env, asked))


def console() -> None:
    """The ``scbch-slurm`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-slurm")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.experiments.slurm")
