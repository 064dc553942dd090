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
    if model_cfg.image.kind == "clip":  # one model, both towers (config.validate pairs the kinds)
        # imported here: ``python -m scbch_dist.models.clip`` runs that module as __main__, and runpy
        # warns when the package has imported it already
        from scbch_dist.models.clip import build_clip_towers

        towers = build_clip_towers(model_cfg.clip, image_grad_checkpointing=model_cfg.image.grad_checkpointing,
                                   text_grad_checkpointing=model_cfg.text.grad_checkpointing)
        if model_cfg.image.image_size != towers.image_size:
            raise WeightsError(f"model.image.image_size={model_cfg.image.image_size}, but the CLIP model of "
                               f"model.clip takes {towers.image_size}-pixel images; set "
                               f"model.image.image_size={towers.image_size}")
        img_backbone, txt_backbone = towers.image, towers.text
    else:
        img_backbone = image_backbone(model_cfg.image, meta.dim("img"))
        txt_backbone = text_backbone(model_cfg.text, meta.dim("txt"), vocab_size)
    model = HashingModel(img_backbone, txt_backbone, model_cfg.bits, model_cfg.hidden, spec)
    if make_head is not None:
        model.head = make_head()
    return model
