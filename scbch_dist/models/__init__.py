from scbch_dist.models.backbones import WeightsError, image_backbone, text_backbone
from scbch_dist.models.heads import HashHead, SCBCHModel, binary_codes

__all__ = ["HashHead", "SCBCHModel", "WeightsError", "binary_codes", "build_model"]


def build_model(model_cfg, meta, *, num_classes: int | None = None, vocab_size: int | None = None) -> SCBCHModel:
    """The SCBCH model that ``model_cfg`` (config.ModelConfig) describes for dataset ``meta``;
    ``vocab_size`` is the tokenizer's, needed by randomly initialised text encoders."""
    return SCBCHModel(meta.dim("img"), meta.dim("txt"), model_cfg.bits, model_cfg.hidden,
                      num_classes if num_classes is not None else meta.num_classes,
                      img_backbone=image_backbone(model_cfg.image, meta.dim("img")),
                      txt_backbone=text_backbone(model_cfg.text, meta.dim("txt"), vocab_size))
