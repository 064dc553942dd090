"""The Hamming index and search (docs/search.md): FAISS's rankings against metrics' exact ranking,
the index folder and its checks against the run, and the search command on stored codes.
Queries encoded by a trained model are in test_search_shapes.py (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from scbch_dist import metrics  # noqa: E402
from scbch_dist.retrieval import hamming  # noqa: E402
from scbch_dist.errors import CodesError  # noqa: E402
from scbch_dist.retrieval.hamming import HammingIndexError  # noqa: E402
from scbch_dist.config import IndexSettings  # noqa: E402
from scbch_dist.engine.checkpoint import model_fingerprint  # noqa: E402
from scbch_dist.errors import RunDirError  # noqa: E402
from scbch_dist.retrieval.index import RunCodes, RunIndex, build, check, tie_aware_recall  # noqa: E402
from scbch_dist.retrieval.search import main as search_main  # noqa: E402
from conftest import run_with_codes  # noqa: E402

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def exact(queries: np.ndarray, database: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """metrics' ranking: distances sorted stably, ties by database order."""
    d = metrics.hamming_distances(queries, database).numpy()
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, order, 1), order


def clustered(rng: np.random.Generator, n: int, bits: int, centres: np.ndarray, flip: float) -> np.ndarray:
    """Codes near random centres: each bit of a centre flipped with probability ``flip``."""
    return centres[rng.integers(len(centres), size=n)] ^ (rng.random((n, bits)) < flip)


@pytest.mark.parametrize("bits,n", [(8, 2000), (12, 1500), (64, 3000), (1024, 500)])
def test_flat_ranks_exactly_as_metrics_ties_by_database_order(bits, n):
    rng = np.random.default_rng(bits)
    db, q = rng.random((n, bits)) < 0.5, rng.random((40, bits)) < 0.5
    db[n // 2:n // 2 + 50] = db[:50]  # exact duplicates: ties at distance 0 too
    index = hamming.build(db, hamming.resolve(IndexSettings(), "flat", bits, n))
    want_d, want_p = exact(q, db)
    for k in (n, 10, 1):  # the whole ranking, and cut-offs inside tie groups (8 bits: ~8 distances for 2000 codes)
        d, p = hamming.search(index, q, k)
        np.testing.assert_array_equal(p, want_p[:, :k])
        np.testing.assert_array_equal(d, want_d[:, :k])


@pytest.mark.parametrize("kind", ["flat", "hash", "ivf", "hnsw"])
@pytest.mark.parametrize("bits", [12, 64, 130])
def test_an_index_built_a_block_at_a_time_from_disk_answers_as_one_built_from_memory(tmp_path, kind, bits):
    """The codes in a metrics PackedTable on disk, packed and added a block of rows at a time
    (blocks of 700, the last short): every kind returns the results of the index built from the
    bool codes in memory in one block. IVF trains on the same sampled rows (nlist 8: 2048 < n)."""
    from scbch_dist.metrics.table import PackedTable

    rng = np.random.default_rng(bits)
    n = 3000
    db, q = clustered(rng, n, bits, rng.random((30, bits)) < 0.5, 0.1), rng.random((25, bits)) < 0.5
    table = PackedTable.write(tmp_path / "codes.npy", [metrics.pack_words(db)], bits)
    settings = hamming.resolve(IndexSettings(nlist=8, hnsw_m=8), kind, bits, n)
    rows = n if kind == "hnsw" else 700  # HNSW's graph depends on how adds are batched: compared in one add
    memory, disk = hamming.build(db, settings, rows=n), hamming.build(table, settings, rows=rows)
    assert disk.ntotal == n
    for got, want in zip(hamming.search(disk, q, 20), hamming.search(memory, q, 20)):
        np.testing.assert_array_equal(got, want)


def test_order_results_sorts_by_distance_then_position_missing_last():
    d = np.array([[3, 1, 1, -1], [0, 2, 0, 5]], dtype=np.int32)
    p = np.array([[7, 9, 4, -1], [3, 1, 2, 0]], dtype=np.int64)
    od, op = hamming.order_results(d, p)
    np.testing.assert_array_equal(od, [[1, 1, 3, -1], [0, 0, 2, 5]])
    np.testing.assert_array_equal(op, [[4, 9, 7, -1], [2, 3, 1, 0]])


@pytest.mark.parametrize("kind", ["hash", "ivf", "hnsw"])
def test_approximate_kinds_return_true_distances_in_order_and_find_clustered_neighbours(kind):
    rng = np.random.default_rng(1)
    bits, n = 64, 4000
    centres = rng.random((40, bits)) < 0.5
    db, q = clustered(rng, n, bits, centres, 0.05), clustered(rng, 60, bits, centres, 0.05)
    index = hamming.build(db, hamming.resolve(IndexSettings(), kind, bits, n))
    d, p = hamming.search(index, q, 10)
    true = metrics.hamming_distances(q, db).numpy()
    found = p >= 0
    np.testing.assert_array_equal(d[found], np.take_along_axis(true, np.maximum(p, 0), 1)[found])
    assert (np.diff(np.where(found, d, 10 ** 6), axis=1) >= 0).all()
    assert tie_aware_recall(d, exact(q, db)[0], 10) >= 0.95


def test_exhaustive_ivf_is_exact_in_distance():
    rng = np.random.default_rng(2)
    db, q = rng.random((1000, 32)) < 0.5, rng.random((30, 32)) < 0.5
    settings = hamming.resolve(IndexSettings(nlist=8, nprobe=8), "ivf", 32, 1000)
    d, _ = hamming.search(hamming.build(db, settings), q, 25)
    np.testing.assert_array_equal(d, exact(q, db)[0][:, :25])


def test_multi_hash_finds_every_code_within_its_pigeonhole_radius():
    """t tables probed at f flips find every code within t (f + 1) - 1 bits."""
    rng = np.random.default_rng(3)
    bits, n = 64, 3000
    settings = hamming.resolve(IndexSettings(hash_bits=16, hash_tables=4, hash_flips=1), "hash", bits, n)
    db = rng.random((n, bits)) < 0.5
    q = db[:20] ^ (rng.random((20, bits)) < 0.04)  # queries near stored codes
    d, p = hamming.search(hamming.build(db, settings), q, n)
    true = metrics.hamming_distances(q, db).numpy()
    radius = 4 * 2 - 1
    for i in range(len(q)):
        assert set(np.flatnonzero(true[i] <= radius)) <= set(p[i][p[i] >= 0])


def test_tie_aware_recall_counts_equally_near_codes_alike():
    exact_d = np.array([[1, 2, 2, 2, 3]])
    assert tie_aware_recall(np.array([[1, 2, 2, 3, -1]]), exact_d, 3) == 1.0  # the other code at 2 is as good
    assert tie_aware_recall(np.array([[1, 3, 3, 4, 4]]), exact_d, 3) == pytest.approx(1 / 3)
    assert tie_aware_recall(np.array([[1, -1, -1, -1, -1]]), exact_d, 3) == pytest.approx(1 / 3)


def test_resolve_refuses_bad_settings_by_name():
    with pytest.raises(HammingIndexError, match="--kind 'lsh'"):
        hamming.resolve(IndexSettings(), "lsh", 64, 10)
    with pytest.raises(HammingIndexError, match="index.hash_tables=5 x index.hash_bits=16"):
        hamming.resolve(IndexSettings(hash_bits=16, hash_tables=5), "hash", 64, 100)
    with pytest.raises(HammingIndexError, match="8192 bits"):
        hamming.resolve(IndexSettings(), "flat", 8192, 100)
    assert hamming.resolve(IndexSettings(), "ivf", 64, 100).nlist == 2  # 39 codes a list at least
    assert hamming.resolve(IndexSettings(), "hash", 64, 1 << 20).hash_bits == 20


def test_ranked_average_precision_matches_metrics_and_a_hand_computed_value():
    # relevant at ranks 1 and 3 of 4: AP = (1/1 + 2/3) / 2
    ql = np.array([[1, 0]])
    dl = np.array([[1, 0], [0, 1], [1, 1], [0, 1]])
    assert metrics.ranked_average_precision(np.array([[0, 1, 2, 3]]), ql, dl)[0] == pytest.approx((1 + 2 / 3) / 2)
    rng = np.random.default_rng(4)
    q, db = rng.random((30, 16)) < 0.5, rng.random((300, 16)) < 0.5
    qlab, dlab = rng.random((30, 5)) < 0.3, rng.random((300, 5)) < 0.3
    ap = metrics.ranked_average_precision(exact(q, db)[1], qlab, dlab)
    assert np.nanmean(ap) == pytest.approx(metrics.mean_average_precision(q, db, qlab, dlab), abs=1e-12)


def test_model_fingerprint_names_the_weights_not_their_order():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    b = {"b": a["b"].clone(), "w": a["w"].clone()}
    assert model_fingerprint(a) == model_fingerprint(b)
    b["w"][1, 2] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint({"w": a["w"].half()}) != model_fingerprint({"w": a["w"]})  # dtype counts


# ----------------------------------------------------------------------------------------------
# a run folder with stored codes (no training): config.yaml, codes.npz, summary.json


def test_build_writes_a_complete_index_folder_and_check_matches_the_summary(tmp_path):
    run = tmp_path / "run"
    codes = run_with_codes(run)
    path = build(run, settings=IndexSettings(kind="flat"), log=lambda *_: None)
    assert path == run / "index" / "database-flat"
    assert sorted(p.name for p in path.iterdir()) == ["ids.npy", "img.faissindex", "index.json", "manifest.json",
                                                      "txt.faissindex"]
    record = json.loads((path / "index.json").read_text())
    assert record["bits"] == 24 and record["count"] == 400 and record["model_sha256"] == "ab" * 32
    assert record["config"]["model"]["bits"] == 24 and record["modalities"]["img"]["settings"]["kind"] == "flat"
    assert not [p for p in (run / "index").iterdir() if p.name.startswith(".")]  # no temporary left
    rows = check(run)
    summary = json.loads((run / "summary.json").read_text())["final"]
    for row in rows:
        assert row["same_ranking"] and row["recall@10"] == 1.0
        assert row["map_from_index"] == pytest.approx(summary[row["direction"]]["map"], abs=1e-12)
    # a search by a stored query code: the exact ranking's first ten
    index = RunIndex.open(run, RunCodes.load(run))
    d, ids = index.search("img", codes["query_txt"][3:4], 10)
    want_d, want_ids = exact(codes["query_txt"][3:4], codes["database_img"])
    np.testing.assert_array_equal(ids, want_ids[:, :10])


@pytest.mark.parametrize("kind", ["hash", "ivf", "hnsw"])
def test_approximate_index_of_a_run_reports_recall(tmp_path, kind):
    run = tmp_path / "run"
    run_with_codes(run)
    build(run, settings=IndexSettings(kind=kind), log=lambda *_: None)
    rows = check(run, kind=kind, k=10)
    assert all("same_ranking" not in r and 0.9 <= r["recall@10"] <= 1.0 for r in rows)


def test_rebuild_replaces_the_index_and_changed_codes_are_refused(tmp_path):
    run = tmp_path / "run"
    run_with_codes(run)
    build(run, log=lambda *_: None)
    run_with_codes(run, seed=1)  # the run's codes change (a resumed run finished again)
    with pytest.raises(HammingIndexError, match="built from other codes.*rebuild it: python -m scbch_dist.retrieval.index build"):
        RunIndex.open(run, RunCodes.load(run))
    build(run, log=lambda *_: None)
    RunIndex.open(run, RunCodes.load(run))
    assert sorted(p.name for p in (run / "index").iterdir()) == ["database-flat"]


def test_codes_of_another_run_are_refused_naming_the_keys(tmp_path):
    run_with_codes(tmp_path / "a", bits=24)
    run_with_codes(tmp_path / "b", bits=32, train__lr=0.01)
    (tmp_path / "b" / "codes.npz").replace(tmp_path / "a" / "codes.npz")
    with pytest.raises(CodesError, match=r"written by another run.*model.bits: 32 -> 24.*train.lr"):
        build(tmp_path / "a", log=lambda *_: None)
    assert not (tmp_path / "a" / "index").exists()


def test_missing_codes_a_held_run_and_not_a_run_are_one_line_errors(tmp_path):
    with pytest.raises(CodesError, match="not a run folder"):
        RunCodes.load(tmp_path)
    run = tmp_path / "run"
    run_with_codes(run)
    (run / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": "now"}))
    with pytest.raises(RunDirError, match="in use by pid"):
        build(run, log=lambda *_: None)
    (run / "run.lock").unlink()
    (run / "codes.npz").unlink()
    with pytest.raises(CodesError, match="codes.npz: missing.*--resume"):
        build(run, log=lambda *_: None)
    with pytest.raises(HammingIndexError, match="no flat index of the database codes; build it"):
        RunIndex.open(run, None)


def test_search_by_stored_id_prints_a_table_and_json(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    codes = run_with_codes(run, data__root=str(tmp_path / "data"))
    from tests.conftest import random_dataset

    random_dataset(tmp_path / "data", n_train=20, classes=6)  # the run's dataset: names its classes
    build(run, log=lambda *_: None)
    search_main([str(run), "--id", "3", "-k", "5", "--json"])
    hits = json.loads(capsys.readouterr().out)
    want_d, want_ids = exact(codes["query_txt"][3:4], codes["database_img"])
    assert [h["id"] for h in hits] == want_ids[0, :5].tolist()
    assert [h["distance"] for h in hits] == want_d[0, :5].tolist()
    assert hits[0]["labels"] == [f"c{c}" for c in np.flatnonzero(codes["database_lab"][hits[0]["id"]])]
    assert set(hits[0]) == {"rank", "id", "distance", "labels", "caption", "image"}
    search_main([str(run), "--id", "3", "--modality", "img", "-k", "3"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("query: query sample 3 (image; labels ") and "image -> texts" in table[0]
    assert len(table) == 2 + 3


def test_search_errors_are_one_line(tmp_path, capsys):
    from scbch_dist import cli

    run = tmp_path / "run"
    run_with_codes(run, data__root=str(tmp_path / "data"))
    from tests.conftest import random_dataset

    random_dataset(tmp_path / "data", n_train=20, classes=6)
    build(run, log=lambda *_: None)
    for args, message in ((["--id", "50"], "--id 50: the query split has ids 0..49"),
                          (["--text", "red circle"], "stores text features made by"),
                          (["--kind", "hnsw", "--id", "1"], "no hnsw index"),
                          (["--image", str(tmp_path / "nope.png")], "nope.png: cannot read the image")):
        with pytest.raises(SystemExit) as stop:
            cli.run(lambda: search_main([str(run), *args]), "python -m scbch_dist.retrieval.search")
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    # the module's own entry point, once
    out = subprocess.run([sys.executable, "-m", "scbch_dist.retrieval.search", str(run), "--id", "50"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2 and out.stderr.strip() == \
        "python -m scbch_dist.retrieval.search: error: --id 50: the query split has ids 0..49"


def test_codes_whose_compression_field_is_damaged_are_a_one_line_error(tmp_path):
    """A flipped byte in the archive's compression-method field makes zipfile raise
    NotImplementedError (found by the fuzz test): still the index's one-line error."""
    run = tmp_path / "run"
    run_with_codes(run)
    data = bytearray((run / "codes.npz").read_bytes())
    entry = data.find(b"PK\x01\x02")  # the first central-directory entry; its method is 2 bytes at +10
    data[entry + 10:entry + 12] = (0x63).to_bytes(2, "little")
    (run / "codes.npz").write_bytes(bytes(data))
    with pytest.raises(CodesError, match=r"codes.npz: not a readable codes file \(NotImplementedError"):
        RunCodes.load(run)

