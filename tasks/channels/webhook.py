"""Signed JSON webhooks per Standard Webhooks, signed with the maintained `standardwebhooks` package.

`webhook-id` is the notification id on every attempt (the receiver's idempotency key); each attempt
carries its own `webhook-timestamp` and is signed again, because receivers refuse timestamps older
than five minutes and retries go on for longer than that.
"""

from __future__ import annotations

import base64
import json
import secrets
from datetime import UTC, datetime

from standardwebhooks import Webhook

from tasks.channels import ChannelSettings, Message, Outcome, http

SECRET_BYTES = 32


def new_secret() -> str:
    """A new signing secret in the Standard Webhooks format: whsec_ + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def payload(message: Message) -> dict:
    """The JSON document: {type, timestamp, data}; a digest's data lists its incidents and total."""
    if message.type == "notification.digest":
        data: dict = {"incidents": list(message.digest), "total": message.digest_total}
    else:
        data = {"incident": message.incident, "level": message.level}
    data["notification_id"] = message.notification_id
    return {"type": message.type, "timestamp": message.created_at.isoformat(), "data": data}


def signed_request(message: Message, now: datetime | None = None) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one attempt, signed at `now` (default: this moment)."""
    if not message.secret:
        raise ValueError("a webhook message needs its contact's signing secret")
    body = json.dumps(payload(message), separators=(",", ":"), default=str)
    # UTC, since the library reads the datetime's wall clock as UTC.
    signed_at = (now or datetime.now(UTC)).astimezone(UTC)
    signature = Webhook(message.secret).sign(message.notification_id, signed_at, body)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": message.notification_id,
        "webhook-timestamp": str(int(signed_at.timestamp())),
        "webhook-signature": signature,
    }
    return body.encode(), headers


def send(message: Message, settings: ChannelSettings) -> Outcome:
    """POST the signed event; provider_id is the HTTP status; 410 fails with 'endpoint is gone'."""
    if not message.secret:
        return Outcome("failed", error="webhook contact has no signing secret")
    try:
        body, headers = signed_request(message)
    except ValueError:  # binascii.Error included: a secret that is not base64
        return Outcome("failed", error="webhook contact's signing secret is not valid")
    return http.post(message.address, settings, headers=headers, data=body)[0]
