"""Concurrency: 50 conflicting transitions on one incident at once, through real HTTP (gunicorn with
several processes and threads): the row lock lets exactly one win, the rest get 409, and exactly one
transition is recorded (50 escalates: one transition, then each level paged once)."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import select

from models.escalation import Escalation
from models.incident import IncidentEvent

N = 50
ROUNDS = 3
TARGET = {
    "acknowledge": "ACKNOWLEDGED",
    "escalate": "ESCALATING",
    "resolve": "RESOLVED",
    "cancel": "CANCELLED",
}
EVENT_TYPE = {
    "acknowledge": "acknowledged",
    "escalate": "escalated",
    "resolve": "resolved",
    "cancel": "cancelled",
}

# (state to start from, the 50 actions fired at once). Every mix is a real conflict: once any one
# action has succeeded, every other one is refused.
SCENARIOS = {
    "open-resolve-vs-cancel": ("OPEN", ["resolve"] * 25 + ["cancel"] * 25),
    "open-acknowledge-x50": ("OPEN", ["acknowledge"] * 50),
    "escalating-resolve-vs-cancel": ("ESCALATING", ["resolve"] * 25 + ["cancel"] * 25),
    "acknowledged-resolve-vs-cancel": ("ACKNOWLEDGED", ["resolve", "cancel"] * 25),
}
PATH_TO = {"OPEN": [], "ESCALATING": ["escalate"], "ACKNOWLEDGED": ["acknowledge"]}


@pytest.fixture(scope="module")
def base(web):
    return web


@pytest.fixture(scope="module")
def headers(make_key):
    return make_key(f"conc-{uuid.uuid4().hex[:8]}")


def prepare(base, headers, state) -> dict:
    response = requests.post(
        f"{base}/incidents", json={"title": "race", "policy": "slow"}, headers=headers, timeout=10
    )
    assert response.status_code == 201, response.text
    incident = response.json()
    for action in PATH_TO[state]:
        response = requests.post(f"{base}/incidents/{incident['id']}/{action}", headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        incident = response.json()
    assert incident["state"] == state
    return incident


def fire(base, headers, incident_id, actions) -> list[tuple[str, requests.Response]]:
    """Send every action at once (a barrier releases all threads together)."""
    barrier = threading.Barrier(len(actions))

    def one(action):
        with requests.Session() as session:
            session.headers.update(headers)
            # Open the connection before the barrier so that the requests really arrive together.
            session.get(f"{base}/health", timeout=10)
            barrier.wait(timeout=30)
            return action, session.post(f"{base}/incidents/{incident_id}/{action}", timeout=30)

    with ThreadPoolExecutor(max_workers=len(actions)) as pool:
        return list(pool.map(one, actions))


def transition_events(app, incident_id) -> list[IncidentEvent]:
    with app.extensions["db"]() as session:
        return list(
            session.scalars(
                select(IncidentEvent)
                .where(IncidentEvent.incident_id == uuid.UUID(incident_id), IncidentEvent.type != "created")
                .order_by(IncidentEvent.id)
            )
        )


@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_fifty_conflicting_transitions_exactly_one_wins(app, base, headers, scenario, round_):
    start, actions = SCENARIOS[scenario]
    assert len(actions) == N
    incident = prepare(base, headers, start)
    before = transition_events(app, incident["id"])
    results = fire(base, headers, incident["id"], actions)

    statuses = Counter(response.status_code for _, response in results)
    assert statuses == {200: 1, 409: N - 1}, statuses
    [(winning_action, winner)] = [(a, r) for a, r in results if r.status_code == 200]
    final_state = TARGET[winning_action]
    assert winner.json()["state"] == final_state

    # Every loser was told the state the winner left and which transition was refused.
    for action, response in results:
        if response.status_code != 409:
            continue
        body = response.json()
        assert set(body) == {"code", "status", "message", "errors"}
        assert (body["code"], body["status"]) == (409, "Conflict")
        assert body["errors"] == {"state": [final_state]}
        assert body["message"] == (
            f"cannot {action} an incident that is {final_state} "
            f"({final_state} -> {TARGET[action]} is not allowed)"
        )

    # Exactly one transition row was added, and it is the winner's.
    after = transition_events(app, incident["id"])
    added = after[len(before) :]
    assert [(e.type, e.from_state.value, e.to_state.value) for e in added] == [
        (EVENT_TYPE[winning_action], start, final_state)
    ]
    assert added[0].at.isoformat() == winner.json()["updated_at"]

    # The incident as stored agrees.
    current = requests.get(f"{base}/incidents/{incident['id']}", headers=headers, timeout=10).json()
    assert current == winner.json()

    with app.extensions["db"]() as session:
        rows = session.scalars(
            select(Escalation).where(Escalation.incident_id == uuid.UUID(incident["id"]))
        ).all()
    if start == "ESCALATING":
        assert [(r.escalation_level, r.status.value) for r in rows] == [(1, "CANCELLED")]
        assert added[0].data == {"cancelled_escalations": 1}
    else:
        assert rows == []


def test_fifty_escalates_at_once_start_one_escalation_and_page_each_level_once(app, base, headers):
    """The first escalate starts the escalation; each of the others finds it escalating and pages the
    lowest level pending under the lock (escalate now) until none is left: one 'escalated' entry,
    each level of the slow policy (two) executed once, every other answer a 409."""
    incident = prepare(base, headers, "OPEN")
    results = fire(base, headers, incident["id"], ["escalate"] * N)
    assert Counter(response.status_code for _, response in results) == {200: 3, 409: N - 3}
    for _, response in results:
        if response.status_code == 409:
            assert response.json()["errors"] == {"state": ["ESCALATING"]}
    added = transition_events(app, incident["id"])
    assert [e.type for e in added] == ["escalated", "escalation_executed", "escalation_executed"]
    with app.extensions["db"]() as session:
        rows = session.scalars(
            select(Escalation)
            .where(Escalation.incident_id == uuid.UUID(incident["id"]))
            .order_by(Escalation.escalation_level)
        ).all()
    assert [(r.escalation_level, r.status.value, r.manual) for r in rows] == [
        (1, "EXECUTED", True),
        (2, "EXECUTED", True),
    ]


def test_fifty_concurrent_reports_with_one_dedup_key_open_one_incident(base, headers):
    """The partial unique index decides: one 201, 49 reports of that same incident (200)."""
    key = f"race-{uuid.uuid4().hex[:8]}"
    barrier = threading.Barrier(N)

    def report(_):
        barrier.wait()
        return requests.post(
            f"{base}/incidents", json={"title": "race", "dedup_key": key}, headers=headers, timeout=30
        )

    with ThreadPoolExecutor(N) as pool:
        responses = list(pool.map(report, range(N)))
    assert Counter(r.status_code for r in responses) == {201: 1, 200: N - 1}
    assert len({r.json()["id"] for r in responses}) == 1
    incident_id = responses[0].json()["id"]
    timeline = requests.get(f"{base}/incidents/{incident_id}/events", headers=headers, timeout=10).json()[
        "items"
    ]
    # Every report counted (none lost to the race); the timeline says so once within the minute.
    assert Counter(e["type"] for e in timeline) == {"created": 1, "reported_again": 1}
    incident = requests.get(f"{base}/incidents/{incident_id}", headers=headers, timeout=10).json()
    assert incident["report_count"] == N
