"""Contacts: who a tenant's escalation levels reach, on which channel, at which address."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ARRAY, Boolean, DateTime, Enum, Index, Integer, String, func, text
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base

# Channels a contact can have. in_app is not one: it is the tenant's inbox, written when a level fires.
CONTACT_CHANNELS = ("email", "sms", "webhook", "slack")


class Contact(Base):
    __tablename__ = "contacts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(
        Enum(*CONTACT_CHANNELS, name="contact_channel", native_enum=False, create_constraint=True, length=16)
    )
    # Normalised when stored (models/addresses.py): an email address, an E.164 number or a URL.
    address: Mapped[str] = mapped_column(String(2048))
    # The escalation levels that reach this contact; None: every level.
    levels: Mapped[list[int] | None] = mapped_column(ARRAY(Integer))
    # Also told when an incident it was paged for is acknowledged, resolved or cancelled.
    status_updates: Mapped[bool] = mapped_column(Boolean)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # A webhook's Standard Webhooks signing secret (whsec_...). Kept in clear: signing needs it.
    secret: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # DELETE /contacts/{id} sets this: the contact stops receiving, its delivery history stays.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The contacts a level reaches: found by tenant and channel among the live ones.
        Index(
            "ix_contacts_live_tenant_channel",
            "tenant",
            "channel",
            postgresql_where=text("deleted_at IS NULL"),
        ),
    )

    def reaches(self, level: int) -> bool:
        return self.enabled and self.deleted_at is None and (self.levels is None or level in self.levels)
