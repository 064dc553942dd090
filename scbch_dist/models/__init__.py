"""Networks: backbones, hash towers, the heads methods add, and the tokenizers of text encoders."""

from typing import Callable

import torch.nn as nn

from scbch_dist.models.backbones import WeightsError, image_backbone, text_backbone
from scbch_dist.models.heads import ClassCentres, Classifiers, HashHead, HashingModel, NoHead, SCBCHModel, TowerSpec, binary_codes

__all__ = ["ClassCentres", "Classifiers", "HashHead", "HashingModel", "NoHead", "SCBCHModel", "TowerSpec", "WeightsError",
           "binary_codes", "build_model"]


def build_model(model_cfg, meta, *, spec: TowerSpec = TowerSpec(), make_head: Callable[[], nn.Module] | None = None,
                vocab_size: int | None = None) -> HashingModel:
    """The towers that ``model_cfg`` (config.ModelConfig) and ``spec`` describe for dataset ``meta``,
    then the head from ``make_head()``; ``vocab_size`` is the tokenizer's, needed by randomly
    initialised text encoders."""
    model = HashingModel(image_backbone(model_cfg.image, meta.dim("img")),
                         text_backbone(model_cfg.text, meta.dim("txt"), vocab_size), model_cfg.bits, model_cfg.hidden,
                         spec)
    if make_head is not None:
        model.head = make_head()
    return model
