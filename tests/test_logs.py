"""The limit on repeated lines from noisy client libraries (pixelmill/logs.py)."""

from __future__ import annotations

import logging
import subprocess
import sys

from pixelmill.logs import RepeatLimit


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
