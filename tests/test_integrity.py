"""Dataset integrity: shard checksums, ids, clean labels against the shards, label tables, meta.json
hardening, and the one-line errors of the data CLIs (docs/data.md, "Verifying a dataset")."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, random_dataset, rewrite_shard
from scbch_dist.data.convert import ConvertError, convert_folder, read_classes
from scbch_dist.data.convert import main as convert_main
from scbch_dist.data.format import RawSample, ShardError, read_meta, sha256_file, write_raw_dataset
from scbch_dist.data.noise import (NoiseError, clean_training_labels, load_noise_file, mixed_noise, save_noise_file,
                                   training_labels)
from scbch_dist.data.verify import (add_checksums, check_id_counts, check_label_table, load_label_file,
                                    verify_dataset, verify_shards)
from scbch_dist.errors import ScbchError

PY = str(Path(sys.executable))


@pytest.fixture
def dataset(tmp_path) -> Path:
    """train 50 rows in shards of 16 (blocks of 8): 4 shards; query 7 and database 11: 1 shard each."""
    root = tmp_path / "d"
    random_dataset(root, n_train=50, samples_per_shard=16, block_size=8)
    return root


def edit_meta(root: Path, edit) -> None:
    raw = json.loads((root / "meta.json").read_text())
    raw = edit(raw)
    (root / "meta.json").write_text(json.dumps(raw))


def reseal(root: Path) -> None:
    """Record the current sha256 of every shard: a dataset that a faulty writer produced as it is,
    so that the content checks, not the checksums, must find the fault."""
    def edit(raw):
        for info in raw["splits"].values():
            info["sha256"] = [sha256_file(root / name) for name in info["shards"]]
        return raw
    edit_meta(root, edit)


def strip_checksums(raw: dict) -> dict:
    """meta.json as written before checksums existed."""
    for info in raw["splits"].values():
        del info["sha256"]
    return raw


def npy_with(data: bytes, change) -> bytes:
    a = np.load(io.BytesIO(data))
    a = change(a.copy())
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def raw_samples(n: int, seed: int) -> list[RawSample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = np.zeros(3, np.uint8)
        lab[i % 3] = 1
        # the reader keeps images encoded, so any bytes do for the checks here
        out.append(RawSample(image=rng.bytes(40), ext="png", text=f"word{i % 5} thing", lab=lab))
    return out


# ---- checksums


def test_writers_record_deterministic_checksums_and_an_intact_dataset_verifies(tmp_path, dataset):
    meta = read_meta(dataset)
    assert [len(meta.splits[s].sha256) for s in ("train", "query", "database")] == [4, 1, 1]
    for info in meta.splits.values():
        assert info.sha256 == [sha256_file(dataset / name) for name in info.shards]
    random_dataset(tmp_path / "again", n_train=50, samples_per_shard=16, block_size=8)
    again = read_meta(tmp_path / "again")
    assert {s: i.sha256 for s, i in again.splits.items()} == {s: i.sha256 for s, i in meta.splits.items()}
    random_dataset(tmp_path / "other", n_train=50, samples_per_shard=16, block_size=8, seed=1)
    assert read_meta(tmp_path / "other").splits["train"].sha256[0] != meta.splits["train"].sha256[0]

    summary = verify_dataset(dataset, progress=False)
    assert {s: summary[s] for s in ("train", "query", "database")} == {
        s: {"shards": len(meta.splits[s].shards), "samples": meta.splits[s].count,
            "bytes": sum((dataset / n).stat().st_size for n in meta.splits[s].shards), "checksums": True}
        for s in ("train", "query", "database")}
    assert summary["label_tables"] == ["clean"] and summary["seconds"] > 0
    # ranks verify disjoint shards and sum their counts
    counts = sum(verify_shards(dataset, meta, "train", meta.splits["train"].shards[r::2]) for r in range(2))
    assert counts.tolist() == [1] * 50
    check_id_counts(dataset, meta, "train", counts)

    # raw datasets: the same, through RawSplitWriter
    splits = {"train": raw_samples(9, 0), "query": raw_samples(2, 1), "database": raw_samples(9, 0)}
    for name in ("raw1", "raw2"):
        write_raw_dataset(tmp_path / name, name="raw", classes=["a", "b", "c"], splits=splits, samples_per_shard=4)
    raw1, raw2 = read_meta(tmp_path / "raw1"), read_meta(tmp_path / "raw2")
    assert raw1.splits["train"].sha256 == [sha256_file(tmp_path / "raw1" / n) for n in raw1.splits["train"].shards]
    assert len(raw1.splits["train"].sha256) == 3 and raw1.splits == raw2.splits
    assert verify_dataset(tmp_path / "raw1", progress=False)["train"] == {
        "shards": 3, "samples": 9, "bytes": sum((tmp_path / "raw1" / n).stat().st_size for n in raw1.splits["train"].shards),
        "checksums": True}


def flip_feature_byte(shard: Path) -> None:
    """Flip the low mantissa byte of the first image feature of the shard's first block, in place:
    the value stays finite, so only the checksum can tell."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".img.npy"))
        data = tar.extractfile(member).read()
    f = io.BytesIO(data)
    np.lib.format.read_magic(f)
    np.lib.format.read_array_header_1_0(f)
    offset = member.offset_data + f.tell()  # the first byte of the payload: little-endian, lowest
    raw = bytearray(shard.read_bytes())
    raw[offset] ^= 0x01
    shard.write_bytes(bytes(raw))


def test_a_flipped_feature_byte_fails_the_checksum(dataset):
    meta = read_meta(dataset)
    shard = dataset / "train-000002.tar"
    flip_feature_byte(shard)
    got, want = sha256_file(shard), meta.splits["train"].sha256[2]
    message = f"{shard}: sha256 {got[:12]}... differs from meta.json ({want[:12]}...): the file changed after it was written"
    with pytest.raises(ShardError) as e:
        verify_shards(dataset, meta, "train")
    assert str(e.value) == message
    with pytest.raises(ShardError) as e:
        verify_dataset(dataset, progress=False)
    assert str(e.value) == message
    # the flipped byte leaves a valid, finite shard: without the checksum nothing notices
    assert verify_shards(dataset, meta, "train", checksums=False).tolist() == [1] * 50
    assert verify_dataset(dataset, checksums=False, progress=False)["train"]["checksums"] is False


def test_add_checksums_restores_them_and_refuses_a_bad_dataset(dataset):
    original = json.loads((dataset / "meta.json").read_text())
    edit_meta(dataset, strip_checksums)
    assert all(info.sha256 == [] for info in read_meta(dataset).splits.values())  # old datasets: no checksums
    assert verify_dataset(dataset, progress=False)["train"]["checksums"] is False
    assert add_checksums(dataset) == 6
    assert json.loads((dataset / "meta.json").read_text()) == original  # the same checksums, nothing else changed
    assert add_checksums(dataset) == 0
    assert verify_dataset(dataset, progress=False)["train"]["checksums"] is True

    # only a dataset that verifies gets checksums
    edit_meta(dataset, strip_checksums)
    before = (dataset / "meta.json").read_bytes()
    rewrite_shard(dataset / "database-000000.tar",
                  lambda name, data: npy_with(data, lambda a: np.array([0, 9, 10])) if name == "000000008.id.npy" else data)
    with pytest.raises(ShardError, match="sample 000000000 occurs 2 times"):
        add_checksums(dataset)
    assert (dataset / "meta.json").read_bytes() == before


# ---- ids and clean labels


def test_a_repeated_id_is_named(dataset):
    # the database shard's second block (ids 8, 9, 10) claims id 0 instead of 8
    rewrite_shard(dataset / "database-000000.tar",
                  lambda name, data: npy_with(data, lambda a: np.array([0, 9, 10])) if name == "000000008.id.npy" else data)
    reseal(dataset)
    with pytest.raises(ShardError) as e:
        verify_dataset(dataset, progress=False)
    assert str(e.value) == f"{dataset}: split 'database': sample 000000000 occurs 2 times (ids must be unique)"
    # an id repeated inside one block counts twice too
    repeat_6 = np.array([0, 1, 2, 3, 4, 6, 6])
    rewrite_shard(dataset / "query-000000.tar",
                  lambda name, data: npy_with(data, lambda a: repeat_6) if name.endswith("id.npy") else data)
    meta = read_meta(dataset)
    counts = verify_shards(dataset, meta, "query", checksums=False)
    assert counts.tolist() == [1, 1, 1, 1, 1, 0, 2]
    with pytest.raises(ShardError, match=r"split 'query': sample 000000006 occurs 2 times"):
        check_id_counts(dataset, meta, "query", counts)


def test_a_missing_id_is_named(dataset):
    meta = read_meta(dataset)
    counts = verify_shards(dataset, meta, "train", ["train-000000.tar", "train-000002.tar", "train-000003.tar"])
    with pytest.raises(ShardError) as e:
        check_id_counts(dataset, meta, "train", counts)
    assert str(e.value) == f"{dataset}: split 'train': sample 000000016 is missing (ids must be dense 0..N-1)"


def test_reordered_clean_labels_are_found(dataset):
    path = dataset / "labels" / "clean.npy"
    clean = np.load(path)
    j = next(j for j in range(20, 50) if (clean[j] != clean[3]).any())
    clean[[3, j]] = clean[[j, 3]]
    np.save(path, clean)
    meta = read_meta(dataset)
    message = f"{path}: row 000000003 differs from field 'lab.npy' of sample 000000003 in {dataset / 'train-000000.tar'}"
    with pytest.raises(ShardError) as e:
        verify_dataset(dataset, progress=False)
    assert str(e.value) == message
    with pytest.raises(ShardError) as e:
        verify_shards(dataset, meta, "train", clean=clean)
    assert str(e.value) == message
    verify_shards(dataset, meta, "train")  # without clean: the shards themselves are fine


# ---- label tables


def test_a_noise_cache_with_a_bad_value_is_named_and_rebuilt(dataset):
    meta = read_meta(dataset)
    table, _ = training_labels(dataset, meta, "mixed:0.5", seed=1)
    want = mixed_noise(np.load(dataset / "labels" / "clean.npy"), 0.5, seed=1)
    assert np.array_equal(table, want)
    cache = dataset / "labels" / "mixed-0.5-seed1.npy"
    bad = want.copy()
    bad[3, 2] = 7
    np.save(cache, bad)
    with pytest.raises(NoiseError) as e:
        check_label_table(cache, load_label_file(cache), meta)
    assert str(e.value) == f"{cache}: row 000000003 class 2 has value 7 (labels must be 0/1)"
    with pytest.raises(NoiseError) as e:
        verify_dataset(dataset, progress=False)
    assert str(e.value) == f"{cache}: row 000000003 class 2 has value 7 (labels must be 0/1)"
    # training rebuilds a bad cache: it is a function of (clean labels, model, rate, seed)
    table, _ = training_labels(dataset, meta, "mixed:0.5", seed=1)
    assert np.array_equal(table, want) and np.array_equal(np.load(cache), want)
    assert verify_dataset(dataset, progress=False)["label_tables"] == ["clean", "mixed-0.5-seed1"]


@pytest.mark.parametrize("keep", [0.5, 20])
def test_a_truncated_noise_cache_is_regenerated(dataset, keep):
    meta = read_meta(dataset)
    want, _ = training_labels(dataset, meta, "redundant:1.0", seed=2)
    want = np.array(want)
    cache = dataset / "labels" / "redundant-1-seed2.npy"
    data = cache.read_bytes()
    cache.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])  # a cut payload, a cut header
    with pytest.raises(NoiseError, match=rf"^{cache}: not a readable \.npy file \("):
        load_label_file(cache)
    table, _ = training_labels(dataset, meta, "redundant:1.0", seed=2)
    assert np.array_equal(table, want) and cache.read_bytes() == data


def test_bad_clean_labels_are_noise_errors_naming_the_file(dataset):
    meta = read_meta(dataset)
    path = dataset / "labels" / "clean.npy"
    clean = np.load(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 30])
    for call in (lambda: clean_training_labels(dataset, meta), lambda: training_labels(dataset, meta, "mixed:0.2", seed=0),
                 lambda: verify_dataset(dataset, progress=False)):
        with pytest.raises(NoiseError, match=rf"^{path}: not a readable \.npy file \(.*\)$"):
            call()
    bad = clean.copy()
    bad[5, 1] = 2
    np.save(path, bad)
    with pytest.raises(NoiseError) as e:
        clean_training_labels(dataset, meta)
    assert str(e.value) == f"{path}: row 000000005 class 1 has value 2 (labels must be 0/1)"
    np.save(path, clean[:-1])
    with pytest.raises(NoiseError) as e:
        clean_training_labels(dataset, meta)
    assert str(e.value) == f"{path}: shape (49, 4), expected (50, 4) (training samples x classes of meta.json)"
    np.save(path, clean.astype(np.float32))
    with pytest.raises(NoiseError, match=r"dtype float32, expected an integer or bool table"):
        clean_training_labels(dataset, meta)


def test_a_noise_file_with_a_bad_value_names_file_row_and_class(dataset, tmp_path):
    clean = np.load(dataset / "labels" / "clean.npy")
    noisy = clean.copy()
    noisy[4, 3] = 7
    path = tmp_path / "noise.h5"
    save_noise_file(path, noisy, clean)
    with pytest.raises(NoiseError) as e:
        load_noise_file(path, clean)
    assert str(e.value) == f"{path}: dataset 'result': row 000000004 class 3 has value 7 (labels must be 0/1)"
    save_noise_file(path, clean.astype(np.float64), clean)  # the published files hold float64 0/1: fine
    assert load_noise_file(path, clean).dtype == np.uint8


# ---- meta.json


@pytest.mark.parametrize("name", ["../x.tar", "/etc/passwd", "sub/../../x.tar"])
def test_shard_names_must_stay_inside_the_dataset_folder(dataset, name):
    def rename(raw):
        raw["splits"]["train"]["shards"][3] = name
        return raw
    edit_meta(dataset, rename)
    with pytest.raises(ShardError) as e:
        read_meta(dataset)
    assert str(e.value) == f"{dataset / 'meta.json'}: splits.train.shards[3] = {name!r} points outside the dataset folder"


def test_a_shard_symlinked_outside_the_dataset_folder_is_refused(dataset, tmp_path):
    outside = tmp_path / "elsewhere.tar"
    (dataset / "train-000003.tar").rename(outside)
    (dataset / "train-000003.tar").symlink_to(outside)
    with pytest.raises(ShardError, match=r"splits\.train\.shards\[3\] = 'train-000003\.tar' points outside"):
        read_meta(dataset)


@pytest.mark.parametrize("edit, message", [
    (lambda raw: [raw], "expected a JSON object at the top level, got a list"),
    (lambda raw: {**raw, "splits": {**raw["splits"], "train": [1, 2]}}, "splits.train is a list, expected a JSON object"),
    (lambda raw: {**raw, "splits": 3}, "splits is a number, expected a JSON object"),
    (lambda raw: {**raw, "fields": {**raw["fields"], "img": "float16"}}, "fields.img is a string, expected a JSON object"),
    (lambda raw: {**raw, "splits": {**raw["splits"], "query": {**raw["splits"]["query"], "shard_counts": ["7"]}}},
     "splits.query.shard_counts must be a list of int, got ['7']"),
    (lambda raw: {**raw, "splits": {**raw["splits"], "train": {**raw["splits"]["train"],
                                                               "sha256": raw["splits"]["train"]["sha256"][:3]}}},
     "splits.train.sha256 has 3 entries for 4 shards"),
    (lambda raw: {**raw, "splits": {**raw["splits"], "query": {**raw["splits"]["query"], "sha256": ["ab" * 31 + "zz"]}}},
     f"splits.query.sha256[0] = '{'ab' * 31}zz' is not a sha256 (64 hex digits)"),
])
def test_malformed_meta_json_is_a_shard_error(dataset, edit, message):
    edit_meta(dataset, edit)
    with pytest.raises(ShardError) as e:
        read_meta(dataset)
    assert str(e.value) == f"{dataset / 'meta.json'}: {message}"


# ---- the command lines: one line on stderr, exit status 2


def test_verify_cli(dataset):
    good = run_cli("scbch_dist.data.verify", str(dataset))
    assert good.returncode == 0, good.stderr
    lines = good.stdout.splitlines()
    assert lines[:4] == ["train: 4 shards, 50 samples, sha256 ok", "query: 1 shards, 7 samples, sha256 ok",
                         "database: 1 shards, 11 samples, sha256 ok", "label tables: clean: ok"]
    assert len(lines) == 5 and lines[4].startswith(f"{dataset}: ok (") and lines[4].endswith(" s)")

    flip_feature_byte(dataset / "train-000001.tar")
    bad = run_cli("scbch_dist.data.verify", str(dataset))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith(
        f"python -m scbch_dist.data.verify: error: {dataset / 'train-000001.tar'}: sha256 ")
    assert bad.stderr.rstrip().endswith("the file changed after it was written")


def test_verify_cli_without_checksums_suggests_adding_them(dataset):
    edit_meta(dataset, strip_checksums)
    out = run_cli("scbch_dist.data.verify", str(dataset))
    assert out.returncode == 0, out.stderr
    assert "train: 4 shards, 50 samples, no sha256 in meta.json" in out.stdout.splitlines()
    assert (f"note: meta.json has no sha256 for train, query, database; python -m scbch_dist.data.verify {dataset} "
            f"--add-checksums records them") in out.stdout.splitlines()
    added = run_cli("scbch_dist.data.verify", str(dataset), "--add-checksums")
    assert added.returncode == 0, added.stderr
    assert "train: 4 shards, 50 samples, sha256 added" in added.stdout.splitlines()
    assert f"{dataset}: added the sha256 of 6 shards to meta.json" in added.stdout.splitlines()
    assert len(read_meta(dataset).splits["train"].sha256) == 4


def test_convert_and_noise_clis_print_one_line_and_exit_2(tmp_path, dataset):
    images = tmp_path / "images"
    images.mkdir()
    csv = tmp_path / "ann.csv"
    csv.write_bytes(b"image,text,labels\na.jpg,a dog,dog\nb.jpg,\xc3\xa9t\xff,cat\n")
    out = run_cli("scbch_dist.data.convert", "folder", "--images", str(images), "--annotations", str(csv),
                  "--out", str(tmp_path / "out"))
    assert (out.returncode, out.stderr) == (
        2, f"python -m scbch_dist.data.convert: error: {csv}: line 3 is not UTF-8 (byte 0xff at column 9)\n")
    out = run_cli("scbch_dist.data.convert", "folder", "--images", str(images), "--annotations", str(csv),
                  "--out", str(tmp_path / "out"), "--samples-per-shard", "0")
    assert (out.returncode, out.stderr) == (
        2, "python -m scbch_dist.data.convert: error: --samples-per-shard must be at least 1, got 0\n")
    out = run_cli("scbch_dist.data.noise", "--root", str(dataset), "--noise", "none", "--out", str(tmp_path / "x.h5"))
    assert (out.returncode, out.stderr) == (
        2, "python -m scbch_dist.data.noise: error: --noise 'none': give a generated model "
           "(mixed:RATE, redundant:R, replace:R)\n")
    assert not (tmp_path / "out").exists()


def test_convert_errors_in_process(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    ann = tmp_path / "ann.jsonl"
    ann.write_bytes(b'{"image": "a.jpg", "text": "x", "labels": ["a"]}\n\n{"image": "b.jpg", "text": "\xfe"}\n')
    with pytest.raises(ConvertError) as e:
        convert_folder(images, ann, tmp_path / "out")
    assert str(e.value) == f"{ann}: line 3 is not UTF-8 (byte 0xfe at column 29)"
    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbfdog\nca\x80t\n")  # a byte order mark, then a stray continuation byte
    with pytest.raises(ConvertError) as e:
        read_classes(classes)
    assert str(e.value) == f"{classes}: line 2 is not UTF-8 (byte 0x80 at column 3)"
    for bad in (0, -4):
        with pytest.raises(ConvertError, match=rf"^--samples-per-shard must be at least 1, got {bad}$"):
            convert_main(["folder", "--images", str(images), "--annotations", str(ann), "--out", str(tmp_path / "o"),
                          "--samples-per-shard", str(bad)])
    assert issubclass(ConvertError, ScbchError) and issubclass(ConvertError, ValueError)
    assert issubclass(NoiseError, ScbchError) and issubclass(ShardError, ScbchError) and issubclass(ShardError, ValueError)


def test_a_wrong_but_valid_noise_table_file_never_trains(dataset):
    """The generated table is rebuilt every run: an edited labels/<noise>.npy (right shape, 0/1)
    cannot change what trains, and is put right."""
    meta = read_meta(dataset)
    want, _ = training_labels(dataset, meta, "mixed:0.5", seed=1)
    record = dataset / "labels" / "mixed-0.5-seed1.npy"
    np.save(record, np.zeros_like(want))
    table, _ = training_labels(dataset, meta, "mixed:0.5", seed=1)
    assert np.array_equal(table, want) and np.array_equal(np.load(record), want)


@pytest.mark.slow
def test_a_shard_changed_in_place_mid_run_stops_the_run_naming_it(tiny_dataset, tmp_path, monkeypatch):
    """The preflight checks every shard once; a training shard changed after epoch 1 (a feature's
    low mantissa byte: still finite) is found as epoch 2 reads it, and the run stops naming it,
    its last checkpoint that of epoch 1 (before: exit 0, other results, the original fingerprint)."""
    from conftest import tiny_args
    from scbch_dist.engine import loop
    from scbch_dist.engine.checkpoint import latest_checkpoint
    from scbch_dist.train import main

    data, run_dir = tmp_path / "data", tmp_path / "run"
    shutil.copytree(tiny_dataset, data)
    shard = data / "train-000001.tar"
    train_one_epoch = loop.train_one_epoch

    def change_after_epoch_1(run, progress):
        if progress.epoch == 1:
            flip_feature_byte(shard)
        return train_one_epoch(run, progress)

    monkeypatch.setattr(loop, "train_one_epoch", change_after_epoch_1)
    with pytest.raises(ShardError, match=rf"^{shard}: changed while the run was reading the dataset"):
        main(tiny_args(data, run_dir, "train.epochs=3", "eval.every=3", "run.tensorboard=false"))
    assert latest_checkpoint(run_dir).name == "epoch-0001" and not (run_dir / "summary.json").exists()
