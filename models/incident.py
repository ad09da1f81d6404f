"""Incidents and their append-only timeline."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, DateTime, Enum, ForeignKey, Index, Integer, String, Text, func, text
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base, JSONType
from models.lifecycle import TERMINAL, State
from models.policy import SEVERITIES

# The states in which an incident still needs someone: a dedup key names at most one of them.
ACTIVE_STATES = tuple(state for state in State if state not in TERMINAL)
DEDUP_INDEX = "uq_incidents_active_dedup_key"


def _enum(enum_cls: type, name: str) -> Enum:
    # Stored as VARCHAR + CHECK, not a native Postgres enum, so new values are an easy migration.
    return Enum(
        enum_cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
    )


class Incident(Base):
    __tablename__ = "incidents"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    severity: Mapped[str] = mapped_column(
        Enum(*SEVERITIES, name="severity", native_enum=False, create_constraint=True, length=16),
        default="high",
    )
    state: Mapped[State] = mapped_column(_enum(State, "incident_state"), default=State.OPEN)
    # The reporter's key for "the same problem" (an alert rule, a check id): while an incident with
    # this key is active, reporting it again adds to its timeline instead of opening another.
    dedup_key: Mapped[str | None] = mapped_column(String(255))
    # The policy named at creation (None: the default one at the time of escalation).
    policy: Mapped[str | None] = mapped_column(String(64))
    # The levels copied from the policy when escalation started: later edits of policy.yaml
    # do not change an escalation already under way.
    policy_levels: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    # The version of the tenant's own policy it escalated by (models/tenant_policy.py); None for a
    # policy of the file, and until it escalates.
    policy_version: Mapped[int | None] = mapped_column()
    # The policy's `repeat`, copied with its levels: rounds after the first when nobody answers.
    policy_repeat: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # The repeats started so far: an acknowledgement's timeout starts a round that is not one of them.
    rounds_repeated: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # The policy's ack_timeout, copied with its levels (None: an acknowledgement never runs out).
    policy_ack_timeout_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    acknowledged_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    escalated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Reports of the same dedup_key while it was active, this one's first included (the timeline
    # holds at most one 'reported_again' entry a minute: a flapping check must not grow it without
    # bound).
    report_count: Mapped[int] = mapped_column(server_default=text("1"), default=1)
    last_reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The listing: one tenant's incidents, newest first, keyset-paginated, optionally by state.
        Index("ix_incidents_tenant_created", "tenant", "created_at", "id"),
        Index("ix_incidents_tenant_state_created", "tenant", "state", "created_at", "id"),
        Index(
            DEDUP_INDEX,
            "tenant",
            "dedup_key",
            unique=True,
            postgresql_where=text(
                "dedup_key IS NOT NULL AND state IN ({})".format(
                    ", ".join(f"'{state.value}'" for state in ACTIVE_STATES)
                )
            ),
        ),
    )


class IncidentEvent(Base):
    """One row per transition or escalation step. Written in the same transaction as the change;
    never updated, never deleted."""

    __tablename__ = "incident_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    incident_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("incidents.id"), index=True)
    # created | acknowledged | escalated | resolved | cancelled | escalation_executed
    type: Mapped[str] = mapped_column(String(32))
    from_state: Mapped[State | None] = mapped_column(_enum(State, "event_from_state"))
    to_state: Mapped[State | None] = mapped_column(_enum(State, "event_to_state"))
    # The API key that made the change; None for the escalation engine itself.
    actor: Mapped[uuid.UUID | None] = mapped_column()
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
