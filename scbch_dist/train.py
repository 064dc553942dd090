"""Train a cross-modal hashing method: the entry point.

    python -m scbch_dist.train [--config configs/X.yaml] [--set key=value ...] [--overwrite]
    python -m scbch_dist.train --resume RUN_DIR [--set train.epochs=N ...]
    accelerate launch -m scbch_dist.train --config configs/X.yaml

Known errors (config, data, run folder, checkpoint) print one line and exit 2; a run stopped by
SIGTERM, SIGUSR1 or RUN_DIR/STOP writes a checkpoint and exits 75 (resume it with --resume).

With no --config, configs/default.yaml (the embedded synthetic dataset, shipped in the package) is
used; --config configs/X.yaml (or just X) finds the packaged config X when no such file is here. A run writes
run.dir/: config.yaml, log.txt, metrics.jsonl, summary.json, plots/, checkpoints/, codes.npz and
tensorboard/ (when tensorboard is installed); docs/configuration.md describes each. With
eval.refit, the run then trains again on every row for the epochs its held-out rows selected
(run.dir/refit/, scbch_dist.refit).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from scbch_dist import cli, dist
from scbch_dist.config import (DEFAULT_CONFIG, Config, check_saved_config, flat_dict, load_config, load_run_config,
                               to_dict)
from scbch_dist.engine import rundir, setup
from scbch_dist.engine.rundir import launch_state
from scbch_dist.data.fingerprint import check_same_data
from scbch_dist.engine.checkpoint import load_checkpoint, portable_model_files, read_run_state
from scbch_dist.engine.loop import (EpochProgress, Run, fit, restore_tables, run_tables, write_missing_codes,
                                    write_summary)
from scbch_dist.run import RunFolder
from scbch_dist.engine.preflight import preflight
from scbch_dist.engine.state import RunState
from scbch_dist.engine.stop import StopRequest
from scbch_dist.engine.threads import use_cpu_threads
from scbch_dist.errors import RunDirError, ScbchError
from scbch_dist.engine.runlog import LOGGER_NAME, MetricsLog, setup_logging

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.bits=32 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (its config; --set may change "
                        "only train.epochs, eval.every, eval.topk and run.* output settings)")
    p.add_argument("--from-checkpoint", metavar="NAME",
                   help="with --resume: continue from this kept checkpoint (e.g. epoch-0003) instead of the latest, "
                        "which is then removed with any later ones; for a latest checkpoint found damaged")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run.dir that holds another run, deleting that run's results")
    args = p.parse_args(argv)
    if args.from_checkpoint and not args.resume:
        p.error("--from-checkpoint goes with --resume RUN_DIR")
    return args


def resolve_config(args: argparse.Namespace) -> Config:
    if args.resume:
        run_dir = Path(args.resume)
        if args.config:
            raise RunDirError(f"--resume {run_dir} takes the run's own config.yaml; drop --config {args.config} "
                              "(a new config is a new run: give it another run.dir)")
        if args.overwrite:
            raise RunDirError("--resume and --overwrite contradict each other: continue the run, or start afresh")
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"--resume {run_dir}: no config.yaml there (not a run folder)")
        # its digest checked, an earlier version's layout migrated (config.migrate)
        return load_run_config(run_dir / "config.yaml", [*args.set, f"run.dir={run_dir}"])
    return load_config(args.config or DEFAULT_CONFIG, args.set)


def finished_as_asked(args: argparse.Namespace, cfg: Config, run_dir: Path) -> bool:
    """A resume with no setting given, of a run that has its summary, its codes (where it writes
    them) and the checkpoint of its last epoch: nothing to train, evaluate or write. Such a resume
    rewrote summary.json (its time that of the resume) and added TensorBoard files."""
    folder = RunFolder(run_dir)
    if not args.resume or args.set or args.from_checkpoint or not folder.finished:
        return False
    if cfg.run.save_codes and not folder.codes.is_file():
        return False  # the documented way to write a finished run's codes
    try:
        _, state, _ = read_run_state(run_dir)
    except (OSError, ScbchError):
        return False  # the resume itself names what is wrong
    return state.partial is None and state.epoch >= cfg.train.epochs


def may_generate(args: argparse.Namespace) -> bool:
    """Whether data.generate may write its embedded dataset at data.root: where the config that asks
    for it names, or where --set data.generate asks for it. A --set data.root alone points at the
    user's own data: an empty or mistyped folder is then an error, never filled with synthetic data."""
    keys = {text.split("=", 1)[0].strip() for text in args.set}
    return "data.generate" in keys or "data.root" not in keys


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    cfg, precision_note = setup.resolve_precision(resolve_config(args), os.environ.get(setup.LAUNCHER_PRECISION))
    run_dir = Path(cfg.run.dir)
    if args.resume and rundir.refit_pending(run_dir):  # finished; its refit (eval.refit) was stopped or not begun
        return refit(run_dir)
    if finished_as_asked(args, cfg, run_dir):
        print(f"python -m scbch_dist.train: {run_dir} finished its {cfg.train.epochs} epochs already "
              f"({RunFolder(run_dir).summary}); nothing to do (extend it with --set train.epochs=N)", file=sys.stderr)
        return RunFolder(run_dir).read_summary()
    method_class = setup.method_class(cfg)
    accelerator = setup.make_accelerator(cfg, run_dir)
    is_main = accelerator.is_main_process
    log = setup_logging(None, is_main)  # the console only, until the folder is ours
    lock, refused, refit_follows = None, None, False
    if is_main:
        try:
            lock = rundir.lock_and_prepare(run_dir, cfg, resume=bool(args.resume), overwrite=args.overwrite,
                                           safe=rundir.safe_keys(method_class), log=log,
                                           from_checkpoint=args.from_checkpoint)
        except ScbchError as e:
            refused = e
    dist.raise_together(refused, f"the main process refused {run_dir} (its message is above)")
    try:
        log = setup_logging(run_dir, is_main)
        with StopRequest(run_dir, is_main=is_main) as stop:
            summary = _train(args, cfg, run_dir, method_class, accelerator, log, stop, t_start, precision_note)
        # every rank leaves together: a rank that tears down its process group while the main one still
        # writes the summary aborts at exit now and then ("terminate called without an active exception")
        dist.barrier()
        refit_follows = cfg.eval.refit and cfg.eval.validation > 0
    except BaseException:
        if lock is not None and not args.resume:
            logging.getLogger(LOGGER_NAME).handlers.clear()  # log.txt closed before it may go
            rundir.discard_unfinished(run_dir)
        elif lock is not None:
            rundir.restore_config_of_unstarted_resume(run_dir, lock)
        raise
    finally:
        if refit_follows:  # the refit's trainer takes the process group over (and ends it)
            for tracker in accelerator.trackers:
                tracker.finish()
        else:
            accelerator.end_training()
        if lock is not None:
            lock.release()
    return refit(run_dir) if refit_follows else summary


def _train(args, cfg: Config, run_dir: Path, method_class, accelerator, log, stop: StopRequest, t_start: float,
           precision_note: str = "") -> dict:
    log.info(f"threads: {use_cpu_threads()}")
    t_data = time.perf_counter()
    data = setup.build_data(cfg, accelerator, log, may_generate=may_generate(args))
    # the training stream's loader workers (data.workers > 0) serve every epoch; stopped when the
    # run ends, however it ends, so none outlives it (or holds up the interpreter's exit)
    with data.stream:
        if args.resume:
            check_same_dataset(run_dir, data, accelerator.is_main_process, log)
        method = method_class(cfg, data.train)
        preflight(cfg, data, method, accelerator, log)
        t_data = time.perf_counter() - t_data
        model = setup.build_network(method_class, cfg, data.meta, data.vocab_size)
        model, optimizer = setup.prepare(accelerator, model, setup.make_optimizer(model, cfg, accelerator.device), cfg)
        portable_model_files(accelerator)
        bank = setup.build_bank(cfg, data, model, accelerator, log)
        run = Run(cfg, accelerator, data, model, optimizer, method, bank, run_dir, log,
                  MetricsLog(run_dir / "metrics.jsonl", accelerator, enabled=accelerator.is_main_process), stop)

        state, resumed = RunState(dataset=data.fingerprint), None
        if args.resume:
            state, tables, rank_state = load_checkpoint(accelerator, run_dir)
            restore_tables(run, tables)
            if rank_state is not None:
                resumed = EpochProgress.resumed(state.partial, rank_state, run_tables(run), accelerator.device)
            log.info(f"resumed {run_dir} after epoch {state.epoch}"
                     + (f" and step {state.partial['step']} of epoch {state.epoch + 1}" if state.partial else ""))
            if accelerator.is_main_process:  # everything is checked: the run goes on
                rundir.set_summary_aside(run_dir, state.epoch, log)
        setup.log_model(run, precision_note)
        if accelerator.log_with:
            accelerator.init_trackers("tensorboard", config=flat_dict(cfg))

        state = fit(run, state, to_dict(cfg), resumed)
        write_missing_codes(run, state)
        return write_summary(run, state, time.perf_counter() - t_start, t_data)


def check_same_dataset(run_dir: Path, data: setup.TrainingData, is_main: bool, log: logging.Logger) -> None:
    """Collective: a resume refuses a dataset that differs from the one the run began with."""
    error = None
    if is_main:
        try:
            _, state, _ = read_run_state(run_dir)
            if not check_same_data(state.dataset, data.fingerprint, data.root, run_dir):
                log.warning(f"{run_dir}: the checkpoint records no dataset fingerprint (an earlier version's); the "
                            "dataset is not checked against the one the run began with")
        except ScbchError as e:
            error = e
    dist.raise_together(error, f"the main process refused to resume {run_dir} (its message is above)")


# -- refit after selection (eval.refit; python -m scbch_dist.refit) ------------------------------

SELECTED_BY = ("the final evaluation of a second run on every training row (held-out ones included) for the "
               "epochs 'selected' chose ({folder}/)")


def selected_epochs(run_dir: Path) -> tuple[dict, int]:
    """The run's summary and the epoch its held-out rows selected; a one-line error where there is
    none to refit from."""
    folder = RunFolder(run_dir)
    path = folder.summary
    if not folder.finished:
        raise RunDirError(f"{run_dir}: no {folder.SUMMARY}; the run has not finished (resume it first: "
                          f"python -m scbch_dist.train --resume {run_dir})")
    summary = folder.read_summary()
    if not summary.get("selected"):
        raise RunDirError(f"{path}: no 'selected' evaluation (the run held no rows out: eval.validation 0), so no "
                          "epoch to refit for")
    return summary, int(summary["selected"]["epoch"])


def refit_command(run_dir: Path, epochs: int) -> list[str]:
    """scbch_dist.train's arguments for RUN_DIR/refit: a fresh run from the run's config, or the
    resume of one that was stopped."""
    folder = RunFolder(run_dir).refit.path
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
    run_dir = Path(run_dir)
    summary, epochs = selected_epochs(run_dir)
    check_saved_config(run_dir / "config.yaml")  # the refit takes the run's settings: refused if edited
    folder = RunFolder(run_dir).refit.path
    if launch_state(folder) != "done":
        main(refit_command(run_dir, epochs))
    # the trainer has ended the process group: the launcher's RANK says which process records it
    if int(os.environ.get("RANK", "0")) != 0:
        return {}
    return _record(run_dir, summary, epochs)


def _record(run_dir: Path, summary: dict, epochs: int) -> dict:
    """RUN_DIR/summary.json with the refit's final evaluation added as ``refit`` (main process)."""
    run = RunFolder(run_dir)
    folder = run.refit
    refitted = folder.read_summary()["final"]
    if refitted["epoch"] != epochs:
        raise RunDirError(f"{folder.summary} ends at epoch {refitted['epoch']}, not at the selected epoch "
                          f"{epochs}: the refit of another run? (remove {folder.path} and refit again)")
    summary["refit"] = {"selected_by": SELECTED_BY.format(folder=RunFolder.REFIT), **refitted}
    run.write_summary(summary)
    print(f"refit ({epochs} epochs on every training row): avg {refitted['avg_map']:.4f} (tie-aware "
          f"{refitted['avg_map_tie_aware']:.4f}); selected avg {summary['selected']['avg_map']:.4f} at epoch {epochs}; "
          f"final avg {summary['final']['avg_map']:.4f}. Wrote {run.summary}")
    return summary


def console() -> None:
    """The ``scbch-train`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-train")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.train")
