"""The CPU threads of a training process (docs/engine.md, "Threads").

torch starts one thread per core of the machine. A process may be allowed fewer (its CPU affinity:
``taskset``, a SLURM or container cpuset; SLURM's ``--cpus-per-task``; a cgroup's CPU quota: a
container's ``--cpus``), and the processes of a run on one machine share them: each extra thread
past what the process may run then waits for a core, and torch's threads wait for each other at
every operation. ``threads`` is OMP_NUM_THREADS where it is set (the user's word), else the fewest
CPUs any of these allows, divided among the run's processes on this machine (LOCAL_WORLD_SIZE,
which torchrun and accelerate launch set), at least one. Waiting threads spin briefly, then sleep
(GOMP_SPINCOUNT=1000, set by the package before torch loads: scbch_dist/__init__.py)."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpus(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup, in CPUs (cgroup v2 ``cpu.max``, or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``); None where there is none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:  # "max" (v2) or -1 (v1): no quota
        return None
    return int(quota) / int(period)


def _positive(env: dict, key: str) -> int | None:
    value = env.get(key, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def cpu_threads(env: dict | None = None, *, affinity: int | None = None, cgroup: float | None | str = "read") -> tuple[int, str]:
    """(threads, why) for this process; ``affinity`` and ``cgroup`` stand in for this machine's
    (tests). ``why`` says what decided, for the log."""
    env = os.environ if env is None else env
    user = _positive(env, "OMP_NUM_THREADS")
    if user is not None:
        return user, f"OMP_NUM_THREADS={user}"
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpus() if cgroup == "read" else cgroup
    limits = {"CPU affinity": affinity}
    if quota is not None:
        limits["cgroup quota"] = max(1, math.floor(quota))
    slurm = _positive(env, "SLURM_CPUS_PER_TASK")
    if slurm is not None:
        limits["SLURM_CPUS_PER_TASK"] = slurm
    cpus = min(limits.values())
    local = _positive(env, "LOCAL_WORLD_SIZE") or 1
    threads = max(1, cpus // local)
    said = ", ".join(f"{k} {v}" for k, v in limits.items())
    return threads, f"{said}" + (f"; {cpus} CPUs shared by {local} processes on this machine" if local > 1 else "")


def use_cpu_threads(env: dict | None = None) -> str:
    """Set torch's threads to ``cpu_threads``; returns the log's words for it."""
    import torch

    threads, why = cpu_threads(env)
    torch.set_num_threads(threads)
    return f"{threads} CPU thread{'s' if threads > 1 else ''} a process ({why}; {openmp_waiting(env)})"


def openmp_waiting(env: dict | None = None) -> str:
    """How waiting OpenMP threads behave, in words (scbch_dist/__init__.py sets GOMP_SPINCOUNT)."""
    env = os.environ if env is None else env
    if "GOMP_SPINCOUNT" in env:
        return f"OpenMP spins {env['GOMP_SPINCOUNT']} times, then sleeps"
    if "OMP_WAIT_POLICY" in env:
        return f"OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}"
    return "OpenMP's own waiting"
