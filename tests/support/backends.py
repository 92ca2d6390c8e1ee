"""The backend matrix: which database and which task queue a pass over a suite uses."""

from __future__ import annotations

from dataclasses import dataclass

# Each combination that a suite can run over, by its test id: (database, queue).
MATRIX: dict[str, tuple[str, str]] = {
    "sqlite-db": ("sqlite", "db"),
    "postgres-db": ("postgres", "db"),
    "postgres-kafka": ("postgres", "kafka"),
}


@dataclass(frozen=True)
class Backend:
    """A database and a task queue of their own, as pixelmill settings."""

    name: str  # a key of MATRIX
    database_url: str
    queue_url: str

    @property
    def queue(self) -> str:
        return MATRIX[self.name][1]

    def env(self) -> dict[str, str]:
        """The environment that points a ``pixelmill`` process at these backends."""
        return {"PIXELMILL_DATABASE_URL": self.database_url, "PIXELMILL_QUEUE_URL": self.queue_url}
