"""Marshmallow schemas: every input and output of the API, and the OpenAPI document's source."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from marshmallow import Schema, ValidationError, fields, pre_load, validate, validates_schema

from models.contact import CONTACT_CHANNELS
from models.lifecycle import State
from models.notification import NotificationStatus, NotificationType
from models.policy import CHANNELS, DURATION_PATTERN, MAX_LEVELS, MAX_REPEAT, SEVERITIES


class FullMatch(validate.Regexp):
    """A pattern the whole value must match (Regexp's re.match lets a trailing newline past `$`). Its
    pattern is also what the OpenAPI document states, so a client generated from the document never
    sends text the server refuses."""

    def __call__(self, value: str) -> str:
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


# Single-line text (titles, keys, names, addresses): no control characters (C0, DEL and C1), no line
# or paragraph separators, and no bidirectional overrides or isolates (they make a title read
# otherwise than it is written). The rest of Unicode's format characters stay: zero-width joiners
# are part of real text (emoji sequences, Indic scripts).
SINGLE_LINE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]*$"
# Text that may span lines (descriptions, notes): line breaks and tabs, never NUL or other C0
# controls (Postgres refuses NUL; terminals and pagers choke on the rest).
MULTI_LINE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
SINGLE_LINE_ERROR = "Control characters, line separators and bidirectional overrides are not allowed."


def _no_surrogates(value: str) -> None:
    # JSON may spell a lone surrogate ("\ud800"); it is not text and cannot be stored as UTF-8.
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise ValidationError("Unpaired surrogates are not valid text.")


def _text(single_line: bool) -> list:
    if single_line:
        return [FullMatch(SINGLE_LINE, error=SINGLE_LINE_ERROR), _no_surrogates]
    return [FullMatch(MULTI_LINE, error="Control characters are not allowed."), _no_surrogates]


class IncidentCreateSchema(Schema):
    title = fields.String(required=True, validate=[validate.Length(min=1, max=200), *_text(single_line=True)])
    description = fields.String(
        load_default="", validate=[validate.Length(max=10_000), *_text(single_line=False)]
    )
    severity = fields.String(load_default="high", validate=validate.OneOf(SEVERITIES))
    dedup_key = fields.String(
        load_default=None,
        validate=[validate.Length(min=1, max=255), *_text(single_line=True)],
        metadata={
            "description": "While an incident with this key is active (not resolved or cancelled), "
            "reporting it again returns that incident (200) and adds to its timeline"
        },
    )
    policy = fields.String(
        load_default=None,
        validate=[validate.Length(min=1, max=100), *_text(single_line=True)],
        metadata={
            "description": "Escalation policy name: the tenant's own (PUT /policies/{name}) or the policy "
            "file's; if absent, the policy its severity maps to (GET /policies: severity_policies), else "
            "the default. A name the tenant does not know is a 422 naming it"
        },
    )


class TransitionSchema(Schema):
    note = fields.String(
        validate=[validate.Length(max=2000), *_text(single_line=False)],
        metadata={"description": "Recorded in the incident's timeline"},
    )


class EscalateSchema(TransitionSchema):
    level = fields.Integer(
        strict=True,
        validate=validate.Range(min=1, max=MAX_LEVELS),
        metadata={
            "description": "On an ESCALATING incident: page this level of the current round now (the "
            "levels before it that have not run are CANCELLED as skipped); already run: 200, nothing "
            "changes. Without it, the lowest pending level. A level beyond the incident's policy is a 422"
        },
    )


class IncidentSchema(Schema):
    id = fields.UUID(dump_only=True)
    title = fields.String(dump_only=True)
    description = fields.String(dump_only=True)
    severity = fields.String(dump_only=True)
    state = fields.Enum(State, dump_only=True)
    policy = fields.String(dump_only=True, allow_none=True)
    policy_version = fields.Integer(
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "The version of the tenant's own policy it escalated by (its 'escalated' "
            "timeline entry names the policy); null for a policy of the policy file, or before escalating"
        },
    )
    dedup_key = fields.String(dump_only=True, allow_none=True)
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)
    acknowledged_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    escalated_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    resolved_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    cancelled_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    report_count = fields.Integer(
        dump_only=True,
        metadata={"description": "Reports of its dedup_key while it was active, the first included"},
    )
    last_reported_at = fields.AwareDateTime(dump_only=True, allow_none=True)


# A keyset position: the last item's time in microseconds since the epoch (at most 16 digits, until
# 2286) and its id in hex (a UUID's 128 bits, or a timeline entry's number). Every match is a position.
CURSOR = r"^[0-9]{1,16}\.[0-9a-f]{1,32}$"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PageArgsSchema(Schema):
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = fields.String(
        validate=FullMatch(CURSOR, error="Invalid cursor."),
        metadata={"description": "next_cursor of the previous page"},
    )


class TimelineArgsSchema(PageArgsSchema):
    """An incident's own lists (timeline, escalations, deliveries): oldest first, 100 a page."""

    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=100))


class IncidentListArgsSchema(PageArgsSchema):
    state = fields.Enum(State)


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
    next_cursor = fields.String(dump_only=True, allow_none=True)


class EscalationSchema(Schema):
    id = fields.UUID(dump_only=True)
    incident_id = fields.UUID(dump_only=True)
    escalation_level = fields.Integer(dump_only=True)
    round = fields.Integer(
        dump_only=True,
        metadata={"description": "1, then 2, 3... each time the policy's levels start again (`repeat`)"},
    )
    kind = fields.Function(
        lambda e: e.kind.value,
        dump_only=True,
        metadata={
            "description": "level: a level of the chain; ack_timeout: an acknowledgement's timer (due "
            "when it runs out, it escalates the incident again and executes its level)",
            "enum": ["level", "ack_timeout"],
        },
    )
    status = fields.Function(lambda e: e.status.value, dump_only=True)
    manual = fields.Boolean(
        dump_only=True,
        metadata={"description": "Paged now by a responder (escalate on an ESCALATING incident)"},
    )
    actor = fields.UUID(
        dump_only=True, allow_none=True, metadata={"description": "The key that paged it now"}
    )
    reason = fields.String(
        dump_only=True,
        allow_none=True,
        metadata={"description": "Why it was CANCELLED, when no transition did it"},
    )
    notify = fields.List(fields.String(), dump_only=True)
    scheduled_at = fields.AwareDateTime(dump_only=True)
    executed_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)


class EscalationListSchema(Schema):
    items = fields.List(fields.Nested(EscalationSchema), dump_only=True)
    next_cursor = fields.String(dump_only=True, allow_none=True)


class HealthSchema(Schema):
    status = fields.String(dump_only=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String(), dump_only=True)


# --- contacts --------------------------------------------------------------------------------------

MAX_LEVEL = 100


def _distinct(values: list) -> None:
    if len(set(values)) != len(values):
        raise ValidationError("Levels must not repeat.")


# One definition of each field a contact is created with and may change (POST and PATCH).
def _name(**kwargs) -> fields.String:
    return fields.String(validate=[validate.Length(min=1, max=200), *_text(single_line=True)], **kwargs)


def _address(**kwargs) -> fields.String:
    return fields.String(
        validate=[validate.Length(min=1, max=2048), *_text(single_line=True)],
        metadata={
            "description": "email: an email address; sms: an E.164 number (+ and country code); "
            "webhook and slack: an https:// URL (http:// too while NOTIFY_ALLOW_PRIVATE_URLS=1). "
            "Stored normalised. Checked against the channel (a deliverable domain, a number its "
            "numbering plan allows, a host that resolves to a public address): a 422 names it."
        },
        **kwargs,
    )


def _levels(**kwargs) -> fields.List:
    return fields.List(
        fields.Integer(strict=True, validate=validate.Range(min=1, max=MAX_LEVEL)),
        allow_none=True,
        validate=[validate.Length(min=1, max=MAX_LEVEL), _distinct],
        metadata={
            "description": "The escalation levels that reach this contact; null: every level",
            "uniqueItems": True,
        },
        **kwargs,
    )


def _status_updates(**kwargs) -> fields.Boolean:
    return fields.Boolean(
        metadata={
            "description": "Also told when an incident it was paged for is acknowledged, resolved or "
            "cancelled (default: true for webhook and slack, false for email and sms)"
        },
        **kwargs,
    )


def _enabled(**kwargs) -> fields.Boolean:
    return fields.Boolean(metadata={"description": "A disabled contact receives nothing"}, **kwargs)


class ContactCreateSchema(Schema):
    name = _name(required=True)
    channel = fields.String(required=True, validate=validate.OneOf(CONTACT_CHANNELS))
    address = _address(required=True)
    levels = _levels(load_default=None)
    # None: the channel's default, decided by the view once the channel is known.
    status_updates = _status_updates(load_default=None)
    enabled = _enabled(load_default=True)


class ContactUpdateSchema(Schema):
    name = _name()
    address = _address()
    levels = _levels()
    status_updates = _status_updates()
    enabled = _enabled()

    @pre_load
    def channel_is_fixed(self, data, **_kwargs):
        # Said plainly instead of "Unknown field.": a contact's history belongs to its channel.
        if isinstance(data, dict) and "channel" in data:
            raise ValidationError(
                "A contact's channel cannot be changed: create a new contact instead.", field_name="channel"
            )
        return data

    @validates_schema
    def not_empty(self, data, **_kwargs):
        if not data:
            raise ValidationError("Name at least one field to change.", field_name="_schema")


class ContactSchema(Schema):
    id = fields.UUID(dump_only=True)
    name = fields.String(dump_only=True)
    channel = fields.String(dump_only=True)
    address = fields.String(dump_only=True)
    levels = fields.List(fields.Integer(), dump_only=True, allow_none=True)
    status_updates = fields.Boolean(dump_only=True)
    enabled = fields.Boolean(dump_only=True)
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)


class ContactWithSecretSchema(ContactSchema):
    secret = fields.String(
        dump_only=True,
        allow_none=True,
        metadata={
            "description": "A webhook contact's Standard Webhooks signing secret (whsec_...), shown only "
            "when it is issued (creation, rotate-secret); null for other channels"
        },
    )


class ContactPageSchema(Schema):
    items = fields.List(fields.Nested(ContactSchema), dump_only=True)
    next_cursor = fields.String(dump_only=True, allow_none=True)


# --- notifications -----------------------------------------------------------------------------------


class NotificationSchema(Schema):
    """One entry of a delivery log."""

    id = fields.UUID(dump_only=True)
    incident_id = fields.UUID(dump_only=True, allow_none=True)
    contact_id = fields.UUID(dump_only=True, allow_none=True)
    channel = fields.String(dump_only=True)
    type = fields.Enum(NotificationType, by_value=True, dump_only=True)
    level = fields.Integer(dump_only=True, allow_none=True)
    status = fields.Enum(NotificationStatus, by_value=True, dump_only=True)
    attempts = fields.Integer(dump_only=True)
    last_error = fields.String(dump_only=True, allow_none=True)
    sent_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    provider_id = fields.String(
        dump_only=True,
        allow_none=True,
        metadata={"description": "The provider's id: SMTP Message-ID, Twilio sid, webhook HTTP status"},
    )
    digest_id = fields.UUID(
        dump_only=True, allow_none=True, metadata={"description": "BUNDLED: the digest that carried it"}
    )
    created_at = fields.AwareDateTime(dump_only=True)
    updated_at = fields.AwareDateTime(dump_only=True)


class NotificationPageSchema(Schema):
    items = fields.List(fields.Nested(NotificationSchema), dump_only=True)
    next_cursor = fields.String(dump_only=True, allow_none=True)


class InboxArgsSchema(PageArgsSchema):
    unread = fields.Boolean(load_default=False, metadata={"description": "Only entries not yet read"})


class InboxSummarySchema(Schema):
    title = fields.String(dump_only=True)
    severity = fields.String(dump_only=True)
    state = fields.Enum(State, dump_only=True)


class InboxEntrySchema(Schema):
    id = fields.UUID(dump_only=True)
    incident_id = fields.UUID(dump_only=True, allow_none=True)
    level = fields.Integer(dump_only=True, allow_none=True)
    type = fields.Enum(NotificationType, by_value=True, dump_only=True)
    created_at = fields.AwareDateTime(dump_only=True)
    read_at = fields.AwareDateTime(dump_only=True, allow_none=True)
    summary = fields.Nested(
        InboxSummarySchema,
        dump_only=True,
        allow_none=True,
        metadata={"description": "The incident as it is now (null for an entry about no incident)"},
    )


class InboxPageSchema(Schema):
    items = fields.List(fields.Nested(InboxEntrySchema), dump_only=True)
    next_cursor = fields.String(dump_only=True, allow_none=True)


class ReadAllSchema(Schema):
    before = fields.AwareDateTime(
        metadata={"description": "Mark only entries created up to this moment (default: now)"}
    )


class ReadAllResultSchema(Schema):
    count = fields.Integer(dump_only=True, metadata={"description": "How many entries were marked read"})


# --- policies ----------------------------------------------------------------------------------------
# A policy's body is parsed by models/policy.py, as the policy file is, never by these schemas (its
# errors are the file's); they state the same rules, from the same constants, for the OpenAPI document
# and the answers.


class PolicyLevelSchema(Schema):
    delay = fields.String(
        required=True,
        validate=FullMatch(rf"^\s*{DURATION_PATTERN}\s*$"),
        metadata={
            "description": "A number with ms, s, m or h: level 1's from the moment the incident starts "
            "escalating, each later level's from the previous level's execution. Whole milliseconds and "
            "7 days at most, or a 422 names it",
            "example": "5m",
        },
    )
    notify = fields.List(
        fields.String(validate=validate.OneOf(CHANNELS)),
        metadata={"description": "The channels the level notifies (default: none); repeats are dropped"},
    )


class PolicyBodySchema(Schema):
    """One policy, as in the policy file: PUT /policies/{name} takes it as JSON or YAML."""

    levels = fields.List(
        fields.Nested(PolicyLevelSchema), required=True, validate=validate.Length(min=1, max=MAX_LEVELS)
    )
    repeat = fields.Integer(
        strict=True,
        validate=validate.Range(min=0, max=MAX_REPEAT),
        metadata={
            "description": "After the last level, if nobody has acknowledged, start again at level 1 this "
            "many more times (default 0)"
        },
    )
    ack_timeout = fields.String(
        validate=FullMatch(rf"^\s*{DURATION_PATTERN}\s*$"),
        metadata={
            "description": "An incident acknowledged while escalating and neither resolved nor cancelled "
            "within this escalates again, from the level last executed (default: never). Whole "
            "milliseconds, 1s at least and 7 days at most, or a 422 names it",
            "example": "30m",
        },
    )


class PolicySchema(Schema):
    name = fields.String(dump_only=True)
    source = fields.String(
        dump_only=True,
        validate=validate.OneOf(("file", "tenant")),
        metadata={"description": "file: the operator's policy file; tenant: this tenant's own"},
    )
    version = fields.Integer(
        dump_only=True,
        allow_none=True,
        metadata={"description": "The tenant's version (null for the file's)"},
    )
    shadows = fields.Boolean(
        dump_only=True,
        metadata={"description": "The tenant's own policy takes the place of the policy file's of this name"},
    )
    levels = fields.List(fields.Nested(PolicyLevelSchema), dump_only=True)
    repeat = fields.Integer(dump_only=True, metadata={"description": "Rounds after the first (`repeat`)"})
    ack_timeout = fields.String(
        dump_only=True,
        allow_none=True,
        metadata={"description": "The acknowledgement's timeout (`ack_timeout`)"},
    )
    timeline = fields.String(
        dump_only=True,
        metadata={
            "description": "When each level falls due, from the moment an incident starts escalating",
            "example": "level 1 at +5m, level 2 at +20m, level 3 at +1h20m",
        },
    )
    created_at = fields.AwareDateTime(
        dump_only=True,
        allow_none=True,
        metadata={"description": "When this version was stored (null for the file's)"},
    )


class PolicyListSchema(Schema):
    items = fields.List(fields.Nested(PolicySchema), dump_only=True)
    default_policy = fields.String(
        dump_only=True, metadata={"description": "What an incident escalates by when nothing else says"}
    )
    severity_policies = fields.Dict(
        keys=fields.String(validate=validate.OneOf(SEVERITIES)),
        values=fields.String(),
        dump_only=True,
        metadata={"description": "The policy an incident that names none escalates by, by its severity"},
    )


def encode_cursor(at: datetime, item_id: uuid.UUID | int) -> str:
    """The cursor after an item: its time and its id (api/paging.py)."""
    micros = (at - EPOCH) // timedelta(microseconds=1)
    number = item_id.int if isinstance(item_id, uuid.UUID) else item_id
    return f"{micros}.{number:x}"


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    """Reverse encode_cursor: the time and the id as a number. Every string matching CURSOR is a
    position (a page after it may be empty); anything else raises ValidationError."""
    if re.fullmatch(CURSOR, cursor) is None:
        raise ValidationError("Invalid cursor.")
    micros, number = cursor.split(".")
    return EPOCH + timedelta(microseconds=int(micros)), int(number, 16)
