"""The sharded search (docs/distributed.md, "Sharded search") equals the search of the whole bank."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from scbch_dist.data.synthetic import write_synthetic
from scbch_dist import knn
from scbch_dist.knn import KnnSettings
from scbch_dist.knn.sharded import PAD_ID, knn_sharded, merge_topk

SCRIPTS = Path(__file__).parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
import sharded_search as script  # noqa: E402
from conftest import read_checkpoint, tiny_args, tiny_synthetic_config, torchrun  # noqa: E402

BACKENDS = script.BACKENDS
TORCH = KnnSettings(knn="torch")


def assert_identical(got, ref):
    (s, i), (ref_s, ref_i) = got, ref
    assert torch.equal(i, ref_i), (i, ref_i)
    assert torch.equal(s, ref_s), (s - ref_s).abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_process_equals_knn(backend):
    """The bank in a shuffled order (the shard's ids not 0..N-1): the same neighbours as knn.neighbours, as ids."""
    z = torch.nn.functional.normalize(torch.randn(157, 24, generator=torch.Generator().manual_seed(0)), dim=1)
    order = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(5))
    own = order[:40]
    settings = KnnSettings(knn=backend)
    assert_identical(knn_sharded(z[own], z[order], order, 10, self_index=own, settings=settings),
                     knn.neighbours(z[own], z, 10, self_index=own, settings=settings))
    assert_identical(knn_sharded(z[own], z[order], order, 10, settings=settings),
                     knn.neighbours(z[own], z, 10, settings=settings))


def test_one_process_self_rule_negative_neighbours_and_small_banks():
    # row 0's neighbours all have negative similarity: its own entry (0) ranks first
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [-0.9, -0.5], [-0.2, -1.0], [-0.1, 1.0]])
    order = torch.tensor([4, 2, 0, 3, 1])  # the shard in another order: row j is id order[j]
    s, i = knn_sharded(z[:1], z[order], order, 3, self_index=torch.tensor([0]), settings=TORCH)
    assert int(i[0, 0]) == 0 and float(s[0, 0]) == 0.0
    assert_identical((s, i), knn.neighbours(z[:1], z, 3, self_index=torch.tensor([0]), settings=TORCH))
    # a bank of exactly k rows (the self entry among them), and no queries at all
    s, i = knn_sharded(z, z, torch.arange(5), 5, self_index=torch.arange(5), settings=TORCH)
    assert_identical((s, i), knn.neighbours(z, z, 5, self_index=torch.arange(5), settings=TORCH))
    s, i = knn_sharded(z[:0], z, torch.arange(5), 3, self_index=torch.arange(0), settings=TORCH)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    with pytest.raises(ValueError, match="k=6 neighbours requested from a bank of 5 rows"):
        knn_sharded(z, z, torch.arange(5), 6, self_index=torch.arange(5), settings=TORCH)


def test_merge_topk_breaks_ties_by_id_whatever_the_shard_order():
    sims_a, ids_a = torch.tensor([[0.75, 0.5, 0.5, -float("inf")]]), torch.tensor([[7, 9, 3, PAD_ID]])
    sims_b, ids_b = torch.tensor([[0.5, 0.5, 0.25]]), torch.tensor([[8, 1, 4]])
    s, i = merge_topk(sims_a, ids_a, sims_b, ids_b, 5)
    assert i.tolist() == [[7, 1, 3, 8, 9]] and s.tolist() == [[0.75, 0.5, 0.5, 0.5, 0.5]]
    assert torch.equal(merge_topk(sims_b, ids_b, sims_a, ids_a, 5)[1], i)
    # empty slots (-inf, PAD_ID) come after every real row, and only fill what no row can
    s, i = merge_topk(sims_a[:, 3:], ids_a[:, 3:], sims_b[:, :1], ids_b[:, :1], 2)
    assert i.tolist() == [[8, PAD_ID]] and s[0, 1] == -float("inf")


def assert_no_ties(queries, z, k, self_index):
    """'The same neighbours' is well defined: the k + 2 largest similarities of each query are distinct."""
    sims = queries @ z.T
    if self_index is not None:
        sims[torch.arange(queries.shape[0]), self_index] = 0.0
    top = torch.topk(sims, min(k + 2, z.shape[0]), dim=1).values
    assert (top[:, :-1] > top[:, 1:]).all()


def test_bank_source_shard_holds_the_rows_it_searches_with_the_same_neighbours():
    """One process: the sharded bank is the pass's rows in the pass's id order (memory: the own ids'
    rows of the table), and neighbours() gives the gathered bank's neighbours; a pass that returns an
    id twice is refused, as the gather refuses it."""
    import logging

    from scbch_dist.config import load_config
    from scbch_dist.engine.bank import BankSource
    from scbch_dist.methods.base import neighbours

    cfg = load_config(None, ["bank.knn=torch"])
    g = torch.Generator().manual_seed(4)
    order = torch.randperm(60, generator=g)  # the pass meets the ids out of order
    part = {"id": order, "h_img": torch.randn(60, 8, generator=g), "h_txt": torch.randn(60, 8, generator=g)}
    log = logging.getLogger("test")
    gathered = BankSource("pass", 60, 8, torch.device("cpu"), lambda: part, log).build()
    sharded = BankSource("pass", 60, 8, torch.device("cpu"), lambda: part, log, shard=True).build()
    assert sharded.sharded and not gathered.sharded and torch.equal(sharded.own_ids, order)
    assert torch.equal(sharded.rows, gathered.rows[order])
    assert_identical(neighbours(cfg, sharded, 6), neighbours(cfg, gathered, 6))

    memory = BankSource("memory", 60, 8, torch.device("cpu"), None, log, shard=True)
    memory.record(part["id"], part)
    memory.memory.sync()  # the end of the epoch: every id has a row
    bank = memory.build()
    assert bank.source == "memory" and bank.sharded and torch.equal(bank.own_ids, torch.arange(60))
    assert torch.equal(bank.rows, gathered.rows)
    by_id = torch.argsort(order)  # the gathered search's rows in id order, as the memory's own ids
    assert_identical(neighbours(cfg, bank, 6), tuple(t[by_id] for t in neighbours(cfg, gathered, 6)))

    twice = {k: torch.cat([v, v[:1]]) for k, v in part.items()}
    with pytest.raises(RuntimeError, match="61 rows for 60 ids"):
        BankSource("pass", 60, 8, torch.device("cpu"), lambda: twice, log, shard=True).build()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    torchrun(str(SCRIPTS / "sharded_search.py"), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(script.cases()))
def test_two_ranks_equal_the_unsharded_search(two_ranks, name, backend):
    """Each rank's merged neighbours are exactly the torch search of the whole bank (same ids, same
    similarities), and with faiss-cpu exactly faiss-cpu's."""
    case = script.cases()[name]
    z = script.bank(sum(len(i) for i in case["ids"]))
    for rank, ids in enumerate(case["ids"]):
        queries = case["queries"][rank] if "queries" in case else z[ids]
        self_index = None if "queries" in case else ids
        got = two_ranks[rank][name, backend]
        assert got[0].shape == got[1].shape == (queries.shape[0], case["k"])
        if not queries.shape[0]:
            continue
        assert_no_ties(queries, z, case["k"], self_index)
        assert_identical(got, knn.neighbours(queries, z, case["k"], self_index=self_index,
                                             settings=KnnSettings(knn=backend)))
        if backend != "torch":
            ref_s, ref_i = knn.neighbours(queries, z, case["k"], self_index=self_index, settings=TORCH)
            assert torch.equal(got[1], ref_i) and torch.allclose(got[0], ref_s, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_float16_bank_is_exchanged_and_searched_across_ranks(two_ranks):
    """A compressed bank: the gather returns the float16 rows, and the sharded search of float16
    rows equals the float32 search of the same values (float32 similarities)."""
    z = script.bank(157)
    for rank, ids in enumerate(script.cases()["uneven"]["ids"]):
        gathered = two_ranks[rank]["gather_float16"]
        assert gathered.dtype == torch.float16 and torch.equal(gathered, z.half())
        s, i = two_ranks[rank]["float16"]
        assert s.dtype == torch.float32
        assert_identical((s, i), knn.neighbours(z[ids], z, 10, self_index=ids, settings=TORCH))


@pytest.mark.slow
def test_ring_shift_moves_uneven_and_empty_blocks(two_ranks):
    for rank in (0, 1):
        sent_left, _ = two_ranks[1 - rank]["ring"]
        _, received = two_ranks[rank]["ring"]
        assert [t.shape for t in received] == [t.shape for t in sent_left]
        assert all(torch.equal(a, b) for a, b in zip(received, sent_left))


@pytest.mark.slow
@pytest.mark.parametrize("method,refresh", [("scbch", "pass"), ("scbch", "memory"), ("nacd", "pass")])
def test_two_process_training_with_a_sharded_bank_equals_the_gathered_one(tiny_dataset, tmp_path, method, refresh):
    """2 processes, the same run with bank.shard false and true: the same refreshes (SCBCH's weights,
    NACD's confidences), the same losses, parameters, tables and mAP, bit for bit. The passes run on
    5 uneven training shards (ranks encode parts of different sizes); the memory on 4 even ones, so
    that every id has a row after the first epoch and both refreshes read the memory."""
    root = tiny_dataset
    if refresh == "memory":
        root = tmp_path / "even"
        write_synthetic(root, tiny_synthetic_config(samples_per_shard=100))
    key = {"scbch": "cscc_weights", "nacd": "nacd"}[method]
    own = {"scbch": ("scbch.warmup_epochs=1",), "nacd": ("nacd.warmup_epochs=1", "nacd.k=5")}  # each method's section
    runs = {}
    for shard in ("false", "true"):
        run_dir = tmp_path / f"shard_{shard}"
        torchrun("-m", "scbch_dist.train", *tiny_args(root, run_dir, "train.epochs=3", "eval.every=3",
                                                       f"method.name={method}", *own[method], "bank.knn=torch",
                                                       f"bank.refresh={refresh}", f"bank.shard={shard}",
                                                       "run.tensorboard=false"))
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[shard] = (json.loads((run_dir / "summary.json").read_text()), records, read_checkpoint(run_dir))
    (sum_a, rec_a, (model_a, tables_a, _)), (sum_b, rec_b, (model_b, tables_b, _)) = runs["false"], runs["true"]
    assert sum_b["run"]["world_size"] == 2
    assert [r[key]["source"] for r in rec_b[1:]] == [refresh] * 2  # two refreshes, from the asked source
    for a, b in zip(rec_a, rec_b):
        assert a["loss"] == b["loss"]
        assert {k: v for k, v in a.get(key, {}).items() if k != "seconds"} == \
               {k: v for k, v in b.get(key, {}).items() if k != "seconds"}
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(tables_a[k], tables_b[k]) for k in tables_a)
    assert sum_a["final"]["avg_map"] == sum_b["final"]["avg_map"]


@pytest.mark.parametrize("refresh", ["pass", "memory"])
def test_a_float16_bank_source_holds_float16_rows_and_finds_their_neighbours(refresh):
    """bank.float16_above: the bank (pass or memory, gathered or sharded) is the float32 rows rounded
    to float16, half the bytes, and its neighbours are the exact neighbours of those values."""
    import logging

    from scbch_dist.config import load_config
    from scbch_dist.engine.bank import BankSource
    from scbch_dist.methods.base import neighbours

    cfg = load_config(None, ["bank.knn=torch"])
    g = torch.Generator().manual_seed(5)
    part = {"id": torch.arange(60), "h_img": torch.randn(60, 8, generator=g), "h_txt": torch.randn(60, 8, generator=g)}
    log = logging.getLogger("test")
    banks = {}
    for dtype in (torch.float32, torch.float16):
        for shard in (False, True):
            source = BankSource(refresh, 60, 8, torch.device("cpu"), lambda: part, log, shard=shard, dtype=dtype)
            if refresh == "memory":
                source.record(part["id"], part)
                source.memory.sync()
            banks[dtype, shard] = source.build()
    for shard in (False, True):
        full, half = banks[torch.float32, shard], banks[torch.float16, shard]
        assert half.rows.dtype == torch.float16 and torch.equal(half.rows, full.rows.half())
        assert half.rows.nbytes * 2 == full.rows.nbytes
        s, i = neighbours(cfg, half, 6)
        ref_s, ref_i = knn.neighbours(half.rows[half.own_ids].double(), half.rows.double(), 6,
                                      self_index=half.own_ids, settings=TORCH)
        assert s.dtype == torch.float32 and torch.equal(i, ref_i) and torch.allclose(s.double(), ref_s, atol=1e-6)
