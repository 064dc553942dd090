"""Shards: round trips, the training stream's epoch semantics, the exactly-once pass, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import random_dataset, rewrite_shard, tiny_synthetic_config
from scbch_dist.data.format import ShardError, read_meta, write_dataset
from scbch_dist.data import pipeline
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
    meta["splits"]["train"]["sha256"] = []  # another tool's shard: no checksum recorded
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


def with_pid(block, rng):
    """A worker-side transform that records which process made each sample."""
    return {**block, "pid": np.full(len(block["id"]), os.getpid())}


def read_epoch(stream, epoch):
    """The epoch's batches (every field) and the pids of the processes that read them."""
    batches = list(stream.epoch(epoch))
    return [{k: v for k, v in b.items() if k != "pid"} for b in batches], {int(p) for b in batches for p in b["pid"]}


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, left unreaped by a container's init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("rank, world", [(0, 1), (0, 3), (1, 3), (2, 3)])
def test_persistent_workers_read_each_epoch_as_fresh_workers_would(tiny_dataset, monkeypatch, rank, world):
    """Workers started once serve epochs 0, 1, 2 and their extra passes with exactly the batches
    that workers started anew for every pass read (the loader before workers persisted); an
    (epoch, pass) that did not reach the workers would repeat the first one."""
    meta = read_meta(tiny_dataset)
    kw = dict(root=tiny_dataset, meta=meta, batch_size=32, seed=5, rank=rank, world=world, workers=2,
              buffer=100, transform=with_pid)
    with TrainStream(**kw) as stream:
        persistent = [read_epoch(stream, e) for e in range(3)]
    plain = pipeline._loader
    monkeypatch.setattr(pipeline, "_loader", lambda dataset, workers, persistent=False: plain(dataset, workers))
    with TrainStream(**kw) as restarting:
        fresh = [read_epoch(restarting, e) for e in range(3)]
    assert not restarting.loader.persistent_workers and stream.loader.persistent_workers
    for e, ((batches, pids), (expected, fresh_pids)) in enumerate(zip(persistent, fresh)):
        assert len(batches) == len(expected) == stream.steps_per_epoch
        for got, want in zip(batches, expected):
            assert got.keys() == want.keys()
            assert all(np.array_equal(got[k], want[k]) for k in want), f"epoch {e}"
        assert os.getpid() not in pids
        assert pids <= persistent[0][1]  # the workers that read epoch 0, still the same processes
        assert not pids & fresh_pids  # workers started per pass are other processes, new every epoch
        assert e == 0 or not fresh_pids & fresh[0][1]
    assert persistent[1][0][0]["id"].tolist() != persistent[0][0][0]["id"].tolist()  # epochs differ
    if world == 1:
        assert all(len(p) == 2 for _, p in persistent)  # 5 shards: both workers read in every epoch
    if (rank, world) == (2, 3):
        # 5 shards over 3 ranks: rank 2 gets one shard per pass (at most 96 samples, of a quota of
        # 134); with seed 5 the second pass of every epoch reads another one (shard k holds ids 96k...)
        for batches, _ in persistent:
            assert len(np.unique(np.concatenate([b["id"] for b in batches]) // 96)) >= 2


def test_persistent_workers_stop_when_the_stream_closes(tiny_dataset):
    meta = read_meta(tiny_dataset)
    stream = TrainStream(root=tiny_dataset, meta=meta, batch_size=64, seed=0, workers=2, transform=with_pid)
    _, pids = read_epoch(stream, 0)
    first = next(iter(stream.epoch(1)))  # an epoch left unfinished
    assert len(pids) == 2 and all(alive(p) for p in pids) and int(first["pid"][0]) in pids
    stream.close()
    assert not any(alive(p) for p in pids)
    _, again = read_epoch(stream, 1)  # a closed stream starts new workers when read again
    assert len(again) == 2 and not again & pids
    stream.close()
    assert not any(alive(p) for p in again)


def test_an_interpreter_with_persistent_workers_exits_without_close(tiny_dataset):
    """A stream that is never closed, its epoch left unfinished, does not hold up the exit, and
    its workers go with the interpreter."""
    script = f"""
import os
import numpy as np
from scbch_dist.data.format import read_meta
from scbch_dist.data.pipeline import TrainStream

def with_pid(block, rng):
    return {{**block, "pid": np.full(len(block["id"]), os.getpid())}}

stream = TrainStream(root={str(tiny_dataset)!r}, meta=read_meta({str(tiny_dataset)!r}), batch_size=64, seed=0,
                     workers=2, transform=with_pid)
pids = {{int(p) for b in stream.epoch(0) for p in b["pid"]}}
unfinished = stream.epoch(1)
next(unfinished)
print(" ".join(map(str, sorted(pids))))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids)


def test_another_epoch_started_meanwhile_makes_an_unfinished_one_raise(tiny_dataset):
    """One loader serves every epoch of a stream: resuming an epoch after another one began would
    take the other epoch's batches."""
    with TrainStream(root=tiny_dataset, meta=read_meta(tiny_dataset), batch_size=64, seed=0, workers=2) as stream:
        first = stream.epoch(0)
        next(first)
        assert len(list(stream.epoch(1))) == stream.steps_per_epoch
        with pytest.raises(RuntimeError, match="another epoch was started before this one finished"):
            next(first)


def test_a_finished_pass_or_closed_stream_leaves_no_feeder_thread_to_race_the_next_fork(tiny_dataset):
    """A pass's loader, and a closed stream's, stop their workers and wait for the threads that fed
    them before returning: a worker forked while such a thread was ending deadlocked a CI run."""
    import threading

    def feeders() -> list:
        return [t for t in threading.enumerate() if t.name == "QueueFeederThread"]

    meta = read_meta(tiny_dataset)
    assert not feeders()
    assert sum(len(b["id"]) for b in pass_batches(tiny_dataset, meta, "database", batch_size=50, workers=2)) == \
        meta.splits["database"].count
    assert not feeders()
    with TrainStream(root=tiny_dataset, meta=meta, batch_size=64, seed=0, workers=2) as stream:
        assert len(list(stream.epoch(0))) == stream.steps_per_epoch
        assert feeders()  # the persistent workers' feeders live until the stream closes
    assert not feeders()


def test_a_worker_error_in_a_later_epoch_names_file_sample_and_field(bad):
    """The shard goes bad between two epochs: the persistent workers, which read epoch 0 from the
    good shard, report the bad sample as ShardError, and the stream still closes."""
    meta = read_meta(bad)
    stream = TrainStream(root=bad, meta=meta, batch_size=8, seed=0, workers=2, transform=with_pid)
    _, pids = read_epoch(stream, 0)

    put_nan_in_sample_19(bad)
    with pytest.raises(ShardError, match=NAN_IN_SAMPLE_19):
        list(stream.epoch(1))
    assert all(alive(p) for p in pids)  # the error did not end (or restart) the workers
    stream.close()
    assert not any(alive(p) for p in pids)


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


NAN_IN_SAMPLE_19 = r"train-000001\.tar: sample 000000019: field 'txt\.npy' has non-finite values"


def put_nan_in_sample_19(root):
    """A NaN in the text features of sample 19 (row 3 of the block stored as 000000016)."""
    def edit(name, data):
        if name == "000000016.txt.npy":
            a = np.load(io.BytesIO(data))
            a[3, 1] = np.nan
            return _npy(a)
        return data
    rewrite_shard(root / "train-000001.tar", edit)


def test_non_finite_features_name_the_sample(bad):
    put_nan_in_sample_19(bad)
    with pytest.raises(ShardError, match=NAN_IN_SAMPLE_19):
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


def test_loader_workers_come_from_a_fork_server_once_a_process_group_runs(tmp_path, tiny_dataset):
    """With a process group up (gloo's threads enter the interpreter on their own), loader workers
    are forked from a fork server, never from this process: a fork that copied a thread-state lock
    one of those threads held left an evaluation worker waiting for ever (a CI run). Without one,
    forked from this process as before. Either way a pass reads the same blocks."""
    import torch.distributed as dist

    from scbch_dist.data.pipeline import _start_method, pass_batches

    meta = read_meta(tiny_dataset)
    before = [b["id"] for b in pass_batches(tiny_dataset, meta, "query", batch_size=16, workers=2)]
    assert _start_method(2) is None and _start_method(0) is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _start_method(2).get_start_method() == "forkserver" and _start_method(0) is None
        after = [b["id"] for b in pass_batches(tiny_dataset, meta, "query", batch_size=16, workers=2)]
    finally:
        dist.destroy_process_group()
    assert [a.tolist() for a in after] == [b.tolist() for b in before]
