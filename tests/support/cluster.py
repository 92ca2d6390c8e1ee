"""pixelmill at scale on one machine: ``pixelmill api``, workers and imaging services.

Every process gets the same environment (the backends), so any mix of them works on
the embedded backends (SQLite file, queue table, files) as well as on PostgreSQL,
Kafka and HTTP imaging services.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.imaging_service import ImagingProcess
from tests.support.server import ApiClient, PixelmillProcess, free_port


def peak_rss_bytes(process: PixelmillProcess) -> int:
    """The peak resident set size of a running process (``VmHWM``)."""
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


class Cluster(ApiClient):
    """An API, workers and (with ``imaging`` > 0) imaging services on one environment."""

    def __init__(self, root: Path, env: dict[str, str], imaging: int = 0) -> None:
        self.root = root
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env, "PIXELMILL_PUBLIC_URL": self.base_url}
        self.imaging = [
            ImagingProcess(Path(self.env["PIXELMILL_DATA_DIR"]), env=self.env)
            for _ in range(imaging)
        ]
        if self.imaging:
            self.env["PIXELMILL_IMAGING_URL"] = ",".join(p.url for p in self.imaging)
        self.api = PixelmillProcess(
            ["api", "--port", str(self.port)], self.env, root / "api.log", f"{self.base_url}/readyz"
        )
        self.workers: list[PixelmillProcess] = []
        self._started = 0

    @property
    def files(self) -> Path:
        """The folder of the stored objects (``file://`` storage under the data dir)."""
        return Path(self.env["PIXELMILL_DATA_DIR"]) / "files"

    def start(self, workers: int) -> Cluster:
        for service in self.imaging:
            service.start()
        self.api.start()
        for _ in range(workers):
            self.add_worker()
        return self

    def add_worker(self) -> PixelmillProcess:
        """One more ``pixelmill worker``, logging to ``worker-N.log``."""
        log = self.root / f"worker-{self._started}.log"
        self._started += 1
        worker = PixelmillProcess(["worker"], self.env, log, None).start()
        self.workers.append(worker)
        return worker

    def alive_workers(self) -> list[PixelmillProcess]:
        return [w for w in self.workers if w.process and w.process.poll() is None]

    def logs(self) -> str:
        """Every log of the cluster, joined (for assertions on what must never be said)."""
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for process in [*self.workers, self.api, *self.imaging]:
            process.stop()
