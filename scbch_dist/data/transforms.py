"""Loader-side transforms for raw datasets: image decoding and augmentation, tokenisation (by the
tokenizer of the text encoder, models.tokenizers).

They run in the loader workers, after the shuffle (so the shuffle buffer holds compressed bytes),
on whole batches. A raw block ``{"id", "img": bytes objects, "txt": str objects, "lab", "src"}``
becomes ``{"id", "img": (n, 3, S, S) uint8, "txt": (n, T) int64 token ids, "txt_mask": (n, T)
int64, "lab"}``. Images travel as uint8 (a quarter of float32's bytes); the backbone converts and
normalises them on the device. Augmentation draws from the numpy Generator the stream hands in,
seeded by (seed, epoch, pass, rank, worker), so a run is reproducible with any number of workers.
"""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np

from scbch_dist.data.format import ShardError

Block = dict[str, np.ndarray]
# A text encoder's tokenizer (models.tokenizers): texts -> (ids, attention mask), each (n, T) int64.
Tokenizer = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow comes with the finetune extra
        raise ImportError("raw image datasets need pillow: pip install 'scbch_dist[finetune]'") from None
    return Image


class ImageTransform:
    """Encoded image bytes -> (3, size, size) uint8 RGB.

    Training: a random resized crop (area fraction in ``scale``, aspect ratio log-uniform in 3/4..4/3)
    and a horizontal flip with probability 1/2. Evaluation (``train=False``): the shorter side
    resized to ``size`` and the centre crop; deterministic.
    """

    def __init__(self, size: int, train: bool, scale: tuple[float, float] = (0.6, 1.0)):
        self.size, self.train, self.scale = size, train, scale

    def __call__(self, data: bytes, rng: np.random.Generator | None) -> np.ndarray:
        Image = _pil()
        img = Image.open(io.BytesIO(data))
        # JPEG: decode at a reduced scale when the photo is large, yet large enough that the
        # smallest random crop still has ``size`` pixels a side (no upscaling of a crop)
        side = self.size if not self.train else math.ceil(self.size / math.sqrt(self.scale[0]))
        img.draft("RGB", (side, side))
        img = img.convert("RGB")
        w, h = img.size
        if self.train and rng is not None:
            box = self._random_box(w, h, rng)
        else:
            side = min(w, h)
            box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        out = np.asarray(img.resize((self.size, self.size), Image.BILINEAR, box=box), dtype=np.uint8)
        if self.train and rng is not None and rng.random() < 0.5:
            out = out[:, ::-1]
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def _random_box(self, w: int, h: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = math.sqrt(target * ratio), math.sqrt(target / ratio)
            if cw <= w and ch <= h:
                x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
                return (x0, y0, x0 + cw, y0 + ch)
        side = min(w, h)  # fall back to the centre square
        return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)


class BatchTransform:
    """Raw block -> model-ready block (see the module docstring); modalities stored as features
    pass through. Errors name the shard, the sample key and the field."""

    def __init__(self, image: ImageTransform | None, tokenizer: Tokenizer | None):
        self.image, self.tokenizer = image, tokenizer

    def __call__(self, block: Block, rng: np.random.Generator | None) -> Block:
        out = {k: v for k, v in block.items() if k != "src"}
        if self.image is not None:
            out["img"] = np.stack([self._decode(block, i, rng) for i in range(len(block["id"]))])
        if self.tokenizer is not None:
            out["txt"], out["txt_mask"] = self.tokenizer([str(t) for t in block["txt"]])
        return out

    def _decode(self, block: Block, i: int, rng) -> np.ndarray:
        try:
            return self.image(block["img"][i], rng)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... on bad bytes
            src = block["src"][i] if "src" in block else "<stream>"
            raise ShardError(f"{src}: sample {int(block['id'][i]):09d}: field 'img' is not a decodable image "
                             f"({type(e).__name__}: {e})") from None


def make_transforms(image_cfg, meta, tokenizer: Tokenizer | None) -> tuple[Callable | None, Callable | None]:
    """(train transform, eval transform) for dataset ``meta`` with ``model.image`` = ``image_cfg``
    and the text encoder's tokenizer; (None, None) when both modalities are stored as features."""
    if not meta.raw:
        return None, None
    if meta.kind("img") == "image":
        train = ImageTransform(image_cfg.image_size, train=image_cfg.augment)
        evaluation = ImageTransform(image_cfg.image_size, train=False)
    else:
        train = evaluation = None
    return BatchTransform(train, tokenizer), BatchTransform(evaluation, tokenizer)


def check_backbones_fit(model_cfg, meta, root) -> None:
    """Raw modalities need a backbone; stored features need none."""
    for modality, cfg, key in (("img", model_cfg.image, "model.image.kind"), ("txt", model_cfg.text, "model.text.kind")):
        raw = meta.kind(modality) != "feature"
        if raw and cfg.kind == "features":
            raise ShardError(f"{root}: dataset {meta.name!r} stores raw {'images' if modality == 'img' else 'texts'}; "
                             f"set {key} to a backbone (or extract features: python -m scbch_dist.extract)")
        if not raw and cfg.kind != "features":
            raise ShardError(f"{root}: dataset {meta.name!r} stores {modality} feature vectors, but {key} is "
                             f"{cfg.kind!r}; use a raw dataset (python -m scbch_dist.data.convert folder) "
                             f"or {key}=features")
