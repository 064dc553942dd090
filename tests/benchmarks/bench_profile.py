"""Where a paper-width training step goes: its phases timed, then its operators under torch.profiler,
in float32 and in bf16 autocast. Prints tables; asserts nothing about speed.

    python tests/benchmarks/bench_profile.py [--hidden 8192] [--steps 6] [--precision no bf16]
                                             [--malloc-default] [--compile] [--floor]

The step is the engine's (engine.loop.train_step) taken apart so each phase is timed on its own:
forward (the towers and heads, under the run's autocast), loss (SCBCH's batch loss on the global
batch, CSCC weights as after the warm-up), backward, and the optimizer (fused Adam, as
engine.setup.make_optimizer makes it). SCBCH at the paper's width on MIRFlickr-shaped inputs (4096-d
image and 1386-d text features, 24 classes, batch 128, 64 bits), one process. The operator table
is torch.profiler's self CPU time per operator over the timed steps, largest first. glibc keeps
freed memory as a run does (train.keep_freed_memory, engine.setup.keep_freed_memory) unless
``--malloc-default``. ``--compile``: the model's forward and the optimizer's step through
``torch.compile`` (inductor; its compilation runs in the warm-up steps and is not timed).
``--floor``: what no bf16 step with float32 master weights and Adam moments can go below here: the
forward, loss and backward of a model whose linear layers already hold bfloat16 weights (no casts
at all: only the products and the elementwise work), plus the bf16 run's fused Adam over float32
weights and moments; beside the 153 ms a step that 3x the float32 step before issue 25 (460 ms)
would need.
"""

from __future__ import annotations

import argparse
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.profiler import ProfilerActivity, profile

from scbch_dist.config import load_config
from scbch_dist.engine.setup import keep_freed_memory, make_optimizer
from scbch_dist.methods import SCBCH, Step, TrainingSet
from scbch_dist.models import SCBCHModel

IMG, TXT, CLASSES, BATCH, BITS = 4096, 1386, 24, 128, 64
PHASES = ("forward", "loss", "backward", "optimizer")


def make_step(hidden: int, precision: str, compiled: bool = False, bf16_weights: bool = False):
    """A step function that returns each phase's seconds, and the model's parameter count.
    ``bf16_weights``: the linear layers hold bfloat16 weights (--floor; its optimizer phase is not
    the engine's)."""
    AcceleratorState._reset_state(reset_partial_state=False)  # one Accelerator per precision in this process
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    cfg = load_config(None, [f"model.hidden={hidden}", f"train.mixed_precision={precision}"])
    torch.manual_seed(0)
    model = SCBCHModel(IMG, TXT, BITS, hidden, CLASSES)
    if bf16_weights:
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.to(torch.bfloat16)
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    forward, optimizer_step = model, optimizer.step
    if compiled:
        forward, optimizer_step = torch.compile(model), torch.compile(optimizer.step)
    g = torch.Generator().manual_seed(0)
    data = {"img": torch.randn(BATCH, IMG, generator=g), "txt": (torch.rand(BATCH, TXT, generator=g) < 0.01).float()}
    labels = (torch.rand(BATCH, CLASSES, generator=g) < 0.2).to(torch.uint8)
    weights = torch.rand(BATCH, generator=g)  # CSCC weights, as every epoch after the warm-up has them
    method = SCBCH(cfg, TrainingSet(BATCH, CLASSES, labels, None, accelerator.device))
    method.weights.assign(weights)
    step_info = Step(cfg.scbch.warmup_epochs, torch.arange(BATCH), labels)

    def step() -> dict[str, float]:
        seconds, t = {}, time.perf_counter()
        with accelerator.autocast():
            out = forward(data["img"], data["txt"])
        seconds["forward"], t = time.perf_counter() - t, time.perf_counter()
        terms = method.loss(out, step_info)
        seconds["loss"], t = time.perf_counter() - t, time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(terms["total"])
        seconds["backward"], t = time.perf_counter() - t, time.perf_counter()
        optimizer_step()
        seconds["optimizer"] = time.perf_counter() - t
        return seconds
    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--steps", type=int, default=6, help="timed steps, after 2 warm-up steps")
    p.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    p.add_argument("--ops", type=int, default=8, help="operators listed per precision")
    p.add_argument("--malloc-default", action="store_true", help="glibc's default malloc (train.keep_freed_memory=false)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward and the optimizer step")
    p.add_argument("--floor", action="store_true", help="also the lower bound of a bf16 step with float32 Adam state")
    a = p.parse_args()
    kept = False if a.malloc_default else keep_freed_memory()
    phases, ops = {}, {}

    def mean_phases(step) -> dict[str, float]:
        for _ in range(3 if a.compile else 2):
            step()
        total = {k: 0.0 for k in PHASES}
        for _ in range(a.steps):
            for k, v in step().items():
                total[k] += v / a.steps
        return total

    for precision in a.precision:
        step, params = make_step(a.hidden, precision, a.compile)
        phases[precision] = mean_phases(step)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
        ops[precision] = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:a.ops]
    print(f"SCBCH step: width {a.hidden}, {params / 1e6:.1f}M parameters, batch {BATCH}, {IMG}-d + {TXT}-d inputs, "
          f"{BITS} bits, {torch.get_num_threads()} threads; mean of {a.steps} steps; freed memory "
          f"{'kept' if kept else 'returned (glibc default)'}{'; torch.compile' if a.compile else ''}")
    print(f"| {'phase':<10} | " + " | ".join(f"{p + ' (ms)':>12}" for p in a.precision) + " |")
    print(f"|{'-' * 12}|" + "|".join("-" * 14 for _ in a.precision) + "|")
    for phase in (*PHASES, "step"):
        values = [sum(phases[p].values()) if phase == "step" else phases[p][phase] for p in a.precision]
        print(f"| {phase:<10} | " + " | ".join(f"{1e3 * v:>12.1f}" for v in values) + " |")
    if a.floor:
        bf16 = phases.get("bf16") or mean_phases(make_step(a.hidden, "bf16")[0])
        cast_free = mean_phases(make_step(a.hidden, "bf16", bf16_weights=True)[0])
        rows = [("forward + loss + backward, linear weights already bfloat16", sum(cast_free[k] for k in PHASES[:3])),
                ("fused Adam over float32 weights and moments (the bf16 run's)", bf16["optimizer"])]
        rows.append(("lower bound of a bf16 step with float32 Adam state", rows[0][1] + rows[1][1]))
        rows.append(("the bf16 step as the engine takes it", sum(bf16.values())))
        rows.append(("3x the float32 step before issue 25 (460 ms)", 0.460 / 3))
        print(f"\n| {'floor':<64} | {'ms':>7} |\n|{'-' * 66}|{'-' * 9}|")
        for name, seconds in rows:
            print(f"| {name:<64} | {1e3 * seconds:>7.1f} |")
    for precision in a.precision:
        print(f"\noperators, {precision}: self CPU time per step")
        print(f"| {'operator':<40} | {'ms':>9} | {'calls':>6} |")
        print(f"|{'-' * 42}|{'-' * 11}|{'-' * 8}|")
        for e in ops[precision]:
            print(f"| {e.key[:40]:<40} | {e.self_cpu_time_total / 1e3 / a.steps:>9.1f} | {e.count // a.steps:>6} |")


if __name__ == "__main__":
    main()
