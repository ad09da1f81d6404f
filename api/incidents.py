"""The incidents resource: thin views (parse -> load -> domain call -> commit -> deliver)."""

from __future__ import annotations

import uuid

from flask import current_app, g, url_for
from flask.views import MethodView
from flask_smorest import Blueprint, abort
from marshmallow import RAISE
from sqlalchemy import select

from api.auth import authenticate
from api.db import db_session
from api.paging import keyset_page
from api.schemas import (
    EscalateSchema,
    EscalationListSchema,
    EventListSchema,
    IncidentCreateSchema,
    IncidentListArgsSchema,
    IncidentPageSchema,
    IncidentSchema,
    TimelineArgsSchema,
    TransitionSchema,
)
from models import engine, tenant_policy
from models.engine import Outbox
from models.escalation import Escalation
from models.incident import Incident, IncidentEvent
from models.lifecycle import CLIENT_ACTIONS, Action, InvalidTransition, State
from tasks.escalation import deliver

blp = Blueprint("incidents", __name__, url_prefix="/incidents", description="Incidents and their escalations")
blp.before_request(authenticate)


def _find(incident_id: uuid.UUID) -> Incident:
    """The caller's tenant's incident, or 404 (another tenant's incident does not exist for them)."""
    incident = (
        db_session()
        .scalars(select(Incident).where(Incident.id == incident_id, Incident.tenant == g.api_key.tenant))
        .one_or_none()
    )
    if incident is None:
        abort(404, message=f"Incident {incident_id} not found.")
    return incident


@blp.route("")
class Incidents(MethodView):
    # A misspelt filter is an error, not a silently unfiltered list.
    @blp.arguments(IncidentListArgsSchema(), location="query", unknown=RAISE)
    @blp.response(200, IncidentPageSchema)
    def get(self, args):
        """List incidents, newest first (keyset pagination: pass next_cursor back as cursor)."""
        stmt = select(Incident).where(Incident.tenant == g.api_key.tenant)
        if args.get("state"):
            stmt = stmt.where(Incident.state == args["state"])
        rows, next_cursor = keyset_page(stmt, (Incident.created_at, Incident.id), args, newest_first=True)
        return {"items": [row.Incident for row in rows], "next_cursor": next_cursor}

    # Argument schemas are instances, built once: webargs would build a class's instance on every
    # request.
    @blp.arguments(IncidentCreateSchema())
    @blp.response(201, IncidentSchema)
    @blp.alt_response(
        200,
        schema=IncidentSchema,
        description="An active incident with the same dedup_key exists: reported again, not duplicated",
    )
    def post(self, data):
        """Report an incident (state OPEN), or report an active one with the same dedup_key again."""
        session = db_session()
        policies = current_app.extensions["policies"]
        if data["policy"] is not None and not tenant_policy.find(
            session, policies, g.api_key.tenant, data["policy"]
        ):
            abort(422, errors={"json": {"policy": [f"Unknown policy {data['policy']!r}."]}})
        quota = current_app.extensions["engine_settings"].max_active_incidents
        try:
            incident, created = engine.report(
                session,
                Incident(id=uuid.uuid4(), tenant=g.api_key.tenant, **data),
                actor=g.api_key.id,
                max_active=quota,
            )
        except engine.QuotaExceeded:
            session.rollback()
            abort(
                429,
                message=f"This tenant has {quota} active incidents, its quota (TENANT_MAX_ACTIVE_INCIDENTS): "
                "resolve or cancel one to open another.",
            )
        session.commit()
        return (
            incident,
            201 if created else 200,
            {"Location": url_for("incidents.Incident", incident_id=incident.id)},
        )


@blp.route("/<uuid:incident_id>", endpoint="Incident")
@blp.response(200, IncidentSchema)
def get_incident(incident_id):
    """Read one incident."""
    return _find(incident_id)


def _transition_view(action: Action):
    def view(data, incident_id):
        session = db_session()
        incident = engine.lock_incident(session, incident_id, tenant=g.api_key.tenant)
        if incident is None:
            abort(404, message=f"Incident {incident_id} not found.")
        outbox = Outbox()
        if action is Action.ESCALATE and incident.state is State.ESCALATING:
            return _escalate_now(session, incident, data.get("level"), outbox)
        if data.get("level") is not None:
            abort(422, errors={"json": {"level": ["Only an ESCALATING incident has a level to page now."]}})
        try:
            engine.transition(
                session,
                incident,
                action,
                actor=g.api_key.id,
                note=data.get("note"),
                policies=current_app.extensions["policies"],
                settings=current_app.extensions["engine_settings"],
                outbox=outbox,
            )
        except InvalidTransition as exc:
            session.rollback()
            abort(409, message=str(exc), errors={"state": [exc.current.value]})
        session.commit()
        deliver(outbox)
        return incident

    view.__name__ = f"{action.value}_incident"
    view.__doc__ = f"{action.value.capitalize()} an incident (409 if its state does not allow it)."
    if action is Action.ESCALATE:
        view.__doc__ = (
            "Escalate an incident; on one ESCALATING already, page a level now: `level`, or the lowest "
            "pending one (200 and no change when that level has run; 409 when no level is left)."
        )
    return view


def _escalate_now(session, incident: Incident, level: int | None, outbox: Outbox) -> Incident:
    """A responder pages a level now (models/engine.escalate_now)."""
    if level is not None and level > len(incident.policy_levels):
        session.rollback()
        abort(
            422,
            errors={"json": {"level": [f"The incident's policy has {len(incident.policy_levels)} levels."]}},
        )
    try:
        engine.escalate_now(
            session,
            incident,
            level,
            actor=g.api_key.id,
            settings=current_app.extensions["engine_settings"],
            outbox=outbox,
        )
    except engine.NoLevelLeft:
        session.rollback()
        abort(
            409,
            message="Nothing left to page: every level of the incident's policy has run.",
            errors={"state": [incident.state.value]},
        )
    session.commit()
    deliver(outbox)
    return incident


for _action in CLIENT_ACTIONS:
    body = EscalateSchema() if _action is Action.ESCALATE else TransitionSchema()
    blp.route(f"/<uuid:incident_id>/{_action.value}", methods=["POST"])(
        blp.arguments(body, required=False)(blp.response(200, IncidentSchema)(_transition_view(_action)))
    )


@blp.route("/<uuid:incident_id>/events")
@blp.arguments(TimelineArgsSchema(), location="query", unknown=RAISE)
@blp.response(200, EventListSchema)
def list_events(args, incident_id):
    """The incident's timeline: every transition and escalation step, oldest first, 100 a page
    (pass next_cursor back as cursor)."""
    _find(incident_id)
    # By time, then id: engine steps are serialised by the incident lock (their ids follow their
    # times), but a delivery's entry is written without it (models/notify.py, _record), so its id
    # may come before an engine step dated a moment earlier.
    stmt = select(IncidentEvent).where(IncidentEvent.incident_id == incident_id)
    rows, next_cursor = keyset_page(stmt, (IncidentEvent.at, IncidentEvent.id), args, newest_first=False)
    return {"items": [row.IncidentEvent for row in rows], "next_cursor": next_cursor}


@blp.route("/<uuid:incident_id>/escalations")
@blp.route("/escalations/<uuid:incident_id>", endpoint="escalations_original_path")
@blp.arguments(TimelineArgsSchema(), location="query", unknown=RAISE)
@blp.response(200, EscalationListSchema)
def list_escalations(args, incident_id):
    """The incident's escalations in the order they were scheduled (level by level): PENDING,
    EXECUTED or CANCELLED, never deleted; 100 a page (pass next_cursor back as cursor)."""
    _find(incident_id)
    stmt = select(Escalation).where(Escalation.incident_id == incident_id)
    rows, next_cursor = keyset_page(stmt, (Escalation.created_at, Escalation.id), args, newest_first=False)
    return {"items": [row.Escalation for row in rows], "next_cursor": next_cursor}
