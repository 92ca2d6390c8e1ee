"""Every malformed file of tests/data/csv/bad is refused whole, through the API and the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from pixelmill.api.app import create_app
from pixelmill.config import Settings
from pixelmill.oneshot import process_file

BAD = Path(__file__).parent / "data" / "csv" / "bad"
EXPECTED: dict[str, dict] = json.loads((BAD / "expected.json").read_text())
GOOD = b"S. No.,Product Name,Input Image Urls\n1,A,https://img.example.com/a.jpg\n"


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, migrate=True)) as api:
        yield api


def _stored(client: TestClient) -> int:
    return int(client.get("/api/v1/requests").json()["total"])


def _check(response, expected: dict) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == expected["status"], response.text
    error = response.json()["error"]
    assert error["code"] == expected["code"]
    found = sorted((d["line"], d["column"]) for d in error["details"])
    if expected["problems"]:
        assert found == sorted(tuple(p) for p in expected["problems"])
    assert error["message"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_is_refused_with_exact_lines(client: TestClient, name: str) -> None:
    body = (BAD / name).read_bytes()
    expected = EXPECTED[name]
    _check(client.post("/api/v1/requests", files={"file": (name, body, "text/csv")}), expected)
    _check(client.post("/upload", content=body, headers={"Content-Type": "text/csv"}), expected)
    assert _stored(client) == 0, "nothing is stored"


def test_not_text_files_carry_a_hint(client: TestClient) -> None:
    for name in ("workbook.xlsx.csv", "utf16.csv", "latin1.csv"):
        body = (BAD / name).read_bytes()
        message = client.post("/upload", files={"file": (name, body)}).json()["error"]["message"]
        assert "CSV UTF-8" in message, message


def test_problems_are_capped_at_100_with_the_total(client: TestClient) -> None:
    rows = "".join(f"{i},,https://img.example.com/{i}.jpg\n" for i in range(1, 151))
    body = ("S. No.,Product Name,Input Image Urls\n" + rows).encode()
    error = client.post("/upload", files={"file": ("p.csv", body)}).json()["error"]
    assert len(error["details"]) == 100 and error["total_problems"] == 150
    assert error["details"][0]["line"] == 2 and error["details"][-1]["line"] == 101


def _rows(count: int) -> bytes:
    rows = "".join(f"{i},P,https://img.example.com/{i}.jpg\n" for i in range(1, count + 1))
    return ("S. No.,Product Name,Input Image Urls\n" + rows).encode()


def test_row_limit_is_413_for_every_shape(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_rows": 2})
    with TestClient(create_app(limited, migrate=True)) as api:
        body = _rows(3) + b"\n\n"  # blank lines are not rows
        shapes = [
            api.post("/upload", files={"file": ("p.csv", body)}),
            api.post("/api/v1/requests", files={"file": ("p.csv", body)}),
            api.post("/api/v1/requests", content=body, headers={"Content-Type": "text/csv"}),
        ]
        for response in shapes:
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "too_many_rows"
            assert "PIXELMILL_MAX_ROWS" in response.json()["error"]["message"]
        assert _stored(api) == 0
        at_the_limit = api.post("/upload", content=_rows(2) + b"\n\n,,\n")
        assert at_the_limit.status_code == 202, at_the_limit.text
        assert at_the_limit.json()["products"] == 2


async def test_row_and_byte_limits_apply_to_process(settings: Settings, tmp_path: Path) -> None:
    source = tmp_path / "p.csv"
    source.write_bytes(_rows(3))
    for limits in ({"max_rows": 2}, {"max_upload_bytes": len(_rows(3)) - 1}):
        out = tmp_path / "out"
        limited = settings.model_copy(update=limits)
        assert await asyncio.to_thread(process_file, limited, source, out, Console(quiet=True)) == 2
        assert not (out / "output.csv").exists()


def test_byte_limit_is_413_for_every_shape(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_upload_bytes": 1000})
    big = GOOD + b"".join(
        f"{i},P,https://img.example.com/{i}.jpg\n".encode() for i in range(2, 200)
    )

    def chunks() -> Iterator[bytes]:
        yield from (big[i : i + 256] for i in range(0, len(big), 256))

    with TestClient(create_app(limited, migrate=True)) as api:
        shapes = [
            api.post("/upload", files={"file": ("p.csv", big)}),
            api.post("/upload", content=big, headers={"Content-Type": "text/csv"}),
            api.post("/upload", content=chunks(), headers={"Content-Type": "text/csv"}),
        ]
        for response in shapes:
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "upload_too_large"
        assert _stored(api) == 0
        assert api.post("/upload", files={"file": ("p.csv", GOOD)}).status_code == 202


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_bad_file_is_refused_by_process(
    settings: Settings, tmp_path: Path, name: str
) -> None:
    out = tmp_path / "out"
    code = await asyncio.to_thread(process_file, settings, BAD / name, out, Console(quiet=True))
    assert code == 2
    assert not (out / "output.csv").exists()


def test_a_header_without_rows_is_refused_at_the_header_line(client: TestClient) -> None:
    body = b"\n\n\nS. No.,Product Name,Input Image Urls\n\n"
    response = client.post("/upload", files={"file": ("p.csv", body)})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "empty_csv"
    assert [detail["line"] for detail in error["details"]] == [4]


@pytest.mark.parametrize(
    ("files", "headers"),
    [
        ([("file", ("a.csv", GOOD)), ("file", ("b.csv", GOOD))], {}),
        ([("file", ("a.csv", GOOD)), ("other", ("b.csv", GOOD))], {}),
        (None, {"Content-Type": "multipart/form-data"}),  # no boundary
    ],
    ids=["two-files", "a-second-file-part", "no-boundary"],
)
def test_a_multipart_body_that_cannot_be_read_is_a_400_with_its_code(
    client: TestClient, files: list[tuple[str, tuple[str, bytes]]] | None, headers: dict[str, str]
) -> None:
    if files is None:
        response = client.post("/api/v1/requests", content=GOOD, headers=headers)
    else:
        response = client.post("/api/v1/requests", files=files)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_multipart"
    assert "file" in error["message"]
    assert _stored(client) == 0


@pytest.mark.parametrize("path", ["/api/v1/requests", "/api/v1/requests/{id}/products"])
def test_an_offset_beyond_any_total_gives_an_empty_page_or_a_422(
    client: TestClient, path: str
) -> None:
    accepted = client.post("/upload", files={"file": ("p.csv", GOOD)}).json()
    url = path.format(id=accepted["request_id"])
    largest = 2**53 - 1

    page = client.get(url, params={"offset": largest})
    beyond = client.get(url, params={"offset": 2**63})

    assert page.status_code == 200, page.text
    assert page.json()["items"] == [] and page.json()["offset"] == largest
    assert beyond.status_code == 422, beyond.text
    assert beyond.json()["error"]["code"] == "invalid_request"
