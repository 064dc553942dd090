"""The SCBCH terms as pure functions of tensors (docs/objective.md). Where the paper and its
published code differ, these follow the code, because the code produced the paper's tables.

Data parallelism (docs/distributed.md): a batch-coupled term is the loss of the *global* batch.
Called with one rank's rows and ``columns`` (every rank's rows, gathered with gradient by the
caller) it returns that rank's *share*: the shares over ranks sum to the global loss, and backward
leaves on each rank's rows the gradient of the global loss. Per-sample terms take ``n_total``, the
global batch size. Without ``columns`` / ``n_total`` the local rows are the whole batch. Nothing
here talks to other processes.
All terms are computed in float32 (or the inputs' wider dtype): the exp() terms overflow easily in
half precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scbch_dist.knn.exact import exact_topk


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 unless it is float32 or float64 already (the dtype every loss computes in)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@dataclass
class GlobalBatch:
    """The global batch a rank's rows are scored against: every rank's rows in rank order (the
    codes gathered with gradient), their labels, and the first row of this rank's part."""

    h_img: torch.Tensor  # (n, L)
    h_txt: torch.Tensor  # (n, L)
    labels: torch.Tensor  # (n, C)
    offset: int


def jaccard_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """R_ij = a_i.b_j / (|a_i| + |b_j| - a_i.b_j + 1e-8) for multi-hot rows; (n, C), (m, C) -> (n, m)."""
    inter = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1, keepdim=True).T - inter
    return inter / (union + 1e-8)


def bsch_loss(h_img: torch.Tensor, h_txt: torch.Tensor, labels: torch.Tensor, *, margin: float,
              shift: float, columns: GlobalBatch | None = None) -> torch.Tensor:
    """Bidirectional Soft Contrastive Hashing loss (repulsion + attraction), a scalar.

    Args:
        h_img, h_txt: (b, L) unit-length continuous codes of this rank's pairs.
        labels: (b, C) multi-hot training labels.
        margin, shift: the per-dataset BSCH settings (m and xi).
        columns: the global batch (n rows, this rank's b among them) under data parallelism;
            None when these b rows are the whole batch.
    Over the global batch of n pairs, with S = h_img h_txt^T and d_i = S_ii:
      te_ij = S_ij if S_ij >= d_i - margin else S_ij - shift   (row threshold)
      im_ij = S_ij if S_ij >= d_j - margin else S_ij - shift   (column threshold)
      te_ii = im_ii = max(d_i, 0)
      repulsion  = mean_ij [exp(te_ij (1 - R_ij)) + exp(im_ij (1 - R_ij))]
      attraction = mean_ij [M_ij exp(shift - S_ij)] - mean_i d_i,  M_ij = [i != j and R_ij > 0]
    All means run over the n^2 entries, diagonal included. Only this rank's b rows are computed,
    against the n columns.
    """
    h_img, h_txt = at_least_float32(h_img), at_least_float32(h_txt)
    labels = labels.to(h_img.dtype)
    if columns is None:
        columns = GlobalBatch(h_img, h_txt, labels, 0)
    img_all, txt_all, offset = columns.h_img, columns.h_txt, columns.offset
    lab_all = columns.labels.to(h_img.dtype)
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


def quantization_loss(h_img: torch.Tensor, h_txt: torch.Tensor, *, n_total: int | None = None) -> torch.Tensor:
    """mean |h_img - sign(h_img)| + mean |h_txt - sign(h_txt)|, means over all n x L entries of the
    global batch of ``n_total`` rows (default: these rows are the whole batch)."""
    h_img, h_txt = at_least_float32(h_img), at_least_float32(h_txt)
    n = n_total if n_total is not None else h_img.shape[0]
    total = (h_img - h_img.sign()).abs().sum() + (h_txt - h_txt.sign()).abs().sum()
    return total / (n * h_img.shape[1])


def cscc_loss(p_img: torch.Tensor, p_txt: torch.Tensor, labels: torch.Tensor,
              weights: torch.Tensor | None = None, *, n_total: int | None = None) -> torch.Tensor:
    """Sample-weighted classification loss of both modalities.

    Args:
        p_img, p_txt: (b, C) class probabilities in [0, 1] (sigmoid outputs).
        labels: (b, C) multi-hot training labels.
        weights: (b,) CSCC sample weights; None means all 1 (the warm-up).
    Per sample: (mean_c BCE(p_img, y) + mean_c BCE(p_txt, y)) / 2; then the mean over the global
    batch (``n_total`` rows; default these) of w_i times that. BCE clamps log(p) at -100 (torch's guard), so a saturated sigmoid
    gives a large finite loss, never inf.
    """
    p_img, p_txt = at_least_float32(p_img), at_least_float32(p_txt)
    y = labels.to(p_img.dtype)
    per_sample = (F.binary_cross_entropy(p_img, y, reduction="none").mean(1)
                  + F.binary_cross_entropy(p_txt, y, reduction="none").mean(1)) / 2
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.dtype)
    return per_sample.sum() / (n_total if n_total is not None else p_img.shape[0])


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
    return torch.cat([F.normalize(at_least_float32(h_img), dim=1), F.normalize(at_least_float32(h_txt), dim=1)], dim=1)


def cscc_weights(h_img: torch.Tensor, h_txt: torch.Tensor, labels: torch.Tensor, *, k: int = 20,
                 gamma: float = 0.5) -> torch.Tensor:
    """CSCC sample weights of the whole training set, (N,); in [gamma, 1] when neighbour sims are >= 0.

    Reference only: the engine computes these weights in SCBCH's refresh (methods.scbch,
    epoch_start: knn.neighbours on the bank, then weights_from_neighbors, each rank for its own
    ids); tests check the engine against this one-process version.

    Args:
        h_img, h_txt: (N, L) codes of every training sample (model in eval mode).
        labels: (N, C) training labels (the possibly noisy ones).
    u, v = unit-normalised h_img, h_txt; sim = (u u^T + v v^T) / 2 with its diagonal set to 0;
    the k largest entries of each row are the neighbours, a_ik = sim_ik / (sum_k sim_ik + 1e-8);
    soft label s_i = sum_k a_ik y_k; w_i = gamma + (1 - gamma) cos(y_i, s_i) with cos as
    torch.cosine_similarity (each norm clamped at 1e-8, so an all-zero label row gets gamma).
    """
    sims, index = self_neighbours(cscc_bank_rows(h_img, h_txt), k)
    return weights_from_neighbors(sims, index, labels, gamma=gamma)


def self_neighbours(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's k nearest rows of the bank z (N, 2L) by sim = z z^T / 2 = (u u^T + v v^T) / 2,
    its own similarity counted as 0 (not removed), exactly: (sims, index), each (N, k), descending.
    The one-process reference of the refresh's search (cscc_weights, reconstruct_confidence)."""
    n = z.shape[0]
    if k > n:
        raise ValueError(f"k={k} neighbours requested from {n} samples")
    sims, index = exact_topk(z, z, k, self_index=torch.arange(n, device=z.device))
    return sims / 2, index  # halving is exact: the same order and bits as topk of z z^T / 2


def scbch_loss(out: dict[str, torch.Tensor], labels: torch.Tensor, weights: torch.Tensor | None, *, margin: float,
               shift: float, bsch_weight: float = 0.7, quant_weight: float = 0.3, cscc_weight: float = 1.0,
               columns: GlobalBatch | None = None) -> dict[str, torch.Tensor]:
    """The total objective 0.7 L_bsch + 0.3 L_q + 1.0 L_cscc and its terms.

    Args:
        out: the model's outputs (h_img, h_txt, p_img, p_txt), each with b rows.
        labels: (b, C) training labels; weights: (b,) CSCC weights or None (warm-up).
        columns: the gathered global batch under data parallelism (see bsch_loss).
    Returns:
        ``{"total", "bsch", "quant", "cscc"}`` (this rank's shares under a process group).
    """
    n_total = columns.h_img.shape[0] if columns is not None else None
    bsch = bsch_loss(out["h_img"], out["h_txt"], labels, margin=margin, shift=shift, columns=columns)
    quant = quantization_loss(out["h_img"], out["h_txt"], n_total=n_total)
    cscc = cscc_loss(out["p_img"], out["p_txt"], labels, weights, n_total=n_total)
    total = bsch_weight * bsch + quant_weight * quant + cscc_weight * cscc
    return {"total": total, "bsch": bsch, "quant": quant, "cscc": cscc}
