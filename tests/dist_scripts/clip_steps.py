"""Three SCBCH training steps of a network on a tiny CLIP (both towers fine-tuned) through the
engine's train_step, on fixed global batches of 16 images and captions, in float64.

    torchrun --standalone --nproc_per_node 2 clip_steps.py MODEL_DIR OUT   # 2 processes x 8 rows
    python clip_steps.py MODEL_DIR OUT                                     # 1 process x 16 rows

MODEL_DIR: a tiny CLIP (models.clip.write_tiny), open_clip's or transformers' layout. Rank 0 saves
the initial and final parameters and the global loss of each step to OUT."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from scbch_dist import cli, dist
from scbch_dist.config import load_config
from scbch_dist.engine.loop import train_step
from scbch_dist.engine.setup import make_optimizer
from scbch_dist.methods import METHODS, Step, TrainingSet
from scbch_dist.models import build_model
from scbch_dist.models.tokenizers import clip_tokenizer

WORDS = ("red", "green", "blue", "circle", "square", "triangle", "small", "large")


def batch(step: int, tokenizer) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    images = torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8)
    picks = torch.randint(len(WORDS), (16, 3), generator=g).tolist()
    ids, mask = tokenizer([" ".join(WORDS[i] for i in row) for row in picks])
    return {"img": images, "txt": torch.from_numpy(ids), "txt_mask": torch.from_numpy(mask)}


accelerator = Accelerator(cpu=True)
model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = load_config(None, ["model.bits=8", "model.hidden=16", "train.lr=1e-2", "train.backbone_lr=1e-3",
                         "model.image.kind=clip", "model.text.kind=clip", "model.image.image_size=32",
                         f"model.clip.weights={model_dir}", "scbch.warmup_epochs=5", "scbch.k=4"])
world, rank = accelerator.num_processes, accelerator.process_index
g = torch.Generator().manual_seed(99)
labels = (torch.rand(16, 5, generator=g) < 0.4).to(torch.uint8)
labels[torch.arange(16), torch.randint(5, (16,), generator=g)] = 1
train = TrainingSet(16, 5, labels, None, accelerator.device)
method = METHODS["scbch"](cfg, train)
torch.manual_seed(0)
model = build_model(cfg.model, None, spec=method.tower_spec(cfg), make_head=lambda: method.build_head(cfg, 5)).double()
initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
optimizer = make_optimizer(model, cfg, accelerator.device)
model, optimizer = accelerator.prepare(model, optimizer)
tokenizer = clip_tokenizer(cfg.model.clip)
rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
losses = []
for epoch in range(3):
    global_batch = batch(epoch, tokenizer)
    step = Step(epoch, torch.arange(16)[rows], labels[rows])
    terms, _ = train_step(model, optimizer, accelerator, {k: v[rows] for k, v in global_batch.items()}, method, step)
    losses.append(dist.all_reduce_sum(terms["total"].detach().double().reshape(1)))
if accelerator.is_main_process:
    net = accelerator.unwrap_model(model)
    torch.save({"initial": initial, "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
                "losses": torch.cat(losses)}, out)
accelerator.wait_for_everyone()
accelerator.end_training()
# leave as the entry points do (cli.leave): without the interpreter's teardown, in which gloo's
# threads abort a finished two-process run now and then ("terminate called without an active
# exception"; three setup errors of test_distributed.py in a CI run beside two busy loops)
cli.leave(0)
