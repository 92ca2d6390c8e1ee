"""API errors as JSON: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

import logging
import socket
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException

from pixelmill.csvio import CsvRejected
from pixelmill.db.engine import is_transient

log = logging.getLogger(__name__)

# Seconds a client is asked to wait before it tries again while the database is away.
DATABASE_RETRY_AFTER = 5


class ApiError(Exception):
    """An error answered to the client with a stable code."""

    def __init__(
        self, status: int, code: str, message: str, details: list[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []


def error_response(
    status: int, code: str, message: str, details: list[Any] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "details": details or []}
    body.update(extra)
    return JSONResponse({"error": body}, status_code=status)


def not_found(request_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no request {request_id!r}")


def invalid_request(exc: RequestValidationError) -> JSONResponse:
    """The ``422 invalid_request`` answer, one detail per field in error."""
    details = [
        {"field": ".".join(str(p) for p in err["loc"]), "message": err["msg"]}
        for err in exc.errors()
    ]
    return error_response(422, "invalid_request", "the request is not valid", details)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error in the same JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(CsvRejected)
    async def _csv_rejected(_request: Request, exc: CsvRejected) -> JSONResponse:
        return error_response(
            exc.status,
            exc.code,
            exc.message,
            [problem.as_dict() for problem in exc.problems],
            total_problems=exc.total_problems,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    # What reaching the database raises once its own retries are spent: the driver's
    # errors, a pool with no connection to give, or the network (asyncpg connects with
    # plain sockets, whose errors come through unwrapped).
    for away in (DBAPIError, PoolTimeoutError, ConnectionError, socket.gaierror, TimeoutError):
        app.add_exception_handler(away, _database_away)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        return _internal_error()  # Starlette logs the traceback after this answer is sent


def _internal_error() -> JSONResponse:
    return error_response(500, "internal_error", "an unexpected error; it was logged")


async def _database_away(request: Request, exc: Exception) -> JSONResponse:
    """``503 database_unavailable`` when the database cannot be reached; any other
    database error is a bug, answered ``500 internal_error`` and logged."""
    if isinstance(exc, DBAPIError) and not is_transient(exc):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _internal_error()
    log.warning("%s %s: the database is unavailable: %r", request.method, request.url.path, exc)
    response = error_response(
        503, "database_unavailable", "the database is unavailable; try again shortly"
    )
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER)
    return response
