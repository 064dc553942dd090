"""Refit after selection (docs/evaluation.md, "Refit after selection"): train again on every
training row, the held-out ones included, for the number of epochs the held-out rows selected, and
report that run's final evaluation as ``refit`` beside ``selected`` in the run's summary.json.

    python -m scbch_dist.refit RUN_DIR        # a finished run that held rows out (eval.validation)
    accelerate launch -m scbch_dist.refit RUN_DIR

The refit is a run of its own in RUN_DIR/refit (config.yaml, log.txt, checkpoints, summary.json)
with the run's settings but ``eval.validation=0`` and ``train.epochs`` the selected epoch; stopped,
it resumes where it stopped when the command is given again. A run with ``eval.refit: true`` does
this itself when it ends (and ``--resume`` of such a run finishes a refit that was stopped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scbch_dist import cli
from scbch_dist.train import refit


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.refit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished run that held rows out (eval.validation > 0)")
    return refit(Path(p.parse_args(argv).run_dir))


def console() -> None:
    """The ``scbch-refit`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-refit")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.refit")
