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
import os
from pathlib import Path

from scbch_dist import cli
from scbch_dist.config import check_saved_config
from scbch_dist.digests import read_sealed_json, sealed_run, write_sealed_json
from scbch_dist.engine.rundir import REFIT_FOLDER, launch_state
from scbch_dist.errors import RunDirError

SELECTED_BY = ("the final evaluation of a second run on every training row (held-out ones included) for the "
               "epochs 'selected' chose ({folder}/)")


def selected_epochs(run_dir: Path) -> tuple[dict, int]:
    """The run's summary and the epoch its held-out rows selected; a one-line error where there is
    none to refit from."""
    path = run_dir / "summary.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no summary.json; the run has not finished (resume it first: "
                          f"python -m scbch_dist.train --resume {run_dir})")
    summary = read_sealed_json(path, required=sealed_run(run_dir))
    if not summary.get("selected"):
        raise RunDirError(f"{path}: no 'selected' evaluation (the run held no rows out: eval.validation 0), so no "
                          "epoch to refit for")
    return summary, int(summary["selected"]["epoch"])


def refit_command(run_dir: Path, epochs: int) -> list[str]:
    """scbch_dist.train's arguments for RUN_DIR/refit: a fresh run from the run's config, or the
    resume of one that was stopped."""
    folder = run_dir / REFIT_FOLDER
    state = launch_state(folder)
    if state == "resume":
        return ["--resume", str(folder)]
    settings = ["eval.validation=0", "eval.refit=false", f"train.epochs={epochs}", f"eval.every={epochs}",
                f"run.dir={folder}"]
    return ["--config", str(run_dir / "config.yaml"), *[a for s in settings for a in ("--set", s)],
            *(["--overwrite"] if state == "restart" else [])]


def refit(run_dir: str | Path) -> dict:
    """Every rank calls it: train RUN_DIR/refit unless it has finished, then add its final
    evaluation to RUN_DIR/summary.json as ``refit`` (rank 0). Returns the run's summary (rank 0;
    {} on the others)."""
    from scbch_dist.train import main as train_main  # the trainer's entry point: it imports this module

    run_dir = Path(run_dir)
    summary, epochs = selected_epochs(run_dir)
    check_saved_config(run_dir / "config.yaml")  # the refit takes the run's settings: refused if edited
    folder = run_dir / REFIT_FOLDER
    if launch_state(folder) != "done":
        train_main(refit_command(run_dir, epochs))
    # the trainer has ended the process group: the launcher's RANK says which process records it
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    return _record(run_dir, summary, epochs)


def _record(run_dir: Path, summary: dict, epochs: int) -> dict:
    """RUN_DIR/summary.json with the refit's final evaluation added as ``refit`` (main process)."""
    folder = run_dir / REFIT_FOLDER
    refitted = read_sealed_json(folder / "summary.json", required=sealed_run(folder))["final"]
    if refitted["epoch"] != epochs:
        raise RunDirError(f"{folder}/summary.json ends at epoch {refitted['epoch']}, not at the selected epoch "
                          f"{epochs}: the refit of another run? (remove {folder} and refit again)")
    summary["refit"] = {"selected_by": SELECTED_BY.format(folder=REFIT_FOLDER), **refitted}
    write_sealed_json(run_dir / "summary.json", summary)
    print(f"refit ({epochs} epochs on every training row): avg {refitted['avg_map']:.4f} (tie-aware "
          f"{refitted['avg_map_tie_aware']:.4f}); selected avg {summary['selected']['avg_map']:.4f} at epoch {epochs}; "
          f"final avg {summary['final']['avg_map']:.4f}. Wrote {run_dir}/summary.json")
    return summary


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
