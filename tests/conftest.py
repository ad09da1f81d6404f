"""Fixtures: a fresh database per test session on the real Postgres, a unique queue on the real
Redis, a real Celery worker, a real gunicorn. Nothing is mocked."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config

from tests.support import servers
from tests.support.servers import PROJECT_ROOT

RUN_ID = uuid.uuid4().hex[:8]
SERVER_URL = (os.environ.get("DATABASE_URL") or servers.DEFAULT_DATABASE_URL).replace(
    "postgres://", "postgresql://", 1
)
TEST_DB = f"incidents_test_{RUN_ID}"
FAST_POLICY = PROJECT_ROOT / "tests" / "policies" / "fast.yaml"

# The environment every process of this test session shares (the in-process app, the worker and
# gunicorn): its own database and its own queue, so a `make run` on the same machine is untouched.
TEST_ENV = {
    "DATABASE_URL": servers.with_database(SERVER_URL, TEST_DB),
    "REDIS_URL": os.environ.get("REDIS_URL") or servers.DEFAULT_REDIS_URL,
    "CELERY_QUEUE": f"test-{RUN_ID}",
    "CELERY_NOTIFY_QUEUE": f"test-{RUN_ID}-notify",
    "ESCALATION_POLICY_FILE": str(FAST_POLICY),
    "ESCALATION_SWEEP_INTERVAL": "1",
    "ESCALATION_REDELIVERY_GRACE": "2",
    "ESCALATION_ETA_HORIZON": "60",
    # Tests open thousands of incidents from one address with a handful of keys, and fail to
    # authenticate on purpose: no limit, no quota. tests/test_limits.py sets its own.
    "RATE_LIMIT_PER_KEY": "off",
    "RATE_LIMIT_FAILED_AUTH": "off",
    "TENANT_MAX_ACTIVE_INCIDENTS": "0",
}


def pytest_configure(config):
    # celeryconfig reads the environment when first imported: set it before anything imports it.
    os.environ.pop("CELERY_BROKER_URL", None)
    os.environ.update(TEST_ENV)


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(PROJECT_ROOT / "migrations" / "alembic.ini"))
    cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logger"] = False
    return cfg


@pytest.fixture(scope="session")
def database_url():
    servers.create_database(SERVER_URL, TEST_DB)
    command.upgrade(alembic_config(TEST_ENV["DATABASE_URL"]), "head")
    yield TEST_ENV["DATABASE_URL"]
    servers.drop_database(SERVER_URL, TEST_DB)


@pytest.fixture(scope="session")
def app(database_url):
    from api import create_app

    app = create_app({"DATABASE_URL": database_url})
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app):
    return app.test_client()


def insert_key(session_factory, tenant: str = "acme", scope: str = "write", revoked: bool = False) -> dict:
    """Store a new API key and return its Authorization header (what `keys create` does)."""
    from sqlalchemy import func

    from models.api_key import ApiKey, Scope, hash_key, new_key

    key, prefix = new_key()
    with session_factory.begin() as session:
        session.add(
            ApiKey(
                id=uuid.uuid4(),
                tenant=tenant,
                name="test",
                prefix=prefix,
                secret_hash=hash_key(key),
                scope=Scope(scope),
                revoked_at=func.now() if revoked else None,
            )
        )
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def make_key(app):
    """make_key(tenant, scope='write', revoked=False) -> the Authorization headers of a new key."""

    def make(tenant: str = "acme", scope: str = "write", revoked: bool = False) -> dict[str, str]:
        return insert_key(app.extensions["db"], tenant, scope, revoked)

    return make


@pytest.fixture(scope="session")
def migrated_database():
    """migrated_database(suffix) -> the URL of a new database with the schema, dropped at the end.

    For tests whose worker must not share a database with the session's worker (its sweep would
    deliver their escalations through the shared Redis)."""
    created = []

    def make(suffix: str) -> str:
        name = f"{TEST_DB}_{suffix}"
        servers.create_database(SERVER_URL, name)
        url = servers.with_database(SERVER_URL, name)
        command.upgrade(alembic_config(url), "head")
        created.append(name)
        return url

    yield make
    for name in created:
        servers.drop_database(SERVER_URL, name)


@pytest.fixture(scope="session")
def auth(make_key):
    """A write key of tenant 'acme'."""
    return make_key("acme")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def process_env(database_url) -> dict[str, str]:
    return {**os.environ, **TEST_ENV, "DATABASE_URL": database_url}


@pytest.fixture(scope="session")
def worker(process_env, log_dir):
    """A real Celery worker with embedded beat (the sweep), consuming this session's queue."""
    from tests.support.processes import worker as make_worker

    proc = make_worker(process_env, log_dir, beat=True).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def notifier(process_env, log_dir):
    """A real Celery worker on this session's notification queue (the Procfile's notifier)."""
    from tests.support.processes import worker as make_worker

    env = {**process_env, "CELERY_QUEUE": process_env["CELERY_NOTIFY_QUEUE"]}
    proc = make_worker(env, log_dir, name="notifier").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def web(process_env, log_dir):
    """A real gunicorn serving the API."""
    from tests.support.processes import web as make_web

    proc = make_web(process_env, log_dir).start()
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()


@pytest.fixture(scope="session")
def rabbitmq_url(tmp_path_factory):
    """The amqp:// URL of a RabbitMQ vhost of this session's own: made on the machine's RabbitMQ
    (RABBITMQ_URL, else 127.0.0.1:5672 as guest) and deleted at the end; when none answers, the
    default vhost of a private node (tests/support/servers.py). Skipped when RabbitMQ is not
    installed and none answers."""
    if not servers.rabbitmq_script("rabbitmq-server") and not servers.amqp_answers(
        os.environ.get("RABBITMQ_URL") or servers.DEFAULT_RABBITMQ_URL
    ):
        pytest.skip("no RabbitMQ answers and rabbitmq-server is not installed")
    with servers.rabbitmq_for_tests(tmp_path_factory.mktemp("rabbitmq")) as url:
        yield url
