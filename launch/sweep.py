#!/usr/bin/env python
"""Sweeps over datasets x code lengths x noise rates x seeds; the same as ``python -m scbch_dist.experiments.sweep``.

    python launch/sweep.py launch/grids/paper.yaml --dry-run
    python launch/sweep.py launch/grids/paper.yaml --slurm paper.sbatch && sbatch paper.sbatch
    python launch/sweep.py launch/grids/paper.yaml --local --gpus 0,1,2,3
"""
from scbch_dist import cli
from scbch_dist.experiments.sweep import main

if __name__ == "__main__":
    cli.run(main, "python launch/sweep.py")  # a bad grid is one line, as from the module
