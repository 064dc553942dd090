"""Neighbour search backends agree with the exact reference (knn.exact_topk), self entry included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scbch_dist.knn import (BACKENDS as NAMES, REGISTRY, KnnSettings, exact_topk, faiss_available, neighbours,
                            put_self_back, resolve_backend)
from scbch_dist.knn import backends as knn_module
from scbch_dist.knn import exact as exact_module
from scbch_dist.knn.sharded import knn_sharded

BACKENDS = ["torch"] + (["faiss-cpu"] if faiss_available() else [])
CPU = torch.device("cpu")


def nearest(queries, base, k, *, self_index=None, backend="auto", **settings):
    """neighbours() with the backend and settings named here."""
    return neighbours(queries, base, k, self_index=self_index, settings=KnnSettings(knn=backend, **settings))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_the_exact_reference(backend):
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    own = torch.arange(100, 200)
    ref_s, ref_i = exact_topk(z[own], z, 7, self_index=own)
    s, i = nearest(z[own], z, 7, self_index=own, backend=backend)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_entry_counts_as_zero_among_negative_neighbours(backend):
    # row 0's neighbours all have negative similarity: its own entry (0) must rank first
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [-0.9, -0.5], [-0.2, -1.0], [-0.1, 1.0]])
    s, i = nearest(z[:1], z, 3, self_index=torch.tensor([0]), backend=backend)
    ref_s, ref_i = exact_topk(z[:1], z, 3, self_index=torch.tensor([0]))
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
    assert resolve_backend(KnnSettings(), CPU, 0) == ("faiss-cpu" if faiss_available() else "torch")
    with pytest.raises(ValueError, match="bank.knn"):
        resolve_backend(KnnSettings(knn="annoy"), CPU, 0)


def test_the_accepted_names_are_the_registry_and_auto_resolves_to_one_of_them(monkeypatch):
    assert NAMES == ("auto", *REGISTRY)
    for available in (True, False):
        monkeypatch.setattr(knn_module, "faiss_available", lambda gpu=False, a=available: a)
        for device in ("cpu", "cuda"):
            for rows in (10, 10**6):
                assert resolve_backend(KnnSettings(), torch.device(device), rows) in REGISTRY


def numpy_exact(queries, base, width, *, settings, seed, query_rows):
    """A toy backend: the exact top-``width`` by numpy, knowing nothing of the self rule."""
    sims = queries.numpy() @ base.numpy().T
    index = np.argsort(-sims, axis=1, kind="stable")[:, :width]
    return torch.from_numpy(np.take_along_axis(sims, index, 1)), torch.from_numpy(index)


def test_a_backend_registered_by_name_is_searched_through_the_entry(monkeypatch):
    """Adding a backend is one function and one registry entry: the self rule, the sharded search
    and the name's validation come with it, and its neighbours are torch's."""
    monkeypatch.setitem(REGISTRY, "numpy", numpy_exact)
    g = torch.Generator().manual_seed(7)
    z = torch.nn.functional.normalize(torch.randn(200, 12, generator=g), dim=1)
    own = torch.arange(0, 200, 3)
    ref = {}
    for self_index in (own, None):
        ref[self_index is None] = nearest(z[own], z, 9, self_index=self_index, backend="torch")
        s, i = nearest(z[own], z, 9, self_index=self_index, backend="numpy")
        assert torch.equal(i, ref[self_index is None][1])
        assert torch.allclose(s, ref[self_index is None][0], atol=1e-6, rtol=0)
    order = torch.randperm(200, generator=g)  # one process's shard: the bank in another order
    _, i = knn_sharded(z[own], z[order], order, 9, self_index=own, settings=KnnSettings(knn="numpy"))
    assert torch.equal(i, ref[False][1])
    # the self entry (0) ranks first among negative neighbours: the rule is the entry's, not the backend's
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [-0.9, -0.5], [-0.2, -1.0], [-0.1, 1.0]])
    s, i = nearest(z[:1], z, 3, self_index=torch.tensor([0]), backend="numpy")
    assert i[0].tolist() == [0, 4, 3] and float(s[0, 0]) == 0.0


def test_exact_topk_chunking_and_self_entry():
    g = torch.Generator().manual_seed(18)
    x = torch.randn(50, 8, generator=g, dtype=torch.float64)
    s_all, i_all = exact_topk(x, x, 4, self_index=torch.arange(50))
    s_chunk, i_chunk = exact_topk(x, x, 4, self_index=torch.arange(50), chunk=7)
    assert torch.equal(i_all, i_chunk) and torch.allclose(s_all, s_chunk)
    full = x @ x.T
    full.fill_diagonal_(0)  # the self entry is 0, not removed
    ref_s, ref_i = torch.topk(full, 4, dim=1)
    assert torch.equal(i_all, ref_i) and torch.allclose(s_all, ref_s)


@pytest.mark.parametrize("backend", ["torch-ivf", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw"])
def test_approximate_backends_searched_exhaustively_are_exact(backend):
    """With every list scanned (IVF) or a candidate list as long as the bank (HNSW), an approximate
    backend returns the exact neighbours, self entry at 0 included; IVF-PQ scores through its codes,
    so its neighbours are compared as a set overlap."""
    if backend.startswith("faiss") and not faiss_available():
        pytest.skip("faiss not installed")
    g = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.randn(2000, 16, generator=g), dim=1)
    own = torch.arange(0, 2000, 7)
    ref_s, ref_i = exact_topk(z[own], z, 10, self_index=own)
    s, i = nearest(z[own], z, 10, self_index=own, backend=backend, nlist=16, nprobe=16, ef_search=2000)
    found = (i[:, :, None] == ref_i[:, None, :]).any(2).float().mean()
    if backend == "faiss-ivfpq":
        assert found > 0.5
        return
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch-ivf", "faiss-ivf"])
def test_ivf_recall_with_few_lists_scanned(backend):
    if backend.startswith("faiss") and not faiss_available():
        pytest.skip("faiss not installed")
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(40, 32, generator=g)
    z = torch.nn.functional.normalize(centres[torch.randint(40, (6000,), generator=g)]
                                      + 1.0 * torch.randn(6000, 32, generator=g), dim=1)
    own = torch.arange(0, 6000, 11)
    _, ref_i = exact_topk(z[own], z, 20, self_index=own)
    # torch-ivf: 16 of 64 lists (sqrt N), each list's queries together; faiss-ivf: 8 of 256, per query
    _, i = nearest(z[own], z, 20, self_index=own, backend=backend, nprobe=16 if backend == "torch-ivf" else 8)
    recall = (i[:, :, None] == ref_i[:, None, :]).any(2).float().mean()
    assert 0.95 < recall < 1.0
    _, i = nearest(z[own], z, 20, self_index=own, backend=backend, nprobe=1)
    assert 0.3 < (i[:, :, None] == ref_i[:, None, :]).any(2).float().mean() < 0.8  # one list: nprobe is honoured


def test_auto_takes_ivf_above_the_threshold(monkeypatch):
    from scbch_dist.knn import auto_nlist

    assert auto_nlist(1_000_000) == 4096 and auto_nlist(1_000_000, per_sqrt=1) == 1024
    assert auto_nlist(200) == 4 and auto_nlist(10) == 1
    settings = KnnSettings(exact_below=5000)
    assert resolve_backend(settings, CPU, 5000) == ("faiss-ivf" if faiss_available() else "torch-ivf")
    assert resolve_backend(settings, CPU, 4999) == ("faiss-cpu" if faiss_available() else "torch")
    monkeypatch.setattr(knn_module, "faiss_available", lambda gpu=False: False)
    assert resolve_backend(settings, CPU, 5000) == "torch-ivf"
    assert resolve_backend(settings, torch.device("cuda"), 5000) == "torch-ivf"


@pytest.mark.parametrize("backend", ["torch", "faiss-cpu", "torch-ivf", "faiss-ivf", "faiss-hnsw"])
def test_a_float16_bank_is_searched_as_its_float16_values(backend, monkeypatch):
    """A compressed (float16) bank gives the exact neighbours of its float16 rows, with float32
    similarities, on every backend that keeps it compressed or converts it piece by piece."""
    if backend.startswith("faiss") and not faiss_available():
        pytest.skip("faiss not installed")
    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(3000, 16, generator=g), dim=1).half()
    own = torch.arange(1, 3000, 5)
    ref_s, ref_i = exact_topk(z[own].double(), z.double(), 10, self_index=own)
    monkeypatch.setattr(exact_module, "CHUNK_ROWS", 1000)  # several conversion pieces
    s, i = nearest(z[own], z, 10, self_index=own, backend=backend, nlist=8, nprobe=8, ef_search=3000)
    assert s.dtype == torch.float32
    assert torch.equal(i, ref_i) and torch.allclose(s.double(), ref_s, atol=1e-6)


def test_exact_search_bounds_its_score_block_by_the_bank_size(monkeypatch):
    """exact_topk takes fewer query rows per matrix product as the bank grows (EXACT_SCORES entries of
    scores at most: 1 GB at the default), with the same result."""
    g = torch.Generator().manual_seed(6)
    z = torch.nn.functional.normalize(torch.randn(400, 8, generator=g), dim=1)
    own = torch.arange(0, 400, 3)
    ref = exact_topk(z[own], z, 5, self_index=own)
    calls = []
    real_topk = torch.topk
    monkeypatch.setattr(exact_module.torch, "topk", lambda s, *a, **kw: calls.append(s.shape) or real_topk(s, *a, **kw))
    monkeypatch.setattr(exact_module, "EXACT_SCORES", 400 * 10)
    got = exact_topk(z[own], z, 5, self_index=own)
    assert max(shape[0] for shape in calls) == 10 and len(calls) == 14
    assert torch.allclose(got[0], ref[0], atol=1e-6, rtol=0) and torch.equal(got[1], ref[1])  # BLAS: last bit


def test_probe_lists_follow_the_votes_of_a_lists_queries():
    """Each list scans itself first, then the lists its queries name most often among their nearest;
    equal votes go to the nearer centroid."""
    from scbch_dist.knn.backends import probe_lists

    centroids = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]]), dim=1)
    query_top = torch.tensor([[0, 3], [0, 3], [0, 1], [2, 3], [1, 0]])  # list 0's queries: 3 twice, 1 once
    probe = probe_lists(query_top, centroids, 3)
    assert probe[0].tolist() == [0, 3, 1]
    assert probe[1].tolist() == [1, 0, 2]  # one vote for 0; then 2 by centroid similarity
    assert probe[2].tolist() == [2, 3, 1]  # one vote for 3; 1 nearer than 0
    assert probe[3].tolist() == [3, 2, 1]  # no queries: nearest centroids
