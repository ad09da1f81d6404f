"""Notifications: the outbox of every message to a person, and the in-app inbox. Never deleted."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, Text, func, text
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base
from models.incident import _enum


class NotificationStatus(enum.StrEnum):
    PENDING = "PENDING"  # to send at next_attempt_at
    SENDING = "SENDING"  # claimed by a deliverer (claim_token) until claimed_until
    SENT = "SENT"
    FAILED = "FAILED"  # permanently, or still failing after the retry period; last_error says why
    SKIPPED = "SKIPPED"  # not sent: the incident left ESCALATING first, the contact went away...
    BUNDLED = "BUNDLED"  # sent as part of the digest named by digest_id


class NotificationType(enum.StrEnum):
    ESCALATED = "incident.escalated"
    ACKNOWLEDGED = "incident.acknowledged"
    RESOLVED = "incident.resolved"
    CANCELLED = "incident.cancelled"
    DIGEST = "notification.digest"
    TEST = "notification.test"


FINAL_STATUSES = (
    NotificationStatus.SENT,
    NotificationStatus.FAILED,
    NotificationStatus.SKIPPED,
    NotificationStatus.BUNDLED,
)


class Notification(Base):
    __tablename__ = "notifications"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    # Test messages and digests have no incident; in-app entries have no contact.
    incident_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("incidents.id"))
    escalation_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("escalations.id"))
    contact_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("contacts.id"))
    digest_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("notifications.id"))
    # A channel name as the level's snapshot wrote it: an undeliverable one is kept, SKIPPED.
    channel: Mapped[str] = mapped_column(String(32))
    type: Mapped[NotificationType] = mapped_column(_enum(NotificationType, "notification_type"))
    level: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[NotificationStatus] = mapped_column(_enum(NotificationStatus, "notification_status"))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claim_token: Mapped[uuid.UUID | None] = mapped_column()
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # The provider's id for what it accepted: SMTP Message-ID, Twilio sid, the webhook's HTTP status.
    provider_id: Mapped[str | None] = mapped_column(String(255))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    read_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # in-app entries
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        # What a deliverer claims: a contact's due PENDING rows.
        Index(
            "ix_notifications_pending_contact",
            "contact_id",
            "next_attempt_at",
            postgresql_where=text("status = 'PENDING'"),
        ),
        # The throttle: what a contact was sent in the last minute.
        Index("ix_notifications_contact_sent_at", "contact_id", "sent_at"),
        # The sweep: claims past their deadline (migration 0010).
        Index(
            "ix_notifications_sending_claimed_until",
            "claimed_until",
            postgresql_where=text("status = 'SENDING'"),
        ),
        Index("ix_notifications_incident_id", "incident_id", "created_at", "id"),
        Index("ix_notifications_digest_id", "digest_id"),
        # The metrics read the few rows created since their rollup's watermark (models/metrics.py).
        Index("ix_notifications_created_at", "created_at"),
        # The inbox: a tenant's in-app entries, newest first.
        Index(
            "ix_notifications_inbox",
            "tenant",
            "created_at",
            "id",
            postgresql_where=text("channel = 'in_app'"),
        ),
    )
