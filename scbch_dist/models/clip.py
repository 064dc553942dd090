"""CLIP-family backbones: one contrastively pretrained vision-language model, whose two towers
become the image and the text backbone of the hashing network (docs/finetuning.md, "CLIP").

Two libraries, both read from local files only (nothing is downloaded; HF_HUB_OFFLINE is set):

- open_clip (the PyPI package open-clip-torch): a directory in open_clip's own layout
  (``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``, and a weights file), or a
  checkpoint file with ``model.clip.name`` naming one of open_clip's model configs (ViT-B-32, ...).
- transformers: a directory that ``CLIPModel.save_pretrained`` or ``SiglipModel.save_pretrained``
  wrote (config.json, weights, the tokenizer and preprocessor_config.json).

The towers' features are the model's joint-space embeddings (CLIP's projections; SigLIP's pooled
heads), each tower's own width. The image backbone normalises with the model's own mean and std at
the model's own input size, and texts are tokenized by the model's own tokenizer at its context
length: the run's config names the model, so search and serve replay both.

``model.clip.image_unlocked_groups`` / ``text_unlocked_layers``: -1 trains the whole tower; N >= 0
freezes all but its last N groups (open_clip's ``lock_image_tower`` / ``lock_text_tower``; 0
freezes the tower). The groups of a tower: its embeddings, each transformer block, the last block
with the final norm, the projection.

``python -m scbch_dist.models.clip tiny DIR`` writes a tiny randomly initialised CLIP in either
library's layout (the model of configs/clip-tiny.yaml and of the tests).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from scbch_dist.atomic import atomic_directory
from scbch_dist.errors import first_line
from scbch_dist.models.backbones import WeightsError, _ImageBackbone

OPEN_CLIP_CONFIG = "open_clip_config.json"  # open_clip's local-directory layout
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
HF_CLIP_TYPES = ("clip", "siglip")  # transformers' model_type values this module splits into towers
# transformers' CLIPImageProcessor defaults (OpenAI's statistics); SigLIP's processor uses 0.5
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipSettings:
    """Which CLIP model, and how much of it trains: the config's ``model.clip`` section, and what
    extraction's ``--clip-weights`` / ``--clip-name`` fill in."""

    weights: str = ""  # a local model directory (open_clip's layout, or transformers' CLIPModel/SiglipModel), an open_clip checkpoint file (with name), or "random" (with name)
    name: str = ""  # the architecture for a checkpoint file or random weights: an open_clip model config (ViT-B-32, ...) or a local model directory
    image_unlocked_groups: int = -1  # -1: the whole image tower trains; N >= 0: all but its last N groups frozen (0: frozen)
    text_unlocked_layers: int = -1  # the same for the text tower (open_clip's lock_text_tower)


@dataclass(frozen=True)
class ClipSource:
    """Where a CLIP model comes from. library: "open_clip" or "transformers"; name: what the library
    loads the architecture from (an open_clip config name or "local-dir:DIR"; a transformers
    directory); checkpoint: an open_clip weights file given apart from its config; pretrained:
    whether weights are loaded at all (False: model.clip.weights=random)."""

    library: str
    name: str
    checkpoint: Path | None
    pretrained: bool

    @property
    def directory(self) -> Path | None:
        if self.library == "transformers":
            return Path(self.name)
        return Path(self.name[len("local-dir:"):]) if self.name.startswith("local-dir:") else None


def _library_of(directory: Path, key: str) -> str:
    if (directory / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    if (directory / "config.json").is_file():
        model_type = json.loads((directory / "config.json").read_text()).get("model_type", "")
        if model_type not in HF_CLIP_TYPES:
            raise WeightsError(f"{key}: {directory} holds a transformers {model_type or 'model'!r}, not a CLIP or "
                               f"SigLIP model (model_type one of {HF_CLIP_TYPES})")
        return "transformers"
    raise WeightsError(f"{key}: {directory} is neither an open_clip model directory ({OPEN_CLIP_CONFIG}) nor a "
                       "transformers one (config.json)")


def clip_source(clip_cfg) -> ClipSource:
    """``model.clip`` resolved to a ClipSource; a one-line WeightsError naming the key and the path
    for anything missing or of the wrong kind."""
    weights, name = clip_cfg.weights.strip(), clip_cfg.name.strip()
    if not weights:
        raise WeightsError("model.clip.weights is empty: give a local model directory or checkpoint file, or "
                           "'random' with model.clip.name (nothing is downloaded at run time)")
    if weights == "random":
        if not name:
            raise WeightsError("model.clip.weights=random needs model.clip.name: an open_clip model config "
                               "(ViT-B-32, ...) or a local model directory whose architecture to build")
        return _source_of_name(name, checkpoint=None, pretrained=False)
    path = Path(weights).expanduser()
    if not path.exists():
        raise WeightsError(f"model.clip.weights: {path} does not exist (weights are read from local paths only; "
                           "copy the model to this machine)")
    if path.is_dir():
        library = _library_of(path, "model.clip.weights")
        if library == "open_clip" and not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
            raise WeightsError(f"model.clip.weights: {path} has {OPEN_CLIP_CONFIG} but no weights file "
                               f"({', '.join(WEIGHT_SUFFIXES)})")
        return ClipSource(library, f"local-dir:{path}" if library == "open_clip" else str(path), None, True)
    if not name:
        raise WeightsError(f"model.clip.weights: {path} is a checkpoint file; model.clip.name must name its open_clip "
                           "model config (ViT-B-32, ...) or a directory holding one")
    source = _source_of_name(name, checkpoint=path, pretrained=True)
    if source.library != "open_clip":
        raise WeightsError(f"model.clip.weights: {path} is a file, but model.clip.name={name} is a transformers "
                           "directory; give the directory as model.clip.weights")
    return source


def _source_of_name(name: str, *, checkpoint: Path | None, pretrained: bool) -> ClipSource:
    path = Path(name).expanduser()
    if path.is_dir():
        library = _library_of(path, "model.clip.name")
        return ClipSource(library, f"local-dir:{path}" if library == "open_clip" else str(path), checkpoint, pretrained)
    open_clip = import_open_clip()
    if open_clip.get_model_config(name) is None:
        raise WeightsError(f"model.clip.name={name!r} is neither a local model directory nor an open_clip model "
                           "config (open_clip.list_models() lists them)")
    return ClipSource("open_clip", name, checkpoint, pretrained)


def import_open_clip():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub fetch fails at once instead of retrying for a minute
    try:
        import open_clip
    except ImportError:
        raise WeightsError("model.image.kind=clip with an open_clip model needs open-clip-torch "
                           "(pip install 'scbch_dist[finetune]')") from None
    return open_clip


def open_clip_config(source: ClipSource) -> dict:
    """The model_cfg of an open_clip source, checked to build offline."""
    open_clip = import_open_clip()
    if source.directory is not None:
        cfg = json.loads((source.directory / OPEN_CLIP_CONFIG).read_text()).get("model_cfg")
        if not isinstance(cfg, dict):
            raise WeightsError(f"model.clip: {source.directory / OPEN_CLIP_CONFIG} has no 'model_cfg'")
    else:
        cfg = open_clip.get_model_config(source.name)
    text = cfg.get("text_cfg", {})
    hub = text.get("hf_model_name") or text.get("hf_tokenizer_name")
    if hub and not (source.directory is not None and (source.directory / hub).is_dir()):
        raise WeightsError(f"model.clip: open_clip model {source.name!r} takes its text tower or tokenizer from the "
                           f"Hugging Face hub ({hub}), which is not read at run time; use its transformers form "
                           "(a local CLIPModel or SiglipModel directory) instead")
    return cfg


@dataclass
class ClipTowers:
    """A CLIP model split into its two towers, with what its inputs must look like."""

    image: ClipImage  # (n, 3, S, S) uint8 -> (n, out_dim); ``features`` takes normalised float input
    text: nn.Module  # ids, mask (n, T) -> (n, out_dim)
    image_size: int
    context_length: int
    interpolation: str = "bicubic"  # how the model's own preprocessing resizes images

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation of [0, 1] RGB input."""
        return tuple(float(v) / 255 for v in self.image.mean.flatten())

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(v) / 255 for v in self.image.std.flatten())


class ClipImage(_ImageBackbone):
    """A CLIP image tower: uint8 RGB -> the model's normalisation -> its image embedding."""

    def __init__(self, tower: nn.Module, mean, std, out_dim: int, projection: nn.Module | None = None):
        super().__init__(mean, std)
        self.net, self.projection, self.out_dim = tower, projection, out_dim

    def layer_groups(self) -> list[list[nn.Parameter]] | None:
        """The tower's parameters by group, first to last (``tower_groups``): the layer-wise
        learning-rate decay's layers."""
        groups = tower_groups(self.net, self.projection)
        return None if groups is None else [group_parameters(g) for g in groups]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.projection is None:  # open_clip: the tower ends with its projection
            out = self.net(x)
        else:  # transformers: the pooled output, then the projection (CLIP) or as it is (SigLIP)
            out = self.projection(self.net(pixel_values=x).pooler_output)
        return out


class OpenClipText(nn.Module):
    """open_clip's text tower: the model without its image tower and logit scale, whose
    ``encode_text`` pools by its own rule (the end-of-text token); the mask is implied by the ids."""

    def __init__(self, model: nn.Module, out_dim: int):
        super().__init__()
        del model.visual  # the image tower lives in ClipImage
        for name in ("logit_scale", "logit_bias"):  # the contrastive temperature: no loss here uses it
            if getattr(model, name, None) is not None:
                delattr(model, name)
                setattr(model, name, None)
        self.net, self.out_dim = model, out_dim

    def layer_groups(self) -> list[list[nn.Parameter]] | None:
        groups = tower_groups(self.net)
        return None if groups is None else [group_parameters(g) for g in groups]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.net.encode_text(ids)


class HFClipText(nn.Module):
    """transformers' CLIP or SigLIP text tower: the pooled output, then CLIP's projection."""

    def __init__(self, tower: nn.Module, projection: nn.Module | None, out_dim: int, use_mask: bool):
        super().__init__()
        self.net, self.projection, self.out_dim, self.use_mask = tower, projection or nn.Identity(), out_dim, use_mask

    def layer_groups(self) -> list[list[nn.Parameter]] | None:
        return [group_parameters(g) for g in tower_groups(self.net, self.projection)]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # SigLIP was trained on texts padded to full length without a mask: the mask is CLIP's only
        pooled = self.net(input_ids=ids, attention_mask=mask if self.use_mask else None).pooler_output
        return self.projection(pooled)


def drop_projections(towers: ClipTowers) -> None:
    """Make both towers output their pooled features before the projection into the joint space
    (extraction's ``--clip-features pooled``): open_clip's ViT and text transformer without ``proj``
    / ``text_projection``, transformers' towers without their projection layers (SigLIP has none:
    its pooled and projected features are one)."""
    image, text = towers.image, towers.text
    if isinstance(image.projection, nn.Linear):  # transformers
        image.out_dim, image.projection = image.projection.in_features, nn.Identity()
    elif image.projection is None:  # open_clip: the projection is the tower's last parameter
        if not isinstance(getattr(image.net, "proj", None), nn.Parameter):
            raise WeightsError("--clip-features pooled: this open_clip image tower has no separate projection "
                               "(a ResNet or timm tower); use --clip-features projected")
        image.out_dim, image.net.proj = image.net.proj.shape[0], None
    if isinstance(text, HFClipText):
        if isinstance(text.projection, nn.Linear):
            text.out_dim, text.projection = text.projection.in_features, nn.Identity()
    else:
        projection = getattr(text.net, "text_projection", None)
        if isinstance(projection, nn.Linear):
            text.out_dim, text.net.text_projection = projection.in_features, None
        elif isinstance(projection, nn.Parameter):
            text.out_dim, text.net.text_projection = projection.shape[0], None
        else:
            raise WeightsError("--clip-features pooled: this open_clip text tower has no separate projection; use "
                               "--clip-features projected")


def _unlock_last(groups: Sequence, unlocked: int) -> None:
    """Freeze every parameter of ``groups``, then unfreeze those of the last ``unlocked`` groups."""
    for p in group_parameters(list(groups)):
        p.requires_grad_(False)
    if unlocked > 0:
        for p in group_parameters(list(groups[-unlocked:])):
            p.requires_grad_(True)


def _check_unlocked(key: str, value: int, groups: int) -> None:
    if value > groups:
        raise WeightsError(f"{key}={value}, but this tower has {groups} groups (its embeddings, each block, the "
                           "projection); -1 trains all of it")


def build_clip_towers(clip_cfg, *, image_grad_checkpointing: bool = False,
                      text_grad_checkpointing: bool = False) -> ClipTowers:
    """The two towers of the CLIP model ``model.clip`` names, locked as it says."""
    source = clip_source(clip_cfg)
    if source.library == "open_clip":
        towers = _open_clip_towers(source, clip_cfg)
        _open_clip_grad_checkpointing(towers, image_grad_checkpointing, text_grad_checkpointing)
        return towers
    return _hf_towers(source, clip_cfg, image_grad_checkpointing, text_grad_checkpointing)


def _open_clip_towers(source: ClipSource, clip_cfg) -> ClipTowers:
    open_clip = import_open_clip()
    cfg = open_clip_config(source)
    try:
        if source.checkpoint is not None:
            model = open_clip.create_model(source.name, pretrained=str(source.checkpoint))
        else:
            model = open_clip.create_model(source.name, load_weights=source.pretrained)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:
        where = source.checkpoint or source.directory or source.name
        # open_clip refuses another architecture's weights with load_state_dict's error, or with an
        # assertion while it resizes position embeddings
        if isinstance(e, AssertionError) or "state_dict" in str(e) or "size mismatch" in str(e):
            raise WeightsError(f"model.clip.weights: {where} does not fit open_clip model {source.name!r} "
                               f"({first_line(e)})") from None
        raise WeightsError(f"model.clip.weights: {where} is not a readable open_clip checkpoint ({first_line(e)})") from None
    if not isinstance(getattr(model, "visual", None), nn.Module) or not hasattr(model, "encode_text"):
        raise WeightsError(f"model.clip: open_clip model {source.name!r} is not a two-tower CLIP")
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean, std = preprocess.get("mean", OPENAI_MEAN), preprocess.get("std", OPENAI_STD)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else size[0]
    # open_clip's transformer towers: embeddings, each block but the last, the last with the norm,
    # the projection (a count beyond them would silently unlock all)
    blocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
    if blocks is not None:
        _check_unlocked("model.clip.image_unlocked_groups", clip_cfg.image_unlocked_groups, len(blocks) + 2)
    _check_unlocked("model.clip.text_unlocked_layers", clip_cfg.text_unlocked_layers,
                    len(model.transformer.resblocks) + 2 if hasattr(model, "transformer") else clip_cfg.text_unlocked_layers)
    if clip_cfg.image_unlocked_groups >= 0:
        model.lock_image_tower(unlocked_groups=clip_cfg.image_unlocked_groups)
    if clip_cfg.text_unlocked_layers >= 0:
        model.lock_text_tower(unlocked_layers=clip_cfg.text_unlocked_layers)
    embed = int(cfg["embed_dim"])
    image = ClipImage(model.visual, mean, std, embed)
    return ClipTowers(image, OpenClipText(model, embed), size, int(model.context_length),
                      str(preprocess.get("interpolation", "bicubic")))


def _hf_towers(source: ClipSource, clip_cfg, image_grad_checkpointing: bool,
               text_grad_checkpointing: bool) -> ClipTowers:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    directory = source.directory
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        if source.pretrained:
            model = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True)
        else:
            model = transformers.AutoModel.from_config(config)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"model.clip.weights: {directory} is not a loadable transformers model ({first_line(e)})") from None
    if image_grad_checkpointing or text_grad_checkpointing:
        _hf_grad_checkpointing(model, image_grad_checkpointing, text_grad_checkpointing)
    siglip = config.model_type == "siglip"
    processor = directory / "preprocessor_config.json"
    stats = json.loads(processor.read_text()) if processor.is_file() else {}
    default_mean, default_std = ((0.5,) * 3, (0.5,) * 3) if siglip else (OPENAI_MEAN, OPENAI_STD)
    mean, std = stats.get("image_mean", default_mean), stats.get("image_std", default_std)
    vision, text = model.vision_model, model.text_model
    image_proj, text_proj = getattr(model, "visual_projection", None), getattr(model, "text_projection", None)
    image_dim = image_proj.out_features if image_proj is not None else config.vision_config.hidden_size
    text_dim = text_proj.out_features if text_proj is not None else config.text_config.hidden_size
    _lock_hf(vision, image_proj, "model.clip.image_unlocked_groups", clip_cfg.image_unlocked_groups)
    _lock_hf(text, text_proj, "model.clip.text_unlocked_layers", clip_cfg.text_unlocked_layers)
    image = ClipImage(vision, mean, std, image_dim, projection=image_proj or nn.Identity())
    return ClipTowers(image, HFClipText(text, text_proj, text_dim, use_mask=not siglip),
                      int(config.vision_config.image_size), int(config.text_config.max_position_embeddings))


def tower_groups(tower: nn.Module, projection: nn.Module | None = None) -> list | None:
    """A CLIP tower's groups, first to last: its embeddings (with the pre-norm), each transformer
    block but the last, the last with the final norm (and SigLIP's head), the projection. Entries
    are modules, parameters or lists of them (None where a model has no such part). The grouping of
    open_clip's ``lock_image_tower`` / ``lock_text_tower``, for an open_clip tower (its image tower,
    or its CLIP without the image tower) and a transformers one (with ``projection`` beside it);
    None for a tower of another shape (a ResNet or timm image tower of open_clip)."""
    if hasattr(tower, "conv1") and hasattr(tower, "transformer"):  # open_clip's VisionTransformer
        blocks = list(tower.transformer.resblocks)
        return [[tower.conv1, tower.class_embedding, tower.positional_embedding, tower.ln_pre], *blocks[:-1],
                [blocks[-1], tower.ln_post], tower.proj]
    if hasattr(tower, "token_embedding") and hasattr(tower, "transformer"):  # open_clip's text tower
        blocks = list(tower.transformer.resblocks)
        return [[tower.token_embedding, tower.positional_embedding, getattr(tower, "cls_emb", None)], *blocks[:-1],
                [blocks[-1], tower.ln_final], tower.text_projection]
    if hasattr(tower, "embeddings") and hasattr(tower, "encoder"):  # transformers' CLIP or SigLIP tower
        layers = list(tower.encoder.layers)
        return [[tower.embeddings, getattr(tower, "pre_layrnorm", None)], *layers[:-1],
                [layers[-1], getattr(tower, "post_layernorm", None), getattr(tower, "final_layer_norm", None),
                 getattr(tower, "head", None)], projection]
    return None


def group_parameters(group) -> list[nn.Parameter]:
    """The parameters of one entry of ``tower_groups``."""
    if group is None:
        return []
    if isinstance(group, nn.Parameter):
        return [group]
    if isinstance(group, nn.Module):
        return list(group.parameters())
    return [p for g in group for p in group_parameters(g)]


def _lock_hf(tower: nn.Module, projection: nn.Module | None, key: str, unlocked: int) -> None:
    """open_clip's locking on a transformers tower (``tower_groups``)."""
    if unlocked < 0:
        return
    groups = tower_groups(tower, projection)
    _check_unlocked(key, unlocked, len(groups))
    _unlock_last(groups, unlocked)


def _open_clip_grad_checkpointing(towers: ClipTowers, image: bool, text: bool) -> None:
    if image:
        towers.image.net.set_grad_checkpointing(True)
    if text:  # the text tower's blocks (the model's own switch would reach for the image tower too)
        towers.text.net.transformer.grad_checkpointing = True


def _hf_grad_checkpointing(model: nn.Module, image: bool, text: bool) -> None:
    """transformers' switch is the whole model's: turned on there, then off in a tower not asked for."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for enabled, tower in ((image, model.vision_model), (text, model.text_model)):
        if not enabled:
            for module in tower.modules():
                if isinstance(getattr(module, "gradient_checkpointing", None), bool):
                    module.gradient_checkpointing = False


# --- the tiny model of configs/clip-tiny.yaml and the tests -----------------------------------------

TINY_OPEN_CLIP = {"embed_dim": 64,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                  "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def write_tiny(out: str | Path, library: str = "open_clip", seed: int = 0) -> Path:
    """A tiny randomly initialised CLIP (32-pixel images, 32-token texts, 64-d embeddings) saved
    in ``library``'s local layout at ``out``; returns ``out``. The tokenizer is CLIP's own (its
    byte-pair vocabulary ships with open_clip)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise WeightsError(f"{out} exists and is not empty; the tiny model is written to a new folder")
    if library not in ("open_clip", "transformers"):
        raise ValueError(f"library must be open_clip or transformers, got {library!r}")
    if out.exists():
        out.rmdir()  # empty: the whole model takes its place
    with atomic_directory(out) as partial, torch.random.fork_rng(devices=[]):  # the caller's random state is kept
        torch.manual_seed(seed)
        _write_tiny(partial, library)
    return out


def _write_tiny(out: Path, library: str) -> None:
    if library == "open_clip":
        open_clip = import_open_clip()
        from safetensors.torch import save_file

        model = open_clip.CLIP(**TINY_OPEN_CLIP)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
        preprocess = {"size": 32, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}
        (out / OPEN_CLIP_CONFIG).write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP, "preprocess_cfg": preprocess},
                                                       indent=1))
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = transformers.CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=64)
    transformers.CLIPModel(config).save_pretrained(str(out))
    _clip_tokenizer_files(out)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD),
         "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}, indent=1))


def _clip_tokenizer_files(out: Path) -> None:
    """CLIP's byte-pair tokenizer as transformers' CLIPTokenizer files (vocab.json, merges.txt),
    written from the vocabulary open_clip ships, so that a tiny model needs no download."""
    import transformers
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    merges = sorted(simple.bpe_ranks.items(), key=lambda item: item[1])
    # the same ids (49406, 49407) under transformers' names for the start and end of a text
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (out / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in simple.encoder.items()}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    tokenizer = transformers.CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scbch_dist.models.clip",
                                     description="Write a tiny randomly initialised CLIP model to a local directory "
                                                 "(the model of configs/clip-tiny.yaml).")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny", help="a tiny CLIP (32-pixel images, 32-token texts, 64-d embeddings)")
    tiny.add_argument("out", help="the directory to write (model.clip.weights)")
    tiny.add_argument("--library", choices=("open_clip", "transformers"), default="open_clip")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_tiny(args.out, args.library, args.seed)
    print(f"wrote a tiny {args.library} CLIP to {path}; train on it with model.clip.weights={path}")


if __name__ == "__main__":
    from scbch_dist import cli

    cli.run(main, "python -m scbch_dist.models.clip")
