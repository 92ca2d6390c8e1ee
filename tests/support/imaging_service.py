"""Real imaging services for tests: ``pixelmill imaging`` processes, or uvicorn in a thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pixelmill.config import Settings
from pixelmill.imaging.service import KEEP_ALIVE_SECONDS, create_imaging_app
from tests.support.server import free_port
from tests.support.waiting import wait_until


class ImagingProcess:
    """``pixelmill imaging`` on a free port (or ``port``); logs go to ``data_dir/imaging.log``."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PIXELMILL_DATA_DIR": str(data_dir),
            "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"imaging-{self.port}.log"

    def start(self) -> ImagingProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pixelmill", "imaging", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._healthy, timeout=60, what=f"pixelmill imaging on {self.port}")
        return self

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"pixelmill imaging exited early:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/healthz", timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


class ImagingThread:
    """The imaging app under uvicorn in a thread of the test process, on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_imaging_app(settings),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ImagingThread:
        self._thread.start()
        wait_until(self._started, timeout=30, what=f"imaging thread on {self.port}")
        return self

    def _started(self) -> bool:
        if not self._thread.is_alive():
            raise AssertionError("the imaging server thread died")
        return bool(self.server.started)

    def health(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/healthz", timeout=10).json())

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
