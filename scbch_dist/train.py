"""Train SCBCH: the entry point and the loop.

    python -m scbch_dist.train [--config configs/X.yaml] [--set key=value ...] [--resume RUN_DIR]
    accelerate launch -m scbch_dist.train --config configs/X.yaml

With no --config, configs/default.yaml (the embedded synthetic dataset) is used. A run writes
run.dir/: config.yaml, log.txt, metrics.jsonl, summary.json, plots/, checkpoints/last.pt, codes.npz
and tensorboard/ (when tensorboard is installed).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from scbch_dist import dist, plots
from scbch_dist.checkpoint import load_checkpoint, save_checkpoint
from scbch_dist.config import Config, flat_dict, load_config, save_config
from scbch_dist.data.format import read_meta
from scbch_dist.data.noise import clean_training_labels, corrupted_rows, training_labels
from scbch_dist.data.pipeline import TrainStream, to_torch
from scbch_dist.data.synthetic import ensure_synthetic
from scbch_dist.data.transforms import make_transforms
from scbch_dist.bank import CodeMemory, knn
from scbch_dist.evaluate import curves, encode_part, evaluate, gather_by_id, save_codes, summarize
from scbch_dist.io import atomic_write_json
from scbch_dist.losses import cscc_bank_rows, scbch_loss, weights_from_neighbors
from scbch_dist.metrics import chance_map, roc_auc
from scbch_dist.models import build_model
from scbch_dist.runlog import MetricsLog, json_safe, setup_logging, tensorboard_available

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


def prepare_dataset(cfg: Config, log) -> tuple[Path, object]:
    """The dataset folder and its meta. With data.generate=synthetic (or shapes) the main process
    writes that embedded dataset on first use, or checks that an existing folder matches the settings."""
    root = Path(cfg.data.root)
    if cfg.data.generate and dist.is_main():
        if not (root / "meta.json").is_file():
            log.info(f"writing the embedded {cfg.data.generate} dataset to {root} (first use)")
        if cfg.data.generate == "shapes":
            from scbch_dist.data.shapes import ensure_shapes

            ensure_shapes(root, cfg.shapes)
        else:
            ensure_synthetic(root, cfg.synthetic)
    dist.barrier()
    return root, read_meta(root)


@torch.no_grad()
def weights_from_bank(z_own: torch.Tensor, own_ids: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor,
                      cfg: Config) -> torch.Tensor:
    """CSCC weights (N,) of every training id, on every rank, from the full bank (N, 2L): each
    rank searches the neighbours of its own ids (rows z_own) and the weights are gathered by id."""
    sims, index = knn(z_own, bank, cfg.cscc.k, self_index=own_ids, backend=cfg.cscc.knn)
    w = weights_from_neighbors(sims / 2, index, labels, own_index=own_ids, gamma=cfg.cscc.gamma)
    return gather_by_id({"id": own_ids, "w": w}, bank.shape[0])["w"]


@torch.no_grad()
def refresh_weights(model, root: Path, meta, cfg: Config, labels: torch.Tensor, device, autocast,
                    transform=None) -> torch.Tensor:
    """CSCC weights of every training id by a fresh encoding pass (DESIGN.md, "Distributed semantics").

    Each rank encodes its part of the training set (model in eval mode); the unit-normalised
    [u, v] rows are gathered by id into one bank on every rank; each rank searches the k nearest
    neighbours of its own ids and computes their weights; the weights are gathered into one table
    by id. With one process this is exactly losses.cscc_weights.
    """
    part = encode_part(model, root, meta, "train", batch_size=cfg.eval.batch_size, device=device,
                       workers=cfg.data.workers, autocast=autocast, transform=transform)
    z = cscc_bank_rows(part["h_img"], part["h_txt"])
    bank = gather_by_id({"id": part["id"], "z": z}, meta.splits["train"].count)["z"]
    return weights_from_bank(z, part["id"], bank, labels, cfg)


@torch.no_grad()
def refresh_from_memory(memory: CodeMemory, labels: torch.Tensor, cfg: Config) -> torch.Tensor:
    """CSCC weights from the codes the training batches left in ``memory`` (cscc.refresh=memory):
    no encoding pass. Rank r searches ids r, r + W, ..."""
    own = torch.arange(dist.rank(), memory.rows.shape[0], dist.world_size(), device=memory.rows.device)
    return weights_from_bank(memory.rows[own], own, memory.rows, labels, cfg)


def training_seed(seed: int, epoch: int, rank: int) -> int:
    """The torch seed of one rank's training epoch (63 bits)."""
    return int(np.random.SeedSequence([seed, epoch, rank, 3]).generate_state(1, np.uint64)[0] >> 1)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator, batch: dict[str, torch.Tensor],
               labels: torch.Tensor, weights: torch.Tensor | None, cfg: Config) -> tuple[dict, dict]:
    """One optimisation step on this rank's rows of the global batch; returns the loss terms
    (this rank's shares) and the model outputs."""
    with accelerator.autocast():
        out = model(batch["img"], batch["txt"], batch.get("txt_mask"))
    terms = scbch_loss(out, labels, weights, margin=cfg.loss.margin, shift=cfg.loss.shift,
                       bsch_weight=cfg.loss.bsch_weight, quant_weight=cfg.loss.quant_weight,
                       cscc_weight=cfg.loss.cscc_weight)
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over ranks, while each rank's loss is its *share* of the global
    # loss: scaling by the world size makes the average the gradient of the global loss.
    accelerator.backward(terms["total"] * accelerator.num_processes)
    optimizer.step()
    return terms, out


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """Adam with L2 weight decay, as the paper; fine-tuned backbones at train.backbone_lr. The fused
    kernel computes the same update in one pass over the parameters: 0.94 s -> 0.10 s per step at
    paper width on 2 CPU cores."""
    groups = model.param_groups(cfg.train.lr, cfg.train.backbone_lr)
    kwargs = dict(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    try:
        return torch.optim.Adam(groups, fused=device.type in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.Adam(groups, **kwargs)


def configure_deepspeed(ds_config: dict, global_batch: int, world: int) -> dict:
    """Fill the batch fields of a DeepSpeed config that Accelerate leaves at "auto" when no
    DataLoader goes through accelerator.prepare (ours is split by rank in webdataset). One
    optimizer step per batch: gradient accumulation stays 1."""
    ds_config["train_micro_batch_size_per_gpu"] = global_batch // world
    ds_config["gradient_accumulation_steps"] = 1
    ds_config["train_batch_size"] = global_batch
    return ds_config


def weight_diagnostics(weights: np.ndarray, corrupted: np.ndarray | None) -> dict:
    out = {"mean": float(weights.mean()), "min": float(weights.min()), "max": float(weights.max())}
    if corrupted is not None and corrupted.any() and (~corrupted).any():
        out.update(clean_mean=float(weights[~corrupted].mean()), corrupted_mean=float(weights[corrupted].mean()),
                   auc=roc_auc(weights, ~corrupted))
    return out


def main(argv: list[str] | None = None) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    args = parse_args(argv)
    cfg = resolve_config(args)
    run_dir = Path(cfg.run.dir)
    use_tb = cfg.run.tensorboard and tensorboard_available()
    # Accelerate keeps its state (mixed precision, ...) for the life of the process; a second run
    # in the same process (a notebook, a test) with another train.mixed_precision must start
    # afresh. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Without cpu=True, Accelerate under torchrun on a machine without CUDA starts the process
    # group yet reports one process per rank; every rank would then act as the main one.
    accelerator = Accelerator(log_with="tensorboard" if use_tb else None, project_dir=str(run_dir),
                              cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision or None)
    device, world, main_proc = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    if dist.world_size() != world:
        raise SystemExit(f"Accelerate sees {world} process(es) but torch.distributed {dist.world_size()}; "
                         "launch with accelerate launch or torchrun and a matching config")
    log = setup_logging(run_dir, main_proc)
    t_start = time.perf_counter()

    if cfg.train.batch_size % world:
        raise SystemExit(f"train.batch_size={cfg.train.batch_size} must divide over {world} processes")
    resume_from = run_dir / "checkpoints" / "last.pt" if args.resume else None
    if resume_from is not None and not resume_from.is_file():
        raise SystemExit(f"--resume {run_dir}: no checkpoints/last.pt")
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and (run_dir / "metrics.jsonl").exists():
            log.warning(f"{run_dir} holds an earlier run; starting afresh (use --resume {run_dir} to continue it)")
            (run_dir / "metrics.jsonl").unlink()
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)

    # ---- data
    t0 = time.perf_counter()
    root, meta = prepare_dataset(cfg, log)
    label_np, noise = training_labels(root, meta, cfg.data.noise, seed=cfg.data.noise_seed)
    clean_np = np.asarray(clean_training_labels(root, meta))
    corrupted = corrupted_rows(clean_np, label_np) if noise.kind != "none" else None
    train_labels = torch.from_numpy(np.array(label_np, dtype=np.uint8)).to(device)
    train_transform, eval_transform, tokenizer = make_transforms(cfg.model, root, meta)
    stream = TrainStream(root=root, meta=meta, batch_size=cfg.train.batch_size // world, seed=cfg.train.seed,
                         rank=accelerator.process_index, world=world, workers=cfg.data.workers,
                         buffer=cfg.data.shuffle_buffer, drop_last=cfg.train.drop_last, transform=train_transform)
    t_data = time.perf_counter() - t0
    n_corrupted = int(corrupted.sum()) if corrupted is not None else 0
    noise_info = {"spec": cfg.data.noise, "name": noise.name, "corrupted_rows": n_corrupted,
                  "rate": round(n_corrupted / meta.splits["train"].count, 4)}
    log.info(f"dataset {meta.name} at {root}: {meta.describe()}; noise {noise.name} "
             f"({noise_info['corrupted_rows']} corrupted training rows)")

    # ---- model
    model = build_model(cfg.model, meta, vocab_size=tokenizer.vocab_size if tokenizer is not None else None)
    optimizer = make_optimizer(model, cfg, device)
    n_train = meta.splits["train"].count
    memory = CodeMemory(n_train, 2 * cfg.model.bits, device) if cfg.cscc.refresh == "memory" else None
    state = {"epoch": 0, "history": [], "weights": None, "refreshes": [], "train_time": 0.0, "samples": 0}
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, None if deepspeed else optimizer, state)
        if memory is not None and state.get("memory") is not None:
            memory.load_state_dict(state["memory"])
        log.info(f"resumed {run_dir} after epoch {state['epoch']}"
                 + (" (DeepSpeed: from the weights as saved, bf16 under bf16 ZeRO; Adam's moments restart)" if deepspeed else ""))
    if deepspeed:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, cfg.train.batch_size, world)
    model, optimizer = accelerator.prepare(model, optimizer)
    n_params = sum(p.numel() for p in model.parameters())
    backbones = accelerator.unwrap_model(model)
    n_backbone = sum(p.numel() for m in (backbones.img_backbone, backbones.txt_backbone) for p in m.parameters())
    log.info(f"model: {cfg.model.bits} bits, hidden {cfg.model.hidden}, {n_params / 1e6:.2f}M parameters "
             f"({n_backbone / 1e6:.2f}M in backbones: image {cfg.model.image.kind}, text {cfg.model.text.kind}); "
             f"{world} process(es) on {device}, precision {accelerator.mixed_precision}; global batch "
             f"{cfg.train.batch_size}, {stream.steps_per_epoch} steps per epoch; CSCC refresh {cfg.cscc.refresh}")

    if use_tb:
        accelerator.init_trackers("tensorboard", config=flat_dict(cfg))
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", accelerator, enabled=main_proc)
    chance = state.get("chance_map")
    weights = state["weights"].to(device) if state["weights"] is not None else None
    t_refresh = t_eval = 0.0

    for epoch in range(state["epoch"], cfg.train.epochs):
        record: dict = {"epoch": epoch + 1}
        # dropout and drop-connect draw from a stream fixed by (seed, epoch, rank), on CPU and CUDA:
        # ranks draw different masks, and a run resumed at an epoch boundary draws what it would have
        torch.manual_seed(training_seed(cfg.train.seed, epoch, accelerator.process_index))
        # ---- CSCC refresh at the start of every epoch after the warm-up
        if epoch >= cfg.cscc.warmup_epochs:
            t0 = time.perf_counter()
            source = "memory" if memory is not None and memory.complete else "pass"
            if source == "memory":
                weights = refresh_from_memory(memory, train_labels, cfg)
            else:  # refresh=pass, or a memory not yet filled by a whole epoch (no warm-up)
                weights = refresh_weights(model, root, meta, cfg, train_labels, device, accelerator.autocast,
                                          eval_transform)
            seconds = time.perf_counter() - t0
            t_refresh += seconds
            w = weights.cpu().numpy()
            diag = {**weight_diagnostics(w, corrupted), "source": source, "seconds": seconds}
            if source == "memory":
                # ids a rank skipped last epoch (uneven shards over ranks, drop_last) keep older rows
                diag["memory_coverage"] = memory.coverage
                if memory.coverage < 1 and main_proc:
                    log.warning(f"epoch {epoch + 1}: CSCC memory refresh: {1 - memory.coverage:.1%} of the "
                                f"training rows are from earlier epochs")
            record["cscc_weights"] = diag
            if main_proc:
                _record_refresh(state, run_dir, epoch + 1, w, corrupted, diag)

        # ---- one epoch
        t0 = time.perf_counter()
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        samples = 0
        bar = tqdm(total=stream.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   disable=not (main_proc and cfg.run.progress), dynamic_ncols=True)
        for batch in stream.epoch(epoch):
            b = to_torch(batch, device)
            terms, out = train_step(model, optimizer, accelerator, b, train_labels[b["id"]],
                                    weights[b["id"]] if weights is not None else None, cfg)
            if memory is not None:
                memory.record(b["id"], cscc_bank_rows(out["h_img"].detach(), out["h_txt"].detach()))
            sums += torch.stack([terms[k].detach().double() for k in ("total", "bsch", "quant", "cscc")])
            samples += len(batch["id"])
            bar.update(1)
        bar.close()
        if memory is not None:
            memory.sync()
        sums = dist.all_reduce_sum(sums) / stream.steps_per_epoch  # shares summed: global per-step loss
        if not torch.isfinite(sums).all():
            raise FloatingPointError(f"epoch {epoch + 1}: the loss is not finite ({sums.tolist()})")
        epoch_time = time.perf_counter() - t0
        state["train_time"] += epoch_time
        state["samples"] += samples * world
        record["loss"] = dict(zip(("total", "bsch", "quant", "cscc"), sums.tolist()))
        record["train"] = {"seconds": epoch_time, "samples_per_s": samples * world / epoch_time}

        # ---- evaluation
        last = epoch + 1 == cfg.train.epochs
        if (epoch + 1) % cfg.eval.every == 0 or last:
            t0 = time.perf_counter()
            result, codes = evaluate(model, root, meta, batch_size=cfg.eval.batch_size, device=device,
                                     topk=cfg.eval.topk, workers=cfg.data.workers, autocast=accelerator.autocast,
                                     transform=eval_transform)
            t_eval += time.perf_counter() - t0
            if main_proc:
                if chance is None:
                    chance = state["chance_map"] = chance_map(codes["query_lab"], codes["database_lab"])
                record["eval"] = summarize(result)
                state["history"].append({"epoch": epoch + 1, **summarize(result), "curves": curves(result)})
                if last and cfg.run.save_codes:
                    save_codes(codes, run_dir / "codes.npz")
                plots.plot_map_history(state["history"], run_dir / "plots" / "map.png", chance)

        metrics_log.write(record, step=epoch + 1)
        log.info(_epoch_line(record, cfg.train.epochs))
        state["epoch"] = epoch + 1
        state["weights"] = weights.cpu() if weights is not None else None
        state["memory"] = memory.state_dict() if memory is not None else None
        if cfg.run.checkpoint:
            save_checkpoint(run_dir / "checkpoints" / "last.pt", accelerator.unwrap_model(model),
                            None if deepspeed else optimizer, state, cfg, is_main=main_proc)
        dist.barrier()

    summary = {}
    if main_proc and state["history"]:
        final = state["history"][-1]
        plots.plot_pr({cfg.run.method: final["curves"]}, run_dir / "plots" / "pr.png",
                      title=f"{meta.name}, {cfg.model.bits} bits, noise {noise.name}, epoch {final['epoch']}")
        best = max(state["history"], key=lambda h: h["avg_map"])
        total = time.perf_counter() - t_start
        summary = {
            "final": final,
            "best": {"selected_by": "avg_map over evaluated epochs (the paper reports this best-over-epochs "
                                    "test mAP; 'final' is the honest last-epoch figure)", **best},
            "chance_map": chance,
            "run": {"dir": str(run_dir), "method": cfg.run.method, "dataset": meta.name, "noise": noise_info,
                    "bits": cfg.model.bits, "epochs": cfg.train.epochs, "seed": cfg.train.seed, "world_size": world,
                    "device": str(device)},
            "cscc": state["refreshes"][-1] if state["refreshes"] else None,
            "timings_s": {"total": total, "data_setup": t_data, "train": state["train_time"],
                          "refresh": t_refresh, "eval": t_eval},
            "throughput": {"train_samples_per_s": state["samples"] / max(state["train_time"], 1e-9),
                           "train_steps_per_s": stream.steps_per_epoch * cfg.train.epochs
                           / max(state["train_time"], 1e-9)},
        }
        atomic_write_json(run_dir / "summary.json", json_safe(summary))
        f, b = summary["final"], summary["best"]
        log.info(f"final (epoch {f['epoch']}): I2T {f['i2t']['map']:.4f}  T2I {f['t2i']['map']:.4f}  "
                 f"avg {f['avg_map']:.4f} (tie-aware {f['avg_map_tie_aware']:.4f}); best avg {b['avg_map']:.4f} "
                 f"at epoch {b['epoch']}; chance {chance:.4f}; {total:.1f} s. Wrote {run_dir}/summary.json")
    accelerator.end_training()
    return summary


def _record_refresh(state: dict, run_dir: Path, epoch: int, w: np.ndarray, corrupted, diag: dict) -> None:
    state["refreshes"].append({"epoch": epoch, **diag})
    if "first_weights" not in state:
        state["first_weights"] = (epoch, w.copy())
    first_epoch, first_w = state["first_weights"]
    panels = [(f"first refresh (epoch {first_epoch})", first_w, corrupted)]
    if epoch != first_epoch:
        panels.append((f"latest refresh (epoch {epoch})", w, corrupted))
    plots.plot_weight_histograms(panels, run_dir / "plots" / "cscc_weights.png")


def _epoch_line(record: dict, epochs: int) -> str:
    loss = record["loss"]
    parts = [f"epoch {record['epoch']}/{epochs}",
             f"loss {loss['total']:.4f} (bsch {loss['bsch']:.4f} quant {loss['quant']:.4f} cscc {loss['cscc']:.4f})",
             f"{record['train']['samples_per_s']:.0f} samples/s"]
    if "cscc_weights" in record:
        w = record["cscc_weights"]
        parts.append(f"weights mean {w['mean']:.3f}" + (f" auc {w['auc']:.3f}" if "auc" in w else ""))
    if "eval" in record:
        e = record["eval"]
        parts.append(f"mAP I2T {e['i2t']['map']:.4f} T2I {e['t2i']['map']:.4f} avg {e['avg_map']:.4f}")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
