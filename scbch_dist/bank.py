"""The feature bank's neighbour search.

``knn_exact`` is the exact reference (torch matmul + topk in row chunks, CPU or GPU); FAISS
backends for large banks come with the scale-out work and must agree with it up to ties.
"""

from __future__ import annotations

import torch


def knn_exact(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
              chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query row against ``base``.

    Args:
        queries: (m, d). base: (N, d), same dtype and device.
        self_index: (m,) optional row of ``base`` that is each query itself; that entry's
            similarity is set to 0 (not removed), as the SCBCH weights define it.
        chunk: query rows per matmul, bounding memory at chunk x N.
    Returns:
        (sims, index), each (m, k), sims in descending order.
    """
    if k > base.shape[0]:
        raise ValueError(f"k={k} neighbours requested from a bank of {base.shape[0]} rows")
    sims, index = [], []
    for start in range(0, queries.shape[0], chunk):
        s = queries[start:start + chunk] @ base.T
        if self_index is not None:
            rows = torch.arange(s.shape[0], device=s.device)
            s[rows, self_index[start:start + chunk]] = 0.0
        v, i = torch.topk(s, k, dim=1)
        sims.append(v)
        index.append(i)
    return torch.cat(sims), torch.cat(index)
