"""An S3-compatible server for tests: moto's server mode, in a subprocess on loopback.

It speaks the S3 REST protocol over HTTP, as AWS S3 and MinIO do; pixelmill reaches
it through boto3 like any other endpoint. It keeps its objects in memory.
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

from tests.support.server import ServerOnPort

# Any key will do for this server; the SDK only insists that there is one.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "pixelmill-test",
    "AWS_SECRET_ACCESS_KEY": "pixelmill-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server(ServerOnPort):
    """One server on a free loopback port."""

    name = "the S3 server"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        self._spawn([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)])
        return self

    def client(self) -> Any:
        """A boto3 client of this server, to look at what pixelmill stored."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def new_bucket(self) -> str:
        """A bucket of the caller's own."""
        name = f"pixelmill-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def storage_url(self, bucket: str, prefix: str = "images") -> str:
        """PIXELMILL_STORAGE_URL of ``bucket`` on this server."""
        return f"s3://{bucket}/{prefix}?endpoint_url={self.endpoint}"
