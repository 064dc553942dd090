"""RSHNL (Pu et al., AAAI 2025) as pure functions of tensors: the robust GCE-MAE loss, centre
aggregation with self-paced weights (CAL) and contrastive hashing (CHL) (docs/methods.md, "RSHNL").
They follow the published code.

Data parallelism as in losses.scbch: per-sample terms take ``n_total`` (the global batch size), and
CHL takes ``columns``: this rank's 2b anchors against all 2n codes of the global batch.
"""

from __future__ import annotations

import torch

from scbch_dist.losses.scbch import GlobalBatch, at_least_float32


def gce_mae(p: torch.Tensor, q: float = 0.01) -> torch.Tensor:
    """l_q(p) = (1 - q)(1 - p^q) / q + q (1 - p), elementwise, for probabilities p in [0, 1]."""
    return (1 - q) * (1 - p.pow(q)) / q + q * (1 - p)


def center_terms(p_img: torch.Tensor, p_txt: torch.Tensor, labels: torch.Tensor, *, q: float = 0.01) -> torch.Tensor:
    """Per sample, (b,): l_q(y_i . p_img,i) + l_q(y_i . p_txt,i): the probability mass each modality
    puts on the labelled classes (a multi-label row sums over its positives)."""
    p_img, p_txt = at_least_float32(p_img), at_least_float32(p_txt)
    y = labels.to(p_img.dtype)
    return _gce_mae_of_mass((y * p_img).sum(1), q) + _gce_mae_of_mass((y * p_txt).sum(1), q)


def _gce_mae_of_mass(mass: torch.Tensor, q: float) -> torch.Tensor:
    """l_q of a probability mass; a row without labels has mass 0, where p^q has an infinite slope:
    it gets the value l_q(0) and no gradient, instead of a NaN gradient."""
    some = mass > 0
    value = gce_mae(torch.where(some, mass, torch.ones_like(mass)), q)
    return torch.where(some, value, torch.full_like(mass, (1 - q) / q + q))


def self_paced(per_sample: torch.Tensor, *, gamma: float = 5.0,
               n_total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, weights): v_i = max(0, 1 - l_i / gamma) without gradient, and the mean over the global
    batch (``n_total`` rows; default these) of v_i l_i + gamma (v_i^2 / 2 - v_i)."""
    v = (1 - per_sample.detach() / gamma).clamp(min=0)
    n = n_total if n_total is not None else per_sample.shape[0]
    return (v * per_sample + gamma * (v * v / 2 - v)).sum() / n, v


def chl_loss(h_img: torch.Tensor, h_txt: torch.Tensor, *, tau: float = 1.0, q: float = 0.01,
             columns: GlobalBatch | None = None) -> torch.Tensor:
    """Contrastive hashing over the 2n stacked codes F = [u; v] of the global batch, a scalar.

    G = exp(F F^T / tau) with its diagonal 0; for anchor a with partner a' (the same pair in the
    other modality), pi_a = G_aa' / sum_b G_ab; L = 2 mean_a l_q(pi_a) over the 2n anchors (the
    published code adds the row-wise and column-wise halves, which are equal). This rank computes
    its 2b anchors (its u rows, then its v rows) against all 2n codes.
    """
    h_img, h_txt = at_least_float32(h_img), at_least_float32(h_txt)
    if columns is None:
        img_all, txt_all, offset = h_img, h_txt, 0
    else:
        img_all, txt_all, offset = columns.h_img, columns.h_txt, columns.offset
    b, n = h_img.shape[0], img_all.shape[0]
    anchors = torch.cat([h_img, h_txt])  # (2b, L)
    codes = torch.cat([img_all, txt_all])  # (2n, L)
    g = torch.exp(anchors @ codes.T / tau)  # (2b, 2n)
    rows = torch.arange(b, device=g.device)
    own = torch.cat([offset + rows, n + offset + rows])  # each anchor's own column
    partner = torch.cat([n + offset + rows, offset + rows])  # the same pair in the other modality
    every = torch.arange(2 * b, device=g.device)
    g = g.index_put((every, own), torch.zeros(2 * b, dtype=g.dtype, device=g.device))
    pi = g[every, partner] / g.sum(1)
    return 2 * gce_mae(pi, q).sum() / (2 * n)
