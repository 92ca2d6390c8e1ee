"""Objects in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...): ``s3://BUCKET/PREFIX``.

The URL names the place; ``endpoint_url``, ``region`` and ``addressing_style`` may follow
as query parameters (``s3://images/pixelmill?endpoint_url=http://minio:9000``).
Credentials never go in the URL, which is logged: they come from the standard chain of
the AWS SDK (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an
instance or task role).

Every call goes through one thread-safe boto3 client: the imaging threads write with
it directly, the event loop's calls go through a small thread pool of their own (a
slow or unreachable endpoint must not hold the threads that the rest of the process
shares, reading uploads for one).
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

from pixelmill.storage import (
    WRITE_CHECK_KEY,
    ObjectStream,
    StorageError,
    StoredObject,
    check_key,
)

T = TypeVar("T")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_ADDRESSING = ("auto", "path", "virtual")
_PARAMETERS = ("endpoint_url", "region", "addressing_style")
_CHUNK = 1 << 20
# Enough for every imaging thread and the event loop's calls at once.
_CONNECTIONS = 64
_LOOP_THREADS = 16


@dataclass(frozen=True)
class S3Location:
    """Where the objects go, read from ``PIXELMILL_STORAGE_URL``."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"

    @classmethod
    def from_url(cls, url: str) -> S3Location:
        """Parse ``s3://BUCKET[/PREFIX][?endpoint_url=..&region=..&addressing_style=..]``;
        raises ValueError saying what is wrong."""
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise ValueError(f"{url!r} is not an s3:// URL")
        if parts.username or parts.password:
            raise ValueError(
                "credentials do not belong in PIXELMILL_STORAGE_URL (it is logged); "
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or use a role"
            )
        bucket = parts.netloc.rpartition("@")[2]  # as written: hostname is lowercased
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise ValueError(
                f"{bucket!r} is not a valid bucket name (3-63 characters: lowercase letters, "
                "digits, dots and hyphens, starting and ending with a letter or a digit)"
            )
        prefix = parts.path.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except StorageError:
                raise ValueError(
                    f"{prefix!r} is not a valid prefix (letters, digits, '.', '_', '-' and "
                    "'/' between parts; no '..')"
                ) from None
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(params) - set(_PARAMETERS))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(_PARAMETERS)}"
            )
        endpoint = params.get("endpoint_url") or None
        if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
            raise ValueError(f"endpoint_url={endpoint!r} must be an http:// or https:// URL")
        addressing = params.get("addressing_style") or "auto"
        if addressing not in _ADDRESSING:
            raise ValueError(
                f"addressing_style={addressing!r}; use one of {', '.join(_ADDRESSING)}"
            )
        return cls(bucket, prefix, endpoint, params.get("region") or None, addressing)

    def object_key(self, key: str) -> str:
        """The bucket's key of the object stored under ``key``."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def describe(self, key: str = "") -> str:
        """``s3://bucket/prefix/key``, for messages."""
        return f"s3://{self.bucket}/{self.object_key(key) if key else self.prefix}"


class S3Storage:
    """Objects in a bucket; each write is one PUT, metadata included (all or nothing)."""

    def __init__(self, location: S3Location, base_url: str) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # an extra, like the Kafka client
            raise ValueError("s3:// storage needs boto3: pip install 'pixelmill[s3]'") from exc
        self.location = location
        self.base_url = base_url.rstrip("/")
        config = Config(
            max_pool_connections=_CONNECTIONS,
            connect_timeout=10,
            read_timeout=60,
            retries={"mode": "standard", "max_attempts": 3},
            s3={"addressing_style": location.addressing_style},
        )
        self._pool = ThreadPoolExecutor(_LOOP_THREADS, thread_name_prefix="pixelmill-s3")
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=location.endpoint_url,
            region_name=location.region,
            config=config,
        )

    def local_path(self, key: str) -> Path | None:
        return None

    async def _off_loop(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call`` in this storage's own threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(call, *args, **kwargs))

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/{quote(check_key(key))}"

    async def check(self, *, write: bool = True) -> None:
        """Raise :class:`StorageError` unless the bucket can be reached and, with
        ``write``, written to (at start)."""
        bucket = self.location.bucket
        try:
            await self._off_loop(self._call, "reach", "", self._client.head_bucket, Bucket=bucket)
        except StorageError as exc:
            if _code(exc.__cause__) not in ("404", "NoSuchBucket"):
                raise
            where = f" at {self.location.endpoint_url}" if self.location.endpoint_url else ""
            raise StorageError(
                f"there is no bucket {bucket!r}{where}", transient=False
            ) from exc.__cause__
        if not write:
            return
        # Reading the bucket is not writing to it: credentials for reading only pass
        # the first look and would fail every image.
        await self._off_loop(
            self.put_bytes_blocking, WRITE_CHECK_KEY, b"pixelmill may write here\n", "text/plain"
        )

    async def find(self, stem: str, extensions: Iterable[str]) -> StoredObject | None:
        for extension in extensions:
            key = f"{stem}.{extension}"
            head = await self._off_loop(self._object, self._client.head_object, key)
            if head is not None and head["Metadata"]:
                stored = head["Metadata"].items()
                metadata = {name.replace("-", "_"): value for name, value in stored}
                return StoredObject(key, int(head["ContentLength"]), metadata)
        return None

    def put_bytes_blocking(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        # Underscores in header names are dropped by some proxies (nginx by default).
        names = {name.replace("_", "-"): value for name, value in (metadata or {}).items()}
        self._call(
            "write",
            key,
            self._client.put_object,
            Bucket=self.location.bucket,
            Key=self.location.object_key(key),
            Body=data,
            ContentType=content_type,
            Metadata=names,
        )

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        # upload_file sends a large file in parts, never reading it into memory whole.
        await self._off_loop(
            self._call,
            "write",
            key,
            self._client.upload_file,
            str(path),
            self.location.bucket,
            self.location.object_key(key),
            ExtraArgs={"ContentType": content_type},
        )

    async def open(self, key: str) -> ObjectStream | None:
        answer = await self._off_loop(self._object, self._client.get_object, key)
        if answer is None:
            return None
        body = answer["Body"]
        return ObjectStream(int(answer["ContentLength"]), body.iter_chunks(_CHUNK), body.close)

    async def delete_folder(self, folder: str) -> int:
        return await self._off_loop(self._delete_folder, folder)

    def _delete_folder(self, folder: str) -> int:
        return int(self._call("delete", folder, self._delete_pages, folder))

    def _delete_pages(self, folder: str) -> int:
        bucket = self.location.bucket
        prefix = self.location.object_key(folder) + "/"
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        deleted = 0
        for page in pages:  # at most 1000 keys a page, as many as one delete takes
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if not keys:
                continue
            answer = self._client.delete_objects(
                Bucket=bucket, Delete={"Objects": keys, "Quiet": True}
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageError(
                    f"cannot delete {len(answer['Errors'])} objects under "
                    f"{self.location.describe(folder)}/, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message', '')}".rstrip(),
                    transient=False,
                )
            deleted += len(keys)
        return deleted

    def _object(self, call: Any, key: str) -> Any:
        """``call`` (HEAD or GET) on the object under ``key``; None when there is none."""
        try:
            return self._call(
                "read", key, call, Bucket=self.location.bucket, Key=self.location.object_key(key)
            )
        except StorageError as exc:
            if _code(exc.__cause__) in ("404", "NoSuchKey"):
                return None
            raise

    def _call(self, doing: str, key: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)``; every failure of the SDK becomes a StorageError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call(*args, **kwargs)
        except ClientError as exc:
            raise StorageError(
                f"cannot {doing} {self.location.describe(key)}: {_code(exc)} "
                f"{exc.response.get('Error', {}).get('Message', '')}".rstrip(),
                transient=_transient(exc),
            ) from exc
        except (BotoCoreError, Boto3Error) as exc:
            # A connection refused or cut, a timeout: the endpoint may come back. (The
            # transfer manager wraps the answer of a failed upload; look inside it.)
            cause = exc.__context__ if isinstance(exc, Boto3Error) else None
            transient = _transient(cause) if isinstance(cause, ClientError) else True
            raise StorageError(
                f"cannot {doing} {self.location.describe(key)}: {exc}", transient=transient
            ) from exc


def _transient(exc: Any) -> bool:
    """Whether an answer of the server may change if asked again: a server error,
    throttling or a timeout may; a refusal (access denied, no such bucket, a bad
    signature or key) does not."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return status >= 500 or status in (408, 429) or _code(exc) in ("SlowDown", "RequestTimeout")


def _code(exc: BaseException | None) -> str:
    """The error code of an S3 answer (``NoSuchKey``, ``404``...); "" for anything else."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
