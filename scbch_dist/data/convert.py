"""Convert the standard releases of the field into shards.

    python -m scbch_dist.data.convert {mirflickr,nuswide,coco,iapr} --src DIR --out DIR

Reads MATLAB v5 and v7.3 .mat files and HDF5, concatenates the release's parts in file order,
applies the standard split (DESIGN.md, "Standard releases and splits") and writes shards,
``meta.json`` (counts, dimensions, classes, sha256 of every source file) and ``labels/clean.npy``.
A missing or wrong file, key or shape is an error that names it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scbch_dist.data.format import sha256_file, write_dataset
from scbch_dist.data.synthetic import CLASSES as MIRFLICKR_CLASSES


class ConvertError(ValueError):
    pass


@dataclass(frozen=True)
class Part:
    """One block of rows: the file and key of each modality."""

    img: tuple[str, str]
    txt: tuple[str, str]
    lab: tuple[str, str]


@dataclass(frozen=True)
class Release:
    name: str
    parts: tuple[Part, ...]  # concatenated in this order
    classes: int
    query: int  # the first `query` rows
    train: int  # the next `train` rows; the database is every row but the query rows
    class_names: tuple[str, ...] = ()


RELEASES = {
    "mirflickr": Release("mirflickr25k", (Part(("mirflickr25k-iall-vgg.mat", "XAll"), ("mirflickr25k-yall.mat", "YAll"),
                                               ("mirflickr25k-lall.mat", "LAll")),),
                         classes=24, query=2000, train=10000, class_names=tuple(MIRFLICKR_CLASSES)),
    "nuswide": Release("nuswide21", (Part(("nus-wide-tc21-xall-vgg-clean.mat", "XAll"),
                                          ("nus-wide-tc21-yall-clean.mat", "YAll"),
                                          ("nus-wide-tc21-lall-clean.mat", "LAll")),),
                       classes=21, query=2100, train=10500),
    "coco": Release("mscoco", (Part(("MSCOCO_deep_doc2vec_data.h5py", "train_imgs_deep"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "train_text"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "train_imgs_labels")),
                               Part(("MSCOCO_deep_doc2vec_data.h5py", "test_imgs_deep"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "test_text"),
                                    ("MSCOCO_deep_doc2vec_data.h5py", "test_imgs_labels"))),
                    classes=80, query=5000, train=10000),
    "iapr": Release("iaprtc12", (Part(("iapr-tc12-rand.mat", "VDatabase"), ("iapr-tc12-rand.mat", "YDatabase"),
                                      ("iapr-tc12-rand.mat", "databaseL")),
                                 Part(("iapr-tc12-rand.mat", "VTest"), ("iapr-tc12-rand.mat", "YTest"),
                                      ("iapr-tc12-rand.mat", "testL"))),
                    classes=255, query=2000, train=10000),
}


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    if head == b"\x89HDF\r\n\x1a\n":
        return True
    with open(path, "rb") as f:  # MATLAB v7.3: a 512-byte text header, then HDF5 at offset 512
        f.seek(512)
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def read_array(path: Path, key: str) -> np.ndarray:
    """A 2-d array from a MATLAB v5/v7 .mat, a MATLAB v7.3 .mat (HDF5, stored transposed) or HDF5."""
    if not path.is_file():
        raise ConvertError(f"{path}: file not found")
    if _is_hdf5(path):
        import h5py

        with h5py.File(path, "r") as f:
            if key not in f:
                raise ConvertError(f"{path}: key {key!r} not found (keys: {', '.join(sorted(f.keys()))})")
            a = np.asarray(f[key][()])
            # MATLAB writes column-major arrays: an N x D matrix appears as (D, N) in HDF5
            matlab = path.suffix == ".mat" or "MATLAB_class" in f[key].attrs
        a = a.T if matlab and a.ndim == 2 else a
    else:
        import scipy.io as sio

        try:
            names = [name for name, *_ in sio.whosmat(path)]
        except Exception as e:
            raise ConvertError(f"{path}: not a readable .mat file ({e})") from None
        if key not in names:
            raise ConvertError(f"{path}: key {key!r} not found (keys: {', '.join(sorted(names))})")
        a = sio.loadmat(path, variable_names=[key])[key]
    if a.ndim != 2:
        raise ConvertError(f"{path}: {key!r} has shape {a.shape}, expected a 2-d (samples x dims) array")
    return a


def load_release(release: Release, src: Path) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """All rows of the release in file order (img, txt, lab) and the sha256 of every source file."""
    src = Path(src)
    parts = {"img": [], "txt": [], "lab": []}
    for part in release.parts:
        arrays = {}
        for modality, (name, key) in (("img", part.img), ("txt", part.txt), ("lab", part.lab)):
            arrays[modality] = read_array(src / name, key)
        rows = {m: a.shape[0] for m, a in arrays.items()}
        if len(set(rows.values())) != 1:
            detail = ", ".join(f"{dict(img=part.img, txt=part.txt, lab=part.lab)[m][1]}: {n}" for m, n in rows.items())
            raise ConvertError(f"{src}: the modalities have different row counts ({detail})")
        for m in parts:
            parts[m].append(arrays[m])
    data = {m: np.concatenate(v) if len(v) > 1 else v[0] for m, v in parts.items()}
    lab_file = src / release.parts[0].lab[0]
    if data["lab"].shape[1] != release.classes:
        raise ConvertError(f"{lab_file}: labels have {data['lab'].shape[1]} classes; the {release.name} release has "
                           f"{release.classes}")
    if not np.isin(data["lab"], (0, 1)).all():
        raise ConvertError(f"{lab_file}: labels are not multi-hot 0/1")
    n = data["lab"].shape[0]
    if n < release.query + release.train:
        raise ConvertError(f"{src}: {n} rows, fewer than the standard split needs "
                           f"({release.query} query + {release.train} training)")
    for m in ("img", "txt"):
        if data[m].dtype.kind == "f" and not np.isfinite(data[m]).all():
            row = int(np.argmin(np.isfinite(data[m]).all(1)))
            raise ConvertError(f"{src}: {m} features of row {row} are not finite")
    files = sorted({name for part in release.parts for name, _ in (part.img, part.txt, part.lab)})
    sources = {name: {"sha256": sha256_file(src / name), "bytes": (src / name).stat().st_size} for name in files}
    return data, sources


def text_dtype(txt: np.ndarray) -> str:
    """uint8 for bag-of-words counts (exact), float16 otherwise (Doc2Vec and other dense vectors)."""
    if txt.dtype.kind in "iub" or (txt.size and np.array_equal(txt, np.round(txt))):
        if txt.min(initial=0) >= 0 and txt.max(initial=0) <= 255:
            return "uint8"
    return "float16"


def convert(dataset: str, src: Path, out: Path, *, img_dtype: str = "float16", txt_dtype: str | None = None,
            samples_per_shard: int = 2048):
    """Convert one standard release; returns the written DatasetMeta."""
    if dataset not in RELEASES:
        raise ConvertError(f"unknown release {dataset!r}; known: {', '.join(RELEASES)}")
    release = RELEASES[dataset]
    data, sources = load_release(release, src)
    q, t = release.query, release.train
    rows = {"query": slice(0, q), "train": slice(q, q + t), "database": slice(q, None)}
    splits = {s: (data["img"][r], data["txt"][r], data["lab"][r].astype(np.uint8)) for s, r in rows.items()}
    names = list(release.class_names) or [f"class_{i:03d}" for i in range(release.classes)]
    return write_dataset(
        out, name=release.name, classes=names, splits=splits, img_dtype=img_dtype,
        txt_dtype=txt_dtype or text_dtype(data["txt"]), samples_per_shard=samples_per_shard,
        source={"kind": "release", "release": dataset, "files": sources,
                "split": {"query": [0, q], "train": [q, q + t], "database": f"all rows but {0}..{q - 1}"}},
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(RELEASES))
    p.add_argument("--src", required=True, type=Path, help="folder holding the release files")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (e.g. shards/mirflickr25k)")
    p.add_argument("--img-dtype", default="float16", choices=["float16", "float32"],
                   help="storage of image features (float32 keeps the release's values bit for bit)")
    p.add_argument("--txt-dtype", default=None, choices=["uint8", "float16", "float32"],
                   help="storage of text features (default: uint8 for bag-of-words, float16 otherwise)")
    p.add_argument("--samples-per-shard", type=int, default=2048)
    args = p.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it or choose another --out")
    try:
        meta = convert(args.dataset, args.src, args.out, img_dtype=args.img_dtype, txt_dtype=args.txt_dtype,
                       samples_per_shard=args.samples_per_shard)
    except ConvertError as e:
        raise SystemExit(f"convert {args.dataset}: {e}") from None
    counts = ", ".join(f"{s} {meta.splits[s].count}" for s in ("query", "train", "database"))
    print(f"wrote {args.out}: {counts}; img {meta.dim('img')}-d {meta.fields['img'].dtype}, "
          f"txt {meta.dim('txt')}-d {meta.fields['txt'].dtype}, {meta.num_classes} classes", file=sys.stderr)


if __name__ == "__main__":
    main()
