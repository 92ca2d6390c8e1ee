"""Real ``pixelmill`` processes on free ports, that tests can kill and restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Self

import httpx

from tests.support.waiting import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerOnPort:
    """A server (not pixelmill) in a subprocess on a free loopback port, its output
    appended to a log file; :meth:`stop` is kill -9."""

    name = "the server"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, args: list[str]) -> None:
        """Start ``args`` and return once the port accepts connections."""
        self.process = subprocess.Popen(
            args, stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT
        )
        wait_until(self._listening, timeout=60, what=self.name)

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class PixelmillProcess:
    """A ``pixelmill`` command in a subprocess, its output in a log file.

    With a ``health_url``, :meth:`start` returns once that URL answers 200, and fails
    at once with the log if the process exits first.
    """

    def __init__(
        self, args: list[str], env: dict[str, str], log_path: Path, health_url: str | None
    ) -> None:
        self.args = args
        self.env = env
        self.log_path = log_path
        self.health_url = health_url
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pixelmill", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if self.health_url:
            wait_until(self._healthy, timeout=60, what=f"pixelmill {' '.join(self.args)}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None and self.health_url
        if self.process.poll() is not None:
            raise AssertionError(f"pixelmill {self.args[0]} exited early:\n{self.log()}")
        try:
            return httpx.get(self.health_url, timeout=2).status_code == 200
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


class ApiClient:
    """Calls to the HTTP API of pixelmill at ``base_url``."""

    base_url: str

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", timeout=30, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.base_url}{path}", timeout=60, **kwargs)

    def wait_finished(self, request_id: str, timeout: float = 120) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            body = self.get(f"/api/v1/requests/{request_id}").json()
            return body if body["finished_at"] else None

        return wait_until(finished, timeout=timeout, interval=0.2, what=f"request {request_id}")


class ServeProcess(ApiClient, PixelmillProcess):
    """``pixelmill serve`` with its own data dir; logs go to ``data_dir/serve.log``."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "PIXELMILL_DATA_DIR": str(data_dir),
            "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
            "PIXELMILL_LEASE_SECONDS": "3",
            "PIXELMILL_POLL_INTERVAL": "0.1",
            **(env or {}),
        }
        super().__init__(
            ["serve", "--port", str(self.port)],
            full_env,
            data_dir / "serve.log",
            f"{self.base_url}/readyz",
        )
