"""Start-up failures said in one line: which part, at which address, and why.

A process that cannot reach its database or its broker at start is misconfigured or
early; its operator needs the setting to look at and the driver's own reason, not a
traceback through the libraries.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pixelmill.logs import brief
from pixelmill.storage import Storage, StorageError


class StartupError(Exception):
    """A part of the runtime could not be opened; the message says which and why."""


def without_password(url: str) -> str:
    """``url`` with the password of its user info, if any, shown as ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user_info, _, host = parts.netloc.rpartition("@")
    user = user_info.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def failure(what: str, part: str, url: str, setting: str, exc: BaseException) -> str:
    """E.g. ``cannot reach the queue kafka://b:9092 (PIXELMILL_QUEUE_URL): ...``."""
    why = brief(exc)
    password = urlsplit(url).password
    if password:  # drivers may quote the address they were given whole
        why = why.replace(password, "***")
    return f"{what} the {part} {without_password(url)} ({setting}): {why}"


def database_failure(what: str, url: str, exc: BaseException) -> str:
    """:func:`failure` of the database that ``PIXELMILL_DATABASE_URL`` names."""
    return failure(what, "database", url, "PIXELMILL_DATABASE_URL", exc)


async def check_storage(storage: Storage, url: str, *, write: bool = True) -> None:
    """Raise :class:`StartupError` unless ``storage`` can be read (and, with ``write``,
    written to)."""
    try:
        await storage.check(write=write)
    except StorageError as exc:
        raise StartupError(
            failure("cannot use", "storage", url, "PIXELMILL_STORAGE_URL", exc)
        ) from exc
