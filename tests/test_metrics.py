"""Ranking metrics against brute force: explicit per-query loops and averages over every tie order."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scbch_dist import metrics
from scbch_dist.digests import IntegrityError
from scbch_dist.metrics.table import PackedTable


def ap_of_order(rel_in_order, k=None):
    """AP of a ranked list: mean precision at the relevant ranks (within the first k)."""
    h = np.asarray(rel_in_order, dtype=bool)[:k]
    if not h.any():
        return 0.0
    ranks = np.flatnonzero(h) + 1
    return float(np.mean(np.arange(1, len(ranks) + 1) / ranks))


def tie_orders(dist):
    groups = [np.flatnonzero(dist == v) for v in np.unique(dist)]
    for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
        yield np.concatenate(perms)


def brute(qc, dc, ql, dl, k=None):
    qc, dc = np.asarray(qc) > 0, np.asarray(dc) > 0
    rel = (np.asarray(ql) @ np.asarray(dl).T) > 0
    index_aps, expected_aps = [], []
    for q in range(len(qc)):
        if not rel[q].any():
            continue
        dist = (qc[q][None, :] != dc).sum(1)
        index_aps.append(ap_of_order(rel[q][np.argsort(dist, kind="stable")], k))
        expected_aps.append(np.mean([ap_of_order(rel[q][o], k) for o in tie_orders(dist)]))
    return float(np.mean(index_aps)), float(np.mean(expected_aps))


def random_case(seed, q=4, n=7, bits=3, c=4):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2, (q, bits)), rng.integers(0, 2, (n, bits)),
            rng.integers(0, 2, (q, c)), rng.integers(0, 2, (n, c)))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [None, 1, 3, 5])
def test_map_equals_brute_force_over_every_tie_order(seed, k):
    qc, dc, ql, dl = random_case(seed)
    if not ((ql @ dl.T) > 0).any():
        pytest.skip("no query has a relevant item")
    ref_index, ref_expected = brute(qc, dc, ql, dl, k)
    assert metrics.mean_average_precision(qc, dc, ql, dl, topk=k, ties="index") == pytest.approx(ref_index, abs=1e-12)
    assert metrics.mean_average_precision(qc, dc, ql, dl, topk=k, ties="expected") == pytest.approx(ref_expected, abs=1e-12)


def test_map_hand_example():
    # one query, 4 items at distances 0, 1, 1, 2 (2 bits); relevant: items 1 and 3
    qc = np.array([[1, 1]])
    dc = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    ql = np.array([[1, 0]])
    dl = np.array([[0, 1], [1, 0], [0, 1], [1, 1]])
    # index ties: order 0,1,2,3 -> relevant at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5
    assert metrics.mean_average_precision(qc, dc, ql, dl) == pytest.approx(0.5)
    # tie-aware: items 1, 2 tied; item 1 at rank 2 or 3 with equal probability
    # rank 2: (1/2 + 2/4)/2 = 0.5 ; rank 3: (1/3 + 2/4)/2 = 5/12  -> 11/24
    assert metrics.mean_average_precision(qc, dc, ql, dl, ties="expected") == pytest.approx(11 / 24)
    # mAP@2 with index ties: only item 1 is relevant in the top 2 -> 1/2 over the 1 found
    assert metrics.mean_average_precision(qc, dc, ql, dl, topk=2) == pytest.approx(0.5)
    # a query with no relevant database item is left out, not scored 0
    ql2 = np.array([[1, 0], [0, 0]])
    assert metrics.mean_average_precision(np.repeat(qc, 2, 0), dc, ql2, dl) == pytest.approx(0.5)


def test_code_formats_are_equivalent():
    qc, dc, ql, dl = random_case(7, q=5, n=20, bits=8)
    ref = metrics.mean_average_precision(qc, dc, ql, dl)
    assert metrics.mean_average_precision(qc * 2 - 1, dc * 2 - 1, ql, dl) == ref  # +-1 sign codes
    assert metrics.mean_average_precision(qc.astype(bool), dc.astype(bool), ql, dl) == ref
    assert metrics.mean_average_precision(torch.tensor(qc * 2.0 - 1), torch.tensor(dc * 2.0 - 1),
                                          torch.tensor(ql), torch.tensor(dl)) == ref


@pytest.mark.parametrize("bits", [256, 1024])
def test_long_codes_distances_and_map(bits):
    rng = np.random.default_rng(bits)
    qc, dc = rng.integers(0, 2, (6, bits)), rng.integers(0, 2, (30, bits))
    dist = metrics.hamming_distances(qc, dc).numpy()
    assert (dist == (qc[:, None, :] != dc[None, :, :]).sum(2)).all()
    ql, dl = rng.integers(0, 2, (6, 5)), rng.integers(0, 2, (30, 5))
    rel = (ql @ dl.T) > 0
    ref = np.mean([ap_of_order(rel[q][np.argsort(dist[q], kind="stable")]) for q in range(6) if rel[q].any()])
    assert metrics.mean_average_precision(qc, dc, ql, dl) == pytest.approx(ref, abs=1e-12)


def test_many_chunks_and_threads_match_single_loop():
    # a database large enough to split the queries into many chunks
    rng = np.random.default_rng(8)
    qc, dc = rng.integers(0, 2, (300, 16)), rng.integers(0, 2, (9000, 16))
    ql, dl = (rng.random((300, 6)) < 0.2), (rng.random((9000, 6)) < 0.2)
    dist = metrics.hamming_distances(qc, dc).numpy()
    rel = (ql.astype(int) @ dl.T.astype(int)) > 0
    ref = np.mean([ap_of_order(rel[q][np.argsort(dist[q], kind="stable")]) for q in range(300) if rel[q].any()])
    report = metrics.retrieval_metrics(qc, dc, ql, dl, topk=[100])
    assert report["map"] == pytest.approx(ref, abs=1e-12)
    assert report["map_tie_aware"] == pytest.approx(metrics.mean_average_precision(qc, dc, ql, dl, ties="expected"))
    assert report["map_at_k"][100] == pytest.approx(metrics.mean_average_precision(qc, dc, ql, dl, topk=100))


def test_chance_map_closed_form_equals_all_orders():
    ql = np.array([[1, 0], [0, 1], [1, 1]])
    dl = np.array([[1, 0], [0, 0], [1, 0], [0, 1], [0, 0]])
    rel = (ql @ dl.T) > 0
    ref = np.mean([np.mean([ap_of_order(rel[q][list(p)]) for p in itertools.permutations(range(5))])
                   for q in range(3) if rel[q].any()])
    assert metrics.chance_map(ql, dl) == pytest.approx(ref, abs=1e-12)


def test_pr_curve_over_radius_hand_example():
    qc = np.array([[1, 1]])
    dc = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    ql, dl = np.array([[1, 0]]), np.array([[0, 1], [1, 0], [0, 1], [1, 1]])
    pr = metrics.retrieval_metrics(qc, dc, ql, dl)["pr_radius"]
    # radius 0: item 0 (not relevant); radius 1: items 0-2 (1 relevant); radius 2: all (2 relevant)
    assert pr["radius"] == [0, 1, 2]
    assert pr["precision"] == pytest.approx([0.0, 1 / 3, 2 / 4])
    assert pr["recall"] == pytest.approx([0.0, 0.5, 1.0])


def test_pr_precision_averages_only_queries_that_retrieve():
    qc = np.array([[1, 1], [0, 0]])
    dc = np.array([[1, 1], [1, 0]])
    ql = np.array([[1], [1]])
    dl = np.array([[1], [1]])
    pr = metrics.retrieval_metrics(qc, dc, ql, dl)["pr_radius"]
    # radius 0: query 0 retrieves item 0 (precision 1); query 1 retrieves nothing -> not averaged
    assert pr["precision"][0] == pytest.approx(1.0)
    assert pr["recall"][0] == pytest.approx((0.5 + 0.0) / 2)


def test_roc_auc_hand_values_with_ties():
    assert metrics.roc_auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert metrics.roc_auc([0.1, 0.3, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # positive 0.5 ties a negative 0.5 (counts 1/2) and beats 0.2: (1 + 0.5) / 2
    assert metrics.roc_auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))


def test_bad_inputs_raise():
    qc, dc, ql, dl = random_case(9)
    with pytest.raises(ValueError, match="ties"):
        metrics.mean_average_precision(qc, dc, ql, dl, ties="random")
    with pytest.raises(ValueError, match="code lengths"):
        metrics.mean_average_precision(qc, dc[:, :2], ql, dl)
    with pytest.raises(ValueError, match="label rows"):
        metrics.mean_average_precision(qc, dc, ql[:2], dl)


@pytest.mark.parametrize("seed", range(4))
def test_precision_at_k_and_topk_curve_equal_brute_force(seed):
    qc, dc, ql, dl = random_case(seed, q=3, n=7, bits=2)
    rel = (ql @ dl.T) > 0
    if not rel.any():
        pytest.skip("no query has a relevant item")
    out = metrics.retrieval_metrics(qc, dc, ql, dl, topk=[1, 3, 5], curve_points=4)
    dist = metrics.hamming_distances(qc, dc).numpy()
    scored = [q for q in range(3) if rel[q].any()]
    for k in (1, 3, 5):
        index = np.mean([rel[q][np.argsort(dist[q], kind="stable")][:k].sum() / k for q in scored])
        expected = np.mean([np.mean([rel[q][o][:k].sum() / k for o in tie_orders(dist[q])]) for q in scored])
        assert out["precision_at_k"][k] == pytest.approx(index, abs=1e-12)
        assert out["precision_at_k_tie_aware"][k] == pytest.approx(expected, abs=1e-12)
    curve = out["pr_topk"]
    assert curve["k"] == [1, 3, 5, 7]
    for j, k in enumerate(curve["k"]):
        ranked = [rel[q][np.argsort(dist[q], kind="stable")][:k] for q in scored]
        assert curve["precision"][j] == pytest.approx(np.mean([r.sum() / k for r in ranked]), abs=1e-12)
        assert curve["recall"][j] == pytest.approx(np.mean([r.sum() / rel[q].sum() for r, q in zip(ranked, scored)]),
                                                   abs=1e-12)
    assert curve["recall"][-1] == pytest.approx(1.0)  # the whole database retrieves everything


@pytest.mark.parametrize("seed", range(3))
def test_ndcg_and_recall_at_k_equal_a_per_query_loop(seed):
    """NDCG@K with graded relevance (shared labels; gain 2^g - 1, discount log2(p + 1)) and
    recall@K, ties by index, against explicit loops over a database of 2 label words."""
    rng = np.random.default_rng(seed)
    qc, dc = rng.integers(0, 2, (20, 8)), rng.integers(0, 2, (90, 8))
    ql, dl = rng.random((20, 70)) < 0.08, rng.random((90, 70)) < 0.08  # 70 classes: two packed words
    out = metrics.retrieval_metrics(qc, dc, ql, dl, topk=[1, 10, 200])
    dist = metrics.hamming_distances(qc, dc).numpy()
    gains = ql.astype(int) @ dl.T.astype(int)
    scored = [q for q in range(20) if gains[q].any()]
    assert len(scored) > 5
    for k in (1, 10, 200):
        ndcg, recall = [], []
        for q in scored:
            ranked = gains[q][np.argsort(dist[q], kind="stable")][:k]
            ideal = np.sort(gains[q])[::-1][:k]
            disc = [1 / math.log2(p + 2) for p in range(len(ranked))]
            ndcg.append(sum((2.0 ** g - 1) * d for g, d in zip(ranked, disc)) /
                        sum((2.0 ** g - 1) * d for g, d in zip(ideal, disc)))
            recall.append((ranked > 0).sum() / (gains[q] > 0).sum())
        assert out["ndcg_at_k"][k] == pytest.approx(np.mean(ndcg), abs=1e-12)
        assert out["recall_at_k"][k] == pytest.approx(np.mean(recall), abs=1e-12)
    assert out["recall_at_k"][200] == pytest.approx(1.0)  # K beyond the database: everything found


def test_scores_of_query_shares_concatenate_to_the_whole_bit_for_bit():
    """What lets ranks split the queries: any split, scored separately and concatenated, gives the
    same per-query rows and the same metrics to the last bit."""
    rng = np.random.default_rng(5)
    qc, dc = rng.integers(0, 2, (301, 32)), rng.integers(0, 2, (7000, 32))
    ql, dl = rng.random((301, 24)) < 0.15, rng.random((7000, 24)) < 0.15
    ql[-1], dl[5] = True, True  # the last share alone meets a gain of 24: its ideal-DCG histogram is wider
    whole = metrics.score_queries(qc, dc, ql, dl, topk=[50, 1000])
    cuts = [0, 1, 150, 301]
    parts = [metrics.score_queries(qc[a:b], dc, ql[a:b], dl, topk=[50, 1000], threads=1)
             for a, b in zip(cuts, cuts[1:])]
    joined = metrics.QueryScores.concatenate(parts)
    for f in metrics.QueryScores.FIELDS:
        assert np.array_equal(getattr(joined, f), getattr(whole, f), equal_nan=True), f
    assert metrics.summarize_scores(joined, 7000, topk=[50, 1000]) == \
        metrics.retrieval_metrics(qc, dc, ql, dl, topk=[50, 1000])


def test_the_torch_path_scores_what_the_numpy_path_scores(monkeypatch):
    """The GPU path (matrix products, bincount and a stable sort in torch), run on the CPU: integer
    fields equal, float ones to rounding, in chunks smaller than the queries and database blocks
    smaller than the database."""
    monkeypatch.setattr(metrics.rank_torch, "DB_BLOCK", 150)
    rng = np.random.default_rng(11)
    qc, dc = rng.integers(0, 2, (57, 24)), rng.integers(0, 2, (400, 24))
    ql, dl = rng.random((57, 70)) < 0.06, rng.random((400, 70)) < 0.06
    ref = metrics.score_queries(qc, dc, ql, dl, topk=[5, 100], curve_points=7)
    got = metrics.score_queries_torch(torch.from_numpy(qc * 2 - 1), torch.from_numpy(dc * 2 - 1),
                                      torch.from_numpy(ql), torch.from_numpy(dl), topk=[5, 100], curve_points=7,
                                      chunk_entries=4000)
    for f in ("count", "relevant", "hits"):
        assert np.array_equal(getattr(got, f), getattr(ref, f)), f
    for f in ("index_ap", "ndcg"):
        np.testing.assert_allclose(getattr(got, f), getattr(ref, f), rtol=0, atol=1e-12)
    assert np.isnan(ref.index_ap).any() and np.array_equal(np.isnan(got.index_ap), np.isnan(ref.index_ap))


@pytest.mark.slow
def test_two_processes_score_the_metrics_of_one_to_the_last_bit(tmp_path):
    """engine.scoring.ranking_metrics on 2 gloo processes, each scoring its share of the queries
    (1 query: one rank has none; 77: shares of 38 and 39), equals one process's
    retrieval_metrics exactly, every number (JSON turns int keys into strings, on both sides); and
    so does it with the database streamed from packed tables on disk."""
    scripts = Path(__file__).parent / "dist_scripts"
    sys.path.insert(0, str(scripts))
    import ranked_metrics as script
    from conftest import torchrun

    script.write_tables(tmp_path)
    torchrun(str(scripts / "ranked_metrics.py"), str(tmp_path))
    got = json.loads((tmp_path / "metrics.json").read_text())
    for q in script.QUERY_COUNTS:
        ref = json.loads(json.dumps(metrics.retrieval_metrics(*script.metric_case(q), topk=script.TOPK)))
        assert got[str(q)] == ref, q
    # the database streamed from tables on disk by the compiled kernels: one process's numbers too
    pytest.importorskip("numba")
    got = json.loads((tmp_path / "metrics_disk.json").read_text())
    for q in script.QUERY_COUNTS:
        scores = metrics.score_queries(*script.disk_case(q, tmp_path), topk=script.TOPK, db_chunk=script.DISK_CHUNK,
                                       compiled=True)
        ref = json.loads(json.dumps(metrics.summarize_scores(scores, 3000, topk=script.TOPK)))
        assert got[str(q)] == ref, q


def test_pair_reciprocal_rank_is_the_tie_aware_map_with_one_relevant_item():
    """Against the identity labels through retrieval_metrics, and against every tie order by hand."""
    rng = np.random.default_rng(2)
    img, txt = rng.integers(0, 2, (40, 4)), rng.integers(0, 2, (40, 4))  # 4 bits: many ties
    own = np.eye(40, dtype=bool)
    rr = metrics.pair_reciprocal_rank(img, txt)
    assert rr.mean() == pytest.approx(metrics.retrieval_metrics(img, txt, own, own)["map_tie_aware"], abs=1e-12)
    dist = metrics.hamming_distances(img[:6], txt[:6]).numpy()
    small = metrics.pair_reciprocal_rank(img[:6], txt[:6])
    for i in range(6):  # the mean over every order of the tied items of 1 / (rank of the partner)
        assert small[i] == pytest.approx(np.mean([1 / (1 + list(o).index(i)) for o in tie_orders(dist[i])]), abs=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("db_chunk", [1, 7, 333, 999])
def test_a_database_scored_in_blocks_gives_the_numbers_of_the_whole(db_chunk, compiled):
    """Blocks of 1 row, of 7, uneven blocks, and one block short of the database, by numpy
    (score_blocks) and by the streamed kernels (stream_scores): every integer row equal, AP and
    NDCG to rounding, ties across blocks ranked by database order (8 bits: many ties)."""
    if compiled:
        pytest.importorskip("numba")
    rng = np.random.default_rng(db_chunk)
    qc, dc = rng.integers(0, 2, (23, 8)), rng.integers(0, 2, (1000, 8))
    ql, dl = rng.random((23, 70)) < 0.05, rng.random((1000, 70)) < 0.05
    whole = metrics.score_queries(qc, dc, ql, dl, topk=[1, 30, 2000], db_chunk=None, compiled=False)
    blocks = metrics.score_queries(qc, dc, ql, dl, topk=[1, 30, 2000], db_chunk=db_chunk, compiled=compiled)
    for f in ("count", "relevant", "hits"):
        assert np.array_equal(getattr(blocks, f), getattr(whole, f)), f
    for f in ("index_ap", "ndcg"):
        np.testing.assert_allclose(getattr(blocks, f), getattr(whole, f), rtol=0, atol=1e-12)
        assert np.array_equal(np.isnan(getattr(blocks, f)), np.isnan(getattr(whole, f)))
    without_k = metrics.score_queries(qc, dc, ql, dl, db_chunk=db_chunk, compiled=compiled)  # not graded: no gains
    np.testing.assert_allclose(without_k.index_ap, whole.index_ap[:, :1], rtol=0, atol=1e-12)


def test_every_ranking_path_fills_one_core_and_reduces_to_one_ndcg():
    """The one ranking core (metrics/sums.py): numpy in one block and in blocks, the kernels in one
    block and streamed, and torch fill the same per-query sums and reduce them in one function, so
    every integer and NDCG@K (K inside and beyond the database) equal numpy's bit for bit; the APs
    agree to rounding (their precision sums run in another order). Before the core, the blocked
    and torch paths computed NDCG themselves: 3e-16 to 7e-16 apart."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(5)
    qc, dc = rng.integers(0, 2, (41, 12)), rng.integers(0, 2, (900, 12))  # 12 bits: many ties
    ql, dl = rng.random((41, 9)) < 0.3, rng.random((900, 9)) < 0.3
    topk = [1, 25, 300, 2000]
    whole = metrics.score_queries(qc, dc, ql, dl, topk=topk, db_chunk=None, compiled=False)
    paths = {"kernel": metrics.score_queries(qc, dc, ql, dl, topk=topk, db_chunk=None, compiled=True),
             "numpy blocks": metrics.score_queries(qc, dc, ql, dl, topk=topk, db_chunk=128, compiled=False),
             "streamed kernels": metrics.score_queries(qc, dc, ql, dl, topk=topk, db_chunk=128, compiled=True),
             "torch": metrics.score_queries_torch(*(torch.from_numpy(np.asarray(a)) for a in (qc, dc, ql, dl)),
                                                  topk=topk, chunk_entries=9000)}
    for name, scores in paths.items():
        for f in ("count", "relevant", "hits", "ndcg"):
            assert np.array_equal(getattr(scores, f), getattr(whole, f), equal_nan=f == "ndcg"), (name, f)
        np.testing.assert_allclose(scores.index_ap, whole.index_ap, rtol=0, atol=1e-12)
    # a given ranking (a search index's) goes through the same core: the stable one gives numpy's AP
    stable = np.argsort(metrics.hamming_distances(qc, dc).numpy(), axis=1, kind="stable")
    assert np.array_equal(metrics.ranked_average_precision(stable, ql, dl), whole.index_ap[:, 0], equal_nan=True)


def _write_tables(folder, dc, dl, rows=300):
    """The database as two packed tables (the codes written in blocks of ``rows``), opened again."""
    return (PackedTable.open(metrics.write_table(folder / "codes.npy", dc, rows).path),
            PackedTable.open(metrics.write_table(folder / "labels.npy", dl).path))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("nq, n, bits, classes, topk, db_chunk", [
    (31, 1000, 16, 5, [10, 100], 128),
    (12, 2500, 130, 80, [7, 5000], 1000),  # three code words, two label words, K beyond the database
    (15, 777, 8, 3, [], 777),  # not graded; one block
])
def test_a_database_on_disk_scores_what_memory_scores(tmp_path, nq, n, bits, classes, topk, db_chunk, compiled):
    """Database codes and labels in packed tables on disk, read a block at a time: the numbers of the
    whole database in memory (integers equal, AP and NDCG to rounding), by numpy and by the kernels."""
    if compiled:
        pytest.importorskip("numba")
    rng = np.random.default_rng(n)
    qc, dc = rng.integers(0, 2, (nq, bits)), rng.integers(0, 2, (n, bits))
    ql, dl = rng.random((nq, classes)) < 0.1, rng.random((n, classes)) < 0.1
    codes, labels = _write_tables(tmp_path, dc, dl)
    assert (len(codes), codes.width, labels.width) == (n, bits, classes)
    memory = metrics.score_queries(qc, dc, ql, dl, topk=topk, db_chunk=None, compiled=False)
    disk = metrics.score_queries(qc, codes, ql, labels, topk=topk, db_chunk=db_chunk, compiled=compiled)
    for f in metrics.QueryScores.FIELDS:
        a, b = getattr(memory, f), getattr(disk, f)
        assert a.dtype == b.dtype and a.shape == b.shape, f
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-12)
            assert np.array_equal(np.isnan(a), np.isnan(b)), f
        else:
            assert np.array_equal(a, b), f


def test_a_database_on_disk_is_streamed_on_the_cpu_whatever_the_device(tmp_path):
    """engine.scoring.ranking_metrics asked for a CUDA device with tables on disk streams them on
    the CPU (the GPU path would hold the whole database on the GPU): the numbers of the CPU path,
    and no CUDA call, so it runs on a machine without one."""
    from scbch_dist.engine.scoring import ranking_metrics

    rng = np.random.default_rng(5)
    qc, dc = rng.integers(0, 2, (9, 32)), rng.integers(0, 2, (600, 32))
    ql, dl = rng.random((9, 7)) < 0.3, rng.random((600, 7)) < 0.3
    codes, labels = _write_tables(tmp_path, dc, dl)
    got = ranking_metrics(qc, codes, ql, labels, topk=[10], device=torch.device("cuda"), db_chunk=250)
    want = metrics.retrieval_metrics(qc, dc, ql, dl, topk=[10])
    assert got["map"] == pytest.approx(want["map"], abs=1e-12) and got["recall_at_k"] == want["recall_at_k"]


def _flip_bit(table: PackedTable, row: int, byte: int = 0, mask: int = 1) -> None:
    with open(table.path, "r+b") as f:
        f.seek(table.offset + row * table.words * 8 + byte)
        value = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([value ^ mask]))


def test_a_damaged_table_is_refused_by_name(tmp_path):
    """A table whose words changed after writing fails the pass that reads it (its digest): the
    codes' and the labels' alike, in the database's last block or its first; a truncated one
    fails on opening; all name the file. Labels of another width are refused."""
    rng = np.random.default_rng(0)
    qc, dc = rng.integers(0, 2, (4, 64)), rng.integers(0, 2, (500, 64))
    ql, dl = rng.random((4, 6)) < 0.3, rng.random((500, 6)) < 0.3
    for name, row in (("codes", 123), ("labels", 499)):
        codes, labels = _write_tables(tmp_path, dc, dl)
        _flip_bit(codes if name == "codes" else labels, row)
        for compiled in (False, True):
            for db_chunk in (100, None):
                with pytest.raises(IntegrityError, match=f"{name}.npy: its words differ"):
                    metrics.score_queries(qc, codes, ql, labels, db_chunk=db_chunk, compiled=compiled)
    with open(labels.path, "r+b") as f:
        f.truncate(labels.offset + 100)
    with pytest.raises(IntegrityError, match="labels.npy: .* bytes, .* expected"):
        PackedTable.open(labels.path)
    other = PackedTable.write(tmp_path / "other.npy", [metrics.pack_words(rng.random((500, 9)) < 0.3)], 9)
    with pytest.raises(ValueError, match="other.npy: labels of 9 classes, the queries have 6"):
        metrics.score_queries(qc, codes, ql, other)
    with pytest.raises(ValueError, match="both packed tables on disk, or neither"):
        metrics.score_queries(qc, codes, ql, dl)


def test_bits_past_a_tables_width_never_reach_the_kernels(tmp_path):
    """Words that set bits past the width (codes of 16 bits declared as 12, or damage after
    writing) are refused when written, and when read before any kernel sees them (a distance past
    the code length would index past the kernels' arrays), naming the file."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="wide.npy: rows 0-299 set bits past the width of 12"):
        PackedTable.write(tmp_path / "wide.npy", [metrics.pack_words(rng.random((300, 16)) < 0.5)], 12)
    qc, dc = rng.integers(0, 2, (4, 12)), rng.integers(0, 2, (300, 12))
    ql, dl = rng.random((4, 3)) < 0.5, rng.random((300, 3)) < 0.5
    codes, labels = _write_tables(tmp_path, dc, dl)
    _flip_bit(codes, 7, byte=1, mask=0x80)  # bit 15 of row 7
    for compiled in (False, True):
        with pytest.raises(IntegrityError, match="codes.npy: rows 0-99 set bits past the width of 12"):
            metrics.score_queries(qc, codes, ql, labels, db_chunk=100, compiled=compiled)


@pytest.mark.parametrize("nq, n, bits, classes, topk, p", [
    (5, 300, 16, 5, [], 0.15),  # not graded: AP@all only
    (17, 1000, 64, 24, [10, 100, 5000], 0.15),  # K beyond the database
    (3, 2000, 128, 80, [1, 50], 0.15),  # two code words, two label words
    (40, 777, 300, 3, [7], 0.02),  # uint16 distances, queries without a relevant item
    (9, 3000, 8, 70, [1, 30], 0.05),  # 8 bits: large tie groups
])
def test_the_compiled_kernel_scores_what_numpy_scores_bit_for_bit(nq, n, bits, classes, topk, p):
    """metrics.kernel (three passes, no sort) against the numpy path's stable sort: every field
    equal to the last bit, NaN where numpy has NaN, the same dtypes."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(n)
    qc, dc = rng.random((nq, bits)) > 0.5, rng.random((n, bits)) > 0.5
    ql, dl = rng.random((nq, classes)) < p, rng.random((n, classes)) < p
    numpy_path = metrics.score_queries(qc, dc, ql, dl, topk=topk, compiled=False)
    compiled = metrics.score_queries(qc, dc, ql, dl, topk=topk, compiled=True)
    for f in metrics.QueryScores.FIELDS:
        a, b = getattr(numpy_path, f), getattr(compiled, f)
        assert a.dtype == b.dtype and a.shape == b.shape, f
        assert np.array_equal(a, b, equal_nan=True), f
    if p == 0.02:
        assert np.isnan(numpy_path.index_ap).any()  # the no-relevant case is exercised


def test_without_numba_large_rankings_take_the_numpy_path(monkeypatch):
    """The kernel is an accelerator: where numba is missing the default path is numpy's (the same
    numbers), and only an explicit compiled=True asks for it."""
    monkeypatch.setattr(metrics, "_kernel_module", lambda: None)
    monkeypatch.setattr(metrics, "COMPILED_ABOVE", 1)
    rng = np.random.default_rng(0)
    qc, dc = rng.integers(0, 2, (4, 16)), rng.integers(0, 2, (50, 16))
    ql, dl = rng.random((4, 5)) < 0.3, rng.random((50, 5)) < 0.3
    scores = metrics.score_queries(qc, dc, ql, dl, topk=[5])
    assert np.array_equal(scores.index_ap, metrics.score_queries(qc, dc, ql, dl, topk=[5], compiled=False).index_ap,
                          equal_nan=True)
    with pytest.raises(ImportError, match="numba"):
        metrics.score_queries(qc, dc, ql, dl, compiled=True)


def test_harmonic_numbers_looked_up_in_a_pass_equal_the_table_bit_for_bit(monkeypatch):
    """HarmonicAt (the running sum in chunks, for databases beyond HARMONIC_TABLE_ABOVE) gives the
    table's float64 values exactly, at chunk edges, 0 and n; the tie-aware metrics through it are
    unchanged to the last bit."""
    n = 10_007
    table = metrics.harmonic_numbers(n)
    index = np.r_[0, 1, 96, 97, 98, 193, 194, n, np.random.default_rng(0).integers(0, n + 1, 500)].reshape(-1, 4)
    assert np.array_equal(metrics.HarmonicAt(chunk=97)[index], table[index])
    assert metrics.HarmonicAt(chunk=97)[np.zeros((2, 0), np.int64)].shape == (2, 0)
    rng = np.random.default_rng(1)
    qc, dc = rng.integers(0, 2, (30, 8)), rng.integers(0, 2, (n, 8))
    ql, dl = rng.random((30, 6)) < 0.2, rng.random((n, 6)) < 0.2
    scores = metrics.score_queries(qc, dc, ql, dl)
    h = metrics.Histograms(scores.count, scores.relevant)
    with_table = metrics.tie_aware_ap(h), metrics.tie_aware_ap_at_k(h, 500)
    monkeypatch.setattr(metrics.tie_aware, "HARMONIC_TABLE_ABOVE", 0)
    looked_up = metrics.tie_aware_ap(h), metrics.tie_aware_ap_at_k(h, 500)
    for a, b in zip(with_table, looked_up):
        assert np.array_equal(a, b, equal_nan=True)


def test_a_share_of_the_queries_scores_as_the_whole_does_on_a_streamed_database(monkeypatch):
    """Ranks split the queries: each share must take the path the whole would, or the AP sums come
    in another order. Before, the kernel was chosen from the share's (query, item) pairs, so at scale
    (2M codes, 2000 queries, 64 ranks) the ranks scored with the numpy blocks and one process with
    the streamed kernel: figures that differed in their last bits between 1 and W processes."""
    pytest.importorskip("numba")
    rng = np.random.default_rng(3)
    qc, dc = rng.integers(0, 2, (40, 16)), rng.integers(0, 2, (3000, 16))
    ql, dl = rng.random((40, 6)) < 0.4, rng.random((3000, 6)) < 0.4
    monkeypatch.setattr(metrics, "COMPILED_ABOVE", 40 * 3000)  # the whole takes the kernel, a half would not
    whole = metrics.score_queries(qc, dc, ql, dl, topk=[50], db_chunk=700)
    halves = metrics.QueryScores.concatenate([metrics.score_queries(qc[s], dc, ql[s], dl, topk=[50], db_chunk=700)
                                              for s in (slice(0, 20), slice(20, 40))])
    for f in metrics.QueryScores.FIELDS:
        assert np.array_equal(getattr(whole, f), getattr(halves, f), equal_nan=True), f
