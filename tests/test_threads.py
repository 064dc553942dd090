"""The CPU threads of a training process (docs/engine.md, "Threads"): OMP_NUM_THREADS where set,
else the fewest CPUs the affinity, SLURM and the cgroup quota allow, shared by the run's processes
on the machine; the run logs the choice."""

from __future__ import annotations

import os
import subprocess
import sys


import pytest

from conftest import tiny_args
from scbch_dist.engine.threads import cgroup_cpus, cpu_threads


@pytest.mark.parametrize("env, affinity, cgroup, threads, why", [
    ({}, 2, None, 2, "CPU affinity 2"),
    ({"OMP_NUM_THREADS": "3"}, 2, 1.0, 3, "OMP_NUM_THREADS=3"),  # the user's word, even past the CPUs
    ({"LOCAL_WORLD_SIZE": "2"}, 2, None, 1, "CPU affinity 2; 2 CPUs shared by 2 processes on this machine"),
    ({"LOCAL_WORLD_SIZE": "4"}, 2, None, 1, "2 CPUs shared by 4 processes"),  # never below one
    ({"SLURM_CPUS_PER_TASK": "4"}, 64, 8.0, 4, "CPU affinity 64, cgroup quota 8, SLURM_CPUS_PER_TASK 4"),
    ({}, 64, 2.5, 2, "cgroup quota 2"),  # a container's --cpus=2.5: two whole CPUs
    ({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "x"}, 6, None, 6, "CPU affinity 6"),  # unusable values ignored
])
def test_the_thread_count_is_what_the_process_may_use(env, affinity, cgroup, threads, why):
    got, said = cpu_threads(env, affinity=affinity, cgroup=cgroup)
    assert got == threads and why in said


def test_the_cgroup_quota_is_read_in_both_layouts(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpus(v2) == 2.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(v2) is None
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(v1.parent) == 1.5
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpus(v1.parent) is None
    assert cgroup_cpus(tmp_path / "none") is None


def test_a_run_logs_and_uses_its_threads(tiny_dataset, tmp_path, monkeypatch):
    import torch

    from scbch_dist.train import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        main(tiny_args(tiny_dataset, tmp_path / "run", "train.epochs=1", "eval.every=1", "run.tensorboard=false"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "threads: 1 CPU thread a process (OMP_NUM_THREADS=1; OpenMP spins 1000 times, then sleeps)" in (
        tmp_path / "run" / "log.txt").read_text()


def _spin_count(env: dict) -> str:
    """GOMP_SPINCOUNT as a fresh interpreter that imports the package, then torch, sees it."""
    code = "import scbch_dist, os, torch; print(os.environ.get('GOMP_SPINCOUNT', '-'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()


def test_openmp_spins_briefly_unless_the_user_says_otherwise():
    """Set before torch loads OpenMP; a user's GOMP_SPINCOUNT or OMP_WAIT_POLICY is left alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    assert _spin_count(env) == "1000"
    assert _spin_count({**env, "GOMP_SPINCOUNT": "50"}) == "50"
    assert _spin_count({**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "-"
