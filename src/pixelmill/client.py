"""A small client of the HTTP API, used by ``submit``, ``status`` and ``result``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ApiClient:
    """Talks to one pixelmill server; errors are printed and end the command."""

    def __init__(self, server: str, api_key: str | None, console: Console) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=60)
        self.console = console

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            error = {"code": "http_error", "message": response.text[:500]}
        self.console.print(
            f"[red]{response.status_code} {error.get('code')}:[/red] {error.get('message')}"
        )
        for detail in error.get("details", [])[:20]:
            where = f"line {detail.get('line')}" if detail.get("line") else detail.get("field", "")
            column = f", {detail['column']}" if detail.get("column") else ""
            self.console.print(f"  {where}{column}: {detail.get('message')}")
        raise typer.Exit(1)

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._check(self.http.request(method, path, **kwargs))
        except httpx.TransportError as exc:
            self.console.print(f"[red]cannot reach {self.http.base_url}:[/red] {exc}")
            raise typer.Exit(1) from None

    def submit(self, file: Path, webhook: str | None) -> str:
        data = {"webhook_url": webhook} if webhook else {}
        with file.open("rb") as handle:
            response = self._call(
                "POST",
                "/api/v1/requests",
                files={"file": (file.name, handle, "text/csv")},
                data=data,
            )
        body = response.json()
        self.console.print(f"accepted: {body['products']} products, {body['images']} images")
        return str(body["request_id"])

    def status(self, request_id: str) -> dict[str, Any]:
        return dict(self._call("GET", _request_path(request_id)).json())

    def print_status(self, request_id: str) -> None:
        print(json.dumps(self.status(request_id), indent=2))

    def follow(self, request_id: str, interval: float = 0.5) -> int:
        """Show a progress bar until the request finishes; 0 when it completed."""
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console) as bar:
            task = bar.add_task("processing", total=None)
            while True:
                body = self.status(request_id)
                progress = body["progress"]
                done = progress["completed"] + progress["failed"]
                bar.update(
                    task, total=progress["total"], completed=done, description=body["status"]
                )
                if body["finished_at"]:
                    break
                time.sleep(interval)
        self.console.print(
            f"{body['status']}: {progress['completed']} completed, {progress['failed']} failed; "
            f"output CSV: {body['output_csv_url']}"
        )
        return 0 if body["status"] == "completed" else 1

    def download_result(self, request_id: str, output: Path | None) -> None:
        """Stream the output CSV to ``output`` (or stdout), a chunk at a time."""
        path = f"{_request_path(request_id)}/output.csv"
        try:
            with self.http.stream("GET", path, follow_redirects=True) as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                if output is None:
                    for chunk in response.iter_bytes(1 << 16):
                        sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    return
                with output.open("wb") as out:
                    for chunk in response.iter_bytes(1 << 16):
                        out.write(chunk)
        except httpx.TransportError as exc:
            self.console.print(f"[red]cannot reach {self.http.base_url}:[/red] {exc}")
            raise typer.Exit(1) from None
        except OSError as exc:
            self.console.print(f"[red]cannot write {output}:[/red] {exc.strerror or exc}")
            raise typer.Exit(1) from None
        self.console.print(f"wrote {output}")


def _request_path(request_id: str) -> str:
    """The request's path, its id one segment whatever it holds: slashes and ``?`` are
    quoted, and dots too, since a segment of only dots is one that HTTP clients drop
    (``.``) or climb (``..``)."""
    return "/api/v1/requests/" + quote(request_id, safe="").replace(".", "%2E")
