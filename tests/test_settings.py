"""Settings are checked when they are read: a bad value stops a command at once, with
one line that names the variable, instead of failing later (or for ever, in a loop)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pixelmill.config import Settings


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("log_level", "verbose", "not a log level"),
        ("imaging_url", "ftp://img:8001", "not an http(s) URL"),
        ("imaging_url", "http://img-1:8001, gopher://img-2", "not an http(s) URL"),
        ("trusted_source_prefixes", "http://images.internal:99999/", "not a valid URL"),
        ("queue_url", "amqp://broker", "unsupported scheme 'amqp'"),
        ("queue_url", "kafka://k:9092?partition=3", "unknown parameter(s) ['partition']"),
        ("queue_url", "kafka://k:9092?session_timeout_ms=abc", "'abc' is not a whole number"),
        ("queue_url", "kafka://k:9092?partitions=0", "partitions=0 must be at least 1"),
        ("queue_url", "kafka://", "names no broker"),
        ("storage_url", "ftp://files/", "unsupported scheme 'ftp'"),
        ("storage_url", "/srv/pixelmill/files", "unsupported scheme ''"),
        ("database_url", "mysql://db/pixelmill", "unsupported database"),
        ("fetch_max_redirects", "-1", "greater than or equal to 0"),
        ("fetch_total_timeout", "0", "greater than 0"),
        ("max_pixels", "-1", "greater than or equal to 1"),
        ("max_upload_bytes", "0", "greater than or equal to 1"),
    ],
)
def test_a_bad_value_is_refused_naming_why(field: str, value: str, says: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(says)):
        Settings(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "read_as"),
    [
        ("log_level", "debug", "DEBUG"),
        ("log_level", " Warning ", "WARNING"),
        (
            "imaging_url",
            "http://img-1:8001, https://img-2:8443/",
            "http://img-1:8001, https://img-2:8443/",
        ),
        ("queue_url", "kafka://k1:9092,k2:9092?topic=t", "kafka://k1:9092,k2:9092?topic=t"),
        ("database_url", "postgresql+asyncpg://u@db/p", "postgresql+asyncpg://u@db/p"),
    ],
)
def test_good_values_are_taken(field: str, value: str, read_as: str) -> None:
    assert getattr(Settings(**{field: value}), field) == read_as  # type: ignore[arg-type]


def _pixelmill(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pixelmill", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_with_a_bad_imaging_url_stops_at_once_with_one_line(tmp_path: Path) -> None:
    """It used to start and then restart its worker processes for ever."""
    result = _pixelmill(
        "serve",
        "--port",
        "1",
        PIXELMILL_IMAGING_URL="ftp://img:8001",
        PIXELMILL_DATA_DIR=str(tmp_path),
    )

    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "PIXELMILL_IMAGING_URL" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "pixelmill.db").exists(), "refused before anything started"


def test_a_port_out_of_range_is_refused() -> None:
    result = _pixelmill("api", "--port", "70000")

    assert result.returncode == 2
    assert "--port" in result.stderr and "65535" in result.stderr


def test_a_worker_with_a_misspelt_kafka_parameter_stops_with_one_line(tmp_path: Path) -> None:
    """Before any broker is asked: exit 2, the variable and the bad parameter named."""
    result = _pixelmill(
        "worker",
        PIXELMILL_QUEUE_URL="kafka://127.0.0.1:9?partition=3",
        PIXELMILL_DATA_DIR=str(tmp_path),
        COLUMNS="200",
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "invalid settings: PIXELMILL_QUEUE_URL: unknown parameter(s) ['partition']; known: "
        "audit_interval_ms, client_id, group, partitions, session_timeout_ms, topic"
    ]
    assert not (tmp_path / "pixelmill.db").exists(), "refused before anything started"
