"""CLIP backbones (models/clip.py, docs/finetuning.md "CLIP"): tiny random models of open_clip and
transformers written offline, loaded back through the config, equal to the library's own
embeddings; locked groups stay bit-identical under training; bad settings are one-line errors;
a CLIP run trains on 1 and 2 processes alike, learns and is searched by caption."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from conftest import REPO, one_line_exit, torchrun  # noqa: E402
from scbch_dist.config import ConfigError, load_config  # noqa: E402
from scbch_dist.data.shapes import ShapesConfig, write_shapes  # noqa: E402
from scbch_dist.engine.setup import make_optimizer  # noqa: E402
from scbch_dist.models import WeightsError, build_model  # noqa: E402
from scbch_dist.models.clip import OPENAI_MEAN, OPENAI_STD, build_clip_towers, write_tiny  # noqa: E402
from scbch_dist.models.tokenizers import clip_tokenizer  # noqa: E402
from scbch_dist.train import main  # noqa: E402

LIBRARIES = ("open_clip", "transformers")
CAPTIONS = ["a red circle", "two blue squares and a green triangle", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random CLIP of each library, in its local layout."""
    base = tmp_path_factory.mktemp("clip")
    return {library: write_tiny(base / library, library) for library in LIBRARIES}


def clip_settings(weights, *extra: str):
    return load_config(None, ["model.image.kind=clip", "model.text.kind=clip", "model.image.image_size=32",
                              f"model.clip.weights={weights}", "model.bits=16", "model.hidden=32", *extra])


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalised(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def test_both_libraries_tokenize_captions_alike(tiny):
    """The transformers tokenizer of the tiny model is CLIP's own byte pairs: the same ids as open_clip's."""
    ids = {lib: clip_tokenizer(clip_settings(tiny[lib]).model.clip)(CAPTIONS) for lib in LIBRARIES}
    open_ids, open_mask = ids["open_clip"]
    hf_ids, hf_mask = ids["transformers"]
    assert open_ids.shape == hf_ids.shape == (3, 32)
    assert np.array_equal(open_mask, hf_mask) and open_mask.sum(1).tolist() == [5, 9, 2]  # start, words, end
    assert np.array_equal(np.where(open_mask == 1, open_ids, 0), np.where(hf_mask == 1, hf_ids, 0))
    assert open_ids[0, 0] == 49406 and open_ids[0, 4] == 49407  # start and end of text


def test_open_clip_towers_are_the_models_own_embeddings(tiny):
    import open_clip

    reference = open_clip.create_model(f"local-dir:{tiny['open_clip']}").eval()
    towers = build_clip_towers(clip_settings(tiny["open_clip"]).model.clip)
    ids, mask = clip_tokenizer(clip_settings(tiny["open_clip"]).model.clip)(CAPTIONS)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(towers.image.eval()(x), reference.encode_image(normalised(x)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(towers.text.eval()(torch.from_numpy(ids), torch.from_numpy(mask)),
                                   reference.encode_text(torch.from_numpy(ids)), rtol=1e-5, atol=1e-6)
    assert (towers.image_size, towers.context_length, towers.image.out_dim, towers.text.out_dim) == (32, 32, 64, 64)
    assert not any("logit" in name for name, _ in towers.text.named_parameters())  # no parameter without a gradient


def test_transformers_towers_are_the_models_own_embeddings(tiny):
    import transformers

    reference = transformers.CLIPModel.from_pretrained(str(tiny["transformers"]), local_files_only=True).eval()
    settings = clip_settings(tiny["transformers"]).model.clip
    towers = build_clip_towers(settings)
    ids, mask = clip_tokenizer(settings)(CAPTIONS)
    x = images()
    with torch.no_grad():
        image_ref = reference.visual_projection(reference.vision_model(pixel_values=normalised(x)).pooler_output)
        text_out = reference.text_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        text_ref = reference.text_projection(text_out.pooler_output)
        torch.testing.assert_close(towers.image.eval()(x), image_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(towers.text.eval()(torch.from_numpy(ids), torch.from_numpy(mask)), text_ref,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("library", LIBRARIES)
def test_locked_groups_stay_bit_identical_and_the_rest_moves(tiny, library):
    """image_unlocked_groups=1 trains the image tower's last group (its projection) only;
    text_unlocked_layers=0 freezes the text tower: after three steps those parameters are
    unchanged to the bit, the unlocked ones and the heads have moved."""
    cfg = clip_settings(tiny[library], "model.clip.image_unlocked_groups=1", "model.clip.text_unlocked_layers=0",
                        "train.backbone_lr=1e-2")
    model = build_model(cfg.model, None)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    ids, mask = clip_tokenizer(cfg.model.clip)(CAPTIONS)
    for step in range(3):
        out = model(images(seed=step), torch.from_numpy(ids), torch.from_numpy(mask))
        loss = -(out["h_img"] * out["h_txt"]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    moved = {k for k in trainable if not torch.equal(before[k], after[k])}
    assert any(k.startswith("img_backbone") for k in moved) and not any(k.startswith("txt_backbone") for k in trainable)
    assert any(k.startswith("img_head") for k in moved) and any(k.startswith("txt_head") for k in moved)
    image_trainable = [k for k in trainable if k.startswith("img_backbone")]
    # the projection only: open_clip's a parameter, transformers' a bias-free linear layer
    assert len(image_trainable) == 1, image_trainable


def test_bad_clip_settings_are_one_line_errors(tiny, tmp_path):
    checkpoint = next(tiny["open_clip"].glob("*.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "open_clip_config.json").write_text((tiny["open_clip"] / "open_clip_config.json").read_text())
    cases = {
        ("model.clip.weights=",): "model.clip.weights is empty",
        (f"model.clip.weights={tmp_path / 'missing'}",): f"model.clip.weights: {tmp_path / 'missing'} does not exist",
        (f"model.clip.weights={empty}",): "is neither an open_clip model directory",
        (f"model.clip.weights={config_only}",): "has open_clip_config.json but no weights file",
        (f"model.clip.weights={checkpoint}",): "is a checkpoint file; model.clip.name must name",
        (f"model.clip.weights={checkpoint}", "model.clip.name=ViT-B-32"): "does not fit open_clip model 'ViT-B-32'",
        ("model.clip.weights=random", "model.clip.name=ViT-Nope"): "model.clip.name='ViT-Nope' is neither",
        ("model.clip.weights=random", "model.clip.name=ViT-B-16-SigLIP"): "from the Hugging Face hub",
        (f"model.clip.weights={tiny['open_clip']}", "model.image.image_size=224"):
            "model.image.image_size=224, but the CLIP model of model.clip takes 32-pixel images",
        (f"model.clip.weights={tiny['transformers']}", "model.clip.image_unlocked_groups=9"):
            "model.clip.image_unlocked_groups=9, but this tower has 4 groups",
        ("model.clip.text_unlocked_layers=5",): "model.clip.text_unlocked_layers=5, but this tower has 4 groups",
    }
    for sets, message in cases.items():
        with pytest.raises(WeightsError) as raised:
            build_model(clip_settings(tiny["open_clip"], *sets).model, None)  # the later --set wins
        text = str(raised.value)
        assert message in text and "\n" not in text, (sets, text)


def test_unpaired_clip_kinds_and_bad_lock_counts_are_config_errors():
    with pytest.raises(ConfigError, match="model.image.kind=clip with model.text.kind=bert: a CLIP model is a pair"):
        load_config(None, ["model.image.kind=clip", "model.text.kind=bert"])
    with pytest.raises(ConfigError, match="model.clip.text_unlocked_layers must be -1"):
        load_config(None, ["model.clip.text_unlocked_layers=-2"])
    with pytest.raises(ConfigError, match=r"train.layer_decay must be in \(0, 1\]"):
        load_config(None, ["train.layer_decay=1.5"])


def test_the_tiny_model_command_writes_a_whole_folder_once(tmp_path, capsys):
    from scbch_dist.models.clip import main as clip_main

    clip_main(["tiny", str(tmp_path / "m")])
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert not list(tmp_path.glob(".m.partial-*"))
    assert json.loads((tmp_path / "m" / "open_clip_config.json").read_text())["model_cfg"]["embed_dim"] == 64
    assert one_line_exit(capsys, clip_main, ["tiny", str(tmp_path / "m")]) == \
        f"{tmp_path / 'm'} exists and is not empty; the tiny model is written to a new folder"


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("library", LIBRARIES)
def test_two_processes_step_like_one_process(tiny, library, tmp_path):
    """Three steps of SCBCH on a fine-tuned tiny CLIP: 2 processes x 8 rows equal 1 x 16 (float64)."""
    import subprocess

    script = REPO / "tests" / "dist_scripts" / "clip_steps.py"
    proc = subprocess.run([sys.executable, str(script), str(tiny[library]), str(tmp_path / "one.pt")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    torchrun(str(script), str(tiny[library]), str(tmp_path / "two.pt"))
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    torch.testing.assert_close(one["losses"], two["losses"], rtol=0, atol=1e-10)
    for k in one["params"]:
        torch.testing.assert_close(one["params"][k], two["params"][k], rtol=0, atol=1e-6, msg=k)
    backbone = [k for k in one["params"] if "backbone" in k]
    assert max(float((one["params"][k] - one["initial"][k]).abs().max()) for k in backbone) > 1e-4


@pytest.fixture(scope="module")
def small_shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "shapes"
    write_shapes(root, ShapesConfig(n_train=640, n_query=64, n_extra_database=64, samples_per_shard=160))
    return root


def clip_train(root: Path, run_dir: Path, weights: Path, *extra: str) -> dict:
    """configs/clip-tiny.yaml, shortened, on the small shapes dataset."""
    sets = [f"data.root={root}", "data.generate=", f"model.clip.weights={weights}", f"run.dir={run_dir}",
            "train.epochs=8", "eval.every=4", "train.batch_size=32", "scbch.warmup_epochs=2", "scbch.k=10",
            "run.progress=false", "run.tensorboard=false", *extra]
    return main(["--config", str(REPO / "configs" / "clip-tiny.yaml"), *[a for s in sets for a in ("--set", s)]])


@pytest.fixture(scope="module")
def clip_run(tiny, small_shapes, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "clip"
    return run_dir, clip_train(small_shapes, run_dir, tiny["open_clip"])


@pytest.mark.slow
def test_memory_refresh_bf16_checkpointing_decay_and_locks_run_with_clip(tiny, small_shapes, tmp_path):
    """The fine-tuning switches together on transformers' tiny CLIP: the memory refresh, bf16
    autocast, gradient checkpointing in both towers, layer-wise decay, a half-locked image tower."""
    run_dir = tmp_path / "run"
    summary = clip_train(small_shapes, run_dir, tiny["transformers"], "train.epochs=3", "eval.every=3",
                         "bank.refresh=memory", "train.mixed_precision=bf16", "model.image.grad_checkpointing=true",
                         "model.text.grad_checkpointing=true", "train.layer_decay=0.7",
                         "model.clip.image_unlocked_groups=2")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["cscc_weights"]["source"] == "memory"
    assert all(np.isfinite(list(r["loss"].values())).all() for r in records)
    assert "precision bf16" in (run_dir / "log.txt").read_text()
    assert 0 < summary["final"]["avg_map"] <= 1


def assert_search_replays_stored_codes(run_dir: Path, rows: tuple[int, ...]):
    """Index the run; stored query captions and images, encoded again by search, give their stored
    codes. Returns the Searcher."""
    from scbch_dist.retrieval.index import RunCodes, build
    from scbch_dist.retrieval.search import Searcher

    build(run_dir, log=lambda *_: None)
    searcher = Searcher(run_dir)
    codes = RunCodes.load(run_dir).codes
    for i in rows:
        np.testing.assert_array_equal(searcher.encoder.encode_text(searcher.items.caption("query", i))[0],
                                      codes["query_txt"][i])
        np.testing.assert_array_equal(searcher.encoder.encode_image(searcher.items.image("query", i)[0])[0],
                                      codes["query_img"][i])
    return searcher


@pytest.mark.slow
def test_a_clip_run_learns_and_is_searched_by_caption(clip_run):
    """Above chance; a stored caption or image, typed or uploaded again, is encoded by search
    exactly as the run encoded it (the model's own tokenizer and normalisation replayed); the
    server answers a caption and an uploaded image from the CLIP run."""
    pytest.importorskip("faiss")

    run_dir, summary = clip_run
    assert summary["final"]["avg_map"] > summary["chance_map"] + 0.05, (summary["final"], summary["chance_map"])
    searcher = assert_search_replays_stored_codes(run_dir, (0, 9))
    result = searcher.search_text("a red circle", k=5)
    assert len(result.hits) == 5 and all(h.image for h in result.hits)

    # the server answers from the same searcher: a caption, and a stored image uploaded again
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the dev extra)")
    from fastapi.testclient import TestClient

    from scbch_dist.retrieval.serve import create_app

    with TestClient(create_app(searcher, k=5), base_url="http://localhost") as client:
        body = client.get("/api/search", params={"text": "a red circle"}).json()
        assert [h["id"] for h in body["hits"]] == [h.id for h in result.hits] and body["encode_ms"] > 0
        png = client.get(f"/api/image/{result.hits[0].id}").content
        body = client.post("/api/search/image", params={"k": 3, "name": "hit.png"}, content=png).json()
        assert body["modality"] == "img" and len(body["hits"]) == 3 and body["encode_ms"] > 0


@pytest.mark.parametrize("unlocked", [0, 1, 2, 3, 4])
def test_the_grouping_is_open_clips_lock(tiny, unlocked):
    """tower_groups (which locks transformers' towers and sets the layer-wise decay) unlocks
    exactly what open_clip's own lock_image_tower and lock_text_tower unlock, tower by tower."""
    import open_clip

    from scbch_dist.models.clip import _unlock_last, tower_groups

    theirs = open_clip.create_model(f"local-dir:{tiny['open_clip']}")
    theirs.lock_image_tower(unlocked_groups=unlocked)
    theirs.lock_text_tower(unlocked_layers=unlocked)
    ours = open_clip.create_model(f"local-dir:{tiny['open_clip']}")
    _unlock_last(tower_groups(ours.visual), unlocked)
    text_groups = tower_groups(ours)  # the CLIP model holds its text tower's parts itself
    _unlock_last(text_groups, unlocked)
    want = {k: p.requires_grad for k, p in theirs.named_parameters() if not k.startswith("logit")}
    got = {k: p.requires_grad for k, p in ours.named_parameters() if not k.startswith("logit")}
    assert got == want
    assert len(text_groups) == len(tower_groups(ours.visual)) == 4  # embeddings, block 0, block 1 + norm, projection


@pytest.mark.parametrize("library", LIBRARIES)
def test_layer_wise_decay_gives_each_layer_its_rate(tiny, library):
    """train.layer_decay=0.5: the projection at backbone_lr, each group below at half the rate of
    the one above, every trainable parameter in exactly one optimizer group."""
    cfg = clip_settings(tiny[library], "train.layer_decay=0.5", "train.backbone_lr=1e-3", "model.clip.text_unlocked_layers=2")
    model = build_model(cfg.model, None)
    groups = model.param_groups(cfg.train.lr, cfg.train.backbone_lr, cfg.train.layer_decay)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates["heads"] == cfg.train.lr
    assert [rates[f"img_backbone_layer_{i}"] for i in range(4)] == [1e-3 * 0.5 ** (3 - i) for i in range(4)]
    assert [rates.get(f"txt_backbone_layer_{i}") for i in range(4)] == [None, None, 1e-3 * 0.5, 1e-3]  # two locked
    assert "backbones" not in rates  # every backbone parameter is in a layer
    assert [g["name"] for g in model.param_groups(1e-3, 1e-4)] == ["heads", "backbones"]  # no decay: one group


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("image, text", [(True, False), (False, True)])
def test_gradient_checkpointing_recomputes_the_chosen_tower_with_the_same_gradients(tiny, library, image, text):
    """With checkpointing a tower's blocks run forward again in the backward pass (counted in its
    first block), the other tower's do not, and the gradients are those without it."""
    from scbch_dist.models.clip import tower_groups

    def step(checkpointing: tuple[bool, bool]):
        cfg = clip_settings(tiny[library], f"model.image.grad_checkpointing={checkpointing[0]}",
                            f"model.text.grad_checkpointing={checkpointing[1]}")
        torch.manual_seed(0)
        model = build_model(cfg.model, None).train()  # transformers loads in eval mode; checkpointing is for training
        img_net, txt_net = model.img_backbone.net, model.txt_backbone.net
        firsts = {"img": tower_groups(img_net, getattr(model.img_backbone, "projection", None))[1],
                  "txt": tower_groups(txt_net, getattr(model.txt_backbone, "projection", None))[1]}
        calls = {"img": 0, "txt": 0}
        # counted in the block's MLP: forward hooks do not fire in checkpoint's recomputation, and
        # transformers' layers recompute their class's forward, past one set on the instance
        for name, block in firsts.items():
            def counted(*args, name=name, forward=block.mlp.forward, **kwargs):
                calls[name] += 1
                return forward(*args, **kwargs)

            block.mlp.forward = counted
        ids, mask = clip_tokenizer(cfg.model.clip)(CAPTIONS)
        out = model(images(), torch.from_numpy(ids), torch.from_numpy(mask))
        (out["h_img"] * out["h_txt"]).sum().backward()
        return calls, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain_calls, plain_grads = step((False, False))
    calls, grads = step((image, text))
    assert plain_calls == {"img": 1, "txt": 1}
    assert calls == {"img": 2 if image else 1, "txt": 2 if text else 1}
    assert grads.keys() == plain_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], plain_grads[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_clip_features_extract_train_and_are_replayed_by_search(tiny, small_shapes, tmp_path):
    """The clip recipe of extraction: both towers' embeddings as feature shards (the model's own
    preprocessing), a feature run trains on them, and search encodes a stored caption and image
    again to their stored codes."""
    pytest.importorskip("faiss")
    from scbch_dist.data.format import read_meta
    from scbch_dist.data.pipeline import load_split
    from scbch_dist.extract import extract
    from scbch_dist.models.encoders import ClipFeatures, ExtractError
    from scbch_dist.retrieval.query import DatasetItems

    with pytest.raises(ExtractError, match="the clip encoders need --clip-weights"):
        extract(small_shapes, tmp_path / "x", image_encoder="clip", text_encoder="bow")
    with pytest.raises(ExtractError, match="--clip-weights applies to"):
        extract(small_shapes, tmp_path / "x", image_encoder="vgg19", vgg_weights="random", text_encoder="bow",
                clip_weights=str(tiny["open_clip"]))
    with pytest.raises(ExtractError, match=r"^--clip-weights: .*missing does not exist"):
        extract(small_shapes, tmp_path / "x", image_encoder="clip", text_encoder="clip",
                clip_weights=str(tmp_path / "missing"))
    assert not (tmp_path / "x").exists()
    out = tmp_path / "clip-features"
    meta = extract(small_shapes, out, image_encoder="clip", text_encoder="clip", clip_weights=str(tiny["open_clip"]),
                   img_dtype="float32", txt_dtype="float32", workers=0, progress=False)
    assert (meta.dim("img"), meta.dim("txt")) == (64, 64)
    image, text = meta.source["image"], meta.source["text"]
    assert image["encoder"] == text["encoder"] == "clip" and image["weights_sha256"] == text["weights_sha256"]
    assert (image["image_size"], image["resize_shorter_side"], image["interpolation"]) == (32, 32, "bicubic")
    # the stored text features are the model's embeddings of the captions
    items = DatasetItems(out, read_meta(out))
    clip = ClipFeatures(str(tiny["open_clip"]))
    captions = [items.caption("query", i) for i in range(4)]
    stored = load_split(out, meta, "query")
    np.testing.assert_allclose(stored["txt"][:4], clip.encode(captions), rtol=1e-5, atol=1e-6)

    run_dir = tmp_path / "run"
    main(["--set", f"data.root={out}", "--set", "data.generate=", "--set", f"run.dir={run_dir}", "--set", "model.bits=16",
          "--set", "model.hidden=64", "--set", "train.epochs=3", "--set", "eval.every=3", "--set", "scbch.k=10",
          "--set", "scbch.warmup_epochs=1", "--set", "train.batch_size=64", "--set", "run.progress=false",
          "--set", "run.tensorboard=false"])
    assert_search_replays_stored_codes(run_dir, (0, 5))


def test_clip_loss_by_hand():
    """The symmetric InfoNCE against a float64 loop over rows and columns."""
    from scbch_dist.models.clip_pretrain import clip_loss

    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    scale = torch.tensor(np.log(10.0), dtype=torch.float64)
    logits = [[10.0 * float(image[i] @ text[j]) for j in range(5)] for i in range(5)]
    rows = [-logits[i][i] + np.log(sum(np.exp(v) for v in logits[i])) for i in range(5)]
    cols = [-logits[j][j] + np.log(sum(np.exp(logits[i][j]) for i in range(5))) for j in range(5)]
    assert float(clip_loss(image, text, scale)) == pytest.approx((np.mean(rows) + np.mean(cols)) / 2, rel=1e-12)


@pytest.mark.slow
def test_contrastive_pretraining_beats_random_initialisation(tiny, small_shapes, tmp_path):
    """The tiny CLIP pretrained on the training captions (no labels), then hashed with SCBCH under
    mixed noise 0.5 for 4 epochs, against the same CLIP from its random initialisation."""
    from scbch_dist.models.clip_pretrain import main as pretrain_main

    pretrain_main(["--data", str(small_shapes), "--init", str(tiny["open_clip"]), "--out", str(tmp_path / "pre"),
                   "--epochs", "20", "--batch-size", "64"])
    short = ("train.epochs=4", "eval.every=4")
    pretrained = clip_train(small_shapes, tmp_path / "a", tmp_path / "pre", *short)["final"]["avg_map"]
    random = clip_train(small_shapes, tmp_path / "b", tiny["open_clip"], *short)["final"]["avg_map"]
    assert pretrained > random + 0.03, (pretrained, random)


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_clip_model_held_in_bf16_takes_uint8_images_and_token_ids(tiny, library):
    """DeepSpeed bf16 casts the weights themselves and does not autocast: the CLIP towers follow,
    and the codes still leave the hash heads in float32 (docs/engine.md, "Precision")."""
    cfg = clip_settings(tiny[library])
    model = build_model(cfg.model, None).to(torch.bfloat16)
    ids, mask = clip_tokenizer(cfg.model.clip)(CAPTIONS)
    out = model(images(), torch.from_numpy(ids), torch.from_numpy(mask))
    assert model.img_head.mlp[0].weight.dtype == torch.bfloat16
    assert out["h_img"].dtype == out["h_txt"].dtype == torch.float32
    assert all(torch.isfinite(v.float()).all() for v in out.values())


@pytest.mark.parametrize("library", LIBRARIES)
def test_pooled_clip_features_are_the_projected_ones_before_their_projection(tiny, library):
    """extract --clip-features pooled: each tower's features before its projection; applying the
    model's projection to them gives the projected (default) features."""
    from scbch_dist.models.encoders import ClipFeatures, ExtractError

    projected, pooled = ClipFeatures(str(tiny[library])), ClipFeatures(str(tiny[library]), features="pooled")
    x = normalised(images())
    with torch.no_grad():
        a, b = projected.image_net(x), pooled.image_net(x)
        if library == "open_clip":
            image_proj = lambda v: v @ projected.image_net.backbone.net.proj  # noqa: E731
            text_proj = lambda v: v @ projected.text_net.net.text_projection  # noqa: E731
        else:
            image_proj, text_proj = projected.image_net.backbone.projection, projected.text_net.projection
        torch.testing.assert_close(image_proj(b), a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text_proj(torch.from_numpy(pooled.encode(CAPTIONS))),
                                   torch.from_numpy(projected.encode(CAPTIONS)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, b)  # the projection is not the identity
    assert (pooled.provenance["features"], projected.provenance["features"]) == ("pooled", "projected")
    with pytest.raises(ExtractError, match="--clip-features must be one of"):
        ClipFeatures(str(tiny[library]), features="hidden")


def test_a_missing_open_clip_package_is_named(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip raises ImportError
    with pytest.raises(WeightsError, match=r"needs open-clip-torch \(pip install 'scbch_dist\[finetune\]'\)"):
        build_model(clip_settings(tiny["open_clip"]).model, None)


@pytest.mark.slow
def test_training_with_bad_clip_weights_exits_2_before_the_first_step(small_shapes, tmp_path, capsys):
    run_dir = tmp_path / "run"
    sets = [f"data.root={small_shapes}", "data.generate=", f"run.dir={run_dir}",
            f"model.clip.weights={tmp_path / 'nowhere'}"]
    line = one_line_exit(capsys, main, ["--config", str(REPO / "configs" / "clip-tiny.yaml"),
                                        *[a for s in sets for a in ("--set", s)]])
    assert line.startswith(f"model.clip.weights: {tmp_path / 'nowhere'} does not exist"), line
    assert not (run_dir / "metrics.jsonl").exists()
