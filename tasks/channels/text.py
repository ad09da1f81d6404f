"""The words every channel uses for a message, so an email, an SMS and a Slack post say the same thing."""

from __future__ import annotations

from tasks.channels import ChannelSettings, Message

_STATUS_WORDS = {
    "incident.acknowledged": "Acknowledged",
    "incident.resolved": "Resolved",
    "incident.cancelled": "Cancelled",
}


def severity(message: Message) -> str:
    """The incident's severity in capitals (CRITICAL), or a tag for messages about no one incident."""
    if message.type == "notification.digest":
        return "INCIDENTS"
    if message.type == "notification.test" or not message.incident:
        return "TEST"
    return str(message.incident.get("severity") or "unknown").upper()


def title(message: Message) -> str:
    """The incident's title on one line ('' for digests and tests)."""
    # A line break in a title would end an email header early (EmailMessage refuses it).
    return " ".join(str((message.incident or {}).get("title") or "").split())


def headline(message: Message) -> str:
    """What happened, in a few words: 'Level 2: Checkout returns 502', 'Resolved: ...'."""
    if message.type == "notification.digest":
        return f"{message.digest_total} more {_incidents(message.digest_total)} escalated"
    if message.type == "notification.test" or not message.incident:
        return "Test notification"
    if message.type in _STATUS_WORDS:
        return f"{_STATUS_WORDS[message.type]}: {title(message)}"
    again = " (re-escalated)" if message.type == "incident.reescalated" else ""
    return f"Level {message.level}{again}: {title(message)}"


def subject(message: Message) -> str:
    """The one-line subject: '[CRITICAL] Level 2: Checkout returns 502'."""
    return f"[{severity(message)}] {headline(message)}"


def short_id(incident: dict) -> str:
    """The first 8 characters of the incident id, enough to tell incidents apart on a phone."""
    return str(incident.get("id", ""))[:8]


def incident_url(settings: ChannelSettings, incident: dict) -> str:
    """The incident's address in the API."""
    return f"{settings.public_url}/incidents/{incident.get('id')}"


def acknowledge_request(settings: ChannelSettings, incident: dict) -> str:
    """The request that acknowledges the incident."""
    return f"POST {incident_url(settings, incident)}/acknowledge"


def digest_lines(message: Message) -> list[str]:
    """One line per listed member ('[HIGH] level 2: title (id)'), then how many were not listed."""
    lines = [
        f"[{str(member.get('severity', '')).upper()}] level {member.get('level')}: "
        f"{member.get('title', '')} ({member.get('id')})"
        for member in message.digest
    ]
    unlisted = message.digest_total - len(message.digest)
    if unlisted > 0:
        lines.append(f"... and {unlisted} more")
    return lines


def _incidents(count: int) -> str:
    return "incident" if count == 1 else "incidents"
