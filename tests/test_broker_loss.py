"""Losing Redis: a private Redis that is flushed or stopped, a real worker with the sweep, a real
gunicorn. The machine's shared Redis is never touched."""

from __future__ import annotations

import time

import pytest
import redis
import requests
from sqlalchemy import func, select, text

from tests.conftest import insert_key
from tests.support import processes
from tests.support.servers import RedisServer, api_session
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

QUEUE = "broker-loss"  # the stack's Celery queue, in its private Redis


@pytest.fixture(scope="module")
def db(migrated_database):
    """This module's own database: the session's worker must not sweep its escalations."""
    from models.db import make_engine, make_session_factory

    factory = make_session_factory(make_engine(migrated_database("broker_loss"), pool_size=2))
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture(scope="module")
def stack(process_env, tmp_path_factory, db):
    """A private Redis, and a web and a worker (with beat) that use it and this module's database."""
    directory = tmp_path_factory.mktemp("broker-loss")
    server = RedisServer(directory / "redis").start()
    env = {
        **process_env,
        "DATABASE_URL": db.kw["bind"].url.render_as_string(hide_password=False),
        "REDIS_URL": server.url,
        "CELERY_QUEUE": QUEUE,
    }
    web = processes.web(env, directory, name="web-broker-loss").start()
    worker = processes.worker(env, directory, name="worker-broker-loss", beat=True).start()
    http = api_session(insert_key(db), f"http://127.0.0.1:{web.port}")
    yield http, server, worker
    worker.stop()
    web.stop()
    server.stop()


def new_escalating(http, count: int, policy: str = "fast") -> list[str]:
    ids = []
    for _ in range(count):
        incident = http.post(
            f"{http.base}/incidents", json={"title": "t", "policy": policy}, timeout=5
        ).json()
        response = http.post(f"{http.base}/incidents/{incident['id']}/escalate", timeout=5)
        assert response.status_code == 200
        ids.append(incident["id"])
    return ids


def statuses(http, incident_id) -> list[str]:
    rows = http.get(f"{http.base}/incidents/{incident_id}/escalations", timeout=5).json()["items"]
    return [row["status"] for row in rows]


def all_executed(http, ids, levels=3) -> bool:
    return all(statuses(http, i) == ["EXECUTED"] * levels for i in ids)


def test_redis_flushed_while_escalations_are_pending(stack, db):
    http, server, worker = stack
    ids = new_escalating(http, 20)
    # The worker now holds the level-1 ETA tasks; Redis forgets everything.
    redis.Redis.from_url(server.url).flushall()
    eventually(lambda: all_executed(http, ids), timeout=30, interval=0.5)
    with db() as session:
        doubles = session.execute(
            text(
                "SELECT incident_id, escalation_level, count(*) FROM escalations "
                "WHERE status = 'EXECUTED' AND incident_id = ANY(CAST(:ids AS uuid[])) "
                "GROUP BY 1, 2 HAVING count(*) > 1"
            ),
            {"ids": ids},
        ).all()
        executed_events = session.scalar(
            text(
                "SELECT count(*) FROM incident_events WHERE type = 'escalation_executed' "
                "AND incident_id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": ids},
        )
    assert doubles == []
    assert executed_events == 3 * len(ids)


def test_redis_stopped_transitions_still_answer_and_escalations_run_when_it_is_back(stack):
    http, server, worker = stack
    server.stop(kill=True)
    started = time.monotonic()
    ids = new_escalating(http, 3, policy="single")
    # Three creates and three escalations, each bounded even though every publish fails.
    assert time.monotonic() - started < 6 * 2.5
    single = http.post(f"{http.base}/incidents", json={"title": "t"}, timeout=5).json()
    started = time.monotonic()
    response = http.post(f"{http.base}/incidents/{single['id']}/escalate", timeout=5)
    assert response.status_code == 200 and time.monotonic() - started < 2.5
    ids.append(single["id"])
    health = requests.get(f"{http.base}/health", timeout=5)
    assert health.status_code == 503 and health.json()["checks"]["broker"].startswith("unavailable")
    time.sleep(2)
    assert [statuses(http, i) for i in ids] == [["PENDING"]] * len(ids)
    server.start()
    eventually(lambda: all_executed(http, ids[:3], levels=1), timeout=30, interval=0.5)
    eventually(lambda: all_executed(http, ids[3:]), timeout=30, interval=0.5)
    assert requests.get(f"{http.base}/health", timeout=5).status_code == 200


def test_worker_survives_a_redis_restart_while_it_holds_eta_escalations(stack, db):
    """Celery 5.7.0 exits here ("Unrecoverable error: AttributeError ... 'hostname'") unless the
    consumer of tasks/consumer.py is in place: the worker must ride through, as the same process."""
    http, server, worker = stack
    pid = worker.process.pid
    log = worker.log_path
    before = len(log.read_text())

    def held(ids) -> bool:
        # Counted by escalation, not by message: handed over, and no message left in the queue, so
        # the worker holds them as ETA tasks, unacknowledged. The web hands them over itself, one
        # message each, or, while it rests from the previous test's failed publishes
        # (tasks/escalation.py BROKER_REST_S), the sweep does, several to a message.
        with db() as session:
            handed_over = session.scalar(
                text(
                    "SELECT count(*) FROM escalations WHERE status = 'PENDING' AND published_at IS NOT "
                    "NULL AND incident_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": ids},
            )
        return handed_over == len(ids) and redis.Redis.from_url(server.url).llen(QUEUE) == 0

    ids = new_escalating(http, 30, policy="held")
    # Every level 1 is held by the worker before Redis goes away.
    eventually(lambda: held(ids), timeout=10, interval=0.2)
    server.restart()  # kill -9, started again empty on the same port
    more = new_escalating(http, 5)
    eventually(lambda: all_executed(http, ids, levels=2), timeout=40, interval=0.5)
    eventually(lambda: all_executed(http, more), timeout=30, interval=0.5)
    assert worker.alive and worker.process.pid == pid, worker.log_tail()
    assert "Unrecoverable error" not in log.read_text()
    # The sweep saw that Redis had lost everything and handed the held levels over again at once.
    assert "[SWEEP] the broker lost its data" in log.read_text()[before:]


def test_a_sweep_cut_short_leaves_the_rest_of_the_brokers_loss_to_the_next_sweep(migrated_database):
    """Redis lost what it held, and the sweep that found out could not hand it all over again (here
    its cap on batches): the next sweep goes on with the same loss, instead of leaving the rest to
    the grace and backoff of messages the broker lost (a level minutes late)."""
    import dataclasses
    import uuid

    from api import create_app
    from models.escalation import Escalation
    from models.policy import parse_policies
    from tasks.escalation import KEPT, MAX_SWEEP_BATCHES, sweep_escalations
    from tests.support.incidents import escalate_new

    app = create_app({"DATABASE_URL": migrated_database("sweep_loss")})
    celery_app = app.extensions["celery"]
    celery_app.conf.task_default_queue = f"sweep-loss-{uuid.uuid4().hex[:8]}"  # no worker: nothing runs
    settings = app.extensions["engine_settings"] = dataclasses.replace(
        app.extensions["engine_settings"], sweep_batch=2
    )
    policies = parse_policies(
        {"default_policy": "p", "policies": {"p": {"levels": [{"delay": "30s", "notify": []}]}}}
    )
    in_flight = 2 * MAX_SWEEP_BATCHES + 10
    db = app.extensions["db"]
    with db.begin() as session:
        for _ in range(in_flight):  # level 1 handed to the broker, due in 30 s
            escalate_new(session, "acme", policies, settings)
    broker = redis.Redis.from_url(celery_app.conf.broker_url)
    sentinel = f"{celery_app.conf.task_default_queue}:sweep-sentinel"
    try:
        broker.delete(sentinel)  # what a Redis restarted empty shows
        with app.app_context():
            sweep_escalations()
            lost_at = broker.get(sentinel).decode()
            assert lost_at != KEPT  # cut short: the loss is still to be handed over
            with db() as session:
                before = session.scalar(
                    select(func.count()).where(Escalation.published_at < text(f"'{lost_at}'::timestamptz"))
                )
            assert before == in_flight - 2 * MAX_SWEEP_BATCHES
            sweep_escalations()
            assert broker.get(sentinel).decode() == KEPT
            with db() as session:
                assert not session.scalar(
                    select(func.count()).where(Escalation.published_at < text(f"'{lost_at}'::timestamptz"))
                )
    finally:
        broker.delete(sentinel, celery_app.conf.task_default_queue)
        db.kw["bind"].dispose()
