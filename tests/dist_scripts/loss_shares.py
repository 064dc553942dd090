"""torchrun --standalone --nproc_per_node 2 loss_shares.py OUT: every rank computes its share of
each SCBCH term on its rows (5 and 4) of one global batch, against the global batch gathered with
gradient (methods.global_batch_of), backpropagates the weighted total, and saves its shares and the
gradients of its rows."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from common import code_batch  # noqa: E402

from scbch_dist.losses import bsch_loss, cscc_loss, quantization_loss  # noqa: E402
from scbch_dist.methods import global_batch_of  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
rows = [slice(0, 5), slice(5, 9)][rank]
batch = code_batch()
local = {k: v[rows].clone().requires_grad_(k.startswith(("h_", "p_"))) for k, v in batch.items()}
columns = global_batch_of(local["h_img"], local["h_txt"], local["lab"])
n = columns.h_img.shape[0]
shares = {
    "bsch": bsch_loss(local["h_img"], local["h_txt"], local["lab"], margin=0.2, shift=1.0, columns=columns),
    "quant": quantization_loss(local["h_img"], local["h_txt"], n_total=n),
    "cscc": cscc_loss(local["p_img"], local["p_txt"], local["lab"], local["w"], n_total=n),
}
(0.7 * shares["bsch"] + 0.3 * shares["quant"] + shares["cscc"]).backward()
torch.save({"shares": {k: v.detach() for k, v in shares.items()},
            "grads": {k: local[k].grad for k in ("h_img", "h_txt", "p_img", "p_txt")}},
           Path(sys.argv[1]) / f"rank{rank}.pt")
dist.destroy_process_group()
