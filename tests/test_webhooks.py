"""Webhooks end to end: a real ``pixelmill serve`` calling a real receiver on loopback.

Signatures are checked here by an independent implementation of Standard Webhooks
(hmac, hashlib, base64), never by pixelmill's own code.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trustme

from pixelmill.api.schemas import WebhookOut
from pixelmill.config import Settings
from pixelmill.csvio import CsvLimits
from pixelmill.db import deliveries
from pixelmill.db.ingest import stage_request
from pixelmill.db.queries import get_request
from pixelmill.domain import ProcessingOptions
from pixelmill.imaging.addresses import AddressPolicy
from pixelmill.runtime import Runtime
from pixelmill.webhooks.sender import WebhookSender, literal_refusal
from pixelmill.webhooks.signing import new_secret
from tests.support.image_host import ImageHost
from tests.support.receiver import Call, Reply, WebhookReceiver
from tests.support.resolver import StaticResolver
from tests.support.server import ServeProcess
from tests.support.tls import server_context, trusting
from tests.support.waiting import async_wait_until, wait_until

SECRET = new_secret()
OLD_SECRET = new_secret()
FAST = {
    "PIXELMILL_WEBHOOK_SCHEDULE": "0.3,0.3",  # three attempts in all
    "PIXELMILL_WEBHOOK_TIMEOUT": "1",
}
SETTLED = ("delivered", "failed")


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {**FAST, "PIXELMILL_WEBHOOK_SECRET": f"{SECRET} {OLD_SECRET}"}
    process = ServeProcess(tmp_path_factory.mktemp("serve"), env=env).start()
    yield process
    process.stop()


def csv_body(image_url: str) -> bytes:
    return f'S. No.,Product Name,Input Image Urls\n1,Mug,"{image_url}"\n'.encode()


def upload(server: ServeProcess, image_url: str, webhook_url: str | None, **kwargs: Any) -> str:
    data = {"webhook_url": webhook_url} if webhook_url else {}
    response = server.post(
        "/api/v1/requests",
        files={"file": ("p.csv", csv_body(image_url), "text/csv")},
        data=data,
        **kwargs,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["request_id"])


def webhook(server: ServeProcess, request_id: str) -> dict[str, Any]:
    return dict(server.get(f"/api/v1/requests/{request_id}").json()["webhook"])


def wait_settled(server: ServeProcess, request_id: str, timeout: float = 30) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        hook = webhook(server, request_id)
        return hook if hook["state"] in SETTLED else None

    return wait_until(settled, timeout=timeout, interval=0.1, what=f"webhook of {request_id}")


def verified(call: Call, secret: str) -> bool:
    """Standard Webhooks verification, written here from the specification."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{call.headers['webhook-id']}.{call.headers['webhook-timestamp']}.".encode()
    digest = hmac.new(key, signed + call.body, hashlib.sha256).digest()
    expected = base64.b64encode(digest).decode()
    return any(
        hmac.compare_digest(signature.removeprefix("v1,"), expected)
        for signature in call.headers["webhook-signature"].split(" ")
        if signature.startswith("v1,")
    )


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_a_receiver_down_for_a_while_gets_the_signed_event(
    server: ServeProcess, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    receiver.answer("down-then-up", Reply(503), Reply(503))
    request_id = upload(server, image_host.url("img/cat.jpg?hook=1"), receiver.url("down-then-up"))

    hook = wait_settled(server, request_id)
    assert hook["state"] == "delivered", hook
    assert hook["attempts"] == 3 and hook["last_status_code"] == 200
    assert hook["last_error"] is None and hook["next_attempt_at"] is None
    assert hook["delivered_at"] is not None

    calls = receiver.calls("down-then-up")
    assert len(calls) == 3
    assert len({call.headers["webhook-id"] for call in calls}) == 1, "one id on every retry"
    assert len({call.body for call in calls}) == 1, "the same body on every retry"
    for call in calls:
        assert call.method == "POST" and call.headers["content-type"] == "application/json"
        assert call.headers["user-agent"].startswith("pixelmill/")
        assert abs(int(call.headers["webhook-timestamp"]) - call.at) < 5, "signed when sent"
        assert len(call.headers["webhook-signature"].split(" ")) == 2, "one per secret"
        assert verified(call, SECRET) and verified(call, OLD_SECRET)
        assert not verified(call, new_secret())
        tampered = Call(
            call.path, call.method, call.headers, call.body.replace(b"completed", b"failed"), 0
        )
        assert not verified(tampered, SECRET)

    status = server.get(f"/api/v1/requests/{request_id}").json()
    event = calls[0].json()
    assert event == {
        "type": "request.finished",
        "request_id": request_id,
        "status": "completed",
        "progress": status["progress"],
        "output_csv_url": status["output_csv_url"],
        "created_at": event["created_at"],
        "finished_at": event["finished_at"],
        "message": "1 of 1 image(s) completed",
    }
    assert _moment(event["created_at"]) == _moment(status["created_at"])
    assert _moment(event["finished_at"]) == _moment(status["finished_at"])


def test_a_receiver_that_hangs_times_out_and_is_retried(
    server: ServeProcess, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    receiver.answer("hangs", *[Reply(hang=True)] * 3)
    request_id = upload(server, image_host.url("img/cat.jpg?hook=2"), receiver.url("hangs"))
    hook = wait_settled(server, request_id)
    assert hook["state"] == "failed", hook
    assert hook["attempts"] == 3 and len(receiver.calls("hangs")) == 3
    assert hook["last_status_code"] is None
    assert "timeout" in hook["last_error"] and "1 s" in hook["last_error"]
    assert hook["next_attempt_at"] is None and hook["delivered_at"] is None


def test_410_gone_stops_the_attempts(
    server: ServeProcess, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    receiver.answer("gone", Reply(410), Reply(410), Reply(410))
    request_id = upload(server, image_host.url("img/cat.jpg?hook=3"), receiver.url("gone"))
    hook = wait_settled(server, request_id)
    assert hook["state"] == "failed" and hook["attempts"] == 1
    assert hook["last_status_code"] == 410 and "410" in hook["last_error"]
    # A later request goes all the way through; the gone one was not tried again meanwhile.
    later = upload(server, image_host.url("img/cat.jpg?hook=3b"), receiver.url("after-gone"))
    assert wait_settled(server, later)["state"] == "delivered"
    assert len(receiver.calls("gone")) == 1
    assert webhook(server, request_id)["attempts"] == 1


def test_a_redirect_is_a_failure_and_is_not_followed(
    server: ServeProcess, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    target = receiver.url("moved-here")
    receiver.answer("moved", *[Reply(302, {"Location": target})] * 3)
    request_id = upload(server, image_host.url("img/cat.jpg?hook=4"), receiver.url("moved"))
    hook = wait_settled(server, request_id)
    assert hook["state"] == "failed" and hook["attempts"] == 3
    assert hook["last_status_code"] == 302
    assert "redirects are not followed" in hook["last_error"] and target in hook["last_error"]
    assert len(receiver.calls("moved")) == 3
    assert receiver.calls("moved-here") == []


def test_retry_after_is_honoured(
    server: ServeProcess, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    receiver.answer("busy", Reply(503, {"Retry-After": "2"}))
    request_id = upload(server, image_host.url("img/cat.jpg?hook=5"), receiver.url("busy"))
    hook = wait_settled(server, request_id)
    assert hook["state"] == "delivered" and hook["attempts"] == 2
    first, second = receiver.calls("busy")
    assert second.at - first.at >= 1.9, "waited as asked, not the 0.3 s of the schedule"


def test_redeliver_sends_the_same_event_again(
    server: ServeProcess, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    url = receiver.url("again", host="localhost")  # a host name, resolved when connecting
    request_id = upload(server, image_host.url("img/cat.jpg?hook=6"), url)
    assert wait_settled(server, request_id)["state"] == "delivered"

    response = server.post(f"/api/v1/requests/{request_id}/webhook/redeliver")
    assert response.status_code == 202, response.text
    assert response.json()["url"] == url and response.json()["attempts"] <= 1
    wait_until(lambda: len(receiver.calls("again")) == 2, timeout=10, what="the redelivery")
    hook = wait_settled(server, request_id)
    assert hook["state"] == "delivered" and hook["attempts"] == 1, "a fresh schedule"
    first, second = receiver.calls("again")
    assert first.headers["webhook-id"] == second.headers["webhook-id"] and first.body == second.body
    assert verified(second, SECRET)


def test_redeliver_refusals_and_the_webhook_before_the_finish(
    server: ServeProcess, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    unknown = server.post("/api/v1/requests/0123456789abcdef/webhook/redeliver")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"

    plain = upload(server, image_host.url("img/cat.jpg?hook=7"), None)
    server.wait_finished(plain)
    assert server.get(f"/api/v1/requests/{plain}").json()["webhook"] is None
    no_hook = server.post(f"/api/v1/requests/{plain}/webhook/redeliver")
    assert no_hook.status_code == 422 and no_hook.json()["error"]["code"] == "no_webhook"

    slow = upload(server, image_host.url("slow/3000/cat.jpg?hook=7"), receiver.url("slow"))
    assert webhook(server, slow) == {
        "url": receiver.url("slow"),
        "state": "pending",
        "attempts": 0,
        "last_status_code": None,
        "last_error": None,
        "next_attempt_at": None,
        "delivered_at": None,
    }
    early = server.post(f"/api/v1/requests/{slow}/webhook/redeliver")
    assert early.status_code == 409 and early.json()["error"]["code"] == "not_finished"
    assert wait_settled(server, slow)["state"] == "delivered"
    assert len(receiver.calls("slow")) == 1


def test_delivery_resumes_after_a_restart_with_the_kept_secret(
    tmp_path: Path, receiver: WebhookReceiver, image_host: ImageHost
) -> None:
    env = {**FAST, "PIXELMILL_WEBHOOK_SCHEDULE": "2,2"}
    first = ServeProcess(tmp_path / "serve", env=env).start()
    try:
        receiver.answer("restart", Reply(503))
        request_id = upload(first, image_host.url("img/cat.jpg?hook=8"), receiver.url("restart"))

        def retry_scheduled() -> dict[str, Any] | None:
            hook = webhook(first, request_id)
            return hook if hook["attempts"] == 1 and hook["state"] == "pending" else None

        hook = wait_until(retry_scheduled, timeout=30, what="the first attempt recorded")
        assert hook["last_status_code"] == 503 and hook["next_attempt_at"] is not None
        first.kill9()
    finally:
        first.stop()
    assert len(receiver.calls("restart")) == 1, "killed between the attempts"

    secret_file = tmp_path / "serve" / "webhook_secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    secret = secret_file.read_text().strip()

    second = ServeProcess(tmp_path / "serve", env=env).start()
    try:
        hook = wait_settled(second, request_id)
        assert hook["state"] == "delivered" and hook["attempts"] == 2
    finally:
        second.stop()
    calls = receiver.calls("restart")
    assert len(calls) == 2
    assert secret_file.read_text().strip() == secret, "the secret survives restarts"
    assert all(verified(call, secret) for call in calls)
    assert calls[0].headers["webhook-id"] == calls[1].headers["webhook-id"]


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """Private addresses refused (the default), and two callers with their own keys."""
    env = {"PIXELMILL_ALLOW_PRIVATE_URLS": "false", "PIXELMILL_API_KEYS": "key-one key-two"}
    process = ServeProcess(tmp_path_factory.mktemp("guarded"), env=env).start()
    yield process
    process.stop()


ONE = {"Authorization": "Bearer key-one"}
TWO = {"Authorization": "Bearer key-two"}


@pytest.mark.parametrize(
    ("webhook_url", "why"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://localhost:9/hook", "localhost is a loopback name"),
        ("http://hooks.localhost:9/hook", "hooks.localhost is a loopback name"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest", "metadata"),
        ("http://[::1]:9/hook", "loopback"),
        ("http://2130706433/hook", "loopback"),
        ("ftp://hooks.example/x", "http"),
    ],
)
def test_upload_refuses_a_webhook_on_a_forbidden_address(
    guarded_server: ServeProcess, webhook_url: str, why: str
) -> None:
    body = csv_body("https://img.example/a.jpg")
    multipart = guarded_server.post(
        "/api/v1/requests",
        files={"file": ("p.csv", body, "text/csv")},
        data={"webhook_url": webhook_url},
        headers=ONE,
    )
    raw = guarded_server.post(
        "/api/v1/requests",
        content=body,
        params={"webhook_url": webhook_url},
        headers={**ONE, "Content-Type": "text/csv"},
    )
    for response in (multipart, raw):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_webhook_url"
        assert why in error["message"], error
        assert error["details"][0]["field"] == "webhook_url"
    assert guarded_server.get("/api/v1/requests", headers=ONE).json()["total"] == 0


def test_redeliver_of_someone_elses_request_is_not_found(guarded_server: ServeProcess) -> None:
    response = guarded_server.post(
        "/api/v1/requests",
        files={"file": ("p.csv", csv_body("https://img.example/a.jpg"), "text/csv")},
        headers=ONE,
    )
    assert response.status_code == 202, response.text
    request_id = response.json()["request_id"]
    path = f"/api/v1/requests/{request_id}/webhook/redeliver"
    assert guarded_server.post(path, headers=TWO).status_code == 404
    assert guarded_server.post(path, headers=ONE).status_code == 422, "own request: no webhook"


async def test_the_address_is_checked_again_when_connecting(
    settings: Settings, receiver: WebhookReceiver, image_host: ImageHost, tmp_path: Path
) -> None:
    """Hosts that became private after the upload (DNS changes) are refused at connect time."""
    settings = settings.model_copy(
        update={"allow_private_urls": False, "webhook_schedule": [0.05], "webhook_secret": SECRET}
    )
    runtime = await Runtime.open(settings, migrate=True)
    try:
        request_ids = []
        for n, url in enumerate(
            [receiver.url("by-name", host="localhost"), receiver.url("by-address")]
        ):
            path = tmp_path / f"in{n}.csv"
            path.write_bytes(csv_body(image_host.url(f"img/cat.jpg?hook=9-{n}")))
            accepted = await stage_request(
                runtime.db,
                path,
                options=ProcessingOptions(),
                webhook_url=url,  # stored as an upload that passed the check would be
                owner=None,
                limits=CsvLimits(),
                task_max_images=64,
            )
            request_ids.append(accepted.request_id)
        runtime.start_worker()

        async def failed(request_id: str) -> Any:
            row = await deliveries.get_delivery(runtime.db, request_id)
            return row if row is not None and row.state == "failed" else None

        by_name, by_address = [
            await async_wait_until(lambda rid=rid: failed(rid), timeout=30) for rid in request_ids
        ]
    finally:
        await runtime.close()
    assert by_name.attempts == 2 and by_address.attempts == 2
    assert "forbidden address" in by_name.last_error and "loopback" in by_name.last_error
    assert "refused" in by_address.last_error and "loopback" in by_address.last_error
    assert receiver.calls("by-name") == [] and receiver.calls("by-address") == []


async def test_an_attempt_in_flight_at_shutdown_is_handed_back(
    settings: Settings, receiver: WebhookReceiver, image_host: ImageHost, tmp_path: Path
) -> None:
    settings = settings.model_copy(
        update={"webhook_timeout": 30.0, "shutdown_grace_seconds": 0.2, "webhook_secret": SECRET}
    )
    receiver.answer("held", Reply(hang=True))
    runtime = await Runtime.open(settings, migrate=True)
    try:
        path = tmp_path / "in.csv"
        path.write_bytes(csv_body(image_host.url("img/cat.jpg?hook=10")))
        accepted = await stage_request(
            runtime.db,
            path,
            options=ProcessingOptions(),
            webhook_url=receiver.url("held"),
            owner=None,
            limits=CsvLimits(),
            task_max_images=64,
        )
        runtime.start_worker()

        async def in_flight() -> Any:
            row = await deliveries.get_delivery(runtime.db, accepted.request_id)
            held = row is not None and row.state == "delivering" and receiver.calls("held")
            return row if held else None

        await async_wait_until(in_flight, timeout=30, what="an attempt in flight")
        shown = WebhookOut.from_row(await get_request(runtime.db, accepted.request_id, None))
        assert (shown.state, shown.next_attempt_at) == ("delivering", None), "none is due"
    finally:
        await runtime.close()
    reopened = await Runtime.open(settings)
    try:
        row = await deliveries.get_delivery(reopened.db, accepted.request_id)
    finally:
        await reopened.close()
    assert (row.state, row.attempts, row.lease_token) == ("pending", 0, None), "not counted"


async def test_a_receivers_cookie_is_never_sent_with_a_later_delivery(
    receiver: WebhookReceiver,
) -> None:
    """One sender delivers for every client: a receiver's cookie must not travel on."""
    sender = WebhookSender(AddressPolicy(allow_private=True), timeout=5, user_agent="pixelmill")
    receiver.answer("sets-a-cookie", Reply(headers={"Set-Cookie": "session=one-client; Path=/"}))
    try:
        for path in ("sets-a-cookie", "another-hook"):
            outcome = await sender.send(receiver.url(path, host="localhost"), b"{}", {})
            assert outcome.delivered, outcome
    finally:
        await sender.close()

    assert [call.headers.get("cookie") for call in receiver.calls("another-hook")] == [None]


async def test_an_https_webhook_goes_to_the_checked_address_under_its_name(
    authority: trustme.CA,
) -> None:
    """The address dialled is the one resolved and checked; the TLS server name, the
    certificate check and the Host header keep the webhook URL's host name."""
    receiver = WebhookReceiver(tls=server_context(authority, "hooks.example")).start()
    resolver = StaticResolver({"hooks.example": ["127.0.0.1"]})
    sender = WebhookSender(
        AddressPolicy(allow_private=True),
        timeout=5,
        user_agent="pixelmill",
        resolver=resolver,
        tls=trusting(authority),
    )
    try:
        outcome = await sender.send(f"https://hooks.example:{receiver.port}/done", b"{}", {})
    finally:
        await sender.close()
        receiver.stop()

    assert outcome.delivered, outcome
    assert resolver.asked == ["hooks.example"]
    assert receiver.server_names == ["hooks.example"]
    assert [call.headers["host"] for call in receiver.calls("done")] == [
        f"hooks.example:{receiver.port}"
    ]


@pytest.mark.parametrize("trusted", [True, False], ids=["another-name", "unknown-authority"])
async def test_an_https_webhook_without_a_valid_certificate_is_not_sent(
    authority: trustme.CA, trusted: bool
) -> None:
    """A certificate for another name, or from an authority the system does not trust,
    fails the attempt before any byte of the body leaves."""
    certified = "other.example" if trusted else "hooks.example"
    receiver = WebhookReceiver(tls=server_context(authority, certified)).start()
    sender = WebhookSender(
        AddressPolicy(allow_private=True),
        timeout=5,
        user_agent="pixelmill",
        resolver=StaticResolver({"hooks.example": ["127.0.0.1"]}),
        tls=trusting(authority) if trusted else None,
    )
    try:
        outcome = await sender.send(f"https://hooks.example:{receiver.port}/done", b"{}", {})
    finally:
        await sender.close()
        receiver.stop()

    assert not outcome.delivered
    assert outcome.error is not None and "certificate" in outcome.error.lower(), outcome
    assert receiver.calls("done") == []


@pytest.mark.parametrize(
    "host",
    ["\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127\u30020\u30020\u30021", "127.0.0.\U0001fbf1"],
    ids=["full-width-digits", "ideographic-dots", "segmented-digit"],
)
async def test_a_loopback_address_in_unicode_digits_is_refused_too(
    receiver: WebhookReceiver, host: str
) -> None:
    """aiohttp dials such a host as 127.0.0.1: the check must see it the same way."""
    url = f"http://{host}:{receiver.port}/unicode"
    sender = WebhookSender(AddressPolicy(), timeout=5, user_agent="pixelmill")
    try:
        outcome = await sender.send(url, b"{}", {})
    finally:
        await sender.close()

    assert literal_refusal(url, AddressPolicy()) == "the webhook host is a loopback address"
    assert not outcome.delivered and "loopback" in (outcome.error or ""), outcome
    assert receiver.calls("unicode") == []
