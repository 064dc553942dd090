"""Convert datasets into shards: the standard releases of the field, or a folder of images.

    python -m scbch_dist.data.convert {mirflickr,nuswide,coco,iapr} --src DIR --out DIR
    python -m scbch_dist.data.convert folder --images DIR --annotations FILE --out DIR [--classes FILE]
        [--skip-bad] [--query N] [--database-extra N] [--seed S] [--samples-per-shard N]

Standard releases (feature vectors): reads MATLAB v5 and v7.3 .mat files and HDF5, concatenates
the release's parts in file order, applies the standard split (docs/data.md, "Standard releases";
data/releases.py) and writes shards, ``meta.json`` (counts, dimensions, classes, sha256 of every source
file) and ``labels/clean.npy``. A missing or wrong file, key or shape is an error that names it.

Image folders (``folder``): a raw dataset (encoded images and texts, as they are) from a folder of
images and an annotation file with one record per sample: JSON lines (``image``, ``text`` a string
or a list of tags, ``labels`` a list of class names, optional ``split``) or CSV with a header row
(``labels`` separated by ``|``). Classes come from ``--classes`` or are the sorted label names.
Splits: a ``split`` field says ``train`` (training and database), ``query`` or ``database``
(database only); without one, a random split seeded by ``--seed``: ``--query`` rows (default
min(2000, 10 %)), ``--database-extra`` database-only rows (default 0), the rest training. The
database is the training rows followed by the database-only rows. A missing or corrupt image, or a
row without labels or words, is an error naming the annotation file, line and field, or is
skipped and counted with ``--skip-bad``. The full rules: FOLDER_HELP, printed by
``python -m scbch_dist.data.convert folder --help``.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from scbch_dist import cli
from scbch_dist.data.format import DatasetMeta, RawSample, sha256_file, text_words, write_dataset, write_raw_dataset
from scbch_dist.data.releases import RELEASES, Release
from scbch_dist.errors import ScbchError


class ConvertError(ScbchError, ValueError):
    """Bad conversion input or setting; the message names the file, line and field (or the option)."""


def _check_samples_per_shard(n: int) -> None:
    # checked before any file is read, so a typo does not cost a full image check first
    if n < 1:
        raise ConvertError(f"--samples-per-shard must be at least 1, got {n}")


def _not_utf8(path: Path) -> ConvertError:
    """The error for a text file that is not UTF-8, naming the first bad line, byte and column
    (1-based, in characters, as an editor counts them)."""
    data = Path(path).read_bytes()
    # a multi-byte UTF-8 sequence never contains the byte of "\n", so lines can be split as bytes
    for n, line in enumerate(data.split(b"\n"), 1):
        if n == 1 and line.startswith(codecs.BOM_UTF8):  # a byte order mark is allowed, and no column
            line = line[len(codecs.BOM_UTF8):]
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            column = len(line[:e.start].decode("utf-8")) + 1
            return ConvertError(f"{path}: line {n} is not UTF-8 (byte 0x{line[e.start]:02x} at column {column})")
    return ConvertError(f"{path}: not UTF-8")  # not reached: some line fails when the whole file does


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
    _check_samples_per_shard(samples_per_shard)
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


# ----------------------------------------------------------------------------------------------
# Image folders with an annotation file (raw datasets)

FOLDER_HELP = """\
Convert a folder of images and an annotation file into a raw dataset (encoded images and texts,
stored as they are; vocab.json holds the words of the training texts).

Annotation file, one record per sample:
  JSON lines (.jsonl or .json): one object per line, blank lines ignored, e.g.
    {"image": "dogs/1.jpg", "text": "a dog on the beach", "labels": ["dog", "sea"], "split": "train"}
    "text" is a caption (a string) or tags (a list of strings, joined with spaces);
    "labels" is a list of class names.
  CSV (.csv): a header row naming the columns image, text, labels and optionally split (other
    columns are ignored); labels separated by "|" (e.g. dog|sea), spaces around a name ignored.
  "image" is a path relative to --images, or absolute.

Classes: the lines of --classes (one name per line, blank lines ignored), in that order; without
  it the sorted set of the label names of the rows kept. A label not in --classes is an error.

Splits. With a "split" field (then every record needs one; --query/--database-extra don't apply):
    train     a training sample, also in the database (the standard protocol)
    query     a query only
    database  a database (retrieval) sample only, never trained on
  Without one, a random split seeded by --seed over the rows kept: --query rows are queries
  (default min(2000, 10% of the rows), at least 1), --database-extra rows (default 0) are
  database-only, the rest are training (and database) rows.
  Ids follow the file order within each split; the database is the training rows followed by the
  database-only rows, so database id i < N_train is training id i.

Images are checked by a full decode. JPEG, PNG and WebP files are stored byte for byte (the
  extension comes from the content, not the file name); other formats (BMP, GIF, TIFF, ...) are
  re-encoded as PNG (RGB, first frame).

Bad rows: a missing, unreadable or truncated image, an empty label list, or a text with no word.
  Each is an error naming the annotation file, the line and the field; with --skip-bad bad rows
  are left out, counted, and listed in meta.json (source.skipped, source.skipped_examples).
  Malformed records (invalid JSON, a missing field, an unknown label or split) are always errors.
"""

FOLDER_SPLITS = ("train", "query", "database")
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: a camera JPEG
CSV_LABEL_SEP = "|"  # neither the CSV delimiter nor common in class names
SKIPPED_EXAMPLES = 10  # bad rows named in meta.json and in the summary


@dataclass
class Record:
    """One annotation record, as read (nothing checked on disk yet)."""

    where: str  # "<annotation file>: line N": the start of every error about this record
    image: Path
    text: str
    labels: list[str]
    split: str | None  # train | query | database; None when the file has no split field


def _field(where: str, rec: dict, name: str):
    if rec.get(name) is None:
        raise ConvertError(f"{where}: missing field {name!r}")
    return rec[name]


def _make_record(where: str, rec: dict, images: Path, labels: list[str]) -> Record:
    image = _field(where, rec, "image")
    if not isinstance(image, str) or not image.strip():
        raise ConvertError(f"{where}: field 'image' must be a non-empty path, got {image!r}")
    text = _field(where, rec, "text")
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        text = " ".join(t.strip() for t in text)  # tags
    if not isinstance(text, str):
        raise ConvertError(f"{where}: field 'text' must be a string or a list of strings, got {type(text).__name__}")
    split = rec.get("split")
    if split is not None:
        if not isinstance(split, str) or split.strip().lower() not in FOLDER_SPLITS:
            raise ConvertError(f"{where}: field 'split' is {split!r}, expected one of {', '.join(FOLDER_SPLITS)}")
        split = split.strip().lower()
    path = Path(image.strip())
    return Record(where, path if path.is_absolute() else images / path, text.strip(),
                  list(dict.fromkeys(labels)), split)


def _read_jsonl(path: Path, images: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            if n == 1 and line.lstrip().startswith("["):
                raise ConvertError(f"{where}: a JSON array; write one JSON object per line (JSON lines)")
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConvertError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ConvertError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            labels = _field(where, rec, "labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise ConvertError(f"{where}: field 'labels' must be a list of class names, got {labels!r}")
            records.append(_make_record(where, rec, images, [x.strip() for x in labels if x.strip()]))
    return records


def _read_csv(path: Path, images: Path) -> list[Record]:
    records = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("image", "text", "labels") if c not in (reader.fieldnames or [])]
        if missing:
            raise ConvertError(f"{path}: line 1: the header has no column {', '.join(map(repr, missing))} "
                               f"(header: {reader.fieldnames})")
        for rec in reader:
            where = f"{path}: line {reader.line_num}"
            if None in rec:
                raise ConvertError(f"{where}: more fields than the header has columns (unquoted commas?)")
            if "split" in rec and rec["split"] is None:
                raise ConvertError(f"{where}: missing field 'split'")
            labels = [x.strip() for x in _field(where, rec, "labels").split(CSV_LABEL_SEP) if x.strip()]
            records.append(_make_record(where, rec, images, labels))
    return records


def read_annotations(path: Path, images: Path) -> list[Record]:
    """The records of a JSON lines (.jsonl, .json) or CSV (.csv) annotation file, in file order."""
    path, images = Path(path), Path(images)
    if not path.is_file():
        raise ConvertError(f"{path}: annotation file not found")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv"):
        raise ConvertError(f"{path}: unknown annotation format {suffix!r}; expected .jsonl, .json or .csv")
    try:
        records = _read_csv(path, images) if suffix == ".csv" else _read_jsonl(path, images)
    except UnicodeDecodeError:  # raised while reading the file: find the line for the message
        raise _not_utf8(path) from None
    if not records:
        raise ConvertError(f"{path}: no records")
    with_split = [r for r in records if r.split is not None]
    if with_split and len(with_split) < len(records):  # a split for some rows only is a mistake
        first = next(r for r in records if r.split is None)
        raise ConvertError(f"{first.where}: missing field 'split' (other records have one)")
    return records


def read_classes(path: Path) -> list[str]:
    """Class names, one per line (blank lines ignored), in file order."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: classes file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    names: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if name in names:
            raise ConvertError(f"{path}: line {n}: class {name!r} repeats line {names[name]}")
        if name:
            names[name] = n
    if not names:
        raise ConvertError(f"{path}: no class names")
    return list(names)


def encode_image(data: bytes) -> tuple[bytes, str]:
    """The bytes to store for the encoded image ``data`` and their extension (jpg | png | webp).

    The image is fully decoded (``verify`` checks the structure, ``load`` catches truncated
    data). JPEG, PNG and WebP are kept: ``data`` itself is returned. Other formats are re-encoded
    as RGB PNG. Raises what PIL raises on an unreadable image (OSError, SyntaxError, ...)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        fmt = img.format
        img.verify()
    with Image.open(io.BytesIO(data)) as img:  # verify() leaves the image unusable: reopen
        img.load()
        if fmt in KEEP_FORMATS:
            return data, KEEP_FORMATS[fmt]
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"


class Checked(NamedTuple):
    """What the check of one record found."""

    ext: str = ""  # jpg | png | webp, of the bytes to store
    reencoded: bool = False  # True: not JPEG/PNG/WebP, stored as a PNG re-encoding
    problem: str | None = None  # why the record is bad (then ext is empty)


def check_record(rec: Record) -> Checked:
    """Check a record's labels, text and image (a full decode)."""
    if not rec.labels:
        return Checked(problem=f"{rec.where}: field 'labels': no labels")
    if not text_words(rec.text):
        return Checked(problem=f"{rec.where}: field 'text': no words in {rec.text!r}")
    try:
        data = rec.image.read_bytes()
        stored, ext = encode_image(data)
    except FileNotFoundError:
        return Checked(problem=f"{rec.where}: field 'image': {rec.image}: file not found")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
        return Checked(problem=f"{rec.where}: field 'image': {rec.image}: not a readable image "
                               f"({type(e).__name__}: {e})")
    return Checked(ext=ext, reencoded=stored is not data)


def _progress(total: int, desc: str, show: bool):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal only, so logs of batch jobs stay clean
    return tqdm(total=total, desc=desc, unit="img", disable=None if show else True)


def _check_all(records: list[Record], workers: int, progress: bool, stop_at_bad: bool) -> list[Checked]:
    """``check_record`` of every record, in order; with ``stop_at_bad`` the list ends at the
    first bad record (no point decoding the rest of a large folder before reporting it)."""
    out: list[Checked] = []
    with _progress(len(records), "check images", progress) as bar:
        # image decoding releases the GIL: threads check several files at once
        pool = ThreadPoolExecutor(workers) if workers > 1 else None
        try:
            for result in pool.map(check_record, records) if pool else map(check_record, records):
                out.append(result)
                bar.update()
                if stop_at_bad and result.problem is not None:
                    break
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
    return out


def assign_splits(records: list[Record], kept: list[int], *, query: int | None, database_extra: int | None,
                  seed: int, annotations: Path) -> tuple[dict[str, list[int]], dict]:
    """Record indices per split (file order within each; database = train + database-only) and
    the rule applied, for meta.json."""
    if records[0].split is not None:
        if query is not None or database_extra is not None:
            raise ConvertError(f"{annotations}: the records have a split field; --query and --database-extra "
                               f"apply to the random split only")
        by = {s: [i for i in kept if records[i].split == s] for s in FOLDER_SPLITS}
        for s in ("train", "query"):
            if not by[s]:
                raise ConvertError(f"{annotations}: no usable record has split {s!r}")
        rule = {"rule": "field", "database": "train rows, then split=database rows"}
        return {"train": by["train"], "query": by["query"], "database": by["train"] + by["database"]}, rule
    n = len(kept)
    q = min(2000, max(1, n // 10)) if query is None else query
    e = database_extra or 0
    if q < 1 or e < 0:
        raise ConvertError(f"--query must be at least 1 and --database-extra not negative (got {q}, {e})")
    if q + e >= n:
        raise ConvertError(f"{annotations}: {n} usable records; {q} queries and {e} database-only rows leave "
                           f"none for training")
    order = np.random.default_rng(seed).permutation(n)
    pick = [sorted(kept[j] for j in part) for part in (order[:q], order[q:q + e], order[q + e:])]
    rule = {"rule": "random", "seed": seed, "query": q, "database_extra": e,
            "database": "train rows, then the database-only rows"}
    return {"train": pick[2], "query": pick[0], "database": pick[2] + pick[1]}, rule


def _samples(records: list[Record], index: list[int], checked: list[Checked], classes: list[str],
             bar) -> Iterator[RawSample]:
    """The records ``index`` as RawSamples; images read again (checked files only)."""
    col = {name: i for i, name in enumerate(classes)}
    for i in index:
        rec, c = records[i], checked[i]
        try:
            image = encode_image(rec.image.read_bytes())[0] if c.reencoded else rec.image.read_bytes()
        except Exception as e:  # changed on disk since the check
            raise ConvertError(f"{rec.where}: field 'image': {rec.image}: unreadable on the second read ({e})") from None
        lab = np.zeros(len(classes), dtype=np.uint8)
        lab[[col[name] for name in rec.labels]] = 1
        bar.update()
        yield RawSample(image=image, ext=c.ext, text=rec.text, lab=lab)


def convert_folder(images: Path, annotations: Path, out: Path, *, classes_file: Path | None = None,
                   skip_bad: bool = False, query: int | None = None, database_extra: int | None = None,
                   seed: int = 0, samples_per_shard: int = 1024, workers: int = 1,
                   progress: bool = False) -> DatasetMeta:
    """Convert an image folder and its annotation file (rules: FOLDER_HELP) into a raw dataset at
    ``out``, atomically. Skipped rows are counted in ``meta.source["skipped"]``."""
    images, annotations, out = Path(images), Path(annotations), Path(out)
    _check_samples_per_shard(samples_per_shard)
    if not images.is_dir():
        raise ConvertError(f"{images}: image folder not found")
    records = read_annotations(annotations, images)
    classes = read_classes(classes_file) if classes_file is not None else None
    if classes is not None:  # fail fast, before any image is read
        known = set(classes)
        for rec in records:
            unknown = [name for name in rec.labels if name not in known]
            if unknown:
                raise ConvertError(f"{rec.where}: field 'labels': unknown class {unknown[0]!r} (not in {classes_file})")
    checked = _check_all(records, workers, progress, stop_at_bad=not skip_bad)
    problems = [c.problem for c in checked if c.problem is not None]
    if problems and not skip_bad:
        raise ConvertError(f"{problems[0]} (--skip-bad leaves bad rows out)")
    kept = [i for i, c in enumerate(checked) if c.problem is None]
    if not kept:
        raise ConvertError(f"{annotations}: no usable records ({len(problems)} bad)")
    if classes is None:
        classes = sorted({name for i in kept for name in records[i].labels})
    splits, rule = assign_splits(records, kept, query=query, database_extra=database_extra, seed=seed,
                                 annotations=annotations)
    source = {"kind": "folder", "images": str(images.resolve()),
              "annotations": {"path": str(annotations.resolve()), "sha256": sha256_file(annotations),
                              "bytes": annotations.stat().st_size},
              "classes_file": str(Path(classes_file).resolve()) if classes_file is not None else None,
              "split": rule, "skipped": len(problems), "skipped_examples": problems[:SKIPPED_EXAMPLES]}
    total = sum(len(v) for v in splits.values())
    with _progress(total, "write shards", progress) as bar:
        return write_raw_dataset(out, name=out.name, classes=classes, source=source,
                                 samples_per_shard=samples_per_shard,
                                 splits={s: _samples(records, splits[s], checked, classes, bar) for s in FOLDER_SPLITS})


def _release_parser(sub, name: str) -> None:
    release = RELEASES[name]
    p = sub.add_parser(name, help=f"the {release.name} feature release",
                       description=f"Convert the {release.name} feature release (standard split: {release.query} "
                                   f"queries, {release.train} training rows, the database all rows but the queries).")
    p.add_argument("--src", required=True, type=Path, help="folder holding the release files")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (e.g. shards/mirflickr25k)")
    p.add_argument("--img-dtype", default="float16", choices=["float16", "float32"],
                   help="storage of image features (float32 keeps the release's values bit for bit)")
    p.add_argument("--txt-dtype", default=None, choices=["uint8", "float16", "float32"],
                   help="storage of text features (default: uint8 for bag-of-words, float16 otherwise)")
    p.add_argument("--samples-per-shard", type=int, default=2048)


def _folder_parser(sub) -> None:
    p = sub.add_parser("folder", help="a folder of images with a JSON lines or CSV annotation file (raw dataset)",
                       description=FOLDER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="folder the image paths are relative to")
    p.add_argument("--annotations", required=True, type=Path, help="annotation file (.jsonl, .json or .csv)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (e.g. shards/mydata)")
    p.add_argument("--classes", type=Path, default=None,
                   help="class names, one per line (default: the sorted label names found)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out bad rows (missing/corrupt image, no labels, no text) instead of stopping")
    p.add_argument("--query", type=int, default=None,
                   help="random split: number of query rows (default min(2000, 10%% of the rows))")
    p.add_argument("--database-extra", type=int, default=None,
                   help="random split: number of database-only rows (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    p.add_argument("--samples-per-shard", type=int, default=1024)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="threads checking images (default: min(8, CPUs))")


def _main_folder(args: argparse.Namespace) -> None:
    meta = convert_folder(args.images, args.annotations, args.out, classes_file=args.classes,
                          skip_bad=args.skip_bad, query=args.query, database_extra=args.database_extra,
                          seed=args.seed, samples_per_shard=args.samples_per_shard, workers=args.workers,
                          progress=True)
    skipped = meta.source["skipped"]
    for line in meta.source["skipped_examples"]:
        print(f"skipped: {line}", file=sys.stderr)
    if skipped > len(meta.source["skipped_examples"]):
        print(f"skipped: ... and {skipped - len(meta.source['skipped_examples'])} more", file=sys.stderr)
    print(f"wrote {args.out}: {meta.describe()}; bad rows skipped: {skipped}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.data.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dataset", required=True, metavar="{" + ",".join([*sorted(RELEASES), "folder"]) + "}")
    for name in sorted(RELEASES):
        _release_parser(sub, name)
    _folder_parser(sub)
    args = p.parse_args(argv)
    _check_samples_per_shard(args.samples_per_shard)
    if args.out.exists():
        raise ConvertError(f"{args.out}: exists; remove it or choose another --out")
    if args.dataset == "folder":
        return _main_folder(args)
    meta = convert(args.dataset, args.src, args.out, img_dtype=args.img_dtype, txt_dtype=args.txt_dtype,
                   samples_per_shard=args.samples_per_shard)
    print(f"wrote {args.out}: {meta.describe()}", file=sys.stderr)


def console() -> None:
    """The ``scbch-convert`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-convert")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.data.convert")
