"""Contrastive pretraining of a CLIP on a raw dataset's training images and captions: a local
stand-in for the pretrained CLIP checkpoints that cannot be downloaded here (docs/finetuning.md,
"CLIP"). No labels are read, so label noise cannot reach it.

    python -m scbch_dist.models.clip_pretrain --data shards/shapes --init weights/clip-tiny \\
        --out weights/clip-shapes [--epochs 30] [--batch-size 128] [--lr 1e-3]

The model (``--init``: an open_clip model directory, e.g. the tiny one ``python -m
scbch_dist.models.clip tiny`` writes) is trained with CLIP's symmetric InfoNCE loss (a learnt
temperature, both directions of the in-batch image-caption logits) on the training split, with
the fine-tuning path's random resized crops and flips, and written in open_clip's local layout to
``--out`` (atomically): ``model.clip.weights: --out`` then hashes from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scbch_dist.atomic import atomic_directory
from scbch_dist.data.format import read_meta
from scbch_dist.data.pipeline import check_split, read_blocks
from scbch_dist.data.transforms import ImageTransform
from scbch_dist.errors import ScbchError
from scbch_dist.models.clip import OPEN_CLIP_CONFIG, ClipSettings, clip_source, import_open_clip, open_clip_config
from scbch_dist.models.tokenizers import clip_tokenizer


class PretrainError(ScbchError, ValueError):
    """A bad pretraining input or setting."""


def training_pairs(root: Path) -> tuple[list[bytes], list[str]]:
    """The encoded images and captions of the training split of the raw dataset at ``root``."""
    meta = read_meta(root)
    if meta.kind("img") != "image" or meta.kind("txt") != "text":
        raise PretrainError(f"{root}: not a raw dataset of images and captions (img is {meta.kind('img')!r}, "
                            f"txt is {meta.kind('txt')!r})")
    images, captions = [], []
    for block in read_blocks([str(p) for p in check_split(root, meta, "train")], meta, "train"):
        images += list(block["img"])
        captions += [str(t) for t in block["txt"]]
    return images, captions


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch: image (n, d), text (n, d) unit rows, pair i the i-th
    of both; the mean of the image->text and text->image cross-entropies."""
    logits = logit_scale.exp() * image @ text.T
    target = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def pretrain(data: str | Path, init: str | Path, out: str | Path, *, epochs: int = 30, batch_size: int = 128,
             lr: float = 1e-3, seed: int = 0, log=print) -> dict:
    """Pretrain the open_clip model at ``init`` on ``data``'s training pairs; write it to ``out``.
    Returns {"epochs", "loss_first", "loss_last", "pairs"}."""
    data, out = Path(data), Path(out)
    if out.exists():
        raise PretrainError(f"{out} exists; choose a new folder for the pretrained model")
    if epochs < 1 or batch_size < 2 or lr <= 0:
        raise PretrainError(f"need epochs >= 1, batch_size >= 2 and lr > 0, got {epochs}, {batch_size}, {lr}")
    settings = ClipSettings(weights=str(init))
    source = clip_source(settings)
    if source.library != "open_clip" or source.directory is None:
        raise PretrainError(f"--init {init}: pretraining writes open_clip's layout; give an open_clip model directory")
    open_clip = import_open_clip()
    cfg = json.loads((source.directory / OPEN_CLIP_CONFIG).read_text())
    open_clip_config(source)  # refuses hub towers
    model = open_clip.create_model(source.name)
    tokenizer = clip_tokenizer(settings)
    images, captions = training_pairs(data)
    if len(images) < batch_size:
        raise PretrainError(f"{data}: {len(images)} training pairs, fewer than one batch of {batch_size}")
    size = cfg["model_cfg"]["vision_cfg"]["image_size"]
    preprocess = cfg.get("preprocess_cfg", {})
    mean = torch.tensor(preprocess.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)
    augment = ImageTransform(size if isinstance(size, int) else size[0], train=True)
    ids, _ = tokenizer(captions)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(images) // batch_size
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * s / total)))
    losses = []
    model.train()
    for epoch in range(epochs):
        order = rng.permutation(len(images))
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            rows = order[step * batch_size:(step + 1) * batch_size]
            pixels = torch.from_numpy(np.stack([augment(images[i], rng) for i in rows])).float() / 255
            image = F.normalize(model.encode_image((pixels - mean) / std), dim=1)
            text = F.normalize(model.encode_text(torch.from_numpy(ids[rows])), dim=1)
            loss = clip_loss(image, text, model.logit_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # CLIP's clamp: the temperature stays above 1/100
                model.logit_scale.clamp_(0, np.log(100))
            epoch_loss += float(loss.detach())
        losses.append(epoch_loss / steps_per_epoch)
        log(f"pretrain epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} (chance {np.log(batch_size):.4f})")
    _write_open_clip(model, cfg, out)
    return {"epochs": epochs, "loss_first": losses[0], "loss_last": losses[-1], "pairs": len(images)}


def _write_open_clip(model: torch.nn.Module, cfg: dict, out: Path) -> None:
    """``model`` and its config in open_clip's local layout at ``out``, written beside and renamed."""
    from safetensors.torch import save_file

    with atomic_directory(out) as partial:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  str(partial / "open_clip_model.safetensors"))
        (partial / OPEN_CLIP_CONFIG).write_text(json.dumps(cfg, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.models.clip_pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="a raw dataset (images and captions)")
    p.add_argument("--init", required=True, type=Path, help="the open_clip model directory to start from")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (model.clip.weights)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    result = pretrain(args.data, args.init, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {args.out}: {result['pairs']} pairs, loss {result['loss_first']:.4f} -> {result['loss_last']:.4f}")


if __name__ == "__main__":
    from scbch_dist import cli

    cli.run(main, "python -m scbch_dist.models.clip_pretrain")
