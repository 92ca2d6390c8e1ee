"""Where processed images and output CSVs are kept, behind one small interface.

``file://DIR`` keeps them under a folder, served by the API at ``/files/{key}``;
other schemes (``s3://``) plug in through :func:`open_storage`.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")


class StorageError(Exception):
    """Storing or reading an object failed."""


class Storage(Protocol):
    """Objects by key; every write is whole and idempotent (same key, same bytes)."""

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None: ...

    async def put_file(self, key: str, path: Path, content_type: str) -> None: ...

    def url_for(self, key: str) -> str: ...

    def local_path(self, key: str) -> Path | None:
        """The file behind ``key`` when the storage is local, else None."""
        ...


def check_key(key: str) -> str:
    """Refuse keys that could escape the storage root (``..``, absolute paths)."""
    if not _SAFE_KEY.match(key) or ".." in key.split("/") or "//" in key:
        raise StorageError(f"invalid storage key {key!r}")
    return key


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

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        await asyncio.to_thread(self._write, self.local_path(key), data)

    async def put_file(self, key: str, path: Path, content_type: str) -> None:
        target = self.local_path(key)
        await asyncio.to_thread(self._move_or_copy, path, target)

    @staticmethod
    def _write(target: Path, data: bytes | Path) -> None:
        """Write ``data`` (bytes, or the file at that path, copied in chunks) to ``target``."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as handle:
                if isinstance(data, Path):
                    with data.open("rb") as source:
                        shutil.copyfileobj(source, handle, 1 << 20)
                else:
                    handle.write(data)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; stored objects are public
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc

    @staticmethod
    def _move_or_copy(source: Path, target: Path) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(source, 0o644)
            os.replace(source, target)
        except OSError:  # another file system: copied, never read into memory whole
            LocalStorage._write(target, source)


def open_storage(url: str, public_url: str) -> Storage:
    """The storage named by ``PIXELMILL_STORAGE_URL``; an unknown scheme is an error."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalStorage(Path(parts.netloc + parts.path), f"{public_url}/files")
    raise ValueError(
        f"PIXELMILL_STORAGE_URL={url!r}: unsupported scheme {parts.scheme!r}; "
        "use file:///path/to/folder"
    )
