"""The REST API against the real Postgres through the Flask test client: every endpoint, every error
status, auth and tenancy, pagination, the timeline, escalation records, the original design's
scenarios that need no worker, the API key CLI, and the database's own append-only guards.

Incidents that escalate use the 'slow' policy of tests/policies/fast.yaml (levels an hour apart), so no
worker is needed and nothing is handed to the broker."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
import uuid
from datetime import datetime, timedelta

import psycopg2
import pytest
from alembic import command
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from api.schemas import SINGLE_LINE_ERROR
from models import engine
from models.api_key import ApiKey, Scope, hash_key, new_key
from models.escalation import Escalation
from models.incident import Incident, IncidentEvent
from tests.conftest import SERVER_URL, alembic_config
from tests.support import servers

INCIDENT_FIELDS = {
    "id",
    "title",
    "description",
    "severity",
    "state",
    "policy",
    "policy_version",
    "dedup_key",
    "created_at",
    "updated_at",
    "acknowledged_at",
    "escalated_at",
    "resolved_at",
    "cancelled_at",
    "report_count",
    "last_reported_at",
}
ESCALATION_FIELDS = {
    "id",
    "incident_id",
    "escalation_level",
    "round",
    "kind",
    "status",
    "manual",
    "actor",
    "reason",
    "notify",
    "scheduled_at",
    "executed_at",
    "created_at",
    "updated_at",
}
EVENT_FIELDS = {"id", "incident_id", "type", "from_state", "to_state", "actor", "at", "data"}
STATES = ("OPEN", "ACKNOWLEDGED", "ESCALATING", "RESOLVED", "CANCELLED")
ACTIONS = ("acknowledge", "escalate", "resolve", "cancel")
TARGET = {
    "acknowledge": "ACKNOWLEDGED",
    "escalate": "ESCALATING",
    "resolve": "RESOLVED",
    "cancel": "CANCELLED",
}
ALLOWED = {
    ("OPEN", "acknowledge"),
    ("OPEN", "escalate"),
    ("OPEN", "resolve"),
    ("OPEN", "cancel"),
    ("ACKNOWLEDGED", "resolve"),
    ("ACKNOWLEDGED", "cancel"),
    ("ESCALATING", "acknowledge"),
    ("ESCALATING", "resolve"),
    ("ESCALATING", "cancel"),
}
# How to reach each state from OPEN.
PATH_TO = {
    "OPEN": [],
    "ACKNOWLEDGED": ["acknowledge"],
    "ESCALATING": ["escalate"],
    "RESOLVED": ["resolve"],
    "CANCELLED": ["cancel"],
}
TIMESTAMP = {
    "ACKNOWLEDGED": "acknowledged_at",
    "ESCALATING": "escalated_at",
    "RESOLVED": "resolved_at",
    "CANCELLED": "cancelled_at",
}
EVENT_TYPE = {
    "ACKNOWLEDGED": "acknowledged",
    "ESCALATING": "escalated",
    "RESOLVED": "resolved",
    "CANCELLED": "cancelled",
}
HOUR = timedelta(hours=1)
MISSING_ID = "00000000-0000-4000-8000-000000000000"
NOT_FOUND_URL = (
    "The requested URL was not found on the server. If you entered the URL manually please check "
    "your spelling and try again."
)
INVALID_REQUEST = "The request is invalid: `errors` names each field and what is wrong with it."


# --- helpers ----------------------------------------------------------------------------------


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def assert_error(response, code: int, status: str, message: str | None = None, errors=None) -> dict:
    """Every error is JSON of one shape: {code, status, message[, errors]}."""
    assert response.status_code == code, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) in ({"code", "status", "message"}, {"code", "status", "message", "errors"}), body
    assert body["code"] == code
    assert body["status"] == status
    assert isinstance(body["message"], str) and body["message"]
    if message is not None:
        assert body["message"] == message
    if errors is not None:
        assert body["errors"] == errors
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def post_raw(client, url, headers, data, content_type="application/json"):
    return client.post(url, data=data, headers={**headers, "Content-Type": content_type})


@pytest.fixture
def tenant(make_key):
    """A write key of a tenant of its own: this test's incidents are the only ones it sees."""
    return make_key(f"t-{uuid.uuid4().hex[:12]}")


def create(client, headers, **body) -> dict:
    response = client.post("/incidents", json={"title": "checkout is down", **body}, headers=headers)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()


def act(client, headers, incident_id, action, expect=200, **body) -> dict:
    response = client.post(f"/incidents/{incident_id}/{action}", json=body or None, headers=headers)
    assert response.status_code == expect, response.get_data(as_text=True)
    return response.get_json()


def in_state(client, headers, state: str) -> dict:
    """A new incident (policy 'slow') brought to `state`."""
    incident = create(client, headers, policy="slow")
    for action in PATH_TO[state]:
        incident = act(client, headers, incident["id"], action)
    assert incident["state"] == state
    return incident


def get(client, headers, url) -> dict:
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def events(client, headers, incident_id) -> list[dict]:
    return get(client, headers, f"/incidents/{incident_id}/events")["items"]


def escalations(client, headers, incident_id) -> list[dict]:
    return get(client, headers, f"/incidents/{incident_id}/escalations")["items"]


def tenant_of(app, headers) -> str:
    token = headers["Authorization"].split(" ", 1)[1]
    with app.extensions["db"]() as session:
        return session.scalar(select(ApiKey.tenant).where(ApiKey.secret_hash == hash_key(token)))


def key_id(app, headers) -> uuid.UUID:
    token = headers["Authorization"].split(" ", 1)[1]
    with app.extensions["db"]() as session:
        return session.scalar(select(ApiKey.id).where(ApiKey.secret_hash == hash_key(token)))


def event_rows(app, incident_id) -> list[IncidentEvent]:
    with app.extensions["db"]() as session:
        return list(
            session.scalars(
                select(IncidentEvent)
                .where(IncidentEvent.incident_id == uuid.UUID(incident_id))
                .order_by(IncidentEvent.id)
            )
        )


def cursor_of(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


# --- POST /incidents, GET /incidents/{id} -----------------------------------------------------


def test_create_returns_201_with_location_and_the_incident(client, tenant):
    response = client.post(
        "/incidents",
        json={
            "title": "checkout is down",
            "description": "500s on /pay\nsince 09:00",
            "severity": "critical",
        },
        headers=tenant,
    )
    assert response.status_code == 201
    incident = response.get_json()
    assert set(incident) == INCIDENT_FIELDS
    uuid.UUID(incident["id"])
    assert response.headers["Location"] == f"/incidents/{incident['id']}"
    assert incident["title"] == "checkout is down"
    assert incident["description"] == "500s on /pay\nsince 09:00"
    assert incident["severity"] == "critical"
    assert incident["state"] == "OPEN"
    assert incident["policy"] is None
    created = ts(incident["created_at"])
    assert created.utcoffset() == timedelta(0)
    assert abs((datetime.now(created.tzinfo) - created).total_seconds()) < 60
    assert incident["updated_at"] == incident["created_at"]
    for field in ("acknowledged_at", "escalated_at", "resolved_at", "cancelled_at"):
        assert incident[field] is None
    assert get(client, tenant, response.headers["Location"]) == incident


def test_create_defaults(client, tenant):
    incident = create(client, tenant, title="x")
    assert (incident["title"], incident["description"], incident["severity"], incident["policy"]) == (
        "x",
        "",
        "high",
        None,
    )


@pytest.mark.parametrize("severity", ["critical", "high", "medium", "low"])
def test_create_each_severity(client, tenant, severity):
    assert create(client, tenant, severity=severity)["severity"] == severity


@pytest.mark.parametrize("policy", ["fast", "slow", "single"])
def test_create_with_a_known_policy(client, tenant, policy):
    assert create(client, tenant, policy=policy)["policy"] == policy


def test_create_with_unknown_policy_is_422(client, tenant):
    response = client.post("/incidents", json={"title": "x", "policy": "gold"}, headers=tenant)
    assert_error(
        response,
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"json": {"policy": ["Unknown policy 'gold'."]}},
    )
    assert get(client, tenant, "/incidents")["items"] == []


def test_create_accepts_limits_exactly(client, tenant):
    incident = create(client, tenant, title="t" * 200, description="d" * 10_000)
    assert len(incident["title"]) == 200 and len(incident["description"]) == 10_000
    assert create(client, tenant, title="naïve ☃ 事件")["title"] == "naïve ☃ 事件"


def test_get_incident(client, tenant):
    incident = create(client, tenant, severity="low")
    assert get(client, tenant, f"/incidents/{incident['id']}") == incident
    assert get(client, tenant, f"/incidents/{incident['id'].upper()}") == incident


# --- the four transitions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "action"),
    # Escalate on an ESCALATING incident pages a level now: tests of its own, below.
    [
        (state, action)
        for state in STATES
        for action in ACTIONS
        if (state, action) != ("ESCALATING", "escalate")
    ],
)
def test_every_transition_through_the_api(client, tenant, app, state, action):
    incident = in_state(client, tenant, state)
    before_events = len(events(client, tenant, incident["id"]))
    response = client.post(f"/incidents/{incident['id']}/{action}", headers=tenant)
    if (state, action) in ALLOWED:
        assert response.status_code == 200, response.get_data(as_text=True)
        after = response.get_json()
        target = TARGET[action]
        assert set(after) == INCIDENT_FIELDS
        assert after["state"] == target
        assert after[TIMESTAMP[target]] == after["updated_at"]
        assert ts(after["updated_at"]) > ts(incident["updated_at"])
        # Timestamps of states reached before are kept.
        for field in {"created_at"} | {TIMESTAMP[s] for s in [state] if s in TIMESTAMP}:
            assert after[field] == incident[field]
        assert get(client, tenant, f"/incidents/{incident['id']}") == after
        timeline = events(client, tenant, incident["id"])
        assert len(timeline) == before_events + 1
        assert (timeline[-1]["type"], timeline[-1]["from_state"], timeline[-1]["to_state"]) == (
            EVENT_TYPE[target],
            state,
            target,
        )
    else:
        target = TARGET[action]
        assert_error(
            response,
            409,
            "Conflict",
            f"cannot {action} an incident that is {state} ({state} -> {target} is not allowed)",
            {"state": [state]},
        )
        assert get(client, tenant, f"/incidents/{incident['id']}") == incident
        assert len(events(client, tenant, incident["id"])) == before_events


def test_409_names_current_state_and_refused_transition(client, tenant):
    incident = in_state(client, tenant, "ACKNOWLEDGED")
    body = assert_error(client.post(f"/incidents/{incident['id']}/escalate", headers=tenant), 409, "Conflict")
    assert "ACKNOWLEDGED" in body["message"] and "ACKNOWLEDGED -> ESCALATING" in body["message"]
    assert body["errors"] == {"state": ["ACKNOWLEDGED"]}


# --- escalate now: POST .../escalate on an ESCALATING incident ------------------------------------------


def escalating_slowly(client, tenant) -> dict:
    """An incident escalating by the slow policy: level 1 due in an hour, level 2 an hour after."""
    incident = create(client, tenant, policy="slow")
    act(client, tenant, incident["id"], "escalate")
    return incident


def test_escalate_now_pages_the_lowest_pending_level_and_the_chain_goes_on_from_it(client, tenant, app):
    incident = escalating_slowly(client, tenant)
    act(client, tenant, incident["id"], "escalate")
    rows = escalations(client, tenant, incident["id"])
    key = events(client, tenant, incident["id"])[0]["actor"]
    assert [(e["escalation_level"], e["status"], e["manual"], e["actor"]) for e in rows] == [
        (1, "EXECUTED", True, key),
        (2, "PENDING", False, None),
    ]
    assert ts(rows[0]["executed_at"]) < ts(rows[0]["scheduled_at"])  # before its time: a person asked
    assert ts(rows[1]["scheduled_at"]) - ts(rows[0]["executed_at"]) == HOUR
    executed = events(client, tenant, incident["id"])[-1]
    assert (executed["type"], executed["actor"], executed["data"]["manual"]) == (
        "escalation_executed",
        key,
        True,
    )


def test_escalate_now_to_a_named_level_skips_the_ones_before_and_pages_it_once(client, tenant):
    incident = escalating_slowly(client, tenant)
    act(client, tenant, incident["id"], "escalate", level=2)
    rows = escalations(client, tenant, incident["id"])
    assert [(e["escalation_level"], e["status"], e["manual"], e["reason"]) for e in rows] == [
        (1, "CANCELLED", False, "skipped: level 2 paged now"),
        (2, "EXECUTED", True, None),
    ]
    timeline = events(client, tenant, incident["id"])
    # Pressed again (by a second responder): the level has run, 200 and nothing changes.
    for level in (2, 1):
        act(client, tenant, incident["id"], "escalate", level=level)
    assert escalations(client, tenant, incident["id"]) == rows
    assert events(client, tenant, incident["id"]) == timeline
    # The slow policy's last level has run: nothing is left to page.
    body = assert_error(client.post(f"/incidents/{incident['id']}/escalate", headers=tenant), 409, "Conflict")
    assert body["message"] == "Nothing left to page: every level of the incident's policy has run."
    assert body["errors"] == {"state": ["ESCALATING"]}


def test_escalate_now_refuses_a_level_the_policy_lacks_or_a_state_with_none(client, tenant):
    incident = escalating_slowly(client, tenant)
    body = assert_error(
        client.post(f"/incidents/{incident['id']}/escalate", json={"level": 3}, headers=tenant),
        422,
        "Unprocessable Entity",
    )
    assert body["errors"] == {"json": {"level": ["The incident's policy has 2 levels."]}}
    assert_error(
        client.post(f"/incidents/{incident['id']}/escalate", json={"level": 0}, headers=tenant),
        422,
        "Unprocessable Entity",
    )
    opened = create(client, tenant, policy="slow")
    body = assert_error(
        client.post(f"/incidents/{opened['id']}/escalate", json={"level": 1}, headers=tenant),
        422,
        "Unprocessable Entity",
    )
    assert body["errors"] == {"json": {"level": ["Only an ESCALATING incident has a level to page now."]}}
    assert [e["status"] for e in escalations(client, tenant, incident["id"])] == ["PENDING"]
    assert get(client, tenant, f"/incidents/{opened['id']}")["state"] == "OPEN"


def test_transition_with_a_note_records_it(client, tenant):
    incident = create(client, tenant)
    act(client, tenant, incident["id"], "acknowledge", note="on it\n- alice")
    act(client, tenant, incident["id"], "resolve", note="rolled back deploy 42")
    timeline = events(client, tenant, incident["id"])
    assert [e["data"] for e in timeline] == [
        {},
        {"note": "on it\n- alice"},
        {"note": "rolled back deploy 42"},
    ]


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"note": "x" * 2001}, {"note": ["Longer than maximum length 2000."]}),
        ({"note": 5}, {"note": ["Not a valid string."]}),
        ({"note": "a\x00b"}, {"note": ["Control characters are not allowed."]}),
        ({"note": "ok", "actor": "me"}, {"actor": ["Unknown field."]}),
        ({"state": "RESOLVED"}, {"state": ["Unknown field."]}),
    ],
)
def test_transition_body_is_validated(client, tenant, body, errors):
    incident = create(client, tenant)
    response = client.post(f"/incidents/{incident['id']}/resolve", json=body, headers=tenant)
    assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"json": errors})
    assert get(client, tenant, f"/incidents/{incident['id']}")["state"] == "OPEN"


def test_transition_accepts_an_empty_json_object_or_no_body(client, tenant):
    first, second = create(client, tenant), create(client, tenant)
    response = post_raw(client, f"/incidents/{first['id']}/cancel", tenant, "{}")
    assert response.status_code == 200 and response.get_json()["state"] == "CANCELLED"
    response = client.post(f"/incidents/{second['id']}/cancel", headers=tenant)
    assert response.status_code == 200 and response.get_json()["state"] == "CANCELLED"


# --- /events: the timeline ---------------------------------------------------------------------


def test_timeline_of_a_full_life(client, app, make_key):
    tenant_name = f"t-{uuid.uuid4().hex[:12]}"
    alice, bob = make_key(tenant_name), make_key(tenant_name)
    alice_id, bob_id = key_id(app, alice), key_id(app, bob)
    incident = create(client, alice, policy="slow")
    escalated = act(client, alice, incident["id"], "escalate")
    acknowledged = act(client, bob, incident["id"], "acknowledge", note="looking")
    resolved = act(client, alice, incident["id"], "resolve", note="fixed")
    timeline = events(client, bob, incident["id"])
    assert all(set(e) == EVENT_FIELDS for e in timeline)
    assert all(e["incident_id"] == incident["id"] for e in timeline)
    assert [(e["type"], e["from_state"], e["to_state"], e["actor"]) for e in timeline] == [
        ("created", None, "OPEN", str(alice_id)),
        ("escalated", "OPEN", "ESCALATING", str(alice_id)),
        ("acknowledged", "ESCALATING", "ACKNOWLEDGED", str(bob_id)),
        ("resolved", "ACKNOWLEDGED", "RESOLVED", str(alice_id)),
    ]
    assert [e["at"] for e in timeline] == [
        incident["created_at"],
        escalated["escalated_at"],
        acknowledged["acknowledged_at"],
        resolved["resolved_at"],
    ]
    assert [e["data"] for e in timeline] == [
        {},
        {"policy": "slow", "levels": 2, "repeat": 0},
        {"note": "looking", "cancelled_escalations": 1},
        {"note": "fixed"},
    ]
    ids = [e["id"] for e in timeline]
    assert ids == sorted(ids) and len(set(ids)) == 4
    # The same rows in the database, one per transition.
    assert [row.type for row in event_rows(app, incident["id"])] == [
        "created",
        "escalated",
        "acknowledged",
        "resolved",
    ]


def test_timeline_of_a_cancelled_incident(client, app, tenant):
    incident = create(client, tenant)
    cancelled = act(client, tenant, incident["id"], "cancel", note="duplicate of INC-7")
    timeline = events(client, tenant, incident["id"])
    assert [(e["type"], e["from_state"], e["to_state"], e["data"]) for e in timeline] == [
        ("created", None, "OPEN", {}),
        ("cancelled", "OPEN", "CANCELLED", {"note": "duplicate of INC-7"}),
    ]
    assert timeline[1]["at"] == cancelled["cancelled_at"]
    assert {e["actor"] for e in timeline} == {str(key_id(app, tenant))}


def test_a_refused_transition_records_nothing(client, app, tenant):
    incident = in_state(client, tenant, "RESOLVED")
    for action in ACTIONS:
        assert client.post(f"/incidents/{incident['id']}/{action}", headers=tenant).status_code == 409
    assert [row.type for row in event_rows(app, incident["id"])] == ["created", "resolved"]


# --- escalation records (the 'slow' policy: no worker needed) ---------------------------------


def test_escalate_creates_level_1_pending_due_after_the_policy_delay(client, tenant):
    incident = create(client, tenant, policy="slow")
    escalated = act(client, tenant, incident["id"], "escalate")
    rows = escalations(client, tenant, incident["id"])
    assert len(rows) == 1
    row = rows[0]
    assert set(row) == ESCALATION_FIELDS
    uuid.UUID(row["id"])
    assert row["incident_id"] == incident["id"]
    assert row["escalation_level"] == 1
    assert row["status"] == "PENDING"
    assert row["notify"] == ["in_app"]
    assert ts(row["scheduled_at"]) == ts(escalated["escalated_at"]) + HOUR
    assert row["executed_at"] is None
    assert row["created_at"] == row["updated_at"] == escalated["escalated_at"]
    # The original path answers the same.
    assert get(client, tenant, f"/incidents/escalations/{incident['id']}") == {
        "items": rows,
        "next_cursor": None,
    }


def test_incident_without_escalation_has_none(client, tenant):
    incident = in_state(client, tenant, "ACKNOWLEDGED")
    assert escalations(client, tenant, incident["id"]) == []
    assert get(client, tenant, f"/incidents/escalations/{incident['id']}") == {
        "items": [],
        "next_cursor": None,
    }


@pytest.mark.parametrize("action", ["acknowledge", "resolve", "cancel"])
def test_leaving_escalating_cancels_the_pending_level(client, app, tenant, action):
    incident = in_state(client, tenant, "ESCALATING")
    [pending] = escalations(client, tenant, incident["id"])
    after = act(client, tenant, incident["id"], action)
    [row] = escalations(client, tenant, incident["id"])
    assert row["id"] == pending["id"]
    assert row["status"] == "CANCELLED"
    assert row["executed_at"] is None
    assert row["scheduled_at"] == pending["scheduled_at"]
    assert row["updated_at"] == after[TIMESTAMP[TARGET[action]]]
    assert events(client, tenant, incident["id"])[-1]["data"] == {"cancelled_escalations": 1}
    # Nothing PENDING is left in the database either.
    with app.extensions["db"]() as session:
        statuses = session.scalars(
            select(Escalation.status).where(Escalation.incident_id == uuid.UUID(incident["id"]))
        ).all()
    assert [s.value for s in statuses] == ["CANCELLED"]


def test_escalating_again_after_acknowledge_is_refused_and_adds_no_level(client, tenant):
    incident = in_state(client, tenant, "ESCALATING")
    act(client, tenant, incident["id"], "acknowledge")
    act(client, tenant, incident["id"], "escalate", expect=409)
    assert [(e["escalation_level"], e["status"]) for e in escalations(client, tenant, incident["id"])] == [
        (1, "CANCELLED")
    ]


# --- /health, /openapi.json, /docs ---------------------------------------------------------------


def test_health_needs_no_key(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_health_503_names_the_database_when_it_is_down_and_does_not_hang(app):
    from api import create_app

    broken = create_app({"DATABASE_URL": "postgresql://127.0.0.1:1/nowhere"})
    try:
        started = time.monotonic()
        response = broken.test_client().get("/health")
        assert time.monotonic() - started < 5
        assert response.status_code == 503
        assert response.get_json() == {
            "status": "unavailable",
            "checks": {"database": "unavailable: OperationalError", "broker": "ok"},
        }
        # Any other endpoint: 503 in the one error shape, quickly, no traceback.
        started = time.monotonic()
        response = broken.test_client().get("/incidents", headers={"Authorization": "Bearer inc_x"})
        assert time.monotonic() - started < 5
        assert_error(response, 503, "Service Unavailable", "The database is unavailable; try again shortly.")
    finally:
        # create_app made its Celery app the current one: give the session's app its place back.
        app.extensions["celery"].set_current()
        app.extensions["celery"].set_default()


def test_openapi_document_describes_the_whole_api(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    spec = response.get_json()
    assert spec["openapi"] == "3.0.3"
    assert spec["info"] == {"title": "Incident escalation service", "version": "1.0"}
    assert set(spec["paths"]) == {
        "/health",
        "/incidents",
        "/incidents/{incident_id}",
        "/incidents/{incident_id}/acknowledge",
        "/incidents/{incident_id}/escalate",
        "/incidents/{incident_id}/resolve",
        "/incidents/{incident_id}/cancel",
        "/incidents/{incident_id}/events",
        "/incidents/{incident_id}/escalations",
        "/incidents/escalations/{incident_id}",
        "/incidents/{incident_id}/notifications",
        "/contacts",
        "/contacts/{contact_id}",
        "/contacts/{contact_id}/rotate-secret",
        "/contacts/{contact_id}/test",
        "/contacts/{contact_id}/notifications",
        "/notifications",
        "/notifications/{notification_id}/read",
        "/notifications/read-all",
        "/policies",
        "/policies/{name}",
    }
    assert set(spec["paths"]["/incidents"]) >= {"get", "post"}
    for action in ACTIONS:
        assert "post" in spec["paths"][f"/incidents/{{incident_id}}/{action}"]
    assert spec["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    schemas = spec["components"]["schemas"]
    assert set(schemas["Incident"]["properties"]) == INCIDENT_FIELDS
    assert set(schemas["IncidentCreate"]["properties"]) == {
        "title",
        "description",
        "severity",
        "policy",
        "dedup_key",
    }
    assert schemas["IncidentCreate"]["required"] == ["title"]


def test_interactive_docs(client):
    response = client.get("/docs")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "swagger-ui" in page and 'url: "/openapi.json"' in page


# --- malformed requests: 400, 422, 404, 413, 405 -------------------------------------------------


@pytest.mark.parametrize("payload", ['{"title": ', "{'title': 'x'}", "not json", '{"title": "x",}', "\xff"])
def test_malformed_json_is_400(client, tenant, payload):
    assert_error(
        post_raw(client, "/incidents", tenant, payload),
        400,
        "Bad Request",
        "The request body is not valid JSON.",
        {"json": ["Invalid JSON body."]},
    )


def test_malformed_json_on_a_transition_is_400_and_changes_nothing(client, tenant):
    incident = create(client, tenant)
    assert_error(
        post_raw(client, f"/incidents/{incident['id']}/resolve", tenant, '{"note": "x'),
        400,
        "Bad Request",
        "The request body is not valid JSON.",
    )
    assert get(client, tenant, f"/incidents/{incident['id']}")["state"] == "OPEN"


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"title": ["Missing data for required field."]}),
        ({"title": ""}, {"title": ["Length must be between 1 and 200."]}),
        ({"title": "t" * 201}, {"title": ["Length must be between 1 and 200."]}),
        ({"title": None}, {"title": ["Field may not be null."]}),
        ({"title": 42}, {"title": ["Not a valid string."]}),
        ({"title": ["x"]}, {"title": ["Not a valid string."]}),
        ({"title": "a\nb"}, {"title": [SINGLE_LINE_ERROR]}),
        ({"title": "a\x00b"}, {"title": [SINGLE_LINE_ERROR]}),
        ({"title": "a\x85b"}, {"title": [SINGLE_LINE_ERROR]}),  # C1: NEL
        ({"title": "a\u2028b"}, {"title": [SINGLE_LINE_ERROR]}),  # line separator
        ({"title": "pay\u202eevil"}, {"title": [SINGLE_LINE_ERROR]}),  # right-to-left override
        ({"title": "x", "dedup_key": "k\u2066"}, {"dedup_key": [SINGLE_LINE_ERROR]}),  # isolate
        ({"title": "x", "policy": ""}, {"policy": ["Length must be between 1 and 100."]}),
        ({"title": "x", "policy": "p" * 101}, {"policy": ["Length must be between 1 and 100."]}),
        ({"title": "x", "description": "d" * 10_001}, {"description": ["Longer than maximum length 10000."]}),
        ({"title": "x", "description": "bell\x07"}, {"description": ["Control characters are not allowed."]}),
        ({"title": "x", "severity": "sev1"}, {"severity": ["Must be one of: critical, high, medium, low."]}),
        ({"title": "x", "severity": "HIGH"}, {"severity": ["Must be one of: critical, high, medium, low."]}),
        ({"title": "x", "policy": 3}, {"policy": ["Not a valid string."]}),
        ({"title": "x", "state": "RESOLVED"}, {"state": ["Unknown field."]}),
        ({"title": "x", "id": MISSING_ID}, {"id": ["Unknown field."]}),
        (
            {"title": "", "severity": "x", "tenant": "evil", "extra": 1},
            {
                "title": ["Length must be between 1 and 200."],
                "severity": ["Must be one of: critical, high, medium, low."],
                "tenant": ["Unknown field."],
                "extra": ["Unknown field."],
            },
        ),
    ],
)
def test_schema_violations_and_unknown_fields_are_422_naming_the_fields(client, tenant, body, errors):
    response = client.post("/incidents", json=body, headers=tenant)
    assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"json": errors})
    assert get(client, tenant, "/incidents")["items"] == []


def test_real_text_with_joiners_and_other_scripts_is_accepted(client, tenant):
    """Zero-width joiners and marks are format characters too, and part of real text."""
    title = "db down \U0001f469\u200d\U0001f4bb \u0915\u094d\u200d\u0937 \u05e9\u05dc\u05d5\u05dd"
    incident = create(client, tenant, title=title, description="line 1\r\nline 2\tend")
    assert incident["title"] == title


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        ('{"title": "a\\ud800b"}', {"title": ["Unpaired surrogates are not valid text."]}),
        (
            '{"title": "x", "description": "\\udfff"}',
            {"description": ["Unpaired surrogates are not valid text."]},
        ),
    ],
)
def test_lone_surrogates_are_422_not_500(client, tenant, payload, errors):
    assert_error(
        post_raw(client, "/incidents", tenant, payload),
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"json": errors},
    )
    incident = create(client, tenant)
    response = post_raw(client, f"/incidents/{incident['id']}/resolve", tenant, '{"note": "\\ud83d"}')
    assert_error(
        response,
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"json": {"note": ["Unpaired surrogates are not valid text."]}},
    )
    # A surrogate pair is an ordinary character.
    response = post_raw(client, "/incidents", tenant, '{"title": "fire \\ud83d\\udd25"}')
    assert response.status_code == 201 and response.get_json()["title"] == "fire \U0001f525"


@pytest.mark.parametrize("payload", ["[]", "null", '"title"', "42"])
def test_a_json_body_that_is_not_an_object_is_422(client, tenant, payload):
    assert_error(
        post_raw(client, "/incidents", tenant, payload),
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"json": {"_schema": ["Invalid input type."]}},
    )


@pytest.mark.parametrize(
    "url",
    [
        "/incidents/not-a-uuid",
        "/incidents/123",
        "/incidents/00000000-0000-0000-0000-00000000000g",
        "/incidents/not-a-uuid/events",
        "/incidents/not-a-uuid/escalations",
        "/incidents/escalations/not-a-uuid",
        "/nowhere",
    ],
)
def test_a_non_uuid_id_or_unknown_url_is_404(client, tenant, url):
    assert_error(client.get(url, headers=tenant), 404, "Not Found", NOT_FOUND_URL)


@pytest.mark.parametrize("action", ACTIONS)
def test_a_non_uuid_id_on_a_transition_is_404(client, tenant, action):
    assert_error(client.post(f"/incidents/42/{action}", headers=tenant), 404, "Not Found", NOT_FOUND_URL)


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/incidents/{id}"),
        ("get", "/incidents/{id}/events"),
        ("get", "/incidents/{id}/escalations"),
        ("get", "/incidents/escalations/{id}"),
        ("post", "/incidents/{id}/acknowledge"),
        ("post", "/incidents/{id}/escalate"),
        ("post", "/incidents/{id}/resolve"),
        ("post", "/incidents/{id}/cancel"),
    ],
)
def test_an_unknown_id_is_404(client, tenant, method, url):
    response = getattr(client, method)(url.format(id=MISSING_ID), headers=tenant)
    assert_error(response, 404, "Not Found", f"Incident {MISSING_ID} not found.")


@pytest.mark.parametrize("url", ["/incidents", f"/incidents/{MISSING_ID}/resolve"])
def test_a_body_over_256_kib_is_413(client, tenant, url):
    body = json.dumps({"title": "x", "description": "d" * (256 * 1024)})
    assert len(body) > 256 * 1024
    assert_error(
        post_raw(client, url, tenant, body),
        413,
        "Request Entity Too Large",
        "The data value transmitted exceeds the capacity limit.",
    )
    assert get(client, tenant, "/incidents")["items"] == []


def test_a_body_of_exactly_256_kib_is_accepted(client, tenant):
    body = json.dumps({"title": "padded", "description": "d" * 10})
    body = body[:-1] + " " * (256 * 1024 - len(body)) + "}"
    assert len(body) == 256 * 1024
    response = post_raw(client, "/incidents", tenant, body)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.get_json()["title"] == "padded"


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("delete", "/incidents/{id}", {"GET", "HEAD", "OPTIONS"}),
        ("put", "/incidents/{id}", {"GET", "HEAD", "OPTIONS"}),
        ("patch", "/incidents/{id}", {"GET", "HEAD", "OPTIONS"}),
        ("delete", "/incidents", {"GET", "HEAD", "OPTIONS", "POST"}),
        ("get", "/incidents/{id}/resolve", {"POST", "OPTIONS"}),
        ("put", "/incidents/{id}/escalate", {"POST", "OPTIONS"}),
        ("post", "/incidents/{id}/events", {"GET", "HEAD", "OPTIONS"}),
        ("delete", "/incidents/{id}/escalations", {"GET", "HEAD", "OPTIONS"}),
        ("delete", "/incidents/escalations/{id}", {"GET", "HEAD", "OPTIONS"}),
        ("post", "/health", {"GET", "HEAD", "OPTIONS"}),
    ],
)
def test_wrong_method_is_405(client, tenant, method, url, allowed):
    incident = create(client, tenant)
    response = getattr(client, method)(url.format(id=incident["id"]), headers=tenant)
    assert_error(response, 405, "Method Not Allowed", "The method is not allowed for the requested URL.")
    assert set(response.headers["Allow"].split(", ")) == allowed
    assert get(client, tenant, f"/incidents/{incident['id']}")["state"] == "OPEN"


# --- auth: 401, 403, tenancy --------------------------------------------------------------------

PROTECTED = [
    ("get", "/incidents"),
    ("post", "/incidents"),
    ("get", "/incidents/{id}"),
    ("post", "/incidents/{id}/acknowledge"),
    ("post", "/incidents/{id}/escalate"),
    ("post", "/incidents/{id}/resolve"),
    ("post", "/incidents/{id}/cancel"),
    ("get", "/incidents/{id}/events"),
    ("get", "/incidents/{id}/escalations"),
    ("get", "/incidents/escalations/{id}"),
]


@pytest.fixture
def open_incident(client, tenant):
    return create(client, tenant)


@pytest.mark.parametrize(("method", "url"), PROTECTED)
@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Missing API key: send 'Authorization: Bearer <key>'."),
        ({"Authorization": ""}, "Missing API key: send 'Authorization: Bearer <key>'."),
        ({"Authorization": "Bearer"}, "Missing API key: send 'Authorization: Bearer <key>'."),
        ({"Authorization": "Bearer   "}, "Missing API key: send 'Authorization: Bearer <key>'."),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, "Missing API key: send 'Authorization: Bearer <key>'."),
        ({"Authorization": "Bearer inc_00000000_nope"}, "Invalid or revoked API key."),
    ],
)
def test_missing_or_bad_key_is_401(client, open_incident, method, url, headers, message):
    response = getattr(client, method)(
        url.format(id=open_incident["id"]), headers=headers, json={"title": "x"}
    )
    assert_error(response, 401, "Unauthorized", message)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "url"), PROTECTED)
def test_revoked_key_is_401(client, make_key, open_incident, method, url):
    revoked = make_key("acme", revoked=True)
    response = getattr(client, method)(
        url.format(id=open_incident["id"]), headers=revoked, json={"title": "x"}
    )
    assert_error(response, 401, "Unauthorized", "Invalid or revoked API key.")
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_the_scheme_is_case_insensitive(client, tenant):
    token = tenant["Authorization"].split(" ", 1)[1]
    assert client.get("/incidents", headers={"Authorization": f"bearer {token}"}).status_code == 200
    assert client.get("/incidents", headers={"Authorization": f"BEARER {token}"}).status_code == 200


def test_a_key_with_one_character_changed_is_401(client, tenant):
    token = tenant["Authorization"].split(" ", 1)[1]
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert_error(client.get("/incidents", headers={"Authorization": f"Bearer {forged}"}), 401, "Unauthorized")


def test_read_key_may_only_get(client, make_key):
    tenant_name = f"t-{uuid.uuid4().hex[:12]}"
    writer, reader = make_key(tenant_name), make_key(tenant_name, scope="read")
    incident = create(client, writer, policy="slow")
    act(client, writer, incident["id"], "escalate")
    assert get(client, reader, "/incidents")["items"][0]["id"] == incident["id"]
    assert get(client, reader, f"/incidents/{incident['id']}")["state"] == "ESCALATING"
    assert len(events(client, reader, incident["id"])) == 2
    assert len(escalations(client, reader, incident["id"])) == 1
    assert get(client, reader, f"/incidents/escalations/{incident['id']}")["items"][0]["status"] == "PENDING"
    assert_error(
        client.post("/incidents", json={"title": "x"}, headers=reader),
        403,
        "Forbidden",
        "This API key is read-only.",
    )
    for action in ACTIONS:
        assert_error(
            client.post(f"/incidents/{incident['id']}/{action}", headers=reader),
            403,
            "Forbidden",
            "This API key is read-only.",
        )
    assert get(client, writer, f"/incidents/{incident['id']}")["state"] == "ESCALATING"
    assert len(get(client, writer, "/incidents")["items"]) == 1


def test_another_tenants_incident_is_404_and_never_the_data(client, make_key, app):
    owner, other = make_key(f"t-{uuid.uuid4().hex[:12]}"), make_key(f"t-{uuid.uuid4().hex[:12]}")
    other_reader = make_key(f"t-{uuid.uuid4().hex[:12]}", scope="read")
    incident = create(
        client, owner, title="secret-title-4711", description="secret-description", policy="slow"
    )
    act(client, owner, incident["id"], "escalate")
    for method, url in PROTECTED[2:]:
        for headers in (other, other_reader):
            if method == "post" and headers is other_reader:
                continue  # a read key is refused writing before the incident is looked up
            response = getattr(client, method)(url.format(id=incident["id"]), headers=headers)
            assert_error(response, 404, "Not Found", f"Incident {incident['id']} not found.")
            assert "secret" not in response.get_data(as_text=True)
    assert get(client, other, "/incidents") == {"items": [], "next_cursor": None}
    assert get(client, other, "/incidents?state=ESCALATING") == {"items": [], "next_cursor": None}
    # Untouched by the other tenant's attempts.
    assert get(client, owner, f"/incidents/{incident['id']}")["state"] == "ESCALATING"
    assert [e["type"] for e in events(client, owner, incident["id"])] == ["created", "escalated"]
    assert escalations(client, owner, incident["id"])[0]["status"] == "PENDING"


def test_incidents_belong_to_the_creating_keys_tenant(client, app, make_key):
    tenant_name = f"t-{uuid.uuid4().hex[:12]}"
    incident = create(client, make_key(tenant_name))
    with app.extensions["db"]() as session:
        assert session.get(Incident, uuid.UUID(incident["id"])).tenant == tenant_name


# --- GET /incidents: keyset pagination ----------------------------------------------------------


def test_list_is_newest_first_with_default_limit_20(client, tenant):
    created = [create(client, tenant, title=f"n{i}")["id"] for i in range(23)]
    page = get(client, tenant, "/incidents")
    assert [i["id"] for i in page["items"]] == created[::-1][:20]
    assert all(set(i) == INCIDENT_FIELDS for i in page["items"])
    assert page["next_cursor"]
    rest = get(client, tenant, f"/incidents?cursor={page['next_cursor']}")
    assert [i["id"] for i in rest["items"]] == created[::-1][20:]
    assert rest["next_cursor"] is None


def test_empty_list(client, tenant):
    assert get(client, tenant, "/incidents") == {"items": [], "next_cursor": None}


def test_limit_bounds(client, tenant):
    created = [create(client, tenant)["id"] for _ in range(3)]
    assert [i["id"] for i in get(client, tenant, "/incidents?limit=1")["items"]] == created[-1:]
    page = get(client, tenant, "/incidents?limit=100")
    assert [i["id"] for i in page["items"]] == created[::-1] and page["next_cursor"] is None
    page = get(client, tenant, "/incidents?limit=3")
    assert len(page["items"]) == 3 and page["next_cursor"] is None  # no empty last page
    for bad in ("0", "101", "-1", "1000"):
        assert_error(
            client.get(f"/incidents?limit={bad}", headers=tenant),
            422,
            "Unprocessable Entity",
            INVALID_REQUEST,
            {"query": {"limit": ["Must be greater than or equal to 1 and less than or equal to 100."]}},
        )
    assert_error(
        client.get("/incidents?limit=ten", headers=tenant),
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"query": {"limit": ["Not a valid integer."]}},
    )


def test_limit_100_returns_100(client, app, tenant):
    # 105 incidents written straight to the database (as the API would) to keep this fast.
    tenant_name = tenant_of(app, tenant)
    with app.extensions["db"].begin() as session:
        for i in range(105):
            session.add(
                Incident(
                    id=uuid.uuid4(),
                    tenant=tenant_name,
                    title=f"bulk {i}",
                    created_at=func.now() + timedelta(milliseconds=i),
                )
            )
    page = get(client, tenant, "/incidents?limit=100")
    assert [i["title"] for i in page["items"]] == [f"bulk {i}" for i in range(104, 4, -1)]
    rest = get(client, tenant, f"/incidents?limit=100&cursor={page['next_cursor']}")
    assert [i["title"] for i in rest["items"]] == [f"bulk {i}" for i in range(4, -1, -1)]


def test_cursor_round_trip_covers_every_item_exactly_once_with_interleaved_creations(client, tenant):
    original = [create(client, tenant, title=f"o{i}")["id"] for i in range(17)]
    seen, cursor, pages, interleaved = [], None, 0, []
    while True:
        url = "/incidents?limit=4" + (f"&cursor={cursor}" if cursor else "")
        page = get(client, tenant, url)
        seen.extend(i["id"] for i in page["items"])
        pages += 1
        # New incidents keep arriving while the client pages: they are newer than the cursor, so
        # they neither repeat nor push anything out of the walk.
        interleaved.append(create(client, tenant, title=f"new{pages}")["id"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 5
    assert seen == original[::-1]
    assert len(set(seen)) == 17
    # A fresh walk sees everything, the interleaved ones first.
    everything = get(client, tenant, "/incidents?limit=100")["items"]
    assert [i["id"] for i in everything] == interleaved[::-1] + original[::-1]


def test_pagination_with_identical_created_at_uses_the_id_as_tie_breaker(client, app, tenant):
    tenant_name = tenant_of(app, tenant)
    ids = sorted((uuid.uuid4() for _ in range(7)), reverse=True)
    with app.extensions["db"].begin() as session:  # one transaction: one now() for all seven
        for incident_id in ids:
            session.add(Incident(id=incident_id, tenant=tenant_name, title="same instant"))
    seen, cursor = [], None
    while True:
        page = get(client, tenant, "/incidents?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        seen.extend(i["id"] for i in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == [str(i) for i in ids]


def test_state_filter_with_pagination(client, tenant):
    made = {state: [in_state(client, tenant, state)["id"] for _ in range(3)] for state in STATES}
    for state in STATES:
        page = get(client, tenant, f"/incidents?state={state}&limit=2")
        assert [i["id"] for i in page["items"]] == made[state][::-1][:2]
        assert {i["state"] for i in page["items"]} == {state}
        rest = get(client, tenant, f"/incidents?state={state}&limit=2&cursor={page['next_cursor']}")
        assert [i["id"] for i in rest["items"]] == made[state][::-1][2:]
        assert rest["next_cursor"] is None
    assert len(get(client, tenant, "/incidents?limit=100")["items"]) == 15


@pytest.mark.parametrize("state", ["open", "Escalating", "CLOSED", ""])
def test_bad_state_filter_is_422(client, tenant, state):
    assert_error(
        client.get(f"/incidents?state={state}", headers=tenant),
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"query": {"state": ["Must be one of: OPEN, ACKNOWLEDGED, ESCALATING, RESOLVED, CANCELLED."]}},
    )


@pytest.mark.parametrize(
    "cursor",
    [
        "abc",
        "!!!!",
        "%00",
        cursor_of({"a": 1}),
        cursor_of(["2026-01-01T00:00:00+00:00"]),
        cursor_of(["2026-01-01T00:00:00", MISSING_ID]),  # naive timestamp
        cursor_of(["yesterday", MISSING_ID]),
        cursor_of(["2026-01-01T00:00:00+00:00", "not-a-uuid"]),
        cursor_of(["2026-01-01T00:00:00+00:00", 5]),
        cursor_of(["2026-01-01T00:00:00+00:00", ["x"]]),
        cursor_of(["2026-01-01T00:00:00+00:00", None]),
        cursor_of([20260101, MISSING_ID]),
        cursor_of(42),
        base64.urlsafe_b64encode(b"\xff\xfe\xfd").decode(),
    ],
)
def test_bad_cursor_is_422(client, tenant, cursor):
    assert_error(
        client.get(f"/incidents?cursor={cursor}", headers=tenant),
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"query": {"cursor": ["Invalid cursor."]}},
    )


@pytest.mark.parametrize(
    "cursor", ["1" * 17 + "." + "0" * 32, "1." + "0" * 33, "1.", "1." + "A" * 32, "1." + "0" * 32 + "\n"]
)
def test_a_cursor_outside_its_documented_pattern_is_422(client, tenant, cursor):
    assert_error(
        client.get("/incidents", query_string={"cursor": cursor}, headers=tenant),
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"query": {"cursor": ["Invalid cursor."]}},
    )


def test_every_cursor_matching_the_documented_pattern_is_a_position(client, make_key):
    """A client that builds a cursor from the OpenAPI pattern gets a page, perhaps an empty one."""
    key = make_key(f"t-{uuid.uuid4().hex[:12]}")
    made = [create(client, key)["id"] for _ in range(2)]
    assert get(client, key, f"/incidents?cursor=0.{'0' * 32}") == {"items": [], "next_cursor": None}
    everything = get(client, key, f"/incidents?cursor={'9' * 16}.{'f' * 32}")
    assert [i["id"] for i in everything["items"]] == made[::-1]  # newest first
    newest = get(client, key, "/incidents?limit=1")
    rest = get(client, key, f"/incidents?cursor={newest['next_cursor']}")
    assert [newest["items"][0]["id"], *[i["id"] for i in rest["items"]]] == made[::-1]


def test_cursor_of_another_tenant_reveals_nothing(client, make_key):
    mine, theirs = make_key(f"t-{uuid.uuid4().hex[:12]}"), make_key(f"t-{uuid.uuid4().hex[:12]}")
    for _ in range(3):
        create(client, theirs)
    mine_only = create(client, mine)
    their_cursor = get(client, theirs, "/incidents?limit=1")["next_cursor"]
    # Their cursor only says "older than their newest": mine is newer, theirs are not mine.
    assert get(client, mine, f"/incidents?cursor={their_cursor}") == {"items": [], "next_cursor": None}
    assert [i["id"] for i in get(client, mine, "/incidents")["items"]] == [mine_only["id"]]


# --- the original design's scenarios (those that need no worker) -----------------------------


class TestOriginalDesignScenarios:
    """../shared/reference/original-design-notes.md, 'Phase 3 Test Suite: 15/15'."""

    def test_01_health_check_returns_200(self, client):
        assert client.get("/health").status_code == 200

    def test_02_create_incident_open(self, client, tenant):
        assert create(client, tenant, policy="slow")["state"] == "OPEN"

    def test_03_escalate_open_to_escalating(self, client, tenant):
        incident = create(client, tenant, policy="slow")
        assert act(client, tenant, incident["id"], "escalate")["state"] == "ESCALATING"

    def test_04_create_second_incident_for_acknowledge_path(self, client, tenant):
        first = create(client, tenant, policy="slow")
        second = create(client, tenant, policy="slow")
        assert second["state"] == "OPEN"
        # Two reports with no dedup_key are two incidents: the tenant (its own) lists both, newest first.
        listed = get(client, tenant, "/incidents")["items"]
        assert [(i["id"], i["state"]) for i in listed] == [(second["id"], "OPEN"), (first["id"], "OPEN")]

    def test_05_acknowledge_open_to_acknowledged(self, client, tenant):
        incident = create(client, tenant)
        assert act(client, tenant, incident["id"], "acknowledge")["state"] == "ACKNOWLEDGED"

    def test_06_resolve_from_acknowledged(self, client, tenant):
        incident = in_state(client, tenant, "ACKNOWLEDGED")
        assert act(client, tenant, incident["id"], "resolve")["state"] == "RESOLVED"

    def test_07_escalation_record_created_in_db(self, client, app, tenant):
        incident = in_state(client, tenant, "ESCALATING")
        with app.extensions["db"]() as session:
            rows = session.scalars(
                select(Escalation).where(Escalation.incident_id == uuid.UUID(incident["id"]))
            ).all()
        assert [(r.escalation_level, r.status.value) for r in rows] == [(1, "PENDING")]
        assert rows[0].scheduled_at == ts(incident["escalated_at"]) + HOUR

    def test_08_resolve_escalating_to_resolved(self, client, tenant):
        incident = in_state(client, tenant, "ESCALATING")
        assert act(client, tenant, incident["id"], "resolve")["state"] == "RESOLVED"

    def test_09_pending_escalations_cancelled_on_resolve(self, client, tenant):
        incident = in_state(client, tenant, "ESCALATING")
        act(client, tenant, incident["id"], "resolve")
        assert [e["status"] for e in escalations(client, tenant, incident["id"])] == ["CANCELLED"]

    def test_10_invalid_transition_from_resolved_rejected(self, client, tenant):
        incident = in_state(client, tenant, "RESOLVED")
        for action in ACTIONS:
            assert_error(
                client.post(f"/incidents/{incident['id']}/{action}", headers=tenant), 409, "Conflict"
            )

    def test_11_create_third_incident_for_cancellation(self, client, tenant):
        ids = {create(client, tenant, policy="slow")["id"] for _ in range(3)}
        assert len(ids) == 3

    def test_12_escalate_third_incident(self, client, tenant):
        create(client, tenant, policy="slow")
        create(client, tenant, policy="slow")
        third = create(client, tenant, policy="slow")
        assert act(client, tenant, third["id"], "escalate")["state"] == "ESCALATING"
        assert len(escalations(client, tenant, third["id"])) == 1

    def test_13_cancel_escalating_to_cancelled(self, client, tenant):
        incident = in_state(client, tenant, "ESCALATING")
        assert act(client, tenant, incident["id"], "cancel")["state"] == "CANCELLED"

    def test_14_pending_escalations_cancelled_on_cancel(self, client, tenant):
        incident = in_state(client, tenant, "ESCALATING")
        act(client, tenant, incident["id"], "cancel")
        assert [e["status"] for e in escalations(client, tenant, incident["id"])] == ["CANCELLED"]
        assert get(client, tenant, f"/incidents/escalations/{incident['id']}")["items"][0]["status"] == (
            "CANCELLED"
        )

    def test_15_invalid_transition_acknowledged_to_escalating_rejected(self, client, tenant):
        incident = in_state(client, tenant, "ACKNOWLEDGED")
        body = assert_error(
            client.post(f"/incidents/{incident['id']}/escalate", headers=tenant), 409, "Conflict"
        )
        assert body["message"] == (
            "cannot escalate an incident that is ACKNOWLEDGED (ACKNOWLEDGED -> ESCALATING is not allowed)"
        )
        assert escalations(client, tenant, incident["id"]) == []


# --- the API key CLI ------------------------------------------------------------------------------

KEY_RE = re.compile(r"^inc_[0-9a-f]{8}_[A-Za-z0-9_-]{43}$")


def cli(app, *args):
    return app.test_cli_runner().invoke(args=list(args))


def test_keys_create_prints_the_key_as_its_last_line(app, client):
    tenant_name = f"cli-{uuid.uuid4().hex[:8]}"
    result = cli(app, "keys", "create", "--tenant", tenant_name, "--name", "pager bot", "--scope", "write")
    assert result.exit_code == 0, result.output
    key = result.output.splitlines()[-1]
    assert KEY_RE.match(key), key
    assert result.stdout == key + "\n"  # only the key on stdout: `KEY=$(flask keys create ...)` works
    assert "Store it now: it cannot be shown again." in result.stderr
    # >= 256 random bits: 43 url-safe base64 characters after the visible prefix.
    secret = key[len("inc_12345678_") :]
    assert len(secret) == 43
    headers = {"Authorization": f"Bearer {key}"}
    incident = create(client, headers)
    assert get(client, headers, f"/incidents/{incident['id']}")["id"] == incident["id"]
    with app.extensions["db"]() as session:
        record = session.scalars(select(ApiKey).where(ApiKey.tenant == tenant_name)).one()
        row = session.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": record.id}).one()
    assert record.name == "pager bot"
    assert record.scope.value == "write"
    assert record.prefix == key[:12]
    assert record.secret_hash == hashlib.sha256(key.encode()).hexdigest()
    assert record.revoked_at is None
    # The secret itself is stored nowhere.
    assert not any(secret in str(value) for value in row)
    assert f"Created write key {record.id} ({record.prefix}...) for tenant '{tenant_name}'." in result.stderr


def test_keys_create_read_scope_and_defaults(app, client):
    tenant_name = f"cli-{uuid.uuid4().hex[:8]}"
    read = cli(app, "keys", "create", "--tenant", tenant_name, "--scope", "read")
    assert read.exit_code == 0, read.output
    reader = {"Authorization": f"Bearer {read.output.splitlines()[-1]}"}
    assert get(client, reader, "/incidents") == {"items": [], "next_cursor": None}
    assert_error(client.post("/incidents", json={"title": "x"}, headers=reader), 403, "Forbidden")
    default = cli(app, "keys", "create", "--tenant", tenant_name)
    assert default.exit_code == 0, default.output
    writer = {"Authorization": f"Bearer {default.output.splitlines()[-1]}"}
    create(client, writer)  # the default scope is write
    # Two keys: two rows of the tenant, each with its own prefix, its own secret's hash and its scope
    # (a second `keys create` that reissued or overwrote the first would fail here).
    with app.extensions["db"]() as session:
        rows = session.execute(
            select(ApiKey.prefix, ApiKey.secret_hash, ApiKey.scope).where(ApiKey.tenant == tenant_name)
        ).all()
    tokens = [h["Authorization"].split(" ", 1)[1] for h in (reader, writer)]
    assert sorted((r.prefix, r.secret_hash, r.scope.value) for r in rows) == sorted(
        [(tokens[0][:12], hash_key(tokens[0]), "read"), (tokens[1][:12], hash_key(tokens[1]), "write")]
    )


def test_keys_create_refuses_bad_input(app):
    result = cli(app, "keys", "create", "--tenant", "x", "--scope", "admin")
    assert result.exit_code == 2
    assert "'admin' is not one of 'read', 'write'" in result.output
    result = cli(app, "keys", "create", "--name", "no tenant")
    assert result.exit_code == 2
    assert "Missing option '--tenant'" in result.output
    for args, message in [
        (["--tenant", ""], "Invalid value for '--tenant': must not be blank"),
        (["--tenant", "   "], "Invalid value for '--tenant': must not be blank"),
        (["--tenant", "t" * 65], "Invalid value for '--tenant': at most 64 characters"),
        (["--tenant", "ok", "--name", "n" * 101], "Invalid value for '--name': at most 100 characters"),
    ]:
        result = cli(app, "keys", "create", *args)
        assert result.exit_code == 2, result.output
        assert message in result.output
        assert "Traceback" not in result.output and result.stdout == ""
    # At the limits: accepted.
    result = cli(app, "keys", "create", "--tenant", "t" * 64, "--name", "n" * 100)
    assert result.exit_code == 0, result.output
    assert KEY_RE.match(result.output.splitlines()[-1])


def test_keys_list_shows_prefix_never_secret(app):
    tenant_name = f"cli-{uuid.uuid4().hex[:8]}"
    keys = []
    for scope in ("read", "write"):
        result = cli(
            app, "keys", "create", "--tenant", tenant_name, "--name", f"{scope} key", "--scope", scope
        )
        keys.append(result.output.splitlines()[-1])
    result = cli(app, "keys", "list", "--tenant", tenant_name)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 2
    with app.extensions["db"]() as session:
        records = session.scalars(
            select(ApiKey).where(ApiKey.tenant == tenant_name).order_by(ApiKey.created_at)
        ).all()
    for line, key, record in zip(lines, keys, records, strict=True):
        assert line.split()[:5] == [
            str(record.id),
            f"{key[:12]}...",
            tenant_name,
            record.scope.value,
            "active",
        ]
        assert line.endswith(f"{record.scope.value} key")
        assert key not in line and key[13:] not in line
    everything = cli(app, "keys", "list")
    assert everything.exit_code == 0
    assert all(line in everything.output.splitlines() for line in lines)
    assert not any(key[13:] in everything.output for key in keys)


def test_keys_revoke_makes_the_key_401(app, client):
    tenant_name = f"cli-{uuid.uuid4().hex[:8]}"
    created = cli(app, "keys", "create", "--tenant", tenant_name, "--name", "leaked")
    key = created.output.splitlines()[-1]
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/incidents", headers=headers).status_code == 200
    key_uuid = key_id(app, headers)
    result = cli(app, "keys", "revoke", str(key_uuid))
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"Revoked key {key_uuid}."
    assert_error(
        client.get("/incidents", headers=headers), 401, "Unauthorized", "Invalid or revoked API key."
    )
    assert_error(client.post("/incidents", json={"title": "x"}, headers=headers), 401, "Unauthorized")
    listing = cli(app, "keys", "list", "--tenant", tenant_name).output
    assert re.search(
        rf"^{key_uuid}  {key[:12]}\.\.\.  {tenant_name}  write  revoked \d{{4}}-\d\d-\d\d", listing
    )
    # Revoking again is harmless and keeps the first revocation time.
    with app.extensions["db"]() as session:
        first = session.get(ApiKey, key_uuid).revoked_at
    assert cli(app, "keys", "revoke", str(key_uuid)).exit_code == 0
    with app.extensions["db"]() as session:
        assert session.get(ApiKey, key_uuid).revoked_at == first


def test_keys_revoke_unknown_or_malformed_id(app):
    result = cli(app, "keys", "revoke", MISSING_ID)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: no key {MISSING_ID}"
    result = cli(app, "keys", "revoke", "not-a-uuid")
    assert result.exit_code == 2
    assert "'not-a-uuid' is not a valid UUID" in result.output


# --- the database itself guards the record ------------------------------------------------------


def test_database_refuses_update_and_delete_of_incident_events(client, app, tenant):
    incident = create(client, tenant)
    act(client, tenant, incident["id"], "resolve")
    statements = {
        "UPDATE incident_events SET type = 'tampered' WHERE incident_id = :id": "updated",
        "UPDATE incident_events SET data = '{}' WHERE incident_id = :id": "updated",
        "DELETE FROM incident_events WHERE incident_id = :id": "deleted",
        "TRUNCATE incident_events CASCADE": "truncated",
    }
    for statement, verb in statements.items():
        with app.extensions["db"]() as session:
            with pytest.raises(DBAPIError, match=f"incident_events rows are never {verb}") as info:
                session.execute(text(statement), {"id": incident["id"]})
            assert info.value.orig.pgcode == "P0001"
            session.rollback()
    assert [(e["type"], e["data"]) for e in events(client, tenant, incident["id"])] == [
        ("created", {}),
        ("resolved", {}),
    ]


def test_database_refuses_delete_of_escalations(client, app, tenant):
    incident = in_state(client, tenant, "ESCALATING")
    act(client, tenant, incident["id"], "cancel")
    with app.extensions["db"]() as session:
        with pytest.raises(DBAPIError, match="escalations rows are never deleted") as info:
            session.execute(text("DELETE FROM escalations WHERE incident_id = :id"), {"id": incident["id"]})
        assert info.value.orig.pgcode == "P0001"
        session.rollback()
        # CASCADE: notifications refer to escalations, and a plain TRUNCATE stops at that foreign key
        # before any trigger runs; the trigger must refuse even when the key would let it through.
        with pytest.raises(DBAPIError, match="escalations rows are never truncated"):
            session.execute(text("TRUNCATE escalations CASCADE"))
        session.rollback()
    assert [e["status"] for e in escalations(client, tenant, incident["id"])] == ["CANCELLED"]


def test_database_allows_inserting_events(client, app, tenant):
    """The guard is on change and removal only: the engine appends freely."""
    incident = create(client, tenant)
    with app.extensions["db"].begin() as session:
        session.add(
            IncidentEvent(
                incident_id=uuid.UUID(incident["id"]), type="note", at=func.now(), data={"by": "test"}
            )
        )
    assert [e["type"] for e in events(client, tenant, incident["id"])] == ["created", "note"]


# --- timestamps are UTC whatever the database's default time zone ------------------------------


def test_timestamps_are_utc_even_when_the_database_default_is_not(app):
    from api import create_app

    name = f"incidents_tz_{uuid.uuid4().hex[:8]}"
    servers.create_database(SERVER_URL, name)
    url = servers.with_database(SERVER_URL, name)
    try:
        command.upgrade(alembic_config(url), "head")
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'")
        conn.close()
        other = create_app({"DATABASE_URL": url})
        key, prefix = new_key()
        with other.extensions["db"].begin() as session:
            session.add(
                ApiKey(
                    id=uuid.uuid4(),
                    tenant="tz",
                    name="",
                    prefix=prefix,
                    secret_hash=hash_key(key),
                    scope=Scope.WRITE,
                )
            )
        headers = {"Authorization": f"Bearer {key}"}
        client = other.test_client()
        incident = create(client, headers, policy="slow")
        escalated = act(client, headers, incident["id"], "escalate")
        stamps = [incident["created_at"], escalated["updated_at"], escalated["escalated_at"]]
        stamps += [e["at"] for e in events(client, headers, incident["id"])]
        stamps += [e["scheduled_at"] for e in escalations(client, headers, incident["id"])]
        assert all(stamp.endswith("+00:00") for stamp in stamps), stamps
        other.extensions["db"].kw["bind"].dispose()
    finally:
        app.extensions["celery"].set_current()
        app.extensions["celery"].set_default()
        servers.drop_database(SERVER_URL, name)


def test_unknown_query_parameter_is_refused(client, tenant):
    response = client.get("/incidents?stat=OPEN", headers=tenant)
    assert response.status_code == 422
    assert response.json["errors"] == {"query": {"stat": ["Unknown field."]}}


# --- deduplication ---------------------------------------------------------------------------------


def test_dedup_key_reports_an_active_incident_again_instead_of_opening_another(client, tenant):
    first = client.post("/incidents", json={"title": "disk 91%", "dedup_key": "disk:/var"}, headers=tenant)
    assert first.status_code == 201
    again = client.post(
        "/incidents",
        json={"title": "disk 97%", "severity": "critical", "dedup_key": "disk:/var"},
        headers=tenant,
    )
    assert again.status_code == 200
    assert again.json["id"] == first.json["id"] and again.json["title"] == "disk 91%"
    assert again.headers["Location"].endswith(f"/incidents/{first.json['id']}")
    timeline = events(client, tenant, first.json["id"])
    assert [(e["type"], e["from_state"], e["to_state"]) for e in timeline] == [
        ("created", None, "OPEN"),
        ("reported_again", "OPEN", "OPEN"),
    ]
    assert timeline[1]["data"] == {"title": "disk 97%", "severity": "critical", "report_count": 2}
    assert again.json["report_count"] == 2 and again.json["last_reported_at"] == timeline[1]["at"]
    # Another key, and no key at all, open new incidents.
    other = client.post("/incidents", json={"title": "disk 91%", "dedup_key": "disk:/home"}, headers=tenant)
    plain = client.post("/incidents", json={"title": "disk 91%"}, headers=tenant)
    assert other.status_code == plain.status_code == 201


def test_a_flapping_report_counts_every_time_and_adds_to_the_timeline_once_a_minute(
    client, tenant, monkeypatch
):
    body = {"title": "flapping", "dedup_key": f"flap-{uuid.uuid4().hex[:8]}"}
    first = client.post("/incidents", json=body, headers=tenant).json
    for _ in range(5):
        assert client.post("/incidents", json=body, headers=tenant).status_code == 200
    assert get(client, tenant, f"/incidents/{first['id']}")["report_count"] == 6
    assert [e["type"] for e in events(client, tenant, first["id"])] == ["created", "reported_again"]
    # A minute on (the rule's interval shortened here rather than waited for): an entry again.
    monkeypatch.setattr(engine, "REPORTED_AGAIN_EVERY", timedelta(0))
    assert client.post("/incidents", json=body, headers=tenant).status_code == 200
    timeline = events(client, tenant, first["id"])
    assert [e["type"] for e in timeline] == ["created", "reported_again", "reported_again"]
    assert timeline[-1]["data"]["report_count"] == 7


def test_a_long_timeline_comes_in_pages_oldest_first(client, tenant, monkeypatch):
    monkeypatch.setattr(engine, "REPORTED_AGAIN_EVERY", timedelta(0))
    body = {"title": "chatty", "dedup_key": f"chatty-{uuid.uuid4().hex[:8]}"}
    incident = client.post("/incidents", json=body, headers=tenant).json
    for _ in range(104):
        client.post("/incidents", json=body, headers=tenant)
    first = get(client, tenant, f"/incidents/{incident['id']}/events")
    assert len(first["items"]) == 100 and first["items"][0]["type"] == "created"
    rest = get(client, tenant, f"/incidents/{incident['id']}/events?cursor={first['next_cursor']}")
    assert len(rest["items"]) == 5 and rest["next_cursor"] is None
    ids = [e["id"] for e in first["items"] + rest["items"]]
    assert ids == sorted(ids) and len(set(ids)) == 105
    small = get(client, tenant, f"/incidents/{incident['id']}/events?limit=2")
    assert [e["id"] for e in small["items"]] == ids[:2]


def test_dedup_key_is_free_again_once_the_incident_is_resolved_and_is_per_tenant(client, tenant, make_key):
    first = client.post("/incidents", json={"title": "t", "dedup_key": "k-resolve"}, headers=tenant).json
    act(client, tenant, first["id"], "escalate")
    assert (
        client.post("/incidents", json={"title": "t", "dedup_key": "k-resolve"}, headers=tenant).status_code
        == 200
    )
    act(client, tenant, first["id"], "resolve")
    second = client.post("/incidents", json={"title": "t", "dedup_key": "k-resolve"}, headers=tenant)
    assert second.status_code == 201 and second.json["id"] != first["id"]
    elsewhere = client.post(
        "/incidents", json={"title": "t", "dedup_key": "k-resolve"}, headers=make_key("other-t")
    )
    assert elsewhere.status_code == 201 and elsewhere.json["id"] not in (first["id"], second.json["id"])


def test_dedup_key_validation(client, tenant):
    for bad in ("", "x" * 256, "a\x00b", "line\nbreak"):
        response = client.post("/incidents", json={"title": "t", "dedup_key": bad}, headers=tenant)
        assert response.status_code == 422 and "dedup_key" in response.json["errors"]["json"], bad
