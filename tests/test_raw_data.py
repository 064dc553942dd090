"""Raw image-text datasets: the embedded shapes dataset, the raw shard round trip, the image-folder
converter and its errors, and corrupt raw shards."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import random_dataset, rewrite_shard
from scbch_dist.config import ShapesConfig
from scbch_dist.data.convert import ConvertError, convert_folder, main
from scbch_dist.data.format import RawSample, ShardError, read_meta, read_vocab, text_words, write_raw_dataset
from scbch_dist.data.pipeline import load_split
from scbch_dist.data.shapes import (CLASSES, COLOUR_RGB, COLOURS, FILLERS, SHAPES, ensure_shapes, generate_samples,
                                    write_shapes)


def tiny_shapes(**overrides) -> ShapesConfig:
    cfg = ShapesConfig(seed=1, n_query=10, n_train=40, n_extra_database=12, samples_per_shard=16)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def read_all(root: Path, split: str) -> dict[str, np.ndarray]:
    return load_split(root, read_meta(root), split)


# ---------------------------------------------------------------------------------------------
# The shapes dataset


def test_shapes_are_deterministic_by_seed():
    a, b = generate_samples(tiny_shapes()), generate_samples(tiny_shapes())
    assert len(a) == 62
    for x, y in zip(a, b):
        assert x.image == y.image and x.text == y.text and np.array_equal(x.lab, y.lab) and x.ext == "png"
    other = generate_samples(tiny_shapes(seed=2))
    assert [x.image for x in a] != [x.image for x in other]
    assert [x.text for x in a] != [x.text for x in other]


def test_shapes_labels_match_the_pixels():
    samples = generate_samples(tiny_shapes(n_train=120))
    protos = np.array([COLOUR_RGB[c] for c in COLOURS], dtype=float)
    k = len(SHAPES)
    for s in samples:
        assert s.lab.shape == (len(CLASSES),) and s.lab[:k].sum() >= 1 and s.lab[k:].sum() >= 1
        px = decode(s.image)
        assert px.shape == (32, 32, 3)
        # saturated pixels, by nearest colour prototype: each labelled colour is there, and the
        # labelled colours own most of them (anti-aliased edges may blend into a neighbour hue)
        flat = px.reshape(-1, 3).astype(float)
        vivid = flat[flat.max(1) - flat.min(1) > 80]
        counts = np.bincount(((vivid[:, None] - protos[None]) ** 2).sum(-1).argmin(1), minlength=len(COLOURS))
        present = s.lab[k:].astype(bool)
        assert counts[present].min() >= 8, (s.text, counts)
        assert counts[present].sum() >= 0.6 * counts.sum(), (s.text, counts)
        # the background is light and grey: the corners are not saturated
        corners = px[[0, 0, -1, -1], [0, -1, 0, -1]].astype(int)
        assert ((corners.max(1) - corners.min(1)) < 60).any()


def test_shapes_captions_name_only_present_classes():
    samples = generate_samples(tiny_shapes(n_train=200))
    for s in samples:
        words = s.text.split()
        assert words and s.text == s.text.lower()
        present = {c for c, v in zip(CLASSES, s.lab) if v}
        assert set(words) <= present | set(FILLERS) | {"a", "an"}, s.text
    said = Counter(w for s in samples for w in set(s.text.split()) if w in CLASSES)
    there = Counter(c for s in samples for c, v in zip(CLASSES, s.lab) if v)
    assert 0.55 < sum(said.values()) / sum(there.values()) < 0.85  # mention_prob 0.7
    everything = generate_samples(tiny_shapes(mention_prob=1.0, distractors=0))
    for s in everything:
        assert set(s.text.split()) - {"a", "an"} == {c for c, v in zip(CLASSES, s.lab) if v}
    nothing = generate_samples(tiny_shapes(mention_prob=0.0, distractors=0))
    assert all(len(s.text.split()) == 1 and s.text in FILLERS for s in nothing)  # never empty


def test_write_shapes_splits_round_trip_and_vocab(tmp_path):
    cfg = tiny_shapes()
    rows = generate_samples(cfg)
    meta = write_shapes(tmp_path / "shapes", cfg)
    assert read_meta(tmp_path / "shapes") == meta
    assert [meta.splits[s].count for s in ("query", "train", "database")] == [10, 40, 52]
    assert meta.splits["train"].shard_counts == [16, 16, 8]
    assert meta.classes == CLASSES and meta.raw and meta.kind("img") == "image" and meta.kind("txt") == "text"
    assert meta.source == {"generator": "scbch_dist.data.shapes", "config": asdict(cfg)}
    expected = {"query": rows[:10], "train": rows[10:50], "database": rows[10:]}
    for split, want in expected.items():
        got = read_all(tmp_path / "shapes", split)
        assert list(got["id"]) == list(range(len(want)))
        assert list(got["img"]) == [r.image for r in want], split
        assert list(got["txt"]) == [r.text for r in want], split
        assert np.array_equal(got["lab"], np.stack([r.lab for r in want])), split
    words, counts = read_vocab(tmp_path / "shapes")
    assert dict(zip(words, counts)) == Counter(w for r in rows[10:50] for w in text_words(r.text))
    assert np.array_equal(np.load(tmp_path / "shapes" / "labels" / "clean.npy"), np.stack([r.lab for r in rows[10:50]]))


def test_ensure_shapes_writes_once_and_refuses_other_settings(tmp_path):
    root = tmp_path / "shapes"
    meta = ensure_shapes(root, tiny_shapes())
    stamp = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    assert ensure_shapes(root, tiny_shapes()) == meta
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamp  # nothing rewritten
    with pytest.raises(ValueError, match=r"other settings.*delete the folder or change data\.root"):
        ensure_shapes(root, tiny_shapes(seed=9))
    random_dataset(tmp_path / "features")
    with pytest.raises(ValueError, match=r"holds the dataset 'random', not the shapes dataset"):
        ensure_shapes(tmp_path / "features", tiny_shapes())


def test_shapes_config_is_checked():
    with pytest.raises(ValueError, match=r"shapes\.max_shapes"):
        generate_samples(tiny_shapes(max_shapes=0))
    with pytest.raises(ValueError, match=r"shapes\.mention_prob"):
        generate_samples(tiny_shapes(mention_prob=1.5))


# ---------------------------------------------------------------------------------------------
# Raw shards written directly


def encoded(fmt: str, seed: int, size=(12, 9)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def raw_samples(n: int, seed: int) -> list[RawSample]:
    rng = np.random.default_rng(seed)
    fmts = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")]
    out = []
    for i in range(n):
        fmt, ext = fmts[i % 3]
        lab = (rng.random(4) < 0.5).astype(np.uint8)
        out.append(RawSample(image=encoded(fmt, seed * 1000 + i), ext=ext,
                             text=f"Sample {i} — ünïcode café, TAGS x{i % 4}", lab=lab))
    return out


def test_raw_round_trip_bytes_texts_labels(tmp_path):
    splits = {"train": raw_samples(9, 1), "query": raw_samples(3, 2), "database": raw_samples(5, 3)}
    meta = write_raw_dataset(tmp_path / "raw", name="raw", classes=list("abcd"), splits=splits, samples_per_shard=4)
    assert meta.splits["train"].shard_counts == [4, 4, 1]
    for split, want in splits.items():
        got = read_all(tmp_path / "raw", split)
        assert list(got["img"]) == [s.image for s in want]
        assert list(got["txt"]) == [s.text for s in want]
        assert np.array_equal(got["lab"], np.stack([s.lab for s in want])) and got["lab"].dtype == np.uint8
    words, counts = read_vocab(tmp_path / "raw")
    assert dict(zip(words, counts)) == Counter(w for s in splits["train"] for w in text_words(s.text))
    assert counts == sorted(counts, reverse=True) and "café" in words and "sample" in words


# ---------------------------------------------------------------------------------------------
# The image-folder converter


def save_image(path: Path, fmt: str, seed: int) -> np.ndarray:
    """Write a small picture in ``fmt``; returns its pixels."""
    rng = np.random.default_rng(seed)
    px = np.repeat(np.repeat(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8), 4, 0), 4, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(px).save(path, format=fmt)
    return px


@pytest.fixture
def folder(tmp_path):
    """Twelve images (PNG, JPEG, BMP) under tmp_path/images, with their records."""
    root = tmp_path / "images"
    records, pixels = [], {}
    kinds = [("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP")]
    names = ["cat", "dog", "sea", "sky"]
    splits = ["query", "train", "train", "database"] * 3
    for i in range(12):
        ext, fmt = kinds[i % 3]
        rel = f"sub{i % 2}/img{i:02d}.{ext}"
        pixels[rel] = save_image(root / rel, fmt, i)
        labels = [names[i % 4]] + ([names[(i + 1) % 4]] if i % 3 == 0 else [])
        records.append({"image": rel, "text": f"picture {i} of a {' and '.join(labels)}", "labels": labels,
                        "split": splits[i]})
    return root, records, pixels


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path: Path, records: list[dict], split: bool = False) -> Path:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "labels"] + (["split"] if split else []))
        for r in records:
            w.writerow([r["image"], r["text"], "|".join(r["labels"])] + ([r["split"]] if split else []))
    return path


def check_rows(out: Path, split: str, records: list[dict], folder_root: Path, pixels: dict, classes: list[str]):
    got = read_all(out, split)
    assert list(got["txt"]) == [r["text"] if isinstance(r["text"], str) else " ".join(r["text"]) for r in records]
    for data, r in zip(got["img"], records):
        if r["image"].endswith(".bmp"):  # re-encoded as PNG, same pixels
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and np.array_equal(decode(data), pixels[r["image"]])
        else:  # stored byte for byte
            assert data == (folder_root / r["image"]).read_bytes()
    want = np.zeros((len(records), len(classes)), dtype=np.uint8)
    for i, r in enumerate(records):
        want[i, [classes.index(c) for c in r["labels"]]] = 1
    assert np.array_equal(got["lab"], want)


def test_folder_jsonl_with_split_field_and_classes_file(tmp_path, folder, capsys):
    root, records, pixels = folder
    records[4]["text"] = ["tag", "list", "Sky"]  # tags: joined with spaces
    ann = write_jsonl(tmp_path / "ann.jsonl", records)
    classes = ["sky", "sea", "dog", "cat", "unused"]
    (tmp_path / "classes.txt").write_text("\n".join(classes[:2]) + "\n\n" + "\n".join(classes[2:]) + "\n")
    out = tmp_path / "out"
    main(["folder", "--images", str(root), "--annotations", str(ann), "--out", str(out),
          "--classes", str(tmp_path / "classes.txt"), "--samples-per-shard", "2"])
    meta = read_meta(out)
    assert meta.classes == classes and meta.raw
    by = {s: [r for r in records if r["split"] == s] for s in ("train", "query", "database")}
    assert [meta.splits[s].count for s in ("query", "train", "database")] == [3, 6, 9]
    check_rows(out, "query", by["query"], root, pixels, classes)
    check_rows(out, "train", by["train"], root, pixels, classes)
    check_rows(out, "database", by["train"] + by["database"], root, pixels, classes)
    members = []
    for name in meta.splits["train"].shards:
        with tarfile.open(out / name) as tar:
            members += tar.getnames()
    assert {n.split(".", 1)[1] for n in members} == {"png", "jpg", "txt", "lab.npy"}
    assert meta.source["kind"] == "folder" and meta.source["skipped"] == 0 and meta.source["split"]["rule"] == "field"
    assert "wrote" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="exists"):
        main(["folder", "--images", str(root), "--annotations", str(ann), "--out", str(out)])


def test_folder_csv_random_split_and_inferred_classes(tmp_path, folder):
    root, records, pixels = folder
    ann = write_csv(tmp_path / "ann.csv", records)
    args = ["--images", str(root), "--annotations", str(ann), "--query", "3", "--database-extra", "2", "--seed", "5"]
    main(["folder", *args, "--out", str(tmp_path / "a")])
    main(["folder", *args, "--out", str(tmp_path / "b")])
    meta = read_meta(tmp_path / "a")
    assert meta.classes == ["cat", "dog", "sea", "sky"]
    assert [meta.splits[s].count for s in ("query", "train", "database")] == [3, 7, 9]
    assert meta.source["split"] == {"rule": "random", "seed": 5, "query": 3, "database_extra": 2,
                                    "database": "train rows, then the database-only rows"}
    got = {s: list(read_all(tmp_path / "a", s)["txt"]) for s in ("query", "train", "database")}
    assert got == {s: list(read_all(tmp_path / "b", s)["txt"]) for s in got}  # same seed, same split
    texts = [r["text"] for r in records]
    assert got["database"][:7] == got["train"] and not set(got["query"]) & set(got["database"])
    assert sorted(got["query"] + got["database"]) == sorted(texts)
    for s in got:  # file order within each part
        for part in (got[s][:7], got[s][7:]) if s == "database" else (got[s],):
            assert part == sorted(part, key=texts.index)
    by_text = {r["text"]: r for r in records}
    check_rows(tmp_path / "a", "database", [by_text[t] for t in got["database"]], root, pixels, meta.classes)
    # other seed, other split; default query count min(2000, 10 %), at least 1
    main(["folder", "--images", str(root), "--annotations", str(ann), "--out", str(tmp_path / "c"), "--seed", "6"])
    other = read_meta(tmp_path / "c")
    assert [other.splits[s].count for s in ("query", "train", "database")] == [1, 11, 11]


def test_folder_bad_images_are_errors_naming_file_line_and_path(tmp_path, folder):
    root, records, _ = folder
    (root / records[2]["image"]).unlink()  # missing (line 3)
    jpg = root / records[4]["image"]
    jpg.write_bytes(jpg.read_bytes()[:-60])  # truncated JPEG (line 5): found by the full decode
    png = root / records[6]["image"]
    png.write_bytes(png.read_bytes()[:40])  # truncated PNG (line 7)
    records[8]["labels"] = []  # no labels (line 9)
    ann = write_jsonl(tmp_path / "ann.jsonl", records)
    with pytest.raises(ConvertError, match=rf"ann\.jsonl: line 3: field 'image': .*{records[2]['image']}: file not found"):
        convert_folder(root, ann, tmp_path / "out")
    (root / records[2]["image"]).write_bytes(b"")  # an empty file: not an image
    with pytest.raises(ConvertError, match=rf"ann\.jsonl: line 3: field 'image': .*img02\.bmp: "
                                           rf"not a readable image"):
        main(["folder", "--images", str(root), "--annotations", str(ann), "--out", str(tmp_path / "out")])
    records[2]["image"] = "sub0/img00.png"  # fine again: the truncated JPEG is next
    ann = write_jsonl(tmp_path / "ann.jsonl", records)
    with pytest.raises(ConvertError, match=rf"ann\.jsonl: line 5: field 'image': .*img04\.jpg: not a readable image "
                                           rf"\(OSError: image file is truncated"):
        convert_folder(root, ann, tmp_path / "out", workers=3)
    assert not (tmp_path / "out").exists()
    meta = convert_folder(root, ann, tmp_path / "out", skip_bad=True, workers=3)
    assert meta.source["skipped"] == 3
    examples = meta.source["skipped_examples"]
    assert [e.split(": field")[0].rsplit(": ", 1)[1] for e in examples] == ["line 5", "line 7", "line 9"]
    assert "img06.png: not a readable image" in examples[1] and "field 'labels': no labels" in examples[2]
    assert sum(meta.splits[s].count for s in ("query", "database")) == 9


def test_folder_annotation_errors(tmp_path, folder):
    root, records, _ = folder
    (tmp_path / "classes.txt").write_text("cat\ndog\nsea\n")
    ann = write_csv(tmp_path / "ann.csv", records, split=True)
    with pytest.raises(ConvertError, match=r"ann\.csv: line 5: field 'labels': unknown class 'sky' \(not in .*classes\.txt"):
        convert_folder(root, ann, tmp_path / "out", classes_file=tmp_path / "classes.txt")
    with pytest.raises(ConvertError, match=r"split field; --query and --database-extra apply to the random split"):
        convert_folder(root, ann, tmp_path / "out", query=2)
    records[1]["split"] = "val"
    with pytest.raises(ConvertError, match=r"ann\.csv: line 3: field 'split' is 'val', expected one of train"):
        convert_folder(root, write_csv(tmp_path / "ann.csv", records, split=True), tmp_path / "out")
    del records[5]["split"]
    records[1]["split"] = "train"
    with pytest.raises(ConvertError, match=r"ann\.jsonl: line 6: missing field 'split' \(other records have one\)"):
        convert_folder(root, write_jsonl(tmp_path / "ann.jsonl", records), tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ConvertError, match=r"bad\.jsonl: line 2: not valid JSON"):
        convert_folder(root, tmp_path / "bad.jsonl", tmp_path / "out")
    (tmp_path / "bad.csv").write_text("image,caption,labels\nx.png,hi,cat\n")
    with pytest.raises(ConvertError, match=r"bad\.csv: line 1: the header has no column 'text'"):
        convert_folder(root, tmp_path / "bad.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Corrupt raw shards: errors name the shard, the sample key and the field


@pytest.fixture
def raw_root(tmp_path):
    root = tmp_path / "raw"
    write_raw_dataset(root, name="raw", classes=list("abcd"), samples_per_shard=4,
                      splits={"train": raw_samples(6, 1), "query": raw_samples(2, 2), "database": raw_samples(6, 1)})
    return root


def test_malformed_label_member(raw_root):
    rewrite_shard(raw_root / "train-000000.tar", lambda n, d: d[:20] if n == "000000002.lab.npy" else d)
    with pytest.raises(ShardError, match=r"train-000000\.tar: sample 000000002: field 'lab\.npy' is not a readable \.npy"):
        read_all(raw_root, "train")


def test_missing_image_member(raw_root):
    rewrite_shard(raw_root / "train-000001.tar", lambda n, d: None if n == "000000004.jpg" else d)
    with pytest.raises(ShardError, match=r"train-000001\.tar: sample 000000004: expected exactly one image field .* "
                                         r"found none"):
        read_all(raw_root, "train")


def test_label_member_of_wrong_width(raw_root):
    buf = io.BytesIO()
    np.save(buf, np.ones(5, np.uint8))
    rewrite_shard(raw_root / "query-000000.tar", lambda n, d: buf.getvalue() if n == "000000001.lab.npy" else d)
    with pytest.raises(ShardError, match=r"query-000000\.tar: sample 000000001: field 'lab\.npy' has shape \(5,\)"):
        read_all(raw_root, "query")
