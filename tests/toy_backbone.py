"""Two backbones written outside the package, each one decorated function in this one file (as a
user adds one: docs/finetuning.md, "A backbone of your own"): a small convolutional image tower
and a bag-of-embeddings text tower over the dataset's word-level tokenizer."""

from __future__ import annotations

import torch
import torch.nn as nn

from scbch_dist.models.backbones import _ImageBackbone, register_image_backbone, register_text_backbone


class TinyConv(_ImageBackbone):
    """(n, 3, S, S) uint8 -> (n, width): two strided convolutions and a global average pool."""

    def __init__(self, width: int):
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # _ImageBackbone normalises
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = width


@register_image_backbone("tiny-conv")
def tiny_conv(image_cfg, feature_dim: int) -> nn.Module:
    return TinyConv(int(image_cfg.kwargs.get("width", 32)))


class BagOfEmbeddings(nn.Module):
    """(ids, mask) (n, T) -> (n, dim): the mean of the real tokens' embeddings."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed, self.out_dim = nn.Embedding(vocab_size, dim), dim

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = (torch.ones_like(ids) if mask is None else mask).unsqueeze(-1).float()
        return (self.embed(ids) * m).sum(1) / m.sum(1).clamp_min(1.0)


@register_text_backbone("bag-of-embeddings")
def bag_of_embeddings(text_cfg, feature_dim: int, vocab_size: int | None) -> nn.Module:
    return BagOfEmbeddings(vocab_size, int(text_cfg.kwargs.get("dim", 32)))
