"""A MIRFlickr-25K stand-in with the real labels and the real tags: the release's label and tag
files from ../shared/data/mirflickr25k and, in place of the VGG19 features that are not stored
there (328 MB), image features drawn from each row's real labels by the embedded dataset's image
model (class prototypes for the labels seen, plus nuisance, rectified). Writes DIR/ with the three
files of the release (``convert mirflickr`` reads it as the real one) and converts it:

    python tests/benchmarks/mirflickr_stand_in.py [--shared ../shared] [--src /tmp/mirflickr-src]
        [--out shards/mirflickr-stand-in] [--img-dim 512]

Used by launch/grids/selection-mirflickr.yaml (model selection on the real labels with each noise
model, docs/evaluation.md)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.io


def write_release(shared: Path, src: Path, img_dim: int, seed: int = 0) -> None:
    release = shared / "data" / "mirflickr25k"
    src.mkdir(parents=True, exist_ok=True)
    for name in ("mirflickr25k-lall.mat", "mirflickr25k-yall.mat"):
        if not (src / name).exists():
            os.symlink((release / name).resolve(), src / name)
    lab = scipy.io.loadmat(release / "mirflickr25k-lall.mat")["LAll"].astype(np.float64)
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(lab.shape[1], img_dim))
    visible = lab * (rng.random(lab.shape) < 0.8)  # a label not every picture shows
    signal = visible @ proto / np.sqrt(np.maximum(visible.sum(1, keepdims=True), 1))
    img = np.maximum(signal + rng.normal(size=(len(lab), img_dim)) * 1.3, 0.0).astype(np.float32)
    scipy.io.savemat(src / "mirflickr25k-iall-vgg.mat", {"XAll": img})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared")
    p.add_argument("--src", type=Path, default=Path("/tmp/mirflickr-src"))
    p.add_argument("--out", type=Path, default=Path("shards/mirflickr-stand-in"))
    p.add_argument("--img-dim", type=int, default=512)
    a = p.parse_args()
    write_release(a.shared, a.src, a.img_dim)
    subprocess.run([sys.executable, "-m", "scbch_dist.data.convert", "mirflickr", "--src", str(a.src),
                    "--out", str(a.out)], check=True)


if __name__ == "__main__":
    main()
