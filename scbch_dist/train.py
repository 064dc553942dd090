"""Train a cross-modal hashing method: the entry point.

    python -m scbch_dist.train [--config configs/X.yaml] [--set key=value ...] [--resume RUN_DIR]
    accelerate launch -m scbch_dist.train --config configs/X.yaml

With no --config, configs/default.yaml (the embedded synthetic dataset) is used. A run writes
run.dir/: config.yaml, log.txt, metrics.jsonl, summary.json, plots/, checkpoints/, codes.npz and
tensorboard/ (when tensorboard is installed); docs/configuration.md describes each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from scbch_dist.config import Config, flat_dict, load_config, to_dict
from scbch_dist.engine import setup
from scbch_dist.engine.checkpoint import CheckpointError, load_checkpoint, portable_model_files
from scbch_dist.engine.loop import Run, fit, restore_tables, write_summary
from scbch_dist.engine.state import RunState
from scbch_dist.runlog import MetricsLog, setup_logging

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.bits=32 (repeatable)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint (its config, then --set)")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise SystemExit(f"--resume {run_dir}: no config.yaml there (not a run folder)")
        return load_config(run_dir / "config.yaml", [*args.set, f"run.dir={run_dir}"])
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    return load_config(path, args.set)


def main(argv: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    args = parse_args(argv)
    cfg = resolve_config(args)
    run_dir = Path(cfg.run.dir)
    method_class = setup.method_class(cfg)
    accelerator = setup.make_accelerator(cfg, run_dir)
    log = setup_logging(run_dir, accelerator.is_main_process)
    setup.prepare_run_dir(run_dir, cfg, resume=bool(args.resume), is_main=accelerator.is_main_process, log=log)

    t_data = time.perf_counter()
    data = setup.build_data(cfg, accelerator, log)
    t_data = time.perf_counter() - t_data
    method = method_class(cfg, data.train)
    model = setup.build_network(cfg, data, method)
    model, optimizer = setup.prepare(accelerator, model, setup.make_optimizer(model, cfg, accelerator.device), cfg)
    portable_model_files(accelerator)
    bank = setup.build_bank(cfg, data, model, accelerator, log)
    run = Run(cfg, accelerator, data, model, optimizer, method, bank, run_dir, log,
              MetricsLog(run_dir / "metrics.jsonl", accelerator, enabled=accelerator.is_main_process))

    state = RunState()
    if args.resume:
        try:
            state, tables, _ = load_checkpoint(accelerator, run_dir)
            restore_tables(run, tables)
        except CheckpointError as e:
            raise SystemExit(f"--resume {run_dir}: {e}") from None
        log.info(f"resumed {run_dir} after epoch {state.epoch}")
    setup.log_model(run)
    if accelerator.log_with:
        accelerator.init_trackers("tensorboard", config=flat_dict(cfg))

    state = fit(run, state, to_dict(cfg))
    summary = write_summary(run, state, time.perf_counter() - t_start, t_data)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
