"""Counting the writes into a storage folder as they happen, with inotify (Linux).

Files at the end cannot tell a write from two. :class:`WriteCounter` watches a folder
and every folder made in it, and counts, per object key, each file renamed into place
(``IN_MOVED_TO``, how ``LocalStorage`` writes) and each file written in place
(``IN_CLOSE_WRITE`` on a name that is not a temporary file).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import threading
import uuid
from collections import Counter
from pathlib import Path

from tests.support.waiting import wait_until

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")
_TEMPORARY_PREFIXES = (".tmp-",)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class WriteCounter:
    """Counts writes per key (path relative to ``root``) from the moment it starts.

    Folders must exist before anything is written into them to be counted whole:
    a folder made later is watched from when its creation is seen, and listed in
    ``late_folders``.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.writes: Counter[str] = Counter()
        self.late_folders: list[str] = []
        self.overflowed = False
        self._seen_markers: set[str] = set()
        self._made: set[Path] = set()
        self._folders: dict[int, Path] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._thread = threading.Thread(target=self._read_forever, daemon=True)

    def start(self) -> WriteCounter:
        self.root.mkdir(parents=True, exist_ok=True)
        self.watch(self.root)
        self._thread.start()
        return self

    def watch(self, folder: Path) -> None:
        """Watch one more (existing) folder under ``root``."""
        mask = IN_MOVED_TO | IN_CLOSE_WRITE | IN_CREATE
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(folder), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch({folder}) failed")
        with self._lock:
            self._folders[wd] = folder

    def make_folder(self, relative: str) -> Path:
        """Make a folder under ``root`` and watch it, before anything is written there."""
        folder = self.root / relative
        self._made.add(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.watch(folder)
        return folder

    def settle(self, timeout: float = 30) -> None:
        """Return once every event before this call has been counted."""
        marker = self.root / f".tmp-settle-{uuid.uuid4().hex}"
        marker.write_bytes(b"")
        name = marker.name
        wait_until(lambda: name in self._seen_markers, timeout=timeout, what="inotify to settle")
        marker.unlink()

    def counts(self, prefix: str = "") -> Counter[str]:
        """Writes per key, for the keys under ``prefix``."""
        self.settle()
        with self._lock:
            return Counter({k: n for k, n in self.writes.items() if k.startswith(prefix)})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        os.close(self._fd)

    def _read_forever(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                continue
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            name = data[offset : offset + length].rstrip(b"\0").decode()
            offset += length
            if mask & IN_Q_OVERFLOW:
                self.overflowed = True
                continue
            with self._lock:
                folder = self._folders.get(wd)
            if folder is None or not name:
                continue
            path = folder / name
            if mask & IN_ISDIR:
                if mask & IN_CREATE and path not in self._made:
                    self.watch(path)
                    self.late_folders.append(str(path.relative_to(self.root)))
                continue
            if name.startswith(_TEMPORARY_PREFIXES):
                if name.startswith(".tmp-settle-") and mask & IN_CLOSE_WRITE:
                    self._seen_markers.add(name)
                continue
            if mask & (IN_MOVED_TO | IN_CLOSE_WRITE):
                with self._lock:
                    self.writes[str(path.relative_to(self.root))] += 1
