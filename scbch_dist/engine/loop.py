"""The training loop (docs/engine.md): per epoch, the method's start hook, the steps, the exchange of
per-id tables, the end hook, evaluation, the metrics record and a checkpoint.

Each epoch's data order, augmentation and dropout are functions of (seed, epoch, rank), so a run
resumed at an epoch boundary continues exactly as an uninterrupted one; a checkpoint taken inside
an epoch (preemption) skips the batches already trained and restores the RNG state after them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from tqdm.auto import tqdm

from scbch_dist import dist, plots
from scbch_dist.config import Config, to_dict
from scbch_dist.data.pipeline import to_torch
from scbch_dist.engine.bank import BankSource
from scbch_dist.engine.checkpoint import CheckpointError, model_fingerprint, save_checkpoint
from scbch_dist.engine.scoring import curves, encode_and_score, encode_codes, protocol, summarize, validate
from scbch_dist.engine.setup import TrainingData
from scbch_dist.engine.state import RunState
from scbch_dist.engine.stop import StopRequest
from scbch_dist.errors import Preempted, ScbchError
from scbch_dist.methods import EpochContext, Method, Step
from scbch_dist.run import RunFolder
from scbch_dist.metrics import chance_map
from scbch_dist.engine.runlog import MetricsLog, json_safe
from scbch_dist.id_table import IdTable


@dataclass
class Run:
    """The objects one training run works with."""

    cfg: Config
    accelerator: object
    data: TrainingData
    model: torch.nn.Module  # prepared (DDP / DeepSpeed as launched)
    optimizer: torch.optim.Optimizer
    method: Method
    bank: BankSource
    run_dir: Path
    log: logging.Logger
    metrics: MetricsLog
    stop: StopRequest

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


class EvaluationError(ScbchError):
    """An evaluation whose result would be meaningless (no query with a relevant item)."""


def training_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one rank's training epoch (63 bits)."""
    return int(np.random.SeedSequence([seed, epoch, rank, 3]).generate_state(1, np.uint64)[0] >> 1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator, batch: dict[str, torch.Tensor],
               method: Method, step: Step) -> tuple[dict, dict]:
    """One optimisation step on this rank's rows of the global batch; returns the loss terms
    (this rank's shares) and the model outputs."""
    with accelerator.autocast():
        out = model(batch["img"], batch["txt"], batch.get("txt_mask"))
    check_finite(out, step, "the model's outputs")  # before the loss, whose functions fail on NaN in their own words
    terms = method.loss(out, step)
    check_finite({"loss": terms["total"]}, step, "the loss")
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over ranks, while each rank's loss is its *share* of the global
    # loss: scaling by the world size makes the average the gradient of the global loss.
    accelerator.backward(terms["total"] * accelerator.num_processes)
    optimizer.step()
    return terms, out


class DivergedError(ScbchError):
    """The training diverged: a step's outputs or loss are not finite (a learning rate far too large)."""


def check_finite(tensors: dict, step: Step, what: str) -> None:
    """Refuse to go on from a step whose floating tensors hold NaN or infinity: every later step
    would train on them, and the losses' own checks fail in words that do not say why."""
    floats = {name: t.detach() for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()}
    if not floats:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in floats.values()])
    if bool(finite.all()):  # one device sync a step, not one per tensor
        return
    bad = [name for name, ok in zip(floats, finite.tolist()) if not ok]
    raise DivergedError(f"the training diverged in epoch {step.epoch + 1}: {what} ({', '.join(bad)}) are not finite; "
                        "start again with a smaller train.lr, or resume from an earlier checkpoint with "
                        "--from-checkpoint")


@dataclass
class EpochProgress:
    """How far this rank is into an epoch: what a checkpoint taken inside it carries."""

    epoch: int  # 0-based
    record: dict  # the epoch_start hook's record entries
    sums: torch.Tensor  # (terms,) float64: this rank's loss shares summed over its steps
    step: int = 0  # steps done
    samples: int = 0  # this rank's samples
    seconds: float = 0.0

    def shared(self, world: int) -> dict:
        """What every rank agrees on: RunState.partial."""
        return {"epoch": self.epoch, "step": self.step, "record": self.record, "seconds": self.seconds, "world": world}

    def rank_state(self, tables: dict[str, IdTable]) -> dict[str, torch.Tensor]:
        """This rank's own part: its sums and samples, and the table rows it wrote this epoch."""
        out = {"progress.sums": self.sums.cpu(), "progress.samples": torch.tensor(self.samples)}
        for name, table in tables.items():
            out.update({f"{name}.pending.{k}": v for k, v in table.pending_state().items()})
        return out

    @classmethod
    def resumed(cls, partial: dict, rank_state: dict[str, torch.Tensor], tables: dict[str, IdTable],
                device: torch.device) -> "EpochProgress":
        for name, table in tables.items():
            table.load_pending({k: rank_state[f"{name}.pending.{k}"] for k in ("ids", "rows")})
        return cls(partial["epoch"], dict(partial["record"]), rank_state["progress.sums"].to(device),
                   partial["step"], int(rank_state["progress.samples"]), partial["seconds"])


def train_one_epoch(run: Run, progress: EpochProgress) -> dict | None:
    """The epoch's steps from ``progress.step`` on. Returns its record entries (mean loss terms of
    the global batch, seconds, samples/s) and, under ``"samples"``, the samples all ranks trained
    on; or None when a stop request ended it after a step inside the epoch."""
    cfg, method, stream, epoch = run.cfg, run.method, run.data.stream, progress.epoch
    t0 = time.perf_counter()
    run.model.train()
    bar = tqdm(total=stream.steps_per_epoch, initial=progress.step, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
               leave=False, dynamic_ncols=True,
               # None: drawn on a terminal only; a redirected log gets the one line per epoch below
               disable=None if run.is_main and cfg.run.progress else True)
    for index, batch in enumerate(stream.epoch(epoch)):
        if index < progress.step:
            continue  # trained before the checkpoint: the order is a function of (seed, epoch, rank)
        b = to_torch(batch, run.accelerator.device)
        step = Step(epoch, b["id"], run.data.train.labels[b["id"]])
        terms, out = train_step(run.model, run.optimizer, run.accelerator, b, method, step)
        detached = {k: v.detach() for k, v in out.items()}
        method.after_batch(detached, step)
        run.bank.record(b["id"], detached)
        progress.sums += torch.stack([terms[k].detach().double() for k in method.terms])
        progress.samples += len(batch["id"])
        progress.step += 1
        bar.update(1)
        if progress.step < stream.steps_per_epoch and run.stop.agreed():
            bar.close()
            progress.seconds += time.perf_counter() - t0
            return None
    bar.close()
    for table in run_tables(run).values():
        table.sync()
    sums = dist.all_reduce_sum(progress.sums) / stream.steps_per_epoch  # shares summed: global per-step loss
    if not torch.isfinite(sums).all():
        raise FloatingPointError(f"epoch {epoch + 1}: the loss is not finite ({dict(zip(method.terms, sums.tolist()))})")
    seconds = progress.seconds + time.perf_counter() - t0
    world = run.accelerator.num_processes
    return {"loss": dict(zip(method.terms, sums.tolist())),
            "train": {"seconds": seconds, "samples_per_s": progress.samples * world / seconds},
            "samples": progress.samples * world}


def evaluates(cfg: Config, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) ends with an evaluation: every eval.every epochs and the last."""
    return (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.train.epochs


def epoch_context(run: Run, epoch: int) -> EpochContext:
    return EpochContext(epoch=epoch, epochs=run.cfg.train.epochs, train=run.data.train, bank=run.bank.build,
                        run_dir=run.run_dir, is_main=run.is_main, evaluates=evaluates(run.cfg, epoch))


def evaluate_epoch(run: Run, state: RunState, epoch: int) -> dict | None:
    """Query against database in both directions; on the main process, the history, the mAP plot
    and (after the last epoch) the codes. Returns the record's "eval" entry (main process)."""
    cfg, data = run.cfg, run.data
    t0 = time.perf_counter()
    result, codes = encode_and_score(run.model, data.root, data.meta, batch_size=cfg.eval.batch_size,
                             device=run.accelerator.device, topk=cfg.eval.topk, workers=cfg.data.workers,
                             autocast=run.accelerator.autocast, transform=data.eval_transform)
    validation = None
    if data.held_out is not None:
        validation = validate(run.model, data.root, data.meta, data.held_out, data.train.labels.cpu().numpy(),
                              select=cfg.eval.select, batch_size=cfg.eval.batch_size, device=run.accelerator.device, workers=cfg.data.workers,
                              autocast=run.accelerator.autocast, transform=data.eval_transform)
    state.eval_seconds += time.perf_counter() - t0
    if not run.is_main:
        return None
    if result["i2t"]["num_queries_scored"] == 0:  # the preflight refuses this data; a guard for data.verify=false
        raise EvaluationError(f"epoch {epoch + 1}: no query of {data.root} has a relevant database item (no shared "
                              "label): every mAP is undefined; check the labels of the query and database splits")
    if state.chance_map is None:
        state.chance_map = chance_map(codes["query_lab"], codes["database_lab"])
    headline = summarize(result)
    if validation is not None:
        headline["validation"] = validation
    state.history.append({"epoch": epoch + 1, **headline, "curves": curves(result)})
    if epoch + 1 == cfg.train.epochs and cfg.run.save_codes:
        save_final_codes(run, codes)
    plots.plot_map_history(state.history, run.run_dir / "plots" / "map.png", state.chance_map,
                           title=f"{run.run_dir.name}: {data.meta.name}, {cfg.model.bits} bits, noise {data.noise.name}")
    return headline


def save_final_codes(run: Run, codes: dict) -> None:
    """codes.npz of the trained model (main process), naming the model and the config."""
    weights = run.accelerator.unwrap_model(run.model).state_dict()
    RunFolder(run.run_dir).write_codes(codes, model_sha256=model_fingerprint(weights), config=to_dict(run.cfg),
                                       precision=run.accelerator.mixed_precision)


def write_missing_codes(run: Run, state: RunState) -> None:
    """Collective: codes.npz for a finished run that has none (a run resumed with
    run.save_codes=true after it ended without codes): the final model's codes, by a new
    encoding pass (its metrics are those already recorded, so none are computed)."""
    wanted = run.cfg.run.save_codes and state.epoch == run.cfg.train.epochs
    path = RunFolder(run.run_dir).codes
    if not dist.any_rank(wanted and run.is_main and not path.is_file()):
        return
    run.log.info(f"writing {path} (the run had none): encoding query and database")
    cfg, data = run.cfg, run.data
    codes = encode_codes(run.model, data.root, data.meta, batch_size=cfg.eval.batch_size, device=run.accelerator.device,
                         workers=cfg.data.workers, autocast=run.accelerator.autocast, transform=data.eval_transform)
    if run.is_main:
        save_final_codes(run, codes)


def run_tables(run: Run) -> dict[str, IdTable]:
    """Every per-id table of the run by checkpoint name: the method's, and the memory bank."""
    tables = {f"method.{name}": t for name, t in run.method.tables().items()}
    if run.bank.memory is not None:
        tables["memory"] = run.bank.memory
    return tables


def checkpoint_tables(run: Run) -> dict[str, torch.Tensor]:
    """Every per-id table, flattened for one safetensors file."""
    return {f"{name}.{k}": v for name, t in run_tables(run).items() for k, v in t.state_dict().items()}


def restore_tables(run: Run, flat: dict[str, torch.Tensor]) -> None:
    """The tables of a checkpoint. The method's must be there; the memory fills itself again
    (a refresh encodes the training set until it holds every id)."""
    for name, table in run_tables(run).items():
        state = {k[len(name) + 1:]: v for k, v in flat.items() if k.startswith(name + ".")}
        if state:
            table.load_state_dict(state)
        elif name.startswith("method."):
            raise CheckpointError(f"the checkpoint holds no table {name!r} (written by another method?)")


def fit(run: Run, state: RunState, config: dict, resumed: EpochProgress | None = None) -> RunState:
    """Train from ``state.epoch`` (and ``resumed``, an epoch begun before a checkpoint) to
    train.epochs; ``config`` (the resolved config) goes into every checkpoint. A stop request
    (run.stop) ends the run with a checkpoint and errors.Preempted."""
    cfg = run.cfg
    for epoch in range(state.epoch, cfg.train.epochs):
        if resumed is not None and resumed.epoch == epoch:
            progress = resumed
            run.log.info(f"continuing epoch {epoch + 1} after step {progress.step} of {run.data.stream.steps_per_epoch}")
        else:
            progress = start_epoch(run, state, epoch)
        result = train_one_epoch(run, progress)
        if result is not None:
            finish_epoch(run, state, progress, result)
            if checkpoint_due(cfg, state.epoch):
                save(run, state, config)
            dist.barrier()
        # a stop request ends the run after a step inside an epoch (train_one_epoch returned None, on
        # every rank alike) or after any epoch but the last; agreed() is a collective, so every rank
        # asks it at the same point
        if result is None or (state.epoch < cfg.train.epochs and run.stop.agreed()):
            stop_with_checkpoint(run, state, config, progress if result is None else None)
    return state


def checkpoint_due(cfg, epochs_done: int) -> bool:
    """Whether fit writes a checkpoint at the end of epoch ``epochs_done`` (1-based): run.checkpoint
    on, and every run.checkpoint_every-th epoch or the last."""
    return cfg.run.checkpoint and (epochs_done % cfg.run.checkpoint_every == 0 or epochs_done == cfg.train.epochs)


def start_epoch(run: Run, state: RunState, epoch: int) -> EpochProgress:
    """The method's epoch_start hook, and the progress of the epoch about to start."""
    # dropout and drop-connect draw from a stream fixed by (seed, epoch, rank), on CPU and CUDA:
    # ranks draw different masks, and a run resumed at an epoch boundary draws what it would
    # have (inside an epoch, the checkpoint's RNG state continues it)
    torch.manual_seed(training_seed(run.cfg.train.seed, epoch, run.accelerator.process_index))
    t0 = time.perf_counter()
    diagnostics = run.method.epoch_start(epoch_context(run, epoch))
    state.hook_seconds += time.perf_counter() - t0
    return EpochProgress(epoch, diagnostics, torch.zeros(len(run.method.terms), dtype=torch.float64,
                                                         device=run.accelerator.device))


def finish_epoch(run: Run, state: RunState, progress: EpochProgress, result: dict) -> None:
    """After an epoch's last step: the method's epoch_end hook, the evaluation (when due), the
    metrics record and the log line; ``state.epoch`` becomes the epochs done."""
    cfg, method, epoch = run.cfg, run.method, progress.epoch
    state.partial = None
    state.samples += result.pop("samples")
    state.train_seconds += result["train"]["seconds"]
    record: dict = {"epoch": epoch + 1, **progress.record, **result}

    t0 = time.perf_counter()
    record.update(method.epoch_end(epoch_context(run, epoch)))
    state.hook_seconds += time.perf_counter() - t0
    if any(k not in ("epoch", "loss", "train") for k in record):
        state.diagnostics.append({k: v for k, v in record.items() if k not in ("loss", "train")})

    if evaluates(cfg, epoch):
        evaluation = evaluate_epoch(run, state, epoch)
        if evaluation is not None:
            record["eval"] = evaluation
    run.metrics.write(record, step=epoch + 1)
    run.log.info(epoch_line(record, cfg.train.epochs, method))
    state.epoch = epoch + 1


def stop_with_checkpoint(run: Run, state: RunState, config: dict, unfinished: EpochProgress | None) -> NoReturn:
    """The run's one exit on a stop request (collective): a checkpoint of where it stands, the STOP
    file removed, then errors.Preempted. ``unfinished``: the epoch it stopped inside, whose
    checkpoint carries each rank's part of it; None at an epoch's end, where fit has already
    written the checkpoint when one was due (checkpoint_due)."""
    if unfinished is not None:
        state.partial = unfinished.shared(run.accelerator.num_processes)
        save(run, state, config, unfinished.rank_state(run_tables(run)))
        where = f"step {unfinished.step} of epoch {unfinished.epoch + 1}"
    else:
        if not checkpoint_due(run.cfg, state.epoch):
            save(run, state, config)
        where = f"epoch {state.epoch}"
    run.stop.served()
    raise Preempted(f"stopped by {run.stop.describe()} after {where}; checkpoint written; "
                    f"continue with --resume {run.run_dir}", requeue=run.stop.requeue)


def save(run: Run, state: RunState, config: dict, rank_state: dict[str, torch.Tensor] | None = None) -> None:
    """A checkpoint of the run as it stands (collective); it records how long log.txt was, so a
    resume cuts the log back to it."""
    log_file = RunFolder(run.run_dir).log
    state.log_bytes = log_file.stat().st_size if run.is_main and log_file.is_file() else None
    save_checkpoint(run.accelerator, run.run_dir, state, checkpoint_tables(run), config, rank_state,
                    run.cfg.run.keep_checkpoints)


def epoch_line(record: dict, epochs: int, method: Method) -> str:
    loss = record["loss"]
    terms = " ".join(f"{k} {v:.4f}" for k, v in loss.items() if k != "total")
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {loss['total']:.4f}" + (f" ({terms})" if terms else ""),
             f"{record['train']['samples_per_s']:.0f} samples/s"]
    described = method.describe(record)
    if described:
        parts.append(described)
    if "eval" in record:
        e = record["eval"]
        parts.append(f"mAP I2T {e['i2t']['map']:.4f} T2I {e['t2i']['map']:.4f} avg {e['avg_map']:.4f}")
        if "validation" in e:
            v = e["validation"]
            parts.append(f"validation labels {v['avg_map']:.4f} pairs {v['pairs']['avg']:.4f}")
    return " | ".join(parts)


def write_summary(run: Run, state: RunState, seconds_total: float, seconds_data: float) -> dict:
    """summary.json (main process): final and best evaluations, chance, the method's last
    diagnostics, timings and throughput; the PR plot of the final evaluation."""
    cfg, data = run.cfg, run.data
    if not (run.is_main and state.history):
        return {}
    final = state.history[-1]
    label = cfg.run.method or run.method.label or cfg.method.name  # a method without a label goes by its name
    plots.plot_pr({label: final["curves"]}, run.run_dir / "plots" / "pr.png",
                  title=f"{data.meta.name}, {cfg.model.bits} bits, noise {data.noise.name}, epoch {final['epoch']}")
    best = max(state.history, key=lambda h: h["avg_map"])
    validated = [h for h in state.history if "validation" in h]
    selected = max(validated, key=lambda h: h["validation"]["score"]) if validated else None
    steps = data.stream.steps_per_epoch * state.epoch
    summary = {
        "final": final,
        "best": {"selected_by": "avg_map over evaluated epochs (the paper reports this best-over-epochs "
                                "test mAP; 'final' is the honest last-epoch figure)", **best},
        **({"selected": {"selected_by": f"the validation score ({cfg.eval.select}) over evaluated epochs "
                                         "(eval.validation held-out training rows; no test data)", **selected}}
           if selected is not None else {}),
        "protocol": protocol(data.meta.splits["query"].count, data.meta.splits["database"].count, cfg.eval.topk),
        "chance_map": state.chance_map,
        "run": {"dir": str(run.run_dir), "method": label, "method_name": cfg.method.name,
                "dataset": data.meta.name, "noise": data.noise_info(), "bits": cfg.model.bits,
                "epochs": cfg.train.epochs, "seed": cfg.train.seed, "world_size": run.accelerator.num_processes,
                "device": str(run.accelerator.device), "precision": run.accelerator.mixed_precision},
        "diagnostics": state.diagnostics[-1] if state.diagnostics else None,
        "timings_s": {"total": seconds_total, "data_setup": seconds_data, "train": state.train_seconds,
                      "refresh": state.hook_seconds, "eval": state.eval_seconds,
                      # the method's cost: its steps and epoch hooks, without the evaluations
                      "per_epoch": (state.train_seconds + state.hook_seconds) / max(state.epoch, 1)},
        "throughput": {"train_samples_per_s": state.samples / max(state.train_seconds, 1e-9),
                       "train_steps_per_s": steps / max(state.train_seconds, 1e-9)},
    }
    folder = RunFolder(run.run_dir)
    folder.write_summary(json_safe(summary))  # report and index check verify it
    f, b = summary["final"], summary["best"]
    run.log.info(f"final (epoch {f['epoch']}): I2T {f['i2t']['map']:.4f}  T2I {f['t2i']['map']:.4f}  "
                 f"avg {f['avg_map']:.4f} (tie-aware {f['avg_map_tie_aware']:.4f}); best avg {b['avg_map']:.4f} "
                 f"at epoch {b['epoch']}" + (f"; selected by validation: avg {selected['avg_map']:.4f} at epoch "
                                             f"{selected['epoch']}" if selected is not None else "")
                 + f"; chance {state.chance_map:.4f}; {seconds_total:.1f} s. "
                 f"Wrote {folder.summary}")
    return summary
