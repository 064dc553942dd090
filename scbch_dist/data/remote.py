"""Datasets on a server: ``data.root`` as an ``http(s)://`` URL or a ``pipe:`` command
(docs/data.md, "Datasets on a server").

    data.root: http://host/datasets/synthetic                 # the folder, published as it is
    data.root: "pipe:aws s3 cp s3://bucket/datasets/synthetic/{} -"   # {}: the file's name in the folder

``RemoteRoot`` is the folder's place: ``root / "meta.json"`` names a file, which reads like a local
one (``read_bytes``, ``open``). A file's bytes come through ``RetryingStream``: when the connection
drops, is reset, stalls for ``timeout`` seconds, or the server answers 5xx, it opens the file again
where it stopped (an HTTP Range request; a pipe's command runs again and the bytes already read are
skipped), waiting ``backoff`` seconds and twice as long each time, up to ``retries`` times in a row.
The reader above sees one unbroken stream of the file's bytes, so no sample is lost or read twice,
and a shard's sha256 is checked over that stream as it arrives (pipeline.DigestedShard). What no
retry mends (404 and other 4xx, a size that changed between tries, a pipe whose command fails
every time) is one line naming the URL (RemoteError)."""

from __future__ import annotations

import http.client
import io
import logging
import os
import select
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from scbch_dist.digests import sha256_file
from scbch_dist.errors import ScbchError

SCHEMES = ("http://", "https://", "pipe:")
log = logging.getLogger("scbch_dist")  # runlog.LOGGER_NAME: the run's log.txt and console
NAME_SLOT = "{}"  # where a pipe: command takes the file's name
MAX_BACKOFF = 30.0  # seconds: the longest wait between two tries
CHUNK = 1 << 16  # bytes a pipe is read by


class RemoteError(ScbchError):
    """A file of a dataset on a server that cannot be read (after the retries, or at once where
    retrying cannot help); its message names the URL."""


@dataclass(frozen=True)
class Retry:
    """How a remote file is read (data.retries, data.timeout; the config holds the defaults)."""

    retries: int = 5  # tries after the first, in a row without progress, before the run stops
    timeout: float = 30.0  # seconds without a byte before a read counts as stalled
    backoff: float = 0.5  # seconds before the first retry, doubled each time (at most MAX_BACKOFF)

    def wait(self, attempt: int) -> None:
        time.sleep(min(self.backoff * 2 ** attempt, MAX_BACKOFF))


def is_remote(root: object) -> bool:
    return isinstance(root, RemoteRoot) or str(root).startswith(SCHEMES)


class RemoteRoot:
    """A dataset folder on a server, or a file in it: the path-like subset the readers use."""

    def __init__(self, root: str, retry: Retry = Retry(), name: str = "", cache: "ShardCache | None" = None):
        if root.startswith("pipe:") and NAME_SLOT not in root:
            raise RemoteError(f"data.root={root}: a pipe: command needs {NAME_SLOT} where the file's name goes "
                              f"(e.g. pipe:aws s3 cp s3://bucket/dataset/{NAME_SLOT} -)")
        self.root, self.retry, self.relative = root.rstrip("/") if "://" in root else root, retry, name
        self.cache = cache  # data.cache: this node's copies of the shards

    def __truediv__(self, name: str) -> "RemoteRoot":
        return RemoteRoot(self.root, self.retry, f"{self.relative}/{name}" if self.relative else str(name), self.cache)

    def __str__(self) -> str:
        if self.root.startswith("pipe:"):
            return self.root.replace(NAME_SLOT, shlex.quote(self.relative)) if self.relative else self.root
        return f"{self.root}/{self.relative}" if self.relative else self.root

    def __repr__(self) -> str:
        return f"RemoteRoot({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemoteRoot) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def name(self) -> str:
        return self.relative.rsplit("/", 1)[-1]

    def exists(self) -> bool:
        return self.is_file()

    def is_file(self) -> bool:
        """HTTP: a HEAD answered 200 (404: False). A pipe: its command gives a first byte."""
        if str(self).startswith("pipe:"):
            try:
                with self.open() as f:
                    f.read(1)
                return True
            except RemoteError:
                return False
        return self.size() is not None

    def size(self) -> int | None:
        """The file's size in bytes from a HEAD request (None: not there); None for a pipe."""
        if str(self).startswith("pipe:"):
            return None
        url = str(self)
        for attempt in range(self.retry.retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),
                                            timeout=self.retry.timeout) as answer:
                    length = answer.headers.get("Content-Length")
                    return int(length) if length is not None else -1
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                if not _transient(e.code) or attempt == self.retry.retries:
                    raise RemoteError(f"{url}: HTTP {e.code} {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:
                if attempt == self.retry.retries:
                    raise RemoteError(f"{url}: unreachable after {attempt + 1} tries ({_why(e)})") from None
            self.retry.wait(attempt)
        raise AssertionError("unreachable")

    def open(self, mode: str = "rb") -> "RetryingStream":
        if mode != "rb":
            raise ValueError(f"{self}: a remote file opens for reading bytes only")
        return RetryingStream(str(self), self.retry)

    def read_bytes(self) -> bytes:
        with self.open() as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)


def _transient(code: int) -> bool:
    """HTTP statuses worth another try: the server's own trouble, or it asks to wait."""
    return code >= 500 or code in (408, 429)


def _why(e: BaseException) -> str:
    reason = getattr(e, "reason", None)
    return f"{type(e).__name__}: {reason or e}"


class RetryingStream(io.RawIOBase):
    """The bytes of one remote file, read in order; breaks in the connection are mended by opening
    it again at the byte where it stopped (module docstring)."""

    def __init__(self, url: str, retry: Retry):
        self.url, self.retry = url, retry
        self.position = 0  # bytes handed to the reader so far
        self.total: int | None = None  # the file's size, where the server says it
        self.retried = 0  # reconnections over the stream's life (for the logs and the tests)
        self._answer = None
        self._process: subprocess.Popen | None = None
        self._connect()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        failures = 0
        while True:
            try:
                data = self._read_some(n)
            except RemoteError:
                raise
            except (OSError, http.client.HTTPException, ValueError) as e:
                failures = self._again(failures, e)
                continue
            if data or self._complete():
                self.position += len(data)
                return data
            failures = self._again(failures, EOFError(f"the stream ended at byte {self.position}"
                                                      + (f" of {self.total}" if self.total is not None else "")))

    def close(self) -> None:
        self._disconnect()
        super().close()

    # -- one connection ---------------------------------------------------------------------------------

    def _connect(self, failures: int = 0) -> int:
        """Open the file at ``position``, retrying what may pass; returns the failures in a row so far."""
        while True:
            try:
                self._open_at(self.position)
                return failures
            except RemoteError:
                raise
            except (OSError, http.client.HTTPException) as e:
                self._disconnect()
                failures = self._count(failures, e)

    def _again(self, failures: int, error: BaseException) -> int:
        """After a failed read: count it, wait, reconnect at ``position``; returns the new count."""
        self._disconnect()
        self.retried += 1
        return self._connect(self._count(failures, error))

    def _count(self, failures: int, error: BaseException) -> int:
        """One more failure in a row: the run stops past ``retries``; else a warning and the wait."""
        if failures >= self.retry.retries:
            raise RemoteError(f"{self.url}: unreadable after {failures + 1} tries at byte {self.position} "
                              f"({_why(error)}); the run stops here: resume it when the server is back") from None
        log.warning(f"{self.url}: {_why(error)} at byte {self.position}; trying again from there "
                    f"({failures + 2} of {self.retry.retries + 1} tries)")
        self.retry.wait(failures)
        return failures + 1

    def _open_at(self, position: int) -> None:
        if self.url.startswith("pipe:"):
            self._process = subprocess.Popen(self.url[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                             stderr=subprocess.PIPE, bufsize=0)
            self._skip(position)
            return
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={position}-"} if position else {})
        try:
            answer = urllib.request.urlopen(request, timeout=self.retry.timeout)
        except urllib.error.HTTPError as e:
            if _transient(e.code):
                raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
            raise RemoteError(f"{self.url}: HTTP {e.code} {e.reason}") from None
        total = _total_size(answer, position)
        if self.total is not None and total is not None and total != self.total:
            answer.close()
            raise RemoteError(f"{self.url}: its size changed from {self.total} to {total} bytes while it was read "
                              "(replaced on the server?)")
        self.total = total if total is not None else self.total
        self._answer = answer
        if position and answer.status == 200:  # the server ignored the Range: skip what was read
            self._skip(position)

    def _skip(self, n: int) -> None:
        while n:
            got = self._read_some(min(n, 1 << 20))
            if not got:
                raise ConnectionError(f"the stream ended while skipping to byte {self.position}")
            n -= len(got)

    def _read_some(self, n: int) -> bytes:
        if self._process is not None:
            return self._read_pipe(n)
        return self._answer.read(n)

    def _read_pipe(self, n: int) -> bytes:
        out = self._process.stdout
        ready, _, _ = select.select([out], [], [], self.retry.timeout)
        if not ready:
            raise TimeoutError(f"no byte from the command for {self.retry.timeout:g} s")
        data = out.read(min(n, CHUNK))
        if not data:
            code = self._process.wait(timeout=self.retry.timeout)
            if code != 0:
                error = self._process.stderr.read(2000).decode("utf-8", "replace").strip().splitlines()
                raise ConnectionError(f"the command exited with status {code}"
                                      + (f": {error[-1]}" if error else ""))
        return data

    def _complete(self) -> bool:
        """At the end of the stream: the whole file was read (HTTP: its size; a pipe: status 0)."""
        if self._process is not None:
            return True  # _read_pipe raised for a failed command
        return self.total is None or self.position >= self.total

    def _disconnect(self) -> None:
        if self._answer is not None:
            self._answer.close()
            self._answer = None
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            for stream in (self._process.stdout, self._process.stderr):
                stream.close()
            self._process = None


def _total_size(answer, position: int) -> int | None:
    """The file's whole size from an answer: Content-Range's total (206), Content-Length (200)."""
    content_range = answer.headers.get("Content-Range")
    if answer.status == 206 and content_range and "/" in content_range:
        start = content_range.split()[-1].split("-")[0]
        if start.isdigit() and int(start) != position:
            raise ConnectionError(f"asked for byte {position}, the server sent from byte {start}")
        total = content_range.rsplit("/", 1)[1]
        return int(total) if total.isdigit() else None
    length = answer.headers.get("Content-Length")
    return int(length) if length is not None and answer.status == 200 else None


def dataset_root(root, retry: Retry | None = None):
    """``data.root`` as the readers take it: a RemoteRoot for an http(s):// URL or a pipe: command
    (read with ``retry``, default Retry()), else a local Path. (Path() would fold a URL's "//".)"""
    if isinstance(root, RemoteRoot):
        return root
    text = str(root)
    return RemoteRoot(text, retry or Retry()) if text.startswith(SCHEMES) else Path(text)


def configured_root(data_cfg):
    """``data.root`` of a config's data section, read with its data.retries and data.timeout, its
    shards kept in data.cache (up to data.cache_gb) where one is given."""
    root = dataset_root(data_cfg.root, Retry(retries=data_cfg.retries, timeout=data_cfg.timeout))
    if isinstance(root, RemoteRoot) and data_cfg.cache:
        root.cache = ShardCache(data_cfg.cache, int(data_cfg.cache_gb * 1e9))
    return root


@dataclass(frozen=True)
class ShardCache:
    """``data.cache``: shards of a dataset on a server kept on this node's disk, each under its
    sha256 (``<sha256>.tar``), so the first epoch fetches a shard and later ones read the copy. A
    copy is written as the shard streams (no second fetch), kept only when its digest matches
    meta.json's, hashed again before its first use in a process (a damaged copy is removed and the
    shard fetched anew) and checked as it streams at every later use. The cache stops taking shards at ``max_bytes`` (those past it stream every time; none is
    evicted, so a cache smaller than the dataset keeps a fixed part of it). Ranks and loader workers
    of a node may share one: each copy appears by an atomic rename."""

    folder: str
    max_bytes: int
    # digest -> (size, mtime) of the copies this process checked: each is hashed once before its
    # first use; later reads are checked as they stream, like a local shard
    checked: dict = field(default_factory=dict, compare=False, hash=False)

    def path(self, sha256: str) -> Path:
        return Path(self.folder) / f"{sha256}.tar"

    def lookup(self, sha256: str) -> Path | None:
        """The copy of the shard of this digest, checked, or None (fetch it)."""
        path = self.path(sha256)
        try:
            stat = path.stat()
        except OSError:
            return None
        if self.checked.get(sha256) == (stat.st_size, stat.st_mtime_ns):
            return path
        if sha256_file(path) != sha256:
            log.warning(f"{path}: a damaged copy in data.cache (its sha256 differs); fetching the shard again")
            path.unlink(missing_ok=True)
            return None
        self.checked[sha256] = (stat.st_size, stat.st_mtime_ns)
        return path

    def start(self, sha256: str) -> "CacheCopy | None":
        """A copy of the shard to write as it streams, or None where the cache is full."""
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        used = sum(p.stat().st_size for p in folder.glob("*.tar"))
        if used >= self.max_bytes:
            return None
        return CacheCopy(self, sha256, self.max_bytes - used)


class CacheCopy:
    """A shard's copy being written (``.<name>.<pid>.tmp``); ``keep()`` renames it into place,
    ``drop()`` removes it (digest mismatch, or the cache's room ran out mid-shard)."""

    def __init__(self, cache: ShardCache, sha256: str, room: int):
        self.cache, self.sha256, self.room = cache, sha256, room
        self.path = cache.path(sha256)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.file = open(self.tmp, "wb")

    def write(self, data: bytes) -> None:
        if self.file is None:
            return
        self.room -= len(data)
        if self.room < 0:
            self.drop()
            return
        self.file.write(data)

    def keep(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            os.replace(self.tmp, self.path)
            stat = self.path.stat()  # its digest matched as it streamed: no need to hash it before its next use
            self.cache.checked[self.sha256] = (stat.st_size, stat.st_mtime_ns)

    def drop(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.tmp.unlink(missing_ok=True)
