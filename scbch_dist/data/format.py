"""The shard schema and ``meta.json``: writing, reading and validating. One source of truth.

A dataset is a folder::

    meta.json                     counts, dimensions, classes, source checksums, shard list
                                  with per-shard counts and sha256
    train-000000.tar ...          WebDataset tar shards per split (train, query, database)
    labels/clean.npy              the training labels as the shards hold them (N_train x C, uint8)
    labels/<noise-name>.npy       noise tables: replace the training labels at load time

Logical sample (one per id; ids are dense per split, 0..count-1):
    ``img.npy`` image feature vector, ``txt.npy`` text feature vector, ``lab.npy`` multi-hot uint8;
    or, for raw datasets (``fields.img.kind == "image"``, ``fields.txt.kind == "text"``), the encoded
    image bytes (``jpg``/``png``/``webp``) and the UTF-8 caption or tags (``txt``).

Physical layout. ``layout: "block"`` (what the writer produces) stores up to ``block_size``
consecutive samples per tar member group, keyed by the first id (zero padded): members
``<key>.id.npy`` (n,) int64, ``<key>.img.npy`` (n, D_img), ``<key>.txt.npy`` (n, D_txt),
``<key>.lab.npy`` (n, C) uint8. Tiny feature vectors read much faster this way than one tar
member per field per sample (docs/benchmarks.md, "Figures quoted in the code"). ``layout: "sample"`` (one sample per key, key = zero-padded id,
vectors of shape (D,)) is read too, so shards written by other WebDataset tools work.
Raw datasets always use the sample layout: ``<key>.<jpg|png|webp>``, ``<key>.txt``, ``<key>.lab.npy``,
plus ``vocab.json`` beside meta.json (the words of the training texts with their counts, the one
vocabulary that bag-of-words extraction and the word-level tokenizer share).
Either way the reader yields *blocks*: dicts of arrays with a leading sample axis. Raw blocks hold
object arrays (image ``bytes``, text ``str``) and ``src`` (the shard of each sample, for errors).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from scbch_dist.errors import ScbchError
from scbch_dist.data.remote import dataset_root, is_remote
from scbch_dist.digests import sha256_file  # noqa: F401  (shard checksums; re-exported for the data tools)
from scbch_dist.atomic import atomic_save_npy, atomic_write_json

FORMAT_NAME = "scbch_dist-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "query", "database")
MODALITIES = ("img", "txt")
KEY_DIGITS = 9
FEATURE_DTYPES = ("float16", "float32", "uint8")
FIELD_KINDS = {"img": ("feature", "image"), "txt": ("feature", "text")}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VOCAB_FILE = "vocab.json"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ShardError(ScbchError, ValueError):
    """Bad input in a dataset: the message names the file, the sample key and the field."""


@dataclass
class FieldSpec:
    dim: int  # feature width; 0 for raw fields
    dtype: str = "float16"  # features: float16 | float32 | uint8; raw fields: "bytes" / "utf-8"
    kind: str = "feature"  # feature | image (encoded image bytes) | text (UTF-8 caption or tags)

    @property
    def raw(self) -> bool:
        return self.kind != "feature"


@dataclass
class SplitInfo:
    count: int
    shards: list[str] = field(default_factory=list)
    shard_counts: list[int] = field(default_factory=list)
    # hex sha256 of each shard, in shard order; empty for datasets written before checksums
    # existed (add them with ``python -m scbch_dist.data.verify ROOT --add-checksums``)
    sha256: list[str] = field(default_factory=list)


@dataclass
class DatasetMeta:
    name: str
    classes: list[str]
    fields: dict[str, FieldSpec]
    splits: dict[str, SplitInfo]
    layout: str = "block"
    block_size: int = 256
    source: dict[str, Any] = field(default_factory=dict)
    noise_tables: list[str] = field(default_factory=list)
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def dim(self, modality: str) -> int:
        return self.fields[modality].dim

    def kind(self, modality: str) -> str:
        return self.fields[modality].kind

    def describe(self) -> str:
        """One line for the CLIs: split sizes, what each modality holds, classes."""
        counts = ", ".join(f"{s} {self.splits[s].count}" for s in ("query", "train", "database"))
        held = ", ".join(f"{m} {self.dim(m)}-d {self.fields[m].dtype}" if self.kind(m) == "feature"
                         else f"{m} raw {self.kind(m)}" for m in ("img", "txt"))
        return f"{counts}; {held}; {self.num_classes} classes"

    @property
    def raw(self) -> bool:
        """True when any modality is stored raw (images or texts rather than feature vectors)."""
        return any(spec.raw for spec in self.fields.values())

    def to_json(self) -> dict:
        return asdict(self)


def meta_path(root: str | Path) -> Path:
    return dataset_root(root) / "meta.json"


def _json_kind(value: Any) -> str:
    """How JSON would call ``value``'s type, for error messages ("got a list")."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


def _object(path: Path, where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ShardError(f"{path}: {where} is {_json_kind(value)}, expected a JSON object")
    return value


def _list_of(path: Path, where: str, value: Any, kind: type) -> list:
    # bool is an int in Python; a count of true/false is a mistake all the same
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ShardError(f"{path}: {where} must be a list of {kind.__name__}, got {value!r:.80}")
    return value


def _split_info(path: Path, split: str, entry: Any) -> SplitInfo:
    """One ``splits.<split>`` entry, with the types of its fields checked."""
    where = f"splits.{split}"
    entry = _object(path, where, entry)
    unknown = sorted(set(entry) - {"count", "shards", "shard_counts", "sha256"})
    if unknown:
        raise ShardError(f"{path}: {where} has unknown field {unknown[0]!r}")
    if "count" not in entry:
        raise ShardError(f"{path}: missing field '{where}.count'")
    count = entry["count"]
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ShardError(f"{path}: {where}.count is {count!r}, expected a non-negative integer")
    info = SplitInfo(count=count,
                     shards=list(_list_of(path, f"{where}.shards", entry.get("shards", []), str)),
                     shard_counts=list(_list_of(path, f"{where}.shard_counts", entry.get("shard_counts", []), int)),
                     sha256=[h.lower() for h in _list_of(path, f"{where}.sha256", entry.get("sha256", []), str)])
    if len(info.shards) != len(info.shard_counts) or sum(info.shard_counts) != info.count:
        raise ShardError(f"{path}: {where}: shard list and counts disagree with count {info.count}")
    # an empty list means "written before checksums existed"; otherwise one per shard
    if info.sha256 and len(info.sha256) != len(info.shards):
        raise ShardError(f"{path}: {where}.sha256 has {len(info.sha256)} entries for {len(info.shards)} shards")
    for i, digest in enumerate(info.sha256):
        if not SHA256_HEX.fullmatch(digest):
            raise ShardError(f"{path}: {where}.sha256[{i}] = {digest!r:.80} is not a sha256 (64 hex digits)")
    return info


SERVED_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


def _check_confined(path: Path, root: Path, split: str, names: list[str]) -> None:
    """Every shard name must name a file inside the dataset folder: meta.json is data, and a
    copied or downloaded one must not make the readers open files elsewhere."""
    remote = is_remote(root)
    top = None if remote else root.resolve()
    for i, name in enumerate(names):
        where = f"splits.{split}.shards[{i}] = {name!r}"
        if not name.strip():
            raise ShardError(f"{path}: {where} is not a file name")
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not remote and not (root / name).resolve().is_relative_to(top):
            raise ShardError(f"{path}: {where} points outside the dataset folder")
        if remote and not SERVED_NAME.fullmatch(name):  # it goes into a URL or a command line
            raise ShardError(f"{path}: {where}: a shard on a server is named with letters, digits and . _ - / only")


def read_meta(root: str | Path) -> DatasetMeta:
    """Read and check ``root/meta.json``; errors name the file and the offending entry."""
    path = meta_path(root)
    if not path.is_file():
        raise ShardError(f"{path}: not found (is {root} a dataset folder written by scbch_dist?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ShardError(f"{path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    if not isinstance(raw, dict):
        raise ShardError(f"{path}: expected a JSON object at the top level, got {_json_kind(raw)}")
    if raw.get("format") != FORMAT_NAME:
        raise ShardError(f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    if raw.get("version") != FORMAT_VERSION:
        raise ShardError(f"{path}: format version {raw.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    for key in ("name", "classes", "fields", "splits"):
        if key not in raw:
            raise ShardError(f"{path}: missing field {key!r}")
    fields, splits = _object(path, "fields", raw["fields"]), _object(path, "splits", raw["splits"])
    for group, names in (("fields", MODALITIES), ("splits", SPLITS)):
        for name in names:
            if name not in raw[group]:
                raise ShardError(f"{path}: missing field '{group}.{name}'")
    try:
        meta = DatasetMeta(
            name=raw["name"],
            classes=list(_list_of(path, "classes", raw["classes"], str)),
            fields={m: FieldSpec(**_object(path, f"fields.{m}", fields[m])) for m in MODALITIES},
            splits={s: _split_info(path, s, splits[s]) for s in SPLITS},
            layout=raw.get("layout", "block"),
            block_size=int(raw.get("block_size", 256)),
            source=raw.get("source", {}),
            noise_tables=list(raw.get("noise_tables", [])),
        )
    except (TypeError, ValueError) as e:  # an unknown key in fields.<m>, a block_size that is no number
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"{path}: malformed entry ({e})") from None
    if meta.layout not in ("block", "sample"):
        raise ShardError(f"{path}: field 'layout' is {meta.layout!r}, expected 'block' or 'sample'")
    for m, spec in meta.fields.items():
        if spec.kind not in FIELD_KINDS[m]:
            raise ShardError(f"{path}: fields.{m}.kind is {spec.kind!r}, expected one of {FIELD_KINDS[m]}")
        if not spec.raw and spec.dtype not in FEATURE_DTYPES:
            raise ShardError(f"{path}: fields.{m}.dtype is {spec.dtype!r}, expected one of {FEATURE_DTYPES}")
    if meta.raw and meta.layout != "sample":
        raise ShardError(f"{path}: raw fields need layout 'sample', got {meta.layout!r}")
    for s, info in meta.splits.items():
        _check_confined(path, dataset_root(root), s, info.shards)
    return meta


def check_split(root: str | Path, meta: DatasetMeta, split: str) -> list[Path]:
    """The shard paths of ``split``; an empty split or a missing shard file is an error."""
    info = meta.splits[split]
    if info.count == 0 or not info.shards:
        raise ShardError(f"{meta_path(root)}: split {split!r} is empty (0 samples)")
    root = dataset_root(root)
    paths = [root / name for name in info.shards]
    for p in paths if not is_remote(root) else []:  # a server's shards: HEAD once, in the preflight
        if not p.is_file():
            raise ShardError(f"{p}: shard of split {split!r} listed in meta.json is missing")
    return paths


def check_tar_end(path: str | Path) -> None:
    """A complete tar has a size that is a multiple of 512 and ends in two zero 512-byte blocks.

    Python's tarfile stops silently at a header cut short, which would otherwise surface as a
    confusing "missing field" in the last sample; this O(1) check names the real problem."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(size - 1024, 0))
        tail = f.read(1024)
    if size < 1024 or size % 512 or tail.count(0) != len(tail):
        raise ShardError(f"{path}: truncated tar ({size} bytes, no end-of-archive marker)")


# ----------------------------------------------------------------------------------------------
# Decoding and validation of one tar member group


def _load_npy(url: str, key: str, name: str, data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError, EOFError, OSError... on bad bytes
        raise ShardError(f"{url}: sample {key}: field {name!r} is not a readable .npy ({e})") from None


def decode_group(group: dict[str, Any], meta: DatasetMeta, split: str) -> dict[str, np.ndarray]:
    """Validate one WebDataset group (a block or a single sample) and return a block.

    Returns ``{"id": (n,) int64, "img": (n, D_img), "txt": (n, D_txt), "lab": (n, C) uint8}``.
    Raises ShardError naming the shard, the sample key and the field on any violation.
    """
    url = str(group.get("__url__", "<stream>"))
    key = str(group.get("__key__", "?"))
    if meta.raw:
        return decode_raw_sample(group, meta, split, url, key)
    names = ("img.npy", "txt.npy", "lab.npy")
    for name in names:
        if name not in group:
            raise ShardError(f"{url}: sample {key}: missing field {name!r}")
    arrays = {name.split(".")[0]: _load_npy(url, key, name, group[name]) for name in names}
    if "id.npy" in group:
        ids = _load_npy(url, key, "id.npy", group["id.npy"])
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ShardError(f"{url}: sample {key}: field 'id.npy' must be a 1-d integer array")
        ids = ids.astype(np.int64)
    else:  # one sample per key
        try:
            ids = np.array([int(key)], dtype=np.int64)
        except ValueError:
            raise ShardError(f"{url}: sample {key}: key is not an integer id and there is no 'id.npy'") from None
        arrays = {k: v[None] for k, v in arrays.items()}
    n = len(ids)
    count = meta.splits[split].count
    if n == 0:
        raise ShardError(f"{url}: sample {key}: empty block")
    if ids.min() < 0 or ids.max() >= count:
        raise ShardError(f"{url}: sample {key}: id {int(ids.max() if ids.max() >= count else ids.min())} "
                         f"outside 0..{count - 1} of split {split!r}")
    widths = {"img": meta.dim("img"), "txt": meta.dim("txt"), "lab": meta.num_classes}
    for f, want in widths.items():
        a = arrays[f]
        if a.ndim != 2 or a.shape[0] != n:
            raise ShardError(f"{url}: sample {key}: field '{f}.npy' has shape {a.shape}, expected ({n}, {want})")
        if a.shape[1] != want:
            what = "label" if f == "lab" else "feature"
            raise ShardError(f"{url}: sample {_first_key(ids)}: field '{f}.npy' has {what} width {a.shape[1]}, "
                             f"expected {want} (meta.json)")
        if a.dtype.kind not in "fiub":
            raise ShardError(f"{url}: sample {key}: field '{f}.npy' has non-numeric dtype {a.dtype}")
    for f in ("img", "txt"):
        a = arrays[f]
        if a.dtype.kind == "f":
            finite = np.isfinite(a).all(axis=1)
            if not finite.all():
                bad = int(ids[np.argmin(finite)])
                raise ShardError(f"{url}: sample {bad:0{KEY_DIGITS}d}: field '{f}.npy' has non-finite values")
    lab = arrays["lab"]
    if lab.size and (lab.min() < 0 or lab.max() > 1):
        row = int(ids[np.argmax((lab > 1).any(axis=1) | (lab < 0).any(axis=1))])
        raise ShardError(f"{url}: sample {row:0{KEY_DIGITS}d}: field 'lab.npy' is not multi-hot (values outside 0/1)")
    return {"id": ids, "img": arrays["img"], "txt": arrays["txt"], "lab": lab.astype(np.uint8, copy=False)}


def _sample_id(url: str, key: str, count: int, split: str) -> int:
    try:
        i = int(key)
    except ValueError:
        raise ShardError(f"{url}: sample {key}: key is not an integer id") from None
    if not 0 <= i < count:
        raise ShardError(f"{url}: sample {key}: id {i} outside 0..{count - 1} of split {split!r}")
    return i


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def decode_raw_sample(group: dict[str, Any], meta: DatasetMeta, split: str, url: str, key: str) -> dict[str, np.ndarray]:
    """One raw sample as a block of one row. Images stay encoded (they are decoded by the loader's
    transform, after the shuffle, so the shuffle buffer holds compressed bytes)."""
    i = _sample_id(url, key, meta.splits[split].count, split)
    row: dict[str, Any] = {}
    if meta.kind("img") == "image":
        names = [e for e in IMAGE_EXTS if e in group]
        if len(names) != 1:
            found = "none" if not names else ", ".join(names)
            raise ShardError(f"{url}: sample {key}: expected exactly one image field of {IMAGE_EXTS}, found {found}")
        row["img"] = _object_array([bytes(group[names[0]])])
    if meta.kind("txt") == "text":
        if "txt" not in group:
            raise ShardError(f"{url}: sample {key}: missing field 'txt'")
        try:
            row["txt"] = _object_array([bytes(group["txt"]).decode("utf-8")])
        except UnicodeDecodeError as e:
            raise ShardError(f"{url}: sample {key}: field 'txt' is not UTF-8 ({e})") from None
    for m in MODALITIES:
        if m not in row:  # a feature modality beside a raw one: one (D,) vector per sample
            name = f"{m}.npy"
            if name not in group:
                raise ShardError(f"{url}: sample {key}: missing field {name!r}")
            a = _load_npy(url, key, name, group[name])
            if a.shape != (meta.dim(m),) or a.dtype.kind not in "fiub":
                raise ShardError(f"{url}: sample {key}: field {name!r} has shape {a.shape} ({a.dtype}), "
                                 f"expected ({meta.dim(m)},) numeric")
            row[m] = a[None]
    if "lab.npy" not in group:
        raise ShardError(f"{url}: sample {key}: missing field 'lab.npy'")
    lab = _load_npy(url, key, "lab.npy", group["lab.npy"])
    if lab.shape != (meta.num_classes,):
        raise ShardError(f"{url}: sample {key}: field 'lab.npy' has shape {lab.shape}, expected ({meta.num_classes},)")
    if lab.size and (lab.min() < 0 or lab.max() > 1):
        raise ShardError(f"{url}: sample {key}: field 'lab.npy' is not multi-hot (values outside 0/1)")
    return {"id": np.array([i], dtype=np.int64), **row, "lab": lab.astype(np.uint8)[None],
            "src": _object_array([url])}


def _first_key(ids: np.ndarray) -> str:
    return f"{int(ids[0]):0{KEY_DIGITS}d}"


# ----------------------------------------------------------------------------------------------
# Writing


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same arrays always give the same shard checksum
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class _ShardFile:
    """One shard being written into a dataset folder under construction (write_dataset's and
    write_raw_dataset's atomic_directory): a tar under a temporary name, whose sha256 is taken from
    the complete file and recorded in the split's info when ``close`` renames it into place."""

    def __init__(self, root: Path, split: str, index: int):
        self.name = f"{split}-{index:06d}.tar"
        self.path, self.tmp = root / self.name, root / f".{self.name}.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, name: str, data: bytes) -> None:
        _add_member(self.tar, name, data)

    def close(self, info: SplitInfo) -> None:
        self.tar.close()
        digest = sha256_file(self.tmp)  # of the complete file: what the name will stand for after the rename
        self.tmp.rename(self.path)
        info.shards.append(self.name)
        info.shard_counts.append(self.samples)
        info.sha256.append(digest)


class SplitWriter:
    """Append rows of one split; cuts shards of ``samples_per_shard`` and blocks of ``block_size``.

    Ids are assigned in call order, 0..count-1. Each shard is written under a temporary name and
    renamed when complete.
    """

    def __init__(self, root: Path, split: str, spec: dict[str, FieldSpec], num_classes: int,
                 *, block_size: int, samples_per_shard: int):
        if block_size < 1 or samples_per_shard < 1:
            raise ValueError("block_size and samples_per_shard must be positive")
        self.root, self.split, self.spec, self.num_classes = Path(root), split, spec, num_classes
        self.block_size, self.samples_per_shard = block_size, samples_per_shard
        self.info = SplitInfo(count=0)
        self._pending: list[dict[str, np.ndarray]] = []
        self._pending_n = 0

    def write(self, img: np.ndarray, txt: np.ndarray, lab: np.ndarray) -> None:
        n = len(lab)
        if not (len(img) == len(txt) == n):
            raise ValueError(f"split {self.split}: img, txt and lab have {len(img)}, {len(txt)}, {n} rows")
        self._pending.append({"img": np.asarray(img), "txt": np.asarray(txt), "lab": np.asarray(lab)})
        self._pending_n += n
        while self._pending_n >= self.samples_per_shard:
            self._flush(self.samples_per_shard)

    def close(self) -> SplitInfo:
        if self._pending_n:
            self._flush(self._pending_n)
        return self.info

    def _flush(self, n: int) -> None:
        cat = {k: np.concatenate([p[k] for p in self._pending]) for k in ("img", "txt", "lab")}
        take = {k: v[:n] for k, v in cat.items()}
        rest = {k: v[n:] for k, v in cat.items()}
        self._pending = [rest] if len(rest["lab"]) else []
        self._pending_n -= n
        self._write_shard(take)

    def _write_shard(self, rows: dict[str, np.ndarray]) -> None:
        n = len(rows["lab"])
        first = self.info.count
        shard = _ShardFile(self.root, self.split, len(self.info.shards))
        for start in range(0, n, self.block_size):
            stop = min(start + self.block_size, n)
            key = f"{first + start:0{KEY_DIGITS}d}"
            shard.add(f"{key}.id.npy", _npy_bytes(np.arange(first + start, first + stop, dtype=np.int64)))
            for m in MODALITIES:
                shard.add(f"{key}.{m}.npy", _npy_bytes(rows[m][start:stop].astype(self.spec[m].dtype)))
            shard.add(f"{key}.lab.npy", _npy_bytes(rows["lab"][start:stop].astype(np.uint8)))
        shard.samples = n
        shard.close(self.info)
        self.info.count += n


def write_dataset(root: str | Path, *, name: str, classes: list[str], splits: dict[str, tuple],
                  img_dtype: str = "float16", txt_dtype: str = "float16", source: dict | None = None,
                  block_size: int = 256, samples_per_shard: int = 2048) -> DatasetMeta:
    """Write a complete dataset folder from in-memory arrays, atomically.

    ``splits`` maps each of train/query/database to ``(img, txt, lab)`` arrays with one row per
    sample. Rows that are not multi-hot 0/1 or features that are not finite are refused.
    """
    from scbch_dist.atomic import atomic_directory

    for s in SPLITS:
        if s not in splits:
            raise ValueError(f"write_dataset: split {s!r} missing")
    img0, txt0, lab0 = splits["train"]
    spec = {"img": FieldSpec(dim=int(img0.shape[1]), dtype=img_dtype),
            "txt": FieldSpec(dim=int(txt0.shape[1]), dtype=txt_dtype)}
    with atomic_directory(root) as tmp:
        writers = {}
        for s in SPLITS:
            img, txt, lab = splits[s]
            _check_rows(s, img, txt, lab, spec, len(classes))
            w = SplitWriter(tmp, s, spec, len(classes), block_size=block_size, samples_per_shard=samples_per_shard)
            w.write(img, txt, lab)
            writers[s] = w.close()
        meta = DatasetMeta(name=name, classes=list(classes), fields=spec, splits=writers,
                           layout="block", block_size=block_size, source=source or {},
                           noise_tables=["clean"])
        (tmp / "labels").mkdir()
        atomic_save_npy(tmp / "labels" / "clean.npy", np.asarray(lab0, dtype=np.uint8))
        atomic_write_json(meta_path(tmp), meta.to_json())
    return meta


def _check_rows(split: str, img, txt, lab, spec: dict[str, FieldSpec], num_classes: int) -> None:
    for m, a in (("img", img), ("txt", txt)):
        if a.ndim != 2 or a.shape[1] != spec[m].dim:
            raise ValueError(f"split {split}: {m} has shape {a.shape}, expected (n, {spec[m].dim})")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"split {split}: {m} has non-finite values (row {int(np.argmin(np.isfinite(a).all(1)))})")
        if spec[m].dtype == "float16" and a.dtype.kind == "f" and np.abs(a).max(initial=0) > 65504:
            raise ValueError(f"split {split}: {m} exceeds the float16 range; write it as float32")
    if lab.ndim != 2 or lab.shape[1] != num_classes:
        raise ValueError(f"split {split}: labels have shape {lab.shape}, expected (n, {num_classes})")
    if lab.size and not np.isin(lab, (0, 1)).all():
        raise ValueError(f"split {split}: labels are not multi-hot 0/1")


# ----------------------------------------------------------------------------------------------
# Raw datasets (encoded images and UTF-8 texts)


def text_words(text: str) -> list[str]:
    """The words of a caption or tag list: lower-cased runs of letters, digits and underscores.
    The one tokenisation rule behind vocab.json, bag-of-words extraction and the word tokenizer."""
    return re.findall(r"\w+", text.lower())


@dataclass
class RawSample:
    image: bytes  # the encoded file, exactly as read
    ext: str  # jpg | png | webp
    text: str
    lab: np.ndarray  # (C,) multi-hot


class RawSplitWriter:
    """Append raw samples of one split (ids in call order); shards of ``samples_per_shard``,
    each written under a temporary name and renamed when complete."""

    def __init__(self, root: Path, split: str, num_classes: int, *, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError("samples_per_shard must be positive")
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.samples_per_shard = samples_per_shard
        self.info = SplitInfo(count=0)
        self._shard: _ShardFile | None = None

    def write(self, sample: RawSample) -> None:
        ext = sample.ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"split {self.split}: image extension {sample.ext!r} is not one of {IMAGE_EXTS}")
        lab = np.asarray(sample.lab)
        if lab.shape != (self.num_classes,) or not np.isin(lab, (0, 1)).all():
            raise ValueError(f"split {self.split}: sample {self.info.count}: labels must be ({self.num_classes},) multi-hot")
        if self._shard is None:
            self._shard = _ShardFile(self.root, self.split, len(self.info.shards))
        key = f"{self.info.count:0{KEY_DIGITS}d}"
        self._shard.add(f"{key}.{ext}", bytes(sample.image))
        self._shard.add(f"{key}.txt", sample.text.encode("utf-8"))
        self._shard.add(f"{key}.lab.npy", _npy_bytes(lab.astype(np.uint8)))
        self.info.count += 1
        self._shard.samples += 1
        if self._shard.samples == self.samples_per_shard:
            self._close_shard()

    def close(self) -> SplitInfo:
        if self._shard is not None:
            self._close_shard()
        return self.info

    def _close_shard(self) -> None:
        self._shard.close(self.info)
        self._shard = None


def write_raw_dataset(root: str | Path, *, name: str, classes: list[str], splits: dict[str, Iterable[RawSample]],
                      source: dict | None = None, samples_per_shard: int = 1024) -> DatasetMeta:
    """Write a raw image-text dataset folder atomically: shards, meta.json, labels/clean.npy and
    vocab.json (word counts of the training texts). ``splits`` maps train/query/database to
    iterables of RawSample, consumed once, in id order."""
    from scbch_dist.atomic import atomic_directory

    for s in SPLITS:
        if s not in splits:
            raise ValueError(f"write_raw_dataset: split {s!r} missing")
    words: Counter = Counter()
    train_labels: list[np.ndarray] = []
    with atomic_directory(root) as tmp:
        infos = {}
        for s in SPLITS:
            writer = RawSplitWriter(tmp, s, len(classes), samples_per_shard=samples_per_shard)
            for sample in splits[s]:
                writer.write(sample)
                if s == "train":
                    words.update(text_words(sample.text))
                    train_labels.append(np.asarray(sample.lab, dtype=np.uint8))
            infos[s] = writer.close()
            if infos[s].count == 0:
                raise ValueError(f"write_raw_dataset: split {s!r} has no samples")
        spec = {"img": FieldSpec(dim=0, dtype="bytes", kind="image"), "txt": FieldSpec(dim=0, dtype="utf-8", kind="text")}
        meta = DatasetMeta(name=name, classes=list(classes), fields=spec, splits=infos, layout="sample",
                           block_size=1, source=source or {}, noise_tables=["clean"])
        (tmp / "labels").mkdir()
        atomic_save_npy(tmp / "labels" / "clean.npy", np.stack(train_labels))
        ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))  # by count, then alphabetically
        atomic_write_json(tmp / VOCAB_FILE, {"words": [w for w, _ in ranked], "counts": [c for _, c in ranked]})
        atomic_write_json(meta_path(tmp), meta.to_json())
    return meta


def read_vocab(root: str | Path) -> tuple[list[str], list[int]]:
    """The training-text vocabulary of a raw dataset: words by decreasing count, and the counts."""
    path = dataset_root(root) / VOCAB_FILE
    if not path.is_file():
        raise ShardError(f"{path}: not found (raw datasets written by scbch_dist carry their vocabulary)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid UTF-8 JSON ({e})") from None
    raw = _object(path, "the top level", raw)
    words = _list_of(path, "words", raw.get("words"), str)
    counts = _list_of(path, "counts", raw.get("counts"), int)
    if len(words) != len(counts):
        raise ShardError(f"{path}: {len(words)} words but {len(counts)} counts")
    return list(words), list(counts)
