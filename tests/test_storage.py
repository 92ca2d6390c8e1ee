"""Both storages keep the same promises: a local folder, and an S3-compatible bucket on
a real S3 server (moto's server mode) reached through boto3."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pixelmill.config import Settings
from pixelmill.s3_storage import S3Location, S3Storage
from pixelmill.storage import InvalidKeyError, LocalStorage, Storage, StorageError, open_storage
from tests.support.proxy import TcpProxy
from tests.support.s3 import S3Server
from tests.support.server import free_port

BASE_URL = "http://files.example/files"
METADATA = {"format": "jpeg", "width": "800", "bytes_in": "12345", "kept_source": "false"}


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "files", BASE_URL)
    server: S3Server = request.getfixturevalue("s3_server")
    return open_storage(server.storage_url(server.new_bucket()), BASE_URL)


async def read_all(storage: Storage, key: str) -> bytes | None:
    stream = await storage.open(key)
    if stream is None:
        return None
    try:
        data = await asyncio.to_thread(lambda: b"".join(stream.chunks))
    finally:
        stream.close()
    assert stream.size == len(data)
    return data


async def test_an_object_is_found_with_its_size_and_metadata(storage: Storage) -> None:
    await storage.check()
    await asyncio.to_thread(
        storage.put_bytes_blocking, "req/1-0.jpg", b"\xff\xd8jpeg", "image/jpeg", METADATA
    )
    found = await storage.find("req/1-0", ("png", "jpg"))
    assert found is not None
    assert (found.key, found.size, found.metadata) == ("req/1-0.jpg", 6, METADATA)
    assert await read_all(storage, "req/1-0.jpg") == b"\xff\xd8jpeg"
    assert storage.url_for("req/1-0.jpg") == f"{BASE_URL}/req/1-0.jpg"


async def test_absent_objects_and_objects_without_metadata_are_not_found(storage: Storage) -> None:
    assert await storage.find("req/2-0", ("jpg", "png")) is None
    assert await storage.open("req/2-0.jpg") is None
    await asyncio.to_thread(storage.put_bytes_blocking, "req/2-0.jpg", b"bare", "image/jpeg")
    assert await storage.find("req/2-0", ("jpg",)) is None  # a result needs its metadata
    assert await read_all(storage, "req/2-0.jpg") == b"bare"


async def test_a_write_again_replaces_the_object_whole(storage: Storage) -> None:
    for data in (b"first version, longer", b"second"):
        await asyncio.to_thread(
            storage.put_bytes_blocking, "req/3-0.jpg", data, "image/jpeg", METADATA
        )
    found = await storage.find("req/3-0", ("jpg",))
    assert found is not None and found.size == len(b"second")
    assert await read_all(storage, "req/3-0.jpg") == b"second"


async def test_a_file_is_stored_in_chunks_and_read_back(storage: Storage, tmp_path: Path) -> None:
    # Larger than one chunk of the reader, and than boto3's part size for uploads.
    data = bytes(range(256)) * (40 << 12)
    source = tmp_path / "output.csv"
    source.write_bytes(data)
    await storage.put_file("req/output.csv", source, "text/csv; charset=utf-8")
    assert await read_all(storage, "req/output.csv") == data


async def test_a_folder_is_deleted_whole_and_nothing_beside_it(storage: Storage) -> None:
    for key in ("req1/1-1.jpg", "req1/2-1.jpg", "req1/output.csv", "req10/1-1.jpg"):
        await asyncio.to_thread(storage.put_bytes_blocking, key, b"x", "image/jpeg")

    assert await storage.delete_folder("req1") == 3
    assert await storage.open("req1/output.csv") is None
    assert await read_all(storage, "req10/1-1.jpg") == b"x", "a longer name is another folder"
    assert await storage.delete_folder("req1") == 0, "deleting again is no error"


@pytest.mark.parametrize("key", ["../escape.jpg", "/etc/passwd", "a//b.jpg", "req/../../x"])
async def test_keys_that_could_escape_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        await asyncio.to_thread(storage.put_bytes_blocking, key, b"x", "image/jpeg")
    with pytest.raises(InvalidKeyError):
        await storage.open(key)


async def test_objects_go_under_the_prefix_of_the_bucket(s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    storage = open_storage(s3_server.storage_url(bucket, "catalogue/2026"), BASE_URL)
    await asyncio.to_thread(
        storage.put_bytes_blocking, "req/1-0.jpg", b"jpeg", "image/jpeg", METADATA
    )
    head = s3_server.client().head_object(Bucket=bucket, Key="catalogue/2026/req/1-0.jpg")
    assert head["ContentType"] == "image/jpeg"
    # Stored under names that survive proxies which drop underscores in headers.
    assert head["Metadata"]["bytes-in"] == "12345"


async def test_a_missing_bucket_is_said_at_start(s3_server: S3Server) -> None:
    storage = open_storage(s3_server.storage_url("pixelmill-no-such-bucket"), BASE_URL)
    with pytest.raises(StorageError, match="there is no bucket 'pixelmill-no-such-bucket' at "):
        await storage.check()


@pytest.fixture
def s3_behind_a_proxy(s3_server: S3Server) -> Iterator[tuple[S3Storage, TcpProxy]]:
    proxy = TcpProxy(s3_server.port, free_port()).start()
    url = f"s3://{s3_server.new_bucket()}?endpoint_url=http://127.0.0.1:{proxy.port}"
    storage = open_storage(url, BASE_URL)
    assert isinstance(storage, S3Storage)
    yield storage, proxy
    proxy.stop()


async def test_an_unreachable_endpoint_is_a_storage_error_naming_the_object(
    s3_behind_a_proxy: tuple[S3Storage, TcpProxy],
) -> None:
    storage, proxy = s3_behind_a_proxy
    await storage.check()
    proxy.stop()  # connections refused from now on
    with pytest.raises(StorageError, match=r"cannot write s3://pixelmill-\w+/req/1-0.jpg: "):
        await asyncio.to_thread(storage.put_bytes_blocking, "req/1-0.jpg", b"x", "image/jpeg")
    with pytest.raises(StorageError, match="cannot read"):
        await storage.find("req/1-0", ("jpg",))
    proxy.start()
    await asyncio.to_thread(storage.put_bytes_blocking, "req/1-0.jpg", b"x", "image/jpeg")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://Upper-Case/x", "not a valid bucket name"),
        ("s3://key:secret@bucket-name/x", "credentials do not belong"),
        ("s3://bucket-name/x?endpoint=http://h", "unknown parameter(s) endpoint"),
        ("s3://bucket-name/x?endpoint_url=ftp://h", "must be an http:// or https:// URL"),
        ("s3://bucket-name/x?addressing_style=dns", "addressing_style='dns'"),
        ("s3://bucket-name/../x", "'../x' is not a valid prefix"),
        ("s3://bucket-name:9000/x", "not a valid bucket name"),
    ],
)
def test_bad_storage_urls_are_refused_with_the_reason(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        S3Location.from_url(url)
    with pytest.raises(ValueError, match=re.escape(problem)):  # refused with the settings
        Settings(storage_url=url)


def test_a_storage_url_with_its_parameters() -> None:
    url = "s3://my.bucket-1/a/b/?endpoint_url=https://minio:9000&region=eu-west-3&addressing_style=path"
    location = S3Location.from_url(url)
    assert location == S3Location("my.bucket-1", "a/b", "https://minio:9000", "eu-west-3", "path")
    assert location.object_key("r/1-0.jpg") == "a/b/r/1-0.jpg"
    assert S3Location.from_url("s3://my-bucket").object_key("r/1-0.jpg") == "r/1-0.jpg"


class _RefusingS3(BaseHTTPRequestHandler):
    """An S3 endpoint that lets a bucket be looked at and refuses every write with
    ``status`` (403: credentials for reading only; 503: a server in trouble)."""

    status = 403

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        code = "AccessDenied" if self.status == 403 else "ServiceUnavailable"
        body = f"<Error><Code>{code}</Code><Message>refused</Message></Error>".encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(params=[403, 503])
def refusing_endpoint(request: pytest.FixtureRequest, s3_server: S3Server) -> Iterator[str]:
    handler = type("Handler", (_RefusingS3,), {"status": request.param})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_a_write_refused_fails_the_check_at_start_and_says_whether_to_wait(
    refusing_endpoint: str,
) -> None:
    storage = open_storage(f"s3://pixelmill-refusing?endpoint_url={refusing_endpoint}", BASE_URL)
    await storage.check(write=False)  # enough for an API that only reads
    with pytest.raises(StorageError, match="cannot write s3://pixelmill-refusing/") as refused:
        await storage.check()  # the bucket can be looked at, not written to
    denied = "AccessDenied" in str(refused.value)
    assert refused.value.transient is not denied, "a refusal is for good, a 503 may pass"
