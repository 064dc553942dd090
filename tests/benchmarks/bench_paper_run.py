"""Wall time of one paper-width MIRFlickr-format run: ours against the published implementation.

    python -m scbch_dist.data.convert mirflickr --src DIR --out shards/mirflickr25k
    python tests/benchmarks/bench_paper_run.py --root shards/mirflickr25k [--hidden 8192] [--epochs 50] [--bf16]

A full 50-epoch run at width 8192 takes hours on a 2-core CPU, so this measures every component
of a run on this machine and projects the total:
- ours: a training step (our stream, fused Adam), one CSCC refresh, one evaluation (encoding +
  every metric), with evaluation every ``--eval-every`` epochs; with ``--bf16`` a second column,
  the same with the forward passes (training, refresh and evaluation encoding) under bf16
  autocast, as ``train.mixed_precision: bf16`` runs them;
- published: the behaviour of the published code, re-created for timing: samples read one by one
  through a DataLoader (batch 128, 2 workers), two plain Adam optimizers, and at every epoch an
  evaluation that encodes query and database, runs a per-query sort loop for mAP in both
  directions and a precision-recall curve of 15 top-k points that re-sorts every query for each
  point. The model, the loss and the refresh are the same as ours. Its sample loading is
  measured but not charged (its workers could overlap with compute), which favours it.
Prints the measured components and the projected totals. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from scbch_dist.config import load_config
from scbch_dist.data.format import read_meta
from scbch_dist.data.noise import training_labels
from scbch_dist.data.pipeline import TrainStream, load_split, to_torch
from scbch_dist.engine.scoring import evaluate
from scbch_dist.losses import scbch_loss
from scbch_dist.models import SCBCHModel
from scbch_dist.engine.bank import BankSource
from scbch_dist.engine.encode import encode_part
from scbch_dist.engine.setup import keep_freed_memory, make_optimizer
from scbch_dist.methods import SCBCH, EpochContext, TrainingSet
from scbch_dist.engine.runlog import setup_logging


def time_steps(step, batches, warmup=2):
    for b in batches[:warmup]:
        step(b)
    t = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    return (time.perf_counter() - t) / (len(batches) - warmup)


def fastest_of_two(fn):
    """The faster of two calls of ``fn`` in seconds (the first alone would pay for reading the shards
    cold), and the last call's result."""
    seconds = []
    for _ in range(2):
        t = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - t)
    return min(seconds), result


class PerSample(Dataset):
    """Rows held as float64 arrays and converted per item, as the published data list does."""

    def __init__(self, split):
        self.img, self.txt, self.lab = (split[k].astype(np.float64) for k in ("img", "txt", "lab"))

    def __len__(self):
        return len(self.lab)

    def __getitem__(self, i):
        return self.img[i].astype(np.float32), self.txt[i].astype(np.float32), self.lab[i], self.lab[i], i


def loader_seconds_per_sample(split, workers=2, batches=30):
    loader = DataLoader(PerSample(split), batch_size=128, shuffle=True, num_workers=workers)
    it = iter(loader)
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)[0])
    return (time.perf_counter() - t) / n


def per_query_sort_pass(q_codes, d_codes, q_lab, d_lab, queries):
    """One pass of the published per-query loop: Hamming row, sort, then what follows the sort."""
    rel = (q_lab @ d_lab.T) > 0
    t = time.perf_counter()
    for i in range(queries):
        d = 0.5 * (q_codes.shape[1] - d_codes @ q_codes[i])
        order = torch.sort(d).indices
        hits = rel[i][order]
        torch.nonzero(hits)
    return (time.perf_counter() - t) / queries


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", default="shards/mirflickr25k")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="training steps timed (after 2 warm-up steps)")
    p.add_argument("--bf16", action="store_true", help="also ours with bf16 autocast (a CPU with native bf16)")
    p.add_argument("--malloc-default", action="store_true",
                   help="glibc's default malloc, as the published code runs (a run keeps freed memory: "
                        "train.keep_freed_memory); the setting is the process's, for every column")
    a = p.parse_args()
    kept = False if a.malloc_default else keep_freed_memory()
    cfg = load_config("configs/flickr.yaml", [f"data.root={a.root}", f"model.hidden={a.hidden}", f"model.bits={a.bits}"])
    root, meta, device = Path(a.root), read_meta(a.root), torch.device("cpu")
    labels = torch.from_numpy(np.array(training_labels(root, meta, cfg.data.noise, seed=0)[0]))
    model = SCBCHModel(meta.dim("img"), meta.dim("txt"), a.bits, a.hidden, meta.num_classes)
    stream = TrainStream(root=root, meta=meta, batch_size=128, seed=0)
    steps_per_epoch = stream.steps_per_epoch
    t = time.perf_counter()
    batches = [to_torch(batch, device) for batch in stream.epoch(0)]  # a whole epoch of reading
    our_load = (time.perf_counter() - t) / meta.splits["train"].count
    batches = batches[: a.steps + 2]

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def make_step(optimizers, autocast=contextlib.nullcontext):
        def step(b):
            with autocast():
                out = model(b["img"], b["txt"])
            loss = scbch_loss(out, labels[b["id"]], None, margin=0.15, shift=0.8)["total"]
            for o in optimizers:
                o.zero_grad()
            loss.backward()
            for o in optimizers:
                o.step()
        return step

    ours_step = time_steps(make_step([make_optimizer(model, cfg, device)]), batches)
    img_params = list(model.img_head.parameters()) + [model.head.img_classifier]
    txt_params = list(model.txt_head.parameters()) + [model.head.txt_classifier]
    published_opt = [torch.optim.Adam(img_params, lr=1e-4, weight_decay=1e-5),
                     torch.optim.Adam(txt_params, lr=1e-4, weight_decay=1e-5)]
    published_step = time_steps(make_step(published_opt), batches)

    train = TrainingSet(meta.splits["train"].count, meta.num_classes, labels, None, device)

    def time_refresh(autocast=None) -> float:
        def refresh():
            bank = BankSource("pass", train.count, a.bits, device, log=setup_logging(None, True),
                              encode_train=lambda: encode_part(model, root, meta, "train", batch_size=2048,
                                                               device=device, autocast=autocast))
            SCBCH(cfg, train).epoch_start(EpochContext(cfg.scbch.warmup_epochs, a.epochs, train, bank.build,
                                                       Path("."), False))
        return fastest_of_two(refresh)[0]

    def time_eval(autocast=None) -> tuple[float, dict]:
        seconds, (_, codes) = fastest_of_two(
            lambda: evaluate(model, root, meta, batch_size=2048, device=device, autocast=autocast))
        return seconds, codes

    refresh = time_refresh()
    our_eval, codes = time_eval()
    if a.bf16:
        bf16_step = time_steps(make_step([make_optimizer(model, cfg, device)], bf16), batches)
        bf16_refresh, (bf16_eval, _) = time_refresh(bf16), time_eval(bf16)
    t = time.perf_counter()
    with torch.no_grad():
        for split in ("query", "database"):
            rows = load_split(root, meta, split)
            for m in ("img", "txt"):
                x = torch.from_numpy(rows[m]).float()
                for s in range(0, len(x), 128):
                    model.encode(m, x[s:s + 128])
    encode = time.perf_counter() - t

    train = load_split(root, meta, "train")
    published_load = loader_seconds_per_sample(train)
    q = {k: torch.from_numpy(codes[f"query_{k}"].astype(np.float64) * 2 - 1) for k in ("img", "txt")}
    d = {k: torch.from_numpy(codes[f"database_{k}"].astype(np.float64) * 2 - 1) for k in ("img", "txt")}
    ql = torch.from_numpy(codes["query_lab"]).double()
    dl = torch.from_numpy(codes["database_lab"]).double()
    per_query = per_query_sort_pass(q["img"], d["txt"], ql, dl, queries=200)
    n_query, n_train = len(ql), meta.splits["train"].count
    published_map = 2 * n_query * per_query  # calc_map_k, both directions
    published_pr = 2 * 15 * n_query * per_query  # pr_curve: 15 points, each re-sorts every query
    # Loading is not charged to the published code (its 2 workers could overlap with compute);
    # ours is charged in full (read in the training process).
    published_eval = encode + published_map + published_pr

    e, every, warm = a.epochs, a.eval_every, cfg.scbch.warmup_epochs
    ours_epoch = steps_per_epoch * (ours_step + 128 * our_load)
    published_epoch = steps_per_epoch * published_step
    ours_total = e * ours_epoch + (e - warm) * refresh + math.ceil(e / every) * our_eval
    published_total = e * (published_epoch + published_eval) + (e - warm) * refresh
    if a.bf16:
        bf16_epoch = steps_per_epoch * (bf16_step + 128 * our_load)
        bf16_total = e * bf16_epoch + (e - warm) * bf16_refresh + math.ceil(e / every) * bf16_eval

    print(f"MIRFlickr format: {n_train} training pairs, width {a.hidden}, {a.bits} bits, {torch.get_num_threads()} threads, "
          f"freed memory {'kept' if kept else 'returned (glibc default)'}")
    nan = float("nan")
    columns = ["ours", *(["ours, bf16"] if a.bf16 else []), "published"]
    print(f"| {'component':<46} | " + " | ".join(f"{c:>10}" for c in columns) + " |")
    print(f"|{'-' * 48}|" + "|".join("-" * 12 for _ in columns) + "|")
    rows = [
        ("training step, batch 128 (s)", ours_step, bf16_step if a.bf16 else nan, published_step),
        ("reading a sample (ms; published: not charged)", 1e3 * our_load, 1e3 * our_load, 1e3 * published_load),
        (f"training epoch, {steps_per_epoch} steps (s)", ours_epoch, bf16_epoch if a.bf16 else nan, published_epoch),
        ("CSCC refresh (s)", refresh, bf16_refresh if a.bf16 else nan, refresh),
        ("one evaluation: encode + all metrics (s)", our_eval, bf16_eval if a.bf16 else nan, published_eval),
        ("  of which mAP loops, both directions (s)", nan, nan, published_map),
        ("  of which 15-point PR curve loops (s)", nan, nan, published_pr),
        (f"evaluations in {e} epochs", math.ceil(e / every), math.ceil(e / every), e),
        (f"projected run of {e} epochs (min)", ours_total / 60, bf16_total / 60 if a.bf16 else nan,
         published_total / 60),
    ]
    for name, ours, ours_bf16, pub in rows:
        values = [ours, *([ours_bf16] if a.bf16 else []), pub]
        print(f"| {name:<46} | " + " | ".join(f"{v:>10.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
