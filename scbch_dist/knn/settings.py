"""The settings of a neighbour search: which backend, and how the approximate ones and ``auto``
trade recall for time. The config's ``bank.*`` section is this plus the bank's own keys
(config.BankConfig); knn takes no other settings object."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KnnSettings:
    knn: str = "auto"  # neighbour search: "auto", or a name of scbch_dist.knn.BACKENDS (docs/distributed.md)
    exact_below: int = 200_000  # auto: an exact search below this many training rows, faiss-ivf (torch-ivf without FAISS) above
    nlist: int = 0  # IVF lists; 0 picks about sqrt(N) (torch-ivf) or 4 sqrt(N) (faiss-ivf(pq))
    nprobe: int = 32  # IVF lists scanned: per list of queries (torch-ivf) or per query (faiss-ivf(pq))
    ef_search: int = 128  # faiss-hnsw: candidates per query
    train_rows: int = 65536  # faiss-ivf(pq): rows of the bank (a seeded sample) the lists are trained on
