"""The reference endpoint: the same SQL as the real endpoints, through plain SQLAlchemy Core.

No schemas, no auth layer, no ORM, no Celery: one Flask view per endpoint that sends the statements
bench.capture records from the real one (the same engine settings, pool pre-ping included), and for
escalate one Redis write standing in for the Celery publish. Served by gunicorn with
the same settings as the API: `gunicorn 'bench.bare_app:create_app()'`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from datetime import timedelta

import redis
from flask import Flask, abort, jsonify, request
from sqlalchemy import text

from models.db import make_engine

API_KEY = text(
    "SELECT api_keys.id, api_keys.tenant, api_keys.name, api_keys.prefix, api_keys.secret_hash, "
    "api_keys.scope, api_keys.created_at, api_keys.revoked_at FROM api_keys "
    "WHERE api_keys.secret_hash = :hash"
)
INSERT_INCIDENT = text(
    "INSERT INTO incidents (id, tenant, title, description, severity, state, policy, acknowledged_at, "
    "escalated_at, resolved_at, cancelled_at) VALUES (:id, :tenant, :title, :description, :severity, "
    "'OPEN', :policy, NULL, NULL, NULL, NULL) RETURNING incidents.created_at, incidents.updated_at"
)
INSERT_EVENT = text(
    "INSERT INTO incident_events (incident_id, type, from_state, to_state, actor, at, data) "
    "VALUES (:incident_id, :type, :from_state, :to_state, :actor, :at, CAST(:data AS JSONB)) "
    "RETURNING incident_events.id"
)
LOCK_INCIDENT = text(
    "SELECT incidents.id, incidents.tenant, incidents.title, incidents.description, incidents.severity, "
    "incidents.state, incidents.policy, incidents.policy_levels, incidents.created_at, "
    "incidents.updated_at, incidents.acknowledged_at, incidents.escalated_at, incidents.resolved_at, "
    "incidents.cancelled_at FROM incidents WHERE incidents.id = :id AND incidents.tenant = :tenant "
    "FOR NO KEY UPDATE"
)
# The tenant's own policy of the name the incident escalates by, shadowing the file's (none here).
TENANT_POLICY = text(
    "SELECT tenant_policies.tenant, tenant_policies.name, tenant_policies.version, tenant_policies.body, "
    "tenant_policies.created_at, tenant_policies.deleted_at FROM tenant_policies WHERE "
    "tenant_policies.tenant = :tenant AND tenant_policies.name = :name ORDER BY tenant_policies.version "
    "DESC LIMIT 1"
)
INSERT_ESCALATION = text(
    "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at, "
    "executed_at, task_id, published_at, created_at, updated_at) VALUES (:id, :incident_id, 1, "
    "'PENDING', CAST(:notify AS JSONB), :scheduled_at, NULL, :task_id, :now, :now, :now)"
)
# A transition's UPDATE stamps the incident with the database's clock and returns it (the step's time).
ESCALATE_INCIDENT = text(
    "UPDATE incidents SET state='ESCALATING', policy_levels=CAST(:levels AS JSONB), "
    "updated_at=statement_timestamp(), escalated_at=statement_timestamp() WHERE incidents.id = :id "
    "RETURNING incidents.updated_at"
)
RESOLVE_INCIDENT = text(
    "UPDATE incidents SET state='RESOLVED', updated_at=statement_timestamp(), "
    "resolved_at=statement_timestamp() WHERE incidents.id = :id RETURNING incidents.updated_at"
)
CANCEL_PENDING = text(
    "UPDATE escalations SET status='CANCELLED', updated_at=:now WHERE escalations.incident_id = :id "
    "AND escalations.status = 'PENDING'"
)
# What resolving does to the incident's notifications (models/notify.skip_unsent, queue_status_updates): wait
# for a send in flight, skip the unsent alerts, queue status updates for the contacts that were paged.
NOTIFY_TIMEOUTS = text("SET LOCAL lock_timeout = 15000; SET LOCAL statement_timeout = 30000")
SKIP_UNSENT = text(
    "UPDATE notifications SET status='SKIPPED', claim_token=NULL, last_error='incident resolved before it "
    "was sent', updated_at=clock_timestamp() WHERE notifications.incident_id = :id AND notifications.type = "
    "'incident.escalated' AND notifications.status IN ('PENDING', 'SENDING')"
)
QUEUE_STATUS_UPDATES = text(
    "INSERT INTO notifications (id, tenant, incident_id, escalation_id, contact_id, channel, type, level, "
    "status, next_attempt_at, created_at, updated_at, attempts) SELECT gen_random_uuid(), :tenant, :id, "
    "NULL, contacts.id, contacts.channel, 'incident.resolved', NULL, 'PENDING', :now, :now, :now, 0 "
    "FROM contacts WHERE contacts.tenant = :tenant AND contacts.status_updates AND contacts.enabled AND "
    "contacts.deleted_at IS NULL AND (EXISTS (SELECT notifications.id FROM notifications WHERE "
    "notifications.incident_id = :id AND notifications.contact_id = contacts.id AND notifications.type = "
    "'incident.escalated' AND notifications.status IN ('SENT', 'BUNDLED'))) RETURNING "
    "notifications.contact_id"
)
FAST_LEVELS = [
    {"delay_ms": 1000, "notify": ["in_app"]},
    {"delay_ms": 1000, "notify": ["email"]},
    {"delay_ms": 1000, "notify": ["sms"]},
]


def _row(row) -> dict:
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row._mapping.items()}


def create_app() -> Flask:
    app = Flask("bare")
    engine = make_engine(os.environ["DATABASE_URL"])
    broker = redis.Redis.from_url(os.environ["REDIS_URL"])
    scratch = os.environ["CELERY_QUEUE"] + "-bare"

    def api_key(conn):
        token = request.headers.get("Authorization", "").partition(" ")[2].strip()
        key = conn.execute(API_KEY, {"hash": hashlib.sha256(token.encode()).hexdigest()}).first()
        if key is None or key.revoked_at is not None or key.scope != "write":
            abort(401)
        return key

    @app.post("/incidents")
    def create():
        body = request.get_json()
        with engine.connect() as conn:
            key = api_key(conn)
            incident_id = uuid.uuid4()
            values = {
                "id": incident_id,
                "tenant": key.tenant,
                "title": body["title"],
                "description": body.get("description", ""),
                "severity": body.get("severity", "high"),
                "policy": body.get("policy"),
            }
            stamps = conn.execute(INSERT_INCIDENT, values).first()
            conn.execute(
                INSERT_EVENT,
                {
                    "incident_id": incident_id,
                    "type": "created",
                    "from_state": None,
                    "to_state": "OPEN",
                    "actor": key.id,
                    "at": stamps.created_at,
                    "data": "{}",
                },
            )
            conn.commit()
        values.update(state="OPEN", created_at=stamps.created_at.isoformat())
        values["updated_at"] = stamps.updated_at.isoformat()
        return jsonify(values), 201

    def transition(incident_id, action: str):
        with engine.connect() as conn:
            key = api_key(conn)
            incident = conn.execute(LOCK_INCIDENT, {"id": incident_id, "tenant": key.tenant}).first()
            if incident is None:
                abort(404)
            if action != "escalate" and incident.escalated_at is not None:
                # As models/notify.skip_unsent: before the clock, since it may wait for a send.
                conn.execute(NOTIFY_TIMEOUTS)
                conn.execute(SKIP_UNSENT, {"id": incident_id})
            if action == "escalate":
                conn.execute(TENANT_POLICY, {"tenant": key.tenant, "name": "fast"}).first()
                if incident.state != "OPEN":
                    abort(409)
                levels = {"levels": json.dumps(FAST_LEVELS), "id": incident_id}
                now = conn.execute(ESCALATE_INCIDENT, levels).scalar_one()
                conn.execute(
                    INSERT_ESCALATION,
                    {
                        "id": uuid.uuid4(),
                        "incident_id": incident_id,
                        "notify": json.dumps(FAST_LEVELS[0]["notify"]),
                        "scheduled_at": now + timedelta(milliseconds=FAST_LEVELS[0]["delay_ms"]),
                        "task_id": str(uuid.uuid4()),
                        "now": now,
                    },
                )
                data, state = {"policy": "fast", "levels": 3}, "ESCALATING"
            else:
                if incident.state not in ("OPEN", "ESCALATING", "ACKNOWLEDGED"):
                    abort(409)
                now = conn.execute(RESOLVE_INCIDENT, {"id": incident_id}).scalar_one()
                cancelled = conn.execute(CANCEL_PENDING, {"now": now, "id": incident_id}).rowcount
                if incident.escalated_at is not None:
                    notified = {"now": now, "id": incident_id, "tenant": key.tenant}
                    conn.execute(QUEUE_STATUS_UPDATES, notified).all()
                data, state = {"cancelled_escalations": cancelled}, "RESOLVED"
            conn.execute(
                INSERT_EVENT,
                {
                    "incident_id": incident_id,
                    "type": "escalated" if action == "escalate" else "resolved",
                    "from_state": incident.state,
                    "to_state": state,
                    "actor": key.id,
                    "at": now,
                    "data": json.dumps(data),
                },
            )
            conn.commit()
        # One Redis write where the real endpoint publishes (escalate); a resolve tells the broker nothing.
        if action == "escalate":
            broker.lpush(scratch, json.dumps({"id": str(incident_id), "action": action}))
        result = _row(incident)
        result.update(state=state, updated_at=now.isoformat())
        return jsonify(result)

    @app.post("/incidents/<uuid:incident_id>/escalate")
    def escalate(incident_id):
        return transition(incident_id, "escalate")

    @app.post("/incidents/<uuid:incident_id>/resolve")
    def resolve(incident_id):
        return transition(incident_id, "resolve")

    return app
