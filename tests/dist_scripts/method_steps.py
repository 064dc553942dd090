"""Training steps of every method through the engine's train_step, the method's after_batch and the
exchange of its tables, on fixed global batches (ids 0..15, fixed labels), then the method's epoch
hooks on a bank of those 16 samples (SCBCH's refresh, NACD's reconstruction).

    torchrun --standalone --nproc_per_node 2 method_steps.py OUT   # 2 processes x 8 rows
    python method_steps.py OUT                                     # 1 process x 16 rows

Rank 0 saves, per method, the initial and final parameters, every table, the global loss terms of each step and
the epoch records to OUT/<method>.pt."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parent))
from common import feature_batch  # noqa: E402

from scbch_dist import cli, dist  # noqa: E402
from scbch_dist.config import load_config  # noqa: E402
from scbch_dist.engine.loop import train_step  # noqa: E402
from scbch_dist.engine.setup import make_optimizer  # noqa: E402
from scbch_dist.losses import cscc_bank_rows  # noqa: E402
from scbch_dist.methods import METHODS, Bank, EpochContext, Step, TrainingSet  # noqa: E402
from scbch_dist.models import build_model  # noqa: E402

METHOD_NAMES = ("scbch", "nacd", "rshnl")
# each method's own section: warm-ups that end within the five steps, neighbours among the 16 ids
SETTINGS = {"scbch": ("scbch.margin=0.2", "scbch.shift=1.0", "scbch.warmup_epochs=2", "scbch.k=4"),
            "nacd": ("nacd.k=4", "nacd.warmup_epochs=4"), "rshnl": ("rshnl.self_paced_from=2",)}


class FeatureMeta:
    """What the model builder reads of a dataset: 12-d image and 10-d text features."""

    @staticmethod
    def dim(modality: str) -> int:
        return 12 if modality == "img" else 10


def run(name: str, accelerator, out: Path) -> None:
    cfg = load_config(None, ["model.bits=8", "model.hidden=16", "train.lr=1e-2", *SETTINGS[name], "bank.knn=torch",
                             "train.epochs=5", f"method.name={name}"])
    world, rank = accelerator.num_processes, accelerator.process_index
    labels = feature_batch(99)["lab"]  # one label row per id, for every step
    train = TrainingSet(16, 5, labels, None, accelerator.device)
    method = METHODS[name](cfg, train)
    torch.manual_seed(0)
    model = build_model(cfg.model, FeatureMeta(), spec=method.tower_spec(cfg),
                        make_head=lambda: method.build_head(cfg, 5)).double()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, cfg, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    rows = slice(rank * 16 // world, (rank + 1) * 16 // world)
    ids = torch.arange(16)[rows]
    losses = []
    for epoch in range(5):  # one step an epoch: the warm-ups end within these five
        batch = feature_batch(epoch)
        if name == "scbch":
            method.weights.assign(batch["w"].float())  # as a refresh would have set them
        step = Step(epoch, ids, labels[rows])
        terms, outputs = train_step(model, optimizer, accelerator, {k: batch[k][rows] for k in ("img", "txt")}, method, step)
        method.after_batch({k: v.detach() for k, v in outputs.items()}, step)
        for table in method.tables().values():
            table.sync()
        losses.append(dist.all_reduce_sum(torch.stack([terms[k].detach().double() for k in method.terms])))
    net = accelerator.unwrap_model(model)
    with torch.no_grad():
        every = feature_batch(0)
        z = cscc_bank_rows(net.encode("img", every["img"]), net.encode("txt", every["txt"])).float()
    own = torch.arange(rank, 16, world)
    ctx = EpochContext(epoch=4, epochs=5, train=train, bank=lambda: Bank(z, own, "pass", 0.0), run_dir=out,
                       is_main=False)
    records = {**method.epoch_start(ctx), **method.epoch_end(ctx)}
    if accelerator.is_main_process:
        torch.save({"initial": initial, "params": {k: v.detach().clone() for k, v in net.state_dict().items()},
                    "tables": {k: t.values.clone() for k, t in method.tables().items()},
                    "losses": torch.stack(losses), "records": records}, out / f"{name}.pt")
    accelerator.wait_for_everyone()


accelerator = Accelerator(cpu=True)
for method_name in METHOD_NAMES:
    run(method_name, accelerator, Path(sys.argv[1]))
accelerator.end_training()
# leave as the entry points do (cli.leave): without the interpreter's teardown, in which gloo's
# threads abort a finished two-process run now and then ("terminate called without an active
# exception"; three setup errors of test_distributed.py in a CI run beside two busy loops)
cli.leave(0)
