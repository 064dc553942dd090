"""Nearest-neighbour search by inner product: the backends, their registry and the one entry that
applies the self rule (``neighbours``). A leaf module: tensors in, tensors out, no training state,
no collectives. The engine's refresh searches the gathered [u, v] bank with it (docs/distributed.md,
"The refresh").

Backends, chosen by ``bank.knn`` (KnnSettings.knn). Exact, all returning the same neighbours up to ties:
- ``faiss-gpu``: brute-force inner product on the GPU (``faiss.knn_gpu``), needs FAISS-GPU and CUDA;
- ``faiss-cpu``: exact ``IndexFlatIP`` on the CPU;
- ``torch``: exact matmul + topk in row chunks on the bank's device (knn.exact): the reference, and
  the dependable path on a GPU without FAISS.
Approximate, for banks where an exact search costs N^2 (docs/benchmarks.md, "The refresh at a
million rows"):
- ``torch-ivf``: ``nlist`` k-means lists trained on a seeded sample of the bank; the queries of a
  list are scored together by one matrix product against the rows of the ``nprobe`` lists they
  vote for. On the bank's device: CPU or GPU, no FAISS needed;
- ``faiss-ivf``: FAISS's inverted file; each query scans its own ``nprobe`` nearest lists (on the
  GPU when the bank is on CUDA and FAISS-GPU is installed);
- ``faiss-ivfpq``: the same lists holding product-quantised rows (dims / 4 bytes a row instead of
  4 dims: 16x less memory, lower recall);
- ``faiss-hnsw``: a navigable small-world graph (no training; ``ef_search`` candidates per query).
``auto`` takes faiss-gpu on a CUDA device when it is installed, else torch there; on the CPU
faiss-cpu when installed (the faster exact search there: docs/benchmarks.md#exact-cpu), else
torch; from ``exact_below`` rows on it takes faiss-ivf (on the GPU with FAISS-GPU),
or torch-ivf where FAISS (FAISS-GPU on CUDA) is missing.
Every backend takes a float16 bank (docs/distributed.md, "A compressed bank") and returns float32
similarities.

A backend is one function of the ``Backend`` signature, registered in ``REGISTRY`` by its name: it
returns the plain top-``width`` of its queries against the base and knows nothing of the self
rule. The SCBCH similarity sets each sample's similarity to itself to 0 rather than removing it;
``neighbours`` does that once for every backend: a search for k + 1, then the self entry put back
at 0 (put_self_back).
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from scbch_dist.knn import exact
from scbch_dist.knn.exact import HALF, exact_topk
from scbch_dist.knn.settings import KnnSettings

SCORE_BLOCK = 1 << 24  # similarity entries (64 MB of float32) per matrix product of torch_ivf
VOTES = 4  # nearest lists each query votes for in probe_lists
HNSW_M = 32  # faiss-hnsw: links per node of the graph


class Backend(Protocol):
    """What REGISTRY holds: one search function of this signature per backend name."""

    def __call__(self, queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
                 query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``width`` largest inner products of each query row against ``base``, no self rule.

        Args:
            queries: (m, d); base: (N, d), same device, float32 (float64 for a reference) or float16.
            width: neighbours per query, <= N.
            settings: the search's settings (bank.*); seed: of the IVF training sample (train.seed).
            query_rows: (m,) the rows of ``base`` the queries are, when they are bank rows, else
                None: a hint to save work (torch-ivf reuses the rows' lists), never a change of result.
        Returns:
            (sims, index): (m, width) float32 (float64 for float64 rows) descending, (m, width) int64
            rows of ``base``; on the queries' device.
        """


# ------------------------------------------------------------------------------------------ torch


def torch_exact(queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
                query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch``: exact matmul + topk in chunks (exact_topk)."""
    return exact_topk(queries, base, width)


def auto_nlist(n: int, per_sqrt: float = 4.0) -> int:
    """About ``per_sqrt`` sqrt(n) lists as a power of two, keeping >= 39 rows per list. FAISS's
    guidance is 4 sqrt(n) for its per-query scans; torch-ivf's list-by-list matrix products want
    fewer, larger lists (sqrt(n)), where the same recall costs less (docs/benchmarks.md)."""
    nlist = 1 << max(int(round(np.log2(per_sqrt * np.sqrt(max(n, 1))))), 0)
    while nlist > 1 and n < 39 * nlist:
        nlist //= 2
    return nlist


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
    follows where the queries of a list actually lie: on a trained-like bank it finds more of the
    neighbours than the lists nearest to the centroid alone, with no more rows scanned
    (docs/benchmarks.md, "The refresh at a million rows")."""
    nlist = centroids.shape[0]
    votes = torch.zeros(nlist, nlist, device=centroids.device)
    own = query_top[:, :1].expand_as(query_top)
    votes.index_put_((own.reshape(-1), query_top.reshape(-1)), torch.ones(query_top.numel(), device=votes.device),
                     accumulate=True)
    # cos in [-1, 1] scaled into [0, 0.5): orders equal votes only; the list itself always first
    score = votes + (centroids @ centroids.T + 1) / 4.0001
    score.fill_diagonal_(float("inf"))
    return torch.topk(score, min(nprobe, nlist), dim=1).indices


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


def training_sample(n: int, nlist: int, train_rows: int, seed: int) -> np.ndarray:
    """The sorted rows (of n) an IVF's ``nlist`` lists are trained on: ``train_rows`` of them, at
    least 39 a list (FAISS's minimum), drawn with ``seed`` so every rank trains the same lists."""
    return np.sort(np.random.default_rng(seed).choice(n, min(n, max(train_rows, 39 * nlist)), replace=False))


def _grouped(lists: torch.Tensor, nlist: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions sorted by list, and (nlist + 1,) offsets: list j holds order[starts[j]:starts[j + 1]]."""
    order = torch.argsort(lists, stable=True)
    starts = torch.zeros(nlist + 1, dtype=torch.long)
    starts[1:] = torch.cumsum(torch.bincount(lists, minlength=nlist).cpu(), 0)
    return order, starts


def torch_ivf(queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
              query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch-ivf``: an inverted file searched in blocks.

    The bank's rows are split into ``nlist`` k-means lists (trained on a seeded sample of
    ``train_rows`` rows). The queries of one list are searched together, by one matrix product,
    against the rows of ``nprobe`` lists: itself and those its queries lie nearest to (probe_lists).
    On a CPU this turns FAISS's per-query list scans into BLAS matrix products, more candidate
    pairs per second at a coarser probing (docs/benchmarks.md, "The refresh at a million rows");
    on a GPU it is IVF without FAISS. ``base`` may be float16: blocks are cast to float32 one at a
    time, so the bank is never held in float32. Queries whose probed lists hold fewer than
    ``width`` rows are searched exactly.
    """
    n = base.shape[0]
    nlist = min(settings.nlist or auto_nlist(n, per_sqrt=1.0), n)
    sample = torch.from_numpy(training_sample(n, nlist, settings.train_rows, seed))
    centroids = kmeans_ip(base[sample.to(base.device)], nlist, seed=seed)
    votes = min(VOTES, nlist)
    base_top = assign_lists(base, centroids, top=votes).view(n, votes)
    if query_rows is not None:  # the queries are bank rows: their lists are known already
        query_top = base_top[query_rows]
    else:
        query_top = assign_lists(queries, centroids, top=votes).view(-1, votes)
    members, starts = _grouped(base_top[:, 0], nlist)
    askers, q_starts = _grouped(query_top[:, 0], nlist)
    probe = probe_lists(query_top, centroids, settings.nprobe).cpu()
    sims = torch.full((queries.shape[0], width), -float("inf"), device=queries.device)
    index = torch.full((queries.shape[0], width), -1, dtype=torch.long, device=queries.device)
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
        if cand.numel() < width:
            continue  # left at -1: searched exactly below
        c = cand.numel()
        torch.index_select(base, 0, cand, out=gathered[:c])
        if rows is not gathered:
            rows[:c].copy_(gathered[:c])
        for a in range(q_starts[g], q_starts[g + 1], block):
            q = askers[a:min(a + block, q_starts[g + 1])]
            v, i = torch.topk(queries[q].float() @ rows[:c].T, width, dim=1)
            sims[q], index[q] = v, cand[i]
    short = (index < 0).any(1)
    if short.any():
        sims[short], index[short] = exact_topk(queries[short], base, width)
    return sims, index


# ------------------------------------------------------------------------------------------ FAISS


def faiss_available(gpu: bool = False) -> bool:
    if importlib.util.find_spec("faiss") is None:
        return False
    if not gpu:
        return True
    try:
        return _faiss().get_num_gpus() > 0 and torch.cuda.is_available()
    except Exception:
        return False


def _faiss():
    import faiss

    return faiss


_GPU_RESOURCES: dict = {}


def _gpu_resources(device: torch.device):
    """One StandardGpuResources per device and process (FAISS resources are not shareable)."""
    key = device.index or 0
    if key not in _GPU_RESOURCES:
        _GPU_RESOURCES[key] = _faiss().StandardGpuResources()
    return _GPU_RESOURCES[key]


def float32_chunks(rows: torch.Tensor, chunk: int | None = None):
    """Contiguous float32 numpy copies of ``rows`` (n, d), ``chunk`` (default CHUNK_ROWS) rows at a
    time (FAISS takes float32 only; a float16 bank is converted piece by piece, never whole)."""
    chunk = chunk or exact.CHUNK_ROWS
    for start in range(0, rows.shape[0], chunk):
        yield np.ascontiguousarray(rows[start:start + chunk].detach().cpu().float().numpy())


def faiss_search(index, queries: torch.Tensor, base: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``width`` of the queries in a filled FAISS CPU or GPU ``index`` of ``base``, as the
    Backend signature returns it. Queries whose scanned lists held fewer than ``width`` rows are
    searched exactly. The results are written in place: at a million rows each is hundreds of MB
    at the refresh's peak; the caller lets the index go before the self entry is put back."""
    s = np.empty((queries.shape[0], width), np.float32)
    i = np.empty((queries.shape[0], width), np.int64)
    for start, q in zip(range(0, queries.shape[0], exact.CHUNK_ROWS), float32_chunks(queries, exact.CHUNK_ROWS)):
        s[start:start + q.shape[0]], i[start:start + q.shape[0]] = index.search(q, width)
    short = (i < 0).any(1)
    if short.any():
        rows = queries[torch.from_numpy(short).to(queries.device)].cpu()
        s[short], i[short] = (t.numpy() for t in exact_topk(rows, base.cpu(), width))
    return torch.from_numpy(s).to(queries.device), torch.from_numpy(i).to(queries.device)


def faiss_flat(queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
               query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``faiss-cpu``: an exact ``IndexFlatIP`` (it holds a float32 copy of a float16 bank)."""
    index = _faiss().IndexFlatIP(base.shape[1])
    for rows in float32_chunks(base):
        index.add(rows)
    return faiss_search(index, queries, base, width)


def faiss_gpu(queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
              query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``faiss-gpu``: brute force on the queries' GPU (``faiss.knn_gpu``), float16 read natively."""
    faiss = _faiss()
    import faiss.contrib.torch_utils  # noqa: F401  (lets knn_gpu take torch tensors)

    res = _gpu_resources(queries.device)
    dtype = torch.float16 if base.dtype == torch.float16 else torch.float32
    sims, index = faiss.knn_gpu(res, queries.to(dtype).contiguous(), base.to(dtype).contiguous(), width,
                                metric=faiss.METRIC_INNER_PRODUCT, device=queries.device.index or 0)
    return sims.float(), index.long()


def ivf_index(base: torch.Tensor, settings: KnnSettings, seed: int, *, pq: bool):
    """A FAISS inverted file over ``base`` (N, d), trained on a seeded sample and filled: rows kept
    whole (float16 rows as float16, FAISS's fp16 scalar quantiser, exact for them) or product
    quantised (``pq``). The whole-row one moves to the bank's GPU when FAISS-GPU is installed."""
    faiss = _faiss()
    n, d = base.shape
    nlist = settings.nlist or auto_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    if pq:
        if d % 4:
            raise ValueError(f"bank.knn=faiss-ivfpq needs a row width divisible by 4, got {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, d // 4, 8, faiss.METRIC_INNER_PRODUCT)
    elif base.dtype in HALF:
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT, False)  # rows, not residuals: exact
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    if not pq and base.device.type == "cuda" and faiss_available(gpu=True):
        index = faiss.index_cpu_to_gpu(_gpu_resources(base.device), base.device.index or 0, index)
    sample = torch.from_numpy(training_sample(n, nlist, settings.train_rows, seed))
    index.train(next(float32_chunks(base[sample.to(base.device)], n)))
    index.nprobe = min(settings.nprobe, nlist)
    for rows in float32_chunks(base):
        index.add(rows)
    return index


def faiss_ivf(queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
              query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``faiss-ivf``: each query scans its own ``nprobe`` nearest lists."""
    return faiss_search(ivf_index(base, settings, seed, pq=False), queries, base, width)


def faiss_ivfpq(queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
                query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``faiss-ivfpq``: faiss-ivf's lists holding product-quantised rows."""
    return faiss_search(ivf_index(base, settings, seed, pq=True), queries, base, width)


def faiss_hnsw(queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings, seed: int,
               query_rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``faiss-hnsw``: a graph of HNSW_M links per node, searched with ``ef_search`` candidates (at
    least ``width``); float16 rows stored as float16."""
    faiss = _faiss()
    d = base.shape[1]
    index = (faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_fp16, HNSW_M, faiss.METRIC_INNER_PRODUCT)
             if base.dtype in HALF else faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT))
    for rows in float32_chunks(base):
        index.add(rows)
    index.hnsw.efSearch = max(settings.ef_search, width)
    return faiss_search(index, queries, base, width)


# ------------------------------------------------------------------------------ registry and entry

REGISTRY: dict[str, Backend] = {
    "torch": torch_exact,
    "faiss-cpu": faiss_flat,
    "faiss-gpu": faiss_gpu,
    "torch-ivf": torch_ivf,
    "faiss-ivf": faiss_ivf,
    "faiss-ivfpq": faiss_ivfpq,
    "faiss-hnsw": faiss_hnsw,
}
BACKENDS = ("auto", *REGISTRY)  # the values bank.knn accepts (config validation)


def resolve_backend(settings: KnnSettings, device: torch.device, rows: int) -> str:
    """The registered backend ``settings.knn`` means for a bank of ``rows`` rows on ``device``.
    Raises where FAISS is asked for and missing, so that every rank of a sharded search fails
    alike, before the ring starts."""
    name = settings.knn
    if name == "auto":
        gpu = device.type == "cuda"
        faiss = faiss_available(gpu=gpu)
        if rows >= settings.exact_below:  # FAISS's per-query probing finds more at equal time (docs/benchmarks.md)
            return "faiss-ivf" if faiss else "torch-ivf"
        if gpu:
            return "faiss-gpu" if faiss else "torch"
        return "faiss-cpu" if faiss else "torch"
    if name not in REGISTRY:
        raise ValueError(f"bank.knn must be one of {('auto', *REGISTRY)}, got {name!r}")
    if name.startswith("faiss") and not faiss_available(gpu=name == "faiss-gpu"):
        raise RuntimeError(f"bank.knn={name} but {'FAISS-GPU with CUDA' if name == 'faiss-gpu' else 'faiss'} "
                           f"is not available; install the 'faiss' or 'gpu' extra or use bank.knn=torch")
    return name


def search(backend: str, queries: torch.Tensor, base: torch.Tensor, width: int, *, settings: KnnSettings,
           seed: int = 0, query_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain top-``width`` of the registered ``backend`` (a name resolve_backend returned), no
    self rule: see Backend. The step of the sharded search at each shard."""
    return REGISTRY[backend](queries, base, width, settings=settings, seed=seed, query_rows=query_rows)


def put_self_back(sims: torch.Tensor, index: torch.Tensor, self_index: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a descending top-(k+1) search, the top k with each query's own entry counted as 0.
    sims, index: (m, k + 1) (or (m, k) when the bank has only k rows); self_index: (m,) in the
    same numbering as index. Returns (sims, index), each (m, k).

    Exact: a row absent from the k+1 results has a similarity <= the smallest returned one, so
    the true top k lies among the returned rows plus the self entry. Done CHUNK_ROWS queries at a
    time: its temporaries are a few times the result's size, which at a million rows is
    hundreds of MB."""
    chunk = exact.CHUNK_ROWS
    if sims.shape[0] > chunk:
        parts = [put_self_back(sims[a:a + chunk], index[a:a + chunk], self_index[a:a + chunk], k)
                 for a in range(0, sims.shape[0], chunk)]
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


def neighbours(queries: torch.Tensor, base: torch.Tensor, k: int, *, self_index: torch.Tensor | None = None,
               settings: KnnSettings | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``base`` by inner product, for each query, with the backend
    ``settings.knn`` (default: KnnSettings(), ``auto``).

    Args:
        queries: (m, d); base: (N, d), same device; either may be float16 (a compressed bank,
            docs/distributed.md: torch-ivf, faiss-ivf, faiss-hnsw and faiss-gpu keep it so, the
            others compute in float32 pieces or hold a float32 copy inside their index).
        self_index: (m,) optional row of ``base`` that is each query itself: that entry counts as
            similarity 0, not removed (the SCBCH definition, as exact_topk computes it).
        seed: of the IVF lists' training sample (the engine passes train.seed).
    Returns:
        (sims, index), each (m, k): float32 similarities descending, int64 rows of ``base``.
        Approximate backends may miss true neighbours (recall below 1), never the self rule.
    """
    settings = settings if settings is not None else KnnSettings()
    n = base.shape[0]
    if k > n:
        raise ValueError(f"k={k} neighbours requested from a bank of {n} rows")
    backend = resolve_backend(settings, queries.device, n)
    if self_index is None:
        return search(backend, queries, base, k, settings=settings, seed=seed)
    # the self entry needs one row more; the index (if any) is let go before the self entry is put back
    sims, index = search(backend, queries, base, min(k + 1, n), settings=settings, seed=seed, query_rows=self_index)
    return put_self_back(sims, index, self_index.to(index.device), k)
