"""HttpImaging against real ``pixelmill imaging`` processes: spreading, failover, patience.

Instances are killed with SIGKILL, started late on a reserved port, or kept busy with a
slow source; waits are on conditions with deadlines. The last test runs a whole request
through ``pixelmill serve`` with its images processed by two imaging processes.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pixelmill.config import Settings
from pixelmill.domain import (
    ErrorCode,
    ImageFailure,
    ImageOutcome,
    ProcessedImage,
    ProcessingOptions,
)
from pixelmill.imaging.base import ImagingUnavailableError
from pixelmill.imaging.client import HttpImaging
from pixelmill.imaging.wire import outcome_from_json, outcome_to_json
from tests.support.image_host import ImageHost
from tests.support.images import PHOTOS, decoded_size
from tests.support.imaging_service import ImagingProcess
from tests.support.server import ServeProcess, free_port
from tests.support.waiting import async_wait_until

MakeClient = Callable[..., HttpImaging]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ImagingProcess]]:
    """Two imaging processes sharing one storage folder, as they would share S3."""
    root = tmp_path_factory.mktemp("pair")
    env = {"PIXELMILL_STORAGE_URL": f"file://{root / 'files'}"}
    processes = [ImagingProcess(root, env).start() for _ in range(2)]
    yield processes
    for process in processes:
        process.stop()


@pytest.fixture
async def make_client(settings: Settings) -> AsyncIterator[MakeClient]:
    """HttpImaging over the given service URLs (settings changed by keyword), closed after."""
    made: list[HttpImaging] = []

    def make(*urls: str, **changes: object) -> HttpImaging:
        client = HttpImaging(settings.model_copy(update={"imaging_url": ",".join(urls), **changes}))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def processed(outcome: ImageOutcome) -> ProcessedImage:
    assert isinstance(outcome, ProcessedImage), f"expected an image, got {outcome!r}"
    return outcome


def photo_urls(host: ImageHost, count: int, route: str = "img") -> list[str]:
    return [host.url(f"{route}/{PHOTOS[i % len(PHOTOS)]}?n={i}") for i in range(count)]


def dead_url() -> str:
    """The URL of a loopback port that nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


async def test_requests_are_spread_over_every_instance(
    pair: list[ImagingProcess], image_host: ImageHost, make_client: MakeClient
) -> None:
    client = make_client(*(process.url for process in pair))
    before = [process.health()["served"] for process in pair]

    outcomes = await asyncio.gather(
        *(
            client.process(url, ProcessingOptions(), f"spread/{i}")
            for i, url in enumerate(photo_urls(image_host, 12))
        )
    )

    assert all(processed(outcome).format == "jpeg" for outcome in outcomes)
    served = [process.health()["served"] - b for process, b in zip(pair, before, strict=True)]
    assert sum(served) == 12
    assert all(count >= 3 for count in served), served
    assert [instance.answered for instance in client.instances] == served


async def test_one_at_a_time_goes_round_robin(
    pair: list[ImagingProcess], image_host: ImageHost, make_client: MakeClient
) -> None:
    client = make_client(*(process.url for process in pair))

    for i, url in enumerate(photo_urls(image_host, 6)):
        processed(await client.process(url, ProcessingOptions(), f"turns/{i}"))

    assert [instance.answered for instance in client.instances] == [3, 3]


async def test_an_instance_that_keeps_failing_is_skipped(
    pair: list[ImagingProcess], image_host: ImageHost, make_client: MakeClient
) -> None:
    client = make_client(dead_url(), pair[0].url, imaging_skip_seconds=60)
    dead, alive = client.instances

    for i, url in enumerate(photo_urls(image_host, 10)):
        processed(await client.process(url, ProcessingOptions(), f"skip/{i}"))

    assert dead.failures == client.failure_threshold == 3, "tried until skipped, then not"
    assert dead.answered == 0 and alive.answered == 10


async def test_a_busy_instance_sends_the_image_to_another(
    tmp_path: Path, image_host: ImageHost, make_client: MakeClient
) -> None:
    busy = ImagingProcess(tmp_path, {"PIXELMILL_IMAGING_MAX_IN_FLIGHT": "1"}).start()
    free = ImagingProcess(tmp_path).start()
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            slow = {"source_url": image_host.url("slow/2000/cat.jpg"), "output_key": "slow/1"}
            hog = asyncio.create_task(http.post(f"{busy.url}/v1/process", json=slow))
            await async_wait_until(
                lambda: asyncio.to_thread(lambda: busy.health()["in_flight"] == 1),
                what="the busy instance full",
            )
            client = make_client(busy.url, free.url)

            outcome = await client.process(
                image_host.url("img/cat.jpg"), ProcessingOptions(), "moved/1"
            )

            processed(outcome)
            assert [i.answered for i in client.instances] == [0, 1]
            assert busy.health()["refused"] == 1
            assert (await hog).status_code == 200
    finally:
        busy.stop()
        free.stop()


async def test_when_every_instance_is_busy_the_image_waits_for_room(
    tmp_path: Path, image_host: ImageHost, make_client: MakeClient
) -> None:
    service = ImagingProcess(tmp_path, {"PIXELMILL_IMAGING_MAX_IN_FLIGHT": "1"}).start()
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            slow = {"source_url": image_host.url("slow/1500/cat.jpg"), "output_key": "slow/1"}
            hog = asyncio.create_task(http.post(f"{service.url}/v1/process", json=slow))
            await async_wait_until(
                lambda: asyncio.to_thread(lambda: service.health()["in_flight"] == 1),
                what="the instance full",
            )
            # Less patience than the hog takes: a 429 is a sign of life, not a failure.
            client = make_client(service.url, imaging_patience_seconds=0.5)

            outcome = await client.process(
                image_host.url("img/coffee.jpg"), ProcessingOptions(), "waited/1"
            )

            assert processed(outcome).output_key == "waited/1.jpg"
            assert (await hog).status_code == 200
        assert service.health()["refused"] >= 1
        assert client.instances[0].failures == 0
    finally:
        service.stop()


async def test_a_killed_instance_loses_no_image(
    tmp_path: Path, image_host: ImageHost, make_client: MakeClient
) -> None:
    env = {"PIXELMILL_STORAGE_URL": f"file://{tmp_path / 'files'}"}
    doomed = ImagingProcess(tmp_path, env).start()
    survivor = ImagingProcess(tmp_path, env).start()
    try:
        client = make_client(doomed.url, survivor.url)
        urls = photo_urls(image_host, 16, route="slow/300")
        batch = asyncio.gather(
            *(client.process(url, ProcessingOptions(), f"kill/{i}") for i, url in enumerate(urls))
        )
        running = asyncio.ensure_future(batch)
        await async_wait_until(
            lambda: asyncio.sleep(0, client.instances[0].in_flight >= 2),
            what="images in flight on the doomed instance",
        )

        await asyncio.to_thread(doomed.kill9)
        outcomes = await running

        keys = [processed(outcome).output_key for outcome in outcomes]
        assert keys == [f"kill/{i}.jpg" for i in range(16)]
        assert all((tmp_path / "files" / key).is_file() for key in keys)
        assert client.instances[0].failures >= 1
        assert client.instances[1].answered >= 8
    finally:
        doomed.stop()
        survivor.stop()


async def test_all_down_then_one_back_within_the_patience_completes(
    tmp_path: Path, image_host: ImageHost, make_client: MakeClient
) -> None:
    late = ImagingProcess(tmp_path)
    client = make_client(dead_url(), late.url, imaging_skip_seconds=0.5)
    try:
        waiting = asyncio.create_task(
            client.process(image_host.url("img/galaxy.jpg"), ProcessingOptions(), "late/1")
        )
        await async_wait_until(
            lambda: asyncio.sleep(0, all(i.failures >= 3 for i in client.instances)),
            what="both instances failed and skipped",
        )
        assert not waiting.done()

        await asyncio.to_thread(late.start)
        outcome = await asyncio.wait_for(waiting, timeout=60)

        assert processed(outcome).output_key == "late/1.jpg"
        assert client.instances[1].answered == 1 and client.instances[1].failures == 0
    finally:
        late.stop()


async def test_all_down_past_the_patience_is_unavailable_not_a_failed_image(
    image_host: ImageHost, make_client: MakeClient
) -> None:
    client = make_client(dead_url(), dead_url(), imaging_patience_seconds=0.3)

    with pytest.raises(ImagingUnavailableError, match=r"no imaging service answered within 0\.3 s"):
        await client.process(image_host.url("img/cat.jpg"), ProcessingOptions(), "gone/1")

    assert all(instance.failures >= 1 for instance in client.instances)


async def test_a_wrong_token_counts_as_a_failing_instance(
    tmp_path: Path, image_host: ImageHost, make_client: MakeClient
) -> None:
    guarded = ImagingProcess(tmp_path, {"PIXELMILL_IMAGING_TOKEN": "right"}).start()
    try:
        client = make_client(guarded.url, imaging_token="wrong", imaging_patience_seconds=0.3)

        with pytest.raises(ImagingUnavailableError, match="HTTP 401"):
            await client.process(image_host.url("img/cat.jpg"), ProcessingOptions(), "t/1")

        assert guarded.health()["served"] == 0
    finally:
        guarded.stop()


def test_wire_keeps_every_field_of_a_failure() -> None:
    failure = ImageFailure(ErrorCode.HTTP_ERROR, "HTTP 429", transient=True, retry_after=7.5)
    result = ProcessedImage("k/1.jpg", "http://x/files/k/1.jpg", "jpeg", 3, 2, 10, 5, 80, 40)

    assert outcome_from_json(outcome_to_json(failure)) == failure
    assert outcome_from_json(outcome_to_json(result)) == result
    whole = {**outcome_to_json(result), "duration_ms": 12}  # a float written as a whole number
    assert outcome_from_json(whole) == dataclasses.replace(result, duration_ms=12)
    newer = outcome_from_json(
        {"error": {"code": "quota", "message": "m", "transient": False, "retry_after": None}}
    )
    assert newer == ImageFailure(ErrorCode.INTERNAL_ERROR, "quota: m", transient=False)
    nulls = {name: None for name in outcome_to_json(result)}
    junks: list[object] = [
        [],
        {"output_key": "k"},
        {"error": {"code": "timeout"}},
        nulls,  # every field there, none of them of its type
        {**outcome_to_json(result), "width": "3"},
        {**outcome_to_json(result), "kept_source": 1},
        {"error": {"code": "timeout", "message": "m", "transient": True, "retry_after": [5]}},
    ]
    for junk in junks:
        with pytest.raises(ValueError):
            outcome_from_json(junk)


def test_one_shot_process_ignores_http_imaging(tmp_path: Path, image_host: ImageHost) -> None:
    source = tmp_path / "in.csv"
    url = image_host.url("img/cat.jpg?one-shot=1")
    source.write_text(f"S. No.,Product Name,Input Image Urls\n1,A,{url}\n")
    env = {
        **os.environ,
        "PIXELMILL_ALLOW_PRIVATE_URLS": "true",
        "PIXELMILL_IMAGING_URL": dead_url(),
    }

    result = subprocess.run(
        [sys.executable, "-m", "pixelmill", "process", str(source), "-o", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    rows = list(csv.reader((tmp_path / "out" / "output.csv").open()))
    assert (tmp_path / "out" / rows[1][-1]).is_file(), "the image is in OUT, processed inline"


def test_serve_with_two_imaging_services_completes_a_csv(
    tmp_path: Path, image_host: ImageHost
) -> None:
    serve_dir = tmp_path / "serve"
    services: list[ImagingProcess] = []
    server = ServeProcess(serve_dir)
    shared = {
        "PIXELMILL_STORAGE_URL": f"file://{serve_dir / 'files'}",
        "PIXELMILL_PUBLIC_URL": server.base_url,
    }
    try:
        services = [ImagingProcess(tmp_path / f"imaging-{i}", shared).start() for i in range(2)]
        server.env["PIXELMILL_IMAGING_URL"] = ",".join(service.url for service in services)
        server.start()
        urls = photo_urls(image_host, 6)
        lines = ["S. No.,Product Name,Input Image Urls"]
        lines += [f'{i + 1},Product {i + 1},"{url}, {url}&b=1"' for i, url in enumerate(urls)]
        lines.append(f"7,Missing,{image_host.url('status/404?e2e=1')}")

        accepted = server.post(
            "/api/v1/requests",
            files={"file": ("products.csv", "\n".join(lines).encode(), "text/csv")},
        )
        assert accepted.status_code == 202, accepted.text
        status = server.wait_finished(accepted.json()["request_id"])

        assert status["status"] == "completed", server.log()
        assert status["progress"]["completed"] == 12 and status["progress"]["failed"] == 1
        output = server.get(f"/api/v1/requests/{status['request_id']}/output.csv")
        rows = list(csv.reader(io.StringIO(output.text)))
        assert rows[7][-1] == ""
        for row, url in zip(rows[1:7], urls, strict=True):
            for output_url in row[-1].split(", "):
                assert output_url.startswith(f"{server.base_url}/files/")
                image = httpx.get(output_url, timeout=30)
                assert image.status_code == 200
                assert decoded_size(image.content) == decoded_size(httpx.get(url).content)
        served = [service.health()["served"] for service in services]
        assert sum(served) == 13 and all(count >= 3 for count in served), served
    finally:
        server.stop()
        for service in services:
            service.stop()


async def test_a_service_of_several_processes_serves_and_stops_cleanly(
    tmp_path: Path, image_host: ImageHost, make_client: MakeClient
) -> None:
    service = ImagingProcess(tmp_path, processes=2).start()
    try:
        client = make_client(service.url)
        outcomes = await asyncio.gather(
            *(
                client.process(url, ProcessingOptions(), f"procs/{i}")
                for i, url in enumerate(photo_urls(image_host, 8))
            )
        )
        assert all(processed(outcome).width > 0 for outcome in outcomes)
        # The first process may have served all of them before the second was up.
        await async_wait_until(lambda: _started(service, 2), what="both processes to start")
    finally:
        assert service.terminate(timeout=60) == 0, service.log()


async def _started(service: ImagingProcess, count: int) -> bool:
    return service.log().count("Application startup complete") == count


async def imaging_metrics(http: httpx.AsyncClient) -> dict[tuple[str, tuple[str, ...]], float]:
    """The samples of a service's ``/metrics``, by name and label values."""
    page = await http.get("/metrics")
    assert page.status_code == 200
    return {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(page.text)
        for sample in family.samples
    }


async def test_the_metrics_of_a_service_of_several_processes_count_them_all(
    tmp_path: Path, image_host: ImageHost, make_client: MakeClient
) -> None:
    service = ImagingProcess(tmp_path, processes=2).start()
    # No connection kept: each call may land on either process.
    fresh = httpx.Limits(max_keepalive_connections=0)
    try:
        await async_wait_until(lambda: _started(service, 2), what="both processes to start")
        client = make_client(service.url)
        outcomes = await asyncio.gather(
            *(
                client.process(url, ProcessingOptions(), f"counted/{i}")
                for i, url in enumerate(photo_urls(image_host, 24))
            ),
            client.process(image_host.url("status/404?counted"), ProcessingOptions(), "gone/1"),
        )
        assert sum(isinstance(outcome, ImageFailure) for outcome in outcomes) == 1
        async with httpx.AsyncClient(base_url=service.url, limits=fresh, timeout=10) as http:
            # Each process counts what it served: seeing both proves both took images,
            # so a page showing all of them adds up the counts of both processes.
            served: set[int] = set()

            async def both_seen() -> bool:
                served.add((await http.get("/healthz")).json()["served"])
                return len(served) == 2

            await async_wait_until(both_seen, what="each process's own count")
            assert sum(served) == 25 and 0 not in served, served
            for _ in range(10):
                values = await imaging_metrics(http)
                assert values[("pixelmill_imaging_images_total", ("processed",))] == 24
                assert values[("pixelmill_imaging_images_total", ("http_error",))] == 1
                assert values[("pixelmill_imaging_image_duration_seconds_count", ())] == 24
                assert values[("pixelmill_imaging_in_flight", ())] == 0
    finally:
        assert service.terminate(timeout=60) == 0, service.log()
