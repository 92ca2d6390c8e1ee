"""A real ``pixelmill serve`` process on a free port, that tests can kill and restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.support.waiting import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``pixelmill serve`` with its own data dir; logs go to ``data_dir/serve.log``."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PIXELMILL_DATA_DIR": str(data_dir),
            "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
            "PIXELMILL_LEASE_SECONDS": "3",
            "PIXELMILL_POLL_INTERVAL": "0.1",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "serve.log"

    def start(self) -> ServeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pixelmill", "serve", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._healthy, timeout=60, what=f"pixelmill serve on {self.port}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"pixelmill serve exited early:\n{self.log()}")
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 60) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.base_url}{path}", timeout=60, **kwargs)

    def wait_finished(self, request_id: str, timeout: float = 120) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            body = self.get(f"/api/v1/requests/{request_id}").json()
            return body if body["finished_at"] else None

        return wait_until(finished, timeout=timeout, interval=0.2, what=f"request {request_id}")
