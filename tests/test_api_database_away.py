"""The API while its database is away: every route that needs it answers the usual JSON
error (``503 database_unavailable``), and the same routes answer again once it is back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import make_url

from pixelmill.api.app import create_app
from pixelmill.config import Settings
from tests.support.proxy import TcpProxy
from tests.support.waiting import wait_until

CSV = b"S. No.,Product Name,Input Image Urls\n1,A,https://img.example.com/a.jpg\n"


@pytest.fixture
def proxy(settings: Settings) -> Iterator[TcpProxy]:
    """A proxy in front of the database, that the test takes down and brings back."""
    target = make_url(settings.database_url)
    if target.get_backend_name() == "sqlite":
        pytest.skip("SQLite has no server to take away")
    proxy = TcpProxy(target.port or 5432).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def client(settings: Settings, proxy: TcpProxy) -> Iterator[TestClient]:
    url = make_url(settings.database_url).set(port=proxy.port)
    proxied = settings.model_copy(
        update={"database_url": url.render_as_string(hide_password=False)}
    )
    with TestClient(create_app(proxied, migrate=True), raise_server_exceptions=False) as api:
        yield api


def test_routes_that_need_the_database_answer_503_in_json_while_it_is_away(
    client: TestClient, proxy: TcpProxy
) -> None:
    accepted = client.post("/upload", files={"file": ("p.csv", CSV, "text/csv")})
    assert accepted.status_code == 202, accepted.text
    request_path = f"/api/v1/requests/{accepted.json()['request_id']}"

    proxy.stop()  # every connection cut, and new ones refused
    calls = {
        "list": lambda: client.get("/api/v1/requests"),
        "status": lambda: client.get(request_path),
        "legacy status": lambda: client.get(f"/status/{accepted.json()['request_id']}"),
        "upload": lambda: client.post("/upload", files={"file": ("p.csv", CSV, "text/csv")}),
    }
    for name, call in calls.items():
        response = call()
        assert response.status_code == 503, (name, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"]
        error = response.json()["error"]
        assert error["code"] == "database_unavailable", name
        assert "database" in error["message"] and error["details"] == []

    proxy.start()  # back on the same port
    assert client.get(request_path).status_code == 200
    assert client.get("/api/v1/requests").json()["total"] == 1, "the refused upload left nothing"


def test_metrics_say_the_database_is_away_and_still_answer(
    client: TestClient, proxy: TcpProxy
) -> None:
    assert "pixelmill_database_up 1.0" in client.get("/metrics").text
    proxy.stop()
    away = client.get("/metrics")
    assert away.status_code == 200
    # Read again once the last figures are older than the refresh interval.
    page = wait_until(
        lambda: "pixelmill_database_up 0.0" in (text := client.get("/metrics").text) and text,
        timeout=30,
        what="the database reported down",
    )
    assert "pixelmill_requests{" not in page, "no stale figures while it is away"
    assert "python_info" in page and "pixelmill_http_requests_total" in page
    proxy.start()
    wait_until(
        lambda: "pixelmill_database_up 1.0" in client.get("/metrics").text,
        timeout=30,
        what="the database reported back",
    )
