"""API errors as JSON: ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pixelmill.csvio import CsvRejected


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
