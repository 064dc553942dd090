"""Each SCBCH term against float64 references written entry by entry, as docs/objective.md states them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import labels, unit_rows
from scbch_dist.losses import (GlobalBatch, bsch_loss, cscc_loss, cscc_weights, jaccard_similarity, quantization_loss,
                               scbch_loss, weights_from_neighbors)


def reference_bsch(u, v, y, margin, shift):
    """Entry-by-entry float64 transcription of the BSCH definition in docs/objective.md."""
    n = len(u)
    total_rep, total_att, diag = 0.0, 0.0, 0.0
    for i in range(n):
        d_i = float(u[i] @ v[i])
        diag += d_i
        for j in range(n):
            s = float(u[i] @ v[j])
            d_j = float(u[j] @ v[j])
            inter = float(y[i] @ y[j])
            r = inter / (float(y[i].sum()) + float(y[j].sum()) - inter + 1e-8)
            if i == j:
                te = im = max(d_i, 0.0)
            else:
                te = s if s >= d_i - margin else s - shift
                im = s if s >= d_j - margin else s - shift
            total_rep += math.exp(te * (1 - r)) + math.exp(im * (1 - r))
            if i != j and r > 0:
                total_att += math.exp(shift - s)
    return total_rep / n**2 + total_att / n**2 - diag / n


def test_jaccard_hand_values():
    a = torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0]])
    b = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]])
    r = jaccard_similarity(a, b)
    # |a0 & b0| = 1, union 2 -> 0.5; a0 vs all-ones: 2/4; a0 vs b2: 0; a1 vs b1: 1/4
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.25, 0.0]])
    assert torch.allclose(r, expected, atol=1e-7)


def test_bsch_two_pairs_by_hand():
    # two orthogonal image codes; text codes chosen so S = [[0.6, 0.8], [0, 1]]
    u = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.6, 0.0], [0.8, 1.0]], dtype=torch.float64).T.contiguous()  # rows (0.6,0.8), (0,1)
    y = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # R_01 = 1/2
    margin, shift = 0.15, 0.8
    # S_00 = 0.6, S_01 = 0.0, S_10 = 0.8, S_11 = 1.0 ; d = (0.6, 1.0)
    # te_01: S_01=0 < d_0 - m = 0.45 -> 0 - 0.8 = -0.8 ; te_10: 0.8 < 1 - 0.15 = 0.85 -> 0.0
    # im_01: 0 < d_1 - m = 0.85 -> -0.8 ; im_10: 0.8 >= d_0 - m = 0.45 -> 0.8
    # (1 - R) = (1 - 1/(2+1-1+1e-8)) ~ 0.5 off the diagonal; on the diagonal R ~ 1
    half = 1 - 1 / (2 + 1e-8)
    rep = (math.exp(0.6 * (1 - 2 / (2 + 1e-8))) * 2 + math.exp(1.0 * (1 - 1 / (1 + 1e-8))) * 2
           + math.exp(-0.8 * half) + math.exp(-0.8 * half) + math.exp(0.0 * half) + math.exp(0.8 * half)) / 4
    att = (math.exp(0.8 - 0.0) + math.exp(0.8 - 0.8)) / 4 - (0.6 + 1.0) / 2
    got = bsch_loss(u, v, y, margin=margin, shift=shift)
    assert float(got) == pytest.approx(rep + att, abs=1e-12)
    assert float(got) == pytest.approx(reference_bsch(u, v, y, margin, shift), abs=1e-12)


@pytest.mark.parametrize("margin,shift", [(0.15, 0.8), (0.3, 1.2), (0.0, 0.0)])
def test_bsch_matches_float64_reference(margin, shift):
    u, v, y = unit_rows(9, 6, 1), unit_rows(9, 6, 2), labels(9, 5, 3)
    v[4] = u[4]  # one aligned pair: its row and column thresholds bite differently
    ref = reference_bsch(u, v, y, margin, shift)
    assert float(bsch_loss(u, v, y, margin=margin, shift=shift)) == pytest.approx(ref, abs=1e-12)
    # float32 inputs are computed in float32
    got32 = bsch_loss(u.float(), v.float(), y.float(), margin=margin, shift=shift)
    assert got32.dtype == torch.float32 and float(got32) == pytest.approx(ref, abs=1e-5)


def test_bsch_gradient_matches_reference():
    u, v, y = unit_rows(7, 5, 4), unit_rows(7, 5, 5), labels(7, 4, 6)
    u1, v1 = u.clone().requires_grad_(), v.clone().requires_grad_()
    bsch_loss(u1, v1, y, margin=0.2, shift=1.0).backward()

    # reference gradient by central differences of the entry-by-entry definition
    eps = 1e-6
    for x, g in ((u, u1.grad), (v, v1.grad)):
        num = torch.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            plus, minus = x.clone(), x.clone()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, v) if x is u else (u, plus)
            args_m = (minus, v) if x is u else (u, minus)
            num[idx] = (reference_bsch(*args_p, y, 0.2, 1.0) - reference_bsch(*args_m, y, 0.2, 1.0)) / (2 * eps)
        assert torch.allclose(g, num, atol=1e-6)


def test_quantization_loss_reference():
    u, v = unit_rows(5, 8, 7), unit_rows(5, 8, 8)
    ref = sum(abs(float(x) - (1 if x > 0 else -1)) for x in u.flatten()) / 40 \
        + sum(abs(float(x) - (1 if x > 0 else -1)) for x in v.flatten()) / 40
    assert float(quantization_loss(u, v)) == pytest.approx(ref, abs=1e-12)
    codes = torch.sign(u)
    assert float(quantization_loss(codes, codes)) == 0.0


def reference_cscc(p_img, p_txt, y, w):
    n, c = y.shape
    total = 0.0
    for i in range(n):
        per = 0.0
        for p in (p_img, p_txt):
            per += sum(-(float(y[i, k]) * math.log(float(p[i, k])) + (1 - float(y[i, k])) * math.log(1 - float(p[i, k])))
                       for k in range(c)) / c
        total += (1.0 if w is None else float(w[i])) * per / 2
    return total / n


def test_cscc_loss_reference_with_and_without_weights():
    g = torch.Generator().manual_seed(9)
    p_img = torch.rand(6, 4, generator=g, dtype=torch.float64) * 0.98 + 0.01
    p_txt = torch.rand(6, 4, generator=g, dtype=torch.float64) * 0.98 + 0.01
    y, w = labels(6, 4, 10), torch.rand(6, generator=g, dtype=torch.float64)
    assert float(cscc_loss(p_img, p_txt, y)) == pytest.approx(reference_cscc(p_img, p_txt, y, None), abs=1e-12)
    assert float(cscc_loss(p_img, p_txt, y, w)) == pytest.approx(reference_cscc(p_img, p_txt, y, w), abs=1e-12)
    # weights are a mean of w_i * l_i, not a weighted average: halving every weight halves the loss
    assert float(cscc_loss(p_img, p_txt, y, w / 2)) == pytest.approx(float(cscc_loss(p_img, p_txt, y, w)) / 2)


def test_cscc_loss_saturated_sigmoid_is_finite():
    p = torch.tensor([[1.0, 0.0]])  # a saturated float32 sigmoid, exactly wrong on both classes
    y = torch.tensor([[0.0, 1.0]])
    loss = cscc_loss(p, p, y)
    assert torch.isfinite(loss) and float(loss) == pytest.approx(100.0)  # log clamped at -100


def reference_weights(u, v, y, k, gamma):
    un, vn = F.normalize(u, dim=1), F.normalize(v, dim=1)
    n = len(u)
    out = []
    for i in range(n):
        sims = [0.0 if j == i else (float(un[i] @ un[j]) + float(vn[i] @ vn[j])) / 2 for j in range(n)]
        top = sorted(range(n), key=lambda j: -sims[j])[:k]
        total = sum(sims[j] for j in top)
        soft = sum((sims[j] / (total + 1e-8)) * y[j] for j in top)
        cos = float(y[i] @ soft) / (max(float(y[i].norm()), 1e-8) * max(float(soft.norm()), 1e-8))
        out.append(gamma + (1 - gamma) * cos)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("k,gamma", [(3, 0.5), (5, 0.2)])
def test_cscc_weights_match_float64_reference(k, gamma):
    u, v, y = unit_rows(12, 6, 11) * 3, unit_rows(12, 6, 12), labels(12, 5, 13)  # scale: normalised inside
    got = cscc_weights(u, v, y, k=k, gamma=gamma)
    assert torch.allclose(got, reference_weights(u, v, y, k, gamma), atol=1e-12)


def test_cscc_weights_zero_label_row_gets_gamma():
    u, v, y = unit_rows(6, 4, 14), unit_rows(6, 4, 15), labels(6, 3, 16)
    y[2] = 0
    w = cscc_weights(u, v, y, k=2, gamma=0.5)
    assert torch.isfinite(w).all() and float(w[2]) == pytest.approx(0.5)


def test_cscc_weights_flag_labels_that_disagree_with_neighbours():
    # four tight clusters, one label each; flip the label of two members of cluster 0
    g = torch.Generator().manual_seed(17)
    centres = torch.randn(4, 16, generator=g, dtype=torch.float64)
    member = torch.arange(40) % 4
    h = centres[member] + 0.05 * torch.randn(40, 16, generator=g, dtype=torch.float64)
    y = F.one_hot(member, 4).double()
    y[[0, 4]] = F.one_hot(torch.tensor([1, 2]), 4).double()
    w = cscc_weights(h, h, y, k=5, gamma=0.5)
    clean = torch.ones(40, dtype=torch.bool)
    clean[[0, 4]] = False
    assert w[~clean].max() < 0.55 and w[clean].min() > 0.95


def test_weights_from_neighbors_with_own_index():
    y = torch.tensor([[1.0, 0], [0, 1], [1, 1]])
    sims = torch.tensor([[0.5, 0.5]])
    index = torch.tensor([[0, 2]])
    w = weights_from_neighbors(sims, index, y, own_index=torch.tensor([1]), gamma=0.0)
    soft = torch.tensor([1.0, 0.5])  # 0.5*[1,0] + 0.5*[1,1]
    # own label [0, 1]: cos = 0.5 / (1 * sqrt(1.25))
    assert float(w[0]) == pytest.approx(0.5 / math.sqrt(1.25), abs=1e-6)


def test_scbch_loss_weights_terms_07_03_10():
    u, v, y = unit_rows(6, 4, 19), unit_rows(6, 4, 20), labels(6, 3, 21)
    p = torch.sigmoid(u[:, :3])
    out = {"h_img": u, "h_txt": v, "p_img": p, "p_txt": p.flip(0)}
    terms = scbch_loss(out, y, None, margin=0.15, shift=0.8)
    expected = 0.7 * terms["bsch"] + 0.3 * terms["quant"] + 1.0 * terms["cscc"]
    assert float(terms["total"]) == pytest.approx(float(expected), abs=1e-12)
    assert float(terms["bsch"]) == pytest.approx(reference_bsch(u, v, y, 0.15, 0.8), abs=1e-12)


def test_shares_of_a_split_batch_sum_to_the_whole_batch_loss_and_gradient():
    """The data-parallel form in one process: rows 0..3 and 4..8 scored against the whole batch
    (GlobalBatch) give shares that add up to the loss of the whole batch, gradients included."""
    u, v, y = unit_rows(9, 5, 30), unit_rows(9, 5, 31), labels(9, 4, 32)
    p_img, p_txt = torch.sigmoid(u[:, :4]), torch.sigmoid(v[:, :4])
    w = torch.linspace(0.5, 1.0, 9, dtype=torch.float64)

    def total(parts):
        leaves = [x.clone().requires_grad_() for x in (u, v)]
        loss = 0.0
        for rows in parts:
            cols = GlobalBatch(leaves[0], leaves[1], y, rows.start)
            out = {"h_img": leaves[0][rows], "h_txt": leaves[1][rows], "p_img": p_img[rows], "p_txt": p_txt[rows]}
            loss = loss + scbch_loss(out, y[rows], w[rows], margin=0.2, shift=1.0, columns=cols)["total"]
        loss.backward()
        return loss.item(), leaves[0].grad, leaves[1].grad

    whole, gu, gv = total([slice(0, 9)])
    split, su, sv = total([slice(0, 4), slice(4, 9)])
    assert split == pytest.approx(whole, abs=1e-12)
    assert torch.allclose(su, gu, atol=1e-12) and torch.allclose(sv, gv, atol=1e-12)
    unweighted = scbch_loss({"h_img": u, "h_txt": v, "p_img": p_img, "p_txt": p_txt}, y, w, margin=0.2, shift=1.0)
    assert float(unweighted["total"]) == pytest.approx(whole, abs=1e-12)
