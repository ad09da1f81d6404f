"""Rate limits and quotas (issue 12) against the real servers: the limits counted in a Redis of this
module's own (and one killed under a real gunicorn, to see the limiter fail open), the quota in the
test database, /health answered from its last check. Each test sets small limits of its own (the
rest of the suite runs with them off, tests/conftest.py) and its own client addresses."""

from __future__ import annotations

import itertools
import time
import uuid

import pytest
import requests
from sqlalchemy import event

from api import create_app
from api.config import ConfigError, Settings
from api.health import CACHE_S
from tests.support import processes
from tests.support.servers import RedisServer
from tests.support.waiting import eventually
from tests.test_api import assert_error

# Client addresses, one per app: the counts of one test never reach another's.
ADDRESSES = (f"192.0.2.{n}" for n in itertools.count(1))


@pytest.fixture(scope="module")
def limits_redis(tmp_path_factory):
    """A Redis of this module's own: its counters start from nothing and touch no other test's."""
    server = RedisServer(tmp_path_factory.mktemp("limits") / "redis").start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def make_app(app, database_url, limits_redis):
    """make_app(**env) -> a test client of a new app with these settings, counting its limits in this
    module's Redis, calling from an address of its own."""

    def make(**env: str):
        made = create_app({"DATABASE_URL": database_url, "REDIS_URL": limits_redis.url, **env})
        client = made.test_client()
        client.environ_base["REMOTE_ADDR"] = next(ADDRESSES)
        return client

    yield make
    # create_app made its Celery app the current one: give the session's app its place back.
    app.extensions["celery"].set_current()
    app.extensions["celery"].set_default()


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def bad_key() -> dict[str, str]:
    return {"Authorization": f"Bearer inc_{uuid.uuid4().hex}"}


def assert_limited(response, limit: int, message: str) -> int:
    """A 429 in the one error shape, with Retry-After and the RateLimit-* headers; its Retry-After."""
    body = assert_error(response, 429, "Too Many Requests")
    assert body["message"].startswith(message), body
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Reset"] == str(retry_after)
    assert body["message"].endswith(f"Retry in {retry_after} s.")
    return retry_after


def database_checkouts(client) -> list:
    """A list that grows by one each time the app takes a database connection from its pool."""
    taken = []
    event.listen(client.application.extensions["db"].kw["bind"], "checkout", lambda *_: taken.append(1))
    return taken


def test_a_key_past_its_limit_is_refused_and_other_keys_are_not(make_app, make_key):
    client = make_app(RATE_LIMIT_PER_KEY="5/minute")
    tenant = new_tenant()
    busy, other = make_key(tenant), make_key(tenant)
    for _ in range(5):
        assert client.get("/incidents?limit=1", headers=busy).status_code == 200
    message = "Rate limit exceeded for this API key: 5 per 1 minute (RATE_LIMIT_PER_KEY)."
    assert_limited(client.get("/incidents?limit=1", headers=busy), 5, message)
    assert_limited(client.post("/incidents", json={"title": "t"}, headers=busy), 5, message)
    assert client.get("/incidents?limit=1", headers=other).status_code == 200
    assert client.get("/health").status_code == 200  # no key, no limit


def test_failed_authentications_block_their_address_but_never_a_valid_key(make_app, make_key):
    """Past the limit, a wrong, revoked or missing key from that address is a 429, and a wrong one
    costs no database lookup; a valid key from the same address (even one never used before) and
    other addresses go on as before."""
    tenant = new_tenant()
    valid, revoked = make_key(tenant), make_key(tenant, revoked=True)
    client = make_app(RATE_LIMIT_FAILED_AUTH="3/minute")
    for headers in (bad_key(), revoked, {}):
        assert client.get("/incidents", headers=headers).status_code == 401
    message = "Too many failed authentications from this address: 3 per 1 minute (RATE_LIMIT_FAILED_AUTH)."
    for headers in (bad_key(), revoked, {}):
        assert_limited(client.get("/incidents", headers=headers), 3, message)
    taken = database_checkouts(client)
    for _ in range(20):
        assert client.get("/incidents", headers=bad_key()).status_code == 429
    # (The hashes of the valid keys are read once, then not for a few seconds, whatever comes.)
    assert len(taken) <= 1
    for _ in range(3):
        assert client.get("/incidents?limit=1", headers=valid).status_code == 200
    created = client.post("/incidents", json={"title": "from a blocked address"}, headers=valid)
    assert created.status_code == 201
    client.environ_base["REMOTE_ADDR"] = next(ADDRESSES)
    assert client.get("/incidents", headers=bad_key()).status_code == 401


def test_x_forwarded_for_counts_only_behind_a_trusted_proxy(make_app):
    """Without TRUSTED_PROXIES a client cannot escape its block by naming another address; behind one
    trusted proxy, each client it forwards has a count of its own, the proxy none."""
    direct = make_app(RATE_LIMIT_FAILED_AUTH="2/minute")
    answers = [
        direct.get("/incidents", headers={**bad_key(), "X-Forwarded-For": f"203.0.113.{n}"}).status_code
        for n in range(1, 4)
    ]
    assert answers == [401, 401, 429]

    proxied = make_app(RATE_LIMIT_FAILED_AUTH="2/minute", TRUSTED_PROXIES="1")
    blocked = {"X-Forwarded-For": "198.51.100.7"}
    answers = [proxied.get("/incidents", headers={**bad_key(), **blocked}).status_code for _ in range(3)]
    assert answers == [401, 401, 429]
    neighbour = {"X-Forwarded-For": "198.51.100.8"}
    assert proxied.get("/incidents", headers={**bad_key(), **neighbour}).status_code == 401


def test_quota_refuses_a_new_incident_not_a_report_of_an_open_one(make_app, make_key):
    client = make_app(TENANT_MAX_ACTIVE_INCIDENTS="3")
    auth = make_key(new_tenant())
    opened = [client.post("/incidents", json={"title": f"n{n}"}, headers=auth) for n in range(2)]
    opened.append(client.post("/incidents", json={"title": "disk", "dedup_key": "disk"}, headers=auth))
    assert [response.status_code for response in opened] == [201, 201, 201]

    refused = client.post("/incidents", json={"title": "one too many"}, headers=auth)
    assert_error(
        refused,
        429,
        "Too Many Requests",
        "This tenant has 3 active incidents, its quota (TENANT_MAX_ACTIVE_INCIDENTS): "
        "resolve or cancel one to open another.",
    )
    again = client.post("/incidents", json={"title": "disk", "dedup_key": "disk"}, headers=auth)
    assert again.status_code == 200 and again.get_json()["report_count"] == 2
    listed = client.get("/incidents", headers=auth).get_json()["items"]
    assert sorted(item["title"] for item in listed) == ["disk", "n0", "n1"]  # nothing left of the refused

    first = opened[0].get_json()["id"]
    assert client.post(f"/incidents/{first}/resolve", headers=auth).status_code == 200
    assert client.post("/incidents", json={"title": "in the freed slot"}, headers=auth).status_code == 201
    assert client.post("/incidents", json={"title": "one too many"}, headers=auth).status_code == 429
    assert client.post("/incidents", json={"title": "t"}, headers=make_key(new_tenant())).status_code == 201


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RATE_LIMIT_PER_KEY": "lots"}, "RATE_LIMIT_PER_KEY"),
        ({"RATE_LIMIT_PER_KEY": "0/minute"}, "RATE_LIMIT_PER_KEY"),
        ({"RATE_LIMIT_FAILED_AUTH": "60/fortnight"}, "RATE_LIMIT_FAILED_AUTH"),
        ({"TENANT_MAX_ACTIVE_INCIDENTS": "-1"}, "TENANT_MAX_ACTIVE_INCIDENTS"),
        ({"TENANT_MAX_ACTIVE_INCIDENTS": "many"}, "TENANT_MAX_ACTIVE_INCIDENTS"),
        ({"REDIS_URL": "rediss://127.0.0.1:6380/0", "REDIS_SSL_CERT_REQS": "maybe"}, "REDIS_SSL_CERT_REQS"),
    ],
)
def test_a_bad_setting_stops_the_process_naming_it(env, named):
    with pytest.raises(ConfigError, match=named):
        Settings.from_env(env)


def test_settings_default_to_the_issues_limits_and_off_turns_them_off():
    defaults = Settings.from_env({})
    assert (str(defaults.rate_limits.per_key), str(defaults.rate_limits.failed_auth)) == (
        "1200 per 1 minute",
        "60 per 1 minute",
    )
    assert defaults.engine.max_active_incidents == 10_000
    off = Settings.from_env({"RATE_LIMIT_PER_KEY": "off", "RATE_LIMIT_FAILED_AUTH": "OFF"})
    assert (off.rate_limits.per_key, off.rate_limits.failed_auth) == (None, None)
    tls = Settings.from_env({"REDIS_URL": "rediss://:pw@redis.example/0", "REDIS_SSL_CA_CERTS": "/ca.pem"})
    assert tls.rate_limits.redis_options["ssl_cert_reqs"] == "required"
    assert tls.rate_limits.redis_options["ssl_ca_certs"] == "/ca.pem"


def test_the_document_states_the_429_wherever_a_key_is_needed(client):
    spec = client.get("/openapi.json").get_json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":
                continue
            stated = operation["responses"].get("429")
            if path == "/health":
                assert stated is None
            else:
                assert stated == {"$ref": "#/components/responses/RATE_LIMITED"}, (method, path)
    limited = spec["components"]["responses"]["RATE_LIMITED"]
    headers = {"Retry-After", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}
    assert set(limited["headers"]) == headers
    assert "TENANT_MAX_ACTIVE_INCIDENTS" in limited["description"]


def test_a_flood_of_health_checks_costs_one_check(make_app):
    """(That the answer is checked again after a while: the next test.)"""
    client = make_app()
    taken = database_checkouts(client)
    for _ in range(50):
        assert client.get("/health").status_code == 200
    assert len(taken) == 1


def test_with_redis_down_the_limiter_fails_open_and_health_turns_503_after_its_cache(
    process_env, tmp_path, make_key
):
    """A real gunicorn whose Redis (broker and limiter) is killed: requests are answered (a key
    that was over its limit gets through), the log says the limiter failed open, and /health goes
    on with its last answer for a moment, then names the broker."""
    server = RedisServer(tmp_path / "redis").start()
    env = {**process_env, "REDIS_URL": server.url, "RATE_LIMIT_PER_KEY": "3/minute"}
    web = processes.web(env, tmp_path, name="web-limits", workers=1).start()
    base = f"http://127.0.0.1:{web.port}"
    auth = make_key(new_tenant())
    try:
        answers = [requests.get(f"{base}/incidents?limit=1", headers=auth, timeout=5) for _ in range(4)]
        assert [response.status_code for response in answers] == [200, 200, 200, 429]
        assert requests.get(f"{base}/health", timeout=5).json()["status"] == "ok"
        server.stop(kill=True)
        checked = time.monotonic()
        cached = requests.get(f"{base}/health", timeout=5)
        assert cached.status_code == 200, f"{time.monotonic() - checked:.2f} s after the check"
        answers = [requests.get(f"{base}/incidents?limit=1", headers=auth, timeout=5) for _ in range(3)]
        assert [response.status_code for response in answers] == [200, 200, 200]
        assert "rate limiter failed open: Redis unavailable (ConnectionError)" in web.log_text()
        down = eventually(
            lambda: (r := requests.get(f"{base}/health", timeout=10)).status_code == 503 and r.json(),
            timeout=CACHE_S + 5,
        )
        assert down["checks"]["broker"].startswith("unavailable")
    finally:
        web.stop()
        server.stop(kill=True)
