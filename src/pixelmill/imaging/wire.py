"""The JSON of ``POST /v1/process``, shared by the imaging service and its client.

Request: ``{"source_url", "options": {"quality", "max_width", "max_height", "format"},
"output_key"}``, where ``output_key`` is the stem (the service adds the extension).
Answer (always HTTP 200 once the service has judged the image): the fields of
:class:`ProcessedImage`, or ``{"error": {"code", "message", "transient", "retry_after"}}``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from pixelmill.domain import (
    ErrorCode,
    ImageFailure,
    ImageOutcome,
    ProcessedImage,
    ProcessingOptions,
)

PROCESS_PATH = "/v1/process"
_RESULT_FIELDS = tuple(field.name for field in dataclasses.fields(ProcessedImage))
_RESULT_TYPES = typing.get_type_hints(ProcessedImage)
_CODES = frozenset(code.value for code in ErrorCode)


def request_body(source_url: str, options: ProcessingOptions, output_stem: str) -> dict[str, Any]:
    """The body the client posts for one image."""
    return {"source_url": source_url, "options": options.as_dict(), "output_key": output_stem}


def outcome_to_json(outcome: ImageOutcome) -> dict[str, Any]:
    """The body the service answers for one image."""
    if isinstance(outcome, ImageFailure):
        return {
            "error": {
                "code": outcome.code.value,
                "message": outcome.message,
                "transient": outcome.is_transient,
                # JSON has no infinity: an unbounded wait is no stated wait.
                "retry_after": (
                    outcome.retry_after
                    if outcome.retry_after is None or math.isfinite(outcome.retry_after)
                    else None
                ),
            }
        }
    return dataclasses.asdict(outcome)


def outcome_from_json(body: object) -> ImageOutcome:
    """The outcome in a service's answer; ``ValueError`` when the body is not one."""
    if not isinstance(body, dict):
        raise ValueError(f"expected a JSON object, got {type(body).__name__}")
    error = body.get("error")
    if isinstance(error, dict):
        return _failure_from_json(error)
    try:
        values = {name: body[name] for name in _RESULT_FIELDS}
    except KeyError as exc:
        raise ValueError(f"not an imaging result: missing {exc}") from None
    wrong = [name for name, value in values.items() if not _of_type(value, _RESULT_TYPES[name])]
    if wrong:
        raise ValueError(f"not an imaging result: wrong type of {', '.join(wrong)}")
    return ProcessedImage(**values)


def _of_type(value: object, expected: Any) -> bool:
    """Whether a JSON value fits a field's type: a float may come as a whole number,
    and a bool is not a number."""
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _failure_from_json(error: dict[str, Any]) -> ImageFailure:
    try:
        name, message, transient = str(error["code"]), str(error["message"]), error["transient"]
    except KeyError as exc:
        raise ValueError(f"not an imaging error: missing {exc}") from None
    if name in _CODES:
        code = ErrorCode(name)
    else:  # a newer service: keep its word on retrying, under a code this side knows
        code, message = ErrorCode.INTERNAL_ERROR, f"{name}: {message}"
    retry_after = error.get("retry_after")
    if retry_after is not None and not _of_type(retry_after, float):
        raise ValueError(f"not an imaging error: retry_after is {retry_after!r}")
    return ImageFailure(
        code,
        message,
        transient=bool(transient),
        retry_after=float(retry_after) if retry_after is not None else None,
    )
