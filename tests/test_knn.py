"""Neighbour search backends agree with the exact torch reference, self entry included."""

from __future__ import annotations

import pytest
import torch

from scbch_dist.knn import faiss_available, knn, knn_exact, put_self_back, resolve_backend

BACKENDS = ["torch"] + (["faiss-cpu"] if faiss_available() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_the_exact_reference(backend):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    own = torch.arange(100, 200)
    ref_s, ref_i = knn_exact(z[own], z, 7, self_index=own)
    s, i = knn(z[own], z, 7, self_index=own, backend=backend)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_entry_counts_as_zero_among_negative_neighbours(backend):
    # row 0's neighbours all have negative similarity: its own entry (0) must rank first
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [-0.9, -0.5], [-0.2, -1.0], [-0.1, 1.0]])
    s, i = knn(z[:1], z, 3, self_index=torch.tensor([0]), backend=backend)
    ref_s, ref_i = knn_exact(z[:1], z, 3, self_index=torch.tensor([0]))
    assert int(i[0, 0]) == 0 and float(s[0, 0]) == 0.0
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s)


def test_put_self_back_cases():
    sims = torch.tensor([[0.9, 0.5, 0.2], [0.8, 0.1, -0.3]])
    index = torch.tensor([[3, 0, 5], [4, 6, 7]])  # row 0 found itself (id 0); row 1 did not (id 1)
    s, i = put_self_back(sims, index, torch.tensor([0, 1]), 2)
    assert i.tolist() == [[3, 5], [4, 6]] and s.flatten().tolist() == pytest.approx([0.9, 0.2, 0.8, 0.1])
    s, i = put_self_back(sims, index, torch.tensor([0, 1]), 3)
    assert i.tolist() == [[3, 5, 0], [4, 6, 1]] and s[1, 2] == 0.0


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == ("faiss-cpu" if faiss_available() else "torch")
    with pytest.raises(ValueError, match="bank.knn"):
        resolve_backend("annoy", torch.device("cpu"))


def test_knn_exact_chunking_and_self_entry():
    g = torch.Generator().manual_seed(18)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    s_all, i_all = knn_exact(x, x, 4, self_index=torch.arange(50))
    s_chunk, i_chunk = knn_exact(x, x, 4, self_index=torch.arange(50), chunk=7)
    assert torch.equal(i_all, i_chunk) and torch.allclose(s_all, s_chunk)
    full = x @ x.T
    full.fill_diagonal_(0)  # the self entry is 0, not removed
    ref_s, ref_i = torch.topk(full, 4, dim=1)
    assert torch.equal(i_all, ref_i) and torch.allclose(s_all, ref_s)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-ivfpq", "faiss-hnsw"])
def test_approximate_backends_searched_exhaustively_are_exact(backend):
    """With every list scanned (IVF) or a candidate list as long as the bank (HNSW), an approximate
    backend returns the exact neighbours, self entry at 0 included; IVF-PQ scores through its codes,
    so its neighbours are compared as a set overlap."""
    from scbch_dist.knn import SearchParams

    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)
    own = torch.arange(0, 2000, 7)
    ref_s, ref_i = knn_exact(z[own], z, 10, self_index=own)
    params = SearchParams(nlist=16, nprobe=16, ef_search=2000)
    s, i = knn(z[own], z, 10, self_index=own, backend=backend, params=params)
    found = (i[:, :, None] == ref_i[:, None, :]).any(2).float().mean()
    if backend == "faiss-ivfpq":
        assert found > 0.5
        return
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_ivf_recall_with_few_lists_scanned_and_auto_above_the_threshold():
    from scbch_dist.knn import SearchParams, auto_nlist

    assert auto_nlist(1_000_000) == 4096 and auto_nlist(200) == 4 and auto_nlist(10) == 1
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(40, 32, generator=g)
    z = torch.nn.functional.normalize(centres[torch.randint(40, (6000,), generator=g)]
                                      + 1.0 * torch.randn(6000, 32, generator=g), dim=1)
    own = torch.arange(0, 6000, 11)
    _, ref_i = knn_exact(z[own], z, 20, self_index=own)
    params = SearchParams(nprobe=8, exact_below=5000)
    assert resolve_backend("auto", torch.device("cpu"), 6000, params) == "faiss-ivf"
    assert resolve_backend("auto", torch.device("cpu"), 4999, params) == "faiss-cpu"
    _, i = knn(z[own], z, 20, self_index=own, backend="auto", params=params)
    recall = (i[:, :, None] == ref_i[:, None, :]).any(2).float().mean()
    assert 0.95 < recall < 1.0  # 8 of 128 lists: approximate, and close
    _, i = knn(z[own], z, 20, self_index=own, backend="faiss-ivf", params=SearchParams(nprobe=1))
    assert 0.5 < (i[:, :, None] == ref_i[:, None, :]).any(2).float().mean() < 0.7  # one list: nprobe is honoured
