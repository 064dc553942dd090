"""Config: defaults, YAML, --set overrides, and errors that name the key; each method's settings as
the section of its name; the saved configs of earlier versions migrated."""

from __future__ import annotations

import copy
import pickle
import shutil
from pathlib import Path

import pytest
import yaml

from scbch_dist.config import (Config, ConfigError, flat_dict, load_config, load_run_config, migrate, parse_override,
                               read_run_config, save_config, to_dict)
from scbch_dist.methods import NACDSettings, RSHNLSettings, SCBCHSettings
from scbch_dist.train import DEFAULT_CONFIG

DATA = Path(__file__).parent / "data"
V0_1 = DATA / "config-v0.1.yaml"  # the config.yaml of a run of scbch_dist 0.1: default.yaml, train.epochs=2


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
    cfg = load_config()
    assert (cfg.model.hidden, cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size, cfg.train.epochs) == \
        (8192, 1e-4, 1e-5, 128, 50)
    assert (cfg.scbch.margin, cfg.scbch.shift) == (0.15, 0.8)
    assert (cfg.scbch.bsch_weight, cfg.scbch.quant_weight, cfg.scbch.cscc_weight) == (0.7, 0.3, 1.0)
    assert (cfg.scbch.k, cfg.scbch.gamma, cfg.scbch.warmup_epochs) == (20, 0.5, 5)
    assert cfg.scbch == SCBCHSettings() and isinstance(cfg, Config)
    assert not hasattr(Config(), "scbch")  # the shared sections alone: a method's section is its module's


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
    ("scbch.margin=.nan", "scbch.margin must be a finite number"),
    ("train.lr=.inf", "train.lr must be a finite number"),
    ("bank.knn=annoy", "bank.knn must be one of"),
    ("bank.refresh=sometimes", "bank.refresh must be one of"),
    ("train.optimizer=RMSprop", "train.optimizer must be one of"),
    ("method.name=nacd", None),
    ("scbch.k=0", "^scbch.k must be at least 1, got 0$"),
    ("scbch.gamma=1.5", "^scbch.gamma must be in \\[0, 1\\], got 1.5$"),
    ("scbch.warmup_epochs=-1", "^scbch.warmup_epochs must be >= 0, got -1$"),
    ("method.name=nacd,nacd.mix=1.5", "^nacd.mix must be in"),
    ("method.name=rshnl,rshnl.gamma=0", "^rshnl.gamma must be positive"),
    ("method.name=nacd,nacd.warmup_epochs=-1", "^nacd.warmup_epochs must be >= 0"),
    ("eval.batch_size=0", "^eval.batch_size must be at least 1, got 0$"),  # hung, memory growing
    ("data.shuffle_buffer=0", "^data.shuffle_buffer must be at least 1, got 0$"),
    ("data.workers=-1", "^data.workers must be at least 0, got -1$"),
    ("synthetic.n_train=0", "^synthetic.n_train must be at least 1, got 0$"),
    ("train.lr=0", "^train.lr must be positive"),
])
def test_value_rules_name_the_key(override, message):
    if message is None:  # a valid value
        assert load_config(None, [override]).method.name == "nacd"
        return
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split(","))


def test_free_form_mappings_merge_and_sections_take_mappings(tmp_path):
    path = tmp_path / "vit.yaml"
    path.write_text("model:\n  image:\n    kwargs: {depth: 4, embed_dim: 96}\n")
    cfg = load_config(path, ["model.image.kwargs.depth=2"])
    assert cfg.model.image.kwargs == {"depth": 2, "embed_dim": 96}  # --set keeps the other entries
    assert isinstance(cfg.model.image.kwargs, dict) and cfg.method.name == "scbch"
    with pytest.raises(ConfigError, match="model"):
        load_config(None, ["model=3"])


# ---- each method's settings: the section of its name, defined in its module


def test_the_method_named_by_the_layers_brings_its_section_alone(tmp_path):
    """method.name from the defaults, the file, then each --set (the last wins) picks the schema: the
    shared sections and that method's, with its module's defaults."""
    for name, settings in (("scbch", SCBCHSettings()), ("nacd", NACDSettings()), ("rshnl", RSHNLSettings())):
        cfg = load_config(DEFAULT_CONFIG, [f"method.name={name}"])  # default.yaml keeps SCBCH's section
        tree = to_dict(cfg)
        assert getattr(cfg, name) == (SCBCHSettings(margin=0.15, shift=0.8) if name == "scbch" else settings)
        assert [k for k in tree if k in ("scbch", "nacd", "rshnl")] == [name]
        assert list(tree)[list(tree).index("method") + 1] == name  # right after method, as a file holds it
    cfg = load_config("configs/nacd-flickr.yaml", ["method.name=rshnl", "method.name=scbch", "scbch.k=7"])
    assert cfg.scbch.k == 7 and not hasattr(cfg, "nacd")
    assert load_config(None, ["nacd.k=5", "method.name=nacd"]).nacd.k == 5  # the method is found first
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  name: rshnl\nrshnl:\n  tau: 0.5\nscbch:\n  k: 3\n")
    assert load_config(path).rshnl.tau == 0.5


def test_method_sections_refused_naming_the_key():
    with pytest.raises(ConfigError, match="^nacd.k is a setting of method nacd, and method.name is scbch"):
        load_config(None, ["nacd.k=5"])
    with pytest.raises(ConfigError, match="^scbch.margin is a setting of method scbch, and method.name is nacd"):
        load_config("configs/nacd-flickr.yaml", ["scbch.margin=0.2"])
    with pytest.raises(ConfigError, match=r"^method.name must be one of \[.*'nacd', 'rshnl', 'scbch'\], got 'nope'$"):
        load_config(None, ["method.name=nope"])
    with pytest.raises(ConfigError, match="^unknown config key 'scbch.margn'; known keys here: margin, shift"):
        load_config(None, ["scbch.margn=0.2"])
    with pytest.raises(ConfigError, match="^config key 'nacd.k': expected an integer, got 'many'$"):
        load_config(None, ["method.name=nacd", "nacd.k=many"])


@pytest.mark.parametrize("layer, message", [
    (["loss.margin=0.2"], "^loss.margin moved to scbch.margin$"),
    (["cscc.k=10"], "^cscc.k moved to scbch.k$"),
    ("loss:\n  shift: 1.0\n", r"c\.yaml: loss.shift moved to scbch.shift$"),
    ("cscc:\n  warmup_epochs: 2\n", r"c\.yaml: cscc.warmup_epochs moved to scbch.warmup_epochs$"),
])
def test_the_earlier_spellings_given_by_a_user_name_the_new_key(tmp_path, layer, message):
    path = None
    if isinstance(layer, str):
        path = tmp_path / "c.yaml"
        path.write_text(layer)
        layer = []
    with pytest.raises(ConfigError, match=message):
        load_config(path, layer)


def test_a_config_copies_pickles_saves_and_flattens(tmp_path):
    cfg = load_config(None, ["method.name=nacd", "nacd.k=7"])
    for again in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert again == cfg and type(again) is type(cfg) and again.nacd.k == 7
    other = copy.deepcopy(cfg)
    other.nacd.k = 8
    assert other != cfg  # the method's section takes part in the comparison
    assert flat_dict(cfg)["nacd.k"] == 7 and "scbch.k" not in flat_dict(cfg)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["nacd"]["k"] == 7 and not {"scbch", "rshnl", "loss", "cscc"} & set(saved)
    assert load_run_config(tmp_path / "config.yaml") == cfg


# ---- the saved config of an earlier version


def test_a_saved_config_of_version_0_1_is_migrated_after_its_digest_is_checked(tmp_path):
    """tests/data/config-v0.1.yaml: the config.yaml of an SCBCH run of scbch_dist 0.1 (every method's
    section, SCBCH's as loss.* and cscc.*). It reads back as the settings of that run in this layout."""
    path = tmp_path / "config.yaml"
    shutil.copy(V0_1, path)
    old = yaml.safe_load(V0_1.read_text())
    tree = read_run_config(path)
    assert tree["scbch"] == {**old["loss"], **old["cscc"]}
    assert not {"loss", "cscc", "nacd", "rshnl"} & set(tree)
    assert migrate(tree) == tree  # this version's layout comes back unchanged
    cfg = load_run_config(path, ["train.epochs=20"])
    # 0.1 took Accelerate's precision (""); its runs keep it
    want = load_config(DEFAULT_CONFIG, ["train.epochs=20", "run.dir=/tmp/base/old_partial", "train.mixed_precision="])
    assert cfg == want and to_dict(cfg) == to_dict(want)
    path.write_text(V0_1.read_text().replace("margin: 0.15", "margin: 0.25"))  # edited since: refused, not migrated
    with pytest.raises(ConfigError, match="config.yaml: changed since it was written"):
        read_run_config(path)


def test_migrate_keeps_only_the_section_of_the_method_the_run_used():
    old = yaml.safe_load(V0_1.read_text())
    nacd = migrate({**old, "method": {"name": "nacd"}})
    assert nacd["nacd"] == old["nacd"] and not {"loss", "cscc", "scbch", "rshnl"} & set(nacd)
    rshnl = migrate({**old, "method": {"name": "rshnl"}})
    assert rshnl["rshnl"] == old["rshnl"] and not {"loss", "cscc", "scbch", "nacd"} & set(rshnl)
    assert old["loss"]["margin"] == 0.15  # the tree given is not changed


def test_the_report_reads_an_earlier_config_in_the_new_keys(tmp_path):
    from scbch_dist.experiments.report import _run_config

    shutil.copy(V0_1, tmp_path / "config.yaml")
    flat = _run_config(tmp_path / "config.yaml")
    assert flat["scbch.margin"] == 0.15 and flat["scbch.k"] == 20 and not any(k.startswith("loss.") for k in flat)


def test_yaml_words_for_booleans_stay_words_where_a_string_is_wanted():
    """YAML 1.1 reads no/yes/on/off as booleans; --set train.mixed_precision=no means the word."""
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert parse_override("train.mixed_precision=no") == {"train": {"mixed_precision": "no"}}
    assert load_config(None, ["run.progress=no", "run.tensorboard=off"]).run.progress is False  # boolean keys still
    assert load_config(None, ["run.progress=false"]).run.progress is False
