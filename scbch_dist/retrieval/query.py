"""New queries for a finished run: a caption or an image in, a binary code out (docs/search.md).

Raw runs (images and captions in the shards) encode a query exactly as the run's evaluation did:
the tokenizer of its text encoder, the deterministic image transform, the trained backbones and
hash towers of the latest checkpoint. Feature runs encode it with the recipe that made the
dataset's features, when meta.json records one that can be replayed (``python -m scbch_dist.extract``:
the image encoder with its weights, and the bag of words); anything else is queried by the id of
a stored sample (``search --id``). The checkpoint must hold the model that wrote ``codes.npz``
(checked by the weights' fingerprint), so a query code lives in the same space as the database.

Also here: what a database item looks like to a person (its caption, its image bytes, where the
image is stored), read from the run's dataset, or from the raw dataset an extracted one came from.
"""

from __future__ import annotations

import difflib
import io
import re
import tarfile
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from scbch_dist.config import Config
from scbch_dist.data.format import VOCAB_FILE, DatasetMeta, read_meta, read_vocab, text_words
from scbch_dist.engine.encode import autocast_of
from scbch_dist.errors import ScbchError, first_line
from scbch_dist.run import RunFolder

IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
# Pixels (width x height) a query image may have: a 24-megapixel camera photo (6000 x 4000) passes,
# and decoding the largest one takes about 75 MB as RGB. PIL's own limit (89 megapixels, an error
# only from 179) lets a 17 KB 1-bit PNG of 12000 x 12000 decode to 700 MB. The default of
# --max-pixels in search and serve.
MAX_PIXELS = 25_000_000


class QueryError(ScbchError, ValueError):
    """A query the run cannot encode: unknown words, an unreadable image, no model or recipe."""


def unknown_words(words: list[str], vocabulary: dict | set, where: str) -> None:
    """Refuse words outside ``vocabulary`` by name, with the nearest known words."""
    missing = [w for w in dict.fromkeys(words) if w not in vocabulary]
    if not missing:
        return
    hints = []
    for w in missing:
        close = difflib.get_close_matches(w, list(vocabulary), n=1)
        hints.append(f"{w!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise QueryError(f"unknown word{'s' if len(missing) > 1 else ''} {', '.join(hints)}: not in the "
                     f"{len(vocabulary)}-word vocabulary of {where}")


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> bytes:
    """The bytes of an image file the query transform can decode; a one-line error otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QueryError(f"{path}: cannot read the image ({e.strerror or e})") from None
    check_image(data, str(path), max_pixels)
    return data


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g}"


def check_image(data: bytes, where: str, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse, in one line naming ``where``, bytes that are not an image, and an image of more
    than ``max_pixels`` pixels (width x height). The size comes from the header, before anything
    is decoded: a small file can claim a huge image, and decoding it is the attack."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            width, height = im.size
            if width * height <= max_pixels:
                im.verify()  # the chunks' checksums, without decompressing them
    except Image.DecompressionBombError as e:  # beyond PIL's own limit: it refuses in open, without the size
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{megapixels(int(pixels[1]))} megapixels" if pixels else "too many pixels"
        raise QueryError(f"{where}: {size}, more than the {megapixels(max_pixels)} a query image may have "
                         "(--max-pixels)") from None
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... on bad bytes
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # PIL names its buffer
        raise QueryError(f"{where}: not a readable image ({type(e).__name__}: {reason})") from None
    if width * height > max_pixels:
        raise QueryError(f"{where}: {width} x {height} = {megapixels(width * height)} megapixels, more than the "
                         f"{megapixels(max_pixels)} a query image may have (--max-pixels)")


class QueryEncoder:
    """Texts and images -> (1, L) bool codes, with the run's trained model.

    ``cfg``: the run's config; ``root``: its dataset folder; ``run_dir``: the run, whose latest
    checkpoint holds the model (loaded on the first encoded query); ``model_sha256``: the
    fingerprint codes.npz records, which the loaded weights must match (empty: not checked, for
    codes written before fingerprints); ``precision``: the autocast codes.npz records, under which
    queries are encoded as the run encoded its own ("" or "no": float32); ``max_pixels``: the
    largest query image, width x height."""

    def __init__(self, cfg: Config, root: Path, meta: DatasetMeta, run_dir: Path, model_sha256: str,
                 max_pixels: int = MAX_PIXELS, precision: str = ""):
        self.cfg, self.root, self.meta = cfg, root, meta
        self.run_dir, self.model_sha256, self.max_pixels = run_dir, model_sha256, max_pixels
        self.autocast = autocast_of(precision, torch.device("cpu"))

    # -- what can be encoded -------------------------------------------------------------------

    def text_recipe(self) -> str | None:
        """Why texts cannot be encoded (None when they can)."""
        if self.meta.kind("txt") == "text":
            return None
        from scbch_dist.models.recipes import TEXT_RECIPES

        text = self.meta.source.get("text", {}) if self.meta.source.get("kind") == "extract" else {}
        recipe = TEXT_RECIPES.get(text.get("encoder"))
        if recipe is not None and recipe.replayable(text, self.root):
            return None
        made_by = text.get("encoder") or self.meta.source.get("kind") or self.meta.source.get("generator") or "an unknown recipe"
        return (f"dataset {self.meta.name!r} ({self.root}) stores text features made by {made_by}, which this run "
                "cannot replay for a new text; query a stored sample with --id N")

    def image_recipe(self) -> str | None:
        if self.meta.kind("img") == "image":
            return None
        image = self.meta.source.get("image", {}) if self.meta.source.get("kind") == "extract" else {}
        if image.get("encoder"):
            return None
        made_by = self.meta.source.get("kind") or self.meta.source.get("generator") or "an unknown recipe"
        return (f"dataset {self.meta.name!r} ({self.root}) stores image features made by {made_by}, which this run "
                "cannot replay for a new image; query a stored sample with --id N")

    # -- encoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, text: str) -> np.ndarray:
        """(1, L) bool code of a caption or tag list."""
        why = self.text_recipe()
        if why:
            raise QueryError(why)
        words = text_words(text)
        if not words:
            raise QueryError(f"the query {text!r} has no words")
        if self.meta.kind("txt") == "text":
            ids, mask = self._tokenize(text, words)
            with self.autocast():
                h = self.model.encode("txt", torch.from_numpy(ids), torch.from_numpy(mask))
        else:
            features = torch.from_numpy(self.text_features(text))
            with self.autocast():
                h = self.model.encode("txt", features)
        return (h >= 0).numpy()

    @torch.no_grad()
    def encode_image(self, data: bytes, where: str = "the image") -> np.ndarray:
        """(1, L) bool code of an encoded image (JPEG, PNG, WebP ...)."""
        why = self.image_recipe()
        if why:
            raise QueryError(why)
        check_image(data, where, self.max_pixels)
        if self.meta.kind("img") == "image":
            from scbch_dist.data.transforms import ImageTransform

            x = torch.from_numpy(ImageTransform(self.cfg.model.image.image_size, train=False)(data, None))[None]
        else:
            x = torch.from_numpy(self.image_features(data, where))
        with self.autocast():
            h = self.model.encode("img", x)
        return (h >= 0).numpy()

    def text_features(self, text: str) -> np.ndarray:
        """(1, D) text feature of a feature dataset, as extraction stored it (its dtype)."""
        replayed = self._text_recipe
        if replayed.known is not None:
            unknown_words(text_words(text), replayed.known, replayed.vocabulary)
        return replayed.encode([text]).astype(self.meta.fields["txt"].dtype)

    def image_features(self, data: bytes, where: str = "the image") -> np.ndarray:
        """(1, D) image feature of a feature dataset, as extraction stored it (its dtype)."""
        net, prep = self._extractor
        with torch.inference_mode():
            feature = net(prep(data, where)[None]).float().numpy()
        return feature.astype(self.meta.fields["img"].dtype)

    def _tokenize(self, text: str, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from scbch_dist.models.tokenizers import HFTokenizer, WordTokenizer

        tokenizer = self._tokenizer
        if not isinstance(tokenizer, (HFTokenizer, WordTokenizer)):  # CLIP's byte pairs spell any word
            return tokenizer([text])
        if isinstance(tokenizer, HFTokenizer):  # word pieces cover most words; refuse what maps to [UNK]
            inner = tokenizer.tokenizer
            bad = [w for w in words if inner.unk_token_id in inner(w, add_special_tokens=False)["input_ids"]]
            if bad:
                raise QueryError(f"unknown word{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}: the "
                                 f"tokenizer of {self.cfg.model.text.weights} maps {'them' if len(bad) > 1 else 'it'} "
                                 f"to {inner.unk_token}")
        else:  # words of the training texts beyond model.text.vocab_size are [UNK], as in training
            unknown_words(words, set(read_vocab(self.root)[0]), f"the training texts ({self.root / VOCAB_FILE})")
        return tokenizer([text])

    @cached_property
    def _tokenizer(self):
        from scbch_dist.models.tokenizers import make_tokenizer

        return make_tokenizer(self.cfg.model, self.root)

    @cached_property
    def _text_recipe(self):
        """The dataset's text recipe, rebuilt from meta.source (models/recipes.py)."""
        from scbch_dist.digests import IntegrityError
        from scbch_dist.models.encoders import ExtractError
        from scbch_dist.models.recipes import text_recipe

        try:
            recipe = text_recipe(self.meta.source["text"]["encoder"])
            return recipe.replay(self.meta.source, self.root, lambda: self._clip("text"))
        except (ExtractError, IntegrityError) as e:
            raise QueryError(f"{e}; or query a stored sample with --id N") from None

    def _clip(self, part: str):
        """The CLIP model that extracted the dataset's ``part`` ("image" or "text") features, from
        meta.source: its weights where they were, checked by digest."""
        from scbch_dist.models.encoders import ClipFeatures, ExtractError, weights_sha256

        recipe = self.meta.source[part]
        key = (recipe["weights"], recipe.get("name", ""), recipe.get("features", "projected"))
        if key not in self._clips:
            if recipe["weights"] != "random":
                path = Path(recipe["weights"])
                if not path.exists():
                    raise QueryError(f"{path}: the CLIP model that made the {part} features of {self.root} is gone; put "
                                     "it back there to query by " + ("image" if part == "image" else "text") +
                                     ", or query by --id")
                if recipe.get("weights_sha256") and weights_sha256(path) != recipe["weights_sha256"]:
                    raise QueryError(f"{path}: not the CLIP model that made the {part} features of {self.root} "
                                     "(sha256 differs)")
            try:
                self._clips[key] = ClipFeatures(key[0], key[1], features=key[2])
            except ExtractError as e:
                raise QueryError(f"{self.root}/meta.json: {e}") from None
        return self._clips[key]

    @cached_property
    def _clips(self) -> dict:
        return {}

    @cached_property
    def _extractor(self):
        """The image feature extractor of an extracted dataset, rebuilt from meta.source (models/recipes.py)."""
        from scbch_dist.models.encoders import ExtractError
        from scbch_dist.models.recipes import replay_image_features

        try:
            return replay_image_features(self.meta.source["image"], self.root, lambda: self._clip("image"))
        except ExtractError as e:
            raise QueryError(str(e)) from None

    @cached_property
    def model(self) -> torch.nn.Module:
        """The run's network with the checkpoint's weights, on CPU, in eval mode."""
        from safetensors.torch import load_file

        from scbch_dist.engine.checkpoint import (MODEL_FILE, CheckpointError, latest_checkpoint, model_fingerprint,
                                                  verify_model_file)
        from scbch_dist.engine.setup import build_network, method_class

        try:
            path = latest_checkpoint(self.run_dir) / MODEL_FILE
            if not path.is_file():
                raise QueryError(f"{path}: missing (a DeepSpeed checkpoint keeps its own files); encoding a query "
                                 "needs the model; query a stored sample with --id N")
            verify_model_file(path.parent)  # against the checkpoint's manifest: a damaged file is never loaded
        except CheckpointError as e:
            raise QueryError(f"{e}; encoding a query needs the run's model (query a stored sample with --id N)") from None
        try:  # a run of an earlier version has no manifest to find a damaged file by: safetensors finds it
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError (no common base), OSError: the file cannot be read
            if isinstance(e, (MemoryError, RecursionError)):
                raise
            raise QueryError(f"{path}: cannot be read ({type(e).__name__}: {first_line(e)}); encoding a query needs the "
                             "run's model (query a stored sample with --id N)") from None
        if self.model_sha256 and model_fingerprint(state) != self.model_sha256:
            raise QueryError(f"{path}: not the model that wrote {RunFolder.CODES} (the run went on after it); finish the run "
                             "(python -m scbch_dist.train --resume RUN_DIR) so that codes and model agree")
        vocab = self._tokenizer.vocab_size if self.meta.kind("txt") == "text" else None
        with torch.random.fork_rng(devices=[]):  # the weights are overwritten: the caller's random state is kept
            net = build_network(method_class(self.cfg), self.cfg, self.meta, vocab)
        net.load_state_dict(state, strict=True)
        return net.eval()


class DatasetItems:
    """Captions, images and where they are stored, for the samples of a dataset's splits.

    A raw dataset shows its own; an extracted feature dataset shows those of the raw dataset it
    was extracted from (meta.source.dataset, same ids) while that folder exists; others show
    labels only. Shard offsets are read once per shard, on first use."""

    def __init__(self, root: Path, meta: DatasetMeta):
        self.root, self.meta = root, meta
        self.raw_root, self.raw_meta = self._raw_source(root, meta)
        self._members: dict[tuple[str, int], dict[int, dict[str, tarfile.TarInfo]]] = {}

    @staticmethod
    def _raw_source(root: Path, meta: DatasetMeta) -> tuple[Path | None, DatasetMeta | None]:
        if meta.raw:
            return root, meta
        src = meta.source.get("dataset") if meta.source.get("kind") == "extract" else None
        if src and (Path(src) / "meta.json").is_file():
            try:
                return Path(src), read_meta(src)
            except ScbchError:
                return None, None
        return None, None

    @property
    def has_captions(self) -> bool:
        return self.raw_meta is not None and self.raw_meta.kind("txt") == "text"

    @property
    def has_images(self) -> bool:
        return self.raw_meta is not None and self.raw_meta.kind("img") == "image"

    def _shard_of(self, split: str, sample: int) -> int:
        counts = np.cumsum(self.raw_meta.splits[split].shard_counts)
        if not 0 <= sample < counts[-1]:
            raise QueryError(f"{split} has no sample {sample} (ids 0..{counts[-1] - 1})")
        return int(np.searchsorted(counts, sample, side="right"))

    def _member(self, split: str, sample: int) -> tuple[Path, dict[str, tarfile.TarInfo]]:
        shard = self._shard_of(split, sample)
        path = self.raw_root / self.raw_meta.splits[split].shards[shard]
        if (split, shard) not in self._members:
            table: dict[int, dict[str, tarfile.TarInfo]] = {}
            with tarfile.open(path) as tar:
                for info in tar.getmembers():
                    key, _, field = info.name.partition(".")
                    if key.isdigit():
                        table.setdefault(int(key), {})[field] = info
            self._members[(split, shard)] = table
        return path, self._members[(split, shard)].get(sample, {})

    def _read(self, path: Path, info: tarfile.TarInfo) -> bytes:
        with open(path, "rb") as f:
            f.seek(info.offset_data)
            return f.read(info.size)

    def caption(self, split: str, sample: int) -> str | None:
        if not self.has_captions:
            return None
        path, fields = self._member(split, sample)
        return self._read(path, fields["txt"]).decode("utf-8") if "txt" in fields else None

    def image(self, split: str, sample: int) -> tuple[bytes, str] | None:
        """(encoded bytes, MIME type) of a sample's image, or None."""
        if not self.has_images:
            return None
        path, fields = self._member(split, sample)
        for ext, mime in IMAGE_TYPES.items():
            if ext in fields:
                return self._read(path, fields[ext]), mime
        return None

    def image_path(self, split: str, sample: int) -> str | None:
        """Where the image is stored: ``shard.tar:member``."""
        if not self.has_images:
            return None
        path, fields = self._member(split, sample)
        ext = next((e for e in IMAGE_TYPES if e in fields), None)
        return f"{path}:{fields[ext].name}" if ext else None

