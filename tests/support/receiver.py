"""A real webhook receiver on loopback: records every call and answers as scripted.

``answer(path, Reply(503), Reply(503))`` makes the first two calls to ``path`` answer
503; once the script of a path is used up, it answers 200. ``Reply(hang=True)`` keeps
the connection open without answering until the receiver stops. Given a server-side
TLS context, it speaks HTTPS and records the server name (SNI) of every handshake.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass(frozen=True)
class Call:
    """One request the receiver got."""

    path: str
    method: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    at: float  # time.time() on arrival

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """Starts on a free port in a thread; ``url(path)`` builds URLs to it."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._calls: list[Call] = []
        self.server_names: list[str | None] = []
        self._script: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                receiver._serve(self)

            do_GET = do_PUT = do_HEAD = do_POST  # recorded too: a followed redirect would show

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        if tls is not None:
            tls.sni_callback = self._record_server_name
            # A handshake the client gives up on fails in accept(), and is dropped there.
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _record_server_name(
        self, _socket: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        with self._lock:
            self.server_names.append(server_name)

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path.lstrip('/')}"

    def answer(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self._script["/" + path.lstrip("/")] = list(replies)

    def calls(self, path: str) -> list[Call]:
        with self._lock:
            return [call for call in self._calls if call.path == "/" + path.lstrip("/")]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            self._calls.append(Call(handler.path, handler.command, headers, body, time.time()))
            script = self._script.get(handler.path, [])
            reply = script.pop(0) if script else Reply()
        if reply.hang:
            self._released.wait(timeout=60)
            handler.close_connection = True
            return
        payload = b"no thanks" if reply.status >= 300 else b"ok"
        handler.send_response(reply.status)
        for name, value in {"Content-Type": "text/plain", **reply.headers}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
