"""Fine-tuning throughput: decode + augmentation per loader worker, and training steps.

    python tests/benchmarks/bench_finetune.py [loader] [model] [clip] [--steps 10]
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml \\
        tests/benchmarks/bench_finetune.py gpu          # ViT-B/16 + BERT-base, bf16, ZeRO-2

loader: images/s of one process (= one loader worker) turning raw blocks into training tensors
  (decode, random resized crop, flip, tokenise): the 32 px PNGs of the embedded shapes dataset
  and 500 x 375 JPEG photographs (MIRFlickr's typical size) to 224 px.
model: training images/s of whole optimisation steps (forward, SCBCH loss, backward, Adam) on the
  CPU for the tiny ViT + BERT of configs/finetune-tiny.yaml and EfficientNet-Lite0 + MiniLM of
  configs/finetune-offline.yaml.
clip: the same for CLIP towers (the tiny open_clip and transformers models of configs/clip-tiny.yaml,
  and open_clip's ViT-B-32 at random init, 224 px, 77 tokens), frozen, with the last groups unlocked
  and fully fine-tuned, with and without gradient checkpointing; each row in its own process, with
  that process's peak resident memory.
gpu: the same for ViT-B/16 (224 px) + BERT-base (32 tokens) at random init, bf16 autocast; run
  plainly for DDP/one GPU, under `accelerate launch` with the ZeRO-2 config for DeepSpeed.
Prints tables; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scbch_dist.config import Config, ShapesConfig
from scbch_dist.data.shapes import generate_samples
from scbch_dist.data.transforms import BatchTransform, ImageTransform
from scbch_dist.models.tokenizers import WordTokenizer


def _photo_jpegs(n: int, rng: np.random.Generator) -> list[bytes]:
    """Smooth random 500 x 375 colour images, JPEG quality 90 (about 40 KB, photo-like entropy)."""
    from PIL import Image

    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 13, (375, 500, 3))
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _block(images: list[bytes], texts: list[str]) -> dict:
    img = np.empty(len(images), dtype=object)
    img[:] = images
    txt = np.empty(len(texts), dtype=object)
    txt[:] = texts
    return {"id": np.arange(len(images)), "img": img, "txt": txt, "lab": np.zeros((len(images), 11), np.uint8),
            "src": np.array(["bench"] * len(images), dtype=object)}


def bench_loader(reps: int) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a loader worker
    shapes = generate_samples(ShapesConfig(n_train=255, n_query=1, n_extra_database=0))
    texts = [s.text for s in shapes]
    words = sorted({w for t in texts for w in t.split()})
    tokenizer = WordTokenizer(words, max_length=16, vocab_size=512)
    rng = np.random.default_rng(0)
    photos = _photo_jpegs(64, rng)
    print(f"shapes PNG {np.mean([len(s.image) for s in shapes]) / 1024:.1f} KiB, "
          f"photo JPEG {np.mean([len(p) for p in photos]) / 1024:.1f} KiB (means); one process, 1 thread")
    print(f"| {'input -> output':<40} | {'images/s':>9} |")
    print(f"|{'-' * 42}|{'-' * 11}|")
    cases = [("shapes 32 px PNG -> 32 px, train aug", [s.image for s in shapes], 32, True),
             ("shapes 32 px PNG -> 64 px, train aug", [s.image for s in shapes], 64, True),
             ("photo 500x375 JPEG -> 224 px, train aug", photos, 224, True),
             ("photo 500x375 JPEG -> 224 px, eval", photos, 224, False)]
    for name, images, size, train in cases:
        tf = BatchTransform(ImageTransform(size, train=train), tokenizer)
        block = _block(images, (texts * (len(images) // len(texts) + 1))[:len(images)])
        tf(block, np.random.default_rng(1))  # warm-up (imports, PIL plugins)
        t = time.perf_counter()
        for r in range(reps):
            tf(block, np.random.default_rng(r))
        rate = reps * len(images) / (time.perf_counter() - t)
        print(f"| {name:<40} | {rate:>9,.0f} |")
    torch.set_num_threads(threads)


def _step_rate(cfg: Config, batch: int, steps: int, image_size: int, length: int, vocab: int,
               accelerator) -> float:
    """Training images/s of whole steps on synthetic inputs of the configured shapes."""
    from scbch_dist.engine.loop import train_step
    from scbch_dist.engine.setup import make_optimizer, prepare
    from scbch_dist.methods import SCBCH, Step, TrainingSet
    from scbch_dist.models import build_model

    per_rank = batch // accelerator.num_processes
    cfg.train.batch_size = batch
    method = SCBCH(cfg, TrainingSet(per_rank, 11, torch.zeros(per_rank, 11, dtype=torch.uint8), None, accelerator.device))
    model = build_model(cfg.model, _RawMeta(), spec=method.tower_spec(cfg), make_head=lambda: method.build_head(cfg, 11),
                        vocab_size=vocab)
    model, optimizer = prepare(accelerator, model, make_optimizer(model, cfg, accelerator.device), cfg)
    g = torch.Generator().manual_seed(accelerator.process_index)
    data = {"img": torch.randint(0, 256, (per_rank, 3, image_size, image_size), dtype=torch.uint8, generator=g),
            "txt": torch.randint(3, vocab, (per_rank, length), generator=g),
            "txt_mask": torch.ones(per_rank, length, dtype=torch.long)}
    data = {k: v.to(accelerator.device) for k, v in data.items()}
    labels = (torch.rand(per_rank, 11, generator=g) < 0.3).to(torch.uint8).to(accelerator.device)
    step = Step(0, torch.arange(per_rank, device=accelerator.device), labels)  # epoch 0: the warm-up, no weights
    train_step(model, optimizer, accelerator, data, method, step)  # warm-up
    _sync(accelerator.device)
    t = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, accelerator, data, method, step)
    _sync(accelerator.device)
    return steps * batch / (time.perf_counter() - t)


class _RawMeta:
    """The parts of a raw dataset's meta that the model builder reads."""

    raw = True
    num_classes = 11

    def kind(self, modality: str) -> str:
        return "image" if modality == "img" else "text"

    def dim(self, modality: str) -> int:
        return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(path: str, overrides: list[str]) -> Config:
    from scbch_dist.config import load_config

    return load_config(path, overrides)


def bench_model(steps: int) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    print(f"CPU, {torch.get_num_threads()} threads; whole training steps (forward, loss, backward, Adam)")
    print(f"| {'model':<60} | {'batch':>5} | {'images/s':>9} |")
    print(f"|{'-' * 62}|{'-' * 7}|{'-' * 11}|")
    tiny, offline = "configs/finetune-tiny.yaml", "configs/finetune-offline.yaml"
    ckpt = ["model.image.grad_checkpointing=true", "model.text.grad_checkpointing=true"]
    for name, path, overrides in (("tiny ViT (32 px) + tiny BERT (16 tokens), finetune-tiny", tiny, []),
                                  ("  the same, gradient checkpointing", tiny, ckpt),
                                  ("EfficientNet-Lite0 (64 px) + MiniLM-L6 (16 tokens), offline", offline, []),
                                  ("  the same, gradient checkpointing", offline, ckpt)):
        cfg = _config(path, overrides)
        batch = cfg.train.batch_size
        vocab = cfg.model.text.vocab_size if cfg.model.text.weights == "random" and cfg.model.text.kind == "bert" else 30522
        rate = _step_rate(cfg, batch, steps, cfg.model.image.image_size, cfg.model.text.max_length, vocab, accelerator)
        print(f"| {name:<60} | {batch:>5} | {rate:>9,.0f} |")


# (label, model.clip.weights, model.clip.name, global batch); "tiny"/"tiny-hf": written by models.clip
CLIP_SIZES = {"tiny": ("tiny open_clip (2+2 blocks, 32 px, 64-d), clip-tiny", "tiny", "", 64),
              "tiny-hf": ("tiny transformers CLIPModel (2+2 blocks, 32 px, 64-d)", "tiny-hf", "", 64),
              "vit-b-32": ("open_clip ViT-B-32 (12+12 blocks, 224 px, 77 tokens), random init", "random",
                           "ViT-B-32", 16)}
# (label, unlocked groups of each tower, gradient checkpointing)
CLIP_MODES = {"frozen": ("frozen towers (heads only)", 0, False),
              "last2": ("last 2 groups of each tower", 2, False),
              "last2-ckpt": ("last 2 groups, gradient checkpointing", 2, True),
              "full": ("fully fine-tuned", -1, False),
              "full-ckpt": ("fully fine-tuned, gradient checkpointing", -1, True)}


def clip_row(size: str, mode: str, steps: int, weights_dir: str) -> dict:
    """One CLIP row, in this process: images/s of whole steps and the process's peak resident GiB."""
    from accelerate import Accelerator

    from scbch_dist.models.clip import build_clip_towers, write_tiny

    _, weights, name, batch = CLIP_SIZES[size]
    _, unlocked, ckpt = CLIP_MODES[mode]
    if weights.startswith("tiny"):
        weights = str(Path(weights_dir) / size)
        if not Path(weights).exists():
            write_tiny(weights, "transformers" if size == "tiny-hf" else "open_clip")
    overrides = [f"model.clip.weights={weights}"] + ([f"model.clip.name={name}"] if name else []) + [
                 f"model.clip.image_unlocked_groups={unlocked}", f"model.clip.text_unlocked_layers={unlocked}",
                 f"model.image.grad_checkpointing={str(ckpt).lower()}",
                 f"model.text.grad_checkpointing={str(ckpt).lower()}"]
    cfg = _config("configs/clip-tiny.yaml", overrides)
    towers = build_clip_towers(cfg.model.clip)  # the input shapes the model takes
    cfg.model.image.image_size = towers.image_size
    rate = _step_rate(cfg, batch, steps, towers.image_size, towers.context_length, 49408, Accelerator(cpu=True))
    return {"batch": batch, "rate": rate, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bench_clip(steps: int, sizes: list[str]) -> None:
    print(f"CPU, {torch.get_num_threads()} threads; whole training steps (forward, SCBCH loss, backward, Adam); "
          "peak: the row's process, resident")
    print(f"| {'CLIP model':<68} | {'towers':<40} | {'batch':>5} | {'images/s':>8} | {'peak GiB':>8} |")
    print(f"|{'-' * 70}|{'-' * 42}|{'-' * 7}|{'-' * 10}|{'-' * 10}|")
    with tempfile.TemporaryDirectory() as weights_dir:
        for size in sizes:
            for mode in CLIP_MODES:
                out = subprocess.run([sys.executable, __file__, "clip-row", "--size", size, "--mode", mode,
                                      "--steps", str(steps), "--weights-dir", weights_dir],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    raise SystemExit(f"clip row {size}/{mode} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {CLIP_SIZES[size][0]:<68} | {CLIP_MODES[mode][0]:<40} | {row['batch']:>5} | "
                      f"{row['rate']:>8,.1f} | {row['peak_gib']:>8.2f} |", flush=True)


def bench_gpu(steps: int, batch: int) -> None:
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        raise SystemExit("gpu: no CUDA device on this machine")
    accelerator = Accelerator(mixed_precision="bf16")
    deepspeed = accelerator.state.deepspeed_plugin is not None
    cfg = _config("configs/finetune-vit-bert.yaml", ["model.image.weights=random", "model.text.weights=random"])
    rate = _step_rate(cfg, batch, steps, 224, cfg.model.text.max_length, 30522, accelerator)
    if accelerator.is_main_process:
        mem = torch.cuda.max_memory_allocated() / 2**30
        print(f"| ViT-B/16 + BERT-base, bf16, {'DeepSpeed ZeRO-2' if deepspeed else 'DDP'} | "
              f"{accelerator.num_processes} x {torch.cuda.get_device_name()} | batch {batch} | "
              f"{rate:,.0f} images/s | peak {mem:.1f} GiB/GPU |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="*", help="loader, model, clip and/or gpu (default: loader model)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--reps", type=int, default=5, help="timed passes over the loader images")
    p.add_argument("--gpu-batch", type=int, default=256, help="global batch of the gpu benchmark")
    p.add_argument("--clip-sizes", nargs="+", choices=list(CLIP_SIZES), default=list(CLIP_SIZES),
                   help="CLIP models of the clip benchmark")
    p.add_argument("--size", choices=list(CLIP_SIZES), help=argparse.SUPPRESS)  # clip-row: one row's process
    p.add_argument("--mode", choices=list(CLIP_MODES), help=argparse.SUPPRESS)
    p.add_argument("--weights-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.what == ["clip-row"]:
        print(json.dumps(clip_row(a.size, a.mode, a.steps, a.weights_dir)))
        return
    a.what = a.what or ["loader", "model"]
    known = {"loader", "model", "clip", "gpu"}
    if set(a.what) - known:
        p.error(f"unknown benchmark(s) {sorted(set(a.what) - known)}; choose loader, model, clip, gpu")
    if "loader" in a.what:
        bench_loader(a.reps)
    if "model" in a.what:
        bench_model(a.steps)
    if "clip" in a.what:
        bench_clip(a.steps, a.clip_sizes)
    if "gpu" in a.what:
        bench_gpu(a.steps, a.gpu_batch)


if __name__ == "__main__":
    main()
