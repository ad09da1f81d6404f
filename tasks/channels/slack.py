"""Slack incoming webhooks: a Block Kit message (title, severity, level, state, link) and a text fallback.

The URL's path is the secret that lets anyone post to the channel: errors name only its host.
"""

from __future__ import annotations

import json

from tasks.channels import ChannelSettings, Message, Outcome, http, text

HEADER_LIMIT = 150  # Slack refuses a header block with longer plain text
SECTION_LIMIT = 3000


def send(message: Message, settings: ChannelSettings) -> Outcome:
    """POST the message to the incoming webhook; Slack's error word (e.g. channel_not_found) is kept."""
    body = json.dumps(payload(message, settings), default=str).encode()
    outcome, answer = http.post(
        message.address, settings, headers={"Content-Type": "application/json"}, data=body
    )
    if outcome.status == "failed" and answer:
        reason = answer.decode("utf-8", "replace").strip()[:100]
        return Outcome("failed", provider_id=outcome.provider_id, error=f"{outcome.error}: {reason}")
    return outcome


def payload(message: Message, settings: ChannelSettings) -> dict:
    """The incoming-webhook JSON: `text` for notifications and old clients, `blocks` for the channel."""
    header = {
        "type": "header",
        "text": {"type": "plain_text", "text": _cut(text.headline(message), HEADER_LIMIT)},
    }
    return {"text": text.subject(message), "blocks": [header, *_details(message, settings)]}


def _details(message: Message, settings: ChannelSettings) -> list[dict]:
    if message.type == "notification.test":
        return [_section(f"A test from the incident escalation service at {escape(settings.public_url)}.")]
    if message.type == "notification.digest":
        lines = "\n".join(f"• {escape(line)}" for line in text.digest_lines(message))
        return [_section(lines), _context(escape(f"Each incident: {settings.public_url}/incidents/<id>"))]
    incident = message.incident or {}
    url = text.incident_url(settings, incident)
    fields = [
        ("Severity", escape(text.severity(message))),
        ("Level", escape(str(message.level) if message.level is not None else "-")),
        ("State", escape(str(incident.get("state")))),
        ("Incident", f"<{url}|{escape(text.short_id(incident))}>"),
    ]
    blocks = [{"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields]}]
    description = str(incident.get("description") or "").strip()
    if description:
        blocks.append(_section(escape(description)))
    if message.type in ("incident.escalated", "incident.reescalated"):
        blocks.append(_context(f"Acknowledge: `{escape(text.acknowledge_request(settings, incident))}`"))
    return blocks


def escape(words: str) -> str:
    """Slack's mrkdwn escaping: &, < and > would otherwise start entities and links."""
    return words.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _section(mrkdwn: str) -> dict:
    return {"type": "section", "text": {"type": "mrkdwn", "text": _cut(mrkdwn, SECTION_LIMIT)}}


def _context(mrkdwn: str) -> dict:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": mrkdwn}]}


def _cut(words: str, limit: int) -> str:
    return words if len(words) <= limit else words[: limit - 3] + "..."
