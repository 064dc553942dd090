"""Nearest-neighbour search by inner product: a leaf module (tensors in, tensors out, no training
state, no collectives). The engine's refresh searches the gathered [u, v] bank with it
(docs/distributed.md).

Backends, chosen by ``bank.knn``. Exact, all returning the same neighbours up to ties:
- ``faiss-gpu``: brute-force inner product on the GPU (``faiss.knn_gpu``), needs FAISS-GPU and CUDA;
- ``faiss-cpu``: exact ``IndexFlatIP`` on the CPU;
- ``torch``: exact matmul + topk in row chunks on the bank's device: the reference, and the
  dependable path on a GPU without FAISS.
Approximate, for banks where an exact search costs N^2 (SearchParams; docs/benchmarks.md, "The
refresh at a million rows"):
- ``torch-ivf``: ``nlist`` k-means lists trained on a seeded sample of the bank; the queries of a
  list are scored together by one matrix product against the rows of the ``nprobe`` lists they
  vote for (knn_ivf). On the bank's device: CPU or GPU, no FAISS needed;
- ``faiss-ivf``: FAISS's inverted file; each query scans its own ``nprobe`` nearest lists (on the
  GPU when the bank is on CUDA and FAISS-GPU is installed);
- ``faiss-ivfpq``: the same lists holding product-quantised rows (dims / 4 bytes a row instead of
  4 dims: 16x less memory, lower recall);
- ``faiss-hnsw``: a navigable small-world graph (no training; ``ef_search`` candidates per query).
``auto`` takes faiss-gpu on a CUDA device when it is installed, else torch there; on the CPU
faiss-cpu when installed (1.4-2.2x faster than torch for 10k-100k banks on 2 cores,
tests/benchmarks/bench_scale.py), else torch; from ``exact_below`` rows on it takes faiss-ivf (on
the GPU with FAISS-GPU), or torch-ivf where FAISS (FAISS-GPU on CUDA) is missing.
Every backend takes a float16 bank (docs/distributed.md, "A compressed bank") and returns float32
similarities.

The SCBCH similarity sets each sample's similarity to itself to 0 rather than removing it; every
backend reproduces that exactly (a search for k + 1, then the self entry put back at 0).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "faiss-cpu", "faiss-gpu", "torch-ivf", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
FAISS_APPROXIMATE = ("faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
HALF = (torch.float16, torch.bfloat16)
CHUNK_ROWS = 65536  # rows of a float16 bank converted to float32 at a time for FAISS


@dataclass(frozen=True)
class SearchParams:
    """Settings of the approximate backends and of ``auto`` (config: bank.*)."""

    nlist: int = 0  # IVF lists; 0: a power of two near sqrt(N) (torch-ivf) or 4 sqrt(N) (FAISS), >= 39 rows a list
    nprobe: int = 32  # IVF lists scanned per query
    ef_search: int = 128  # HNSW candidates per query (at least k + 1)
    hnsw_m: int = 32  # HNSW links per node
    train_rows: int = 65536  # rows (a seeded sample of the bank) the IVF lists are trained on
    exact_below: int = 200_000  # auto: an exact backend below this many bank rows, IVF above
    seed: int = 0


def auto_nlist(n: int, per_sqrt: float = 4.0) -> int:
    """About ``per_sqrt`` sqrt(n) lists as a power of two, keeping >= 39 rows per list. FAISS's
    guidance is 4 sqrt(n) for its per-query scans; torch-ivf's list-by-list matrix products want
    fewer, larger lists (sqrt(n)), where the same recall costs less (docs/benchmarks.md)."""
    nlist = 1 << max(int(round(np.log2(per_sqrt * np.sqrt(max(n, 1))))), 0)
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


def knn_exact(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
              chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query row against ``base`` (torch reference).

    Args:
        queries: (m, d). base: (N, d), same device, same dtype or float16 (then the sims are float32).
        self_index: (m,) optional row of ``base`` that is each query itself; that entry's
            similarity is set to 0 (not removed), as the SCBCH weights define it.
        chunk: query rows per matmul, bounding memory at chunk x N.
    Returns:
        (sims, index), each (m, k), sims in descending order.
    """
    if k > base.shape[0]:
        raise ValueError(f"k={k} neighbours requested from a bank of {base.shape[0]} rows")
    chunk = max(1, min(chunk, EXACT_SCORES // max(base.shape[0], 1)))
    sims, index = [], []
    for start in range(0, queries.shape[0], chunk):
        q = queries[start:start + chunk]
        if base.dtype not in HALF:
            s = q @ base.T
        else:  # a float16 bank, multiplied in float32 pieces (float16 matmul on a CPU is slow and coarse)
            q = q.float()
            s = torch.cat([q @ base[b:b + CHUNK_ROWS].float().T for b in range(0, base.shape[0], CHUNK_ROWS)], 1)
        if self_index is not None:
            rows = torch.arange(s.shape[0], device=s.device)
            s[rows, self_index[start:start + chunk]] = 0.0
        v, i = torch.topk(s, k, dim=1)
        sims.append(v)
        index.append(i)
    return torch.cat(sims), torch.cat(index)


SCORE_BLOCK = 1 << 24  # similarity entries (64 MB of float32) per matrix product of knn_ivf
EXACT_SCORES = 1 << 28  # knn_exact: query rows per chunk shrink so a chunk's scores stay within 1 GB


def assign_lists(rows: torch.Tensor, centroids: torch.Tensor, top: int = 1, chunk: int = 16384) -> torch.Tensor:
    """(n, top) int64: the ``top`` centroids (of (nlist, d) float32) with the largest inner products
    for each of the rows (n, d), best first ((n,) when top is 1); any float dtype, computed in
    float32 chunks of ``chunk`` rows."""
    out = torch.empty(rows.shape[0], top, dtype=torch.long, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        scores = rows[start:start + chunk].float() @ centroids.T
        out[start:start + chunk] = scores.argmax(1, keepdim=True) if top == 1 else torch.topk(scores, top, dim=1).indices
    return out[:, 0] if top == 1 else out


def probe_lists(query_top: torch.Tensor, centroids: torch.Tensor, nprobe: int) -> torch.Tensor:
    """(nlist, nprobe) int64: the lists the queries of each list scan, the list itself first.

    A list's queries vote with their ``top`` nearest lists (query_top: (m, top), first = their own);
    the lists with the most votes are scanned, equal votes broken by centroid similarity. Voting
    follows where the queries of a list actually lie; on a trained-like bank it finds 0.5 to 1
    point more of the neighbours than the lists nearest to the centroid alone, with no more rows
    scanned (docs/benchmarks.md)."""
    nlist = centroids.shape[0]
    votes = torch.zeros(nlist, nlist, device=centroids.device)
    own = query_top[:, :1].expand_as(query_top)
    votes.index_put_((own.reshape(-1), query_top.reshape(-1)), torch.ones(query_top.numel(), device=votes.device),
                     accumulate=True)
    # cos in [-1, 1] scaled into [0, 0.5): orders equal votes only; the list itself always first
    score = votes + (centroids @ centroids.T + 1) / 4.0001
    score.fill_diagonal_(float("inf"))
    return torch.topk(score, min(nprobe, nlist), dim=1).indices


VOTES = 4  # nearest lists each query votes for in probe_lists


def kmeans_ip(rows: torch.Tensor, nlist: int, *, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Spherical k-means by inner product (rows and centroids on the unit sphere): (nlist, d)
    float32 unit centroids of ``rows`` (n >= nlist, d). Seeded: the same rows and seed give the
    same centroids on every rank. A list left empty is re-seeded with a random row."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(rows.shape[0], generator=g)[:nlist].to(rows.device)
    centroids = F.normalize(rows[pick].float(), dim=1)
    for _ in range(iters):
        lists = assign_lists(rows, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, lists, rows.float())
        empty = torch.bincount(lists, minlength=nlist) == 0
        if empty.any():
            fill = torch.randint(rows.shape[0], (int(empty.sum()),), generator=g).to(rows.device)
            sums[empty] = rows[fill].float()
        centroids = F.normalize(sums, dim=1)
    return centroids


def knn_ivf(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
            params: SearchParams = SearchParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate ``k`` largest inner products by an inverted file searched in blocks (``torch-ivf``).

    The bank's rows are split into ``nlist`` k-means lists (trained on a seeded sample of
    ``train_rows`` rows). The queries of one list are searched together, by one matrix product,
    against the rows of ``nprobe`` lists: itself and those its queries lie nearest to (probe_lists). On a
    CPU this turns FAISS's per-query list scans into BLAS matrix products, 3-5x more candidate
    pairs per second, at a coarser probing (docs/benchmarks.md); on a GPU it is IVF without FAISS. ``base`` may be
    float16: blocks are cast to float32 one at a time, so the bank is never held in float32.

    Args and returns as knn_exact. Queries whose probed lists hold fewer than k + 1 rows are
    searched exactly.
    """
    n = base.shape[0]
    nlist = min(params.nlist or auto_nlist(n, per_sqrt=1.0), n)
    sample = torch.from_numpy(training_sample(n, nlist, params))
    centroids = kmeans_ip(base[sample.to(base.device)], nlist, seed=params.seed)
    votes = min(VOTES, nlist)
    base_top = assign_lists(base, centroids, top=votes).view(n, votes)
    query_top = base_top[self_index] if self_index is not None else assign_lists(queries, centroids, top=votes).view(-1, votes)
    members, starts = _grouped(base_top[:, 0], nlist)
    askers, q_starts = _grouped(query_top[:, 0], nlist)
    probe = probe_lists(query_top, centroids, params.nprobe).cpu()
    kk = min(k + 1, n) if self_index is not None else k
    sims = torch.full((queries.shape[0], kk), -float("inf"), device=queries.device)
    index = torch.full((queries.shape[0], kk), -1, dtype=torch.long, device=queries.device)
    sizes = starts[1:] - starts[:-1]
    # buffers reused by every block: fresh multi-megabyte tensors per list cost more in page faults
    # than the matrix products themselves on a 2-core CPU
    most = int(sizes[probe].sum(1).max())
    gathered = torch.empty(most, base.shape[1], dtype=base.dtype, device=base.device)
    rows = gathered if base.dtype == torch.float32 else torch.empty(most, base.shape[1], device=base.device)
    block = max(1, SCORE_BLOCK // most)
    starts, q_starts = starts.tolist(), q_starts.tolist()
    for g in range(nlist):
        if q_starts[g] == q_starts[g + 1]:
            continue
        cand = torch.cat([members[starts[j]:starts[j + 1]] for j in probe[g].tolist()])
        if cand.numel() < kk:
            continue  # left at -1: searched exactly below
        c = cand.numel()
        torch.index_select(base, 0, cand, out=gathered[:c])
        if rows is not gathered:
            rows[:c].copy_(gathered[:c])
        for a in range(q_starts[g], q_starts[g + 1], block):
            q = askers[a:min(a + block, q_starts[g + 1])]
            v, i = torch.topk(queries[q].float() @ rows[:c].T, kk, dim=1)
            sims[q], index[q] = v, cand[i]
    short = (index < 0).any(1)
    if short.any():
        sims[short], index[short] = knn_exact(queries[short], base, kk)
    if self_index is None:
        return sims, index
    return put_self_back(sims, index, self_index.to(index.device), k)


def training_sample(n: int, nlist: int, params: SearchParams) -> np.ndarray:
    """The sorted rows (of n) an IVF's ``nlist`` lists are trained on: ``train_rows`` of them, at
    least 39 a list (FAISS's minimum), drawn with ``seed`` so every rank trains the same lists."""
    return np.sort(np.random.default_rng(params.seed).choice(n, min(n, max(params.train_rows, 39 * nlist)), replace=False))


def _grouped(lists: torch.Tensor, nlist: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions sorted by list, and (nlist + 1,) offsets: list j holds order[starts[j]:starts[j + 1]]."""
    order = torch.argsort(lists, stable=True)
    starts = torch.zeros(nlist + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(torch.bincount(lists, minlength=nlist).cpu(), 0)
    return order, starts


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
        if rows >= params.exact_below:  # FAISS's per-query probing finds more at equal time (docs/benchmarks.md)
            if device.type == "cuda":
                return "faiss-ivf" if faiss_available(gpu=True) else "torch-ivf"
            return "faiss-ivf" if faiss_available() else "torch-ivf"
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
    the true top k lies among the returned rows plus the self entry. Done CHUNK_ROWS queries at a
    time: its temporaries are a few times the result's size, which at a million rows is
    hundreds of MB."""
    if sims.shape[0] > CHUNK_ROWS:
        parts = [put_self_back(sims[a:a + CHUNK_ROWS], index[a:a + CHUNK_ROWS], self_index[a:a + CHUNK_ROWS], k)
                 for a in range(0, sims.shape[0], CHUNK_ROWS)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    is_self = index == self_index[:, None]
    sims = torch.where(is_self, torch.zeros_like(sims), sims)
    missing = ~is_self.any(1)
    # append the self entry (0) where the search did not return it
    extra_s = torch.where(missing, torch.zeros_like(sims[:, 0]), torch.full_like(sims[:, 0], -float("inf")))
    sims = torch.cat([sims, extra_s[:, None]], 1)
    index = torch.cat([index, self_index[:, None]], 1)
    top, pos = torch.sort(sims, dim=1, descending=True, stable=True)
    return top[:, :k], torch.gather(index, 1, pos[:, :k])


def float32_chunks(rows: torch.Tensor, chunk: int | None = None):
    """Contiguous float32 numpy copies of ``rows`` (n, d), ``chunk`` (default CHUNK_ROWS) rows at a
    time (FAISS takes float32 only; a float16 bank is converted piece by piece, never whole)."""
    chunk = chunk or CHUNK_ROWS
    for start in range(0, rows.shape[0], chunk):
        yield np.ascontiguousarray(rows[start:start + chunk].detach().cpu().float().numpy())


def approximate_index(backend: str, base: torch.Tensor, params: SearchParams):
    """A FAISS index of ``backend`` over ``base`` (N, d), trained and filled. A float16 bank is
    stored as float16 in the index (scalar quantiser fp16: exact for float16 rows), so the index
    takes half the memory of a float32 one. faiss-ivf moves to the bank's GPU when FAISS-GPU is
    installed."""
    faiss = _faiss()
    n, d = base.shape
    half = base.dtype in HALF
    if backend == "faiss-hnsw":
        index = (faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                 if half else faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT))
    else:
        nlist = params.nlist or auto_nlist(n)
        quantizer = faiss.IndexFlatIP(d)
        if backend == "faiss-ivfpq":
            if d % 4:
                raise ValueError(f"bank.knn=faiss-ivfpq needs a row width divisible by 4, got {d}")
            index = faiss.IndexIVFPQ(quantizer, d, nlist, d // 4, 8, faiss.METRIC_INNER_PRODUCT)
        elif half:
            index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_INNER_PRODUCT, False)  # rows, not residuals: exact
        else:
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = params.seed
        if backend == "faiss-ivf" and base.device.type == "cuda" and faiss_available(gpu=True):
            index = faiss.index_cpu_to_gpu(_gpu_resources(base.device), base.device.index or 0, index)
        sample = torch.from_numpy(training_sample(n, nlist, params))
        index.train(next(float32_chunks(base[sample.to(base.device)], n)))
        index.nprobe = min(params.nprobe, nlist)
    for rows in float32_chunks(base):
        index.add(rows)
    return index


def knn(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
        backend: str = "auto", params: SearchParams = SearchParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``base`` by inner product, for each query; see knn_exact.
    Approximate backends may miss true neighbours (recall below 1), never the self rule.

    ``queries`` and ``base`` may be float16 (a compressed bank, docs/distributed.md): torch-ivf,
    faiss-ivf, faiss-hnsw and faiss-gpu keep it so; the other exact backends compute in float32
    pieces (torch) or hold a float32 copy inside the index (faiss-cpu). Similarities come back
    as float32."""
    backend = resolve_backend(backend, queries.device, base.shape[0], params)
    if backend == "torch":
        return knn_exact(queries, base, k, self_index=self_index)
    if backend == "torch-ivf":
        return knn_ivf(queries, base, k, self_index=self_index, params=params)
    faiss = _faiss()
    kk = min(k + 1, base.shape[0]) if self_index is not None else k
    if backend == "faiss-gpu":
        import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch tensors)

        res = _gpu_resources(queries.device)
        dtype = torch.float16 if base.dtype == torch.float16 else torch.float32  # knn_gpu reads float16 natively
        sims, index = faiss.knn_gpu(res, queries.to(dtype).contiguous(), base.to(dtype).contiguous(), kk,
                                    metric=faiss.METRIC_INNER_PRODUCT, device=queries.device.index or 0)
        sims, index = sims.float(), index.long()
    else:
        if backend in FAISS_APPROXIMATE:
            index_ = approximate_index(backend, base, params)
            if backend == "faiss-hnsw":
                index_.hnsw.efSearch = max(params.ef_search, kk)
        else:
            index_ = faiss.IndexFlatIP(base.shape[1])
            for rows in float32_chunks(base):
                index_.add(rows)
        # results written in place, and the index let go before the self entry is put back: at a
        # million rows each of these is hundreds of MB at the refresh's peak
        s = np.empty((queries.shape[0], kk), np.float32)
        i = np.empty((queries.shape[0], kk), np.int64)
        for start, q in zip(range(0, queries.shape[0], CHUNK_ROWS), float32_chunks(queries, CHUNK_ROWS)):
            s[start:start + q.shape[0]], i[start:start + q.shape[0]] = index_.search(q, kk)
        del index_
        short = (i < 0).any(1)  # fewer than kk rows in the scanned lists: those queries searched exactly
        if short.any():
            s[short], i[short] = (t.numpy() for t in knn_exact(queries[torch.from_numpy(short).to(queries.device)].cpu(),
                                                               base.cpu(), kk))
        sims, index = torch.from_numpy(s).to(queries.device), torch.from_numpy(i).to(queries.device)
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
