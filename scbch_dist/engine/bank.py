"""The [u, v] bank of the whole training set, which refreshes search (docs/distributed.md, "The
refresh"). Its rows are float32, or float16 from ``bank.float16_above`` training rows on (built,
exchanged and searched in float16: docs/distributed.md, "A compressed bank").

``bank.refresh: pass`` (the paper): each rank encodes a disjoint part of the training set with the
model in eval mode, the rows are gathered by id into one bank on every rank, and each rank
searches the neighbours of the ids it encoded.
``bank.refresh: memory``: the latest rows of every id from the training batches (an ``IdTable``
recorded after every step and exchanged after every epoch); no encoding pass. Until every id has
been recorded once (the first epoch), a pass is made instead. Rank r searches ids r, r + W, ...

``bank.shard``: nothing is gathered; each rank's bank holds only the rows of the ids it searches
(pass: the rows it encoded; memory: its ids' rows of the memory table, which itself stays whole on
every rank), and the search visits every rank's shard in a ring (knn_sharded; docs/distributed.md,
"Sharded search").
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np
import torch

from scbch_dist import dist
from scbch_dist.losses import cscc_bank_rows
from scbch_dist.methods import Bank
from scbch_dist.id_table import IdTable


class BankSource:
    """Builds the bank on request. ``encode_train()`` is this rank's part of a training-set pass
    (engine.encode.encode_part); ``record`` keeps a batch's rows when the refresh is memory."""

    def __init__(self, refresh: str, count: int, bits: int, device: torch.device,
                 encode_train: Callable[[], dict[str, torch.Tensor]], log: logging.Logger, *, shard: bool = False,
                 dtype: torch.dtype = torch.float32, held_out: torch.Tensor | None = None):
        self.count, self.encode_train, self.log, self.shard, self.dtype = count, encode_train, log, shard, dtype
        self.held_out = held_out  # (N,) bool: validation rows, in the bank but never a neighbour
        self.memory = IdTable(count, (2 * bits,), dtype=dtype, device=device) if refresh == "memory" else None

    def record(self, ids: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
        if self.memory is not None:
            self.memory.update(ids, cscc_bank_rows(out["h_img"].detach(), out["h_txt"].detach()))

    def build(self) -> Bank:
        """A collective: every rank must call it at the same point."""
        t0 = time.perf_counter()
        if self.memory is not None and self.memory.complete:
            own = torch.arange(dist.rank(), self.count, dist.world_size(), device=self.memory.values.device)
            if self.memory.coverage < 1 and dist.is_main():
                # ids a rank skipped last epoch (uneven shards over ranks, drop_last) keep older rows
                self.log.warning(f"CSCC memory refresh: {1 - self.memory.coverage:.1%} of the training rows "
                                 "are from earlier epochs")
            rows = self.memory.values[own] if self.shard else self.memory.values
            return Bank(rows, own, "memory", time.perf_counter() - t0, self.memory.coverage, sharded=self.shard,
                        held_out=self.held_out)
        part = self.encode_train()
        z = cscc_bank_rows(part["h_img"], part["h_txt"]).to(self.dtype)
        if self.shard:
            self._check_exactly_once(part["id"])
            return Bank(z, part["id"], "pass", time.perf_counter() - t0, sharded=True, held_out=self.held_out)
        rows = dist.gather_by_id({"id": part["id"], "z": z}, self.count)["z"]
        return Bank(rows, part["id"], "pass", time.perf_counter() - t0, held_out=self.held_out)

    def _check_exactly_once(self, ids: torch.Tensor) -> None:
        """A collective: the pass gave every id to exactly one rank (what gather_by_id checks when
        the bank is gathered), from per-id counts summed over ranks (N int64, no rows moved)."""
        seen = dist.sum_host(np.bincount(ids.cpu().numpy(), minlength=self.count))
        if seen.shape[0] != self.count or (seen != 1).any():
            raise RuntimeError(f"a pass returned {int(seen.sum())} rows for {self.count} ids "
                               f"({int((seen == 0).sum())} ids missing, {int((seen > 1).sum())} repeated)")
