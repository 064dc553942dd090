"""Deterministic global batches shared by the multi-process scripts and the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def code_batch(n: int = 9, bits: int = 6, classes: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit-length codes, probabilities, labels and weights of a global batch, float64."""
    g = torch.Generator().manual_seed(seed)
    lab = (torch.rand(n, classes, generator=g) < 0.35).double()
    lab[torch.arange(n), torch.randint(classes, (n,), generator=g)] = 1
    return {
        "h_img": F.normalize(torch.tanh(torch.randn(n, bits, generator=g, dtype=torch.float64)), dim=1),
        "h_txt": F.normalize(torch.tanh(torch.randn(n, bits, generator=g, dtype=torch.float64)), dim=1),
        "p_img": torch.rand(n, classes, generator=g, dtype=torch.float64) * 0.98 + 0.01,
        "p_txt": torch.rand(n, classes, generator=g, dtype=torch.float64) * 0.98 + 0.01,
        "lab": lab,
        "w": torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.5,
    }


def feature_batch(step: int, n: int = 16, img_dim: int = 12, txt_dim: int = 10, classes: int = 5):
    """A global training batch of features for step ``step``, float64."""
    g = torch.Generator().manual_seed(1000 + step)
    lab = (torch.rand(n, classes, generator=g) < 0.35).to(torch.uint8)
    lab[torch.arange(n), torch.randint(classes, (n,), generator=g)] = 1
    return {"img": torch.randn(n, img_dim, generator=g, dtype=torch.float64),
            "txt": torch.randn(n, txt_dim, generator=g, dtype=torch.float64),
            "lab": lab, "w": torch.rand(n, generator=g, dtype=torch.float64) * 0.5 + 0.5}
