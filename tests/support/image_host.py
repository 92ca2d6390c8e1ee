"""A real HTTP server on loopback that serves the image corpus, and misbehaves on request.

Routes:
- ``/img/NAME``: the file NAME of the corpus.
- ``/status/CODE``: answers CODE with an empty body (``?retry_after=V``: with
  ``Retry-After: V``).
- ``/flaky/KEY/NAME``: answers 500 the first time KEY is seen, then NAME.
- ``/reset/KEY/NAME``: the first time KEY is seen, sends half of NAME and resets the
  connection; then NAME.
- ``/huge/MB``: a 200 of MB mebibytes (a stated length, streamed until the client leaves).
- ``/gate/ROUTE...``: waits until ``gate`` is set (it is, unless a test clears it), then
  answers as ``/ROUTE...``.
- ``/drip/NAME``: sends NAME one byte per second.
- ``/slow/MS/NAME``: waits MS milliseconds, then sends NAME.
- ``/redirect/N/NAME``: N redirects, then NAME.
- ``/to?url=URL``: a redirect to URL.
Every request is counted by path (and by path with query), so tests can tell what was
(not) fetched. Given a server-side TLS context, it speaks HTTPS and records the server
name (SNI) of every handshake.
"""

from __future__ import annotations

import socket
import ssl
import struct
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up (a killed worker, a fetch cut off) are not errors here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class ImageHost:
    """Starts on a free port in a thread; ``url(path)`` builds URLs to it."""

    def __init__(self, root: Path, tls: ssl.SSLContext | None = None) -> None:
        self.root = root
        self.hits: Counter[str] = Counter()
        # The Cookie header of every request, in arrival order (None: the request had none).
        self.cookies: list[str | None] = []
        # The Host header of every request, and the server name of every TLS handshake.
        self.host_headers: list[str | None] = []
        self.server_names: list[str | None] = []
        self._flaky_seen: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                host._serve(self)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        if tls is not None:
            tls.sni_callback = self._record_server_name
            # A handshake the client gives up on fails in accept(), and is dropped there.
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> ImageHost:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def _record_server_name(
        self, _socket: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        with self._lock:
            self.server_names.append(server_name)

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        with self._lock:
            self.hits[parts.path] += 1
            if parts.query:
                self.hits[handler.path] += 1
            self.cookies.append(handler.headers.get("Cookie"))
            self.host_headers.append(handler.headers.get("Host"))
        segments = parts.path.strip("/").split("/")
        if segments[0] == "gate":
            self.gate.wait(timeout=120)
            segments = segments[1:]
        kind = segments[0]
        if kind == "img":
            self._send_file(handler, segments[-1])
        elif kind == "cookie":
            self._send_file(handler, segments[1], cookie="session=secret-of-one-client; Path=/")
        elif kind == "status":
            retry_after = parse_qs(parts.query).get("retry_after")
            headers = {"Retry-After": retry_after[0]} if retry_after else {}
            self._send(handler, int(segments[1]), b"", headers=headers)
        elif kind == "flaky":
            if self._first_time(segments[1]):
                self._send(handler, 500, b"try again")
            else:
                self._send_file(handler, segments[2])
        elif kind == "reset":
            if self._first_time(f"reset/{segments[1]}"):
                self._reset(handler, (self.root / segments[2]).read_bytes())
            else:
                self._send_file(handler, segments[2])
        elif kind == "huge":
            self._stream_zeros(handler, int(segments[1]) * 1024 * 1024)
        elif kind == "slow":
            time.sleep(int(segments[1]) / 1000)
            self._send_file(handler, segments[2])
        elif kind == "drip":
            self._drip(handler, (self.root / segments[1]).read_bytes())
        elif kind == "redirect":
            left = int(segments[1])
            target = f"/redirect/{left - 1}/{segments[2]}" if left > 1 else f"/img/{segments[2]}"
            self._redirect(handler, target)
        elif kind == "to":
            self._redirect(handler, parse_qs(parts.query)["url"][0])
        else:
            self._send(handler, 404, b"no such route")

    def _first_time(self, key: str) -> bool:
        with self._lock:
            first = key not in self._flaky_seen
            self._flaky_seen.add(key)
        return first

    @staticmethod
    def _reset(handler: BaseHTTPRequestHandler, body: bytes) -> None:
        """Send half of the answer, then close with a TCP reset (SO_LINGER 0)."""
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[: len(body) // 2])
        handler.wfile.flush()
        sock = handler.connection
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.close_connection = True
        sock.close()

    @staticmethod
    def _stream_zeros(handler: BaseHTTPRequestHandler, size: int) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        chunk = b"\xff" * (1 << 16)
        try:
            for _ in range(size // len(chunk)):
                handler.wfile.write(chunk)
        except OSError:
            pass

    def _send_file(
        self, handler: BaseHTTPRequestHandler, name: str, cookie: str | None = None
    ) -> None:
        path = self.root / name
        if not path.is_file():
            self._send(handler, 404, b"not found")
            return
        self._send(handler, 200, path.read_bytes(), "image/jpeg", cookie)

    @staticmethod
    def _send(
        handler: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
        cookie: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        handler.send_response(status)
        if cookie:
            handler.send_header("Set-Cookie", cookie)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    @staticmethod
    def _redirect(handler: BaseHTTPRequestHandler, location: str) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    @staticmethod
    def _drip(handler: BaseHTTPRequestHandler, body: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        try:
            for i in range(len(body)):
                handler.wfile.write(body[i : i + 1])
                handler.wfile.flush()
                time.sleep(1.0)
        except OSError:
            pass
