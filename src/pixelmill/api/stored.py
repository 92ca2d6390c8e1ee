"""Answers that carry a stored object: a local file as is, any other object streamed
from its storage (an S3 bucket need not be public for its files to be served).

Only what pixelmill itself stores is served (``<request id>/<row>-<position>.<ext>``
and ``<request id>/output.csv``), with the type its name says: a bucket may hold other
things under the same prefix, and they are not the API's to show.
"""

from __future__ import annotations

import logging
import re

from starlette.background import BackgroundTask
from starlette.concurrency import iterate_in_threadpool
from starlette.responses import FileResponse, Response, StreamingResponse

from pixelmill.api.errors import ApiError
from pixelmill.imaging.formats import OUTPUT_EXTENSIONS, content_type, format_of
from pixelmill.storage import Storage, StorageError

log = logging.getLogger(__name__)

# Stored bytes came from the internet: a browser must take them for the type they are
# served as (an image, a CSV), never sniff them into a page.
NO_SNIFFING = {"X-Content-Type-Options": "nosniff"}
CSV_TYPE = "text/csv; charset=utf-8"
_SERVED_KEY = re.compile(
    rf"[0-9a-f]{{32}}/(?:\d+-\d+\.(?:{'|'.join(OUTPUT_EXTENSIONS)})|output\.csv)"
)


async def stored_object(storage: Storage, key: str, filename: str | None = None) -> Response:
    """The object under ``key``: 404 when there is none or it is not one of pixelmill's
    objects, 502 when the storage fails (the detail goes to the log, not the caller)."""
    if not _SERVED_KEY.fullmatch(key):
        raise ApiError(404, "not_found", f"no stored file {key!r}")
    extension = key.rsplit(".", 1)[1]
    media_type = CSV_TYPE if extension == "csv" else content_type(format_of(extension))
    try:
        path = storage.local_path(key)
        if path is not None:
            if not path.is_file():
                raise ApiError(404, "not_found", f"no stored file {key!r}")
            return FileResponse(path, media_type=media_type, filename=filename, headers=NO_SNIFFING)
        stream = await storage.open(key)
    except StorageError as exc:
        log.warning("serving %s failed: %s", key, exc)
        raise ApiError(502, "storage_error", f"the storage could not be read for {key!r}") from exc
    if stream is None:
        raise ApiError(404, "not_found", f"no stored file {key!r}")
    headers = {**NO_SNIFFING, "Content-Length": str(stream.size)}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    # The object is released once the answer ends, however it ends: the background
    # task runs after a client that left mid-way too (closing twice does no harm).
    return StreamingResponse(
        iterate_in_threadpool(stream.chunks),
        media_type=media_type,
        headers=headers,
        background=BackgroundTask(stream.close),
    )
