"""TLS as a PaaS hands it over (issue 13): a Redis that speaks only TLS and wants a password (a
rediss:// URL), a Postgres that refuses connections without TLS (sslmode=require), both with a
certificate made here. REDIS_SSL_CERT_REQS decides whether the Redis certificate is checked; an
escalation runs through both, in a real gunicorn and a real worker with the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest
import redis
import requests
from alembic import command

from tests.conftest import alembic_config, insert_key
from tests.support import processes
from tests.support.servers import PROJECT_ROOT, PostgresServer, RedisServer, make_certificate, with_database
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """(certificate, Redis, the migrated database's URL): a TLS-only Redis with a password and a
    TLS-only Postgres, both private to this module and both presenting the same self-signed
    certificate."""
    directory = tmp_path_factory.mktemp("tls")
    certificate = make_certificate(directory / "certs")
    server = RedisServer(directory / "redis", tls=certificate, password=uuid.uuid4().hex).start()
    postgres = PostgresServer(directory / "pg", ssl=certificate).init().start()
    try:
        conn = psycopg2.connect(postgres.url, connect_timeout=5)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE incidents")
        conn.close()
        database_url = with_database(postgres.url, "incidents")
        command.upgrade(alembic_config(database_url), "head")  # the release phase, over TLS
        yield certificate, server, database_url
    finally:
        server.stop(kill=True)
        postgres.stop(kill=True)


# What a process of the service sees: /health (the database and the broker), then a key set through
# the broker's own connection (on_broker_redis: the sweep's sentinel, the notifier's flags), and
# whether the rate limits' own connection to REDIS_URL answers (api/limits.py).
PROBE = """
import json
import os
from api import create_app
from tasks.celery import on_broker_redis

app = create_app()
checks = app.test_client().get("/health").get_json()["checks"]
if checks["broker"] == "ok":
    checks["on_broker_redis"] = on_broker_redis(app.extensions["celery"], lambda c: c.set("tls-probe", 1))
checks["limiter"] = app.extensions["limiter"].windows.storage.check()
print(json.dumps(checks))
"""


def probe(env: dict[str, str]) -> dict | str:
    """PROBE in a new process with this environment: its checks, or its error output."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        return result.stderr
    return json.loads(result.stdout.splitlines()[-1])


CONNECTED = {"database": "ok", "broker": "ok", "on_broker_redis": True, "limiter": True}


def test_the_redis_certificate_is_checked_as_configured(tls):
    """Unset or `required`: checked against the system's CAs and REDIS_SSL_CA_CERTS (a self-signed
    certificate is refused until trusted); `optional`: the same for a client; `none`: not checked.
    An ssl_cert_reqs in the URL wins both ways. A wrong password or an unknown setting is refused.
    The rate limits' own connection to REDIS_URL (api/limits.py) connects or is refused alike.
    And PGSSLMODE decides for a DATABASE_URL that says no sslmode, as Heroku's."""
    certificate, server, database_url = tls
    url = server.url
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_SSL_", "PG"))}
    base.update(DATABASE_URL=database_url, REDIS_URL=url)
    plain_database = {"DATABASE_URL": database_url.split("?")[0], "REDIS_SSL_CERT_REQS": "none"}
    cases = {
        "unset": {},
        "required": {"REDIS_SSL_CERT_REQS": "required"},
        "required, trusting the certificate": {
            "REDIS_SSL_CERT_REQS": "required",
            "REDIS_SSL_CA_CERTS": str(certificate.cert),
        },
        "optional": {"REDIS_SSL_CERT_REQS": "optional"},
        "none": {"REDIS_SSL_CERT_REQS": "none"},
        "none in the URL, required in the environment": {
            "REDIS_URL": f"{url}?ssl_cert_reqs=none",
            "REDIS_SSL_CERT_REQS": "required",
        },
        "required in the URL, none in the environment": {
            "REDIS_URL": f"{url}?ssl_cert_reqs=required",
            "REDIS_SSL_CERT_REQS": "none",
        },
        "a wrong password": {
            "REDIS_URL": url.replace(server.password, "wrong"),
            "REDIS_SSL_CERT_REQS": "none",
        },
        "an unknown setting": {"REDIS_SSL_CERT_REQS": "maybe"},
        # Heroku's DATABASE_URL says no sslmode: libpq then reads PGSSLMODE (README, Deploying).
        "PGSSLMODE=require": {**plain_database, "PGSSLMODE": "require"},
        "PGSSLMODE=disable": {**plain_database, "PGSSLMODE": "disable"},
    }
    # Each in its own process (celeryconfig reads the environment once); two at a time, for 2 cores.
    with ThreadPoolExecutor(2) as pool:
        outcomes = pool.map(lambda extra: probe({**base, **extra}), cases.values())
        found = dict(zip(cases, outcomes, strict=True))
    connected = {name for name, checks in found.items() if checks == CONNECTED}
    assert connected == {
        "required, trusting the certificate",
        "none",
        "none in the URL, required in the environment",
        "PGSSLMODE=require",
    }, found
    refused = {"database": "ok", "broker": "unavailable: OperationalError", "limiter": False}
    for name in ("unset", "required", "optional", "required in the URL, none in the environment"):
        assert found[name] == refused, (name, found[name])
    assert found["a wrong password"] == refused, found["a wrong password"]
    # The server refuses a connection without TLS (its pg_hba.conf has hostssl lines only).
    without_tls = found["PGSSLMODE=disable"]
    assert without_tls["database"] == "unavailable: OperationalError", without_tls
    # A process with a setting it does not know stops as it starts, naming it.
    assert "REDIS_SSL_CERT_REQS: expected required, optional or none, got 'maybe'" in str(
        found["an unknown setting"]
    )


def test_an_escalation_runs_through_tls_redis_and_postgres(tls, tmp_path, process_env):
    """A real gunicorn, a worker with the sweep and Flower on rediss:// (certificate required, the
    test's CA trusted) and sslmode=require: every level of an escalation runs, the sweep keeps its
    sentinel in that Redis, Flower sees the worker and the queue, and every database connection is
    encrypted."""
    from models.db import make_engine, make_session_factory

    certificate, server, database_url = tls
    env = {
        **process_env,
        "DATABASE_URL": database_url,
        "REDIS_URL": server.url,
        "REDIS_SSL_CERT_REQS": "required",
        "REDIS_SSL_CA_CERTS": str(certificate.cert),
        "CELERY_QUEUE": "tls",
    }
    web = processes.web(env, tmp_path, name="web-tls")
    worker = processes.worker(env, tmp_path, name="worker-tls", beat=True)
    flower = processes.flower(env, tmp_path, name="flower-tls", basic_auth="ops:tls")
    db = make_session_factory(make_engine(database_url, pool_size=1))
    http = requests.Session()
    try:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(p.start, 120) for p in (web, worker)]:
                future.result()
        http.headers.update(insert_key(db))
        base = f"http://127.0.0.1:{web.port}"
        health = eventually(lambda: _get(http, f"{base}/health"), timeout=60, interval=0.5)
        assert health["checks"] == {"database": "ok", "broker": "ok"}

        incident = http.post(f"{base}/incidents", json={"title": "over TLS"}, timeout=5).json()
        assert http.post(f"{base}/incidents/{incident['id']}/escalate", timeout=5).status_code == 200

        def executed():
            rows = http.get(f"{base}/incidents/{incident['id']}/escalations", timeout=5).json()["items"]
            return len(rows) == 3 and all(r["status"] == "EXECUTED" for r in rows)

        eventually(executed, timeout=20, interval=0.25)

        client = redis.Redis.from_url(server.url, ssl_ca_certs=str(certificate.cert), socket_timeout=2)
        try:
            assert client.exists("tls:sweep-sentinel"), "the sweep kept no sentinel in the TLS Redis"
        finally:
            client.close()
        for proc in (web, worker):
            # kombu's warning when a connection to a rediss:// URL is given no TLS options. Checked
            # before Flower starts: its `inspect conf` makes the worker build a Connection only to
            # print the broker URL masked, which logs it too without connecting.
            assert "defaulting to insecure SSL behaviour" not in proc.log_text(), proc.name

        flower.start(120)
        flower_base = f"http://127.0.0.1:{flower.port}/api"
        workers = eventually(
            lambda: requests.get(f"{flower_base}/workers?refresh=1", auth=("ops", "tls"), timeout=10).json(),
            timeout=20,
            interval=1,
        )
        assert any(name.startswith("worker-tls-") for name in workers), workers
        queues = requests.get(f"{flower_base}/queues/length", auth=("ops", "tls"), timeout=10)
        assert queues.status_code == 200, queues.text
        assert "tls" in {q["name"] for q in queues.json()["active_queues"]}, queues.text
        conn = psycopg2.connect(database_url, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT bool_and(s.ssl), count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                    "WHERE a.backend_type = 'client backend' AND a.datname = 'incidents'"
                )
                encrypted, connections = cur.fetchone()
        finally:
            conn.close()
        assert encrypted and connections >= 3, (encrypted, connections)
    finally:
        http.close()
        for proc in (flower, worker, web):
            proc.stop()
        db.kw["bind"].dispose()


def _get(http: requests.Session, url: str) -> dict | None:
    try:
        response = http.get(url, timeout=5)
    except requests.RequestException:
        return None
    return response.json() if response.status_code == 200 else None
