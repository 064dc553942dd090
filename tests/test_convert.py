"""Converters of the four standard releases: real MIRFlickr labels and tags, synthetic files in the
other layouts (MATLAB v5, MATLAB v7.3 and plain HDF5), and every error."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io as sio

from conftest import MIRFLICKR, needs_mirflickr
from scbch_dist.data.convert import ConvertError, convert, main
from scbch_dist.data.format import read_meta, sha256_file
from scbch_dist.data.noise import training_labels
from scbch_dist.data.pipeline import load_split


def write_mat73(path, arrays):
    """A MATLAB v7.3 file: HDF5 behind a 512-byte header, matrices stored column-major (transposed)."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for key, a in arrays.items():
            d = f.create_dataset(key, data=np.ascontiguousarray(a.T))
            d.attrs["MATLAB_class"] = np.bytes_("double" if a.dtype.kind == "f" else "uint8")
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, written by the scbch_dist tests".ljust(128, b" "))


def release_arrays(n, img_dim, txt_dim, classes, seed, binary_text=True):
    rng = np.random.default_rng(seed)
    lab = (rng.random((n, classes)) < 0.1).astype(np.uint8)
    lab[np.arange(n), rng.integers(classes, size=n)] = 1
    txt = (rng.random((n, txt_dim)) < 0.2).astype(np.uint8) if binary_text else rng.normal(size=(n, txt_dim))
    return rng.normal(size=(n, img_dim)).astype(np.float32), txt, lab


def check_split_rows(out, img, txt, lab, query, train):
    meta = read_meta(out)
    n = len(lab)
    assert [meta.splits[s].count for s in ("query", "train", "database")] == [query, train, n - query]
    rows = {"query": np.arange(query), "train": np.arange(query, query + train), "database": np.arange(query, n)}
    for split, r in rows.items():
        got = load_split(out, meta, split)
        assert np.array_equal(got["lab"], lab[r]), split
        assert np.allclose(got["img"].astype(np.float32), img[r], rtol=1e-3, atol=1e-3), split
        assert np.allclose(got["txt"].astype(np.float64), txt[r], rtol=1e-3, atol=1e-3), split
    return meta


@needs_mirflickr()
def test_mirflickr_real_labels_and_tags(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("mirflickr25k-lall.mat", "mirflickr25k-yall.mat"):
        (src / name).symlink_to(MIRFLICKR / name)
    lab = sio.loadmat(MIRFLICKR / "mirflickr25k-lall.mat")["LAll"]
    tags = sio.loadmat(MIRFLICKR / "mirflickr25k-yall.mat")["YAll"]
    img = np.random.default_rng(0).normal(size=(len(lab), 6)).astype(np.float32)  # stand-in for VGG fc7
    sio.savemat(src / "mirflickr25k-iall-vgg.mat", {"XAll": img})
    out = tmp_path / "flickr"
    main(["mirflickr", "--src", str(src), "--out", str(out), "--img-dtype", "float32"])
    meta = check_split_rows(out, img, tags, lab, 2000, 10000)
    assert meta.splits["database"].count == 18015 and meta.num_classes == 24 and meta.classes[0] == "animals"
    assert meta.fields["txt"].dtype == "uint8" and meta.dim("txt") == 1386
    assert meta.source["files"]["mirflickr25k-lall.mat"]["sha256"] == sha256_file(MIRFLICKR / "mirflickr25k-lall.mat")
    # the published noisy labels import onto the converted dataset row for row
    import h5py

    for rate in (0.2, 0.5, 0.8):
        path = MIRFLICKR / f"mirflickr25k-lall-noise_{rate}.h5"
        table, _ = training_labels(out, meta, f"file:{path}", seed=0)
        with h5py.File(path, "r") as f:
            assert np.array_equal(table, f["result"][()].astype(np.uint8))


def test_nuswide_matlab_v73(tmp_path):
    img, txt, lab = release_arrays(12700, 5, 7, 21, seed=1)
    write_mat73(tmp_path / "nus-wide-tc21-xall-vgg-clean.mat", {"XAll": img.astype(np.float64)})
    write_mat73(tmp_path / "nus-wide-tc21-yall-clean.mat", {"YAll": txt})
    write_mat73(tmp_path / "nus-wide-tc21-lall-clean.mat", {"LAll": lab})
    convert("nuswide", tmp_path, tmp_path / "out", img_dtype="float32")
    check_split_rows(tmp_path / "out", img, txt, lab, 2100, 10500)


def test_coco_hdf5_train_rows_then_test_rows(tmp_path):
    import h5py

    a = release_arrays(9000, 4, 6, 80, seed=2, binary_text=False)
    b = release_arrays(6100, 4, 6, 80, seed=3, binary_text=False)
    with h5py.File(tmp_path / "MSCOCO_deep_doc2vec_data.h5py", "w") as f:
        for part, (img, txt, lab) in (("train", a), ("test", b)):
            f[f"{part}_imgs_deep"], f[f"{part}_text"], f[f"{part}_imgs_labels"] = img, txt, lab
    meta = convert("coco", tmp_path, tmp_path / "out", img_dtype="float32")
    assert meta.fields["txt"].dtype == "float16"  # Doc2Vec vectors are dense floats
    check_split_rows(tmp_path / "out", *(np.concatenate([x, y]) for x, y in zip(a, b)), 5000, 10000)


def test_iapr_matlab_v5_database_rows_then_test_rows(tmp_path):
    a, b = release_arrays(10050, 3, 9, 255, seed=4), release_arrays(2000, 3, 9, 255, seed=5)
    sio.savemat(tmp_path / "iapr-tc12-rand.mat", {"VDatabase": a[0], "YDatabase": a[1], "databaseL": a[2],
                                                 "VTest": b[0], "YTest": b[1], "testL": b[2]})
    convert("iapr", tmp_path, tmp_path / "out", img_dtype="float32")
    check_split_rows(tmp_path / "out", *(np.concatenate([x, y]) for x, y in zip(a, b)), 2000, 10000)


def test_errors_name_file_key_and_shape(tmp_path):
    img, txt, lab = release_arrays(12100, 3, 4, 255, seed=6)
    with pytest.raises(ConvertError, match=r"iapr-tc12-rand\.mat: file not found"):
        convert("iapr", tmp_path, tmp_path / "out")
    sio.savemat(tmp_path / "iapr-tc12-rand.mat", {"VDatabase": img, "YDatabase": txt, "databaseL": lab})
    with pytest.raises(ConvertError, match=r"iapr-tc12-rand\.mat: key 'VTest' not found \(keys: .*VDatabase"):
        convert("iapr", tmp_path, tmp_path / "out")
    sio.savemat(tmp_path / "iapr-tc12-rand.mat", {"VDatabase": img, "YDatabase": txt[:-1], "databaseL": lab,
                                                 "VTest": img[:5], "YTest": txt[:5], "testL": lab[:5]})
    with pytest.raises(ConvertError, match=r"different row counts \(VDatabase: 12100, YDatabase: 12099"):
        convert("iapr", tmp_path, tmp_path / "out")
    sio.savemat(tmp_path / "iapr-tc12-rand.mat", {"VDatabase": img, "YDatabase": txt, "databaseL": lab[:, :200],
                                                 "VTest": img[:5], "YTest": txt[:5], "testL": lab[:5, :200]})
    with pytest.raises(ConvertError, match=r"labels have 200 classes; the iaprtc12 release has 255"):
        convert("iapr", tmp_path, tmp_path / "out")
    sio.savemat(tmp_path / "iapr-tc12-rand.mat", {"VDatabase": img[:100], "YDatabase": txt[:100],
                                                 "databaseL": lab[:100], "VTest": img[:5], "YTest": txt[:5],
                                                 "testL": lab[:5]})
    with pytest.raises(ConvertError, match=r"105 rows, fewer than the standard split needs"):
        convert("iapr", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
