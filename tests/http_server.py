"""A real nginx for the tests of datasets on a server (docs/data.md, "Datasets on a server"):
started from Debian's package (.ci/setup installs nginx-light) on a free port of 127.0.0.1,
serving a folder as it is; ``/slow/`` serves the same folder at ``limit_rate`` bytes a second, for
a link slow enough to stop or stall mid-shard. Skipped, with the reason, where nginx is missing."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)

CONFIG = """\
{user}
daemon on;
pid {home}/nginx.pid;
error_log {home}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log {home}/access.log;
  client_body_temp_path {home}/body; proxy_temp_path {home}/proxy; fastcgi_temp_path {home}/fastcgi;
  uwsgi_temp_path {home}/uwsgi; scgi_temp_path {home}/scgi;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location /slow/ {{ alias {root}/; limit_rate {rate}; }}
  }}
}}
"""


def free_port() -> int:
    """A free port below the kernel's ephemeral range. A port from inside it (what ``bind(0)`` gives)
    can be taken while the server is down by any outgoing connection's source port, the test's own
    retries included (a client dialling a closed local port may even connect to itself), and the
    restart then fails with "Address already in use"."""
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ephemeral.read_text().split()[0]) if ephemeral.is_file() else 32768
    for port in random.Random().sample(range(max(1024, low - 12000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in [{low - 12000}, {low})")


class Nginx:
    """``start()``/``stop()`` a real nginx serving ``root`` at ``url`` (and slowly at ``slow_url``);
    ``pause()``/``resume()`` stop its worker's clock (SIGSTOP): a server that accepts and says nothing."""

    def __init__(self, home: Path, root: Path, rate: int = 2_000_000):
        if NGINX is None:
            pytest.skip("nginx is not installed (apt-get install nginx-light, as root: .ci/setup does)")
        self.home, self.root, self.port = Path(home), Path(root), free_port()
        self.home.mkdir(parents=True, exist_ok=True)
        self.config = self.home / "nginx.conf"
        # root's workers would run as nobody, who may not read the test's private temporary folders
        user = "user root;" if os.geteuid() == 0 else ""
        self.config.write_text(CONFIG.format(user=user, home=self.home, port=self.port, root=self.root, rate=rate))
        self.url, self.slow_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.port}/slow"
        self.started = False

    def start(self) -> "Nginx":
        """Start, and wait until it answers. A first start that fails skips (nginx cannot run here);
        a restart that fails is the test's failure, after 10 s of tries for a port still closing."""
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run([NGINX, "-c", str(self.config), "-p", str(self.home)], capture_output=True, text=True)
            if out.returncode == 0:
                break
            if not self.started:
                pytest.skip(f"nginx did not start: {out.stderr.strip()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start again on port {self.port}: {out.stderr.strip()[-500:]}")
            time.sleep(0.2)
        self.started = True
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self  # it answers (403 or 404 for the folder itself)
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not answer on port {self.port}: {(self.home / 'error.log').read_text()[-2000:]}")

    def _pid(self) -> int | None:
        try:
            return int((self.home / "nginx.pid").read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        pid = self._pid()
        if pid is None:
            return
        self.resume()
        os.kill(pid, signal.SIGTERM)  # fast shutdown: open connections are closed at once
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        (self.home / "nginx.pid").unlink(missing_ok=True)

    def _workers(self) -> list[int]:
        pid = self._pid()
        if pid is None:
            return []
        try:
            return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    def pause(self) -> None:
        for worker in self._workers():
            os.kill(worker, signal.SIGSTOP)

    def resume(self) -> None:
        for worker in self._workers():
            os.kill(worker, signal.SIGCONT)

    def requests(self) -> list[str]:
        """The request lines of the access log so far."""
        log = self.home / "access.log"
        return [line.split('"')[1] for line in log.read_text().splitlines() if '"' in line] if log.is_file() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
