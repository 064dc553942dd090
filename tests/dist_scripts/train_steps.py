"""Several training steps through the engine's train_step and the SCBCH method, on fixed global
batches (global ids 0..15, CSCC weights set in the method's table after two warm-up steps).

    torchrun --standalone --nproc_per_node 2 train_steps.py OUT   # 2 processes x 8 rows
    python train_steps.py OUT                                     # 1 process x 16 rows

Rank 0 saves the final parameters to OUT/params.pt."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from common import feature_batch  # noqa: E402

from scbch_dist.config import load_config  # noqa: E402
from scbch_dist.engine.loop import train_step  # noqa: E402
from scbch_dist.engine.setup import make_optimizer  # noqa: E402
from scbch_dist.methods import SCBCH, Step, TrainingSet  # noqa: E402
from scbch_dist.models import SCBCHModel  # noqa: E402

accelerator = Accelerator(cpu=True)
cfg = load_config(None, ["model.bits=8", "model.hidden=16", "train.lr=1e-2", "loss.margin=0.2", "loss.shift=1.0",
                         "cscc.warmup_epochs=2"])
torch.manual_seed(0)
model = SCBCHModel(12, 10, cfg.model.bits, cfg.model.hidden, 5).double()
optimizer = make_optimizer(model, cfg, accelerator.device)
model, optimizer = accelerator.prepare(model, optimizer)
world, rank = accelerator.num_processes, accelerator.process_index
method = SCBCH(cfg, TrainingSet(count=16, num_classes=5, labels=torch.zeros(16, 5, dtype=torch.uint8), corrupted=None,
                                device=accelerator.device))
for step in range(5):
    batch = feature_batch(step)
    method.weights.assign(batch["w"].float())
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    local = {k: v[rows] for k, v in batch.items()}
    # the step index plays the epoch: steps 0 and 1 are the warm-up, then the CSCC weights apply
    train_step(model, optimizer, accelerator, local, method, Step(step, torch.arange(16)[rows], local["lab"]))
if accelerator.is_main_process:
    torch.save(accelerator.unwrap_model(model).state_dict(), Path(sys.argv[1]) / "params.pt")
accelerator.wait_for_everyone()
accelerator.end_training()
