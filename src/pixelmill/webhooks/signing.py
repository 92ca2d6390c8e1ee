"""Standard Webhooks signatures, and the secrets that make them.

A secret is ``whsec_`` followed by the base64 of the key bytes. Several secrets,
separated by spaces, sign every message once each (key rotation: receivers accept any
of them). With ``PIXELMILL_WEBHOOK_SECRET`` unset, one secret is generated the first
time it is needed and kept in ``<data dir>/webhook_secret`` (mode 0600), so every
process on that data dir and every restart signs with the same key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SECRET_PREFIX = "whsec_"
SECRET_FILE = "webhook_secret"
MIN_KEY_BYTES = 24  # the Standard Webhooks specification asks for 24 to 64 bytes
NEW_KEY_BYTES = 32


class WebhookSecretError(ValueError):
    """A webhook secret is not ``whsec_`` + base64 of at least 24 bytes."""


def parse_secret(secret: str) -> bytes:
    """The key bytes of one ``whsec_...`` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookSecretError(
            f"a webhook secret starts with {SECRET_PREFIX!r} followed by base64 key bytes"
        )
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookSecretError("a webhook secret is not valid base64 after 'whsec_'") from None
    if len(key) < MIN_KEY_BYTES:
        raise WebhookSecretError(
            f"a webhook secret must hold at least {MIN_KEY_BYTES} key bytes, not {len(key)}"
        )
    return key


def parse_secrets(value: str) -> list[bytes]:
    """The keys of space-separated secrets, in order (the first one is the current key)."""
    keys = [parse_secret(secret) for secret in value.split()]
    if not keys:
        raise WebhookSecretError("no webhook secret given")
    return keys


def new_secret() -> str:
    """A fresh random secret, as ``whsec_`` + base64."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(NEW_KEY_BYTES)).decode()


def load_or_create_secret(data_dir: Path) -> str:
    """The secret kept in ``data_dir``; created (0600) when absent, once even across processes."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=data_dir, prefix=f".{SECRET_FILE}-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as out:
                out.write(new_secret() + "\n")
                out.flush()
                os.fsync(out.fileno())
            # A hard link appears whole or not at all, and never replaces another
            # process's secret: the first process to link wins, the others read it.
            with contextlib.suppress(FileExistsError):
                os.link(name, path)
        finally:
            os.unlink(name)
    secret = path.read_text().strip()
    parse_secrets(secret)
    return secret


@dataclass(frozen=True)
class WebhookSigner:
    """Signs message bodies with every key it holds."""

    keys: tuple[bytes, ...]

    @classmethod
    def from_secrets(cls, value: str) -> WebhookSigner:
        return cls(tuple(parse_secrets(value)))

    def signature(self, message_id: str, timestamp: int, body: bytes) -> str:
        """The ``webhook-signature`` header: ``v1,<base64>`` per key, space-separated."""
        signed = f"{message_id}.{timestamp}.".encode() + body
        return " ".join(
            "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            for key in self.keys
        )

    def headers(self, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The three Standard Webhooks headers of one attempt (signed now by default)."""
        moment = int(time.time()) if timestamp is None else timestamp
        return {
            "webhook-id": message_id,
            "webhook-timestamp": str(moment),
            "webhook-signature": self.signature(message_id, moment, body),
        }
