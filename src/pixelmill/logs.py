"""Logging for the commands: one line format, and no floods from client libraries.

While a Kafka broker is away, aiokafka logs every reconnection attempt of every client
at ``ERROR``: about 70 lines a second from one worker, mostly the same four messages.
:class:`RepeatLimit` lets the first line of each kind through and then one every
``interval`` seconds, saying how many like it were held back, so that an outage of an
hour costs a few hundred lines instead of a quarter of a million. At ``DEBUG`` nothing
is held back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Loggers whose retry loops log once per attempt.
NOISY_LOGGERS = ("aiokafka",)

# How often a line of one kind from a noisy logger is let through.
REPEAT_INTERVAL = 30.0


class RepeatLimit(logging.Filter):
    """Passes a warning or error of a given kind (logger, level and message template,
    whatever its arguments) at most once every ``interval`` seconds. Records from loggers
    outside ``prefixes``, and below ``WARNING`` (a group joined, partitions assigned),
    always pass. A record let through after others of its kind were held back ends with
    ``(N more like this in the last S s)``."""

    def __init__(
        self,
        prefixes: tuple[str, ...] = NOISY_LOGGERS,
        interval: float = REPEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        # kind -> (when one was last let through, how many were held back since)
        self._kinds: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not self._noisy(record.name):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            passed_at, held = self._kinds.get(kind, (None, 0))
            if passed_at is not None and now - passed_at < self.interval:
                self._kinds[kind] = (passed_at, held + 1)
                return False
            self._kinds[kind] = (now, 0)
        if held and passed_at is not None:
            # Appended after formatting, so that a "%" in the arguments stays as it is.
            since = now - passed_at
            record.msg = f"{record.getMessage()} ({held} more like this in the last {since:.0f} s)"
            record.args = None
        return True

    def _noisy(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self.prefixes)


def configure(level: str = "INFO") -> None:
    """Log to stderr in :data:`FORMAT` at ``level``; below ``DEBUG``'s verbosity, repeated
    warnings and errors of the noisy client libraries are limited (:class:`RepeatLimit`)."""
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(existing, RepeatLimit) for existing in handler.filters):
                handler.addFilter(RepeatLimit())
