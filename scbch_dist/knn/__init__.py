"""Nearest-neighbour search of the training set's bank (docs/distributed.md, "The refresh"): the
backends (``backends``) and the search of a bank split over the ranks (``sharded``)."""

from scbch_dist.knn.backends import (BACKENDS, SearchParams, auto_nlist, faiss_available, knn, knn_exact,
                                     put_self_back, resolve_backend)

__all__ = ["BACKENDS", "SearchParams", "auto_nlist", "faiss_available", "knn", "knn_exact", "put_self_back",
           "resolve_backend"]
