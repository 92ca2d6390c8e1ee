"""Workers joining and leaving in the middle of a request: scaling up and down.

On Kafka every join and every leave is a rebalance. Each member gives up all its
partitions, gets its share back, and reads again the records it had not committed:
the tasks it still holds on the partitions it kept go on in its hands, and the tasks
of the partitions that moved are delivered to their new owner. A worker that leaves
(SIGTERM) hands its tasks back. The request must finish with every image terminal
once, every object stored (a few twice: the images in flight where a task was), and no
task counted as a failed delivery for having moved: every task ends with one attempt.
"""

from __future__ import annotations

from typing import Any

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written,
    progress,
    slow_photo_rows,
    stored_keys,
    task_states,
    upload,
    watch_request,
)
from tests.reliability.conftest import WORKER_CONCURRENCY, scaled
from tests.support.cluster import Cluster
from tests.support.image_host import ImageHost
from tests.support.waiting import wait_until
from tests.support.writes import WriteCounter

CHANGES = ("join", "join", "leave", "join")  # 1 -> 2 -> 3 -> 2 -> 3 workers


def test_workers_joining_and_leaving_mid_request_move_tasks_without_counting_them(
    cluster: Cluster,
    writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    images_total = scaled(240)
    # Slow sources (a task of 16 images lasts about a second) and a lease renewed every
    # 4 s: tasks are in hand through each rebalance, and a worker takes the records it
    # reads again while it still holds their tasks.
    cluster.env |= {"PIXELMILL_SHUTDOWN_GRACE_SECONDS": "1", "PIXELMILL_LEASE_SECONDS": "12"}
    rows = slow_photo_rows(image_host, images_total, "scaling", delay_ms=500)
    request_id = upload(cluster, rows)
    watch_request(writes, request_id)
    cluster.add_worker()

    changed_at = []
    for step, change in enumerate(CHANGES):
        threshold = images_total * (step + 1) // (len(CHANGES) + 2)
        wait_until(
            lambda t=threshold: progress(cluster, request_id)["completed"] >= t,
            timeout=240,
            interval=0.1,
            what=f"{threshold} images done",
        )
        if change == "join":
            cluster.add_worker()
        else:
            assert cluster.alive_workers()[0].terminate() == 0, "a worker leaves cleanly"
        changed_at.append(progress(cluster, request_id)["completed"])
    assert max(changed_at) < images_total, "every change landed mid-request"

    status = cluster.wait_finished(request_id, timeout=scaled(240))
    assert status["status"] == "completed", status
    check_each_terminal_once(cluster, request_id, images_total)
    keys = stored_keys(check_output_csv(cluster, request_id, rows))
    assert len(keys) == images_total
    # A task that moves, or is handed back, may still have images in flight where it
    # was (a thread, or an imaging service, cannot be stopped mid-image), and its new
    # holder processes them too: the same bytes, stored again under the same key. At
    # most the images in flight of every worker, at each change.
    in_flight = len(CHANGES) * 3 * WORKER_CONCURRENCY
    duplicates = check_written(writes, request_id, keys, extra_allowed=in_flight)
    tasks = task_states(cluster, request_id)
    assert set(tasks) == {("done", 1)}, f"(state, attempts) of the tasks: {tasks}"
    figures.update(
        images=images_total,
        changes=list(CHANGES),
        completed_at_changes=changed_at,
        tasks=sum(tasks.values()),
        duplicate_writes=duplicates,
    )
