"""Hash heads and classifiers (DESIGN.md, "Network"), on stored features or on backbones.

Image head: D_img -> hidden -> ReLU -> hidden -> ReLU -> L. Text head: D_txt -> hidden -> ReLU -> L.
D is the stored feature width, or the pooled width of a fine-tuned backbone (models.backbones).
h = tanh(f(x)) / ||tanh(f(x))||_2, unit length; the binary code is sign(h).
Classifier per modality: p = sigmoid(h W), W (L x C) orthogonally initialised, no bias.
Both towers and both classifiers live in one nn.Module, so DDP and DeepSpeed see one model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from scbch_dist.models.backbones import FeatureInput


class HashHead(nn.Module):
    """An MLP with ``depth`` hidden layers of ``hidden`` units, then tanh and L2 normalisation."""

    def __init__(self, in_dim: int, bits: int, hidden: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, bits))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in_dim) -> (n, bits), unit length rows."""
        # DeepSpeed bf16 holds the weights themselves in bf16 (no autocast): inputs must follow
        x = x.to(self.mlp[0].weight.dtype)
        return F.normalize(torch.tanh(self.mlp(x)), dim=1, eps=1e-12)


class SCBCHModel(nn.Module):
    """Both towers and both classifiers. Without backbones the inputs are stored feature vectors of
    width img_dim / txt_dim (and the state dict is exactly the heads', as before backbones existed)."""

    def __init__(self, img_dim: int, txt_dim: int, bits: int, hidden: int, num_classes: int, *,
                 img_backbone: nn.Module | None = None, txt_backbone: nn.Module | None = None):
        super().__init__()
        self.img_backbone = img_backbone if img_backbone is not None else FeatureInput(img_dim)
        self.txt_backbone = txt_backbone if txt_backbone is not None else FeatureInput(txt_dim)
        self.img_head = HashHead(self.img_backbone.out_dim, bits, hidden, depth=2)
        self.txt_head = HashHead(self.txt_backbone.out_dim, bits, hidden, depth=1)
        self.img_classifier = nn.Parameter(nn.init.orthogonal_(torch.empty(bits, num_classes)))
        self.txt_classifier = nn.Parameter(nn.init.orthogonal_(torch.empty(bits, num_classes)))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Inputs (features (n, D), or images (n, 3, S, S) uint8 and token ids + mask (n, T))
        -> h_img, h_txt (n, L) and p_img, p_txt (n, C)."""
        h_img = self.encode("img", img)
        h_txt = self.encode("txt", txt, txt_mask)
        return {
            "h_img": h_img,
            "h_txt": h_txt,
            "p_img": torch.sigmoid(h_img @ self.img_classifier),
            "p_txt": torch.sigmoid(h_txt @ self.txt_classifier),
        }

    def encode(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous codes h (n, L) of one modality ('img' or 'txt')."""
        if modality == "img":
            return self.img_head(self.img_backbone(x))
        return self.txt_head(self.txt_backbone(x, mask))

    def param_groups(self, lr: float, backbone_lr: float) -> list[dict]:
        """Optimizer groups: heads and classifiers at ``lr``, fine-tuned backbones at ``backbone_lr``."""
        backbone = [p for m in (self.img_backbone, self.txt_backbone) for p in m.parameters()]
        ids = {id(p) for p in backbone}
        groups = [{"params": [p for p in self.parameters() if id(p) not in ids], "lr": lr, "name": "heads"}]
        if backbone:
            groups.append({"params": backbone, "lr": backbone_lr, "name": "backbones"})
        return groups


def binary_codes(h: torch.Tensor) -> torch.Tensor:
    """sign(h) as bool bits (True = +1). An exact 0 maps to +1, so every bit is defined."""
    return h >= 0
