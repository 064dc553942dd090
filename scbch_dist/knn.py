"""Nearest-neighbour search by inner product: a leaf module (tensors in, tensors out, no training
state, no collectives). The engine's refresh searches the gathered [u, v] bank with it
(docs/distributed.md).

Backends, chosen by ``bank.knn``:
- ``faiss-gpu``: brute-force inner product on the GPU (``faiss.knn_gpu``), needs FAISS-GPU and CUDA;
- ``faiss-cpu``: exact ``IndexFlatIP`` on the CPU;
- ``torch``: exact matmul + topk in row chunks on the bank's device: the reference, and the
  dependable path on a GPU without FAISS.
``auto`` takes faiss-gpu on a CUDA device when it is installed, else torch there; on the CPU
faiss-cpu when installed (1.4-2.2x faster than torch for 10k-100k banks on 2 cores,
tests/benchmarks/bench_scale.py), else torch. All return the same neighbours up to ties.

The SCBCH similarity sets each sample's similarity to itself to 0 rather than removing it; every
backend reproduces that exactly (a search for k + 1, then the self entry put back at 0).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

BACKENDS = ("auto", "torch", "faiss-cpu", "faiss-gpu")


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


def resolve_backend(name: str, device: torch.device) -> str:
    if name not in BACKENDS:
        raise ValueError(f"bank.knn must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return "faiss-gpu" if faiss_available(gpu=True) else "torch"
        return "faiss-cpu" if faiss_available() else "torch"
    if name.startswith("faiss") and not faiss_available(gpu=name == "faiss-gpu"):
        raise RuntimeError(f"bank.knn={name} but {'FAISS-GPU with CUDA' if name == 'faiss-gpu' else 'faiss'} "
                           f"is not available; install the 'faiss' or 'gpu' extra or use bank.knn=torch")
    return name


def _put_self_back(sims: torch.Tensor, index: torch.Tensor, self_index: torch.Tensor, k: int):
    """From a descending top-(k+1) search, the top k with each query's own entry counted as 0.

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


def knn(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
        backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``base`` by inner product, for each query; see knn_exact."""
    backend = resolve_backend(backend, queries.device)
    if backend == "torch":
        return knn_exact(queries, base, k, self_index=self_index)
    faiss = _faiss()
    kk = min(k + 1, base.shape[0]) if self_index is not None else k
    if backend == "faiss-gpu":
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
    return _put_self_back(sims, index, self_index.to(index.device), k)


_GPU_RESOURCES: dict = {}


def _gpu_resources(device: torch.device):
    """One StandardGpuResources per device and process (FAISS resources are not shareable)."""
    key = device.index or 0
    if key not in _GPU_RESOURCES:
        _GPU_RESOURCES[key] = _faiss().StandardGpuResources()
    return _GPU_RESOURCES[key]
