"""The settings of the Kafka queue, read from ``PIXELMILL_QUEUE_URL``.

Apart from the queue itself so that the settings can check the URL at start without
loading the Kafka client.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

_TEXTS = frozenset({"topic", "group", "client_id"})
# The whole-number parameters, each with the least value that makes sense.
_COUNTS = {"partitions": 1, "session_timeout_ms": 1, "audit_interval_ms": 1}


def _count(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a whole number") from None
    if value < _COUNTS[name]:
        raise ValueError(f"{name}={value} must be at least {_COUNTS[name]}")
    return value


@dataclass(frozen=True)
class KafkaConfig:
    """Where the tasks go, read from ``PIXELMILL_QUEUE_URL``."""

    bootstrap: str
    topic: str = "pixelmill.tasks"
    partitions: int = 12
    group: str = "pixelmill-workers"
    # How fast the group notices a dead worker and gives its partitions to others.
    session_timeout_ms: int = 10_000
    # How often each process looks for published tasks that the brokers lost.
    audit_interval_ms: int = 5_000
    # The name the brokers know this process's clients by (their logs, quotas and
    # metrics); a group member's id starts with it.
    client_id: str = "pixelmill"

    @classmethod
    def from_url(cls, url: str) -> KafkaConfig:
        """The settings in ``url``; a ValueError that says what is wrong with it (the
        settings check the URL with this at start, under the variable's name)."""
        parts = urlsplit(url)
        if parts.scheme != "kafka" or not parts.netloc:
            raise ValueError(
                f"{url!r} names no broker; "
                "expected kafka://host:9092[,host2:9092]?topic=...&partitions=..."
            )
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        unknown = set(query) - _TEXTS - set(_COUNTS)
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {sorted(unknown)}; "
                f"known: {', '.join(sorted(_TEXTS | set(_COUNTS)))}"
            )
        counts = {name: _count(name, query[name]) for name in _COUNTS if name in query}
        texts = {name: query[name] for name in _TEXTS if name in query}
        return cls(bootstrap=parts.netloc, **texts, **counts)  # type: ignore[arg-type]

    @property
    def retry_topic(self) -> str:
        return f"{self.topic}.retry"

    @property
    def dead_topic(self) -> str:
        return f"{self.topic}.dead"
