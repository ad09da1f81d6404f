"""API keys: stored as a SHA-256 of the secret; the secret itself is shown once and never kept."""

from __future__ import annotations

import enum
import hashlib
import secrets
import uuid
from datetime import datetime

from sqlalchemy import DateTime, String, func
from sqlalchemy.orm import Mapped, mapped_column

from models.db import Base
from models.incident import _enum

KEY_PREFIX = "inc_"


class Scope(enum.StrEnum):
    READ = "read"
    WRITE = "write"


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    # The first characters of the key, shown in listings so that a key can be recognised.
    prefix: Mapped[str] = mapped_column(String(16))
    # A fast hash is right here: the secret is 256 random bits, so there is nothing to brute-force.
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[Scope] = mapped_column(_enum(Scope, "api_key_scope"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its visible prefix: 'inc_' + 8 hex characters + '_' + 256 random bits."""
    prefix = KEY_PREFIX + secrets.token_hex(4)
    return f"{prefix}_{secrets.token_urlsafe(32)}", prefix
