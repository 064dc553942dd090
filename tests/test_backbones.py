"""Backbones register themselves (models/backbones.py): a backbone written in one file outside the
package (tests/toy_backbone.py) is a valid model.image.kind / model.text.kind and trains; an
unknown kind is one line naming the registered ones."""

from __future__ import annotations

import json

import pytest

import toy_backbone  # noqa: F401  (registers tiny-conv and bag-of-embeddings)
from conftest import REPO
from scbch_dist.config import ConfigError, load_config
from scbch_dist.models.backbones import IMAGE_BACKBONES, TEXT_BACKBONES, register_image_backbone
from scbch_dist.train import main

SMALL_SHAPES = ["shapes.n_train=640", "shapes.n_query=64", "shapes.n_extra_database=64", "shapes.samples_per_shard=160"]


def test_the_config_takes_the_registered_names_and_refuses_others():
    assert {"features", "timm", "efficientnet-lite0", "clip", "tiny-conv"} <= set(IMAGE_BACKBONES)
    assert {"features", "bert", "minilm", "clip", "bag-of-embeddings"} <= set(TEXT_BACKBONES)
    cfg = load_config(REPO / "configs/finetune-tiny.yaml", ["model.image.kind=tiny-conv", "model.text.kind=bag-of-embeddings"])
    assert (cfg.model.image.kind, cfg.model.text.kind) == ("tiny-conv", "bag-of-embeddings")
    with pytest.raises(ConfigError, match=r"model.image.kind must be one of .*'tiny-conv'\), got 'resnet'"):
        load_config(None, ["model.image.kind=resnet"])
    with pytest.raises(ValueError, match="registered already"):
        register_image_backbone("timm")(lambda image_cfg, dim: None)


@pytest.mark.slow
def test_a_backbone_written_in_one_file_trains(tmp_path):
    """The shapes dataset's images and captions through tiny-conv and bag-of-embeddings: the run
    trains, logs the kinds and its codes rank above chance."""
    settings = [f"data.root={tmp_path / 'shapes'}", "data.generate=shapes", *SMALL_SHAPES, f"run.dir={tmp_path / 'run'}",
                "model.image.kind=tiny-conv", "model.image.kwargs={width: 32}", "model.text.kind=bag-of-embeddings",
                "model.text.kwargs={dim: 32}", "train.epochs=6", "eval.every=6", "train.batch_size=32",
                "scbch.warmup_epochs=2", "scbch.k=10", "run.progress=false", "run.tensorboard=false"]
    summary = main(["--config", str(REPO / "configs/finetune-tiny.yaml"), *[a for s in settings for a in ("--set", s)]])
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "image tiny-conv, text bag-of-embeddings" in log
    assert summary["final"]["avg_map"] > summary["chance_map"] + 0.02, json.dumps(summary["final"]["avg_map"])
