"""Answers that carry a stored object: a local file as is, any other object streamed
from its storage (an S3 bucket need not be public for its files to be served)."""

from __future__ import annotations

import mimetypes

from starlette.responses import FileResponse, Response, StreamingResponse

from pixelmill.api.errors import ApiError
from pixelmill.storage import InvalidKeyError, Storage, StorageError

NO_SNIFFING = {"X-Content-Type-Options": "nosniff"}


async def stored_object(
    storage: Storage, key: str, media_type: str | None = None, filename: str | None = None
) -> Response:
    """The object under ``key``: 404 when there is none, 502 when the storage fails."""
    try:
        path = storage.local_path(key)
        if path is not None:
            if not path.is_file():
                raise ApiError(404, "not_found", f"no stored file {key!r}")
            return FileResponse(path, media_type=media_type, filename=filename, headers=NO_SNIFFING)
        stream = await storage.open(key)
    except InvalidKeyError as exc:
        raise ApiError(404, "not_found", f"no stored file {key!r}") from exc
    except StorageError as exc:
        raise ApiError(502, "storage_error", str(exc)) from exc
    if stream is None:
        raise ApiError(404, "not_found", f"no stored file {key!r}")
    headers = {**NO_SNIFFING, "Content-Length": str(stream.size)}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    guessed = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return StreamingResponse(
        stream.chunks, media_type=media_type or stream.content_type or guessed, headers=headers
    )
