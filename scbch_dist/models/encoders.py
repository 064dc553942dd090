"""Feature encoders of raw images and texts with fixed weights: the image encoders (VGG-19 fc7,
EfficientNet-Lite0) and their ImageNet preprocessing, the bag of words and the Doc2Vec text encoder.
``python -m scbch_dist.extract`` runs them over a raw dataset; a search replays them to encode a new
query exactly as the dataset's features were made (docs/search.md)."""

from __future__ import annotations

import hashlib
import io
import pickle
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from scbch_dist.atomic import atomic_directory
from scbch_dist.data.format import ShardError, sha256_file, text_words
from scbch_dist.errors import ScbchError

DOC2VEC_DIR = "doc2vec"
# What the pickle of a gensim Doc2Vec model names (module, name): its own classes, numpy's arrays and
# random state, a few builtins, the stable hash it is trained with. Unpickling calls what a pickle
# names, so anything else (os.system, builtins.eval, subprocess.Popen, ...) is a file crafted to run
# code: refused before it is called (docs/search.md, "Files that could run code").
DOC2VEC_PICKLE_GLOBALS = frozenset({
    ("gensim.models.doc2vec", "Doc2Vec"), ("gensim.models.keyedvectors", "KeyedVectors"),
    ("gensim.utils", "call_on_class_only"), ("scbch_dist.models.encoders", "_stable_hash"),
    ("builtins", "hash"), ("builtins", "int"), ("builtins", "float"), ("builtins", "complex"), ("builtins", "str"),
    ("builtins", "bytes"), ("builtins", "bytearray"), ("builtins", "list"), ("builtins", "tuple"),
    ("builtins", "dict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "object"), ("copyreg", "_reconstructor"),
    ("collections", "defaultdict"), ("collections", "OrderedDict"), ("collections", "Counter"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy.random._pickle", "__randomstate_ctor"), ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"), ("numpy.random._mt19937", "MT19937"),
    ("numpy.random.mtrand", "RandomState"),
})
_GENSIM_LOAD = threading.Lock()  # the restricted unpickler is swapped into gensim for one load at a time
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
FLOAT16_MAX = 65504.0


class ExtractError(ScbchError, ValueError):
    """A bad input or setting; the message names the file, sample or option."""


# ----------------------------------------------------------------------------------------------
# Image encoders: a small registry (name -> how to build the network and normalise its input)


@dataclass(frozen=True)
class ImageEncoder:
    name: str
    dim: int  # feature width
    mean: tuple[float, float, float]  # per-channel normalisation of [0, 1] RGB input
    std: tuple[float, float, float]
    # (weights, seed) -> (network mapping (n, 3, S, S) float32 to (n, dim), provenance)
    build: Callable[[str | None, int], tuple[nn.Module, dict]]
    layer: str = ""  # what the feature is, for meta.source
    weights_file: bool = False  # takes a weights file (--vgg-weights), which a query's replay finds and checks


IMAGE_ENCODERS: dict[str, ImageEncoder] = {}


def register_image_encoder(encoder: ImageEncoder) -> ImageEncoder:
    IMAGE_ENCODERS[encoder.name] = encoder
    return encoder


def _load_state_dict(path: Path, expected: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a state dict we can use"
        raise ExtractError(f"{path}: not a readable torch state dict ({type(e).__name__}: {e}); expected {expected}") from None
    if not isinstance(state, dict):
        raise ExtractError(f"{path}: holds a {type(state).__name__}, expected a state dict ({expected})")
    return state


def _default_vgg_weights() -> Path:
    """Where torchvision itself caches the file (``torch.hub`` checkpoints folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE


def _vgg19_fc7(weights: str | None, seed: int) -> tuple[nn.Module, dict]:
    tv = import_torchvision()
    if weights == "random":
        # a private RNG stream: building the network leaves the caller's torch RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = tv.models.vgg19(weights=None)
        info = {"weights": "random", "seed": seed}
    else:
        path = Path(weights).expanduser() if weights else _default_vgg_weights()
        if not path.is_file():
            raise ExtractError(
                f"VGG-19 weights not found: {path}. Expected torchvision's ImageNet VGG-19 state dict "
                f"({VGG19_FILE}, 548 MB); download it on a machine with network access from {VGG19_URL} "
                f"(or run torchvision.models.vgg19(weights='IMAGENET1K_V1') there once; it lands in "
                f"{_default_vgg_weights().parent}), copy it here and pass --vgg-weights PATH. "
                f"--vgg-weights random builds a randomly initialised network for tests and dry runs.")
        state = _load_state_dict(path, f"torchvision's vgg19 weights such as {VGG19_FILE}")
        with torch.device("meta"):  # no 143M-parameter random init just to overwrite it
            net = tv.models.vgg19(weights=None)
        try:
            net.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ExtractError(f"{path}: not a torchvision vgg19 state dict ({str(e).splitlines()[0]} ...)") from None
        info = {"weights": str(path.resolve()), "weights_sha256": sha256_file(path)}
    # fc7 = Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU; eval() turns dropout off
    fc7 = nn.Sequential(net.features, net.avgpool, nn.Flatten(1), net.classifier[:5])
    return fc7.eval(), info


class _PooledFeatures(nn.Module):
    """A backbone's pooled features of normalised float input: (n, 3, S, S) -> (n, dim) (Lite0's,
    a CLIP image tower's: ``features`` skips the backbone's own uint8 normalisation)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)


def _efficientnet_lite0(weights: str | None, seed: int) -> tuple[nn.Module, dict]:
    from scbch_dist.models.backbones import EfficientNetLite0Image, WeightsError, efficientnet_lite0_package_weights

    if weights is not None:
        raise ExtractError("efficientnet-lite0 uses the weights its package ships; --vgg-weights applies to vgg19 only")
    try:  # the fine-tuning backbone, so extracted and fine-tuned Lite0 features are one definition
        net = EfficientNetLite0Image("package")
        path = efficientnet_lite0_package_weights()
    except (ImportError, WeightsError) as e:
        raise ExtractError(f"--image-encoder efficientnet-lite0: {e}") from None
    return _PooledFeatures(net).eval(), {"weights": str(path), "weights_sha256": sha256_file(path)}


register_image_encoder(ImageEncoder("vgg19", 4096, IMAGENET_MEAN, IMAGENET_STD, _vgg19_fc7,
                                    layer="fc7: classifier[:5] (fc6, ReLU, dropout off, fc7, ReLU)", weights_file=True))
# EfficientNet-Lite is trained with inception-style input scaling: (x * 255 - 127) / 128
register_image_encoder(ImageEncoder("efficientnet-lite0", 1280, (127 / 255,) * 3, (128 / 255,) * 3,
                                    _efficientnet_lite0, layer="global average pool of the last conv stage (conv_head, BN, swish)"))


def import_torchvision():
    try:
        import torchvision
    except ImportError:
        raise ExtractError("image extraction needs torchvision (pip install 'scbch_dist[finetune]')") from None
    return torchvision


@dataclass(frozen=True)
class Preprocess:
    """Encoded image bytes -> (3, size, size) float32 tensor: the shorter side resized, the centre
    crop, per-channel normalisation. By default the ImageNet evaluation transform (shorter side
    256/224 of the crop, bilinear); CLIP's own resizes the shorter side to the crop (bicubic)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_side: int = 0  # 0: round(size * 256 / 224)
    interpolation: str = "bilinear"  # bilinear | bicubic

    @property
    def resize(self) -> int:
        return self.resize_side or round(self.size * 256 / 224)  # 224 -> 256, the standard short-side resize

    def __call__(self, data: bytes, where: str) -> torch.Tensor:
        from PIL import Image
        import torchvision.transforms.functional as F

        try:
            with Image.open(io.BytesIO(data)) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... on bad bytes
            raise ShardError(f"{where}: field 'img' is not a decodable image ({e})") from None
        mode = F.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else F.InterpolationMode.BILINEAR
        img = F.resize(img, self.resize, interpolation=mode, antialias=True)
        img = F.center_crop(img, [self.size, self.size])
        return F.normalize(F.to_tensor(img), list(self.mean), list(self.std))


# ----------------------------------------------------------------------------------------------
# Text encoders


def _stable_hash(text: str) -> int:
    """A process-independent string hash (Python's ``hash`` changes with PYTHONHASHSEED)."""
    return zlib.crc32(text.encode("utf-8"))


def _weak_vector(size: int, seed_string: str) -> np.ndarray:
    """gensim's ``pseudorandom_weak_vector`` with a stable hash: (size,) float32 in +-0.5/size."""
    once = np.random.Generator(np.random.SFC64(_stable_hash(seed_string) & 0xffffffff))
    return (once.random(size).astype(np.float32) - 0.5) / size


@dataclass
class BowText:
    """Binary bag of words over the ``dim`` most frequent training words: (n,) str -> (n, dim) uint8."""

    words: list[str]

    @property
    def dim(self) -> int:
        return len(self.words)

    def encode(self, texts: list[str]) -> np.ndarray:
        index = {w: j for j, w in enumerate(self.words)}
        out = np.zeros((len(texts), self.dim), dtype=np.uint8)
        for i, text in enumerate(texts):
            cols = [index[w] for w in text_words(text) if w in index]
            out[i, cols] = 1
        return out


@dataclass
class Doc2VecText:
    """gensim Doc2Vec (PV-DM by default) trained on the training texts; every text is *inferred*.

    Inference for all splits, training texts included, so that a text has one vector wherever
    it occurs (the database split repeats the training samples) and a vector depends on the
    model and the text only, not on its position in the training corpus.
    """

    dim: int = 300
    epochs: int = 20
    window: int = 5
    min_count: int = 1
    dm: int = 1
    negative: int = 5
    sample: float = 1e-3
    seed: int = 0
    model: Any = field(default=None, repr=False)

    name = "doc2vec"

    def settings(self) -> dict:
        return {"encoder": self.name, "dim": self.dim, "epochs": self.epochs, "window": self.window,
                "min_count": self.min_count, "dm": self.dm, "negative": self.negative, "sample": self.sample,
                "seed": self.seed, "workers": 1, "trained_on": "train split", "vectors": "infer_vector, all splits"}

    def train(self, texts: list[str]) -> None:
        gensim = import_gensim()
        docs = [gensim.models.doc2vec.TaggedDocument(text_words(t), [i]) for i, t in enumerate(texts)]
        # workers=1: gensim's multi-threaded training is order-nondeterministic; the seed then
        # fixes every random draw. hashfxn is unused by gensim 4 (vectors are seeded from
        # `seed`), passed so that versions that do use it stay process-independent.
        model = gensim.models.Doc2Vec(vector_size=self.dim, window=self.window, min_count=self.min_count,
                                      dm=self.dm, negative=self.negative, hs=0, sample=self.sample,
                                      epochs=self.epochs, seed=self.seed, workers=1, hashfxn=_stable_hash)
        model.build_vocab(docs)
        model.train(docs, total_examples=len(docs), epochs=self.epochs)
        self.model = model

    def save(self, folder: Path) -> None:
        with atomic_directory(folder) as tmp:
            self.model.save(str(tmp / "model"))

    def load(self, folder: Path) -> None:
        self.model = load_doc2vec(folder / "model")

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n,) str -> (n, dim) float32."""
        return np.stack([_infer_doc2vec(self.model, text_words(t), self.seed) for t in texts]) if texts else \
            np.zeros((0, self.dim), dtype=np.float32)


def _infer_doc2vec(model, words: list[str], seed: int) -> np.ndarray:
    """``Doc2Vec.infer_vector(words)``, made a pure function of (model, words).

    gensim 4 seeds the start vector with Python's ``hash`` of the text (different in every
    process) and draws window shrinking and negative samples from ``model.random``, whose state
    depends on every earlier call. Here the start vector uses a stable hash and ``model.random``
    is reseeded per text; the update loop is gensim's own. Returns (dim,) float32.
    """
    from gensim.models.doc2vec_inner import train_document_dbow, train_document_dm, train_document_dm_concat

    size = model.dv.vector_size
    vec = _weak_vector(size, " ".join(words)).reshape(1, size)
    lockf = np.ones(1, dtype=np.float32)
    work = np.zeros(model.layer1_size, dtype=np.float32)
    neu1 = np.zeros(model.layer1_size, dtype=np.float32)
    model.random = np.random.RandomState(seed)
    alpha, min_alpha, epochs = model.alpha, model.min_alpha, model.epochs
    alpha_delta = (alpha - min_alpha) / max(epochs - 1, 1)
    for _ in range(epochs):
        if model.sg:
            train_document_dbow(model, words, [0], alpha, work, learn_words=False, learn_hidden=False,
                                doctag_vectors=vec, doctags_lockf=lockf)
        elif model.dm_concat:
            train_document_dm_concat(model, words, [0], alpha, work, neu1, learn_words=False, learn_hidden=False,
                                     doctag_vectors=vec, doctags_lockf=lockf)
        else:
            train_document_dm(model, words, [0], alpha, work, neu1, learn_words=False, learn_hidden=False,
                              doctag_vectors=vec, doctags_lockf=lockf)
        alpha -= alpha_delta
    return vec[0]


class _Doc2VecUnpickler(pickle.Unpickler):
    """An unpickler that resolves only DOC2VEC_PICKLE_GLOBALS."""

    def find_class(self, module: str, name: str):
        if (module, name) not in DOC2VEC_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which no Doc2Vec model holds (a file crafted to "
                                         "run code when unpickled)")
        return super().find_class(module, name)


DOC2VEC_REMEDY = "extract the dataset again"


def check_doc2vec_folder(folder: Path, manifest_sha256: str | None) -> None:
    """A dataset's Doc2Vec model folder against the manifest sha256 its meta.json records (an
    IntegrityError naming the file); a dataset extracted before models were sealed (None) is left
    to the restricted unpickler alone."""
    from scbch_dist.digests import check_sealed_folder

    if manifest_sha256 is not None:
        check_sealed_folder(folder, manifest_sha256, DOC2VEC_REMEDY)


def load_doc2vec(path: Path):
    """A gensim Doc2Vec model saved by ``Doc2VecText.save``, unpickled by ``_Doc2VecUnpickler``: a
    pickle that names anything else is an ExtractError naming the file, and nothing it names is
    called. gensim's own loader is kept (its array side files, its fix-ups) with its one unpickling
    function swapped for the restricted one during the call."""
    gensim = import_gensim()

    def restricted(fname):
        with open(fname, "rb") as f:
            return _Doc2VecUnpickler(f, encoding="latin1").load()  # latin1: as gensim reads its pickles

    with _GENSIM_LOAD:
        original, gensim.utils.unpickle = gensim.utils.unpickle, restricted
        try:
            return gensim.models.Doc2Vec.load(str(path))
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, OSError) as e:
            raise ExtractError(f"{path}: refused as a Doc2Vec model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               "extract the dataset again to write it anew") from None
        finally:
            gensim.utils.unpickle = original


def import_gensim():
    try:
        import gensim
        import gensim.models.doc2vec  # noqa: F401
    except ImportError:
        raise ExtractError("--text-encoder doc2vec needs gensim (pip install 'scbch_dist[finetune]')") from None
    return gensim


# ----------------------------------------------------------------------------------------------
# CLIP: frozen embeddings of both towers (extraction's clip recipe, and its replay by search)


def weights_sha256(path: Path) -> str:
    """A weights file's sha256, or a model directory's: the sha256 of its files' names and digests."""
    if path.is_file():
        return sha256_file(path)
    listing = "".join(f"{p.relative_to(path).as_posix()} {sha256_file(p)}\n"
                      for p in sorted(path.rglob("*")) if p.is_file())
    return hashlib.sha256(listing.encode()).hexdigest()


class ClipFeatures:
    """Frozen CLIP embeddings: the towers of models.clip in eval mode, the model's preprocessing
    and tokenizer. ``weights``/``name`` as model.clip.weights/name (a local model directory, a
    checkpoint file with its open_clip config name, or random with a name). ``features``:
    "projected" (the joint-space embeddings) or "pooled" (each tower's pooled features before its
    projection)."""

    FEATURES = ("projected", "pooled")

    def __init__(self, weights: str, name: str = "", *, features: str = "projected",
                 device: torch.device | None = None):
        from scbch_dist.models.backbones import WeightsError
        from scbch_dist.models.clip import ClipSettings, build_clip_towers, drop_projections

        if features not in self.FEATURES:
            raise ExtractError(f"--clip-features must be one of {self.FEATURES}, got {features!r}")
        from scbch_dist.models.tokenizers import clip_tokenizer

        settings = ClipSettings(weights=weights, name=name)
        try:
            towers = build_clip_towers(settings)
            self.tokenizer = clip_tokenizer(settings)
            if features == "pooled":
                drop_projections(towers)
        except WeightsError as e:  # the same checks as training, under extraction's option names
            raise ExtractError(str(e).replace("model.clip.weights", "--clip-weights")
                               .replace("model.clip.name", "--clip-name")) from None
        self.device = device or torch.device("cpu")
        self.image_net = _PooledFeatures(towers.image).eval().to(self.device)  # on normalised input
        self.text_net = towers.text.eval().to(self.device)
        self.image_dim, self.dim = towers.image.out_dim, towers.text.out_dim
        self.preprocess = Preprocess(towers.image_size, towers.mean, towers.std, resize_side=towers.image_size,
                                     interpolation="bicubic" if towers.interpolation == "bicubic" else "bilinear")
        path = Path(weights).expanduser()
        self.provenance = {"weights": "random" if weights == "random" else str(path.resolve()), "name": name,
                           "features": features,
                           **({"weights_sha256": weights_sha256(path)} if weights != "random" else {})}

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """(n,) str -> (n, dim) float32 text embeddings."""
        out = [np.zeros((0, self.dim), np.float32)]
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                ids, mask = self.tokenizer(list(texts[start:start + batch_size]))
                x = self.text_net(torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device))
                out.append(x.float().cpu().numpy())
        return np.concatenate(out)
