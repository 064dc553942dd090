"""The embedded default dataset: image-feature / tag-vector pairs shaped like MIRFlickr-25K.

Structure, all deterministic by ``synthetic.seed``:
- labels: 24 classes (MIRFlickr's names). Each sample draws one or two latent *topics* (scenes);
  each topic switches on its own few classes with high probability, which gives real label
  co-occurrence (sky with clouds and sunset, people with portrait and female/male, ...). Every
  sample has at least one label; about 3 to 4 on average, as in MIRFlickr.
- image features: a non-negative vector (like VGG fc7 after ReLU) mixing a prototype per visible
  class, a topic "scene" component and strong nuisance noise; each positive class is visible
  with probability 0.8 only, so the image is informative but imperfect.
- text: a binary bag of tags over ``txt_dim`` words. Each class owns a handful of words and is
  mentioned with probability 0.65; distractor tags are added at random. Informative, imperfect.
- splits in release order: query rows first, then training rows; the database is every
  non-query row (training rows included), as in the standard MIRFlickr split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scbch_dist.data.format import DatasetMeta, ShardError, read_meta, write_dataset
from scbch_dist.data.releases import MIRFLICKR_CLASSES

CLASSES = list(MIRFLICKR_CLASSES)

# Scenes: (classes switched on with high probability). They overlap, which creates co-occurrence.
TOPICS = [
    ["sky", "clouds", "sunset", "sea", "water"],
    ["people", "portrait", "female", "male", "indoor", "baby"],
    ["animals", "dog", "bird", "plant_life"],
    ["plant_life", "flower", "tree", "lake", "river", "water"],
    ["structures", "night", "car", "transport", "sky"],
    ["food", "indoor", "people"],
    ["sea", "water", "river", "lake", "bird", "sky"],
    ["tree", "sky", "clouds", "structures", "plant_life"],
]


@dataclass
class SyntheticConfig:
    """The embedded default dataset (scbch_dist.data.synthetic); sized for a few CPU minutes."""

    seed: int = 0
    n_query: int = 1000
    n_train: int = 6000
    n_extra_database: int = 3000  # database = training rows + these
    img_dim: int = 512
    txt_dim: int = 1000
    topics: int = 8
    samples_per_shard: int = 1024


def generate_arrays(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """All rows in release order: ``img`` (n, img_dim) float32, ``txt`` (n, txt_dim), ``lab`` (n, C)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_query + cfg.n_train + cfg.n_extra_database
    c = len(CLASSES)
    index = {name: i for i, name in enumerate(CLASSES)}
    topics = TOPICS[: max(1, min(cfg.topics, len(TOPICS)))]
    profile = np.full((len(topics), c), 0.02)
    for t, names in enumerate(topics):
        for name in names:
            profile[t, index[name]] = rng.uniform(0.35, 0.75)

    # labels: one or two topics per sample
    first = rng.integers(len(topics), size=n)
    second = np.where(rng.random(n) < 0.35, rng.integers(len(topics), size=n), first)
    p = 1.0 - (1.0 - profile[first]) * (1.0 - np.where((second != first)[:, None], profile[second], 0.0))
    lab = (rng.random((n, c)) < p).astype(np.uint8)
    empty = lab.sum(1) == 0
    lab[empty, np.argmax(p[empty] * rng.random((empty.sum(), c)), axis=1)] = 1

    # image: visible-class prototypes + scene component + nuisance, rectified
    proto = rng.normal(size=(c, cfg.img_dim)) * 1.0
    scene = rng.normal(size=(len(topics), cfg.img_dim)) * 0.7
    visible = lab * (rng.random((n, c)) < 0.8)
    signal = visible @ proto / np.sqrt(np.maximum(visible.sum(1, keepdims=True), 1))
    nuisance = rng.normal(size=(n, cfg.img_dim)) * 1.3
    img = np.maximum(signal + scene[first] + nuisance, 0.0).astype(np.float32)

    # text: per-class tag words, mentioned with probability 0.65, plus distractors
    words_per_class = max(2, min(12, cfg.txt_dim // (2 * c)))
    class_words = rng.permutation(cfg.txt_dim)[: c * words_per_class].reshape(c, words_per_class)
    txt = np.zeros((n, cfg.txt_dim), dtype=np.uint8)
    mention = lab.astype(bool) & (rng.random((n, c)) < 0.65)
    rows, cls = np.nonzero(mention)
    for _ in range(2):  # up to two tag words per mentioned class
        txt[rows, class_words[cls, rng.integers(words_per_class, size=len(cls))]] = 1
    k_distract = rng.poisson(3.0, size=n)
    d_rows = np.repeat(np.arange(n), k_distract)
    txt[d_rows, rng.integers(cfg.txt_dim, size=len(d_rows))] = 1
    return {"img": img, "txt": txt, "lab": lab}


def write_synthetic(root: str | Path, cfg: SyntheticConfig) -> DatasetMeta:
    """Write the embedded default dataset to ``root`` (atomically)."""
    a = generate_arrays(cfg)
    q, t = cfg.n_query, cfg.n_train
    rows = {"query": slice(0, q), "train": slice(q, q + t), "database": slice(q, None)}
    splits = {s: (a["img"][r], a["txt"][r], a["lab"][r]) for s, r in rows.items()}
    return write_dataset(
        root, name="synthetic", classes=CLASSES, splits=splits, img_dtype="float16", txt_dtype="uint8",
        source={"kind": "synthetic", "config": vars(cfg)}, samples_per_shard=cfg.samples_per_shard,
    )


def ensure_synthetic(root: str | Path, cfg: SyntheticConfig) -> DatasetMeta:
    """The dataset at ``root``, written on first use. A folder written from another synthetic
    config is an error rather than a silent mismatch."""
    root = Path(root)
    if not (root / "meta.json").is_file():
        return write_synthetic(root, cfg)
    meta = read_meta(root)
    if meta.source.get("kind") != "synthetic":
        raise ShardError(f"{root} holds the dataset {meta.name!r}, not the synthetic dataset that "
                         "data.generate=synthetic expects; delete the folder or change data.root")
    if meta.source.get("config") != vars(cfg):
        raise ShardError(f"{root} holds a synthetic dataset made with other settings "
                         f"({meta.source.get('config')}, wanted {vars(cfg)}); delete the folder or change data.root")
    return meta
