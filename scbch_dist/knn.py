"""Nearest-neighbour search by inner product: a leaf module (tensors in, tensors out, no training
state, no collectives). The engine's refresh searches the gathered [u, v] bank with it
(docs/distributed.md).

Backends, chosen by ``bank.knn``. Exact, all returning the same neighbours up to ties:
- ``faiss-gpu``: brute-force inner product on the GPU (``faiss.knn_gpu``), needs FAISS-GPU and CUDA;
- ``faiss-cpu``: exact ``IndexFlatIP`` on the CPU;
- ``torch``: exact matmul + topk in row chunks on the bank's device: the reference, and the
  dependable path on a GPU without FAISS.
Approximate (FAISS on the CPU), for banks where an exact search costs N^2 (SearchParams):
- ``faiss-ivf``: an inverted file of ``nlist`` k-means lists trained on a seeded sample of the
  bank; each query scans its ``nprobe`` nearest lists exactly;
- ``faiss-ivfpq``: the same lists holding product-quantised rows (dims / 4 bytes a row instead of
  4 dims: 16x less memory, lower recall);
- ``faiss-hnsw``: a navigable small-world graph (no training; ``ef_search`` candidates per query).
``auto`` takes faiss-gpu on a CUDA device when it is installed, else torch there; on the CPU
faiss-cpu when installed (1.4-2.2x faster than torch for 10k-100k banks on 2 cores,
tests/benchmarks/bench_scale.py), else torch; above ``exact_below`` rows it takes faiss-ivf.

The SCBCH similarity sets each sample's similarity to itself to 0 rather than removing it; every
backend reproduces that exactly (a search for k + 1, then the self entry put back at 0).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch

BACKENDS = ("auto", "torch", "faiss-cpu", "faiss-gpu", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
APPROXIMATE = ("faiss-ivf", "faiss-ivfpq", "faiss-hnsw")


@dataclass(frozen=True)
class SearchParams:
    """Settings of the approximate backends and of ``auto`` (config: bank.*)."""

    nlist: int = 0  # IVF lists; 0: about 4 sqrt(N), a power of two, with >= 39 rows per list to train on
    nprobe: int = 32  # IVF lists scanned per query
    ef_search: int = 128  # HNSW candidates per query (at least k + 1)
    hnsw_m: int = 32  # HNSW links per node
    train_rows: int = 65536  # rows (a seeded sample of the bank) the IVF lists are trained on
    exact_below: int = 200_000  # auto: an exact backend below this many bank rows, faiss-ivf above
    seed: int = 0


def auto_nlist(n: int) -> int:
    """About 4 sqrt(n) lists (FAISS's guidance), as a power of two, keeping >= 39 rows per list."""
    nlist = 1 << max(int(round(np.log2(4 * np.sqrt(max(n, 1))))), 0)
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def knn_exact(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
              chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query row against ``base`` (torch reference).

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


def _faiss():
    import faiss

    return faiss


def faiss_available(gpu: bool = False) -> bool:
    if importlib.util.find_spec("faiss") is None:
        return False
    if not gpu:
        return True
    try:
        return _faiss().get_num_gpus() > 0 and torch.cuda.is_available()
    except Exception:
        return False


def resolve_backend(name: str, device: torch.device, rows: int = 0, params: SearchParams = SearchParams()) -> str:
    """The backend ``name`` means for a bank of ``rows`` rows on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"bank.knn must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if rows >= params.exact_below and faiss_available():
            return "faiss-ivf"
        if device.type == "cuda":
            return "faiss-gpu" if faiss_available(gpu=True) else "torch"
        return "faiss-cpu" if faiss_available() else "torch"
    if name.startswith("faiss") and not faiss_available(gpu=name == "faiss-gpu"):
        raise RuntimeError(f"bank.knn={name} but {'FAISS-GPU with CUDA' if name == 'faiss-gpu' else 'faiss'} "
                           f"is not available; install the 'faiss' or 'gpu' extra or use bank.knn=torch")
    return name


def put_self_back(sims: torch.Tensor, index: torch.Tensor, self_index: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a descending top-(k+1) search, the top k with each query's own entry counted as 0.
    sims, index: (m, k + 1) (or (m, k) when the bank has only k rows); self_index: (m,) in the
    same numbering as index. Returns (sims, index), each (m, k).

    Exact: a row absent from the k+1 results has a similarity <= the smallest returned one, so
    the true top k lies among the returned rows plus the self entry."""
    is_self = index == self_index[:, None]
    sims = torch.where(is_self, torch.zeros_like(sims), sims)
    missing = ~is_self.any(1)
    # append the self entry (0) where the search did not return it
    extra_s = torch.where(missing, torch.zeros_like(sims[:, 0]), torch.full_like(sims[:, 0], -float("inf")))
    sims = torch.cat([sims, extra_s[:, None]], 1)
    index = torch.cat([index, self_index[:, None]], 1)
    top, pos = torch.sort(sims, dim=1, descending=True, stable=True)
    return top[:, :k], torch.gather(index, 1, pos[:, :k])


def approximate_index(backend: str, base: np.ndarray, params: SearchParams):
    """A FAISS index of ``backend`` over ``base`` (N, d) float32, trained and filled."""
    faiss = _faiss()
    n, d = base.shape
    if backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(base)
        return index
    nlist = params.nlist or auto_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    if backend == "faiss-ivfpq":
        if d % 4:
            raise ValueError(f"bank.knn=faiss-ivfpq needs a row width divisible by 4, got {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, d // 4, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = params.seed
    sample = np.random.default_rng(params.seed).choice(n, min(n, max(params.train_rows, 39 * nlist)), replace=False)
    index.train(base[np.sort(sample)])
    index.add(base)
    index.nprobe = min(params.nprobe, nlist)
    return index


def knn(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
        backend: str = "auto", params: SearchParams = SearchParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``base`` by inner product, for each query; see knn_exact.
    Approximate backends may miss true neighbours (recall below 1), never the self rule."""
    backend = resolve_backend(backend, queries.device, base.shape[0], params)
    if backend == "torch":
        return knn_exact(queries, base, k, self_index=self_index)
    faiss = _faiss()
    kk = min(k + 1, base.shape[0]) if self_index is not None else k
    if backend in APPROXIMATE:
        base_np = np.ascontiguousarray(base.detach().cpu().float().numpy())
        q = np.ascontiguousarray(queries.detach().cpu().float().numpy())
        ann = approximate_index(backend, base_np, params)
        if backend == "faiss-hnsw":
            ann.hnsw.efSearch = max(params.ef_search, kk)
        s, i = ann.search(q, kk)
        short = (i < 0).any(1)  # fewer than kk rows in the scanned lists: those queries searched exactly
        if short.any():
            flat = faiss.IndexFlatIP(q.shape[1])
            flat.add(base_np)
            s[short], i[short] = flat.search(q[short], kk)
        sims, index = torch.from_numpy(s).to(queries), torch.from_numpy(i).to(queries.device)
    elif backend == "faiss-gpu":
        import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch tensors)

        res = _gpu_resources(queries.device)
        sims, index = faiss.knn_gpu(res, queries.float().contiguous(), base.float().contiguous(), kk,
                                    metric=faiss.METRIC_INNER_PRODUCT, device=queries.device.index or 0)
        sims, index = sims.to(queries.dtype), index.long()
    else:
        flat = faiss.IndexFlatIP(base.shape[1])
        flat.add(np.ascontiguousarray(base.detach().cpu().float().numpy()))
        s, i = flat.search(np.ascontiguousarray(queries.detach().cpu().float().numpy()), kk)
        sims, index = torch.from_numpy(s).to(queries), torch.from_numpy(i).to(queries.device)
    if self_index is None:
        return sims, index
    return put_self_back(sims, index, self_index.to(index.device), k)


_GPU_RESOURCES: dict = {}


def _gpu_resources(device: torch.device):
    """One StandardGpuResources per device and process (FAISS resources are not shareable)."""
    key = device.index or 0
    if key not in _GPU_RESOURCES:
        _GPU_RESOURCES[key] = _faiss().StandardGpuResources()
    return _GPU_RESOURCES[key]
