"""Receiving an upload: the CSV body to a temporary file, the options validated.

Two shapes are accepted: ``multipart/form-data`` with a ``file`` part and option
fields, or a raw ``text/csv`` body with the options as query parameters. The body is
counted as it arrives and cut off at ``PIXELMILL_MAX_UPLOAD_BYTES``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from pixelmill.api.errors import ApiError
from pixelmill.api.schemas import UploadOptions
from pixelmill.imaging.addresses import AddressPolicy
from pixelmill.webhooks.sender import literal_refusal, resolved_refusal

# Bodies read as raw CSV: what clients and browsers send for a .csv file, or nothing.
_RAW_CSV_TYPES = frozenset(
    {"", "text/csv", "text/plain", "application/csv", "application/vnd.ms-excel",
     "application/octet-stream"}
)  # fmt: skip
_OPTION_FIELDS = ("webhook_url", "quality", "max_width", "max_height", "format")


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "upload_too_large",
        f"the upload is larger than {limit} bytes (PIXELMILL_MAX_UPLOAD_BYTES); "
        "split the CSV into several uploads",
    )


def parse_options(raw: dict[str, Any], *, allow_private: bool) -> UploadOptions:
    """Validate upload options, including the webhook URL's address rules."""
    values = {key: raw[key] for key in _OPTION_FIELDS if raw.get(key) not in (None, "")}
    try:
        options = UploadOptions.model_validate(values)
    except ValidationError as exc:
        details = [
            {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
            for err in exc.errors()
        ]
        raise ApiError(422, "invalid_options", "invalid upload options", details) from None
    if options.webhook_url:
        _refuse_webhook(literal_refusal(options.webhook_url, AddressPolicy(allow_private)))
    return options


async def check_webhook_host(options: UploadOptions, *, allow_private: bool) -> None:
    """Refuse a webhook host name that resolves to addresses the policy forbids."""
    if options.webhook_url:
        policy = AddressPolicy(allow_private)
        _refuse_webhook(await resolved_refusal(options.webhook_url, policy))


def _refuse_webhook(reason: str | None) -> None:
    if reason:
        raise ApiError(
            422,
            "invalid_webhook_url",
            f"webhook_url is not acceptable: {reason}",
            [{"field": "webhook_url", "message": reason}],
        )


async def _copy_stream(chunks: AsyncIterator[bytes], target: Path, limit: int) -> None:
    size = 0
    with target.open("wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            out.write(chunk)


def _copy_upload(upload: UploadFile, target: Path, limit: int) -> None:
    upload.file.seek(0, os.SEEK_END)
    if upload.file.tell() > limit:
        raise _too_large(limit)
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1024 * 1024)


@asynccontextmanager
async def received_upload(
    request: Request, *, max_bytes: int, allow_private: bool
) -> AsyncIterator[tuple[Path, UploadOptions]]:
    """The uploaded CSV as a temporary file, and its options; the file is removed after."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        raise _too_large(max_bytes)
    fd, name = tempfile.mkstemp(prefix="pixelmill-upload-", suffix=".csv")
    os.close(fd)
    path = Path(name)
    try:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type == "multipart/form-data":
            options = await _receive_multipart(request, path, max_bytes, allow_private)
        elif media_type not in _RAW_CSV_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"a {media_type} body is not a CSV upload: send the CSV as a multipart "
                "'file' part (curl -F file=@products.csv) or as a text/csv body",
            )
        else:
            options = parse_options(dict(request.query_params), allow_private=allow_private)
            await check_webhook_host(options, allow_private=allow_private)
            await _copy_stream(request.stream(), path, max_bytes)
        yield path, options
    finally:
        path.unlink(missing_ok=True)


async def _receive_multipart(
    request: Request, path: Path, max_bytes: int, allow_private: bool
) -> UploadOptions:
    try:
        form = await request.form(max_files=1, max_fields=20)
    except HTTPException as exc:  # how Starlette reports a multipart body it cannot read
        raise ApiError(
            400,
            "invalid_multipart",
            f"the multipart body cannot be read: {str(exc.detail).rstrip('.')}; "
            "send one 'file' part (-F file=@products.csv) and the options as plain fields",
        ) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                422,
                "missing_file",
                "the multipart body has no 'file' part; send the CSV as -F file=@products.csv",
            )
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        options = parse_options(
            {**dict(request.query_params), **fields}, allow_private=allow_private
        )
        await check_webhook_host(options, allow_private=allow_private)
        _copy_upload(upload, path, max_bytes)
    finally:
        await form.close()
    return options
