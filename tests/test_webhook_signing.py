"""Webhook signatures, secrets and the retry schedule, without a network."""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydantic import ValidationError

from pixelmill.config import DEFAULT_WEBHOOK_SCHEDULE, Settings
from pixelmill.webhooks.schedule import MAX_RETRY_AFTER, RetrySchedule
from pixelmill.webhooks.signing import (
    SECRET_FILE,
    WebhookSecretError,
    WebhookSigner,
    load_or_create_secret,
    new_secret,
    parse_secret,
)

# The published test vector of the Standard Webhooks specification.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TIMESTAMP = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_standard_webhooks_vector() -> None:
    signer = WebhookSigner.from_secrets(VECTOR_SECRET)
    assert signer.signature(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY) == VECTOR_SIGNATURE


def test_headers_carry_id_timestamp_and_signature() -> None:
    headers = WebhookSigner.from_secrets(VECTOR_SECRET).headers(
        VECTOR_ID, VECTOR_BODY, VECTOR_TIMESTAMP
    )
    assert headers == {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }


def test_several_secrets_sign_once_each_in_order() -> None:
    other = new_secret()
    signer = WebhookSigner.from_secrets(f"  {other}   {VECTOR_SECRET} ")
    first, second = signer.signature(VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY).split(" ")
    assert second == VECTOR_SIGNATURE
    key = base64.b64decode(other.removeprefix("whsec_"))
    signed = f"{VECTOR_ID}.{VECTOR_TIMESTAMP}.".encode() + VECTOR_BODY
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    assert first == "v1," + base64.b64encode(digest).decode()


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with 'whsec_'"),
        ("whsec_not base64!", "not valid base64"),
        ("whsec_" + base64.b64encode(b"short").decode(), "at least 24 key bytes"),
    ],
)
def test_malformed_secrets_are_refused(secret: str, why: str) -> None:
    with pytest.raises(WebhookSecretError, match=why):
        parse_secret(secret)


def test_settings_refuse_a_malformed_secret_when_built(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="whsec_"):
        Settings(data_dir=tmp_path, webhook_secret=f"{VECTOR_SECRET} oops")
    assert Settings(data_dir=tmp_path, webhook_secret=f"{VECTOR_SECRET} {new_secret()}")


def test_new_secrets_are_random_and_long_enough() -> None:
    secrets = {new_secret() for _ in range(20)}
    assert len(secrets) == 20
    assert all(len(parse_secret(secret)) == 32 for secret in secrets)


def test_the_generated_secret_is_kept_private_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    secret = load_or_create_secret(data_dir)
    path = data_dir / SECRET_FILE
    assert path.read_text().strip() == secret
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(data_dir) == secret
    assert sorted(p.name for p in data_dir.iterdir()) == [SECRET_FILE], "no temp file left"


def test_processes_racing_to_create_the_secret_agree(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: load_or_create_secret(tmp_path), range(32)))
    assert len(secrets) == 1


def test_the_schedule_setting_accepts_units(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, webhook_schedule="5s, 2m 1.5h,3d,0.25")
    assert settings.webhook_schedule == [5, 120, 5400, 259200, 0.25]
    assert Settings(data_dir=tmp_path).webhook_schedule == list(DEFAULT_WEBHOOK_SCHEDULE)
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, webhook_schedule="5,0")
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, webhook_schedule="soon")


def test_the_default_schedule_spans_about_three_days() -> None:
    total = sum(DEFAULT_WEBHOOK_SCHEDULE)
    assert DEFAULT_WEBHOOK_SCHEDULE[:8] == (5, 30, 120, 600, 1800, 3600, 10800, 21600)
    assert 2.5 * 86400 < total < 3.5 * 86400


def test_delays_follow_the_schedule_with_jitter_then_give_up() -> None:
    schedule = RetrySchedule([10, 100], jitter=0.2)
    assert schedule.max_attempts == 3
    for _ in range(50):
        assert 8 <= (schedule.delay(1) or 0) <= 12
        assert 80 <= (schedule.delay(2) or 0) <= 120
    assert schedule.delay(3) is None
    spread = {schedule.delay(1) for _ in range(20)}
    assert len(spread) > 1, "jittered"


def test_retry_after_wins_when_longer_up_to_a_day() -> None:
    schedule = RetrySchedule([10, 100], jitter=0)
    assert schedule.delay(1, retry_after=60) == 60
    assert schedule.delay(1, retry_after=1) == 10
    assert schedule.delay(1, retry_after=10 * MAX_RETRY_AFTER) == MAX_RETRY_AFTER
    assert schedule.delay(3, retry_after=5) is None, "no attempt left, whatever it asks"


def _documented_receiver() -> dict[str, object]:
    """The Python receiver of docs/webhooks.md, run as written (not as __main__)."""
    text = (Path(__file__).parents[1] / "docs" / "webhooks.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, object] = {"__name__": "documented_receiver"}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)
    return namespace


def test_the_documented_receiver_verifies_pixelmill_signatures() -> None:
    verify = _documented_receiver()["verify"]
    assert callable(verify)
    vector = {
        "webhook-id": VECTOR_ID,
        "webhook-timestamp": str(VECTOR_TIMESTAMP),
        "webhook-signature": VECTOR_SIGNATURE,
    }
    assert verify(vector, VECTOR_BODY, [VECTOR_SECRET], now=VECTOR_TIMESTAMP + 10)
    assert not verify(vector, VECTOR_BODY, [VECTOR_SECRET]), "too old now"

    current, old = new_secret(), new_secret()
    body = b'{"type":"request.finished"}'
    headers = WebhookSigner.from_secrets(f"{current} {old}").headers("msg_1", body)
    assert verify(headers, body, [old])
    assert verify(headers, body, [current])
    assert not verify(headers, body, [new_secret()])
    assert not verify(headers, body + b" ", [current])
    assert not verify({**headers, "webhook-timestamp": "soon"}, body, [current])
