"""Search a run from a browser: a small HTTP service and one page (docs/search.md).

    python -m scbch_dist.retrieval.serve RUN_DIR [--port 8000] [--host 127.0.0.1] [--kind flat] [-k 10] [--data-root DIR]
                                       [--allow-host NAME ...] [--max-pixels N]

Opens the run once (scbch_dist.retrieval.search.Searcher: its codes, the database index of --kind, the
dataset, and the model, loaded before the first request), prints the URL to open, and serves
until Ctrl-C. Needs the ``serve`` extra (FastAPI and uvicorn). Endpoints, all JSON except the
page and the images:

    GET  /                                   the search page (scbch_dist/retrieval/static/search.html)
    GET  /api/info                           the run: Searcher.describe() (the run by its folder's name), k
                                             (the default -k), max_upload (bytes), max_pixels
    GET  /api/search?text=...&k=10           a caption finds images
    GET  /api/search?id=N&modality=txt&split=query   a stored sample's code as the query
    POST /api/search/image?k=10&name=...     the raw image bytes as the body find texts
    GET  /api/image/{id}[?split=database]    a sample's image, with its MIME type; 404 if none

A search answers Result.to_dict(): {query, modality, hits: [{rank, id, distance, labels, caption,
image}], encode_ms, search_ms} (server-side milliseconds) plus k. Every error is {"error": "<one
line>"}: 400 for a known error (unknown words, an unreadable image, a bad parameter, an image of
more than --max-pixels, a Host header that is not this server's), 404 for a missing image or
route, 413 for an upload over MAX_UPLOAD, 415 for an upload that is not image/* or
application/octet-stream, 503 when the run's files cannot be read or the server is busy, 500 for
anything else (its traceback goes to the server's log); a request that HTTP cannot parse is
answered 400 (431 for too long a header block) in the same shape (BoundedH11Protocol). Answers
name files relative to the run and dataset folders, never by this machine's absolute paths.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations
# (Request, Query) at run time, and they are imported inside create_app, so that this module
# imports without the serve extra.
import argparse
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from scbch_dist import cli
from scbch_dist.config import IndexSettings
from scbch_dist.errors import ScbchError
from scbch_dist.retrieval.index import CODE_SPLITS
from scbch_dist.retrieval.query import MAX_PIXELS, check_image
from scbch_dist.retrieval.search import Searcher

if TYPE_CHECKING:  # the serve extra: imported where it is used
    import uvicorn

MAX_K = 1000  # hits per search: a page of results, not a dump of the database
MAX_UPLOAD = 32 << 20  # bytes of an uploaded query image
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # what this machine calls itself
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # --host values that listen on every address

# What one client can hold of the server (BoundedH11Protocol, docs/search.md "Limits"). An open
# connection costs a socket and a few KiB in asyncio, a request in progress a task, a thread of
# the pool or a wait for the search lock: connections are bounded loosely and work tightly, so
# that a hundred idle sockets do not lock others out, as one bound of 64 on both did.
MAX_CONNECTIONS = 512  # open connections: below the usual limit of 1024 open files, which accept() must not hit
MAX_REQUESTS = 64  # requests in progress (searches queue for one lock); beyond, 503 at once
HEAD_TIMEOUT = 5.0  # seconds from connecting, or from the last answer, to a whole request line and headers:
#                     one deadline, not renewed by each byte, so a client trickling a header line now and
#                     then (slowloris) is closed as surely as one that sends nothing; a browser sends its
#                     head at once
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle kept-alive connection is held after an answer (uvicorn's timeout_keep_alive)
MAX_HEAD = 16 << 10  # bytes of a request line and headers still arriving (h11's max_incomplete_event_size)

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: our lines land between its lines


class ServeError(ScbchError):
    """The service cannot start or cannot answer as asked (port in use, bad parameter, ...);
    ``status`` is the HTTP status the answer gets."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error_body(message: str) -> bytes:
    """The bytes of an error answer, as JSONResponse writes them: {"error": message}."""
    return json.dumps({"error": message}, separators=(",", ":")).encode()


async def send_error(send, status: int, message: str, close: bool = False) -> None:
    """Answer {"error": message} with ``status`` through the ASGI ``send``, for the layers below
    FastAPI's error handlers; ``close``: and close the connection after it."""
    body = error_body(message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def page() -> str:
    """The search page, shipped inside the package (package-data static/*.html)."""
    return resources.files("scbch_dist").joinpath("retrieval/static/search.html").read_text(encoding="utf-8")


# -- which Host headers are answered ----------------------------------------------------------------


def host_name(host: str) -> str:
    """The name in a Host header or --host value, in one spelling: lower case, without the port,
    the IPv6 brackets or a trailing dot, an IP address in its compressed form ('[0:0::1]:80' -> '::1')."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        name = name.partition(":")[0]
    name = name.rstrip(".")
    try:
        return ipaddress.ip_address(name).compressed
    except ValueError:
        return name


def is_loopback(host: str) -> bool:
    try:
        return host_name(host) == "localhost" or ipaddress.ip_address(host_name(host)).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: Iterable[str] = ()) -> set[str] | None:
    """The Host header names a server listening on ``host`` answers: the names of that address
    (for a loopback address this machine's loopback names; for a wildcard address those, the
    machine's hostname, FQDN and IPv4 addresses; else the address itself) and ``extra``
    (--allow-host). None, meaning any, when ``extra`` holds '*'."""
    extra = list(extra)
    if "*" in extra:
        return None
    if host in WILDCARD_HOSTS:
        hostname = socket.gethostname()
        names = {*LOOPBACK_HOSTS, hostname, socket.getfqdn()}
        try:
            name, aliases, addresses = socket.gethostbyname_ex(hostname)
            names |= {name, *aliases, *addresses}
        except OSError:  # a hostname that does not resolve is still this machine's name
            pass
    elif is_loopback(host):
        names = {*LOOPBACK_HOSTS, host}
    else:
        names = {host}
    return {host_name(n) for n in (*names, *extra) if n}


class HostCheck:
    """ASGI middleware: answer only requests whose Host header is one of ``allowed`` (names as
    host_name spells them). A server on 127.0.0.1 is otherwise open to DNS rebinding: a page of
    another site whose name is made to resolve to 127.0.0.1 reads the API as its own origin.
    (Starlette's TrustedHostMiddleware answers in plain text; every error here is JSON.)"""

    def __init__(self, app, allowed: set[str]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan
            return await self.app(scope, receive, send)
        hosts = [value.decode("latin-1") for key, value in scope["headers"] if key == b"host"]
        if len(hosts) == 1 and host_name(hosts[0]) in self.allowed:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # no websocket routes here: refuse before accepting (403)
            return await send({"type": "websocket.close", "code": 1008})
        if len(hosts) == 1:
            name = host_name(hosts[0])
            message = f"Host {name!r} is not a name of this server; to answer to it, start it with --allow-host {name}"
        else:
            message = f"a request needs one Host header, not {len(hosts)}"
        await send_error(send, 400, message)


# -- what answers say about files -------------------------------------------------------------------

# a directory part of an absolute path: a '/' that follows no name, URL or path character, and
# the names up to the last '/' ('/home/u/w/vgg19.pth' -> 'vgg19.pth')
ABSOLUTE_DIRS = re.compile(r"(?<![\w.~:/-])/(?:[^\s/:'\"()\[\],;<>]+/)+")


class PathShortener:
    """Rewrites this machine's absolute paths in a message to short forms: each of ``folders``
    (the run, the dataset) by its name ('/srv/runs/r1/codes.npz' -> 'r1/codes.npz'), as given
    (made absolute from the working directory) and resolved (through links); any other
    absolute path by its file name. The client learns which file, not where the server keeps it."""

    def __init__(self, folders: Iterable[Path]):
        forms = {}
        for folder in folders:
            name = Path(folder).resolve().name
            for form in (os.path.abspath(folder), str(Path(folder).resolve())):
                if name:  # '/' has no name: left to ABSOLUTE_DIRS
                    forms[form] = name
        # longest first: a folder inside another is rewritten by its own name
        self.forms = [(re.compile(rf"(?<![\w.~/-]){re.escape(form)}(?![\w.~-])"), name)
                      for form, name in sorted(forms.items(), key=lambda item: -len(item[0]))]

    def __call__(self, text: str) -> str:
        for form, name in self.forms:
            text = form.sub(lambda m: name, text)  # a function: a name is no replacement template
        return ABSOLUTE_DIRS.sub("", text)


# -- the app ----------------------------------------------------------------------------------------


def check_upload_type(content_type: str | None, name: str) -> None:
    """Refuse (415) an upload that is not an image: the page sends the File itself, with its type,
    or application/octet-stream when the browser knows none."""
    mime = (content_type or "application/octet-stream").partition(";")[0].strip().lower()
    if not (mime.startswith("image/") or mime == "application/octet-stream"):
        raise ServeError(f"{name}: Content-Type {mime!r}; send the image's bytes as image/* or "
                         "application/octet-stream", 415)


async def read_upload(request, name: str, max_upload: int) -> bytes:
    """The body of ``request`` (a Starlette Request), refused (413) as soon as it is known to be
    over ``max_upload`` bytes: from its Content-Length before a byte is read, else while it streams in."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdecimal() and int(declared) > max_upload:
        raise ServeError(f"{name}: {int(declared)} bytes, more than the {max_upload / 2**20:.3g} MiB an upload "
                         "may have", 413)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_upload:
                raise ServeError(f"{name}: more than the {max_upload / 2**20:.3g} MiB an upload may have", 413)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ServeError(f"{name}: the client went away during the upload") from None
    return b"".join(chunks)


def add_error_answers(app, error) -> None:
    """Every error of ``app`` answered by ``error(status, message, headers)``: a known error 400
    (a ServeError its own status), a bad parameter 400, an unknown route or method 404/405, a
    file that cannot be read 503, anything else 500 without its message."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(ScbchError)
    async def known_error(request: Request, e: ScbchError):
        status = e.status if isinstance(e, ServeError) else 400
        # an upload refused before its body was read in full: uvicorn would go on reading and
        # dropping the rest of it; a closed connection stops the sender
        return error(status, cli.one_line(e), {"Connection": "close"} if status in (413, 415) else None)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, e: RequestValidationError):
        # FastAPI's 422 lists every failed field; the page shows one line, like the command line
        parts = [f"{'.'.join(str(x) for x in err['loc'][1:]) or err['loc'][0]}: {err['msg']}" for err in e.errors()]
        return error(400, "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # an unknown route (404), a wrong method (405)
        return error(e.status_code, str(e.detail), e.headers)

    @app.exception_handler(OSError)
    async def data_missing(request: Request, e: OSError):
        # shards, a checkpoint or the index removed or unreadable while serving: the server's
        # operator gets the full path, the client the file's short name
        log.error(f"{request.method} {request.url.path}: {e}")
        what = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else cli.one_line(e)
        return error(503, f"the run's data is not available ({what})")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        # Starlette raises e again after this answer, and uvicorn logs its traceback: the client
        # gets one line without the message, which may hold anything
        return error(500, f"internal error ({type(e).__name__}); the server's log has its traceback")


def create_app(searcher: Searcher, *, k: int = 10, allowed_hosts: Iterable[str] | None = LOOPBACK_HOSTS,
               max_upload: int = MAX_UPLOAD):
    """The FastAPI app over one opened run; ``k`` is the default number of hits.

    ``allowed_hosts``: the Host header names answered (allowed_hosts() makes them from --host and
    --allow-host; the default, this machine's loopback names, suits a server on 127.0.0.1); None
    answers any Host (behind a proxy that checks it, or a test client's 'testserver').
    ``max_upload``: bytes an uploaded image may have. The largest image decoded is the searcher's
    (``Searcher(max_pixels=...)``).

    Searches run in FastAPI's thread pool and take a lock: the encoder loads its model on first
    use and torch modules, FAISS searches and the shard-offset cache are not meant for concurrent
    calls. Image reads only seek into shards and run without it; so does the check of an uploaded
    image's header, so that a refused image never makes a search wait."""
    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    # the docs pages need a CDN; without them, their schema is no answer of the service either
    app = FastAPI(title="scbch_dist search", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed={host_name(h) for h in allowed_hosts})
    raw_root = searcher.items.raw_root  # the images' folder: the dataset, or the one it was extracted from
    shorten = PathShortener([searcher.run_dir, searcher.root] + ([raw_root] if raw_root is not None else []))
    max_pixels = searcher.encoder.max_pixels
    info = {**searcher.describe(), "run": searcher.run_dir.resolve().name, "max_upload": max_upload,
            "max_pixels": max_pixels}
    html = page()
    lock = threading.Lock()
    k_param = Query(k, ge=1, le=MAX_K, description="hits to return")

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        """Every error answer: one line, without this machine's paths."""
        return JSONResponse({"error": shorten(cli.one_line(message))}, status_code=status, headers=headers)

    add_error_answers(app, error)

    def in_dataset(place: str) -> str:
        """'/abs/shapes/database-000001.tar:000000123.png' -> 'database-000001.tar:000000123.png'."""
        return shorten(place.replace(f"{raw_root}{os.sep}", "") if raw_root is not None else place)

    def answer(k: int, search, stored: bool = False) -> dict:
        """``search()`` (a Result) under the lock, as JSON; ``stored``: the query is a stored
        sample, whose description names where its image is."""
        with lock:
            result = search()
        body = {**result.to_dict(), "k": k}
        for hit in body["hits"]:
            if hit["image"] is not None:
                hit["image"] = in_dataset(hit["image"])
        if stored:
            body["query"] = in_dataset(body["query"])
        return body

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
        return answer(k, lambda: searcher.search_id(id, k, modality=modality, split=split), stored=True)

    @app.post("/api/search/image")
    async def api_search_image(request: Request, k: int = k_param, name: str = "the uploaded image") -> dict:
        # the raw body, not a multipart form: the page sends the File itself (no python-multipart),
        # with its type, or application/octet-stream when the browser knows none
        check_upload_type(request.headers.get("content-type"), name)
        data = await read_upload(request, name, max_upload)
        if not data:
            raise ServeError("empty request body: send the image's bytes as the body")
        await run_in_threadpool(check_image, data, name, max_pixels)  # before the lock: see the docstring
        return await run_in_threadpool(answer, k, lambda: searcher.search_image(data, k, name))

    @app.get("/api/image/{sample}")
    def api_image(sample: int, split: str = Query("database", pattern=f"^({'|'.join(CODE_SPLITS)})$")):
        try:
            item = searcher.items.image(split, sample)
        except ScbchError as e:  # an id outside the split: no such image
            return error(404, cli.one_line(e))
        if item is None:
            return error(404, f"{split} sample {sample} has no image in dataset {info['dataset']}")
        data, mime = item
        return Response(data, media_type=mime)

    return app


# -- the connections --------------------------------------------------------------------------------


@cache
def bounded_protocol() -> type:
    """uvicorn's h11 protocol with this server's limits (for ``uvicorn.Config(http=...)``), made on
    first use so that this module imports without uvicorn. What it changes:

    - a connection that has not sent a whole request line and headers HEAD_TIMEOUT seconds after
      it opened, or after its last answer, is closed without an answer. uvicorn closes only a
      kept-alive connection that sends nothing at all after an answer, so a socket that never
      sends, or sends a header line now and then, was held for ever;
    - a request is answered 503 at once when more than MAX_REQUESTS are in progress or more than
      MAX_CONNECTIONS connections are open. uvicorn's limit_concurrency is one bound on both,
      which idle connections alone reach;
    - a request that HTTP cannot parse (h11's error) is answered 400, or h11's status for it (431
      for a header block over MAX_HEAD), and the 503 too, in JSON like every answer of the
      service, where uvicorn answers in plain text.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            # H11Protocol.handle_events runs self.app for each request: the limits come first
            self.served_app, self.app = self.app, self.refuse_when_busy
            self.head_timer = None  # the deadline of the request head awaited, while one is
            self.cycle_awaited = None  # the request cycle when the deadline was set: a new cycle means a new head

        # the deadline for a request head

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.check_head()

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():  # an answer with Connection: close closes first
                self.await_head()
            super().on_response_complete()  # which may start a pipelined request already read
            self.check_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_head_timer()
            super().connection_lost(exc)

        def await_head(self) -> None:
            self.stop_head_timer()
            self.cycle_awaited = self.cycle
            self.head_timer = self.loop.call_later(HEAD_TIMEOUT, self.head_timed_out)

        def check_head(self) -> None:
            if self.cycle is not self.cycle_awaited:  # handle_events made a cycle: a whole head came
                self.stop_head_timer()

        def stop_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_timed_out(self) -> None:
            self.head_timer = None
            if not self.transport.is_closing():
                self.transport.close()  # connection_lost follows, as for uvicorn's keep-alive timeout

        # the answers uvicorn would give in plain text

        async def refuse_when_busy(self, scope, receive, send) -> None:
            # this request's task is in self.tasks already, and its connection in self.connections
            if len(self.tasks) > MAX_REQUESTS:
                message = f"the server is busy: more than {MAX_REQUESTS} requests in progress; try again shortly"
            elif len(self.connections) > MAX_CONNECTIONS:
                message = f"the server is busy: more than {MAX_CONNECTIONS} open connections; try again shortly"
            else:
                return await self.served_app(scope, receive, send)
            self.logger.warning(message)
            await send_error(send, 503, message, close=True)

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this from its `except h11.RemoteProtocolError:`, the error being handled,
            # whose text says what was wrong and whose hint is the status h11 means for it
            error = sys.exc_info()[1]
            status = getattr(error, "error_status_hint", 400)
            if status == 431:
                message = f"the request line and headers are longer than {MAX_HEAD >> 10} KiB"
            else:  # h11 may quote a bad header: cut to a line's length
                message = f"not a valid HTTP request ({cli.one_line(error or msg)[:200]})"
            body = error_body(message)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers, reason=STATUS_PHRASES[status]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    return BoundedH11Protocol


def server_config(app, log_level: str = "info") -> "uvicorn.Config":
    """uvicorn's settings for ``app``: the h11 parser with this server's limits (bounded_protocol:
    connections, requests in progress, the deadline for a request head; limit_concurrency stays
    unset, its single bound being the protocol's two), a bound on a header block still arriving
    (h11's; httptools, were it installed, would ignore it), the keep-alive time, no websockets."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, http=bounded_protocol(), ws="none",
                          h11_max_incomplete_event_size=MAX_HEAD, timeout_keep_alive=KEEP_ALIVE_TIMEOUT)


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


def port_number(text: str) -> int:
    """argparse type of --port: 0 (any free port) to 65535."""
    if not (text.isdecimal() and 0 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 0..65535")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scbch_dist.retrieval.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--kind", default=IndexSettings.kind, help="which built index (default flat)")
    p.add_argument("-k", type=int, default=10, help="default hits per search (default 10)")
    p.add_argument("--data-root", help="the run's dataset folder, if not at its data.root from here")
    p.add_argument("--allow-host", dest="allow_hosts", action="append", default=[], metavar="NAME",
                   help="also answer requests for this Host name (repeatable; '*': any). By default only the "
                        "names of --host are answered: localhost, 127.0.0.1 and ::1 for a loopback address")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, default=MAX_PIXELS,
                   help=f"refuse uploaded images of more pixels, width x height (default {MAX_PIXELS:,})")
    args = p.parse_args(argv)
    if not 1 <= args.k <= MAX_K:
        p.error(f"-k must be in 1..{MAX_K}")
    if args.max_pixels < 1:
        p.error("--max-pixels must be at least 1")
    try:
        import uvicorn
    except ImportError:
        raise ServeError("the service needs FastAPI and uvicorn: pip install -e '.[serve]'") from None

    sock = listen(args.host, args.port)  # first: a busy port fails before seconds of loading
    try:
        searcher = Searcher(args.run_dir, kind=args.kind, data_root=args.data_root, max_pixels=args.max_pixels)
        app = create_app(searcher, k=args.k, allowed_hosts=allowed_hosts(args.host, args.allow_hosts))
        warm_up(searcher)
        info = searcher.describe()
        print(f"serving {info['run']} ({info['dataset']}, {info['method']}, {info['bits']} bits, {info['kind']} index, "
              f"{info['database']} database items)\nopen {url(sock)}  (Ctrl-C stops)", flush=True)
        # uvicorn by default bounds neither connections nor requests in progress nor the time a
        # request head may take: server_config bounds each
        server = uvicorn.Server(server_config(app))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then raises it again for the caller
            pass
    finally:
        sock.close()
    print("stopped", flush=True)


def console() -> None:
    """The ``scbch-serve`` command (pyproject's [project.scripts])."""
    cli.run(main, "scbch-serve")


if __name__ == "__main__":
    cli.run(main, "python -m scbch_dist.retrieval.serve")
