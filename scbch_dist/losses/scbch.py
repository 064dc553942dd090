"""The SCBCH terms. Where the paper and its published code differ, these follow the code, because
the code produced the paper's tables (README, "Paper and code").

Distributed semantics: under a process group of world size W, each function called with one
rank's local rows returns that rank's *share* of the loss of the global batch (all ranks' rows
together); the shares sum to the global loss, and backward leaves on every rank's inputs the
gradient of the global loss with respect to its rows. With one process the share is the loss.
All terms are computed in float32 (or the inputs' wider dtype): the exp() terms overflow
easily in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scbch_dist import dist
from scbch_dist.bank import knn_exact


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def jaccard_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R_ij = a_i.b_j / (|a_i| + |b_j| - a_i.b_j + 1e-8) for multi-hot rows; (n, C), (m, C) -> (n, m)."""
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1, keepdim=True).T - inter
    return inter / (union + 1e-8)


def bsch_loss(h_img: torch.Tensor, h_txt: torch.Tensor, labels: torch.Tensor, *, margin: float,
              shift: float) -> torch.Tensor:
    """Bidirectional Soft Contrastive Hashing loss (repulsion + attraction), a scalar.

    Args:
        h_img, h_txt: (b, L) unit-length continuous codes of this rank's pairs.
        labels: (b, C) multi-hot training labels.
        margin, shift: the per-dataset BSCH settings (m and xi).
    Over the global batch of n pairs, with S = h_img h_txt^T and d_i = S_ii:
      te_ij = S_ij if S_ij >= d_i - margin else S_ij - shift   (row threshold)
      im_ij = S_ij if S_ij >= d_j - margin else S_ij - shift   (column threshold)
      te_ii = im_ii = max(d_i, 0)
      repulsion  = mean_ij [exp(te_ij (1 - R_ij)) + exp(im_ij (1 - R_ij))]
      attraction = mean_ij [M_ij exp(shift - S_ij)] - mean_i d_i,  M_ij = [i != j and R_ij > 0]
    All means run over the n^2 entries, diagonal included. This rank computes only its b rows
    against the n gathered columns.
    """
    h_img, h_txt = _wide(h_img), _wide(h_txt)
    labels = labels.to(h_img.dtype)
    counts = dist.all_counts(h_img.shape[0], h_img.device) if dist.is_distributed() else None
    img_all, offset = dist.gather_rows(h_img, with_grad=True, counts=counts)
    txt_all, _ = dist.gather_rows(h_txt, with_grad=True, counts=counts)
    lab_all, _ = dist.gather_rows(labels, counts=counts)
    b, n = h_img.shape[0], txt_all.shape[0]

    sim = h_img @ txt_all.T  # (b, n): local image rows against every text
    rows = torch.arange(b, device=sim.device)
    diag = torch.zeros_like(sim, dtype=torch.bool)
    diag[rows, offset + rows] = True
    d_rows = sim[rows, offset + rows]  # this rank's d_i, with gradient
    with torch.no_grad():
        d_cols = (img_all * txt_all).sum(1)  # every d_j: only compared against, never differentiated
    r = jaccard_similarity(labels, lab_all)

    te = torch.where(sim >= d_rows.detach()[:, None] - margin, sim, sim - shift)
    im = torch.where(sim >= d_cols[None, :] - margin, sim, sim - shift)
    on_diag = sim.clamp(min=0)
    te = torch.where(diag, on_diag, te)
    im = torch.where(diag, on_diag, im)
    repulsion = (torch.exp(te * (1 - r)) + torch.exp(im * (1 - r))).sum() / n**2

    attract_mask = (r > 0) & ~diag
    attraction = torch.where(attract_mask, torch.exp(shift - sim), torch.zeros_like(sim)).sum() / n**2
    attraction = attraction - d_rows.sum() / n
    return repulsion + attraction


def _global_rows(n_local: int, device: torch.device) -> int:
    return sum(dist.all_counts(n_local, device)) if dist.is_distributed() else n_local


def quantization_loss(h_img: torch.Tensor, h_txt: torch.Tensor) -> torch.Tensor:
    """mean |h_img - sign(h_img)| + mean |h_txt - sign(h_txt)|, means over all n x L entries."""
    h_img, h_txt = _wide(h_img), _wide(h_txt)
    n = _global_rows(h_img.shape[0], h_img.device)
    total = (h_img - h_img.sign()).abs().sum() + (h_txt - h_txt.sign()).abs().sum()
    return total / (n * h_img.shape[1])


def cscc_loss(p_img: torch.Tensor, p_txt: torch.Tensor, labels: torch.Tensor,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sample-weighted classification loss of both modalities.

    Args:
        p_img, p_txt: (b, C) class probabilities in [0, 1] (sigmoid outputs).
        labels: (b, C) multi-hot training labels.
        weights: (b,) CSCC sample weights; None means all 1 (the warm-up).
    Per sample: (mean_c BCE(p_img, y) + mean_c BCE(p_txt, y)) / 2; then the mean over the global
    batch of w_i times that. BCE clamps log(p) at -100 (torch's guard), so a saturated sigmoid
    gives a large finite loss, never inf.
    """
    p_img, p_txt = _wide(p_img), _wide(p_txt)
    y = labels.to(p_img.dtype)
    per_sample = (F.binary_cross_entropy(p_img, y, reduction="none").mean(1)
                  + F.binary_cross_entropy(p_txt, y, reduction="none").mean(1)) / 2
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.dtype)
    return per_sample.sum() / _global_rows(p_img.shape[0], p_img.device)


def weights_from_neighbors(neighbor_sims: torch.Tensor, neighbor_index: torch.Tensor, labels: torch.Tensor,
                           *, own_index: torch.Tensor | None = None, gamma: float = 0.5) -> torch.Tensor:
    """CSCC sample weights from each sample's k neighbours (the second half of cscc_weights).

    Args:
        neighbor_sims: (m, k) similarities to the neighbours (sim as cscc_weights defines it).
        neighbor_index: (m, k) rows of the neighbours in ``labels``.
        labels: (N, C) training labels of the whole set.
        own_index: (m,) rows of the m samples themselves in ``labels``; default 0..m-1.
    Returns:
        (m,) weights gamma + (1 - gamma) cos(y_i, s_i), s_i = sum_k a_ik y_k,
        a_ik = sim_ik / (sum_k sim_ik + 1e-8).
    """
    y = labels.to(neighbor_sims.dtype)
    own = y[own_index] if own_index is not None else y[: neighbor_sims.shape[0]]
    a = neighbor_sims / (neighbor_sims.sum(1, keepdim=True) + 1e-8)
    soft = (y[neighbor_index] * a.unsqueeze(-1)).sum(1)
    return gamma + (1 - gamma) * F.cosine_similarity(own, soft, dim=1, eps=1e-8)


def cscc_bank_rows(h_img: torch.Tensor, h_txt: torch.Tensor) -> torch.Tensor:
    """(n, 2L) rows z = [u, v] of unit-normalised codes: the CSCC similarity (u u^T + v v^T) / 2
    is z z^T / 2, one inner product, which any neighbour search backend can serve."""
    return torch.cat([F.normalize(_wide(h_img), dim=1), F.normalize(_wide(h_txt), dim=1)], dim=1)


def cscc_weights(h_img: torch.Tensor, h_txt: torch.Tensor, labels: torch.Tensor, *, k: int = 20,
                 gamma: float = 0.5) -> torch.Tensor:
    """CSCC sample weights of the whole training set, (N,); in [gamma, 1] when neighbour sims are >= 0.

    Args:
        h_img, h_txt: (N, L) codes of every training sample (model in eval mode).
        labels: (N, C) training labels (the possibly noisy ones).
    u, v = unit-normalised h_img, h_txt; sim = (u u^T + v v^T) / 2 with its diagonal set to 0;
    the k largest entries of each row are the neighbours, a_ik = sim_ik / (sum_k sim_ik + 1e-8);
    soft label s_i = sum_k a_ik y_k; w_i = gamma + (1 - gamma) cos(y_i, s_i) with cos as
    torch.cosine_similarity (each norm clamped at 1e-8, so an all-zero label row gets gamma).
    """
    z = cscc_bank_rows(h_img, h_txt)
    n = z.shape[0]
    sims, index = knn_exact(z, z, k, self_index=torch.arange(n, device=z.device))
    return weights_from_neighbors(sims / 2, index, labels, gamma=gamma)


def scbch_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, weights: torch.Tensor | None, *, margin: float,
               shift: float, bsch_weight: float = 0.7, quant_weight: float = 0.3,
               cscc_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """The total objective 0.7 L_bsch + 0.3 L_q + 1.0 L_cscc and its terms.

    Args:
        out: the model's outputs (h_img, h_txt, p_img, p_txt), each with b rows.
        labels: (b, C) training labels; weights: (b,) CSCC weights or None (warm-up).
    Returns:
        ``{"total", "bsch", "quant", "cscc"}`` (this rank's shares under a process group).
    """
    bsch = bsch_loss(out["h_img"], out["h_txt"], labels, margin=margin, shift=shift)
    quant = quantization_loss(out["h_img"], out["h_txt"])
    cscc = cscc_loss(out["p_img"], out["p_txt"], labels, weights)
    total = bsch_weight * bsch + quant_weight * quant + cscc_weight * cscc
    return {"total": total, "bsch": bsch, "quant": quant, "cscc": cscc}
