"""The body of the ``request.finished`` event, built from the closed request's row."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pixelmill.db.clock import as_utc

EVENT_FINISHED = "request.finished"


def _timestamp(moment: datetime | None) -> str | None:
    utc = as_utc(moment)
    return utc.isoformat().replace("+00:00", "Z") if utc else None


def finished_message(row: Any) -> str:
    """One line for people: how the request ended."""
    if row.status == "completed":
        message = f"{row.completed} of {row.total} image(s) completed"
        return f"{message}, {row.failed} failed" if row.failed else message
    return str(row.error or f"all {row.failed} image(s) failed")


def finished_event(row: Any, output_csv_url: str | None) -> str:
    """The JSON body sent for a finished request (``row`` has the columns of ``requests``)."""
    event = {
        "type": EVENT_FINISHED,
        "request_id": row.id,
        "status": row.status,
        "progress": {
            "total": row.total,
            "pending": row.pending,
            "processing": row.processing,
            "completed": row.completed,
            "failed": row.failed,
        },
        "output_csv_url": output_csv_url,
        "created_at": _timestamp(row.created_at),
        "finished_at": _timestamp(row.finished_at),
        "message": finished_message(row),
    }
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)
