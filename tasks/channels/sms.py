"""SMS through the Twilio Messages REST API (or any gateway speaking it, at TWILIO_API_URL).

Plain HTTP rather than the twilio SDK: the SDK hard-codes Twilio's host, and the request is three
form fields.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from tasks.channels import ChannelSettings, Message, Outcome, http, text

SMS_LENGTH = 160
MIN_TITLE = 20  # below this the link gives way, so the title still says what broke


def send(message: Message, settings: ChannelSettings) -> Outcome:
    """Ask the gateway to send one SMS; provider_id is the message sid it returns."""
    account = quote(settings.twilio_account_sid or "", safe="")
    url = f"{settings.twilio_api_url}/2010-04-01/Accounts/{account}/Messages.json"
    outcome, answer = http.post(
        url,
        settings,
        headers={"Accept": "application/json"},
        data={"To": message.address, "From": settings.twilio_from or "", "Body": body(message, settings)},
        auth=(settings.twilio_account_sid or "", settings.twilio_auth_token or ""),
        operator_url=True,
    )
    if outcome.status == "failed" and (outcome.provider_id or "").startswith("4"):
        # Twilio says why (e.g. 21211 "invalid To number") in its error body; no secrets in it.
        return Outcome("failed", provider_id=outcome.provider_id, error=f"{outcome.error}: {_reason(answer)}")
    if outcome.status != "sent":
        return outcome
    try:
        sid = json.loads(answer)["sid"]
    except (ValueError, KeyError, TypeError):
        # Accepted but unreadable: the gateway has the message, so retrying would send it twice.
        return Outcome("sent", provider_id=None, error="accepted without a message sid in the answer")
    return Outcome("sent", provider_id=str(sid))


def body(message: Message, settings: ChannelSettings) -> str:
    """At most one SMS (160 characters): severity, level, short id and state are kept; the title is cut."""
    if message.type == "notification.test":
        return "Test notification from incident escalation: this number receives notifications."
    if message.type == "notification.digest":
        titles = "; ".join(str(member.get("title", "")) for member in message.digest)
        return _fit(f"[INCIDENTS] {text.headline(message)}: ", titles, "")
    incident = message.incident or {}
    if message.type in ("incident.escalated", "incident.reescalated"):
        again = " again" if message.type == "incident.reescalated" else ""
        head = f"[{text.severity(message)}] L{message.level}{again} #{text.short_id(incident)}: "
    else:
        state = message.type.removeprefix("incident.")
        head = f"[{text.severity(message)}] {state} #{text.short_id(incident)}: "
    return _fit(head, text.title(message), f" {text.incident_url(settings, incident)}")


def _fit(head: str, title: str, link: str) -> str:
    # The head carries the essentials and is never cut; the link is dropped before the title gets
    # shorter than MIN_TITLE; the title is cut last, with an ellipsis.
    if len(head) + len(title) + len(link) > SMS_LENGTH and SMS_LENGTH - len(head) - len(link) < MIN_TITLE:
        link = ""
    room = SMS_LENGTH - len(head) - len(link)
    if len(title) > room:
        # Three dots, not "…": one character outside the GSM alphabet makes a 70-character SMS
        # (a title holding such characters does so anyway; that is the sender's choice).
        title = title[: max(0, room - 3)].rstrip() + "..."
    return (head + title + link)[:SMS_LENGTH]


def _reason(answer: bytes) -> str:
    try:
        found = json.loads(answer)
        return f"{found.get('code')} {found.get('message')}"[:200]
    except (ValueError, AttributeError):
        return "no reason given"
