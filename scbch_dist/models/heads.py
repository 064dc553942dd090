"""Hash towers and the heads methods put on them (docs/objective.md, "Network").

A tower is a backbone (stored features or a fine-tuned encoder, models.backbones) and a hash head:
an MLP, then h = tanh(f(x)) / ||tanh(f(x))||_2 (unit length); the binary code is sign(h).
SCBCH's layout: image D -> hidden -> ReLU -> hidden -> ReLU -> L, text D -> hidden -> ReLU -> L.
A method may ask for another layout (``TowerSpec``) and adds its own trainable modules as the
model's ``head`` (SCBCH: one classifier per modality). Towers and head live in one nn.Module, so
DDP and DeepSpeed see one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scbch_dist.models.backbones import FeatureInput


@dataclass(frozen=True)
class TowerSpec:
    """The hash heads' layout: hidden layers per modality, their width (None: model.hidden) and
    whether the last layer has a bias."""

    img_depth: int = 2
    txt_depth: int = 1
    hidden: int | None = None
    last_bias: bool = True


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 (a product under autocast, or of a model held in bf16) up to float32; float32 and
    float64 (the reference tests' models) as they are."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class HashHead(nn.Module):
    """An MLP with ``depth`` hidden layers of ``hidden`` units, then tanh and L2 normalisation."""

    def __init__(self, in_dim: int, bits: int, hidden: int, depth: int, last_bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, bits, bias=last_bias))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, in_dim) -> (n, bits), unit length rows."""
        # DeepSpeed bf16 holds the weights themselves in bf16 (no autocast): inputs must follow
        x = x.to(self.mlp[0].weight.dtype)
        # the codes leave in float32 whatever the matrix products ran in (bf16 autocast, DeepSpeed
        # bf16): the losses' exp of similarities, Jaccard ratios and weights are float32 sums
        return F.normalize(torch.tanh(at_least_float32(self.mlp(x))), dim=1, eps=1e-12)


class NoHead(nn.Module):
    """A method without extra modules."""

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}


class Classifiers(nn.Module):
    """One linear classifier per modality on the codes: p = sigmoid(h W), W (L x C) orthogonally
    initialised, no bias (SCBCH's CSCC term; NACD's classifier pair)."""

    def __init__(self, bits: int, num_classes: int):
        super().__init__()
        self.img_classifier = nn.Parameter(nn.init.orthogonal_(torch.empty(bits, num_classes)))
        self.txt_classifier = nn.Parameter(nn.init.orthogonal_(torch.empty(bits, num_classes)))

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """h_img, h_txt (n, L) -> p_img, p_txt (n, C), float32 (the logits as the products ran)."""
        w_img, w_txt = self.img_classifier, self.txt_classifier
        return {"p_img": torch.sigmoid(at_least_float32(out["h_img"].to(w_img.dtype) @ w_img)),
                "p_txt": torch.sigmoid(at_least_float32(out["h_txt"].to(w_txt.dtype) @ w_txt))}


class ClassCentres(nn.Module):
    """RSHNL's class-centre generator: the C x C identity through C -> hidden -> hidden -> L (ReLU
    between), tanh and L2 normalisation give one unit centre per class, W (C, L); each modality's
    class probabilities are p = softmax(h W^T) (no temperature)."""

    def __init__(self, num_classes: int, hidden: int, bits: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(num_classes, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, bits))
        self.register_buffer("identity", torch.eye(num_classes), persistent=False)

    def centres(self) -> torch.Tensor:
        """(C, L) unit-length class centres."""
        return F.normalize(torch.tanh(at_least_float32(self.mlp(self.identity.to(self.mlp[0].weight.dtype)))), dim=1,
                           eps=1e-12)

    def forward(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """h_img, h_txt (n, L) -> p_img, p_txt (n, C), float32."""
        w = self.centres()
        return {"p_img": torch.softmax(at_least_float32(out["h_img"] @ w.T), dim=1),
                "p_txt": torch.softmax(at_least_float32(out["h_txt"] @ w.T), dim=1)}


class HashingModel(nn.Module):
    """Both towers and the method's head. ``head`` maps the codes {h_img, h_txt} to the method's
    extra outputs; it is set after the towers are built, so that a seeded run draws the towers'
    initial weights first whatever the method."""

    def __init__(self, img_backbone: nn.Module, txt_backbone: nn.Module, bits: int, hidden: int,
                 spec: TowerSpec = TowerSpec(), head: nn.Module | None = None):
        super().__init__()
        self.bits = bits
        self.img_backbone, self.txt_backbone = img_backbone, txt_backbone
        width = spec.hidden or hidden
        self.img_head = HashHead(img_backbone.out_dim, bits, width, spec.img_depth, spec.last_bias)
        self.txt_head = HashHead(txt_backbone.out_dim, bits, width, spec.txt_depth, spec.last_bias)
        self.head = head if head is not None else NoHead()

    def forward(self, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Inputs (features (n, D), or images (n, 3, S, S) uint8 and token ids + mask (n, T))
        -> h_img, h_txt (n, L) and the head's outputs."""
        out = {"h_img": self.encode("img", img), "h_txt": self.encode("txt", txt, txt_mask)}
        out.update(self.head(out))
        return out

    def encode(self, modality: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Continuous codes h (n, L) of one modality ('img' or 'txt')."""
        if modality == "img":
            return self.img_head(self.img_backbone(x))
        return self.txt_head(self.txt_backbone(x, mask))

    def param_groups(self, lr: float, backbone_lr: float, layer_decay: float = 1.0) -> list[dict]:
        """Optimizer groups: heads and the method's modules at ``lr``, fine-tuned backbones at
        ``backbone_lr``; frozen parameters (a locked CLIP tower's) are in none. With
        ``layer_decay`` < 1, a backbone that has layers (``layer_groups()``: a CLIP tower's
        groups, first to last) gets one group per layer, the last at ``backbone_lr`` and each one
        below at ``layer_decay`` times the lr of the one above (layer-wise learning-rate decay)."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        backbone_ids = {id(p) for m in (self.img_backbone, self.txt_backbone) for p in m.parameters()}
        groups = [{"params": [p for p in trainable if id(p) not in backbone_ids], "lr": lr, "name": "heads"}]
        plain = []
        for name, backbone in (("img", self.img_backbone), ("txt", self.txt_backbone)):
            layers = backbone.layer_groups() if layer_decay != 1.0 and hasattr(backbone, "layer_groups") else None
            placed = set()
            for depth, layer in enumerate(reversed(layers or [])):  # depth 0: the last layer
                params = [p for p in layer if p.requires_grad and id(p) not in placed]
                placed.update(id(p) for p in layer)
                if params:
                    groups.append({"params": params, "lr": backbone_lr * layer_decay ** depth,
                                   "name": f"{name}_backbone_layer_{len(layers) - 1 - depth}"})
            plain += [p for p in backbone.parameters() if p.requires_grad and id(p) not in placed]
        if plain:
            groups.insert(1, {"params": plain, "lr": backbone_lr, "name": "backbones"})
        return groups


class SCBCHModel(HashingModel):
    """The SCBCH network (NACD's too): SCBCH's towers and the two classifiers. Without backbones the
    inputs are stored feature vectors of width img_dim / txt_dim.

    Reference only: the engine builds this network from the config with build_model (the default
    TowerSpec) and the method's head (Classifiers); tests and benchmarks build it directly, without
    a config, and check the engine's pieces with it."""

    def __init__(self, img_dim: int, txt_dim: int, bits: int, hidden: int, num_classes: int, *,
                 img_backbone: nn.Module | None = None, txt_backbone: nn.Module | None = None):
        super().__init__(img_backbone if img_backbone is not None else FeatureInput(img_dim),
                         txt_backbone if txt_backbone is not None else FeatureInput(txt_dim), bits, hidden)
        self.head = Classifiers(bits, num_classes)


def binary_codes(h: torch.Tensor) -> torch.Tensor:
    """sign(h) as bool bits (True = +1). An exact 0 maps to +1, so every bit is defined."""
    return h >= 0
