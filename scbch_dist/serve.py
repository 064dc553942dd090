"""Search a run from a browser: a small HTTP service and one page (docs/search.md).

    python -m scbch_dist.serve RUN_DIR [--port 8000] [--host 127.0.0.1] [--kind flat] [-k 10] [--data-root DIR]

Opens the run once (scbch_dist.search.Searcher: its codes, the database index of --kind, the
dataset, and the model, loaded before the first request), prints the URL to open, and serves
until Ctrl-C. Needs the ``serve`` extra (FastAPI and uvicorn). Endpoints, all JSON except the
page and the images:

    GET  /                                   the search page (scbch_dist/static/search.html)
    GET  /api/info                           the run: Searcher.describe(), and k (the default -k)
    GET  /api/search?text=...&k=10           a caption finds images
    GET  /api/search?id=N&modality=txt&split=query   a stored sample's code as the query
    POST /api/search/image?k=10&name=...     the raw image bytes as the body find texts
    GET  /api/image/{id}[?split=database]    a sample's image, with its MIME type; 404 if none

A search answers Result.to_dict(): {query, modality, hits: [{rank, id, distance, labels, caption,
image}], encode_ms, search_ms} (server-side milliseconds) plus k. A known error (unknown words,
an unreadable image, a bad parameter) answers HTTP 400 with {"error": "<one line>"}.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# (Request, Query) at run time, and they are imported inside create_app, so that this module
# imports without the serve extra.
import argparse
import socket
import threading
from importlib import resources
from pathlib import Path

from scbch_dist import cli
from scbch_dist.config import IndexSettings
from scbch_dist.errors import ScbchError
from scbch_dist.index import CODE_SPLITS
from scbch_dist.search import Searcher

MAX_K = 1000  # hits per search: a page of results, not a dump of the database
MAX_UPLOAD = 32 << 20  # bytes of an uploaded query image


class ServeError(ScbchError):
    """The service cannot start or cannot answer as asked (port in use, bad parameter, ...)."""


def page() -> str:
    """The search page, shipped inside the package (package-data static/*.html)."""
    return resources.files("scbch_dist").joinpath("static/search.html").read_text(encoding="utf-8")


def create_app(searcher: Searcher, *, k: int = 10):
    """The FastAPI app over one opened run; ``k`` is the default number of hits.

    Searches run in FastAPI's thread pool and take a lock: the encoder loads its model on first
    use and torch modules, FAISS searches and the shard-offset cache are not meant for concurrent
    calls. Image reads only seek into shards and run without it."""
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="scbch_dist search", docs_url=None, redoc_url=None)  # the docs pages need a CDN
    info = searcher.describe()
    html = page()
    lock = threading.Lock()
    k_param = Query(k, ge=1, le=MAX_K, description="hits to return")

    def answer(k: int, search) -> dict:
        """``search()`` (a Result) under the lock, as JSON."""
        with lock:
            result = search()
        return {**result.to_dict(), "k": k}

    @app.exception_handler(ScbchError)
    async def known_error(request: Request, e: ScbchError):
        return JSONResponse({"error": cli.one_line(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, e: RequestValidationError):
        # FastAPI's 422 lists every failed field; the page shows one line, like the command line
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or err['loc'][0]}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"error": "; ".join(parts)}, status_code=400)

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return html

    @app.get("/api/info")
    def api_info() -> dict:
        return {**info, "k": k}  # k: the default hits per search (-k)

    @app.get("/api/search")
    def api_search(text: str | None = None, id: int | None = None, modality: str = Query("txt", pattern="^(txt|img)$"),
                   split: str = Query("query", pattern=f"^({'|'.join(CODE_SPLITS)})$"), k: int = k_param) -> dict:
        if (text is None) == (id is None):
            raise ServeError("give one of text=... (a caption) or id=N (a stored sample)")
        if text is not None:
            return answer(k, lambda: searcher.search_text(text, k))
        return answer(k, lambda: searcher.search_id(id, k, modality=modality, split=split))

    @app.post("/api/search/image")
    async def api_search_image(request: Request, k: int = k_param, name: str = "the uploaded image") -> dict:
        # the raw body, not a multipart form: the page sends the File itself (no python-multipart)
        data = await request.body()
        if not data:
            raise ServeError("empty request body: send the image's bytes as the body")
        if len(data) > MAX_UPLOAD:
            raise ServeError(f"{name}: {len(data)} bytes, more than the {MAX_UPLOAD >> 20} MiB an upload may have")
        return await run_in_threadpool(answer, k, lambda: searcher.search_image(data, k, name))

    @app.get("/api/image/{sample}")
    def api_image(sample: int, split: str = Query("database", pattern=f"^({'|'.join(CODE_SPLITS)})$")):
        try:
            item = searcher.items.image(split, sample)
        except ScbchError as e:  # an id outside the split: no such image
            return JSONResponse({"error": cli.one_line(e)}, status_code=404)
        if item is None:
            return JSONResponse({"error": f"{split} sample {sample} has no image in dataset {info['dataset']}"},
                                status_code=404)
        data, mime = item
        return Response(data, media_type=mime)

    return app


def warm_up(searcher: Searcher) -> None:
    """Load the model now, so the first query's encode_ms is encoding, not loading; a run that
    cannot encode queries still serves stored-sample searches (the error comes with the query)."""
    info = searcher.describe()
    if not (info["text_queries"] or info["image_queries"]):
        return
    try:
        searcher.encoder.model
    except ScbchError as e:
        print(f"note: {cli.one_line(e)}", flush=True)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound here so that a port in use is a one-line error and --port 0
    picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after Ctrl-C (TIME_WAIT)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    sock.listen(2048)  # connections wait in the backlog from now on: the URL printed next works at once
    return sock


def url(sock: socket.socket) -> str:
    """The address to open: a wildcard host is reached as localhost from this machine."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--kind", default=IndexSettings.kind, help="which built index (default flat)")
    p.add_argument("-k", type=int, default=10, help="default hits per search (default 10)")
    p.add_argument("--data-root", help="the run's dataset folder, if not at its data.root from here")
    args = p.parse_args(argv)
    if not 1 <= args.k <= MAX_K:
        p.error(f"-k must be in 1..{MAX_K}")
    try:
        import uvicorn
    except ImportError:
        raise ServeError("the service needs FastAPI and uvicorn: pip install -e '.[serve]'") from None

    sock = listen(args.host, args.port)  # first: a busy port fails before seconds of loading
    try:
        searcher = Searcher(args.run_dir, kind=args.kind, data_root=args.data_root)
        app = create_app(searcher, k=args.k)
        warm_up(searcher)
        info = searcher.describe()
        print(f"serving {info['run']} ({info['dataset']}, {info['method']}, {info['bits']} bits, {info['kind']} index, "
              f"{info['database']} database items)\nopen {url(sock)}  (Ctrl-C stops)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again for the caller
            pass
    finally:
        sock.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.serve")
