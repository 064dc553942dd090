"""Nearest-neighbour search of the training set's bank (docs/distributed.md, "The refresh"): the
settings (``settings.KnnSettings``, the config's bank.* search keys), the exact top-k that defines
the neighbours (``exact``), the backends and the one search entry ``neighbours`` (``backends``),
and the search of a bank split over the ranks (``sharded``, a collective: not imported here, so
that this package stays free of process groups for the losses).

Adding a backend is one function of the ``backends.Backend`` signature (the plain top-``width``
of the queries against the base, float32 similarities descending with their int64 rows; no self
rule) and one line in ``backends.REGISTRY``: its name then is a valid ``bank.knn``, ``neighbours``
puts the self entry back at 0 for it, and the sharded search runs it at every shard.
"""

from scbch_dist.knn.backends import (BACKENDS, REGISTRY, Backend, auto_nlist, faiss_available, neighbours,
                                     put_self_back, resolve_backend, search)
from scbch_dist.knn.exact import exact_topk
from scbch_dist.knn.settings import KnnSettings

__all__ = ["BACKENDS", "REGISTRY", "Backend", "KnnSettings", "auto_nlist", "exact_topk", "faiss_available",
           "neighbours", "put_self_back", "resolve_backend", "search"]
