"""Shared fixtures: the image corpus, a real image host, settings on a temp data dir.

Every test that uses a database (through ``settings``, ``database_url`` or
``module_database_url``) runs once per database, SQLite and PostgreSQL: the same suite,
two passes per module. A test that uses ``backend`` or ``module_backend`` (a database
and a task queue) runs once per combination of the backend matrix instead:
``sqlite-db``, ``postgres-db`` and ``postgres-kafka`` (tests/support/backends.py); a
module narrows that with ``pytestmark = pytest.mark.backends("sqlite-db", ...)`` and
says why. PostgreSQL cases are skipped when no server answers, except under
``CI=true``, where that is an error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from pixelmill.config import Settings
from tests.support.backends import MATRIX, Backend
from tests.support.databases import ADMIN_URL_ENV, BACKENDS, PostgresServer, fresh_database
from tests.support.image_host import ImageHost
from tests.support.images import build_corpus
from tests.support.kafka import TansuBroker
from tests.support.s3 import CREDENTIALS, S3Server


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def image_host(corpus: Path) -> Iterator[ImageHost]:
    host = ImageHost(corpus).start()
    yield host
    host.stop()


@pytest.fixture(scope="session")
def authority() -> trustme.CA:
    """A private certificate authority for HTTPS servers on loopback; only the clients
    given a context that trusts it (tests/support/tls.py) accept its certificates."""
    return trustme.CA()


# Suites that never open a database (the imaging service is stateless): one pass only.
DATABASE_FREE = (Path(__file__).parent / "imaging",)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "backends(*names): the combinations of the backend matrix a module runs over "
        f"(default: all of {', '.join(MATRIX)})",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Give each test that uses a database one pass per database, and each test that
    uses a database and a queue one pass per combination (grouped by module)."""
    if "database_backend" not in metafunc.fixturenames:
        return
    if any(folder in metafunc.definition.path.parents for folder in DATABASE_FREE):
        return
    if "queue_backend" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        names = list(marker.args) if marker else list(MATRIX)
        unknown = set(names) - set(MATRIX)
        assert not unknown, f"unknown backend combination(s) {sorted(unknown)}"
        metafunc.parametrize(
            ("database_backend", "queue_backend"),
            [MATRIX[name] for name in names],
            ids=names,
            indirect=True,
            scope="module",
        )
        return
    metafunc.parametrize("database_backend", BACKENDS, indirect=True, scope="module")


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """The PostgreSQL server the postgres cases create their databases on."""
    server = PostgresServer.from_env()
    problem = server.problem()
    if problem:
        reason = (
            f"PostgreSQL is not reachable at {server.shown_url} ({problem}); "
            f"start it (.ci/run does) or set {ADMIN_URL_ENV}"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}. Under CI=true the postgres cases must run.", pytrace=False)
        pytest.skip(reason)
    server.drop_stale_databases()
    return server


@pytest.fixture(scope="module")
def database_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres``: the database of this pass over the module."""
    backend: str = getattr(request, "param", "sqlite")
    if backend == "postgres":
        request.getfixturevalue("postgres")  # skips (or fails under CI) when it is down
    return backend


@pytest.fixture(scope="module")
def queue_backend(request: pytest.FixtureRequest) -> str:
    """``db`` or ``kafka``: the task queue of this pass over the module."""
    queue: str = getattr(request, "param", "db")
    if queue == "kafka":
        request.getfixturevalue("kafka_broker")
    return queue


def _queue_url(queue: str, request: pytest.FixtureRequest) -> str:
    """``db://``, or a Kafka topic (and consumer group) no one has used yet."""
    if queue == "db":
        return "db://"
    broker: TansuBroker = request.getfixturevalue("kafka_broker")
    return broker.queue_url(f"pixelmill-{uuid.uuid4().hex[:10]}")


def _backend_name(database: str, queue: str) -> str:
    return next(name for name, pair in MATRIX.items() if pair == (database, queue))


@pytest.fixture
def backend(
    database_backend: str, queue_backend: str, database_url: str, request: pytest.FixtureRequest
) -> Backend:
    """A fresh database and a fresh queue, on this pass's combination of the matrix."""
    name = _backend_name(database_backend, queue_backend)
    return Backend(name, database_url, _queue_url(queue_backend, request))


@pytest.fixture(scope="module")
def module_backend(
    database_backend: str,
    queue_backend: str,
    module_database_url: str,
    request: pytest.FixtureRequest,
) -> Backend:
    """Like ``backend``, for the long-lived processes of a module."""
    name = _backend_name(database_backend, queue_backend)
    return Backend(name, module_database_url, _queue_url(queue_backend, request))


@pytest.fixture
def database_url(
    database_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A database no one has used yet (not even migrated), on this pass's backend."""
    server = request.getfixturevalue("postgres") if database_backend == "postgres" else None
    with fresh_database(database_backend, tmp_path / "data", server) as url:
        yield url


@pytest.fixture(scope="module")
def module_database_url(
    database_backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """Like ``database_url``, for the long-lived server of a module (one per backend)."""
    server = request.getfixturevalue("postgres") if database_backend == "postgres" else None
    with fresh_database(database_backend, tmp_path_factory.mktemp("db"), server) as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Embedded defaults on a fresh data dir and database, loopback sources allowed,
    short leases."""
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        allow_private_urls=True,
        lease_seconds=3,
        poll_interval=0.05,
        retry_backoff_seconds=0.05,
    )


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuBroker]:
    """A Kafka-protocol broker shared by the session; each test uses its own topic."""
    broker = TansuBroker(tmp_path_factory.mktemp("kafka") / "broker.log").start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """An S3-compatible server shared by the session; each test makes its own bucket.
    Its credentials are in the environment, where the SDK (and every pixelmill process
    a test starts) finds them."""
    server = S3Server(tmp_path_factory.mktemp("s3") / "s3.log").start()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CREDENTIALS.items():
            patch.setenv(name, value)
        yield server
    server.stop()
