"""Notification providers: one module per channel, each turning a Message into one provider call and
an Outcome. No SQL, no Celery: the notification tasks claim, call `send`, and record the Outcome.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

MESSAGE_TYPES = (
    "incident.escalated",
    "incident.acknowledged",
    "incident.resolved",
    "incident.cancelled",
    "incident.reescalated",
    "notification.digest",
    "notification.test",
)
PROVIDER_CHANNELS = ("email", "sms", "webhook", "slack")


@dataclass(frozen=True)
class ChannelSettings:
    """Provider settings from the environment (12-factor); secrets never leave this object in errors."""

    smtp_url: str | None = None
    email_from: str = "incidents@localhost"
    public_url: str = "http://127.0.0.1:5000"
    twilio_account_sid: str | None = None
    twilio_auth_token: str | None = field(default=None, repr=False)
    twilio_from: str | None = None
    twilio_api_url: str = "https://api.twilio.com"
    allow_private_urls: bool = False
    connect_timeout_s: float = 3.0
    attempt_timeout_s: float = 10.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ChannelSettings:
        """Read SMTP_URL, NOTIFY_EMAIL_FROM, PUBLIC_URL, TWILIO_*, NOTIFY_ALLOW_PRIVATE_URLS."""
        return cls(
            smtp_url=env.get("SMTP_URL") or None,
            email_from=env.get("NOTIFY_EMAIL_FROM") or cls.email_from,
            public_url=(env.get("PUBLIC_URL") or cls.public_url).rstrip("/"),
            twilio_account_sid=env.get("TWILIO_ACCOUNT_SID") or None,
            twilio_auth_token=env.get("TWILIO_AUTH_TOKEN") or None,
            twilio_from=env.get("TWILIO_FROM") or None,
            twilio_api_url=(env.get("TWILIO_API_URL") or cls.twilio_api_url).rstrip("/"),
            allow_private_urls=env.get("NOTIFY_ALLOW_PRIVATE_URLS", "").strip() == "1",
        )

    def missing_for(self, channel: str) -> str | None:
        """The environment variable a channel needs and lacks, or None when it can be used."""
        if channel == "email" and not self.smtp_url:
            return "SMTP_URL"
        if channel == "sms":
            required = (
                ("TWILIO_ACCOUNT_SID", self.twilio_account_sid),
                ("TWILIO_AUTH_TOKEN", self.twilio_auth_token),
                ("TWILIO_FROM", self.twilio_from),
            )
            return next((name for name, value in required if not value), None)
        return None


@dataclass(frozen=True, kw_only=True)
class Message:
    """One notification to deliver: the same notification_id on every attempt (the idempotency key)."""

    notification_id: str
    type: str
    channel: str
    address: str
    secret: str | None = field(default=None, repr=False)  # webhook signing secret, whsec_...
    incident: dict | None = None  # as GET /incidents/{id} returns it
    level: int | None = None
    digest: tuple[dict, ...] = ()  # digest members: id, title, severity, level
    digest_total: int = 0
    created_at: datetime  # when the event happened (aware UTC)


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: sent, retry (transient) or failed (permanent)."""

    status: Literal["sent", "retry", "failed"]
    provider_id: str | None = None
    error: str | None = None
    retry_after_s: float | None = None


def send(message: Message, settings: ChannelSettings) -> Outcome:
    """Deliver `message` through its channel's provider; provider and network errors become an Outcome."""
    if message.channel == "in_app":
        # The inbox entry is the delivery: it is written with the notification itself.
        return Outcome("sent")
    if message.channel not in PROVIDER_CHANNELS:
        return Outcome("failed", error=f"unknown channel {message.channel!r}")
    missing = settings.missing_for(message.channel)
    if missing:
        return Outcome("failed", error=f"{message.channel} is not configured: {missing} is not set")
    # Imported on use: each provider module imports the types above from this package.
    provider = importlib.import_module(f"{__name__}.{message.channel}")
    return provider.send(message, settings)
