"""Where processed images and output CSVs are kept, behind one small interface.

``file://DIR`` keeps them under a folder; ``s3://BUCKET/PREFIX`` in an S3-compatible
bucket (:mod:`pixelmill.s3_storage`). Either way the API serves them at ``/files/{key}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

_serial = itertools.count()
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")


class StorageError(Exception):
    """Storing or reading an object failed; ``transient`` unless the storage refuses
    (no permission, a read-only folder, a bucket that does not exist), which no wait
    mends."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class InvalidKeyError(StorageError):
    """A key that could name something outside the storage (``..``, an absolute path)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


# The object that every process writes at start, to learn that it may write at all.
WRITE_CHECK_KEY = "pixelmill-write-check"
# Local failures that persist until someone changes the folder or its permissions; a
# full disk (ENOSPC) or an I/O error may pass.
_REFUSALS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}
)


@dataclass(frozen=True)
class StoredObject:
    """An object found in storage: its key, its size and the metadata stored with it."""

    key: str
    size: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class ObjectStream:
    """A stored object being read: its size, its bytes in chunks (a blocking iterator:
    read it off the event loop), and what releases it (a file, a connection)."""

    size: int
    chunks: Iterator[bytes]
    close: Callable[[], None]


class Storage(Protocol):
    """Objects by key; every write is whole and idempotent (same key, same bytes)."""

    async def find(self, stem: str, extensions: Iterable[str]) -> StoredObject | None:
        """The object stored under ``stem.EXT`` for one of ``extensions`` with metadata,
        or None (an object stored without metadata is not reported)."""
        ...

    def put_bytes_blocking(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Store ``data`` under ``key``, ``metadata`` with it in the same write; blocks, so
        it is called off the event loop (the imaging thread that encoded the bytes)."""
        ...

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        """Store the file at ``path`` under ``key``; the file may be moved away."""
        ...

    async def open(self, key: str) -> ObjectStream | None:
        """The object stored under ``key`` for reading, or None if there is none."""
        ...

    async def check(self, *, write: bool = True) -> None:
        """Raise :class:`StorageError` unless objects can be read and, with ``write``,
        stored (checked at start)."""
        ...

    async def delete_folder(self, folder: str) -> int:
        """Delete every object whose key starts with ``folder/``; returns how many."""
        ...

    def url_for(self, key: str) -> str: ...

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` when the storage is local, else None."""
        ...


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root (``..``, absolute paths)."""
    if not _SAFE_KEY.match(key) or ".." in key.split("/") or "//" in key:
        raise InvalidKeyError(f"invalid storage key {key!r}")
    return key


# Metadata of a local object: a JSON object in one extended attribute of its file, set
# on the temporary file before the rename, so an object never exists without it.
METADATA_ATTRIBUTE = "user.pixelmill.metadata"


class LocalStorage:
    """Objects as files under one folder, written atomically (temp file + rename)."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root.resolve()
        self.base_url = base_url.rstrip("/")
        self.root.mkdir(parents=True, exist_ok=True)

    def local_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def url_for(self, key: str) -> str:
        return f"{self.base_url}/{quote(check_key(key))}"

    async def find(self, stem: str, extensions: Iterable[str]) -> StoredObject | None:
        # A few stat-sized calls on a local folder: not worth a thread hop.
        for extension in extensions:
            key = f"{stem}.{extension}"
            path = self.local_path(key)
            try:
                raw = os.getxattr(path, METADATA_ATTRIBUTE)
                size = os.stat(path).st_size
            except OSError:  # absent, or stored without metadata (or none supported)
                continue
            try:
                metadata = json.loads(raw)
            except ValueError:
                continue
            if isinstance(metadata, dict):
                return StoredObject(key, size, {str(k): str(v) for k, v in metadata.items()})
        return None

    def put_bytes_blocking(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        self._write(self.local_path(key), data, metadata)

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        target = self.local_path(key)
        await asyncio.to_thread(self._move_or_copy, path, target)

    async def open(self, key: str) -> ObjectStream | None:
        path = self.local_path(key)
        try:
            handle = path.open("rb")
        except OSError:  # absent, or a folder
            return None
        chunks = iter(lambda: handle.read(1 << 20), b"")
        return ObjectStream(os.fstat(handle.fileno()).st_size, chunks, handle.close)

    async def delete_folder(self, folder: str) -> int:
        return await asyncio.to_thread(self._delete_tree, self.local_path(folder))

    @staticmethod
    def _delete_tree(root: Path) -> int:
        if not root.is_dir():
            return 0
        count = sum(1 for path in root.rglob("*") if path.is_file())
        try:
            shutil.rmtree(root)
        except OSError as exc:
            raise StorageError(f"cannot delete {root}: {exc.strerror or exc}") from exc
        return count

    async def check(self, *, write: bool = True) -> None:
        if not write:
            return  # the folder was made when the storage was opened
        probe = self.local_path(WRITE_CHECK_KEY)
        await asyncio.to_thread(self._write, probe, b"pixelmill may write here\n")
        probe.unlink(missing_ok=True)

    @staticmethod
    def _write(target: Path, data: bytes | Path, metadata: Mapping[str, str] | None = None) -> None:
        """Write ``data`` (bytes, or the file at that path, copied in chunks) to ``target``."""
        # The temporary name is unique to this process and thread, so writers never
        # share one; a crash leaves at most a ``.tmp-*`` file, never a partial object.
        tmp = target.parent / f".tmp-{os.getpid()}-{threading.get_ident()}-{next(_serial)}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.fchmod(fd, 0o644)  # whatever the umask: stored objects are public
            with os.fdopen(fd, "wb") as handle:
                if isinstance(data, Path):
                    with data.open("rb") as source:
                        shutil.copyfileobj(source, handle, 1 << 20)
                else:
                    handle.write(data)
                if metadata:
                    _set_metadata(handle.fileno(), metadata)
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageError(
                f"cannot write {target}: {exc.strerror or exc}",
                transient=exc.errno not in _REFUSALS,
            ) from exc

    @staticmethod
    def _move_or_copy(source: Path, target: Path) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(source, 0o644)
            os.replace(source, target)
        except OSError:  # another file system: copied, never read into memory whole
            LocalStorage._write(target, source)


def _set_metadata(fd: int, metadata: Mapping[str, str]) -> None:
    """Attach ``metadata`` to an open file; a filesystem without extended attributes
    stores the object without it (then it is not found by ``find``, only rewritten)."""
    with contextlib.suppress(OSError):
        os.setxattr(fd, METADATA_ATTRIBUTE, json.dumps(dict(metadata)).encode())


def open_storage(url: str, base_url: str) -> Storage:
    """The storage named by ``PIXELMILL_STORAGE_URL``, its objects served under
    ``base_url`` (``PIXELMILL_STORAGE_BASE_URL``); an unknown scheme is an error."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(Path(parts.netloc + parts.path), base_url)
    if parts.scheme == "s3":
        from pixelmill.s3_storage import S3Location, S3Storage

        try:
            return S3Storage(S3Location.from_url(url), base_url)
        except ValueError as exc:
            raise ValueError(f"PIXELMILL_STORAGE_URL={url!r}: {exc}") from exc
    raise ValueError(
        f"PIXELMILL_STORAGE_URL={url!r}: unsupported scheme {parts.scheme!r}; "
        "use file:///path/to/folder or s3://bucket/prefix"
    )
