"""Hash heads and classifiers on frozen features (DESIGN.md, "Network").

Image head: D_img -> hidden -> ReLU -> hidden -> ReLU -> L. Text head: D_txt -> hidden -> ReLU -> L.
h = tanh(f(x)) / ||tanh(f(x))||_2, unit length; the binary code is sign(h).
Classifier per modality: p = sigmoid(h W), W (L x C) orthogonally initialised, no bias.
Both towers and both classifiers live in one nn.Module, so DDP and DeepSpeed see one model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        return F.normalize(torch.tanh(self.mlp(x)), dim=1, eps=1e-12)


class SCBCHModel(nn.Module):
    def __init__(self, img_dim: int, txt_dim: int, bits: int, hidden: int, num_classes: int):
        super().__init__()
        self.img_head = HashHead(img_dim, bits, hidden, depth=2)
        self.txt_head = HashHead(txt_dim, bits, hidden, depth=1)
        self.img_classifier = nn.Parameter(nn.init.orthogonal_(torch.empty(bits, num_classes)))
        self.txt_classifier = nn.Parameter(nn.init.orthogonal_(torch.empty(bits, num_classes)))

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features (n, D_img), (n, D_txt) -> h_img, h_txt (n, L) and p_img, p_txt (n, C)."""
        h_img = self.img_head(img)
        h_txt = self.txt_head(txt)
        return {
            "h_img": h_img,
            "h_txt": h_txt,
            "p_img": torch.sigmoid(h_img @ self.img_classifier),
            "p_txt": torch.sigmoid(h_txt @ self.txt_classifier),
        }

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Continuous codes h of one modality ('img' or 'txt')."""
        return self.img_head(x) if modality == "img" else self.txt_head(x)


def binary_codes(h: torch.Tensor) -> torch.Tensor:
    """sign(h) as bool bits (True = +1). An exact 0 maps to +1, so every bit is defined."""
    return h >= 0
