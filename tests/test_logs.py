"""The limit on repeated lines from noisy client libraries (pixelmill/logs.py)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from pixelmill.logs import FailureStreak, RepeatLimit, brief


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(
    name: str = "aiokafka", msg: str = "Unable connect to node with id %s: %s", *args: object,
    level: int = logging.ERROR,
) -> logging.LogRecord:  # fmt: skip
    return logging.LogRecord(name, level, __file__, 1, msg, args or (1, "refused"), None)


def test_the_first_line_of_a_kind_passes_and_its_repeats_are_held_back_for_the_interval() -> None:
    clock = Clock()
    limit = RepeatLimit(interval=30, clock=clock)
    assert limit.filter(record("aiokafka", "Unable connect to node with id %s: %s", 1, "x"))
    clock.now += 10
    # Other arguments, the same template: the same kind.
    assert not limit.filter(record("aiokafka", "Unable connect to node with id %s: %s", 2, "y"))
    assert not limit.filter(record())
    clock.now += 20
    passed = record("aiokafka", "Unable connect to node with id %s: %s", 3, "50% lost")
    assert limit.filter(passed)
    assert passed.getMessage() == (
        "Unable connect to node with id 3: 50% lost (2 more like this in the last 30 s)"
    )
    clock.now += 1
    assert not limit.filter(record())


def test_kinds_are_counted_apart_by_logger_level_and_template() -> None:
    limit = RepeatLimit(interval=30, clock=Clock())
    assert limit.filter(record("aiokafka"))
    assert limit.filter(record("aiokafka.conn"))
    assert limit.filter(record("aiokafka", level=logging.WARNING))
    assert limit.filter(record("aiokafka", "Unable to update metadata from %s", [1]))
    assert not limit.filter(record("aiokafka.conn"))


def test_a_line_after_a_quiet_interval_says_nothing_was_held_back() -> None:
    clock = Clock()
    limit = RepeatLimit(interval=30, clock=clock)
    assert limit.filter(record())
    clock.now += 31
    again = record()
    assert limit.filter(again)
    assert again.getMessage() == "Unable connect to node with id 1: refused"


def test_a_record_that_cannot_be_formatted_passes_untouched_instead_of_raising() -> None:
    """A filter that raised would raise into the library's code that logged."""
    clock = Clock()
    limit = RepeatLimit(interval=30, clock=clock)
    assert limit.filter(record("aiokafka", "node %s of %s", 1, 2))
    assert not limit.filter(record("aiokafka", "node %s of %s", 1, 2))
    clock.now += 31
    broken = record("aiokafka", "node %s of %s", 1)  # one argument short
    assert limit.filter(broken)
    assert broken.msg == "node %s of %s" and broken.args == (1,)


def test_other_loggers_and_lines_below_warning_always_pass() -> None:
    limit = RepeatLimit(interval=30, clock=Clock())
    for _ in range(3):
        assert limit.filter(record("pixelmill.worker", "task %s failed", 7))
        assert limit.filter(record("aiokafkaesque", "task %s failed", 7))
        assert limit.filter(record("aiokafka.consumer", "Joined group %s", "g", level=logging.INFO))


def run_logging(level: str) -> str:
    """Configure logging as the commands do at ``level`` and log one error 100 times."""
    code = (
        f"import logging; from pixelmill import logs; logs.configure({level!r})\n"
        "for i in range(100): logging.getLogger('aiokafka.conn').error('Unable connect %s', i)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return done.stderr


def test_the_commands_logging_limits_the_noisy_loggers_except_at_debug() -> None:
    assert run_logging("INFO").count("Unable connect") == 1
    assert run_logging("DEBUG").count("Unable connect") == 100


def streak_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "loop"]


def test_a_run_of_failures_is_told_once_in_full_then_every_interval_then_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    streak = FailureStreak(logging.getLogger("loop"), "receiving a task", interval=30, clock=clock)
    caplog.set_level(logging.INFO, logger="loop")
    refused = ConnectionRefusedError(111, "Connection refused")
    for _ in range(10):  # ten failures within 9 s
        streak.failed(refused)
        clock.now += 1
    clock.now += 21  # 31 s after the first
    streak.failed(TimeoutError("timed out"))
    streak.failed(refused)
    clock.now += 5
    streak.succeeded()
    streak.succeeded()  # nothing more to say

    refused_line = "ConnectionRefusedError: [Errno 111] Connection refused"
    assert streak_lines(caplog) == [
        f"receiving a task failed, will retry: {refused_line}",
        "receiving a task still fails: 10 times in the last 31 s, lately TimeoutError: timed out",
        "receiving a task works again after 12 failures in 36 s",
    ]
    first = caplog.records[0]
    assert first.levelno == logging.ERROR and first.exc_info is not None


def test_a_new_run_starts_anew_and_only_an_unexpected_cause_comes_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    streak = FailureStreak(
        logging.getLogger("loop"), "kafka poll", expected=lambda exc: isinstance(exc, OSError),
        clock=clock,
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="loop")
    streak.failed(OSError("down"))
    streak.succeeded()
    streak.failed(OSError("down again"))
    streak.succeeded()
    streak.failed(ValueError("a bug"))
    assert streak_lines(caplog) == [
        "kafka poll failed, will retry: OSError: down",
        "kafka poll works again after 1 failures in 0 s",
        "kafka poll failed, will retry: OSError: down again",
        "kafka poll works again after 1 failures in 0 s",
        "kafka poll failed, will retry: ValueError: a bug",
    ]
    with_traceback = [record.getMessage() for record in caplog.records if record.exc_info]
    assert with_traceback == ["kafka poll failed, will retry: ValueError: a bug"]


def test_brief_is_one_line_and_names_the_drivers_error() -> None:
    from sqlalchemy.exc import OperationalError

    wrapped = OperationalError("SELECT 1\nFROM tasks", {}, ConnectionResetError("reset by peer"))
    assert brief(wrapped) == "ConnectionResetError: reset by peer"
    assert brief(ValueError("first\nsecond")) == "ValueError: first"
    assert brief(RuntimeError()) == "RuntimeError"

    class NodeNotReadyError(Exception):  # aiokafka's errors start with their own name
        def __str__(self) -> str:
            return "NodeNotReadyError: node 1"

    assert brief(NodeNotReadyError()) == "NodeNotReadyError: node 1"
