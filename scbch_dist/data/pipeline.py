"""WebDataset readers: the training stream, and the exactly-once pass used by the CSCC refresh and
by evaluation.

Training stream, per epoch, for rank r of W with K loader workers:
  1. the split's shard list is permuted by (seed, epoch, pass), identically on every rank;
  2. rank r takes shards r, r+W, ...; its worker k takes every K-th of those;
  3. each worker reads its shards (webdataset's tar reader), validates every block
     (format.decode_group) and shuffles samples in windows of ``shuffle_buffer``;
  4. the rank's main process cuts the arriving samples into batches of ``batch_size`` until it
     has taken its quota of ceil(N_train / W) samples, starting another pass over its shards
     if they run out first. Every rank therefore takes exactly ceil(quota / batch_size) steps
     (the last batch partial unless drop_last), and no rank can run dry and hang the others.
With one process this is exactly one uniformly shuffled pass over the split when the buffer
holds the whole split (the default for benchmark-sized data), as in the published code.

The stream keeps one DataLoader whose K workers persist from the first epoch to ``close()``:
the workers hold copies of the dataset made when they started, so the (epoch, pass) of each
iteration reaches them through shared memory that the main process writes before it starts the
iteration (TrainShuffle.set_epoch). The order of the batches is the same as with fresh workers
per pass: a function of (seed, epoch, pass, rank, world, K).

The pass stream reads every id of a split exactly once over all ranks and workers, in shard
order, and yields blocks with their ids; consumers write rows into tables by id.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from scbch_dist.data.format import DatasetMeta, ShardError, check_split, check_tar_end, decode_group
from scbch_dist.data.remote import RemoteRoot, Retry, RetryingStream, ShardCache
from scbch_dist.errors import ScbchError

Block = dict[str, np.ndarray]
BUFFER_BYTES = 1 << 20  # a server's shard is read from the connection in pieces of this size
# A worker-side batch transform (data.transforms.BatchTransform): (block, rng or None) -> block.
Transform = Callable[[Block, "np.random.Generator | None"], Block]


def _reraise_as_shard_error(exn: Exception) -> bool:
    """webdataset handler: tar-level failures (truncated, corrupt) become errors naming the shard."""
    if isinstance(exn, ShardError):
        raise exn
    if isinstance(exn, ScbchError):  # a server's file past its retries (RemoteError): its own line
        raise type(exn)(exn.args[0]) from None  # (webdataset adds its stream and URL to the args)
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "<shard>")
    if isinstance(exn, FileNotFoundError) or _is_local(url) and not Path(url).exists():
        raise ShardError(f"{url}: missing (deleted or moved while the run was reading the dataset)") from exn
    first = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
    raise ShardError(f"{url}: truncated or corrupt tar ({first})") from exn


def _is_local(url: str) -> bool:
    """A shard path on this machine (not a URL or a pipe: webdataset opens those itself)."""
    return "://" not in url and not url.startswith("pipe:")


class DigestedShard:
    """A shard read through: the sha256 of every byte the tar reader takes, completed at the
    shard's end (``finish``: the rest read too) for comparison with the digest meta.json records.
    Locally the preflight checks every shard once; this catches a shard changed in place later,
    while epochs read it (16 bytes XOR'd after epoch 1 went unnoticed and trained on). A server's
    shard (``retry``: data.root on a server) is checked only here, as it streams. Hashing rides
    along the read: no second pass over the file."""

    def __init__(self, path: str, sha256: str | None, retry: Retry | None = None, cache: ShardCache | None = None):
        self.path, self.expected, self.digest = path, sha256, hashlib.sha256()
        self.remote, self.copy, self.cached = retry is not None, None, None
        if self.remote:
            copied = cache.lookup(sha256) if cache is not None and sha256 else None
            if copied is not None:  # this node's copy (data.cache), checked as it streams too
                self.file, self.cached = open(copied, "rb"), copied
                return
            # read in large pieces: the tar reader's 10 KB reads, each through HTTP, cost a quarter
            # of the throughput (docs/benchmarks.md, "Shards over HTTP")
            self.file = io.BufferedReader(RetryingStream(path, retry), buffer_size=BUFFER_BYTES)
            self.copy = cache.start(sha256) if cache is not None and sha256 else None
            return
        try:
            self.file = open(path, "rb")
        except FileNotFoundError:
            raise ShardError(f"{path}: missing (deleted or moved while the run was reading the dataset)") from None

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        self.digest.update(data)
        if self.copy is not None:
            self.copy.write(data)
        return data

    def finish(self) -> None:
        """Hash what the reader left (the tar's end blocks) and close."""
        if not self.file.closed:
            while self.read(1 << 20):  # hashed (and copied to data.cache) on the way
                pass
            self.file.close()

    def check(self) -> None:
        """After ``finish``: a ShardError when the bytes read differ from meta.json's digest."""
        matches = self.expected is None or self.digest.hexdigest() == self.expected
        if self.copy is not None:  # data.cache keeps only what meta.json's digest vouches for
            self.copy.keep() if matches and self.expected is not None else self.copy.drop()
        if not matches:
            if self.cached is not None:
                raise ShardError(f"{self.cached}: this node's copy of {self.path} in data.cache changed while the run "
                                 "read it (its sha256 differs from meta.json's); remove it and resume the run from its "
                                 "last checkpoint")
            if self.remote:
                raise ShardError(f"{self.path}: its sha256 differs from the one in meta.json (changed on the server, or "
                                 "damaged on the way); publish the dataset again and resume the run from its last "
                                 "checkpoint")
            raise ShardError(f"{self.path}: changed while the run was reading the dataset (its sha256 differs from "
                             "the one in meta.json, which the preflight checked); restore the shard and resume the run "
                             "from its last checkpoint")


def _open_shards(urls: list[str], sha256: dict[str, str], opened: dict[str, DigestedShard],
                 remote: Remote | None) -> Iterator[dict]:
    """{"url", "stream"} for webdataset's tar expander, one shard after another, each a
    DigestedShard (kept in ``opened``), finished when the expander asks for the next one or the end."""
    previous = None
    for url in urls:
        if previous is not None:
            previous.finish()
        if remote is None:
            previous = opened[url] = DigestedShard(url, sha256.get(Path(url).name))
        else:
            previous = opened[url] = DigestedShard(url, sha256.get(remote.names[url]), remote.retry, remote.cache)
        yield {"url": url, "stream": previous}
    if previous is not None:
        previous.finish()


@dataclass(frozen=True)
class Remote:
    """How a split's shards on a server are read: each URL's shard name in meta.json (a pipe's
    command holds it somewhere inside) and data.root's retry policy."""

    names: dict[str, str]
    retry: Retry
    cache: ShardCache | None = None  # data.cache

    @staticmethod
    def of(paths: list) -> "Remote | None":
        """For check_split's paths: None where they are local files."""
        if not paths or not isinstance(paths[0], RemoteRoot):
            return None
        return Remote({str(p): p.name for p in paths}, paths[0].retry, paths[0].cache)


def read_blocks(urls: list[str], meta: DatasetMeta, split: str, *, check_digests: bool = True,
                remote: Remote | None = None) -> Iterator[Block]:
    """Validated blocks of the given shards, in order. After each shard: its sample count against
    meta.json, then (``check_digests``, shards with a recorded sha256) the sha256 of the bytes read
    (DigestedShard); a shard's error comes before the next shard's first block. ``remote``: the
    shards are on a server (their names and the retry policy)."""
    info = meta.splits[split]
    expected = dict(zip(info.shards, info.shard_counts))
    name = (lambda url: remote.names[url]) if remote is not None else (lambda url: Path(url).name)
    for url in urls:
        if _is_local(url):  # a server's shards: their counts and digests are checked as they stream
            if not Path(url).is_file():
                raise ShardError(f"{url}: missing (deleted or moved while the run was reading the dataset)")
            check_tar_end(url)
    seen = {u: 0 for u in urls}
    opened: dict[str, DigestedShard] = {}
    streams = _open_shards(urls, dict(zip(info.shards, info.sha256)) if check_digests else {}, opened, remote)
    files = wds.tariterators.tar_file_expander(streams, handler=_reraise_as_shard_error)
    groups = wds.tariterators.group_by_keys(files, handler=_reraise_as_shard_error)
    done = iter(urls)  # the shards in the order they are read: each is over when a later one's block comes

    def over(until: str | None) -> None:
        for url in done:
            want = expected.get(name(url))
            if want is not None and seen[url] != want:
                raise ShardError(f"{url}: holds {seen[url]} samples, meta.json says {want} (truncated tar?)")
            if url in opened:
                opened[url].check()
            if url == until:
                return

    current = None
    for group in groups:
        url = group["__url__"]
        if url != current and current is not None:
            over(current)
        current = url
        block = decode_group(group, meta, split)
        seen[url] += len(block["id"])
        yield block
    over(None)


def _concat(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    return {f: np.concatenate([b[f] for b in blocks]) for f in blocks[0]}


def _take(block: Block, index) -> Block:
    return {f: v[index] for f, v in block.items()}


def _worker_info() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _assigned(urls: list[str], rank: int, world: int) -> list[str]:
    worker, workers = _worker_info()
    return urls[rank::world][worker::workers]


class TrainShuffle(IterableDataset):
    """One pass of a rank's shards for (epoch, pass): shuffled chunks of samples (worker side)."""

    def __init__(self, urls: list[str], meta: DatasetMeta, *, seed: int, rank: int, world: int,
                 buffer: int, chunk: int, transform: Transform | None = None, held_out: np.ndarray | None = None,
                 remote: Remote | None = None):
        self.urls, self.meta, self.seed, self.remote = urls, meta, seed, remote
        self.rank, self.world, self.buffer, self.chunk = rank, world, max(buffer, 1), chunk
        self.transform = transform
        self.held_out = held_out  # (N,) bool: ids never trained on (eval.validation), or None
        # (epoch, pass) of the next iteration, in shared memory: persistent loader workers hold
        # the copy of this object made when they started, so a plain attribute set later in the
        # main process would never reach them. Created here, before any worker starts, so forked
        # workers inherit the mapping (and spawned ones receive it when the dataset is pickled).
        self._position = multiprocessing.RawArray("q", 2)

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @property
    def pass_index(self) -> int:
        return int(self._position[1])

    def set_epoch(self, epoch: int, pass_index: int = 0) -> None:
        """The (epoch, pass) that the next ``__iter__`` reads, in this process and in every worker.
        Set it before starting the iteration (``iter(loader)``), never during one: each worker reads
        it once, when its iteration begins."""
        self._position[0], self._position[1] = epoch, pass_index

    def __iter__(self) -> Iterator[Block]:
        epoch, pass_index = self.epoch, self.pass_index  # read once: fixed for this whole iteration
        order = np.random.default_rng([self.seed, epoch, pass_index]).permutation(len(self.urls))
        urls = _assigned([self.urls[i] for i in order], self.rank, self.world)
        worker, _ = _worker_info()
        rng = np.random.default_rng([self.seed, epoch, pass_index, self.rank, worker, 1])
        augment_rng = np.random.default_rng([self.seed, epoch, pass_index, self.rank, worker, 2])
        window: list[Block] = []
        held = 0
        for block in itertools.chain(read_blocks(urls, self.meta, "train", remote=self.remote), [None]):
            end = block is None
            if not end and self.held_out is not None:
                block = _take(block, np.flatnonzero(~self.held_out[block["id"]]))
            if not end:
                window.append(block)
                held += len(block["id"])
            if held and (end or held >= self.buffer):
                # emit whole chunks (= batches, so the main process can pass them through
                # without copying); the permuted tail joins the next window, or ends the pass
                mixed = _take(_concat(window), rng.permutation(held))
                whole = held if end else held - held % self.chunk
                for start in range(0, whole, self.chunk):
                    chunk = {f: v[start:start + self.chunk] for f, v in mixed.items()}
                    yield self.transform(chunk, augment_rng) if self.transform is not None else chunk
                window, held = ([{f: v[whole:] for f, v in mixed.items()}], held - whole) if held > whole else ([], 0)


def _keep_numpy(block: Block) -> Block:
    return block


def _loader(dataset: IterableDataset, workers: int, *, persistent: bool = False) -> DataLoader:
    """A DataLoader of ``dataset``'s blocks in ``workers`` processes (0: in this process);
    ``persistent``: the workers outlive each iteration and serve the next one (``_close``)."""
    # Blocks travel from workers as pickled numpy arrays: for a few large arrays per message that
    # is faster than torch's per-tensor shared-memory handles (docs/benchmarks.md, "Figures quoted
    # in the code").
    # Its own generator: a DataLoader draws its workers' base seed from the global torch RNG at
    # every iterator otherwise, which would move the training RNG (dropout) by one draw per epoch
    # and pass, and a run resumed inside an epoch could not continue it exactly.
    return DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_keep_numpy,
                      prefetch_factor=4 if workers > 0 else None, generator=torch.Generator(),
                      persistent_workers=persistent and workers > 0, multiprocessing_context=_start_method(workers))


# What the fork server imports once, so that a worker it forks finds them loaded (else each worker
# of each pass would import torch again, about a second)
FORKSERVER_PRELOAD = ["torch", "numpy", "webdataset", "scbch_dist.data.pipeline", "scbch_dist.data.transforms"]


def _start_method(workers: int):
    """How loader workers start: forked from this process, unless a process group is up. Its
    communication threads (gloo's run loops) enter the interpreter on their own, and CPython 3.11
    lets a fork copy the interpreter's thread-state lock one of them holds: the new worker waits
    for it for ever (seen in CI: a two-process run's evaluation worker stuck in PyOS_AfterFork_Child,
    _PyThreadState_DeleteExcept). Then the workers come from a fork server, a fresh
    single-threaded interpreter started by exec, which no thread of this process can lock."""
    if workers == 0 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(FORKSERVER_PRELOAD)
    return context


FEEDER_JOIN_S = 5.0  # the bound on waiting for a stopped loader's feeder threads (they end at once)


def _close(loader: DataLoader) -> None:
    """Stops a persistent loader's workers and waits for them; iterating it again starts new ones."""
    # DataLoader has no public close: its persistent iterator (``_iterator``, created by the first
    # iter()) owns the workers, and ``_shutdown_workers`` is what its own __del__ calls. Calling it
    # here does not wait for garbage collection, which a suspended generator can delay.
    iterator, loader._iterator = loader._iterator, None
    if iterator is not None:
        _shut_down(iterator)


def _shut_down(iterator) -> None:
    """Stops a loader iterator's workers now and waits for the threads that fed their index
    queues. Those threads otherwise end while the next loader forks its workers, and CPython 3.11
    lets a fork copy the interpreter's thread-list lock held by an ending thread: the new worker
    then waits for it forever (seen once in CI, a two-process run stuck in its evaluation pass)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is None:  # no workers: nothing was forked
        return
    shutdown()
    for queue in getattr(iterator, "_index_queues", []):
        feeder = getattr(queue, "_thread", None)  # multiprocessing starts it at the first put
        if feeder is not None:
            feeder.join(timeout=FEEDER_JOIN_S)


@dataclass
class TrainStream:
    """The training batches of one rank. ``epoch(e)`` yields exactly ``steps_per_epoch`` batches.

    With ``workers`` > 0 the loader workers start at the first epoch and serve every later epoch
    and pass until ``close()`` (or the end of a ``with`` block); one epoch is read at a time, and
    starting another epoch makes an unfinished one raise if it is resumed."""

    root: Path  # or a remote.RemoteRoot (data.root on a server)
    meta: DatasetMeta
    batch_size: int  # per rank
    seed: int
    rank: int = 0
    world: int = 1
    workers: int = 0
    buffer: int = 16384
    drop_last: bool = False
    transform: Transform | None = None  # raw datasets: decoding, augmentation, tokenisation
    held_out: np.ndarray | None = None  # (N,) bool: training ids left out of every batch (eval.validation)

    def __post_init__(self):
        paths = check_split(self.root, self.meta, "train")
        self.urls, remote = [str(p) for p in paths], Remote.of(paths)
        if len(self.urls) < self.world:
            raise ShardError(f"{self.root}: split 'train' has {len(self.urls)} shards, fewer than the "
                             f"{self.world} processes; rewrite it with smaller shards")
        trained = self.meta.splits["train"].count - (int(self.held_out.sum()) if self.held_out is not None else 0)
        self.quota = -(-trained // self.world)  # samples per rank per epoch
        steps = self.quota // self.batch_size if self.drop_last else -(-self.quota // self.batch_size)
        if steps < 1:
            raise ShardError(f"{self.root}: {self.quota} training samples per process is less than one batch "
                             f"of {self.batch_size} with drop_last")
        self.steps_per_epoch = steps
        self.dataset = TrainShuffle(self.urls, self.meta, seed=self.seed, rank=self.rank, world=self.world,
                                    buffer=self.buffer, chunk=self.batch_size, transform=self.transform,
                                    held_out=self.held_out, remote=remote)
        self.loader = _loader(self.dataset, self.workers, persistent=True)
        self._generation = 0  # counts epoch() iterations begun; the latest one owns the loader

    def close(self) -> None:
        """Stops the loader workers (nothing to do without workers). A later epoch starts new ones."""
        _close(self.loader)

    def __enter__(self) -> "TrainStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _pass(self, epoch: int, pass_index: int, generation: int) -> Iterator[Block]:
        """The chunks of one pass, as the workers send them (in worker round-robin order)."""
        self.dataset.set_epoch(epoch, pass_index)  # before iter(): the workers read it as they restart
        chunks = iter(self.loader)
        while True:
            # one loader serves every epoch: if another epoch began since, the chunks now arriving
            # are that epoch's, and taking them here would corrupt both
            if self._generation != generation:
                raise RuntimeError("TrainStream: another epoch was started before this one finished; "
                                   "read one epoch at a time")
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            yield chunk

    def epoch(self, epoch: int) -> Iterator[Block]:
        self._generation += 1
        generation = self._generation
        want = self.steps_per_epoch * self.batch_size if self.drop_last else self.quota
        taken, pending, held, pass_index = 0, [], 0, 0
        while taken < want:
            got_any = False
            for chunk in self._pass(epoch, pass_index, generation):
                got_any = True
                chunk = {f: np.asarray(v) for f, v in chunk.items()}
                if not pending and len(chunk["id"]) == self.batch_size and taken + self.batch_size <= want:
                    taken += self.batch_size  # the common case: a whole batch, passed through
                    yield chunk
                    continue
                pending.append(chunk)
                held += len(chunk["id"])
                while held >= self.batch_size and taken < want:
                    batch, pending, held = _cut(pending, min(self.batch_size, want - taken))
                    taken += len(batch["id"])
                    yield batch
                if taken >= want:
                    break
            if not got_any:
                raise ShardError(f"{self.root}: process {self.rank} read no training samples from its shards")
            pass_index += 1
            if taken < want and held and held >= want - taken:
                batch, pending, held = _cut(pending, want - taken)
                taken += len(batch["id"])
                yield batch
        # samples left in `pending` belong to a pass beyond this epoch's quota: dropped


def _cut(pending: list[Block], n: int) -> tuple[Block, list[Block], int]:
    cat = _concat(pending)
    head = {f: v[:n] for f, v in cat.items()}
    tail = {f: v[n:] for f, v in cat.items()}
    rest = [tail] if len(tail["id"]) else []
    return head, rest, len(tail["id"])


class PassDataset(IterableDataset):
    """Every id of ``split`` exactly once over all (rank, worker) pairs, as blocks."""

    def __init__(self, urls: list[str], meta: DatasetMeta, split: str, *, rank: int, world: int, batch_size: int,
                 transform: Transform | None = None, only: np.ndarray | None = None, remote: Remote | None = None):
        self.urls, self.meta, self.split, self.remote = urls, meta, split, remote
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.transform = transform
        self.only = only  # (count,) bool: the ids to read (before the transform decodes them), or None: all

    def __iter__(self) -> Iterator[Block]:
        for batch in self._batches():
            yield self.transform(batch, None) if self.transform is not None else batch

    def _batches(self) -> Iterator[Block]:
        pending: list[Block] = []
        held = 0
        for block in read_blocks(_assigned(self.urls, self.rank, self.world), self.meta, self.split, remote=self.remote):
            if self.only is not None:
                block = _take(block, np.flatnonzero(self.only[block["id"]]))
            pending.append(block)
            held += len(block["id"])
            while held >= self.batch_size:
                batch, pending, held = _cut(pending, self.batch_size)
                yield batch
        if held:
            yield _concat(pending)


def pass_batches(root: str | Path, meta: DatasetMeta, split: str, *, batch_size: int, rank: int = 0,
                 world: int = 1, workers: int = 0, transform: Transform | None = None,
                 only: np.ndarray | None = None) -> Iterator[Block]:
    """This rank's part of one exactly-once pass over ``split``, as batches with ids (``transform``,
    deterministic, applied in the workers); ``only`` ((count,) bool) keeps those ids alone."""
    paths = check_split(root, meta, split)
    dataset = PassDataset([str(p) for p in paths], meta, split, rank=rank, world=world, batch_size=batch_size,
                          transform=transform, only=only, remote=Remote.of(paths))
    batches = iter(_loader(dataset, workers))
    try:
        for batch in batches:
            yield {f: np.asarray(v) for f, v in batch.items()}
    finally:
        _shut_down(batches)


def load_split(root: str | Path, meta: DatasetMeta, split: str, *, workers: int = 0) -> Block:
    """A whole split in memory, rows ordered by id: {"id": (count,), "img", "txt", "lab": (count, ...)}.

    Reference only: the engine reads splits as streams (TrainStream for training, pass_batches for
    refreshes and evaluation), never through this; tests and benchmarks compare shards with it."""
    count = meta.splits[split].count
    out = {"id": np.arange(count, dtype=np.int64)}
    filled = np.zeros(count, dtype=bool)
    for batch in pass_batches(root, meta, split, batch_size=4096, workers=workers):
        for f in ("img", "txt", "lab"):
            if f not in out:
                out[f] = np.empty((count,) + batch[f].shape[1:], dtype=batch[f].dtype)
            out[f][batch["id"]] = batch[f]
        if filled[batch["id"]].any():
            raise ShardError(f"{root}: split {split!r} holds id {int(batch['id'][filled[batch['id']]][0])} twice")
        filled[batch["id"]] = True
    if not filled.all():
        raise ShardError(f"{root}: split {split!r} is missing id {int(np.argmin(filled))}")
    return out


def to_torch(batch: Block, device: torch.device) -> dict[str, torch.Tensor]:
    """Every numeric array on ``device``: float features as float32; integer arrays (ids, labels,
    uint8 images and bag-of-words, token ids) unchanged, so images cross to the GPU as bytes.
    Object arrays (raw bytes and texts, shard names) stay behind."""
    out = {}
    for key, value in batch.items():
        if value.dtype == object:
            continue
        t = torch.from_numpy(np.ascontiguousarray(value)).to(device, non_blocking=True)
        out[key] = t.float() if t.is_floating_point() else t
    return out
