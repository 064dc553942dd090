"""Exact top-k by inner product, in row chunks: the SCBCH neighbour definition itself (docs/objective.md)
and the search under the ``torch`` backend.

The loss references (losses.cscc_weights, losses.reconstruct_confidence) call it with ``self_index``:
the self similarity written as 0 into the scores before the top-k, as the definition reads. The
search entry (knn.neighbours) gets the same result another way, a search for k + 1 and the self
entry put back (knn.put_self_back), and the tests hold one to the other.

Pure: torch only, no process group and no training state, so the losses may import it.
"""

from __future__ import annotations

import torch

HALF = (torch.float16, torch.bfloat16)
CHUNK_ROWS = 65536  # rows of a float16 bank converted to float32 at a time (here and for FAISS)
EXACT_SCORES = 1 << 28  # query rows per chunk shrink so a chunk's scores stay within 1 GB of float32
QUERY_CHUNK = 4096  # query rows per matrix product while the bank is small enough


def exact_topk(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
               chunk: int = QUERY_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query row against ``base``.

    Args:
        queries: (m, d). base: (N, d), same device, same dtype or float16 (then the sims are float32).
        self_index: (m,) optional row of ``base`` that is each query itself; that entry's
            similarity is set to 0 (not removed), as the SCBCH weights define it.
        chunk: query rows per matmul, bounding memory at chunk x N (fewer for a large bank).
    Returns:
        (sims, index), each (m, k), sims in descending order.
    """
    if k > base.shape[0]:
        raise ValueError(f"k={k} neighbours requested from a bank of {base.shape[0]} rows")
    chunk = max(1, min(chunk, EXACT_SCORES // max(base.shape[0], 1)))
    sims, index = [], []
    for start in range(0, queries.shape[0], chunk):
        s = scores(queries[start:start + chunk], base)
        if self_index is not None:
            rows = torch.arange(s.shape[0], device=s.device)
            s[rows, self_index[start:start + chunk]] = 0.0
        v, i = torch.topk(s, k, dim=1)
        sims.append(v)
        index.append(i)
    return torch.cat(sims), torch.cat(index)


def scores(queries: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """(m, N) inner products of queries (m, d) with base (N, d). A float16 bank is multiplied in
    float32 pieces of CHUNK_ROWS rows: float16 matmul on a CPU is slow and coarse, and a whole
    float32 copy of the bank would undo its compression."""
    if base.dtype not in HALF:
        return queries @ base.T
    q = queries.float()
    return torch.cat([q @ base[b:b + CHUNK_ROWS].float().T for b in range(0, base.shape[0], CHUNK_ROWS)], 1)
