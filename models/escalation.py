"""Escalations: one row per level of an incident, the record of what must happen and what did."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base, JSONType
from models.incident import _enum


class EscalationStatus(enum.StrEnum):
    PENDING = "PENDING"
    EXECUTED = "EXECUTED"
    CANCELLED = "CANCELLED"


class EscalationKind(enum.StrEnum):
    LEVEL = "level"  # a level of the chain, due its delay after the previous step
    # The timer of an acknowledgement (the policy's ack_timeout): due when it runs out, it takes the
    # incident back to ESCALATING and executes its level at once, the first of a new round. A row
    # like the others, so that it has every guarantee a level has (fenced, swept, cancelled).
    ACK_TIMEOUT = "ack_timeout"


class Escalation(Base):
    __tablename__ = "escalations"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    incident_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("incidents.id"))
    escalation_level: Mapped[int] = mapped_column(Integer)
    # 1, then 2, 3... each time the policy's chain starts again (`repeat`): a round's levels are rows of
    # their own.
    round: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    kind: Mapped[EscalationKind] = mapped_column(
        _enum(EscalationKind, "escalation_kind"), default=EscalationKind.LEVEL, server_default="level"
    )
    # Paged now by a responder (POST .../escalate on an escalating incident), and who: not on its timer.
    manual: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    actor: Mapped[uuid.UUID | None] = mapped_column()
    # Why a level was CANCELLED when no transition did it: skipped by a responder's escalate now.
    reason: Mapped[str | None] = mapped_column(Text)
    status: Mapped[EscalationStatus] = mapped_column(
        _enum(EscalationStatus, "escalation_status"), default=EscalationStatus.PENDING
    )
    notify: Mapped[list[str]] = mapped_column(JSONType, default=list)
    scheduled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    executed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Delivery tracking. published_at is when the row was last handed to the broker (None: never,
    # or the hand-over failed); the sweep re-delivers rows the broker has evidently lost.
    task_id: Mapped[str | None] = mapped_column(String(64))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        UniqueConstraint("incident_id", "round", "escalation_level"),
        # Finding due PENDING rows stays cheap however many finished rows pile up.
        Index(
            "ix_escalations_pending_scheduled_at",
            "scheduled_at",
            postgresql_where=text("status = 'PENDING'"),
        ),
        # The sweep's first look: rows never handed to the broker, without walking those in flight.
        Index(
            "ix_escalations_unpublished_scheduled_at",
            "scheduled_at",
            postgresql_where=text("status = 'PENDING' AND published_at IS NULL"),
        ),
        # The metrics read the few rows executed since their rollup's watermark (models/metrics.py).
        Index(
            "ix_escalations_executed_at",
            "executed_at",
            postgresql_where=text("executed_at IS NOT NULL"),
        ),
    )

    def as_event_data(self) -> dict[str, Any]:
        return {
            "escalation_id": str(self.id),
            "escalation_level": self.escalation_level,
            "round": self.round,
            "kind": self.kind.value,
            "notify": list(self.notify),
        }
