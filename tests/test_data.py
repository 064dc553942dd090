"""Shards: round trips, the training stream's epoch semantics, the exactly-once pass, bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import random_dataset, rewrite_shard, tiny_synthetic_config
from scbch_dist.data.format import ShardError, read_meta, write_dataset
from scbch_dist.data.pipeline import TrainStream, load_split, pass_batches
from scbch_dist.data.synthetic import CLASSES, ensure_synthetic, generate_arrays


def test_round_trip_preserves_every_row(tmp_path):
    arrays = random_dataset(tmp_path / "d", n_train=70, samples_per_shard=32, block_size=10)
    meta = read_meta(tmp_path / "d")
    assert meta.splits["train"].shard_counts == [32, 32, 6]
    for split, (img, txt, lab) in arrays.items():
        got = load_split(tmp_path / "d", meta, split)
        assert np.array_equal(got["img"], img) and np.array_equal(got["txt"], txt)
        assert np.array_equal(got["lab"], lab) and got["lab"].dtype == np.uint8
    clean = np.load(tmp_path / "d" / "labels" / "clean.npy")
    assert np.array_equal(clean, arrays["train"][2])


def test_float16_storage_and_deterministic_bytes(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(20, 6)).astype(np.float32)
    splits = {s: (img, img[:, :3], np.eye(20, 4, dtype=np.uint8)) for s in ("train", "query", "database")}
    for name in ("a", "b"):
        write_dataset(tmp_path / name, name="x", classes=list("wxyz"), splits=splits)
    got = load_split(tmp_path / "a", read_meta(tmp_path / "a"), "train")
    assert got["img"].dtype == np.float16 and np.array_equal(got["img"], img.astype(np.float16))
    assert (tmp_path / "a" / "train-000000.tar").read_bytes() == (tmp_path / "b" / "train-000000.tar").read_bytes()


def test_sample_layout_shards_are_read(tmp_path):
    """Shards with one sample per key (as other WebDataset tools write them) are read too."""
    random_dataset(tmp_path / "d", n_train=5)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(5, 5)).astype(np.float32)
    lab = np.eye(5, 4, dtype=np.uint8)
    with tarfile.open(tmp_path / "d" / "train-000000.tar", "w") as tar:
        for i in range(5):
            for name, a in (("img.npy", img[i]), ("txt.npy", txt[i]), ("lab.npy", lab[i])):
                _add(tar, f"{i:09d}.{name}", _npy(a))
    meta["layout"] = "sample"
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    got = load_split(tmp_path / "d", read_meta(tmp_path / "d"), "train")
    assert np.array_equal(got["img"], img) and np.array_equal(got["lab"], lab)


def epoch_ids(stream, epoch):
    return [b["id"] for b in stream.epoch(epoch)]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_epoch_is_one_shuffled_pass(tiny_dataset, workers):
    meta = read_meta(tiny_dataset)
    stream = TrainStream(root=tiny_dataset, meta=meta, batch_size=64, seed=5, workers=workers)
    batches = epoch_ids(stream, 0)
    assert len(batches) == stream.steps_per_epoch == 7  # ceil(400 / 64), the last one partial
    assert [len(b) for b in batches] == [64] * 6 + [16]
    ids = np.concatenate(batches)
    assert sorted(ids) == list(range(400))  # every id exactly once
    assert not np.array_equal(ids, np.arange(400))  # shuffled
    again = np.concatenate(epoch_ids(stream, 0))
    other = np.concatenate(epoch_ids(stream, 1))
    assert np.array_equal(ids, again)  # a function of (seed, epoch)
    assert not np.array_equal(ids, other)


def test_drop_last_and_multi_rank_quota(tiny_dataset):
    meta = read_meta(tiny_dataset)
    dropped = TrainStream(root=tiny_dataset, meta=meta, batch_size=64, seed=0, drop_last=True)
    assert [len(b) for b in epoch_ids(dropped, 0)] == [64] * 6
    # 3 "ranks" over 5 shards of sizes 96, 96, 96, 96, 16: every rank takes ceil(400/3) = 134
    # samples in the same number of steps, however unevenly its shards hold data
    steps = []
    for rank in range(3):
        s = TrainStream(root=tiny_dataset, meta=meta, batch_size=32, seed=0, rank=rank, world=3)
        sizes = [len(b) for b in epoch_ids(s, 2)]
        assert sum(sizes) == 134
        steps.append(len(sizes))
    assert len(set(steps)) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_pass_reads_every_id_once_over_ranks_and_workers(tiny_dataset, workers):
    meta = read_meta(tiny_dataset)
    ids = np.concatenate([b["id"] for rank in range(2)
                          for b in pass_batches(tiny_dataset, meta, "database", batch_size=50, rank=rank,
                                                world=2, workers=workers)])
    assert sorted(ids) == list(range(meta.splits["database"].count))


def test_synthetic_is_deterministic_and_structured(tmp_path):
    cfg = tiny_synthetic_config()
    a, b = generate_arrays(cfg), generate_arrays(cfg)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    lab = a["lab"]
    assert lab.shape[1] == len(CLASSES) and (lab.sum(1) >= 1).all()
    assert 2.5 < lab.sum(1).mean() < 6
    # co-occurrence: sky and clouds appear together far more often than independence predicts
    sky, clouds = lab[:, CLASSES.index("sky")], lab[:, CLASSES.index("clouds")]
    assert (sky & clouds).mean() > 1.5 * sky.mean() * clouds.mean()
    # each modality is informative: a class-mean classifier beats the label prior on both
    for m in ("img", "txt"):
        x = a[m].astype(np.float64)
        x = (x - x.mean(0)) / (x.std(0) + 1e-9)
        c = CLASSES.index("people")
        score = x @ (x[lab[:, c] == 1].mean(0) - x[lab[:, c] == 0].mean(0))
        top = np.argsort(-score)[: int(lab[:, c].sum())]
        assert lab[top, c].mean() > 2 * lab[:, c].mean()
    meta = ensure_synthetic(tmp_path / "s", cfg)
    assert meta.splits["train"].count == 400 and meta.splits["database"].count == 520
    with pytest.raises(ValueError, match="other settings"):
        ensure_synthetic(tmp_path / "s", tiny_synthetic_config(seed=4))


# ---------------------------------------------------------------------------------------------
# Bad input: every error names the file, the sample key and the field


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_all(root, split="train"):
    return load_split(root, read_meta(root), split)


@pytest.fixture
def bad(tmp_path):
    root = tmp_path / "bad"
    random_dataset(root, n_train=30, samples_per_shard=16, block_size=8)
    return root


def test_missing_field_names_file_key_field(bad):
    rewrite_shard(bad / "train-000001.tar", lambda n, d: None if n == "000000024.lab.npy" else d)
    with pytest.raises(ShardError, match=r"train-000001\.tar: sample 000000024: missing field 'lab\.npy'"):
        read_all(bad)


def test_wrong_feature_width(bad):
    rewrite_shard(bad / "train-000000.tar",
                  lambda n, d: _npy(np.zeros((8, 7), np.float32)) if n == "000000008.img.npy" else d)
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample 000000008: field 'img\.npy' has feature width 7, expected 8"):
        read_all(bad)


def test_wrong_label_width(bad):
    rewrite_shard(bad / "train-000000.tar",
                  lambda n, d: _npy(np.zeros((8, 5), np.uint8)) if n == "000000000.lab.npy" else d)
    with pytest.raises(ShardError, match=r"sample 000000000: field 'lab\.npy' has label width 5, expected 4"):
        read_all(bad)


def test_non_finite_features_name_the_sample(bad):
    def edit(name, data):
        if name == "000000016.txt.npy":
            a = np.load(io.BytesIO(data))
            a[3, 1] = np.nan
            return _npy(a)
        return data
    rewrite_shard(bad / "train-000001.tar", edit)
    with pytest.raises(ShardError, match=r"train-000001\.tar: sample 000000019: field 'txt\.npy' has non-finite values"):
        read_all(bad)


def test_empty_split(tmp_path):
    arrays = random_dataset(tmp_path / "e", n_train=5)
    img, txt, lab = arrays["query"]
    write_dataset(tmp_path / "e2", name="e", classes=list("abcd"),
                  splits={"train": arrays["train"], "query": (img[:0], txt[:0], lab[:0]),
                          "database": arrays["database"]}, img_dtype="float32", txt_dtype="float32")
    with pytest.raises(ShardError, match=r"meta\.json: split 'query' is empty"):
        read_all(tmp_path / "e2", "query")


def test_truncated_tar_mid_member(bad):
    path = bad / "train-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match=r"train-000000\.tar: truncated tar"):
        read_all(bad)


def test_corrupt_member_inside_a_complete_tar(bad):
    path = bad / "train-000000.tar"
    data = bytearray(path.read_bytes())
    data[512 + 20: 512 + 40] = b"x" * 20  # garble the first member's npy header
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample 000000000: field 'id\.npy' is not a readable \.npy"):
        read_all(bad)


def test_truncated_tar_at_member_boundary(bad):
    path = bad / "train-000000.tar"
    with tarfile.open(path) as tar:
        first_block = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()][:4]
    with tarfile.open(path, "w") as tar:  # only the first block survives
        for name, data in first_block:
            _add(tar, name, data)
    with pytest.raises(ShardError, match=r"train-000000\.tar: holds 8 samples, meta\.json says 16"):
        read_all(bad)


def test_missing_shard_and_bad_meta(bad):
    (bad / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: shard of split 'train' listed in meta\.json is missing"):
        read_all(bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["fields"]["img"]["dtype"] = "complex64"
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match=r"meta\.json: fields\.img\.dtype"):
        read_meta(bad)


def test_writer_refuses_bad_arrays(tmp_path):
    arrays = random_dataset(tmp_path / "ok", n_train=5)
    img, txt, lab = arrays["train"]
    bad_img = img.copy()
    bad_img[2, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        write_dataset(tmp_path / "x", name="x", classes=list("abcd"),
                      splits={"train": (bad_img, txt, lab), "query": arrays["query"], "database": arrays["database"]})
    assert not (tmp_path / "x").exists()  # nothing half-written
