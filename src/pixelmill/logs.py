"""Logging for the commands: one line format, and no floods while a backend is away.

While a Kafka broker is away, aiokafka logs every reconnection attempt of every client
at ``ERROR``: about 70 lines a second from one worker, mostly the same four messages.
:class:`RepeatLimit` lets the first line of each kind through and then one every
``interval`` seconds, saying how many like it were held back, so that an outage of an
hour costs a few hundred lines instead of a quarter of a million. At ``DEBUG`` nothing
is held back. :class:`FailureStreak` does the same for pixelmill's own loops that retry
(receiving tasks, claiming webhook deliveries, relaying the outbox).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Loggers whose retry loops log once per attempt: the Kafka client, and the retries of
# pixelmill's units of work while the database is away.
NOISY_LOGGERS = ("aiokafka", "pixelmill.db.engine")

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
            self._tell_held(record, held, now - passed_at)
        return True

    @staticmethod
    def _tell_held(record: logging.LogRecord, held: int, since: float) -> None:
        """Append the count to the message, formatted first so that a "%" in the
        arguments stays as it is; a record that cannot be formatted is left for the
        handler to report, since a filter must not raise into the code that logged."""
        try:
            message = record.getMessage()
        except Exception:
            return
        record.msg = f"{message} ({held} more like this in the last {since:.0f} s)"
        record.args = ()

    def _noisy(self, name: str) -> bool:
        return any(name == prefix or name.startswith(prefix + ".") for prefix in self.prefixes)


def _never(_exc: BaseException) -> bool:
    return False


class FailureStreak:
    """What a loop that retries says about a run of failures: the first, then one line
    every ``interval`` seconds with how many there were, and one when it works again.
    ``doing`` names the loop's work ("receiving a task"). The first comes with its
    traceback unless ``expected`` says its cause is known (a backend away)."""

    def __init__(
        self,
        log: logging.Logger,
        doing: str,
        *,
        expected: Callable[[BaseException], bool] = _never,
        interval: float = REPEAT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.doing = doing
        self.expected = expected
        self.interval = interval
        self.clock = clock
        self.failures = 0
        self._began = 0.0
        self._said = 0.0  # when a line was last logged
        self._unsaid = 0  # failures since

    def failed(self, exc: BaseException) -> None:
        """Count a failure; log it if it is the first of the run or ``interval`` has passed."""
        now = self.clock()
        self.failures += 1
        if self.failures == 1:
            self._began = self._said = now
            self.log.error(
                "%s failed, will retry: %s", self.doing, brief(exc),
                exc_info=None if self.expected(exc) else exc,
            )  # fmt: skip
            return
        self._unsaid += 1
        if now - self._said >= self.interval:
            self.log.warning(
                "%s still fails: %d times in the last %.0f s, lately %s",
                self.doing, self._unsaid, now - self._said, brief(exc),
            )  # fmt: skip
            self._said, self._unsaid = now, 0

    def succeeded(self) -> None:
        """End the run of failures, if any, saying how long it lasted."""
        if self.failures:
            self.log.warning(
                "%s works again after %d failures in %.0f s",
                self.doing, self.failures, self.clock() - self._began,
            )  # fmt: skip
            self.failures = self._unsaid = 0


def brief(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message (a bare
    ``TimeoutError``: its name alone). For a database error, the driver's own
    (SQLAlchemy keeps it in ``orig`` and appends the statement to its message)."""
    cause = getattr(exc, "orig", None)
    if isinstance(cause, BaseException):
        exc = cause
    name = type(exc).__name__
    lines = str(exc).splitlines()
    if not lines:
        return name
    return lines[0] if lines[0].startswith(name) else f"{name}: {lines[0]}"


def configure(level: str = "INFO") -> None:
    """Log to stderr in :data:`FORMAT` at ``level``; below ``DEBUG``'s verbosity, repeated
    warnings and errors of the noisy client libraries are limited (:class:`RepeatLimit`)."""
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(existing, RepeatLimit) for existing in handler.filters):
                handler.addFilter(RepeatLimit())
