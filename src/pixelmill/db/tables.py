"""The tables of pixelmill (SQLAlchemy Core), the same for SQLite and PostgreSQL.

The Alembic migrations in ``migrations/versions`` create exactly these; a test checks
that the two agree.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()


def bounded_text(value: str, limit: int = 2000) -> str:
    """Free text from outside (an error message, a receiver's answer) as every database
    stores it: cut to ``limit`` characters, a NUL written out (PostgreSQL refuses one)."""
    return value.replace("\x00", "\\0")[:limit]


# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT at scale.
BigId = BigInteger().with_variant(Integer(), "sqlite")

requests = Table(
    "requests",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(64), nullable=True),
    Column("status", String(16), nullable=False),
    Column("options", JSON, nullable=False),
    Column("header", JSON, nullable=False),
    Column("webhook_url", Text, nullable=True),
    Column("products", Integer, nullable=False),
    # Image counters, moved in the same transaction as the images they count, so a
    # status call reads one row whatever the size of the request.
    Column("total", Integer, nullable=False),
    Column("pending", Integer, nullable=False),
    Column("processing", Integer, nullable=False),
    Column("completed", Integer, nullable=False),
    Column("failed", Integer, nullable=False),
    Column("output_key", Text, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
)
Index("ix_requests_owner_created", requests.c.owner, requests.c.created_at)

products = Table(
    "products",
    metadata,
    Column("request_id", String(32), primary_key=True),
    Column("row_index", Integer, primary_key=True),
    Column("line", Integer, nullable=False),
    Column("serial_number", Text, nullable=False),
    Column("product_name", Text, nullable=False),
    Column("cells", JSON, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(32), nullable=False),
    Column("row_index", Integer, nullable=False),
    Column("position", Integer, nullable=False),
    Column("input_url", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("output_key", Text, nullable=True),
    Column("output_url", Text, nullable=True),
    Column("error_code", String(32), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("bytes_in", BigInteger, nullable=True),
    Column("bytes_out", BigInteger, nullable=True),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("format", String(8), nullable=True),
    Column("source_quality", Integer, nullable=True),
    Column("output_quality", Integer, nullable=True),
    Column("kept_source", Boolean, nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("request_id", "row_index", "position", name="uq_images_position"),
)

tasks = Table(
    "tasks",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(32), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("first_row", Integer, nullable=False),
    Column("last_row", Integer, nullable=False),
    Column("image_count", Integer, nullable=False),
    # queued -> leased -> done | dead; a leased task whose lease ran out is taken again.
    Column("state", String(16), nullable=False),
    Column("priority", Integer, nullable=False),  # lower first: finalising beats new work
    Column("attempts", Integer, nullable=False, default=0),
    Column("available_at", Float, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    # Transactional outbox for external queues: set once the task is published.
    Column("published_at", Float, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Where the outbox published it (Kafka: topic, partition, offset), so that a record
    # the broker lost can be told from one still waiting in its log (queue/audit.py).
    Column("published_topic", String(255), nullable=True),
    Column("published_partition", Integer, nullable=True),
    Column("published_offset", BigInteger, nullable=True),
    UniqueConstraint("request_id", "kind", "seq", name="uq_tasks_request_kind_seq"),
)
Index("ix_tasks_claim", tasks.c.state, tasks.c.priority, tasks.c.id)
# What a claim scans, in claim order: open tasks only, however many are done. A query
# uses it when its WHERE repeats this literal condition (see queue/db.py).
OPEN_TASK = text("state IN ('queued', 'leased')")
Index(
    "ix_tasks_open",
    tasks.c.priority,
    tasks.c.id,
    postgresql_where=OPEN_TASK,
    sqlite_where=OPEN_TASK,
)
Index("ix_tasks_unpublished", tasks.c.published_at)
# What the outbox audit looks up: open tasks by their place in the broker's log.
Index(
    "ix_tasks_placement",
    tasks.c.published_topic,
    tasks.c.published_partition,
    tasks.c.published_offset,
    postgresql_where=OPEN_TASK,
    sqlite_where=OPEN_TASK,
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(32), nullable=False),
    Column("webhook_id", String(64), nullable=False),  # the webhook-id header, kept on retries
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),  # the JSON sent, the same bytes on every attempt
    # pending -> delivering -> delivered | failed; delivering -> pending on a retryable failure.
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("next_attempt_at", Float, nullable=True),  # epoch seconds; None once settled
    # A claim: the sender holding ``lease_token`` owns the attempt until the lease expires.
    Column("lease_token", String(32), nullable=True),
    Column("lease_expires_at", Float, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("request_id", name="uq_webhook_deliveries_request"),
)
Index(
    "ix_webhook_deliveries_due",
    webhook_deliveries.c.state,
    webhook_deliveries.c.next_attempt_at,
)
