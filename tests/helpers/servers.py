"""HTTP servers on 127.0.0.1 standing in for the network, which tests never touch.

:class:`FakeServer` misbehaves on request (status codes, dropped connections, stalls, ignored
ranges) and doubles as an HTTP proxy; :func:`serve_folder` serves a mirror folder as it is.
:func:`fetch_in_process` is the worker of the two-process fetch test.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlsplit


@dataclass
class Route:
    """What the server answers for one path.

    Attributes:
        body: the whole file.
        status: HTTP status for every request (404, 500, ...); 200 serves ``body``.
        fail_first: answer this many requests with HTTP 503 before behaving.
        drop_at: close the connection once the body has reached this absolute byte offset,
            after promising the full Content-Length.
        drop_times: how many requests are dropped; later ones are served in full.
        ignore_range: answer Range requests with 200 and the whole body.
        stall_s: after the first 1 KiB of body, go quiet for this long.
        delay_s: wait this long before answering at all.
    """

    body: bytes = b""
    status: int = 200
    fail_first: int = 0
    drop_at: int | None = None
    drop_times: int = 1 << 30
    ignore_range: bool = False
    stall_s: float = 0.0
    delay_s: float = 0.0


@dataclass
class Seen:
    path: str
    range: str | None


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"

    def do_GET(self) -> None:
        fake = self.server.fake
        with fake.lock:
            fake.seen.append(Seen(self.path, self.headers.get("Range")))
        route = fake.route_for(self.path)
        if route is None:
            self.send_error(404)
            return
        if route.delay_s:
            time.sleep(route.delay_s)
        if route.status != 200:
            self.send_error(route.status)
            return
        with fake.lock:
            failing = route.fail_first > 0
            route.fail_first -= failing
            dropping = route.drop_at is not None and route.drop_times > 0
            route.drop_times -= dropping
        if failing:
            self.send_error(503)
            return

        body, start = route.body, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not route.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

        end = max(start, route.drop_at) if dropping else len(body)
        chunk = body[start:end]
        if route.stall_s:
            self.wfile.write(chunk[:1024])
            self.wfile.flush()
            time.sleep(route.stall_s)
            chunk = chunk[1024:]
        self.wfile.write(chunk)
        # HTTP/1.0: returning closes the socket, short of the promised Content-Length if dropping.
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    fake: "FakeServer"

    def handle_error(self, request, client_address) -> None:
        # Clients hang up on purpose in these tests (timeouts); a traceback would only be noise.
        pass


@dataclass
class FakeServer:
    """An HTTP server on 127.0.0.1 (port 0) serving routes, else files under ``root``.

    A proxy-style request (``GET http://host/path``) is looked up as ``root/host/path``, the
    mirror layout, so the same server can stand in for a proxy in front of the official URL.
    """

    root: Path | None = None
    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        # A short poll interval: shutdown() waits for it, once per test.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add(self, path: str, route: Route) -> str:
        """Serves ``route`` at ``path`` (starting with ``/``); returns its full URL."""
        self.routes[path] = route
        return self.base_url + path

    def route_for(self, raw_path: str) -> Route | None:
        parts = urlsplit(raw_path)
        if parts.path in self.routes and not parts.netloc:
            return self.routes[parts.path]
        if self.root is None:
            return None
        rel = parts.path.lstrip("/")
        if parts.netloc:
            rel = f"{parts.hostname}/{rel}"
        file = self.root / unquote(rel)
        if ".." in Path(rel).parts or not file.is_file():
            return None
        return Route(body=file.read_bytes())

    def ranges(self) -> list[str | None]:
        with self.lock:
            return [s.range for s in self.seen]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """``http.server`` on 127.0.0.1 (a free port) over ``root``; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def fetch_in_process(spec, cache_dir: str, barrier, results) -> None:
    """Target of the two-process fetch test (started with ``spawn``, so it lives in a module
    without pytest's test modules): wait for the sibling, fetch, report (or report the error)."""
    from pipeline.fetch import fetch

    barrier.wait(timeout=60)
    try:
        result = fetch(spec, cache_dir=Path(cache_dir), mirror="", progress=False, retries=0)
    except Exception as e:  # the parent asserts on it; a child traceback would be lost
        results.put(("error", f"{type(e).__name__}: {e}"))
    else:
        results.put(("ok", result.source, result.graph_sha256, result.graph_path.read_bytes()))
