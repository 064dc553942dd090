"""Config: defaults, YAML, --set overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from scbch_dist.config import Config, ConfigError, load_config, parse_override
from scbch_dist.train import DEFAULT_CONFIG


def test_issue_keys_exist_and_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  bits: 32\ntrain:\n  lr: 0.001\n")
    cfg = load_config(path, ["data.root=/x", "data.noise=mixed:0.2", "data.noise_seed=3", "model.hidden=256",
                             "train.epochs=7", "train.batch_size=64", "train.lr=1e-4", "eval.every=2",
                             "run.dir=runs/x", "eval.topk=[100, 500]"])
    assert (cfg.data.root, cfg.data.noise, cfg.data.noise_seed) == ("/x", "mixed:0.2", 3)
    assert (cfg.model.bits, cfg.model.hidden) == (32, 256)  # YAML, then --set
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (7, 64, 1e-4)
    assert (cfg.eval.every, cfg.run.dir, cfg.eval.topk) == (2, "runs/x", [100, 500])


def test_paper_defaults():
    cfg = Config()
    assert (cfg.model.hidden, cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.epochs) == \
        (8192, 1e-4, 1e-5, 128, 50)
    assert (cfg.loss.bsch_weight, cfg.loss.quant_weight, cfg.loss.cscc_weight) == (0.7, 0.3, 1.0)
    assert (cfg.cscc.k, cfg.cscc.gamma, cfg.cscc.warmup_epochs) == (20, 0.5, 5)


def test_default_yaml_is_the_embedded_dataset():
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.data.generate == "synthetic" and cfg.data.noise == "mixed:0.5"


def test_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.bitz'"):
        load_config(None, ["model.bitz=3"])
    with pytest.raises(ConfigError, match="'train.epochs': expected an integer"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="'run.progress': expected true/false, got 'maybe'"):
        load_config(None, ["run.progress=maybe"])
    with pytest.raises(ConfigError, match=r"'eval.topk\[1\]': expected an integer"):
        load_config(None, ["eval.topk=[10, ten]"])
    with pytest.raises(ConfigError, match="'eval.topk': expected a list"):
        load_config(None, ["eval.topk=10"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("model.bits")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'model\.width'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="batch_size must be at least 2"):
        load_config(None, ["train.batch_size=1"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  bits: [32\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)


@pytest.mark.parametrize("override, message", [
    ("loss.margin=.nan", "loss.margin must be a finite number"),
    ("train.lr=.inf", "train.lr must be a finite number"),
    ("bank.knn=annoy", "bank.knn must be one of"),
    ("bank.refresh=sometimes", "bank.refresh must be one of"),
    ("train.optimizer=RMSprop", "train.optimizer must be one of"),
    ("method.name=nacd", None),
    ("nacd.mix=1.5", "nacd.mix must be in"),
    ("rshnl.gamma=0", "rshnl.gamma must be positive"),
    ("nacd.warmup_epochs=-1", "nacd.warmup_epochs must be >= 0"),
    ("eval.batch_size=0", "^eval.batch_size must be at least 1, got 0$"),  # hung, memory growing
    ("data.shuffle_buffer=0", "^data.shuffle_buffer must be at least 1, got 0$"),
    ("data.workers=-1", "^data.workers must be at least 0, got -1$"),
    ("synthetic.n_train=0", "^synthetic.n_train must be at least 1, got 0$"),
    ("train.lr=0", "^train.lr must be positive"),
])
def test_value_rules_name_the_key(override, message):
    if message is None:  # a valid value (checked against the registry later, before any data is read)
        assert load_config(None, [override]).method.name == "nacd"
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_free_form_mappings_merge_and_sections_take_mappings(tmp_path):
    path = tmp_path / "vit.yaml"
    path.write_text("model:\n  image:\n    kwargs: {depth: 4, embed_dim: 96}\n")
    cfg = load_config(path, ["model.image.kwargs.depth=2"])
    assert cfg.model.image.kwargs == {"depth": 2, "embed_dim": 96}  # --set keeps the other entries
    assert isinstance(cfg.model.image.kwargs, dict) and cfg.method.name == "scbch"
    with pytest.raises(ConfigError, match="model"):
        load_config(None, ["model=3"])
