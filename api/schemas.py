"""Marshmallow schemas: every input and output of the API, and the OpenAPI document's source."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime

from marshmallow import Schema, ValidationError, fields, validate

from models.incident import SEVERITIES
from models.lifecycle import State

# Text may hold line breaks and tabs, never NUL or other control characters (Postgres refuses NUL,
# and terminals and pagers choke on the rest).
_CONTROL = {chr(c) for c in range(32)} - {"\n", "\t", "\r"} | {"\x7f"}


def _printable(single_line: bool):
    forbidden = _CONTROL | ({"\n", "\r", "\t"} if single_line else set())

    def check(value: str) -> None:
        if any(ch in forbidden for ch in value):
            raise ValidationError("Control characters are not allowed.")
        # JSON may spell a lone surrogate ("\ud800"); it is not text and cannot be stored as UTF-8.
        if any("\ud800" <= ch <= "\udfff" for ch in value):
            raise ValidationError("Unpaired surrogates are not valid text.")

    return check


class IncidentCreateSchema(Schema):
    title = fields.String(
        required=True, validate=[validate.Length(min=1, max=200), _printable(single_line=True)]
    )
    description = fields.String(
        load_default="", validate=[validate.Length(max=10_000), _printable(single_line=False)]
    )
    severity = fields.String(load_default="high", validate=validate.OneOf(SEVERITIES))
    dedup_key = fields.String(
        load_default=None,
        validate=[validate.Length(min=1, max=255), _printable(single_line=True)],
        metadata={
            "description": "While an incident with this key is active (not resolved or cancelled), "
            "reporting it again returns that incident (200) and adds to its timeline"
        },
    )
    policy = fields.String(
        load_default=None,
        metadata={"description": "Escalation policy name from policy.yaml (default policy if absent)"},
    )


class TransitionSchema(Schema):
    note = fields.String(
        validate=[validate.Length(max=2000), _printable(single_line=False)],
        metadata={"description": "Recorded in the incident's timeline"},
    )


class IncidentSchema(Schema):
    id = fields.UUID(dump_only=True)
    title = fields.String(dump_only=True)
    description = fields.String(dump_only=True)
    severity = fields.String(dump_only=True)
    state = fields.Enum(State, dump_only=True)
    policy = fields.String(dump_only=True, allow_none=True)
    dedup_key = fields.String(dump_only=True, allow_none=True)
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)
    acknowledged_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    escalated_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    resolved_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    cancelled_at = fields.AwareDateTime(dump_only=True, allow_none=True)


class IncidentListArgsSchema(Schema):
    state = fields.Enum(State)
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(validate=validate.Length(max=200))


class IncidentPageSchema(Schema):
    items = fields.List(fields.Nested(IncidentSchema), dump_only=True)
    next_cursor = fields.String(dump_only=True, allow_none=True)


class EventSchema(Schema):
    id = fields.Integer(dump_only=True)
    incident_id = fields.UUID(dump_only=True)
    type = fields.String(dump_only=True)
    from_state = fields.Enum(State, dump_only=True, allow_none=True)
    to_state = fields.Enum(State, dump_only=True, allow_none=True)
    actor = fields.UUID(dump_only=True, allow_none=True)
    at = fields.AwareDateTime(dump_only=True)
    data = fields.Dict(dump_only=True)


class EventListSchema(Schema):
    items = fields.List(fields.Nested(EventSchema), dump_only=True)


class EscalationSchema(Schema):
    id = fields.UUID(dump_only=True)
    incident_id = fields.UUID(dump_only=True)
    escalation_level = fields.Integer(dump_only=True)
    status = fields.Function(lambda e: e.status.value, dump_only=True)
    notify = fields.List(fields.String(), dump_only=True)
    scheduled_at = fields.AwareDateTime(dump_only=True)
    executed_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)


class EscalationListSchema(Schema):
    items = fields.List(fields.Nested(EscalationSchema), dump_only=True)


class HealthSchema(Schema):
    status = fields.String(dump_only=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String(), dump_only=True)


def encode_cursor(created_at: datetime, incident_id: uuid.UUID) -> str:
    """An opaque keyset cursor: the last item's (created_at, id)."""
    raw = json.dumps([created_at.isoformat(), str(incident_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """Reverse encode_cursor; a cursor that was not made by it raises ValidationError."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, incident_id = json.loads(raw)
        created = datetime.fromisoformat(created_at)
        if created.tzinfo is None:
            raise ValueError
        return created, uuid.UUID(incident_id)
    # AttributeError: uuid.UUID() given a number or a list, from a hand-made cursor.
    except (ValueError, TypeError, AttributeError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("Invalid cursor.") from None
