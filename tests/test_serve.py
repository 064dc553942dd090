"""The search service (scbch_dist.serve): its JSON API through FastAPI's TestClient on a tiny
fine-tuned shapes run; the command's start-up line, port refusal and Ctrl-C; the page in a real
headless Chromium (slow, skipped without selenium, chromium or chromedriver)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("timm")
pytest.importorskip("transformers")

from scbch_dist.index import build  # noqa: E402
from scbch_dist.search import Searcher  # noqa: E402
from scbch_dist.serve import create_app, listen, url, warm_up  # noqa: E402
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
    settings = [f"data.root={base / 'shapes'}", "shapes.n_train=200", "shapes.n_query=20", "shapes.n_extra_database=40",
                "model.hidden=64", "model.image.kwargs.depth=1", "model.text.kwargs.num_hidden_layers=1",
                f"run.dir={base / 'run'}", "train.epochs=1", "eval.every=1", "cscc.warmup_epochs=1",
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

    with TestClient(create_app(searcher, k=K)) as c:
        yield c


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
    assert info["run"] == str(run_dir)
    assert (info["dataset"], info["method"], info["bits"], info["kind"]) == ("shapes", "scbch", 32, "flat")
    assert (info["database"], info["queries"], info["k"]) == (240, 20, K)
    assert len(info["classes"]) == 11 and "circle" in info["classes"]
    assert info["text_queries"] and info["image_queries"] and info["captions"] and info["images"]


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


# -- the command ----------------------------------------------------------------------------------


def start(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scbch_dist.serve", str(run_dir), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_the_command_prints_the_url_refuses_a_busy_port_and_stops_on_ctrl_c(run_dir):
    proc = start(run_dir, "--port", "0", "-k", "3")
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith(f"serving {run_dir} (shapes, scbch, 32 bits, flat index, 240"), lines
        address = lines[1].split()[1]
        assert address.startswith("http://127.0.0.1:") and address.endswith("/"), lines
        with urllib.request.urlopen(address + "api/search?text=red", timeout=30) as r:
            assert r.status == 200 and b'"k":3' in r.read()
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
    """uvicorn on a free port of 127.0.0.1 in a thread (no signal handlers there); yields the URL."""
    import uvicorn

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
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
