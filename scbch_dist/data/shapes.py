"""The embedded raw dataset: small PNG pictures of coloured shapes with short captions.

Structure, all deterministic by ``shapes.seed`` (row ``i`` draws from its own generator seeded by
``(seed, i)``, so a row does not depend on how many rows come before it):
- classes: 5 shapes and 6 colours (``CLASSES = SHAPES + COLOURS``). The labels of an image are
  the shapes and the colours drawn in it (multi-hot over the 11 classes); every image has at
  least one shape label and one colour label, and several objects give label co-occurrence.
- image: ``image_size`` x ``image_size`` RGB PNG. A light grey, slightly tinted background with
  mild pixel noise and 1..``max_shapes`` objects, each a random shape in a random colour, at a
  random position and size (radius 17-28 % of the side; objects are spread so that none hides
  another), slightly rotated, anti-aliased (drawn at 4x and reduced). The colour of each object
  varies in shade and per pixel, so a colour is never one exact RGB value.
- caption: each present shape and each present colour is named with probability
  ``mention_prob`` ("a red circle", "blue", "square"), in shuffled order, plus
  0..``distractors`` filler words (``FILLERS``, never a class name). Lower case; never empty
  (one filler word when nothing else was drawn). Informative, imperfect, like web captions.
- splits in release order: query rows first, then training rows, then ``n_extra_database``
  rows; the database is the training rows followed by the extra rows (``n_train +
  n_extra_database``), disjoint from the queries, as in the standard protocol.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from scbch_dist.data.format import DatasetMeta, RawSample, ShardError, meta_path, read_meta, write_raw_dataset
from scbch_dist.errors import ConfigError

GENERATOR = "scbch_dist.data.shapes"
SHAPES = ["circle", "square", "triangle", "cross", "star"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
CLASSES = SHAPES + COLOURS
# Prototype RGB of each colour; objects vary around it (shade and per-pixel jitter).
COLOUR_RGB = {
    "red": (215, 35, 35), "green": (35, 160, 50), "blue": (40, 70, 215),
    "yellow": (235, 210, 30), "purple": (135, 50, 175), "orange": (245, 135, 25),
}
FILLERS = [
    "photo", "picture", "image", "drawing", "nice", "background", "small", "big", "shape", "simple",
    "some", "bright", "plain", "clip", "art", "icon", "figure", "sketch", "the", "with",
]
SUPERSAMPLE = 4  # objects are drawn at 4x and reduced: smooth edges at 32 px
RADIUS = (0.17, 0.28)  # object radius as a fraction of the image side


@dataclass
class ShapesConfig:
    """The embedded raw image-caption dataset (scbch_dist.data.shapes): coloured shapes on a
    background; labels are the shapes and colours present; captions mention some of them."""

    seed: int = 0
    n_query: int = 200
    n_train: int = 2000
    n_extra_database: int = 600  # database = training rows + these
    image_size: int = 32  # pixels per side of the stored PNGs
    max_shapes: int = 3  # shapes per image: 1..max_shapes
    mention_prob: float = 0.7  # chance that the caption names each present shape and colour
    distractors: int = 3  # filler words per caption (0..distractors)
    samples_per_shard: int = 512


def _check(cfg: ShapesConfig) -> None:
    for name in ("n_query", "n_train", "max_shapes", "samples_per_shard"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"shapes.{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.n_extra_database < 0 or cfg.distractors < 0:
        raise ConfigError("shapes.n_extra_database and shapes.distractors must not be negative")
    if cfg.image_size < 16:
        raise ConfigError(f"shapes.image_size must be at least 16 pixels, got {cfg.image_size}")
    if not 0.0 <= cfg.mention_prob <= 1.0:
        raise ConfigError(f"shapes.mention_prob must be in [0, 1], got {cfg.mention_prob}")


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels) of ``shape`` centred at (cx, cy), inside the circle of radius r,
    rotated by ``angle`` radians. Image y grows downwards, so angle 0 points a vertex up."""
    if shape == "square":
        polar = [(r, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        polar = [(r, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        polar = [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "cross":  # a plus sign: arms of half-width w reaching to radius r
        w = 0.34 * r
        pts = [(w, r), (w, w), (r, w), (r, -w), (w, -w), (w, -r), (-w, -r), (-w, -w), (-r, -w), (-r, w),
               (-w, w), (-w, r)]
        polar = [(math.hypot(x, y), math.atan2(y, x)) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + rho * math.cos(phi + angle), cy + rho * math.sin(phi + angle)) for rho, phi in polar]


def _mask(shape: str, cx: float, cy: float, r: float, angle: float, size: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Anti-aliased coverage of one object: the (rows, cols) window of the image it covers and
    its (h, w, 1) float32 coverage in [0, 1] there. Only the window is drawn, which is fast."""
    from PIL import Image, ImageDraw

    x0, y0 = max(int(cx - r) - 1, 0), max(int(cy - r) - 1, 0)
    x1, y1 = min(math.ceil(cx + r) + 1, size), min(math.ceil(cy + r) + 1, size)
    s = SUPERSAMPLE
    canvas = Image.new("L", ((x1 - x0) * s, (y1 - y0) * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = cx - x0, cy - y0
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)
    else:
        draw.polygon([(x * s, y * s) for x, y in _outline(shape, cx, cy, r, angle)], fill=255)
    cover = np.asarray(canvas.reduce(s), dtype=np.float32)[..., None] / 255.0
    return (slice(y0, y1), slice(x0, x1)), cover


def _place(rng: np.random.Generator, size: int, placed: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Centre and radius (pixels) of a new object, kept inside the image and away from the others
    so that no object hides another; shrinks the object when the image is crowded."""
    for attempt in range(40):
        r = rng.uniform(*RADIUS) * size * 0.97 ** attempt
        cx, cy = rng.uniform(r + 0.5, size - r - 0.5, size=2)
        if all(math.hypot(cx - x, cy - y) >= 0.8 * (r + q) for x, y, q in placed):
            break
    return float(cx), float(cy), float(r)  # after 40 attempts: the last, small one overlaps a little


def _encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def draw_objects(objects: list[tuple[str, str]], size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8 picture of ``objects`` ((shape, colour) pairs, drawn in order)."""
    grey = rng.uniform(150, 235)
    background = grey + rng.uniform(-10, 10, size=3)  # light grey with a faint tint
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = background
    placed: list[tuple[float, float, float]] = []
    for shape, colour in objects:
        cx, cy, r = _place(rng, size, placed)
        placed.append((cx, cy, r))
        angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-20, 20))
        window, cover = _mask(shape, cx, cy, r, angle, size)
        shade = np.asarray(COLOUR_RGB[colour]) * rng.uniform(0.85, 1.08) + rng.uniform(-12, 12, size=3)
        pixels[window] += cover * (shade.astype(np.float32) - pixels[window])
    # one noise field: mild grain on the background, per-pixel jitter of the objects' shade
    pixels += rng.standard_normal((size, size, 3), dtype=np.float32) * 6.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def caption(objects: list[tuple[str, str]], cfg: ShapesConfig, rng: np.random.Generator) -> str:
    """Name each present class with probability ``mention_prob``, a colour before the shape of
    the same object when both are named, sometimes after an article ("a red circle", "an orange
    star"); shuffled phrases plus filler words."""
    present = [c for c in CLASSES if any(c in obj for obj in objects)]
    named = {c for c in present if rng.random() < cfg.mention_prob}
    phrases, said = [], set()
    for shape, colour in objects:
        words = [w for w in (colour, shape) if w in named and w not in said]
        said.update(words)
        if words and words[-1] == shape and rng.random() < 0.5:
            words.insert(0, "an" if words[0][0] in "aeiou" else "a")
        if words:
            phrases.append(" ".join(words))
    k = int(rng.integers(0, cfg.distractors + 1))
    phrases += [FILLERS[j] for j in rng.choice(len(FILLERS), size=min(k, len(FILLERS)), replace=False)]
    if not phrases:  # a caption is never empty
        phrases = [FILLERS[int(rng.integers(len(FILLERS)))]]
    return " ".join(phrases[j] for j in rng.permutation(len(phrases)))


def generate_sample(cfg: ShapesConfig, index: int) -> RawSample:
    """Row ``index`` (release order) of the dataset, from its own generator seeded by (seed, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    n = int(rng.integers(1, cfg.max_shapes + 1))
    objects = [(SHAPES[int(rng.integers(len(SHAPES)))], COLOURS[int(rng.integers(len(COLOURS)))]) for _ in range(n)]
    pixels = draw_objects(objects, cfg.image_size, rng)
    text = caption(objects, cfg, rng)
    lab = np.zeros(len(CLASSES), dtype=np.uint8)
    for shape, colour in objects:
        lab[CLASSES.index(shape)] = lab[CLASSES.index(colour)] = 1
    return RawSample(image=_encode_png(pixels), ext="png", text=text, lab=lab)


def generate_samples(cfg: ShapesConfig) -> list[RawSample]:
    """All ``n_query + n_train + n_extra_database`` rows in release order."""
    _check(cfg)
    return [generate_sample(cfg, i) for i in range(cfg.n_query + cfg.n_train + cfg.n_extra_database)]


def write_shapes(root: str | Path, cfg: ShapesConfig) -> DatasetMeta:
    """Write the shapes dataset to ``root`` (atomically)."""
    rows = generate_samples(cfg)
    q, t = cfg.n_query, cfg.n_train
    splits = {"train": rows[q:q + t], "query": rows[:q], "database": rows[q:]}
    return write_raw_dataset(root, name="shapes", classes=CLASSES, splits=splits,
                             source={"generator": GENERATOR, "config": asdict(cfg)},
                             samples_per_shard=cfg.samples_per_shard)


def ensure_shapes(root: str | Path, cfg: ShapesConfig) -> DatasetMeta:
    """The dataset at ``root``, written on first use. A folder written from other settings, or
    holding another dataset, is an error rather than a silent mismatch."""
    root = Path(root)
    if not meta_path(root).is_file():
        return write_shapes(root, cfg)
    meta = read_meta(root)
    if meta.source.get("generator") != GENERATOR:
        raise ShardError(f"{root} holds the dataset {meta.name!r}, not the shapes dataset that "
                         f"data.generate=shapes expects; delete the folder or change data.root")
    if meta.source.get("config") != asdict(cfg):
        raise ShardError(f"{root} holds a shapes dataset made with other settings ({meta.source.get('config')}, "
                         f"wanted {asdict(cfg)}); delete the folder or change data.root")
    return meta
