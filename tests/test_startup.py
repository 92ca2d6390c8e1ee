"""The one-line start-up failure: which part, where (no password), which setting, why."""

from __future__ import annotations

from pixelmill.startup import database_failure, failure


def test_a_failure_names_the_part_hides_the_password_and_gives_the_reason() -> None:
    line = database_failure(
        "cannot migrate", "postgresql://app:s3cret@db:5432/x", OSError("db:5432 refused")
    )
    assert line == (
        "cannot migrate the database postgresql://app:***@db:5432/x "
        "(PIXELMILL_DATABASE_URL): OSError: db:5432 refused"
    )


def test_a_reason_without_words_is_the_error_name_and_a_quoted_password_is_hidden() -> None:
    silent = failure(
        "cannot start", "queue", "kafka://b:9092", "PIXELMILL_QUEUE_URL", TimeoutError()
    )
    quoting = failure(
        "cannot start", "queue", "kafka://u:pw1@b:9092", "PIXELMILL_QUEUE_URL",
        ConnectionError("Unable to bootstrap from u:pw1@b"),
    )  # fmt: skip

    assert silent.endswith("(PIXELMILL_QUEUE_URL): TimeoutError")
    assert "pw1" not in quoting and quoting.endswith("Unable to bootstrap from u:***@b")
