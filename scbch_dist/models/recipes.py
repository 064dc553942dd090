"""Feature recipes: how extraction turns texts and images into vectors, and how a query replays that.

Text: one entry per recipe (doc2vec, bow, clip; ``register_text_recipe`` adds one, as methods and
kNN backends are added). Extraction builds the encoder from its options and keeps a record of it
in meta.json's ``source["text"]``; a search of a run on the dataset rebuilds the encoder from that
record to encode a typed text as the dataset's own texts were (docs/search.md). The names of
``extract --text-encoder`` are this registry's.

Images: the networks of encoders.IMAGE_ENCODERS (``register_image_encoder`` adds one) and the CLIP
model's image tower; ``make_image_features`` builds one for extraction and its record
(``source["image"]``), ``replay_image_features`` rebuilds it from that record for a query.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from scbch_dist.data.format import VOCAB_FILE, read_vocab, sha256_file
from scbch_dist.digests import seal_folder
from scbch_dist.models.encoders import (IMAGE_ENCODERS, BowText, ClipFeatures, Doc2VecText, ExtractError, Preprocess,
                                        check_doc2vec_folder, import_gensim)


@dataclass(frozen=True)
class TextOptions:
    """extract's text options: the raw dataset ``src``, its --bow-dim, --doc2vec-* and --seed flags,
    and ``clip``, the model of --clip-weights (None unless a recipe with ``uses_clip`` is chosen)."""

    src: Path
    bow_dim: int  # (the defaults are extract()'s)
    doc2vec_dim: int
    doc2vec_epochs: int
    doc2vec_window: int
    doc2vec_min_count: int
    seed: int
    clip: ClipFeatures | None = None


@dataclass(frozen=True)
class ReplayedText:
    """A dataset's text recipe rebuilt for queries: ``encode`` maps (n,) str to (n, D) features;
    ``known`` is the words it can encode (None: any word), and ``vocabulary`` names them in the
    error for a word outside."""

    encode: Callable[[list[str]], np.ndarray]
    known: set[str] | None = None
    vocabulary: str = ""


@dataclass(frozen=True)
class TextRecipe:
    """One text recipe.

    make: options -> (encoder, record): an object with ``dim`` and ``encode(texts) -> (n, dim)``,
        and the settings meta.json keeps (they enter the extraction's fingerprint).
    replay: (meta.source, dataset root, the dataset's CLIP model loader) -> ReplayedText; raises
        ExtractError (or digests.IntegrityError) when the record cannot be replayed.
    replayable: (record, dataset root) -> whether ``replay`` has what it needs.
    fit: (encoder, the training texts, a folder) -> None, for an encoder trained on the training
        texts: train it, or load it when the folder holds it already (a resumed extraction), and
        save it there. The folder is kept beside the dataset's shards, named as the recipe, and
        ``kept`` gives the record's entries that point to it: (name, folder) -> dict.
    dtypes: the storage types it allows, the default first.
    """

    name: str
    make: Callable[[TextOptions], tuple[Any, dict]]
    replay: Callable[[dict, Path, Callable[[], ClipFeatures]], ReplayedText]
    replayable: Callable[[dict, Path], bool]
    fit: Callable[[Any, Callable[[], list[str]], Path], None] | None = None
    kept: Callable[[str, Path], dict] | None = None
    dtypes: tuple[str, ...] = ("float16", "float32")
    uses_clip: bool = False


TEXT_RECIPES: dict[str, TextRecipe] = {}


def register_text_recipe(recipe: TextRecipe) -> TextRecipe:
    if recipe.name in TEXT_RECIPES:
        raise ValueError(f"text recipe {recipe.name!r} is registered already")
    TEXT_RECIPES[recipe.name] = recipe
    return recipe


def text_recipe(name: str) -> TextRecipe:
    """The registered recipe ``name``; ExtractError naming the known ones otherwise."""
    if name not in TEXT_RECIPES:
        raise ExtractError(f"unknown text encoder {name!r}; known: {', '.join(TEXT_RECIPES)}")
    return TEXT_RECIPES[name]


# ----------------------------------------------------------------------------------------------
# doc2vec: gensim PV-DM trained on the training texts, every text inferred


def _make_doc2vec(o: TextOptions) -> tuple[Doc2VecText, dict]:
    for opt, v in (("--doc2vec-dim", o.doc2vec_dim), ("--doc2vec-epochs", o.doc2vec_epochs),
                   ("--doc2vec-window", o.doc2vec_window), ("--doc2vec-min-count", o.doc2vec_min_count)):
        if v < 1:
            raise ExtractError(f"{opt} must be positive, got {v}")
    gensim = import_gensim()
    text = Doc2VecText(dim=o.doc2vec_dim, epochs=o.doc2vec_epochs, window=o.doc2vec_window,
                       min_count=o.doc2vec_min_count, seed=o.seed)
    return text, {**text.settings(), "gensim": gensim.__version__}


def _fit_doc2vec(text: Doc2VecText, training_texts: Callable[[], list[str]], folder: Path) -> None:
    if folder.is_dir():  # a resumed extraction infers with the very same model
        text.load(folder)
        return
    print(f"extract: training Doc2Vec ({text.dim}-d, {text.epochs} epochs) on the training texts", file=sys.stderr)
    text.train(training_texts())
    text.save(folder)


def _kept_doc2vec(name: str, folder: Path) -> dict:
    # the model is a pickle: its files' digests go into meta.json, which every reader checks first
    return {"model": f"{name}/model", "model_manifest_sha256": seal_folder(folder)}


def _replay_doc2vec(source: dict, root: Path, clip: Callable[[], ClipFeatures]) -> ReplayedText:
    record = source["text"]
    names = ("dim", "epochs", "window", "min_count", "dm", "negative", "sample", "seed")
    text = Doc2VecText(**{k: record[k] for k in names if k in record})
    folder = (root / record["model"]).parent
    check_doc2vec_folder(folder, record.get("model_manifest_sha256"))
    text.load(folder)
    return ReplayedText(text.encode, set(text.model.wv.key_to_index),
                        f"the Doc2Vec model of {root} (the training texts)")


register_text_recipe(TextRecipe(
    "doc2vec", _make_doc2vec, _replay_doc2vec,
    replayable=lambda record, root: bool(record.get("model")) and (root / record["model"]).is_file(),
    fit=_fit_doc2vec, kept=_kept_doc2vec))


# ----------------------------------------------------------------------------------------------
# bow: a binary bag of the most frequent training words


def _make_bow(o: TextOptions) -> tuple[BowText, dict]:
    if o.bow_dim < 1:
        raise ExtractError(f"--bow-dim must be positive, got {o.bow_dim}")
    words = read_vocab(o.src)[0][:o.bow_dim]
    if not words:
        raise ExtractError(f"{o.src / VOCAB_FILE}: empty vocabulary; the training texts have no words")
    if len(words) < o.bow_dim:
        print(f"extract: the training texts have {len(words)} distinct words, fewer than --bow-dim {o.bow_dim}; "
              f"the bag of words is {len(words)}-d", file=sys.stderr)
    return BowText(words), {"encoder": "bow", "dim": len(words), "requested_dim": o.bow_dim, "binary": True,
                            "vocab_sha256": sha256_file(o.src / VOCAB_FILE), "words": words}


def _replay_bow(source: dict, root: Path, clip: Callable[[], ClipFeatures]) -> ReplayedText:
    # the training texts' words that the bag leaves out are dropped, as extraction did
    words = source["text"]["words"]
    raw = Path(source.get("dataset", ""))
    if (raw / VOCAB_FILE).is_file():
        return ReplayedText(BowText(words).encode, set(read_vocab(raw)[0]), f"the training texts ({raw / VOCAB_FILE})")
    return ReplayedText(BowText(words).encode, set(words), f"the bag of words of {root}")


register_text_recipe(TextRecipe(
    "bow", _make_bow, _replay_bow, replayable=lambda record, root: bool(record.get("words")),
    dtypes=("uint8", "float16", "float32")))


# ----------------------------------------------------------------------------------------------
# clip: the CLIP model's text embedding, by its own tokenizer


def _make_clip(o: TextOptions) -> tuple[ClipFeatures, dict]:
    return o.clip, {"encoder": "clip", "dim": o.clip.dim,
                    "layer": f"the model's {o.clip.provenance['features']} text features", **o.clip.provenance}


register_text_recipe(TextRecipe(
    "clip", _make_clip, lambda source, root, clip: ReplayedText(clip().encode),  # byte pairs spell any word
    replayable=lambda record, root: bool(record.get("weights")),  # the loader says so if the model is gone
    uses_clip=True))


# ----------------------------------------------------------------------------------------------
# Image features: an IMAGE_ENCODERS network, or the CLIP model's image tower

CLIP = "clip"


def image_recipe_names() -> list[str]:
    return [*IMAGE_ENCODERS, CLIP]


def make_image_features(name: str, *, clip: ClipFeatures | None, weights: str | None, seed: int,
                        image_size: int) -> tuple[nn.Module, int, Preprocess, dict]:
    """Extraction's image network ``name``: (network mapping normalised (n, 3, S, S) float32 to
    (n, dim), dim, its preprocessing, the record meta.json keeps of it). ``clip``: the model of
    --clip-weights, for ``name`` clip (which takes the model's own input size and preprocessing)."""
    if name == CLIP:
        net, dim, prep = clip.image_net, clip.image_dim, clip.preprocess
        record = {"encoder": CLIP, "layer": f"the model's {clip.provenance['features']} image features", "dim": dim,
                  **clip.provenance}
    else:
        if name not in IMAGE_ENCODERS:
            raise ExtractError(f"unknown image encoder {name!r}; known: {', '.join(image_recipe_names())}")
        encoder = IMAGE_ENCODERS[name]
        net, weights_info = encoder.build(weights, seed)
        dim, prep = encoder.dim, Preprocess(image_size, encoder.mean, encoder.std)
        record = {"encoder": encoder.name, "layer": encoder.layer, "dim": encoder.dim, **weights_info}
    record.update({"image_size": prep.size, "resize_shorter_side": prep.resize, "interpolation": prep.interpolation,
                   "mean": list(prep.mean), "std": list(prep.std)})
    return net, dim, prep, record


def replay_image_features(record: dict, root: Path, clip: Callable[[], ClipFeatures]) -> tuple[nn.Module, Preprocess]:
    """The image network and preprocessing that made a dataset's image features, rebuilt from its
    record (meta.json's ``source["image"]``) for a query; ExtractError naming what is missing."""
    if record["encoder"] == CLIP:
        model = clip()
        return model.image_net, model.preprocess
    if record["encoder"] not in IMAGE_ENCODERS:
        raise ExtractError(f"{root}/meta.json: image encoder {record['encoder']!r} is not one this version knows")
    encoder = IMAGE_ENCODERS[record["encoder"]]
    weights = record.get("weights")
    if encoder.weights_file and weights not in (None, "random"):
        path = Path(weights)
        if not path.is_file():
            raise ExtractError(f"{path}: the image encoder's weights that made the features of {root} are gone; "
                               "put them back there to query by image, or query by --id")
        if record.get("weights_sha256") and sha256_file(path) != record["weights_sha256"]:
            raise ExtractError(f"{path}: not the weights that made the features of {root} (sha256 differs)")
    net, _ = encoder.build(weights if encoder.weights_file else None, record.get("seed", 0))
    return net.eval(), Preprocess(record["image_size"], tuple(record["mean"]), tuple(record["std"]))
