"""The method interface: a method written outside the package (tests/toy_method.py: SCBCH's
contrastive and quantisation terms, a per-id table updated after every batch, an epoch-end hook
reading the bank) trains through the engine unchanged, on one process, resumed, and on two."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import toy_method  # noqa: F401  (registers contrast_only)
from conftest import crash_in_epoch, read_checkpoint, tiny_args, tiny_synthetic_config, torchrun
from scbch_dist.data.synthetic import write_synthetic
from scbch_dist.experiments import report
from scbch_dist.config import ConfigError
from scbch_dist.methods import METHODS, SCBCH, get_method
from scbch_dist.train import main

SCRIPTS = Path(__file__).parent / "dist_scripts"
TOY = ("method.name=contrast_only", "run.method=ContrastOnly", "run.tensorboard=false")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_registry():
    assert get_method("scbch") is SCBCH and METHODS["contrast_only"].terms == ("total", "bsch", "quant")
    with pytest.raises(ConfigError, match="method.name must be one of"):
        get_method("nope")


def test_an_unknown_method_is_refused_naming_the_key(tiny_dataset, tmp_path):
    with pytest.raises(ConfigError, match="method.name must be one of .*'scbch'.*got 'nope'"):
        main(tiny_args(tiny_dataset, tmp_path / "r", "method.name=nope", "train.epochs=1"))


# A whole method as a user writes it: one module with its settings (the section ``plain_bsch.*``),
# their rule and its loss. Nothing of the package changes for it.
NEW_METHOD = """
from dataclasses import dataclass

from scbch_dist.errors import ConfigError
from scbch_dist.losses import bsch_loss, quantization_loss
from scbch_dist.methods import Method, global_batch_of, register


@dataclass
class PlainSettings:
    margin: float = 0.15  # BSCH margin
    quant_weight: float = 0.3


@register
class PlainBSCH(Method):
    name = "plain_bsch"
    terms = ("total", "bsch", "quant")
    settings_type = PlainSettings

    @classmethod
    def check_settings(cls, settings):
        if settings.quant_weight < 0:
            raise ConfigError(f"plain_bsch.quant_weight must be >= 0, got {settings.quant_weight}")

    def loss(self, out, step):
        cols = global_batch_of(out["h_img"], out["h_txt"], step.labels)
        n = cols.h_img.shape[0] if cols is not None else None
        bsch = bsch_loss(out["h_img"], out["h_txt"], step.labels, margin=self.settings.margin, shift=0.8, columns=cols)
        quant = quantization_loss(out["h_img"], out["h_txt"], n_total=n)
        return {"total": bsch + self.settings.quant_weight * quant, "bsch": bsch, "quant": quant}
"""


@pytest.mark.filterwarnings("error:No artists with labels:UserWarning")  # the PR plot names its curve
def test_a_new_method_module_trains_with_its_own_settings_section(tiny_dataset, tmp_path, monkeypatch):
    """A method module written into tmp_path, imported, selected and configured from the command
    line: its section is the run's (config.yaml, codes.npz), with its defaults, its types and rules
    checked, and no other method's section; then a resume reads it back. Without a label of its
    own it goes by its name in the summary, the PR plot and the report (before: "", which the
    report read as SCBCH)."""
    import importlib
    import sys

    import yaml

    from scbch_dist.config import load_run_config

    (tmp_path / "plain_bsch_method.py").write_text(NEW_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        importlib.import_module("plain_bsch_method")
        run_dir = tmp_path / "run"
        mine = ("method.name=plain_bsch", "plain_bsch.margin=0.25", "train.epochs=1", "eval.every=1",
                "run.tensorboard=false")
        with pytest.raises(ConfigError, match="^plain_bsch.quant_weight must be >= 0, got -1.0$"):
            main(tiny_args(tiny_dataset, run_dir, *mine, "plain_bsch.quant_weight=-1"))
        with pytest.raises(ConfigError, match="'plain_bsch.margin': expected a number"):
            main(tiny_args(tiny_dataset, run_dir, *mine, "plain_bsch.margin=wide"))
        with pytest.raises(ConfigError, match="^scbch.k is a setting of method scbch, and method.name is plain_bsch"):
            main(tiny_args(tiny_dataset, run_dir, *mine, "scbch.k=3"))
        summary = main(tiny_args(tiny_dataset, run_dir, *mine))
        assert summary["run"]["method_name"] == summary["run"]["method"] == "plain_bsch"
        assert [r["method"] for r in report.collect(run_dir)] == ["plain_bsch"]
        assert set(records(run_dir)[0]["loss"]) == {"total", "bsch", "quant"}
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["plain_bsch"] == {"margin": 0.25, "quant_weight": 0.3}
        assert not {"scbch", "nacd", "rshnl", "loss", "cscc"} & set(saved)
        assert load_run_config(run_dir / "config.yaml").plain_bsch.margin == 0.25
        resumed = main(["--resume", str(run_dir), "--set", "train.epochs=2"])
        assert resumed["run"]["epochs"] == 2
    finally:
        METHODS.pop("plain_bsch", None)
        sys.modules.pop("plain_bsch_method", None)


def test_a_module_dropped_into_the_methods_package_is_a_method_with_no_other_edit(tmp_path):
    """Adding a method to the package is one file: a copy of the package with only
    ``methods/plain_bsch.py`` added (no ``register`` call, no registry line) selects it by name and
    reads its settings section."""
    import shutil
    import subprocess
    import sys

    import scbch_dist

    package = Path(scbch_dist.__file__).parent
    shutil.copytree(package, tmp_path / "scbch_dist", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "scbch_dist" / "methods" / "plain_bsch.py").write_text(NEW_METHOD.replace("@register\n", ""))
    probe = ("import scbch_dist; from scbch_dist.methods import METHODS; from scbch_dist.config import load_config; "
             "cfg = load_config(None, ['method.name=plain_bsch', 'plain_bsch.margin=0.25']); "
             "print(scbch_dist.__file__, sorted(METHODS), cfg.plain_bsch.margin, cfg.plain_bsch.quant_weight)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    path, methods, margin, quant = out.stdout.split(" ", 1)[0], *out.stdout.split(" ", 1)[1].rsplit(" ", 2)
    assert Path(path).is_relative_to(tmp_path)  # the copy, not the installed package
    assert methods == "['nacd', 'plain_bsch', 'rshnl', 'scbch']"
    assert (float(margin), float(quant)) == (0.25, 0.3)


def test_a_method_with_settings_needs_a_name_that_can_key_its_section():
    from dataclasses import make_dataclass

    from scbch_dist.methods import Method, register

    bad = type("Bad", (Method,), {"name": "bad-name", "settings_type": make_dataclass("S", [("x", int, 1)])})
    with pytest.raises(ValueError, match="identifier"):
        register(bad)
    assert "bad-name" not in METHODS


@pytest.mark.slow
def test_a_method_from_outside_the_package_trains_and_resumes(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    summary = main(tiny_args(tiny_dataset, full, *TOY, "train.epochs=4", "eval.every=4"))
    recs = records(full)
    assert [set(r["loss"]) for r in recs] == [{"total", "bsch", "quant"}] * 4
    # one process: every id once per epoch, and the table (exchanged after every epoch) says so
    assert [(r["toy"]["visits_min"], r["toy"]["visits_max"]) for r in recs] == [(e, e) for e in (1.0, 2.0, 3.0, 4.0)]
    assert all(r["toy"]["bank_rows"] == 400 and r["toy"]["bank_source"] == "pass" for r in recs)
    assert summary["diagnostics"]["toy"]["visits_total"] == 1600 and summary["run"]["method"] == "ContrastOnly"
    assert summary["final"]["avg_map"] > summary["chance_map"] + 0.1  # it learned
    model, tables, _ = read_checkpoint(full)
    assert not any(k.startswith("head.") for k in model)  # no classifiers were built
    assert torch.equal(tables["method.visits.values"], torch.full((400,), 4.0))

    part = tmp_path / "part"
    main(tiny_args(tiny_dataset, part, *TOY, "train.epochs=2", "eval.every=4"))
    resumed = main(["--resume", str(part), "--set", "train.epochs=4"])
    model_b, tables_b, _ = read_checkpoint(part)
    assert all(torch.equal(model[k], model_b[k]) for k in model)
    assert torch.equal(tables_b["method.visits.values"], tables["method.visits.values"])  # the table was restored
    assert resumed["final"]["avg_map"] == summary["final"]["avg_map"]


@pytest.mark.slow
def test_a_method_from_outside_the_package_on_two_processes(tmp_path):
    """4 training shards of 100 over 2 ranks: each rank trains its 200 ids once per epoch, so after
    every exchange both ranks hold the table one process would: every id visited once per epoch."""
    root = tmp_path / "even"
    write_synthetic(root, tiny_synthetic_config(samples_per_shard=100))
    run_dir = tmp_path / "two"
    torchrun(str(SCRIPTS / "toy_train.py"), *tiny_args(root, run_dir, *TOY, "train.epochs=3", "eval.every=3",
                                                        "bank.refresh=memory"))
    recs = records(run_dir)
    assert [(r["toy"]["visits_min"], r["toy"]["visits_max"], r["toy"]["visits_total"]) for r in recs] == \
        [(1.0, 1.0, 400.0), (2.0, 2.0, 800.0), (3.0, 3.0, 1200.0)]
    assert all(r["toy"]["ranks_agree"] for r in recs)
    # the memory held every id after epoch 1: the epoch-end banks came from it, no encoding pass
    assert [r["toy"]["bank_source"] for r in recs] == ["memory"] * 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["world_size"] == 2 and summary["final"]["avg_map"] > summary["chance_map"]


# ---- the peer methods end to end (docs/methods.md)

PEERS = {"nacd": ("redundant:1.0", "nacd"), "rshnl": ("replace:0.5", "rshnl")}
# each method's warm-up shortened to one epoch, in its own section (another method's is refused)
WARM_UP = {"scbch": "scbch.warmup_epochs=1", "nacd": "nacd.warmup_epochs=1", "rshnl": "rshnl.self_paced_from=1"}


@pytest.fixture(scope="module")
def embedded_default(tmp_path_factory) -> Path:
    """The embedded default dataset (configs/default.yaml's synthetic data), written once."""
    from scbch_dist.config import SyntheticConfig

    root = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(root, SyntheticConfig())
    return root


def default_args(root: Path, run_dir: Path, *extra: str) -> list[str]:
    settings = [f"data.root={root}", "data.generate=", f"run.dir={run_dir}", "model.hidden=256", "train.epochs=4",
                "eval.every=100", "run.progress=false", "run.tensorboard=false", *extra]
    return ["--config", str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"),
            *[a for s in settings for a in ("--set", s)]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scbch", "nacd", "rshnl"])
def test_each_method_beats_chance_on_the_embedded_default(embedded_default, tmp_path, name):
    noise = {"scbch": "mixed:0.5", **{k: v[0] for k, v in PEERS.items()}}[name]
    # NACD under redundant:1.0 leaves chance after about 6 epochs (every pair shares a false candidate
    # until the confidences separate), 0.70 after 8 at width 1024 (measured); the others after 1 or 2
    longer = ("train.epochs=8", "model.hidden=1024") if name == "nacd" else ()
    summary = main(default_args(embedded_default, tmp_path / name, f"method.name={name}", f"data.noise={noise}",
                                WARM_UP[name], *longer))
    assert summary["run"]["method"] == name.upper() and summary["run"]["noise"]["model"] == noise.split(":")[0]
    assert summary["final"]["avg_map"] > summary["chance_map"] + 0.1, (summary["final"]["avg_map"], summary["chance_map"])
    diagnostics = summary["diagnostics"]
    if name == "nacd":  # confidences of true candidate labels above those of false ones
        assert diagnostics["nacd"]["auc"] > 0.6 and diagnostics["nacd"]["true_mean"] > diagnostics["nacd"]["false_mean"]
    if name == "rshnl":  # self-paced weights of clean rows above those of corrupted ones
        assert diagnostics["rshnl"]["auc"] > 0.6 and diagnostics["rshnl"]["active"]
    assert (tmp_path / name / "plots" / {"scbch": "cscc_weights", "nacd": "nacd_confidence",
                                         "rshnl": "rshnl_weights"}[name]).with_suffix(".png").is_file()


@pytest.mark.slow
def test_a_resumed_nacd_run_ends_where_the_uninterrupted_run_ends(tiny_dataset, tmp_path, monkeypatch):
    """Killed after epoch 2 of 4 and resumed (NACD's EMA weight follows e / train.epochs, so the run
    is interrupted rather than extended)."""
    nacd = ("method.name=nacd", "data.noise=redundant:1.0", "nacd.warmup_epochs=1", "run.tensorboard=false",
            "train.epochs=4", "eval.every=4")
    full = tmp_path / "full"
    summary = main(tiny_args(tiny_dataset, full, *nacd))
    part = tmp_path / "part"
    crash_in_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_args(tiny_dataset, part, *nacd))
    monkeypatch.undo()
    resumed = main(["--resume", str(part)])
    model_a, tables_a, _ = read_checkpoint(full)
    model_b, tables_b, _ = read_checkpoint(part)
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert {"method.confidence.values", "method.thresholds.values"} <= set(tables_a)
    for k in tables_a:  # the confidence table and the thresholds included
        assert torch.equal(tables_a[k], tables_b[k]), k
    assert not torch.equal(tables_a["method.thresholds.values"], torch.full((24,), 0.5))  # reconstructions ran
    assert resumed["final"]["avg_map"] == summary["final"]["avg_map"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nacd", "rshnl"])
def test_the_peer_methods_on_two_processes(tiny_dataset, tmp_path, name):
    run_dir = tmp_path / name
    torchrun("-m", "scbch_dist.train",
             *tiny_args(tiny_dataset, run_dir, f"method.name={name}", f"data.noise={PEERS[name][0]}", "train.epochs=3",
                        "eval.every=3", WARM_UP[name], "run.tensorboard=false"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"]["world_size"] == 2 and summary["run"]["method_name"] == name
    recs = records(run_dir)
    assert [set(r["loss"]) for r in recs] == [set(METHODS[name].terms)] * 3 and all(name in r for r in recs)
    assert summary["final"]["avg_map"] > summary["chance_map"]


def test_noise_detection_at_the_methods_own_threshold_hand_values():
    """noise_detection_stats' flagged rows as detection: 4 positives, 3 others; flagged rows 1 clean + 2 not."""
    from scbch_dist.methods.base import noise_detection_stats

    positive = np.array([1, 1, 1, 1, 0, 0, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.3, 0.6])
    d = noise_detection_stats(scores, positive, flagged=scores < 0.35)
    assert d["flagged_fraction"] == pytest.approx(3 / 7)
    assert d["flag_precision"] == pytest.approx(2 / 3) and d["flag_recall"] == pytest.approx(2 / 3)
    assert np.isnan(noise_detection_stats(scores, positive, flagged=scores < 0)["flag_precision"])  # nothing flagged


def test_nacd_flags_the_candidate_labels_below_their_class_threshold():
    from scbch_dist.methods.nacd import confidence_diagnostics

    labels = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]])
    clean = np.array([[1, 0, 0], [1, 0, 1], [0, 1, 0]])  # false candidates: (0, 1) and (2, 2)
    confidence = np.array([[0.9, 0.3, 0.0], [0.4, 0.0, 0.7], [0.0, 0.8, 0.5]])
    d = confidence_diagnostics(confidence, labels, clean, thresholds=np.array([0.5, 0.5, 0.6]))
    # below threshold: (0, 1) 0.3 < 0.5 (false), (1, 0) 0.4 < 0.5 (true), (2, 2) 0.5 < 0.6 (false)
    assert d["flag_precision"] == pytest.approx(2 / 3) and d["flag_recall"] == 1.0
    assert d["flagged_fraction"] == pytest.approx(3 / 6)


def test_rshnl_flags_the_rows_self_paced_learning_leaves_out():
    from scbch_dist.methods.rshnl import self_paced_diagnostics

    weights = np.array([0.0, 0.5, 0.0, 0.9, 0.0])
    corrupted = np.array([True, False, True, False, False])
    d = self_paced_diagnostics(weights, corrupted)
    assert d["flag_precision"] == pytest.approx(2 / 3) and d["flag_recall"] == 1.0
