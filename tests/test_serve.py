"""The search service (scbch_dist.retrieval.serve): its JSON API through FastAPI's TestClient on a tiny
fine-tuned shapes run; what it refuses to a hostile client (large uploads, pixel bombs, foreign Host
headers, idle and slowloris connections, requests HTTP cannot parse, overload) and what it never
tells one (absolute paths, tracebacks, anything but JSON); the command's start-up line, port
refusal and Ctrl-C; the page in a real headless Chromium (slow, skipped without selenium,
chromium or chromedriver)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("timm")
pytest.importorskip("transformers")

from scbch_dist.retrieval import query, serve  # noqa: E402
from scbch_dist.retrieval.index import build  # noqa: E402
from scbch_dist.retrieval.search import Searcher, main as search_main  # noqa: E402
from scbch_dist.retrieval.serve import create_app, listen, url, warm_up  # noqa: E402
from scbch_dist.train import main as train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
K = 5  # the app's default hits per search in these tests
UNKNOWN = "zebraquux"  # not a word of the shapes captions


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """configs/finetune-tiny.yaml, one layer per backbone, for one epoch on 200 training shapes
    (20 queries, a database of 240), with its flat index: about 7 s of CPU. Codes, not quality,
    are what the API needs."""
    base = tmp_path_factory.mktemp("serve")
    settings = [f"data.root={base / 'shapes'}", "data.generate=shapes", "shapes.n_train=200", "shapes.n_query=20",
                "shapes.n_extra_database=40", "model.hidden=64", "model.image.kwargs.depth=1", "model.text.kwargs.num_hidden_layers=1",
                f"run.dir={base / 'run'}", "train.epochs=1", "eval.every=1", "scbch.warmup_epochs=1",
                "run.progress=false", "run.tensorboard=false"]
    train(["--config", str(REPO / "configs/finetune-tiny.yaml"), *[a for s in settings for a in ("--set", s)]])
    build(base / "run", log=lambda *a: None)
    return base / "run"


@pytest.fixture(scope="module")
def searcher(run_dir) -> Searcher:
    """The run opened with its model loaded, as the command does before it serves."""
    searcher = Searcher(run_dir)
    warm_up(searcher)
    return searcher


@pytest.fixture(scope="module")
def client(searcher):
    pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the dev extra)")
    from fastapi.testclient import TestClient

    with TestClient(create_app(searcher, k=K), base_url="http://localhost") as c:
        yield c


@contextmanager
def app_client(searcher: Searcher, base_url: str = "http://localhost", **kwargs):
    """A TestClient on a new app over ``searcher`` (create_app's keywords in ``kwargs``)."""
    from fastapi.testclient import TestClient

    raise_server_exceptions = kwargs.pop("raise_server_exceptions", True)
    with TestClient(create_app(searcher, **{"k": K, **kwargs}), base_url=base_url,
                    raise_server_exceptions=raise_server_exceptions) as c:
        yield c


def png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG whose header claims width x height pixels, with the data of one row: a few
    hundred bytes that PIL opens and verifies (verify does not decompress) but that would take
    width x height bytes to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = zlib.compress(b"\0" * (1 + (width + 7) // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def assert_hits(body: dict, k: int) -> None:
    """k hits, ranked 1..k, by non-decreasing distance, each with class names."""
    hits = body["hits"]
    assert [h["rank"] for h in hits] == list(range(1, k + 1))
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances) and all(0 <= d <= 32 for d in distances)
    assert len({h["id"] for h in hits}) == k and all(0 <= h["id"] < 240 for h in hits)
    assert all(h["labels"] and isinstance(h["labels"], list) for h in hits)
    assert body["search_ms"] >= 0 and body["k"] == k


def assert_one_line_error(response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error and "\n" not in error
    return error


# -- the JSON API ---------------------------------------------------------------------------------


def test_info_describes_the_run(client, run_dir):
    info = client.get("/api/info").json()
    assert info["run"] == run_dir.name  # the folder's name: the server's paths are its own
    assert (info["dataset"], info["method"], info["bits"], info["kind"]) == ("shapes", "scbch", 32, "flat")
    assert (info["database"], info["queries"], info["k"]) == (240, 20, K)
    assert len(info["classes"]) == 11 and "circle" in info["classes"]
    assert info["text_queries"] and info["image_queries"] and info["captions"] and info["images"]
    assert (info["max_upload"], info["max_pixels"]) == (serve.MAX_UPLOAD, query.MAX_PIXELS)  # the page checks sizes


def test_a_caption_finds_k_images_by_distance(client):
    body = client.get("/api/search", params={"text": "a red circle", "k": 7}).json()
    assert (body["query"], body["modality"]) == ("a red circle", "txt")
    assert_hits(body, 7)
    assert body["encode_ms"] > 0  # the model ran
    assert all(isinstance(h["caption"], str) and h["image"].endswith(".png") for h in body["hits"])
    assert_hits(client.get("/api/search", params={"text": "a blue square"}).json(), K)  # the app's default k


def test_a_stored_sample_is_searched_without_encoding(client):
    body = client.get("/api/search", params={"id": 3, "modality": "img", "k": 4}).json()
    assert body["modality"] == "img" and body["encode_ms"] == 0 and body["query"].startswith("query sample 3 (image")
    assert_hits(body, 4)
    error = assert_one_line_error(client.get("/api/search", params={"id": 20}))
    assert "ids 0..19" in error


def test_database_images_come_with_their_mime_type(client):
    r = client.get("/api/image/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG\r\n\x1a\n")
    assert client.get("/api/image/0", params={"split": "query"}).content.startswith(b"\x89PNG")
    assert "239" in assert_one_line_error(client.get("/api/image/240"), 404)


def test_an_unknown_word_is_a_one_line_400_that_names_it(client):
    error = assert_one_line_error(client.get("/api/search", params={"text": f"a red {UNKNOWN}"}))
    assert UNKNOWN in error and "unknown word" in error


def test_bad_parameters_are_one_line_400s(client):
    assert "text=" in assert_one_line_error(client.get("/api/search"))
    assert_one_line_error(client.get("/api/search", params={"text": "red", "id": 1}))
    assert "k" in assert_one_line_error(client.get("/api/search", params={"text": "red", "k": 0}))
    assert_one_line_error(client.get("/api/search", params={"id": "x"}))
    assert_one_line_error(client.get("/api/search", params={"id": 1, "modality": "audio"}))
    assert "no words" in assert_one_line_error(client.get("/api/search", params={"text": "  "}))


def test_an_uploaded_image_finds_captions(client):
    png = client.get("/api/image/5").content
    body = client.post("/api/search/image", params={"k": 6, "name": "five.png"}, content=png).json()
    assert (body["query"], body["modality"]) == ("five.png", "img")
    assert_hits(body, 6)
    assert body["encode_ms"] > 0


def test_a_non_image_upload_is_a_one_line_400(client):
    error = assert_one_line_error(client.post("/api/search/image", content=b"not an image at all"))
    assert "not a readable image" in error
    assert "empty" in assert_one_line_error(client.post("/api/search/image", content=b""))


def test_the_page_is_served_from_the_package(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for marker in ('id="query"', 'id="search"', 'id="results"', 'id="latency"', 'id="error"', "/api/search"):
        assert marker in r.text


# -- what a hostile client gets -------------------------------------------------------------------

BOMB = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns from 89 megapixels


def test_an_upload_declared_over_the_limit_is_a_413_before_its_body_is_read(client):
    sent = []

    def body():
        for _ in range(4):
            sent.append(1)
            yield b"\0" * 1024

    r = client.post("/api/search/image", content=body(),
                    headers={"Content-Length": str(200 << 20), "Content-Type": "image/png"})
    assert "209715200 bytes, more than the 32 MiB" in assert_one_line_error(r, 413)
    assert sent == []  # not one byte of the body was asked for


def test_an_upload_is_read_up_to_the_limit_and_no_further(searcher, client):
    png = client.get("/api/image/5").content
    with app_client(searcher, max_upload=len(png)) as c:
        assert_hits(c.post("/api/search/image", params={"k": K}, content=png).json(), K)  # exactly the limit
        streamed = (chunk for chunk in (png, b"\0"))  # no Content-Length: chunked, one byte too many
        assert "more than the" in assert_one_line_error(c.post("/api/search/image", content=streamed), 413)


def test_a_streamed_upload_is_answered_413_before_it_ends(searcher):
    """Through uvicorn: the server answers while the client is still sending a body that never ends."""
    with serving(create_app(searcher, k=K, max_upload=1000)) as address:
        with socket.create_connection(host_port(address), timeout=60) as conn:
            conn.sendall(b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            conn.sendall(b"800\r\n" + b"\0" * 0x800 + b"\r\n")  # 2 KiB, and no last chunk
            answer = b""
            while b"}" not in answer:  # a server that waits for the whole body times out here
                data = conn.recv(65536)
                if not data:
                    break
                answer += data
    assert answer.startswith(b"HTTP/1.1 413 ") and b"\r\nconnection: close\r\n" in answer.lower(), answer
    assert b'{"error":"the uploaded image: more than the' in answer, answer


def test_an_upload_of_another_content_type_is_a_415(client):
    png = client.get("/api/image/5").content
    for mime in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = client.post("/api/search/image", content=png, headers={"Content-Type": mime})
        assert "image/* or application/octet-stream" in assert_one_line_error(r, 415)
    for mime in ("image/png", "IMAGE/PNG; q=1", "application/octet-stream"):  # what the page sends
        r = client.post("/api/search/image", params={"k": 3}, content=png, headers={"Content-Type": mime})
        assert_hits(r.json(), 3)


@BOMB
def test_check_image_refuses_a_pixel_bomb_from_its_header():
    bomb = png_header(12000, 12000)
    assert len(bomb) < 4000  # 144 megapixels claimed, a few hundred bytes sent
    with pytest.raises(query.QueryError, match=r"^bomb\.png: 12000 x 12000 = 144 megapixels, more than the 25 a "
                                               r"query image may have \(--max-pixels\)$"):
        query.check_image(bomb, "bomb.png")
    with pytest.raises(query.QueryError, match=r"^huge\.png: 400 megapixels, more than the 25 .*--max-pixels"):
        query.check_image(png_header(20000, 20000), "huge.png")  # beyond PIL's own limit: its error, our words
    query.check_image(png_header(5000, 5000), "25mp.png")  # at the limit
    with pytest.raises(query.QueryError, match=r"100 x 100 = 0\.01 megapixels, more than the 0\.005 "):
        query.check_image(png_header(100, 100), "small.png", max_pixels=5000)


@BOMB
def test_a_pixel_bomb_upload_is_a_400_refused_before_the_search_lock(client, searcher, monkeypatch):
    calls = []
    monkeypatch.setattr(searcher, "search_image", lambda *args: calls.append(args))
    r = client.post("/api/search/image", content=png_header(12000, 12000), headers={"Content-Type": "image/png"})
    assert assert_one_line_error(r) == ("the uploaded image: 12000 x 12000 = 144 megapixels, more than the 25 a "
                                        "query image may have (--max-pixels)")
    assert calls == []  # refused from the header, before the search and its lock


def test_max_pixels_goes_from_the_searcher_to_the_server_and_the_search_command(run_dir, searcher, tmp_path):
    png = searcher.items.image("query", 0)[0]  # 32 x 32
    with app_client(Searcher(run_dir, max_pixels=1000)) as c:
        error = assert_one_line_error(c.post("/api/search/image", params={"name": "q.png"}, content=png))
        assert error.startswith("q.png: 32 x 32 = 0.00102 megapixels, more than the 0.001 ")
    (tmp_path / "q.png").write_bytes(png)
    with pytest.raises(query.QueryError, match=r"q\.png: 32 x 32 = 0\.00102 megapixels, more than the 0\.001 "):
        search_main([str(run_dir), "--image", str(tmp_path / "q.png"), "--max-pixels", "1000"])


def test_a_foreign_host_header_is_a_one_line_400_naming_it_and_the_option(searcher):
    with app_client(searcher, base_url="http://testserver") as c:  # the default: this machine's names only
        error = assert_one_line_error(c.get("/api/info"))
        assert "'testserver'" in error and "--allow-host testserver" in error
        for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "0.0.0.0:8000",
                     "[::2]:8000", "127.0.0.2"):
            assert "--allow-host" in assert_one_line_error(c.get("/api/info", headers={"Host": host})), host
        assert_one_line_error(c.get("/", headers={"Host": "attacker.example"}))  # the page too
        assert_one_line_error(c.post("/api/search/image", content=b"x", headers={"Host": "attacker.example"}))
        for host in ("localhost", "LocalHost:8000", "localhost.", "127.0.0.1:8000", "[::1]:8000", "[0:0::1]"):
            assert c.get("/api/info", headers={"Host": host}).status_code == 200, host
    with app_client(searcher, base_url="http://testserver", allowed_hosts=["Search.Example"]) as c:
        assert c.get("/api/info", headers={"Host": "search.example:443"}).status_code == 200
        assert_one_line_error(c.get("/api/info", headers={"Host": "localhost"}))  # only the names given
    with app_client(searcher, base_url="http://testserver", allowed_hosts=None) as c:  # unchecked
        assert c.get("/api/info", headers={"Host": "anything.example"}).status_code == 200


def test_the_allowed_hosts_are_the_names_of_the_bound_address(monkeypatch):
    loopback = {"localhost", "127.0.0.1", "::1"}
    assert serve.allowed_hosts("127.0.0.1") == serve.allowed_hosts("::1") == loopback
    assert serve.allowed_hosts("localhost") == loopback
    assert serve.allowed_hosts("127.0.0.2") == loopback | {"127.0.0.2"}
    assert serve.allowed_hosts("192.0.2.7") == {"192.0.2.7"}
    assert serve.allowed_hosts("192.0.2.7", ["Search.Example", "[::1]"]) == {"192.0.2.7", "search.example", "::1"}
    assert serve.allowed_hosts("192.0.2.7", ["search.example", "*"]) is None
    monkeypatch.setattr(socket, "gethostname", lambda: "box")
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "box.lan")
    monkeypatch.setattr(socket, "gethostbyname_ex", lambda name: ("box.lan", ["box-alias"], ["192.0.2.7", "10.0.0.5"]))
    machine = loopback | {"box", "box.lan", "box-alias", "192.0.2.7", "10.0.0.5"}
    assert serve.allowed_hosts("0.0.0.0") == serve.allowed_hosts("::") == machine  # not 0.0.0.0 itself

    def unresolved(name):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname_ex", unresolved)
    assert serve.allowed_hosts("0.0.0.0") == loopback | {"box", "box.lan"}


def test_vanished_shards_are_a_one_line_503(run_dir, tmp_path):
    data = tmp_path / "shapes"
    shutil.copytree(run_dir.parent / "shapes", data)
    with app_client(Searcher(run_dir, data_root=data)) as c:
        assert c.get("/api/image/0").status_code == 200  # its shard's offsets are read
        shards = sorted(data.rglob("*.tar"))
        assert shards
        for shard in shards:
            shard.unlink()
        for r in (c.get("/api/image/0"), c.get("/api/image/1", params={"split": "query"}),
                  c.get("/api/search", params={"id": 3})):
            error = assert_one_line_error(r, 503)
            assert error.startswith("the run's data is not available (shapes/") and ".tar: " in error, error
            assert str(tmp_path) not in error and str(tmp_path.resolve()) not in error


def test_an_unexpected_error_is_a_one_line_500_whose_traceback_stays_in_the_server(searcher, monkeypatch):
    def broken(*args):
        raise RuntimeError(f"bug near {searcher.run_dir.resolve()}")

    monkeypatch.setattr(searcher, "search_text", broken)
    with app_client(searcher, raise_server_exceptions=False) as c:
        error = assert_one_line_error(c.get("/api/search", params={"text": "red"}), 500)
        assert "RuntimeError" in error and "bug near" not in error
    with app_client(searcher) as c, pytest.raises(RuntimeError, match="bug near"):  # on to uvicorn, which logs it
        c.get("/api/search", params={"text": "red"})


def test_unknown_routes_and_methods_are_one_line_json_errors(client):
    assert assert_one_line_error(client.get("/api/nope"), 404) == "Not Found"
    r = client.delete("/api/info")
    assert assert_one_line_error(r, 405) == "Method Not Allowed" and r.headers["allow"] == "GET"


@BOMB
def test_no_answer_holds_an_absolute_path_of_the_server(client, run_dir):
    png = client.get("/api/image/5").content
    answers = [client.get("/api/info"),
               client.get("/api/search", params={"text": "a red circle"}),
               client.get("/api/search", params={"id": 3, "modality": "img"}),
               client.get("/api/search", params={"id": 3, "split": "database"}),
               client.post("/api/search/image", content=png),
               client.get("/api/search", params={"text": f"a red {UNKNOWN}"}),
               client.post("/api/search/image", content=b"not an image"),
               client.post("/api/search/image", content=png_header(12000, 12000)),
               client.get("/api/search", params={"id": 99}),
               client.get("/api/image/999"),
               client.get("/api/search", params={"k": 5000})]
    base = run_dir.parent
    for r in answers:
        assert r.headers["content-type"] == "application/json"
        assert str(base) not in r.text and str(base.resolve()) not in r.text, r.text
    info, text, stored = (r.json() for r in answers[:3])
    assert info["run"] == run_dir.name
    assert all(re.fullmatch(r"database-\d{6}\.tar:\d{9}\.png", h["image"]) for h in text["hits"]), text["hits"]
    assert re.match(r"query sample 3 \(image: query-\d{6}\.tar:000000003\.png; labels ", stored["query"]), stored
    assert "(shapes/vocab.json)" in answers[5].json()["error"]  # the dataset by its folder's name


def test_paths_are_shortened_to_the_run_and_dataset_folder_names(tmp_path, monkeypatch):
    real = tmp_path / "real"
    (real / "runs" / "r1").mkdir(parents=True)
    (real / "data" / "shapes").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    link = tmp_path / "link"
    monkeypatch.chdir(real)
    shorten = serve.PathShortener([Path("runs/r1"), link / "data" / "shapes"])  # relative, and through a link
    assert shorten(f"{real}/runs/r1/codes.npz: missing") == "r1/codes.npz: missing"
    assert shorten(f"dataset 'shapes' ({link}/data/shapes) stores") == "dataset 'shapes' (shapes) stores"
    assert shorten(f"'{real}/data/shapes/train-000001.tar'") == "'shapes/train-000001.tar'"
    # not the run (r1 is no prefix of r10), so an absolute path like any other: its file name
    assert shorten(f"{real}/runs/r10/x and /home/someone/vgg19.pth: gone") == "x and vgg19.pth: gone"
    text = "a red/blue circle, image/png, http://example.org/a/b"  # no absolute path
    assert shorten(text) == text


@pytest.mark.parametrize("args,message", [(["--port", "99999"], "0..65535"), (["--port", "-1"], "0..65535"),
                                          (["--port", "http"], "0..65535"), (["-k", "0"], "1..1000"),
                                          (["--max-pixels", "0"], "at least 1")])
def test_bad_options_are_one_line_usage_errors(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        serve.main([str(tmp_path), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m scbch_dist.retrieval.serve: error: ") and message in last, err


# -- connections and answers through uvicorn -------------------------------------------------------

INFO = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"  # a cheap JSON answer


def host_port(address: str) -> tuple[str, int]:
    """'http://127.0.0.1:8123/' -> ('127.0.0.1', 8123)."""
    host, port = address.split("//")[1].rstrip("/").rsplit(":", 1)
    return host, int(port)


def raw_answer(address: tuple[str, int], request: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a new connection and read until the server closes it (every request here
    asks it to, or is one it refuses with Connection: close), within ``timeout`` seconds and 1 MiB:
    (status, headers by lower-case name, body)."""
    deadline = time.monotonic() + timeout
    answer = b""
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(request)
        while len(answer) < 1 << 20:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))  # past the deadline: socket.timeout
            data = conn.recv(65536)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def json_answer(answer: tuple[int, dict[str, str], bytes], status: int) -> dict:
    """The body of ``answer`` (raw_answer's), which must have ``status`` and be JSON."""
    got, headers, body = answer
    assert got == status and headers.get("content-type") == "application/json", answer
    assert headers.get("content-length") in (None, str(len(body))), answer
    return json.loads(body)


@pytest.mark.slow
def test_idle_and_slowloris_connections_neither_starve_the_server_nor_stay_open(searcher):
    """100 connections that send nothing and 5 that send a header line a second (slowloris): a
    request is still answered 200 within a second, and each of them is closed HEAD_TIMEOUT after it
    opened, the slowloris ones too (the deadline is not renewed by their bytes). uvicorn's single
    bound of 64 answered 503 to everyone else while they were open, and it held them for ever."""
    slack = 2.0  # seconds a close may come after its deadline on a busy machine
    with serving(create_app(searcher, k=K)) as address, ExitStack() as stack:
        # socket -> when it began to connect: the server's clock starts at its accept, which can come
        # before the client reads the time after connecting (0.2 ms before, in a CI run under load)
        opened = {}
        for _ in range(100):
            began = time.monotonic()
            opened[stack.enter_context(socket.create_connection(host_port(address), timeout=30))] = began
        slow = []
        for _ in range(5):
            began = time.monotonic()
            conn = stack.enter_context(socket.create_connection(host_port(address), timeout=30))
            opened[conn] = began
            conn.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            slow.append(conn)

        started = time.monotonic()
        info = json_answer(raw_answer(host_port(address), INFO, timeout=1), 200)
        answered = time.monotonic() - started
        assert info["k"] == K and answered < 1, answered

        held = {}  # socket -> seconds from its connecting to the server's closing it
        watch = stack.enter_context(selectors.DefaultSelector())
        for conn in opened:
            watch.register(conn, selectors.EVENT_READ)
        deadline = max(opened.values()) + serve.HEAD_TIMEOUT + slack
        for line in range(int(serve.HEAD_TIMEOUT + slack) + 2):  # a round a second, bounded by the deadline too
            if len(held) == len(opened) or time.monotonic() > deadline:
                break
            for conn in slow:
                if conn not in held:
                    try:
                        conn.sendall(f"X-Slow-{line}: 1\r\n".encode())
                    except OSError:  # closed by the server since the last round
                        held[conn] = time.monotonic() - opened[conn]
                        watch.unregister(conn)
            round_end = min(time.monotonic() + 1, deadline)
            while len(held) < len(opened) and time.monotonic() < round_end:
                for key, _ in watch.select(timeout=max(round_end - time.monotonic(), 0.001)):
                    conn = key.fileobj
                    try:
                        data = conn.recv(1024)
                    except ConnectionResetError:  # a slowloris line that crossed the close
                        data = b""
                        assert conn in slow
                    assert data == b"", data  # closed without an answer: no request was made
                    held[conn] = time.monotonic() - opened[conn]
                    watch.unregister(conn)
    assert len(held) == len(opened), f"{len(opened) - len(held)} of {len(opened)} connections still open"
    assert all(serve.HEAD_TIMEOUT <= seconds <= serve.HEAD_TIMEOUT + slack for seconds in held.values()), \
        sorted(held.values())


def test_requests_that_http_cannot_parse_are_answered_in_json(searcher):
    """h11's refusals, which uvicorn answers in plain text: each a JSON error that says what was wrong."""
    head = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    cases = [(head + b"Host: 127.0.0.1\r\n\r\n", 400, "Found multiple Host: headers"),
             (b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
              b"Content-Length: " + str(10**30).encode() + b"\r\n\r\n", 400, "bad Content-Length"),
             (b"GARBAGE\r\n\r\n", 400, "illegal request line"),
             (head + b"X-Pad: " + b"a" * serve.MAX_HEAD, 431, "longer than 16 KiB")]  # and no end of headers
    with serving(create_app(searcher, k=K)) as address:
        for request, status, message in cases:
            error = json_answer(raw_answer(host_port(address), request), status)["error"]
            assert message in error and "\n" not in error, (request[:80], error)
        assert json_answer(raw_answer(host_port(address), INFO), 200)["k"] == K  # the server goes on


def test_the_openapi_schema_is_not_served_without_the_docs_pages(searcher):
    with serving(create_app(searcher, k=K)) as address:
        for path in ("/openapi.json", "/docs", "/redoc"):
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            assert json_answer(raw_answer(host_port(address), request), 404) == {"error": "Not Found"}, path


def test_an_overloaded_server_answers_503_in_json_at_once(searcher, monkeypatch):
    """More requests in progress than serve.MAX_REQUESTS, or connections open than
    serve.MAX_CONNECTIONS (both made small here): the next request is a JSON 503, without waiting."""
    entered, release = threading.Event(), threading.Event()
    search_text = searcher.search_text

    def held_search(*args):
        entered.set()
        release.wait(30)
        return search_text(*args)

    monkeypatch.setattr(searcher, "search_text", held_search)
    monkeypatch.setattr(serve, "MAX_REQUESTS", 1)
    search = b"GET /api/search?text=red HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with serving(create_app(searcher, k=K)) as address:
        answers = []
        first = threading.Thread(target=lambda: answers.append(raw_answer(host_port(address), search, timeout=60)))
        first.start()
        try:
            assert entered.wait(30), "the first search never started"
            error = json_answer(raw_answer(host_port(address), INFO, timeout=5), 503)["error"]
            assert error == "the server is busy: more than 1 requests in progress; try again shortly"
        finally:
            release.set()
            first.join(60)
        assert_hits(json_answer(answers[0], 200), K)  # the request in progress was served

        monkeypatch.setattr(serve, "MAX_CONNECTIONS", 3)
        with ExitStack() as stack:
            for _ in range(3):
                stack.enter_context(socket.create_connection(host_port(address), timeout=30))
            error = json_answer(raw_answer(host_port(address), INFO, timeout=5), 503)["error"]
            assert error == "the server is busy: more than 3 open connections; try again shortly"
        for _ in range(50):  # the idle ones closed: answered again, once the server has seen them go
            answer = raw_answer(host_port(address), INFO, timeout=5)
            if answer[0] == 200:
                break
            time.sleep(0.1)
        json_answer(answer, 200)


# -- the command ----------------------------------------------------------------------------------


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scbch_dist.retrieval.serve", str(run_dir), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_the_command_prints_the_url_refuses_a_busy_port_and_stops_on_ctrl_c(run_dir):
    proc = start(run_dir, "--port", "0", "-k", "3", "--allow-host", "search.example", "--max-pixels", "1000000")
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"serving {run_dir} (shapes, scbch, 32 bits, flat index, 240"), lines
        address = lines[1].split()[1]
        assert address.startswith("http://127.0.0.1:") and address.endswith("/"), lines
        with urllib.request.urlopen(address + "api/search?text=red", timeout=30) as r:
            assert r.status == 200 and b'"k":3' in r.read()
        with urllib.request.urlopen(urllib.request.Request(address + "api/info", headers={"Host": "search.example:80"}),
                                    timeout=30) as r:
            assert r.status == 200  # --allow-host
        for request, status, message in (
                (urllib.request.Request(address + "api/info", headers={"Host": "attacker.example"}), 400,
                 b"--allow-host attacker.example"),
                (urllib.request.Request(address + "api/search/image", data=png_header(2000, 1000),
                                        headers={"Content-Type": "image/png"}), 400,
                 b"2000 x 1000 = 2 megapixels, more than the 1 a query image may have (--max-pixels)")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=30)
            assert e.value.code == status and message in e.value.read()
        busy = start(run_dir, "--port", address.rsplit(":", 1)[1].rstrip("/"))
        out, err = busy.communicate(timeout=120)
        assert busy.returncode == 2 and err.count("\n") == 1 and "cannot listen on 127.0.0.1" in err, err
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert out.strip().endswith("stopped")


# -- the page in a browser ------------------------------------------------------------------------


@contextmanager
def serving(app):
    """uvicorn on a free port of 127.0.0.1 in a thread (no signal handlers there), with the
    command's settings (serve.server_config); yields the URL."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(serve.server_config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield url(sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def missing_browser() -> str | None:
    """Why the browser test cannot run here (None when it can)."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium not installed (the dev extra)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return ("the browser test needs the OS chromium and chromedriver (apt-get install chromium chromium-driver; "
                ".ci/setup does it as root)")
    return None


def headless_chromium():
    """Selenium on the OS Chromium and its chromedriver, both named explicitly so that Selenium
    Manager never downloads either."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root
    return webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))


@pytest.mark.slow
@pytest.mark.skipif(missing_browser() is not None, reason=missing_browser() or "")
def test_the_page_searches_in_a_headless_browser(searcher, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = headless_chromium()
    try:
        with serving(create_app(searcher, k=K)) as address:
            browser.get(address)
            wait = WebDriverWait(browser, 30)
            wait.until(lambda b: "240 database items" in b.find_element(By.ID, "run").text)
            assert "shapes" in browser.find_element(By.ID, "run").text

            browser.find_element(By.ID, "query").send_keys("a red circle")
            browser.find_element(By.ID, "search").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".hit")) == K)
            hits = browser.find_elements(By.CSS_SELECTOR, ".hit")
            distances = [int(h.get_attribute("data-distance")) for h in hits]
            assert distances == sorted(distances)
            assert all(h.get_attribute("data-id").isdigit() and h.find_element(By.CSS_SELECTOR, ".labels").text
                       for h in hits)
            loaded = "return [...document.querySelectorAll('.hit img')].map(i => i.complete ? i.naturalWidth : -1)"
            wait.until(lambda b: all(w != -1 for w in b.execute_script(loaded)))
            widths = browser.execute_script(loaded)
            assert len(widths) == K and all(w > 0 for w in widths), widths
            latency = browser.find_element(By.ID, "latency").text
            assert "encode" in latency and "round trip" in latency, latency
            assert not browser.find_element(By.ID, "error").is_displayed()

            png = tmp_path / "query.png"  # a database image, uploaded as a query: hits are captions
            png.write_bytes(searcher.items.image("database", 7)[0])
            browser.find_element(By.ID, "image").send_keys(str(png))
            wait.until(lambda b: "query.png" in b.find_element(By.ID, "latency").text)
            assert len(browser.find_elements(By.CSS_SELECTOR, ".hit")) == K

            sample = browser.find_element(By.ID, "sample")  # a stored query sample's caption code
            sample.clear()
            sample.send_keys("3")
            browser.find_element(By.ID, "search-id").click()
            wait.until(lambda b: "query sample 3 (text" in b.find_element(By.ID, "latency").text)
            ids = [int(h.get_attribute("data-id")) for h in browser.find_elements(By.CSS_SELECTOR, ".hit")]
            assert ids == [h.id for h in searcher.search_id(3, K).hits]

            query = browser.find_element(By.ID, "query")
            query.clear()
            query.send_keys(UNKNOWN, Keys.ENTER)  # Enter searches too
            wait.until(lambda b: UNKNOWN in b.find_element(By.ID, "error").text)
            assert browser.find_element(By.ID, "error").is_displayed()
            assert browser.find_elements(By.CSS_SELECTOR, ".hit") == []
    finally:
        browser.quit()
