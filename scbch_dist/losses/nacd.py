"""NACD (Su et al., NeurIPS 2025) as pure functions of tensors: the confidence-weighted
classification, the contrastive term on reliable labels (CRCH), the confidence updates and the class
thresholds (docs/methods.md, "NACD"). They follow the published code.

Notation: unit codes u (image) and v (text), S = u v^T over the global batch, y the noisy training
labels, c the per-id confidences (zero outside y), t the per-class thresholds. Data parallelism as
in losses.scbch: with ``columns`` a rank gets its share of the global-batch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scbch_dist.losses.scbch import GlobalBatch, cscc_bank_rows, jaccard_similarity, self_neighbours, at_least_float32


def confidence_bce(p_img: torch.Tensor, p_txt: torch.Tensor, confidence: torch.Tensor, *,
                   n_total: int | None = None) -> torch.Tensor:
    """(BCE(p_img, c) + BCE(p_txt, c)) / 2, the mean over rows and classes of the global batch of
    ``n_total`` rows (default: these rows). p (b, C) sigmoid outputs, c (b, C) soft targets in [0, 1];
    log clamped at -100 as torch's BCE."""
    p_img, p_txt = at_least_float32(p_img), at_least_float32(p_txt)
    c = confidence.to(p_img.dtype)
    total = (F.binary_cross_entropy(p_img, c, reduction="sum") + F.binary_cross_entropy(p_txt, c, reduction="sum")) / 2
    n = n_total if n_total is not None else p_img.shape[0]
    return total / (n * p_img.shape[1])


def reliable_labels(labels: torch.Tensor, confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """r = y * [c >= t]: the candidate labels whose confidence reaches their class threshold, (b, C)."""
    return labels.to(confidence.dtype) * (confidence >= thresholds).to(confidence.dtype)


def crch_loss(h_img: torch.Tensor, h_txt: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor,
              thresholds: torch.Tensor, *, margin: float, shift: float, columns: GlobalBatch | None = None,
              column_confidence: torch.Tensor | None = None) -> torch.Tensor:
    """The contrastive term on reliable labels, a scalar.

    Args:
        h_img, h_txt: (b, L) unit codes of this rank's pairs; labels (b, C) noisy labels;
        confidence (b, C) their confidences; thresholds (C,).
        columns, column_confidence: the global batch (n rows, this rank's b among them) and its
            confidences, under data parallelism; None when these rows are the whole batch.
    With r = y [c >= t], T = Jaccard(r), P = [T > 0][i != j], N = [T = 0][i != j] (a row without a
    reliable label is a negative of every other row), S = u v^T, and
      te_ij = S_ij if S_ij >= S_ii - margin else S_ij - shift (row anchor),
      im_ij = S_ij if S_ij >= S_jj - margin else S_ij - shift (column anchor), masks without gradient:
      L = mean_ij P_ij exp(-S_ij - T_ij) + mean_ij N_ij (exp(te_ij) + exp(im_ij)) - mean_i S_ii,
    means over the n^2 entries of the global batch.
    """
    h_img, h_txt = at_least_float32(h_img), at_least_float32(h_txt)
    dtype = h_img.dtype
    r = reliable_labels(labels, confidence.to(dtype), thresholds.to(dtype))
    if columns is None:
        img_all, txt_all, offset, r_all = h_img, h_txt, 0, r
    else:
        img_all, txt_all, offset = columns.h_img, columns.h_txt, columns.offset
        r_all = reliable_labels(columns.labels, column_confidence.to(dtype), thresholds.to(dtype))
    b, n = h_img.shape[0], txt_all.shape[0]

    sim = h_img @ txt_all.T  # (b, n)
    rows = torch.arange(b, device=sim.device)
    off_diag = torch.ones_like(sim, dtype=torch.bool)
    off_diag[rows, offset + rows] = False
    d_rows = sim[rows, offset + rows]
    with torch.no_grad():
        d_cols = (img_all * txt_all).sum(1)
        t = jaccard_similarity(r, r_all)
        positive = (t > 0) & off_diag
        negative = (t == 0) & off_diag
        row_anchor = sim >= d_rows[:, None] - margin
        col_anchor = sim >= d_cols[None, :] - margin
    te = torch.where(row_anchor, sim, sim - shift)
    im = torch.where(col_anchor, sim, sim - shift)
    zero = torch.zeros_like(sim)
    attract = torch.where(positive, torch.exp(-sim - t), zero).sum() / n**2
    repel = torch.where(negative, torch.exp(te) + torch.exp(im), zero).sum() / n**2
    return attract + repel - d_rows.sum() / n


def ema_confidence(confidence: torch.Tensor, p_img: torch.Tensor, p_txt: torch.Tensor, labels: torch.Tensor, *,
                   omega: float) -> torch.Tensor:
    """c <- (omega c + (1 - omega)(p_img + p_txt) / 2) * y, rows (b, C); predictions detached."""
    p = (p_img.detach().to(confidence.dtype) + p_txt.detach().to(confidence.dtype)) / 2
    return (omega * confidence + (1 - omega) * p) * labels.to(confidence.dtype)


def ema_weight(epoch: int, epochs: int, start: float = 0.95, end: float = 0.80) -> float:
    """omega_e = start + (e / E)(end - start), e 0-based."""
    return start + (epoch / epochs) * (end - start)


def confidence_from_neighbors(neighbor_sims: torch.Tensor, neighbor_index: torch.Tensor, confidence: torch.Tensor,
                              labels: torch.Tensor, *, own_index: torch.Tensor | None = None,
                              mix: float = 0.2) -> torch.Tensor:
    """The reconstruction from each sample's k neighbours (the second half of reconstruct_confidence).

    Args:
        neighbor_sims, neighbor_index: (m, k) similarities and rows of the neighbours in ``confidence``.
        confidence, labels: (N, C) of the whole set; own_index (m,): the m samples' rows (default 0..m-1).
    Returns (m, C): mix q_i + (1 - mix) c_i, q_i = (sum_j a_ij c_j) * y_i, a_ij = sim_ij / (sum_j sim_ij + 1e-8).
    """
    own = own_index if own_index is not None else torch.arange(neighbor_sims.shape[0], device=confidence.device)
    c = confidence.to(neighbor_sims.dtype)
    a = neighbor_sims / (neighbor_sims.sum(1, keepdim=True) + 1e-8)
    q = (c[neighbor_index] * a.unsqueeze(-1)).sum(1) * labels[own].to(c.dtype)
    return mix * q + (1 - mix) * c[own]


def reconstruct_confidence(h_img: torch.Tensor, h_txt: torch.Tensor, confidence: torch.Tensor, labels: torch.Tensor,
                           *, k: int = 20, mix: float = 0.2) -> torch.Tensor:
    """The after-epoch reconstruction over a whole training set in one process: sim = (u u^T +
    v v^T) / 2 with its diagonal 0 (SCBCH's bank), the k largest entries of each row, then
    confidence_from_neighbors. Returns (N, C).

    Reference only: the engine computes this in NACD's refresh (methods.nacd, epoch_end:
    knn.neighbours on the bank, then confidence_from_neighbors, each rank for its own ids); tests
    check the engine against it."""
    top, index = self_neighbours(cscc_bank_rows(h_img, h_txt), k)
    return confidence_from_neighbors(top, index, confidence, labels, mix=mix)


def class_thresholds(confidence: torch.Tensor) -> torch.Tensor:
    """t_k = mean of c_ik over the rows with c_ik > 0 (divisor 1 when there are none), (C,)."""
    positive = confidence > 0
    return (confidence * positive).sum(0) / positive.sum(0).clamp(min=1).to(confidence.dtype)
