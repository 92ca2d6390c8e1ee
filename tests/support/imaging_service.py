"""Real imaging services for tests: ``pixelmill imaging`` processes, or uvicorn in a thread."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from pixelmill.config import Settings
from pixelmill.imaging.service import KEEP_ALIVE_SECONDS, create_imaging_app
from tests.support.server import PixelmillProcess, free_port
from tests.support.waiting import wait_until


class ImagingProcess(PixelmillProcess):
    """``pixelmill imaging`` on a free port (or ``port``); logs in ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        processes: int = 1,
    ) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "PIXELMILL_DATA_DIR": str(data_dir),
            "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
            **(env or {}),
        }
        super().__init__(
            ["imaging", "--port", str(self.port), "--processes", str(processes)],
            full_env,
            data_dir / f"imaging-{self.port}.log",
            f"{self.url}/healthz",
        )

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/healthz", timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def stop(self) -> None:
        """Graceful first (SIGTERM), then killed if it does not exit in time."""
        if self.process and self.process.poll() is None:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                super().stop()


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
