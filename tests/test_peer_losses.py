"""Every NACD and RSHNL function of docs/methods.md against an entry-by-entry float64 transcription
of its definition (values to 1e-10), gradients of the batch losses by central differences, and
the share form: a batch split in parts scored against the whole batch sums to the whole loss."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import labels, unit_rows
from scbch_dist.losses import (GlobalBatch, center_terms, chl_loss, class_thresholds, confidence_bce, crch_loss,
                               ema_confidence, ema_weight, gce_mae, reconstruct_confidence, self_paced)


def probabilities(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, generator=g, dtype=torch.float64) * 0.98 + 0.01


def confidences(y, seed):
    return probabilities(*y.shape, seed) * y  # zero outside the candidate labels


# ---- float64 transcriptions of docs/methods.md, one entry at a time

def ref_bce(p, c):
    return -(c * max(math.log(p), -100) + (1 - c) * max(math.log(1 - p), -100))


def ref_confidence_bce(pu, pv, c):
    n, k = c.shape
    total = sum(ref_bce(float(pu[i, j]), float(c[i, j])) + ref_bce(float(pv[i, j]), float(c[i, j]))
                for i in range(n) for j in range(k))
    return total / 2 / (n * k)


def ref_jaccard(a, b):
    inter = float(a @ b)
    return inter / (float(a.sum()) + float(b.sum()) - inter + 1e-8)


def ref_crch(u, v, y, c, t, margin, shift):
    n = len(u)
    r = [[float(y[i, k]) * (1.0 if float(c[i, k]) >= float(t[k]) else 0.0) for k in range(y.shape[1])] for i in range(n)]
    r = torch.tensor(r, dtype=torch.float64)
    attract = repel = diag = 0.0
    for i in range(n):
        s_ii = float(u[i] @ v[i])
        diag += s_ii
        for j in range(n):
            if i == j:
                continue
            s = float(u[i] @ v[j])
            s_jj = float(u[j] @ v[j])
            tij = ref_jaccard(r[i], r[j])
            if tij > 0:
                attract += math.exp(-s - tij)
            else:
                te = s if s >= s_ii - margin else s - shift
                im = s if s >= s_jj - margin else s - shift
                repel += math.exp(te) + math.exp(im)
    return attract / n**2 + repel / n**2 - diag / n


def ref_ema(c, pu, pv, y, omega):
    out = torch.zeros_like(c)
    for i in range(c.shape[0]):
        for k in range(c.shape[1]):
            out[i, k] = (omega * float(c[i, k]) + (1 - omega) * (float(pu[i, k]) + float(pv[i, k])) / 2) * float(y[i, k])
    return out


def ref_reconstruct(u, v, c, y, k, mix):
    n = len(u)
    out = torch.zeros_like(c)
    for i in range(n):
        sims = [0.0 if j == i else (float(u[i] @ u[j]) + float(v[i] @ v[j])) / 2 for j in range(n)]
        top = sorted(range(n), key=lambda j: -sims[j])[:k]
        norm = sum(sims[j] for j in top) + 1e-8
        for cls in range(c.shape[1]):
            q = sum(sims[j] / norm * float(c[j, cls]) for j in top) * float(y[i, cls])
            out[i, cls] = mix * q + (1 - mix) * float(c[i, cls])
    return out


def ref_thresholds(c):
    out = []
    for k in range(c.shape[1]):
        values = [float(c[i, k]) for i in range(c.shape[0]) if float(c[i, k]) > 0]
        out.append(sum(values) / (len(values) if values else 1))
    return torch.tensor(out, dtype=torch.float64)


def ref_gce_mae(p, q):
    return (1 - q) * (1 - p ** q) / q + q * (1 - p)


def ref_center_terms(pu, pv, y, q):
    return torch.tensor([ref_gce_mae(float(y[i] @ pu[i]), q) + ref_gce_mae(float(y[i] @ pv[i]), q)
                         for i in range(len(y))], dtype=torch.float64)


def ref_self_paced(losses, gamma):
    weights = [max(0.0, 1 - float(x) / gamma) for x in losses]
    total = sum(w * float(x) + gamma * (w * w / 2 - w) for w, x in zip(weights, losses))
    return total / len(losses), weights


def ref_chl(u, v, tau, q):
    stacked = torch.cat([u, v])
    n2, b = len(stacked), len(u)
    total = 0.0
    for a in range(n2):
        partner = a + b if a < b else a - b
        g = [0.0 if c == a else math.exp(float(stacked[a] @ stacked[c]) / tau) for c in range(n2)]
        total += ref_gce_mae(g[partner] / sum(g), q)
    return 2 * total / n2


# ---- values

def test_confidence_bce_reference():
    y = labels(7, 5, 1)
    pu, pv, c = probabilities(7, 5, 2), probabilities(7, 5, 3), confidences(y, 4)
    assert float(confidence_bce(pu, pv, c)) == pytest.approx(ref_confidence_bce(pu, pv, c), abs=1e-10)


@pytest.mark.parametrize("margin, shift", [(0.2, 1.0), (0.6, 0.3)])
def test_crch_loss_reference(margin, shift):
    u, v, y = unit_rows(8, 6, 10), unit_rows(8, 6, 11), labels(8, 5, 12)
    c = confidences(y, 13)
    t = torch.tensor([0.3, 0.5, 0.2, 0.6, 0.4], dtype=torch.float64)
    got = crch_loss(u, v, y, c, t, margin=margin, shift=shift)
    assert float(got) == pytest.approx(ref_crch(u, v, y, c, t, margin, shift), abs=1e-10)


def test_crch_a_row_without_reliable_labels_is_everyones_negative():
    u, v = unit_rows(3, 4, 14), unit_rows(3, 4, 15)
    y = torch.tensor([[1.0, 0], [1, 0], [0, 1]], dtype=torch.float64)
    c = torch.tensor([[0.9, 0], [0.1, 0], [0, 0.9]], dtype=torch.float64)  # row 1's only label is unreliable
    t = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert float(crch_loss(u, v, y, c, t, margin=0.2, shift=1.0)) == pytest.approx(
        ref_crch(u, v, y, c, t, 0.2, 1.0), abs=1e-10)


def test_ema_confidence_reference_and_weight_schedule():
    y = labels(6, 4, 20)
    c, pu, pv = confidences(y, 21), probabilities(6, 4, 22), probabilities(6, 4, 23)
    torch.testing.assert_close(ema_confidence(c, pu, pv, y, omega=0.9), ref_ema(c, pu, pv, y, 0.9), atol=1e-12, rtol=0)
    assert (ema_weight(0, 100), ema_weight(50, 100), ema_weight(100, 100)) == pytest.approx((0.95, 0.875, 0.80))


@pytest.mark.parametrize("k", [1, 3, 9])
def test_reconstruct_confidence_reference(k):
    u, v, y = unit_rows(10, 5, 30), unit_rows(10, 5, 31), labels(10, 4, 32)
    c = confidences(y, 33)
    got = reconstruct_confidence(u, v, c, y, k=k, mix=0.2)
    torch.testing.assert_close(got, ref_reconstruct(u, v, c, y, k, 0.2), atol=1e-10, rtol=0)
    assert ((got > 0) <= (y > 0)).all()  # zero outside the candidates


def test_class_thresholds_reference_and_empty_class():
    c = torch.tensor([[0.5, 0.0, 0.2], [0.7, 0.0, 0.0], [0.0, 0.0, 0.4]], dtype=torch.float64)
    torch.testing.assert_close(class_thresholds(c), ref_thresholds(c), atol=1e-12, rtol=0)
    assert class_thresholds(c).tolist() == pytest.approx([0.6, 0.0, 0.3])


def test_gce_mae_reference():
    p = torch.tensor([1e-6, 0.01, 0.3, 0.9, 1.0], dtype=torch.float64)
    for q in (0.01, 0.5, 1.0):
        got = gce_mae(p, q)
        assert got.tolist() == pytest.approx([ref_gce_mae(float(x), q) for x in p], abs=1e-10)
    assert float(gce_mae(torch.tensor(1.0, dtype=torch.float64), 0.01)) == 0.0


def test_center_terms_reference():
    y = labels(7, 5, 40)
    pu, pv = torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1), torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1)
    torch.testing.assert_close(center_terms(pu, pv, y, q=0.01), ref_center_terms(pu, pv, y, 0.01), atol=1e-10, rtol=0)


def test_a_row_without_labels_has_a_finite_loss_and_gradient():
    y = labels(4, 3, 41)
    y[2] = 0  # no labels: no probability mass on labelled classes
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    terms = center_terms(torch.softmax(logits, 1), torch.softmax(logits, 1), y, q=0.01)
    assert terms[2].item() == pytest.approx(2 * ref_gce_mae(0.0, 0.01), abs=1e-12)
    self_paced(terms, gamma=5.0)[0].backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[2] == 0).all()


def test_self_paced_reference():
    losses = torch.tensor([0.5, 2.0, 4.9, 5.0, 7.5], dtype=torch.float64)
    loss, weights = self_paced(losses, gamma=5.0)
    ref_loss, ref_weights = ref_self_paced(losses, 5.0)
    assert float(loss) == pytest.approx(ref_loss, abs=1e-10) and weights.tolist() == pytest.approx(ref_weights, abs=1e-12)
    assert weights[-2:].tolist() == [0.0, 0.0]  # losses at or above gamma get weight 0


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_chl_loss_reference(tau):
    u, v = unit_rows(6, 5, 50), unit_rows(6, 5, 51)
    assert float(chl_loss(u, v, tau=tau, q=0.01)) == pytest.approx(ref_chl(u, v, tau, 0.01), abs=1e-10)


# ---- gradients by central differences (torch.autograd.gradcheck, float64)

def test_batch_loss_gradients_by_central_differences():
    u, v, y = unit_rows(6, 4, 60), unit_rows(6, 4, 61), labels(6, 3, 62)
    c = confidences(y, 63)
    t = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)
    checks = {
        "crch": (lambda a, b: crch_loss(a, b, y, c, t, margin=0.2, shift=1.0), (u, v)),
        "chl": (lambda a, b: chl_loss(a, b, tau=1.0, q=0.01), (u, v)),
        "confidence_bce": (lambda a, b: confidence_bce(a, b, c), (probabilities(6, 3, 64), probabilities(6, 3, 65))),
        "cal": (lambda a, b: self_paced(center_terms(torch.softmax(a, 1), torch.softmax(b, 1), y, q=0.01), gamma=5.0)[0],
                (torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64))),
    }
    for name, (fn, inputs) in checks.items():
        leaves = tuple(x.clone().requires_grad_() for x in inputs)
        assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6), name


# ---- the share form (one process): parts scored against the whole batch sum to the whole

def test_shares_of_a_split_batch_sum_to_the_whole_batch():
    u, v, y = unit_rows(9, 5, 70), unit_rows(9, 5, 71), labels(9, 4, 72)
    c = confidences(y, 73)
    t = torch.tensor([0.3, 0.5, 0.2, 0.6], dtype=torch.float64)
    pu, pv = probabilities(9, 4, 74), probabilities(9, 4, 75)

    def total(parts):
        a, b = u.clone().requires_grad_(), v.clone().requires_grad_()
        crch = chl = bce = 0.0
        for rows in parts:
            cols = GlobalBatch(a, b, y, rows.start)
            crch = crch + crch_loss(a[rows], b[rows], y[rows], c[rows], t, margin=0.2, shift=1.0, columns=cols,
                                    column_confidence=c)
            chl = chl + chl_loss(a[rows], b[rows], columns=cols)
            bce = bce + confidence_bce(pu[rows], pv[rows], c[rows], n_total=9)
        (crch + chl).backward()
        return [crch.item(), chl.item(), float(bce)], a.grad, b.grad

    whole, gu, gv = total([slice(0, 9)])
    split, su, sv = total([slice(0, 4), slice(4, 9)])
    assert split == pytest.approx(whole, abs=1e-12)
    assert torch.allclose(su, gu, atol=1e-12) and torch.allclose(sv, gv, atol=1e-12)
