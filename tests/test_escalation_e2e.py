"""The escalation engine end to end: HTTP API (gunicorn), real Redis, a real Celery worker with the
sweep, a fast policy (levels of about a second)."""

from __future__ import annotations

from datetime import datetime

import pytest
import requests

from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@pytest.fixture(scope="module")
def http(web, worker, auth):
    session = requests.Session()
    session.headers.update(auth)
    session.base = web
    return session


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
    assert [e["notify"] for e in rows] == [["in_app"], ["email"], ["sms"]]
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
