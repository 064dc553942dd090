"""Datasets on a server (docs/data.md, "Datasets on a server"): ``data.root`` as an http:// URL
served by a real nginx (tests/http_server.py), or a ``pipe:`` command through curl. A run from the
server ends bit-identical to the run from the folder, on 1 and 2 processes, through an outage and
a stall mid-epoch; past the retries it stops in one line and resumes exactly; a missing or changed
shard is one line naming it. The retrying stream itself is checked against a misbehaving server."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import launch, tiny_args, torchrun
from http_server import Nginx
from scbch_dist.data.format import ShardError
from scbch_dist.data.remote import RemoteError, RemoteRoot, Retry, RetryingStream
from scbch_dist.data.fingerprint import DataChangedError
from scbch_dist.train import main

CODES = ("query_img", "query_txt", "database_img", "database_txt")
SHORT = ("train.epochs=2", "eval.every=2", "run.tensorboard=false")


def same_codes(a: Path, b: Path) -> None:
    with np.load(a / "codes.npz") as x, np.load(b / "codes.npz") as y:
        for k in CODES:
            assert np.array_equal(x[k], y[k]), f"{k} differs between {a} and {b}"


@pytest.fixture(scope="module")
def served(tiny_dataset, tmp_path_factory):
    """nginx serving a copy of the tiny dataset as www/tiny (tests may add more folders to www)."""
    home = tmp_path_factory.mktemp("nginx")
    shutil.copytree(tiny_dataset, home / "www" / "tiny")
    server = Nginx(home / "server", home / "www", rate=20_000).start()  # a 22 KB shard: 1.1 s
    yield server, home / "www"
    server.stop()


@pytest.fixture(scope="module")
def local_run(tiny_dataset, tmp_path_factory):
    """The short run from the folder: what every run from the server must equal."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    main(tiny_args(tiny_dataset, run_dir, *SHORT))
    return run_dir


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_from_nginx_ends_as_the_run_from_the_folder(served, tiny_dataset, tmp_path, workers):
    """With loader workers too (the order of batches depends on their number: compared with as many)."""
    server, _ = served
    summary = main(tiny_args(f"{server.url}/tiny", tmp_path / "run", *SHORT, f"data.workers={workers}"))
    main(tiny_args(tiny_dataset, tmp_path / "folder", *SHORT, f"data.workers={workers}"))
    same_codes(tmp_path / "run", tmp_path / "folder")
    assert summary["run"]["world_size"] == 1
    log = (tmp_path / "run" / "log.txt").read_text()
    assert f"dataset synthetic at {server.url}/tiny" in log and "shards found (HEAD), none read ahead" in log
    assert any(r.startswith("GET /tiny/train-") for r in server.requests())


def test_two_processes_from_nginx_train_as_two_from_the_folder(served, tiny_dataset, tmp_path):
    server, _ = served
    torchrun("-m", "scbch_dist.train", *tiny_args(f"{server.url}/tiny", tmp_path / "http", *SHORT))
    torchrun("-m", "scbch_dist.train", *tiny_args(tiny_dataset, tmp_path / "folder", *SHORT))
    same_codes(tmp_path / "http", tmp_path / "folder")
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("http", "folder")]
    assert [s["run"]["world_size"] for s in summaries] == [2, 2]
    assert summaries[0]["final"]["avg_map"] == summaries[1]["final"]["avg_map"]


@pytest.mark.slow
def test_the_documented_command_trains_the_embedded_default_from_nginx(served, tmp_path):
    """README: ``python -m scbch_dist.train --set data.root=http://127.0.0.1:PORT/synthetic``: the
    whole default run (20 epochs), its codes and figures equal to the run from the folder."""
    server, www = served
    settings = ["--set", "run.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    folder = launch([sys.executable, "-m", "scbch_dist.train", "--set", f"data.root={www / 'synthetic'}",
                     "--set", "data.generate=synthetic", *settings, "--set", f"run.dir={tmp_path / 'folder'}"], env=env)
    assert folder.returncode == 0, folder.stderr[-3000:]
    http = launch([sys.executable, "-m", "scbch_dist.train", "--set", f"data.root={server.url}/synthetic", *settings,
                   "--set", f"run.dir={tmp_path / 'http'}"], env=env)
    assert http.returncode == 0, http.stderr[-3000:]
    same_codes(tmp_path / "http", tmp_path / "folder")
    finals = [json.loads((tmp_path / d / "summary.json").read_text())["final"] for d in ("http", "folder")]
    assert finals[0]["epoch"] == 20 and finals[0]["avg_map"] == finals[1]["avg_map"]


def _wait_for(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"waited {timeout:.0f} s for {what}")


def _started(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _reading_train_shards(server: Nginx, after: int):
    """True once the access log holds a GET of a slow training shard beyond its first ``after`` lines."""
    return lambda: any(r.startswith("GET /slow/tiny/train-") for r in server.requests()[after:])


@pytest.mark.slow
def test_an_outage_and_a_stall_mid_epoch_change_nothing(served, local_run, tmp_path):
    """Over the slow link: nginx stopped for 3 s while shards stream, then its worker frozen for 3 s
    (a server that accepts and says nothing) with data.timeout=1: each read goes on where it broke,
    and the run ends bit-identical to the run from the folder."""
    server, _ = served
    run_dir = tmp_path / "run"
    proc = _started([sys.executable, "-m", "scbch_dist.train", *tiny_args(f"{server.slow_url}/tiny", run_dir, *SHORT,
                                                                           "data.timeout=1", "data.retries=8")])
    try:
        # nginx logs a request when it ends: 0.4 s later the next shard is on its way
        _wait_for("a training shard on the slow link", _reading_train_shards(server, 0))
        time.sleep(0.4)
        server.stop()
        time.sleep(3)
        server.start()
        seen = len(server.requests())
        _wait_for("the next training shard", _reading_train_shards(server, seen))
        time.sleep(0.4)
        server.pause()
        time.sleep(3)
        server.resume()
        out, err = proc.communicate(timeout=300)
    finally:
        server.start() if server._pid() is None else server.resume()
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    log = (run_dir / "log.txt").read_text()
    retries = [line for line in log.splitlines() if "trying again from there" in line]
    assert any(" at byte 0;" not in line for line in retries), retries  # a shard broken off mid-way
    assert any("timed out" in line for line in retries), retries  # the stall
    same_codes(run_dir, local_run)


@pytest.mark.slow
def test_past_the_retries_the_run_stops_in_one_line_and_resumes_exactly(served, local_run, tmp_path):
    server, _ = served
    run_dir = tmp_path / "run"
    proc = _started([sys.executable, "-m", "scbch_dist.train", *tiny_args(f"{server.slow_url}/tiny", run_dir, *SHORT,
                                                                           "data.timeout=1", "data.retries=1")])
    try:
        _wait_for("the first checkpoint", lambda: (run_dir / "checkpoints" / "latest").is_file(), timeout=120)
        server.stop()
        out, err = proc.communicate(timeout=120)
    finally:
        server.start()
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert f"{server.slow_url}/tiny/" in last and "unreadable after 2 tries" in last, last
    assert "Traceback" not in err
    # the resume may loosen the timeout (a safe key): a 1 s one, at load 4, timed out twice at byte 0
    resumed = launch([sys.executable, "-m", "scbch_dist.train", "--resume", str(run_dir), "--set", "data.timeout=30",
                      "--set", "data.retries=5"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_codes(run_dir, local_run)


def test_the_cache_fetches_each_shard_once_and_refetches_a_damaged_copy(served, local_run, tmp_path):
    """data.cache: every shard fetched once over a run that reads each several times (epochs,
    refreshes, evaluation), kept under its sha256; a damaged copy is fetched again; a small
    data.cache_gb keeps what fits. The result never changes."""
    server, www = served
    meta = json.loads((www / "tiny" / "meta.json").read_text())
    digests = {name: sha for split in meta["splits"].values() for name, sha in zip(split["shards"], split["sha256"])}
    cache = tmp_path / "cache"
    before = len(server.requests())
    main(tiny_args(f"{server.url}/tiny", tmp_path / "run", *SHORT, f"data.cache={cache}"))
    same_codes(tmp_path / "run", local_run)
    fetched = [r.split()[1].rsplit("/", 1)[1] for r in server.requests()[before:] if r.startswith("GET /tiny/") and ".tar" in r]
    # each shard once; shards of equal bytes once in all (the tiny database's first four are the
    # training shards: the cache goes by content)
    assert len(fetched) == len(set(fetched)) == len(set(digests.values()))
    assert {digests[name] for name in fetched} == set(digests.values())
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(f"{sha}.tar" for sha in set(digests.values()))

    copy = cache / f"{digests['train-000002.tar']}.tar"
    data = bytearray(copy.read_bytes())
    data[-2000] ^= 0xFF
    copy.write_bytes(bytes(data))
    before = len(server.requests())
    main(tiny_args(f"{server.url}/tiny", tmp_path / "again", *SHORT, f"data.cache={cache}"))
    same_codes(tmp_path / "again", local_run)
    fetched = [r for r in server.requests()[before:] if r.startswith("GET /tiny/") and ".tar" in r]
    assert fetched == ["GET /tiny/train-000002.tar HTTP/1.1"]
    assert "a damaged copy in data.cache" in (tmp_path / "again" / "log.txt").read_text()
    assert copy.read_bytes() != bytes(data) and not list(cache.glob(".*.tmp"))

    small = tmp_path / "small"
    main(tiny_args(f"{server.url}/tiny", tmp_path / "bounded", *SHORT, f"data.cache={small}", "data.cache_gb=0.00005"))
    same_codes(tmp_path / "bounded", local_run)
    kept = sum(p.stat().st_size for p in small.glob("*.tar"))
    assert 0 < kept <= 50_000 and not list(small.glob(".*.tmp"))  # what fits, never more


def test_a_missing_or_changed_shard_on_the_server_is_one_line(served, tiny_dataset, tmp_path):
    server, www = served
    shutil.copytree(tiny_dataset, www / "missing")
    (www / "missing" / "query-000000.tar").unlink()
    with pytest.raises(ShardError, match=r"/missing/query-000000.tar: shard of split 'query' listed in meta.json is "
                                         r"not on the server \(HTTP 404\)"):
        main(tiny_args(f"{server.url}/missing", tmp_path / "a", *SHORT))
    shutil.copytree(tiny_dataset, www / "changed")
    shard = www / "changed" / "train-000001.tar"
    with tarfile.open(shard) as tar:  # the last byte of the first image array: the tar still reads
        member = next(m for m in tar.getmembers() if m.name.endswith(".img.npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"/changed/train-000001.tar: its sha256 differs from the one in meta.json"):
        main(tiny_args(f"{server.url}/changed", tmp_path / "b", *SHORT))


def test_a_dataset_changed_on_the_server_since_the_run_began_is_refused_at_resume(served, tiny_dataset, tmp_path):
    server, www = served
    shutil.copytree(tiny_dataset, www / "relabelled")
    run_dir = tmp_path / "run"
    main(tiny_args(f"{server.url}/relabelled", run_dir, "train.epochs=1", "eval.every=1", "run.tensorboard=false"))
    clean = np.load(www / "relabelled" / "labels" / "clean.npy")
    clean[3, 0] ^= 1
    np.save(www / "relabelled" / "labels" / "clean.npy", clean)
    with pytest.raises(DataChangedError, match=r"the dataset at http://.*/relabelled is not the one this run began "
                                               r"with \(labels/clean.npy changed\)"):
        main(["--resume", str(run_dir), "--set", "train.epochs=2"])


def test_pipe_through_curl_trains_as_the_folder(served, local_run, tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    server, _ = served
    main(tiny_args(f"pipe:curl -s -f {server.url}/tiny/{{}}", tmp_path / "run", *SHORT))
    same_codes(tmp_path / "run", local_run)
    assert "shards not asked for (pipe:)" in (tmp_path / "run" / "log.txt").read_text()


# -- the retrying stream against a server that misbehaves on purpose --------------------------------


class Misbehaving(http.server.BaseHTTPRequestHandler):
    """Serves ``body`` at /file; ``plan`` is what each next GET does: "cut" (sends 1000 bytes of
    what was asked, then closes), "503", "404", "grow" (a bigger file), or "ok"."""

    body = b""
    plan: list[str] = []
    ranges: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        step = self.plan.pop(0) if self.plan else "ok"
        self.ranges.append(self.headers.get("Range", ""))
        if step in ("503", "404"):
            self.send_error(int(step))
            return
        body = self.body + (b"x" if step == "grow" else b"")
        start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        part = body[start:start + 1000] if step == "cut" else body[start:]
        self.wfile.write(part)
        if step == "cut":
            self.close_connection = True


@pytest.fixture
def misbehaving():
    Misbehaving.body = np.random.default_rng(0).bytes(50_000)
    Misbehaving.plan, Misbehaving.ranges = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Misbehaving, f"http://127.0.0.1:{server.server_address[1]}/file"
    server.shutdown()


FAST = Retry(retries=3, timeout=2, backoff=0.01)


def test_a_cut_connection_goes_on_at_the_byte_where_it_broke(misbehaving):
    handler, url = misbehaving
    handler.plan = ["cut", "cut", "503", "cut"]
    with RetryingStream(url, FAST) as stream:
        got = stream.read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(handler.body).digest()
    assert handler.ranges == ["", "bytes=1000-", "bytes=2000-", "bytes=2000-", "bytes=3000-"]


def test_what_no_retry_mends_is_one_line_naming_the_url(misbehaving):
    handler, url = misbehaving
    handler.plan = ["404"]
    with pytest.raises(RemoteError, match=rf"^{url}: HTTP 404"):
        RetryingStream(url, FAST)
    assert len(handler.ranges) == 1  # not retried
    handler.plan = ["cut", "grow"]
    with pytest.raises(RemoteError, match=r"its size changed from 50000 to 50001 bytes"):
        RetryingStream(url, FAST).read()
    handler.plan = ["503"] * 4
    with pytest.raises(RemoteError, match=rf"^{url}: unreadable after 4 tries at byte 0 .*resume it when the server"):
        RetryingStream(url, FAST)


def test_a_pipe_command_needs_its_slot_and_a_failing_one_is_one_line(tmp_path):
    with pytest.raises(RemoteError, match=r"a pipe: command needs \{\} where the file's name goes"):
        RemoteRoot("pipe:cat /nowhere")
    root = RemoteRoot(f"pipe:cat {tmp_path}/{{}}", FAST)
    (tmp_path / "a b.txt").write_text("hello")
    assert (root / "a b.txt").read_text() == "hello"  # the name is quoted for the shell
    assert not (root / "missing.txt").is_file()
    with pytest.raises(RemoteError, match=r"unreadable after 4 tries .*the command exited with status 1"):
        (root / "missing.txt").read_bytes()


@pytest.mark.slow
def test_the_throughput_benchmark_runs_at_toy_size():
    """tests/benchmarks/bench_http.py as a user runs it (docs/benchmarks.md): its table, every source."""
    proc = launch([sys.executable, "tests/benchmarks/bench_http.py", "--train", "300", "--images", "60", "--repeats", "1",
                   "--epochs", "1"], env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 and "nginx is not installed" in proc.stderr:
        pytest.skip("nginx is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| features") or line.startswith("| jpeg")]
    assert [r.split(" | ")[2] for r in rows] == ["folder", "nginx", "nginx + data.cache"] * 2


def test_a_run_from_the_server_re_encodes_from_it_and_search_asks_for_a_copy(served, tmp_path, capsys):
    """``python -m scbch_dist.evaluate RUN_DIR --encode`` streams the shards from the server again
    and gets the stored codes bit for bit; search, which shows the dataset's items, asks for a
    local copy in one line."""
    from conftest import one_line_exit
    from scbch_dist import evaluate
    from scbch_dist.retrieval import index, search

    server, _ = served
    run_dir = tmp_path / "run"
    main(tiny_args(f"{server.url}/tiny", run_dir, "train.epochs=1", "eval.every=1", "run.tensorboard=false"))
    evaluate.main([str(run_dir), "--encode", "--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["encoded"]["equal"] is True
    index.main(["build", str(run_dir)])
    line = one_line_exit(capsys, search.main, [str(run_dir), "--id", "3"])
    assert "the run's dataset is on a server" in line and "give --data-root DIR" in line
