"""PostgreSQL goes away from the workers mid-request (distributed), then comes back.

The worker reaches the database through a TCP proxy that the test takes down: every
connection cut and new ones refused, as in a failover or a restart. The worker must not
die, the request must complete with each image terminal once and each object written
once, and its log must stay short: the first failure of each loop in full, then a line
every 30 seconds, not a traceback a second.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from sqlalchemy import make_url

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written_once,
    progress,
    slow_photo_rows,
    stored_keys,
    upload,
    watch_request,
)
from tests.support.cluster import Cluster
from tests.support.image_host import ImageHost
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until
from tests.support.writes import WriteCounter

OUTAGE_SECONDS = 8  # longer than a unit of work's retries (about 3 s)
COMMAND_TIMEOUT = 2  # for a statement on a connection that went silent


class Fault:
    """How the database goes away: ``cut`` resets every connection and refuses new ones
    (a restart, a failover); ``silent`` carries nothing more and answers nothing (a
    network partition: only a timeout tells)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def begin(self, proxy: TcpProxy) -> None:
        if self.name == "cut":
            proxy.stop()
        else:
            proxy.go_silent()

    def end(self, proxy: TcpProxy) -> None:
        if self.name == "silent":
            proxy.stop()  # the connections that went silent are dead for good
        proxy.start()  # back on the same port


@pytest.mark.parametrize("fault", ["cut", "silent"])
@pytest.mark.parametrize("stack", ["distributed"], indirect=True)
def test_a_worker_rides_out_a_database_outage_and_its_log_stays_short(
    fault: str,
    cluster: Cluster,
    writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    outage = Fault(fault)
    rows = slow_photo_rows(image_host, 200, "db-outage")
    request_id = upload(cluster, rows)
    watch_request(writes, request_id)
    database = make_url(cluster.env["PIXELMILL_DATABASE_URL"])
    proxy = TcpProxy(database.port or 5432).start()
    try:
        # The API keeps its own way in, so that the test can watch the request.
        cluster.env["PIXELMILL_DATABASE_URL"] = database.set(port=proxy.port).render_as_string(
            hide_password=False
        )
        cluster.env["PIXELMILL_DATABASE_COMMAND_TIMEOUT_SECONDS"] = str(COMMAND_TIMEOUT)
        worker = cluster.add_worker()
        wait_until(lambda: progress(cluster, request_id)["completed"] >= 30, timeout=60, what="30")

        log = worker.log_path
        before = len(log.read_text().splitlines())
        outage.begin(proxy)
        # The webhook dispatcher's loop asks the database every poll, whatever the
        # worker holds: its lines tell when the worker has found the database away.
        wait_until(
            lambda: "claiming webhook deliveries failed, will retry" in log.read_text(),
            timeout=60,
            what="the worker finding the database away",
        )
        time.sleep(OUTAGE_SECONDS)  # the fault itself: the database stays away this long
        during = log.read_text().splitlines()[before:]
        outage.end(proxy)
        wait_until(
            lambda: "claiming webhook deliveries works again" in log.read_text(),
            timeout=60,
            what="the worker finding the database back",
        )
        status = cluster.wait_finished(request_id, timeout=120)
    finally:
        proxy.stop()

    assert worker.process is not None and worker.process.poll() is None, "the worker died"
    assert status["status"] == "completed" and status["progress"]["failed"] == 0, status
    check_each_terminal_once(cluster, request_id, 200)
    written_again = check_written_once(
        writes, request_id, stored_keys(check_output_csv(cluster, request_id, rows))
    )

    records = [line for line in during if re.match(r"\d{4}-\d\d-\d\d ", line)]
    with_traceback = records_with_a_traceback(during)
    figures.update(
        images=200,
        outage_seconds=OUTAGE_SECONDS,
        written_again=written_again,
        log_lines=len(during),
        log_records=len(records),
        tracebacks=len(with_traceback),
    )
    # Unlimited, the loops logged a traceback each a second or two (about 50 lines a
    # second) and the units of work a retry line each half second. Now a backend away
    # is said in one line: each loop's first failure, the failed tasks and their failed
    # lease renewals, the first retry of a unit of work.
    assert len(records) <= 30, "\n".join(records)
    assert with_traceback == [], "a backend away is no bug"


def records_with_a_traceback(lines: list[str]) -> list[str]:
    """The log records in ``lines`` that a traceback follows."""
    found: list[str] = []
    record = None
    for line in lines:
        if re.match(r"\d{4}-\d\d-\d\d ", line):
            record = line
        elif line.startswith("Traceback") and record is not None:
            found.append(record)
            record = None  # a chained exception's tracebacks count once
    return found
