"""The escalation engine end to end: HTTP API (gunicorn), a real broker, a real Celery worker with
the sweep, a fast policy (levels of about a second).

Every test runs twice: on Redis (the session's worker and gunicorn) and on RabbitMQ (a worker and a
gunicorn with CELERY_BROKER_URL=amqp://... on a vhost of their own, and a database of their own so
that neither worker's sweep hands the other's escalations to its broker)."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
import requests

from tests.conftest import insert_key
from tests.support import processes
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class Client(requests.Session):
    """HTTP to one deployment's gunicorn, plus what the tests reach around the API for: its database
    (a session factory) and its broker (publish a task by name, as the engine does)."""

    def __init__(self, base: str, db, broker_url: str, headers: dict[str, str]):
        super().__init__()
        self.base = base
        self.db = db
        self.broker_url = broker_url
        # A connection per request, as tests/support/servers.api_session and for its reason: a test
        # that waits out a level would otherwise send its next request on a connection gunicorn is
        # closing (2 s idle) and get a reset.
        self.headers.update({**headers, "Connection": "close"})

    def publish(self, task: str, *args, copies: int = 1) -> None:
        from celery import Celery

        client = Celery("e2e-client", set_as_current=False)
        client.config_from_object("celeryconfig")  # the engine's queue, serializer and timeouts
        client.conf.broker_url = self.broker_url
        try:
            with client.connection_for_write() as connection:  # closed here, not left to the GC
                for _ in range(copies):
                    client.send_task(task, args, connection=connection)
        finally:
            client.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def rabbitmq_deployment(rabbitmq_url, migrated_database, process_env, log_dir):
    """A gunicorn and a worker (with beat) on RabbitMQ and a database of their own."""
    from models.db import make_engine, make_session_factory

    database_url = migrated_database("rabbitmq")
    env = {**process_env, "DATABASE_URL": database_url, "CELERY_BROKER_URL": rabbitmq_url}
    web = processes.web(env, log_dir, name="web-rabbitmq")
    worker = processes.worker(env, log_dir, name="worker-rabbitmq", beat=True)
    db = make_session_factory(make_engine(database_url, pool_size=2))
    try:
        # Both at once: each start-up is mostly imports. A generous deadline: the machine is shared.
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(web.start, 180), pool.submit(worker.start, 180)]:
                future.result()
        base = f"http://127.0.0.1:{web.port}"
        # gunicorn listens before its workers have imported the app; wait until one answers.
        eventually(lambda: _answers(f"{base}/health"), timeout=180, interval=0.5)
        yield base, db, rabbitmq_url
    finally:
        worker.stop()
        web.stop()
        db.kw["bind"].dispose()


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def http(request):
    """A client of the deployment on this broker."""
    if request.param == "redis":
        base, app = request.getfixturevalue("web"), request.getfixturevalue("app")
        request.getfixturevalue("worker")
        broker_url = request.getfixturevalue("process_env")["REDIS_URL"]
        client = Client(base, app.extensions["db"], broker_url, request.getfixturevalue("auth"))
    else:
        base, db, broker_url = request.getfixturevalue("rabbitmq_deployment")
        client = Client(base, db, broker_url, insert_key(db))
    yield client
    client.close()


def create(http, **body) -> dict:
    response = http.post(f"{http.base}/incidents", json={"title": "checkout is down", **body}, timeout=5)
    assert response.status_code == 201, response.text
    return response.json()


def act(http, incident_id, action, expect=200) -> dict:
    response = http.post(f"{http.base}/incidents/{incident_id}/{action}", timeout=5)
    assert response.status_code == expect, response.text
    return response.json()


def escalations(http, incident_id) -> list[dict]:
    response = http.get(f"{http.base}/incidents/{incident_id}/escalations", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()["items"]


def test_levels_fire_in_order_each_within_a_second_and_the_last_ends_the_chain(http):
    incident = create(http)
    act(http, incident["id"], "escalate")
    rows = eventually(
        lambda: (
            (r := escalations(http, incident["id"]))
            and len(r) == 3
            and all(e["status"] == "EXECUTED" for e in r)
            and r
        ),
        timeout=15,
    )
    assert [e["escalation_level"] for e in rows] == [1, 2, 3]
    assert [e["notify"] for e in rows] == [["in_app", "webhook"], ["email"], ["sms"]]
    previous = ts(act(http, incident["id"], "acknowledge")["escalated_at"])
    for row in rows:
        lateness = (ts(row["executed_at"]) - ts(row["scheduled_at"])).total_seconds()
        assert 0 <= lateness < 1.0, row
        # Each level's delay (1 s) counts from the previous level's execution.
        assert abs((ts(row["scheduled_at"]) - previous).total_seconds() - 1.0) < 0.01, row
        previous = ts(row["executed_at"])
    events = http.get(f"{http.base}/incidents/{incident['id']}/events", timeout=5).json()["items"]
    assert [e["type"] for e in events] == [
        "created",
        "escalated",
        "escalation_executed",
        "escalation_executed",
        "escalation_executed",
        "acknowledged",
    ]


def test_a_repeating_policy_runs_its_levels_again_round_after_round_until_its_last(http):
    incident = create(http, policy="repeating")
    act(http, incident["id"], "escalate")
    rows = eventually(
        lambda: (
            (r := escalations(http, incident["id"]))
            and len(r) == 6
            and all(e["status"] == "EXECUTED" for e in r)
            and r
        ),
        timeout=15,
    )
    assert [(e["round"], e["escalation_level"]) for e in rows] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
        (3, 1),
        (3, 2),
    ]
    # Round after round, each step 300 ms after the previous one executed; nothing after the third.
    for previous, row in zip(rows, rows[1:], strict=False):
        gap = (ts(row["scheduled_at"]) - ts(previous["executed_at"])).total_seconds()
        assert abs(gap - 0.3) < 0.01, (previous, row)
    time.sleep(1)
    assert len(escalations(http, incident["id"])) == 6
    events = http.get(f"{http.base}/incidents/{incident['id']}/events", timeout=5).json()["items"]
    assert events[1]["data"]["repeat"] == 2
    executed = [e["data"] for e in events if e["type"] == "escalation_executed"]
    assert [(d["round"], d["escalation_level"]) for d in executed] == [
        (r["round"], r["escalation_level"]) for r in rows
    ]
    act(http, incident["id"], "resolve")


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_leaving_escalating_stops_every_round(http, action):
    incident = create(http, policy="repeating")
    act(http, incident["id"], "escalate")
    eventually(lambda: any(e["round"] == 2 for e in escalations(http, incident["id"])), timeout=10)
    act(http, incident["id"], action)
    time.sleep(2)  # past the moment the rest of round 2 and round 3 would have run
    rows = escalations(http, incident["id"])
    assert max(e["round"] for e in rows) == 2
    assert [e["status"] for e in rows if e["status"] != "EXECUTED"] in (["CANCELLED"], [])
    assert sum(e["status"] == "PENDING" for e in rows) == 0


def steps(rows: list[dict]) -> list[tuple]:
    return [(e["round"], e["escalation_level"], e["kind"], e["status"]) for e in rows]


def test_an_acknowledgement_nobody_follows_runs_out_and_pages_again_from_the_level_last_executed(http):
    incident = create(http, policy="forgetful")
    act(http, incident["id"], "escalate")
    wait_statuses(http, incident["id"], ["EXECUTED", "PENDING"])
    acknowledged = act(http, incident["id"], "acknowledge")
    rows = escalations(http, incident["id"])
    # The timer is visible, and due when the acknowledgement runs out.
    assert steps(rows) == [
        (1, 1, "level", "EXECUTED"),
        (1, 2, "level", "CANCELLED"),
        (2, 1, "ack_timeout", "PENDING"),
    ]
    assert ts(rows[2]["scheduled_at"]) - ts(acknowledged["acknowledged_at"]) == timedelta(seconds=1)
    assert act(http, incident["id"], "escalate", expect=409)["errors"] == {"state": ["ACKNOWLEDGED"]}
    rows = eventually(
        lambda: (r := escalations(http, incident["id"])) and r[2]["status"] == "EXECUTED" and r, timeout=10
    )
    again = http.get(f"{http.base}/incidents/{incident['id']}", timeout=5).json()
    assert again["state"] == "ESCALATING"
    assert again["escalated_at"] == acknowledged["escalated_at"]  # when it first escalated
    # Level 1 paged again at once, and the chain goes on from there: level 2 of the new round.
    assert steps(rows)[3:] == [(2, 2, "level", "PENDING")]
    events = http.get(f"{http.base}/incidents/{incident['id']}/events", timeout=5).json()["items"]
    types = [e["type"] for e in events]
    assert types == [
        "created",
        "escalated",
        "escalation_executed",
        "acknowledged",
        "ack_timeout",
        "escalation_executed",
    ]
    timed_out = events[4]
    assert (timed_out["from_state"], timed_out["to_state"], timed_out["actor"]) == (
        "ACKNOWLEDGED",
        "ESCALATING",
        None,
    )
    assert timed_out["data"]["escalation_id"] == rows[2]["id"]
    assert timed_out["at"] == rows[2]["executed_at"] == events[5]["at"]
    # A new acknowledgement starts a new timer, at the level last executed (level 1, of round 2).
    act(http, incident["id"], "acknowledge")
    assert steps(escalations(http, incident["id"]))[3:] == [
        (2, 2, "level", "CANCELLED"),
        (3, 1, "ack_timeout", "PENDING"),
    ]
    act(http, incident["id"], "resolve")
    time.sleep(1.5)  # past the moment the timer would have run out
    assert steps(escalations(http, incident["id"]))[4] == (3, 1, "ack_timeout", "CANCELLED")
    events = http.get(f"{http.base}/incidents/{incident['id']}/events", timeout=5).json()["items"]
    assert [e["type"] for e in events][-2:] == ["acknowledged", "resolved"]
    assert events[-1]["data"]["cancelled_escalations"] == 1


def wait_statuses(http, incident_id, expected: list[str], timeout: float = 10) -> list[dict]:
    return eventually(
        lambda: (r := escalations(http, incident_id)) and [e["status"] for e in r] == expected and r,
        timeout=timeout,
    )


@pytest.mark.parametrize("action", ["acknowledge", "resolve", "cancel"])
def test_leaving_escalating_stops_pending_levels_and_nothing_fires_after(http, action):
    incident = create(http)
    act(http, incident["id"], "escalate")
    # Level 1 fires after 1 s; stop the chain while level 2 is pending.
    wait_statuses(http, incident["id"], ["EXECUTED", "PENDING"])
    left = act(http, incident["id"], action)
    left_at = ts(
        left[{"acknowledge": "acknowledged_at", "resolve": "resolved_at", "cancel": "cancelled_at"}[action]]
    )
    # Wait past the moment level 2 and level 3 would have fired.
    import time

    time.sleep(3)
    rows = escalations(http, incident["id"])
    assert [e["status"] for e in rows] == ["EXECUTED", "CANCELLED"]
    assert ts(rows[0]["executed_at"]) < left_at
    assert rows[1]["executed_at"] is None
    events = http.get(f"{http.base}/incidents/{incident['id']}/events", timeout=5).json()["items"]
    assert [e["type"] for e in events][-1] == {
        "acknowledge": "acknowledged",
        "resolve": "resolved",
        "cancel": "cancelled",
    }[action]
    assert events[-1]["data"]["cancelled_escalations"] == 1


def test_original_design_fifteen_scenarios(http):
    """The prototype's 15-step suite, over HTTP, with a real worker and a fast policy."""
    # 1. Health check returns 200
    health = requests.get(f"{http.base}/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    # 2. Create incident (OPEN state)
    first = create(http, title="payments failing")
    assert first["state"] == "OPEN"
    # 3. Escalate incident (OPEN -> ESCALATING)
    assert act(http, first["id"], "escalate")["state"] == "ESCALATING"
    # 4. Create second incident for acknowledge path
    second = create(http, title="slow search")
    # 5. Acknowledge incident (OPEN -> ACKNOWLEDGED)
    assert act(http, second["id"], "acknowledge")["state"] == "ACKNOWLEDGED"
    # 6. Resolve from ACKNOWLEDGED
    assert act(http, second["id"], "resolve")["state"] == "RESOLVED"
    # 7. Escalation record created in DB (original path), and level 1 executes
    original = http.get(f"{http.base}/incidents/escalations/{first['id']}", timeout=5).json()["items"]
    assert [(e["escalation_level"], e["status"]) for e in original] == [(1, "PENDING")]
    wait_statuses(http, first["id"], ["EXECUTED", "PENDING"])
    # 8. Resolve incident (ESCALATING -> RESOLVED)
    assert act(http, first["id"], "resolve")["state"] == "RESOLVED"
    # 9. Pending escalations cancelled on resolve
    assert [e["status"] for e in escalations(http, first["id"])] == ["EXECUTED", "CANCELLED"]
    # 10. Invalid transition from RESOLVED rejected
    refused = act(http, first["id"], "escalate", expect=409)
    assert "RESOLVED" in refused["message"]
    # 11. Create third incident for cancellation test; 12. escalate it
    third = create(http, title="disk full")
    act(http, third["id"], "escalate")
    # 13. Cancel incident (ESCALATING -> CANCELLED)
    assert act(http, third["id"], "cancel")["state"] == "CANCELLED"
    # 14. Pending escalations cancelled on cancel
    assert [e["status"] for e in escalations(http, third["id"])] == ["CANCELLED"]
    # 15. Invalid transition ACKNOWLEDGED -> ESCALATING rejected
    fourth = create(http, title="cert expiring")
    act(http, fourth["id"], "acknowledge")
    assert act(http, fourth["id"], "escalate", expect=409)["errors"] == {"state": ["ACKNOWLEDGED"]}
    # Nothing fired after the cancellations.
    import time

    time.sleep(1.5)
    assert [e["status"] for e in escalations(http, third["id"])] == ["CANCELLED"]
    assert [e["status"] for e in escalations(http, first["id"])] == ["EXECUTED", "CANCELLED"]


def test_the_same_task_delivered_ten_times_executes_once(http):
    """Ten copies of one escalation's task at once: one EXECUTED row, one next level, one event."""
    incident = create(http, policy="slow")
    act(http, incident["id"], "escalate")
    level1 = escalations(http, incident["id"])[0]
    # Make it due now, as if an hour had passed.
    with http.db.begin() as session:
        from sqlalchemy import text

        session.execute(
            text("UPDATE escalations SET scheduled_at = now() WHERE id = :id"), {"id": level1["id"]}
        )
    http.publish("escalations.execute", level1["id"], copies=10)
    rows = wait_statuses(http, incident["id"], ["EXECUTED", "PENDING"])
    import time

    time.sleep(1)  # let every copy run
    rows = escalations(http, incident["id"])
    assert [(e["escalation_level"], e["status"]) for e in rows] == [(1, "EXECUTED"), (2, "PENDING")]
    events = http.get(f"{http.base}/incidents/{incident['id']}/events", timeout=5).json()["items"]
    assert [e["type"] for e in events].count("escalation_executed") == 1
    act(http, incident["id"], "resolve")


def due_now(http, count: int) -> tuple[list[dict], list[str]]:
    """`count` incidents escalated by the slow policy, their level 1 made due now (not published
    again: a test hands them to the worker itself); (incidents, level 1 ids)."""
    from sqlalchemy import text

    incidents = [create(http, policy="slow") for _ in range(count)]
    for incident in incidents:
        act(http, incident["id"], "escalate")
    ids = [escalations(http, i["id"])[0]["id"] for i in incidents]
    with http.db.begin() as session:
        session.execute(
            text("UPDATE escalations SET scheduled_at = now() WHERE id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": ids},
        )
    return incidents, ids


# Level 2 without its "notify": scheduling it fails.
CORRUPT_LEVELS = '[{"delay_ms": 0, "notify": ["in_app"]}, {"delay_ms": 1000}]'


def test_one_message_runs_the_levels_it_carries_and_a_broken_one_holds_up_none_of_the_others(http):
    """A message carries a batch. An escalation whose step fails (here: its incident's stored levels
    are corrupt, so its next level cannot be scheduled) fails its batch's transaction; the worker
    then runs the others one by one, and only the broken one stays PENDING, for the sweep."""
    from sqlalchemy import text

    incidents, ids = due_now(http, 3)
    with http.db.begin() as session:
        session.execute(
            text("UPDATE incidents SET policy_levels = CAST(:levels AS JSONB) WHERE id = CAST(:id AS uuid)"),
            {"levels": CORRUPT_LEVELS, "id": incidents[2]["id"]},
        )
    http.publish("escalations.execute", ids[:2] + [str(uuid.uuid4())])
    first = [wait_statuses(http, i["id"], ["EXECUTED", "PENDING"]) for i in incidents[:2]]
    # One transaction: one clock for both.
    assert first[0][0]["executed_at"] == first[1][0]["executed_at"]
    for incident in incidents[:2]:
        act(http, incident["id"], "resolve")

    more, good = due_now(http, 2)
    http.publish("escalations.execute", [good[0], ids[2], good[1]])
    for incident in more:
        wait_statuses(http, incident["id"], ["EXECUTED", "PENDING"])
        act(http, incident["id"], "resolve")
    assert [e["status"] for e in escalations(http, incidents[2]["id"])] == ["PENDING"]
    act(http, incidents[2]["id"], "cancel")


def test_two_sweeps_at_once_take_disjoint_rows(http):
    """SKIP LOCKED: concurrent sweeps never hand the same escalation over twice."""
    import threading

    from sqlalchemy import text

    from models import engine

    incidents = [create(http, policy="slow") for _ in range(20)]
    for incident in incidents:
        act(http, incident["id"], "escalate")
    ids = [escalations(http, i["id"])[0]["id"] for i in incidents]
    # A wider horizon than the worker's own sweep (60 s), so that only these two sweeps see the rows.
    settings = engine.EngineSettings(eta_horizon_s=600, redelivery_grace_s=2, sweep_batch=7)
    factory = http.db
    barrier = threading.Barrier(2)
    taken: list[list] = [[], []]
    # Bring them within the horizon, never handed over; both sweeps then race for them.
    with factory.begin() as session:
        session.execute(
            text(
                "UPDATE escalations SET scheduled_at = now() + interval '300 seconds', published_at = NULL "
                "WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": ids},
        )

    def run(slot):
        with factory() as session:
            barrier.wait()
            while True:
                outbox = engine.Outbox()
                with session.begin():
                    handed, _ = engine.sweep(session, settings, outbox)
                    handed = [e for message in outbox.publish for e in message.escalation_ids]
                    taken[slot].extend(e for e in handed if str(e) in ids)
                if not handed:
                    return

    threads = [threading.Thread(target=run, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not set(taken[0]) & set(taken[1])
    assert sorted(map(str, taken[0] + taken[1])) == sorted(ids)
    for incident in incidents:
        act(http, incident["id"], "cancel")


def test_far_future_level_is_left_to_the_sweep_until_it_enters_the_horizon(http):
    """A level due beyond the ETA horizon is not given to the broker at all (no Redis redelivery,
    no worker memory); the sweep hands it over once it comes within the horizon, and it fires on time."""
    from sqlalchemy import text

    incident = create(http, policy="slow")
    act(http, incident["id"], "escalate")
    level1 = escalations(http, incident["id"])[0]
    with http.db.begin() as session:
        published = session.execute(
            text("SELECT task_id, published_at FROM escalations WHERE id = :id"), {"id": level1["id"]}
        ).one()
        assert tuple(published) == (None, None)
        # An hour has passed: the level is now due in 3 s, inside the horizon.
        session.execute(
            text("UPDATE escalations SET scheduled_at = now() + interval '3 seconds' WHERE id = :id"),
            {"id": level1["id"]},
        )
    rows = wait_statuses(http, incident["id"], ["EXECUTED", "PENDING"], timeout=15)
    lateness = (ts(rows[0]["executed_at"]) - ts(rows[0]["scheduled_at"])).total_seconds()
    assert 0 <= lateness < 1.0
    act(http, incident["id"], "resolve")
