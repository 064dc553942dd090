"""torchrun --standalone --nproc_per_node 2 toy_train.py --set ...: the trainer with the toy method
of tests/toy_method.py registered (the engine is not changed for it)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import toy_method  # noqa: E402,F401  (registers contrast_only)

from scbch_dist import cli  # noqa: E402
from scbch_dist.train import main  # noqa: E402

cli.run(main, "toy_train.py")
