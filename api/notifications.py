"""The in-app inbox (/notifications) and the incidents' delivery logs (/incidents/{id}/notifications).

Also the keyset paging and the delivery-log query that api/contacts.py shares.
"""

from __future__ import annotations

import uuid
from datetime import UTC

from flask import g
from flask_smorest import Blueprint, abort
from marshmallow import RAISE
from sqlalchemy import Select, select, update

from api.auth import authenticate
from api.db import db_session
from api.paging import keyset_page
from api.schemas import (
    InboxArgsSchema,
    InboxEntrySchema,
    InboxPageSchema,
    NotificationPageSchema,
    ReadAllResultSchema,
    ReadAllSchema,
    TimelineArgsSchema,
)
from models.engine import db_now
from models.incident import Incident
from models.notification import Notification

IN_APP = "in_app"

blp = Blueprint("notifications", __name__, url_prefix="/notifications", description="The in-app inbox")
blp.before_request(authenticate)

# A blueprint of its own so that api/incidents.py stays as it is; its routes live under /incidents.
incident_blp = Blueprint(
    "incident_notifications",
    __name__,
    url_prefix="/incidents",
    description="What each incident sent to whom (the delivery log)",
)
incident_blp.before_request(authenticate)


def delivery_log(where, args: dict, *, newest_first: bool) -> dict:
    """A page of the tenant's notifications matching `where`, every channel and status."""
    stmt = select(Notification).where(Notification.tenant == g.api_key.tenant, where)
    rows, next_cursor = keyset_page(
        stmt, (Notification.created_at, Notification.id), args, newest_first=newest_first
    )
    return {"items": [row.Notification for row in rows], "next_cursor": next_cursor}


# --- the inbox ----------------------------------------------------------------------------------------

_ENTRY = (Notification, Incident.title, Incident.severity, Incident.state)


def _inbox(stmt: Select) -> Select:
    """The tenant's in-app entries, with their incident's summary columns."""
    return stmt.outerjoin(Incident, Incident.id == Notification.incident_id).where(
        Notification.tenant == g.api_key.tenant, Notification.channel == IN_APP
    )


def _entry(row) -> dict:
    notification = row.Notification
    return {
        "id": notification.id,
        "incident_id": notification.incident_id,
        "level": notification.level,
        "type": notification.type,
        "created_at": notification.created_at,
        "read_at": notification.read_at,
        "summary": (
            {"title": row.title, "severity": row.severity, "state": row.state}
            if notification.incident_id
            else None
        ),
    }


@blp.route("")
@blp.arguments(InboxArgsSchema(), location="query", unknown=RAISE)
@blp.response(200, InboxPageSchema)
def list_inbox(args):
    """The tenant's in-app inbox, newest first (unread=true: only unread; keyset pages via next_cursor)."""
    stmt = _inbox(select(*_ENTRY))
    if args["unread"]:
        stmt = stmt.where(Notification.read_at.is_(None))
    rows, next_cursor = keyset_page(stmt, (Notification.created_at, Notification.id), args, newest_first=True)
    return {"items": [_entry(row) for row in rows], "next_cursor": next_cursor}


@blp.route("/<uuid:notification_id>/read", methods=["POST"])
@blp.response(200, InboxEntrySchema)
def mark_read(notification_id):
    """Mark one inbox entry read (again is harmless: the first read_at is kept)."""
    session = db_session()
    now = db_now(session)
    # The UPDATE before the read, so that the entry answered is the stored one even when two
    # requests race (the second matches no unread row and changes nothing).
    session.execute(
        update(Notification)
        .where(
            Notification.id == notification_id,
            Notification.tenant == g.api_key.tenant,
            Notification.channel == IN_APP,
            Notification.read_at.is_(None),
        )
        .values(read_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    row = session.execute(_inbox(select(*_ENTRY)).where(Notification.id == notification_id)).one_or_none()
    if row is None:
        abort(404, message=f"Notification {notification_id} not found.")
    session.commit()
    return _entry(row)


@blp.route("/read-all", methods=["POST"])
@blp.arguments(ReadAllSchema(), required=False)
@blp.response(200, ReadAllResultSchema)
def mark_all_read(data):
    """Mark every unread inbox entry created up to now (or up to `before`) read; returns how many."""
    session = db_session()
    now = db_now(session)
    # In UTC: Postgres refuses offsets beyond ±15:59, which ISO 8601 (and so the schema) allows.
    cutoff = min(now, data["before"].astimezone(UTC)) if data.get("before") else now
    result = session.execute(
        update(Notification)
        .where(
            Notification.tenant == g.api_key.tenant,
            Notification.channel == IN_APP,
            Notification.read_at.is_(None),
            Notification.created_at <= cutoff,
        )
        .values(read_at=now, updated_at=now),
        execution_options={"synchronize_session": False},
    )
    session.commit()
    return {"count": result.rowcount}


# --- an incident's delivery log -----------------------------------------------------------------------


@incident_blp.route("/<uuid:incident_id>/notifications")
@incident_blp.arguments(TimelineArgsSchema(), location="query", unknown=RAISE)
@incident_blp.response(200, NotificationPageSchema)
def incident_delivery_log(args, incident_id: uuid.UUID):
    """The incident's delivery log: every notification, all channels and statuses, oldest first."""
    found = db_session().scalar(
        select(Incident.id).where(Incident.id == incident_id, Incident.tenant == g.api_key.tenant)
    )
    if found is None:
        abort(404, message=f"Incident {incident_id} not found.")
    return delivery_log(Notification.incident_id == incident_id, args, newest_first=False)
