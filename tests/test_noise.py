"""The noise models: the mixed protocol on the real MIRFlickr labels and against the published noisy
files; NACD's redundant annotations and RSHNL's replacement, with their statistics; exported files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import MIRFLICKR, needs_mirflickr, random_dataset
from scbch_dist.data.format import read_meta, write_dataset
from scbch_dist.data.labels import NoiseError
from scbch_dist.data.noise import (mixed_noise, noise_statistics, parse_noise, redundant_noise, replacement_noise,
                                   training_labels)
from scbch_dist.data.noise import main as noise_main


def mirflickr_training_labels():
    import scipy.io as sio

    return sio.loadmat(MIRFLICKR / "mirflickr25k-lall.mat")["LAll"][2000:12000].astype(np.uint8)


def published(rate):
    import h5py

    with h5py.File(MIRFLICKR / f"mirflickr25k-lall-noise_{rate}.h5", "r") as f:
        return f["result"][()].astype(np.uint8), f["True"][()].astype(np.uint8)


def check_protocol(clean, noisy, rate):
    changed = (clean != noisy).any(1)
    assert changed.sum() == math.floor(rate * len(clean))
    diff = noisy[changed].astype(int) - clean[changed].astype(int)
    assert ((diff == -1).sum(1) == 1).all() and ((diff == 1).sum(1) == 1).all()  # one off, one on
    assert np.array_equal(noisy.sum(1), clean.sum(1))  # label counts never change


@needs_mirflickr()
@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_mixed_noise_on_real_labels_follows_the_protocol(rate):
    clean = mirflickr_training_labels()
    noisy = mixed_noise(clean, rate, seed=0)
    check_protocol(clean, noisy, rate)
    assert np.array_equal(noisy, mixed_noise(clean, rate, seed=0))  # seeded
    assert not np.array_equal(noisy, mixed_noise(clean, rate, seed=1))
    assert np.array_equal(clean, mirflickr_training_labels())  # input untouched


@needs_mirflickr()
@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_published_files_follow_the_same_protocol(rate):
    noisy, true = published(rate)
    assert np.array_equal(true, mirflickr_training_labels())  # rows 2000..11999 of the release
    check_protocol(true, noisy, rate)


@needs_mirflickr()
def test_per_class_flip_rates_match_the_published_file():
    clean = mirflickr_training_labels()
    theirs, _ = published(0.8)
    ours = mixed_noise(clean, 0.8, seed=0)
    off = [((a == 0) & (clean == 1)).sum(0) for a in (theirs, ours)]
    on = [((a == 1) & (clean == 0)).sum(0) for a in (theirs, ours)]
    # uniform over a row's positives makes rare classes lose few labels: both agree on that shape
    assert np.corrcoef(*off)[0, 1] > 0.98
    # uniform over negatives spreads additions evenly (~333 per class here; sd ~18)
    assert np.abs(on[0].astype(int) - on[1]).max() < 0.25 * on[0].mean()


@needs_mirflickr()
def test_file_noise_imports_row_for_row(tmp_path):
    clean = mirflickr_training_labels()
    tiny = np.zeros((len(clean), 2), np.float32)
    small = (tiny[:3], tiny[:3], clean[:3])
    root = tmp_path / "flickr"
    write_dataset(root, name="mirflickr-labels", classes=[f"c{i}" for i in range(24)],
                  splits={"train": (tiny, tiny, clean), "query": small, "database": small}, img_dtype="float32",
                  txt_dtype="float32", samples_per_shard=4096)
    meta = read_meta(root)
    for rate in (0.2, 0.5, 0.8):
        table, spec = training_labels(root, meta, f"file:{MIRFLICKR}/mirflickr25k-lall-noise_{rate}.h5", seed=0)
        assert spec.kind == "file" and np.array_equal(table, published(rate)[0])


@needs_mirflickr()
def test_file_noise_for_another_dataset_is_refused(tmp_path):
    random_dataset(tmp_path / "d", n_train=10000, classes=24)
    with pytest.raises(NoiseError, match="differ from the dataset's training labels"):
        training_labels(tmp_path / "d", read_meta(tmp_path / "d"), f"file:{MIRFLICKR}/mirflickr25k-lall-noise_0.2.h5",
                        seed=0)


def test_mixed_noise_edge_rows():
    y = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0]], np.uint8)
    noisy = mixed_noise(y, 1.0, seed=3)
    assert noisy[0].sum() == 2  # all positive: only the "off" step applies
    assert noisy[1].sum() == 1  # no positive: only the "on" step applies
    assert noisy[2].sum() == 1 and noisy[2, 0] == 0
    assert np.array_equal(mixed_noise(y, 0.0, seed=3), y)
    # floor(0.29 * 100) is 29, although 0.29 * 100 is 28.999999999999996 in binary floating point
    many = np.tile([[1, 0, 0, 1]], (100, 1)).astype(np.uint8)
    assert (mixed_noise(many, 0.29, seed=0) != many).any(1).sum() == 29


def test_cached_mixed_table_and_noise_spellings(tmp_path):
    random_dataset(tmp_path / "d", n_train=40)
    meta = read_meta(tmp_path / "d")
    table, spec = training_labels(tmp_path / "d", meta, "mixed:0.5", seed=7)
    assert (tmp_path / "d" / "labels" / "mixed-0.5-seed7.npy").is_file()
    again, _ = training_labels(tmp_path / "d", meta, "mixed:0.5", seed=7)
    assert np.array_equal(table, again) and spec.name == "mixed-0.5"
    clean, spec = training_labels(tmp_path / "d", meta, "none", seed=7)
    assert spec.kind == "none" and (np.asarray(clean) != table).any(1).sum() == 20
    for bad in ("mixed:1.5", "mixed:x", "flip:0.2", "file:"):
        with pytest.raises(NoiseError):
            parse_noise(bad)
    with pytest.raises(NoiseError, match="not found"):
        training_labels(tmp_path / "d", meta, "file:/nonexistent.h5", seed=0)


# ---- the peer methods' noise models (docs/data.md, "Noise")


@needs_mirflickr()
@pytest.mark.parametrize("rate, added, all_positive", [(1.0, 3.78, None), (2.5, 9.08, 965)])
def test_redundant_noise_on_real_labels(rate, added, all_positive):
    clean = mirflickr_training_labels()
    noisy = redundant_noise(clean, rate, seed=0)
    stats = noise_statistics(clean, noisy)
    assert stats["labels_added_per_row"] == pytest.approx(added, abs=0.005)  # the published examples
    assert stats["true_labels_per_row"] == pytest.approx(3.78, abs=0.005) and stats["labels_removed_per_row"] == 0
    assert ((noisy >= clean).all()) and stats["rows_changed"] == len(clean)  # true labels kept, every row corrupted
    n_pos = clean.sum(1)
    expected = np.minimum(np.round(rate * n_pos), 24 - n_pos)  # round half to even, at most the negatives
    assert np.array_equal(noisy.sum(1) - n_pos, expected)
    if all_positive is not None:
        assert stats["rows_all_positive"] == all_positive
    assert np.array_equal(noisy, redundant_noise(clean, rate, seed=0))
    assert not np.array_equal(noisy, redundant_noise(clean, rate, seed=1))
    assert np.array_equal(clean, mirflickr_training_labels())  # input untouched


@needs_mirflickr()
@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8])
def test_replacement_noise_on_real_labels(rate):
    clean = mirflickr_training_labels()
    noisy = replacement_noise(clean, rate, seed=0)
    assert np.array_equal(noisy.sum(1), clean.sum(1))  # every row keeps its cardinality
    changed = (noisy != clean).any(1).sum()
    assert changed <= math.floor(rate * len(clean))  # a drawn set may equal the true one
    assert changed > 0.95 * math.floor(rate * len(clean))  # ... rarely: 24 choose ~4 sets
    assert np.array_equal(noisy, replacement_noise(clean, rate, seed=0))


def test_redundant_and_replacement_edge_rows():
    y = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], np.uint8)
    # R n_i rounded half to even: 1.5 x 1 -> 2, 1.5 x 2 -> 3 but only 2 negatives; an empty row gains none
    noisy = redundant_noise(y, 1.5, seed=0)
    assert noisy.sum(1).tolist() == [4, 0, 3, 4]
    assert redundant_noise(y, 2.5, seed=0).sum(1).tolist() == [4, 0, 3, 4]  # 2.5 -> 2
    assert np.array_equal(redundant_noise(y, 0.0, seed=0), y)
    replaced = replacement_noise(y, 1.0, seed=0)
    assert replaced.sum(1).tolist() == y.sum(1).tolist()
    assert np.array_equal(replacement_noise(y, 0.0, seed=0), y)
    with pytest.raises(NoiseError):
        replacement_noise(y, 1.5, seed=0)
    with pytest.raises(NoiseError):
        redundant_noise(y, -1.0, seed=0)


def test_peer_noise_spellings_caches_and_exported_files(tmp_path):
    random_dataset(tmp_path / "d", n_train=40)
    root, meta = tmp_path / "d", read_meta(tmp_path / "d")
    for spec, name in (("redundant:1.0", "redundant-1"), ("replace:0.5", "replace-0.5")):
        table, noise = training_labels(root, meta, spec, seed=3)
        assert noise.name == name and (root / "labels" / f"{name}-seed3.npy").is_file()
        # exported in the published format, the table comes back through file:
        out = tmp_path / f"{name}.h5"
        noise_main(["--root", str(root), "--noise", spec, "--seed", "3", "--out", str(out)])
        again, file_noise = training_labels(root, meta, f"file:{out}", seed=0)
        assert file_noise.kind == "file" and np.array_equal(again, table)
    for bad in ("redundant:-1", "replace:1.5", "replace:x", "redundant:"):
        with pytest.raises(NoiseError, match="expected"):
            parse_noise(bad)
    with pytest.raises(NoiseError, match="generated model"):
        noise_main(["--root", str(root), "--noise", "none", "--out", str(tmp_path / "x.h5")])
