"""kill -9 of workers, again and again, in the middle of a large request.

Workers die without a word (SIGKILL) while they hold tasks; replacements start. The
request must still finish with every image ``completed`` exactly once, each stored
object written once (counted with inotify as it happens, not from the files at the
end), and an output CSV that is complete and in input order.
"""

from __future__ import annotations

import random
import time
import uuid
from typing import Any

from tests.reliability.checks import (
    check_each_terminal_once,
    check_output_csv,
    check_written_once,
    fetches,
    progress,
    stored_keys,
    upload,
    watch_request,
)
from tests.reliability.conftest import scaled
from tests.support.cluster import Cluster, peak_rss_bytes
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS
from tests.support.waiting import wait_until
from tests.support.writes import WriteCounter

IMAGES_PER_ROW = 2


def test_repeated_kill_9_of_workers_loses_nothing_and_writes_once(
    cluster: Cluster,
    writes: WriteCounter,
    image_host: ImageHost,
    figures: dict[str, Any],
) -> None:
    images_total, kills = scaled(2000), scaled(3)
    tag = uuid.uuid4().hex[:8]
    rows = [
        [
            image_host.url(f"img/{PHOTOS[(row + k) % len(PHOTOS)]}?kill={tag}-{row}-{k}")
            for k in range(IMAGES_PER_ROW)
        ]
        for row in range(images_total // IMAGES_PER_ROW)
    ]
    started = time.monotonic()
    request_id = upload(cluster, rows)
    watch_request(writes, request_id)
    for _ in range(3):  # three workers share the request
        cluster.add_worker()

    chooser = random.Random(tag)
    killed_at = []
    for kill in range(kills):
        # Spread the kills over the run: each when a further share of the images is done.
        threshold = images_total * (kill + 1) // (kills + 2)
        wait_until(
            lambda t=threshold: progress(cluster, request_id)["completed"] >= t,
            timeout=240,
            interval=0.1,
            what=f"{threshold} images done",
        )
        victim = chooser.choice(cluster.alive_workers())
        victim.kill9()
        killed_at.append(progress(cluster, request_id)["completed"])
        cluster.add_worker()
    assert max(killed_at) < images_total, "every kill landed mid-request"

    status = cluster.wait_finished(request_id, timeout=scaled(300))
    elapsed = time.monotonic() - started
    assert status["status"] == "completed", status
    check_each_terminal_once(cluster, request_id, images_total)
    assert status["progress"]["completed"] == images_total
    outputs = check_output_csv(cluster, request_id, rows)
    keys = stored_keys(outputs)
    assert len(keys) == images_total
    duplicates = check_written_once(writes, request_id, keys)
    fetched = [fetches(image_host, url) for row in rows for url in row]
    assert min(fetched) >= 1
    rss = [peak_rss_bytes(p) for p in cluster.alive_workers() + cluster.imaging]
    figures.update(
        images=images_total,
        kills=kills,
        completed_at_kills=killed_at,
        duplicate_writes=duplicates,
        output_csv_writes=writes.counts(f"{request_id}/")[f"{request_id}/output.csv"],
        images_fetched_again=sum(n - 1 for n in fetched),
        peak_rss_mib=round(max(rss) / 2**20),
        seconds=round(elapsed, 1),
    )
