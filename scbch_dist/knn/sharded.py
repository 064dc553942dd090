"""Nearest-neighbour search of a bank split over the ranks (``bank.shard``; docs/distributed.md,
"Sharded search").

Each rank holds a shard of the bank (rows with their global ids) and a block of queries. The query
block travels once around the ring (dist.ring_shift) carrying its running top-(k+1); each holder
searches it against its own shard with the backend's plain search (knn.search), maps the shard's
row numbers to global ids and merges. After W searches one last shift brings the top-(k+1) home,
where the self entry is put back at similarity 0 exactly as knn.neighbours does it (put_self_back).
A rank never holds more than its shard, one query block (two while a shift is in flight) and the
running top-(k+1).

Exact: every bank row is compared with every query on some rank, and the merge keeps the k + 1
largest, so with an exact backend the result is knn.neighbours' over the concatenated bank (ties
broken by ascending global id rather than by torch.topk's order).
"""

from __future__ import annotations

import torch

from scbch_dist import dist
from scbch_dist.knn.backends import put_self_back, resolve_backend, search
from scbch_dist.knn.settings import KnnSettings

PAD_ID = torch.iinfo(torch.int64).max  # the id of an empty slot of a running top-k: after every real row


def merge_topk(sims_a: torch.Tensor, ids_a: torch.Tensor, sims_b: torch.Tensor, ids_b: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of two candidate lists per query: descending similarity, equal similarities by
    ascending id, so the result does not depend on which list (which shard) a candidate came from.

    Args:
        sims_a, ids_a: (m, a); sims_b, ids_b: (m, b), ids int64, a + b >= k.
    Returns:
        (sims, ids), each (m, k).
    """
    sims, ids = torch.cat([sims_a, sims_b], 1), torch.cat([ids_a, ids_b], 1)
    # a lexicographic sort from two stable sorts: by id first, then by similarity
    by_id = torch.argsort(ids, dim=1, stable=True)
    sims, ids = torch.gather(sims, 1, by_id), torch.gather(ids, 1, by_id)
    by_sim = torch.argsort(sims, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(sims, 1, by_sim), torch.gather(ids, 1, by_sim)


def knn_sharded(queries: torch.Tensor, shard: torch.Tensor, shard_ids: torch.Tensor, k: int, *,
                self_index: torch.Tensor | None = None, settings: KnnSettings | None = None,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows by inner product, over the shards of every rank, of this rank's queries.
    A collective: every rank calls it at the same point (with possibly empty queries or shard).

    Args:
        queries: (m, d) this rank's query rows.
        shard: (n_r, d) this rank's bank rows, same dtype and device; shard_ids: (n_r,) int64 their
            global ids (unique over all ranks, any order, not necessarily contiguous).
        self_index: (m,) optional global id of each query's own bank row, counted as similarity 0.
        settings, seed: as knn.neighbours; ``auto`` chooses by the rows of all shards together.
    Returns:
        (sims, ids), each (m, k): descending similarity, ids global.
    """
    total = sum(dist.all_counts(shard.shape[0], shard.device))
    if k > total:  # checked on every rank alike, before the ring starts
        raise ValueError(f"k={k} neighbours requested from a bank of {total} rows")
    settings = settings if settings is not None else KnnSettings()
    backend = resolve_backend(settings, queries.device, total)
    # the self entry needs one row more, as in knn.neighbours; every slot of the result is a real row
    width = min(k + 1, total) if self_index is not None else k
    m = queries.shape[0]
    top_s = torch.full((m, width), -float("inf"), dtype=torch.float32, device=queries.device)  # as the backends return
    top_i = torch.full((m, width), PAD_ID, dtype=torch.int64, device=queries.device)
    block = queries
    for hop in range(dist.world_size()):
        if hop:  # the block moves one rank on: its queries and their running top
            block, top_s, top_i = dist.ring_shift([block, top_s, top_i])
        found = min(width, shard.shape[0])
        if block.shape[0] and found:
            s, i = search(backend, block, shard, found, settings=settings, seed=seed)
            top_s, top_i = merge_topk(top_s, top_i, s.to(top_s.dtype), shard_ids[i], width)
    # the block sits at rank (r - 1) % W, searched by every shard: its results go home without the queries
    top_s, top_i = dist.ring_shift([top_s, top_i])
    if self_index is None:
        return top_s, top_i
    return put_self_back(top_s, top_i, self_index.to(top_i.device), k)
