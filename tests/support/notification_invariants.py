"""The notification invariant checker: reads `notifications`, `contacts`, `escalations`, `incidents`
and the incidents' transitions in one REPEATABLE READ snapshot after a scenario, and checks what
issue 9 promises about every message to a person:

N1. Every notification ends SENT, FAILED (with a reason), SKIPPED (with a reason) or BUNDLED (in a
    digest that went out or failed); none is left PENDING or SENDING once the scenario settled.
N2. Nothing is sent for a level that did not execute: every alert belongs to an EXECUTED escalation
    of its incident, at that level, on a channel the level names, written when it executed.
N3. Nothing is sent once the incident left ESCALATING: no alert SENT (nor BUNDLED in a digest SENT)
    at or after the moment its incident left ESCALATING after that level executed.
N4. Exactly one alert per (escalation, contact), one in-app entry per level that names in_app; and
    every contact the level reached when it executed (enabled, its channel named, its levels
    including this one) has its alert: nobody is forgotten, nobody is paged twice in the record.
N5. Digests agree with their members: a digest SENT carried at least one BUNDLED member, a digest
    FAILED failed its members, every member is an alert of the digest's contact.
N6. Status updates only to contacts that were paged for the incident, one per later transition.
N7. The incident timeline has one notification_sent (notification_failed) entry per message SENT
    (FAILED) about it, a digest's on each incident it carried, and no other.

And, from the receivers' side (`deliveries` / `check_receipts`): what a receiver accepted is what
Postgres says was sent, each notification id once (webhook-id header, email Message-ID).

Independent of models/notify.py: the checker reads the tables with SQL of its own and decides from
the rows what must hold, so a scenario cannot pass by checking the engine against itself.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import psycopg2
import psycopg2.extras

FINAL = ("SENT", "FAILED", "SKIPPED", "BUNDLED")
ALERT = "incident.escalated"
DIGEST = "notification.digest"
TEST = "notification.test"
STATUS_UPDATE = {
    "ACKNOWLEDGED": "incident.acknowledged",
    "RESOLVED": "incident.resolved",
    "CANCELLED": "incident.cancelled",
}
# What a digest's members may be once the digest is final: carried (or left out, their incident
# having left ESCALATING first) when it went out, failed with it when it failed.
MEMBER_STATUSES = {"SENT": ("BUNDLED", "SKIPPED"), "FAILED": ("FAILED", "SKIPPED"), "SKIPPED": ("SKIPPED",)}
MESSAGE_ID = re.compile(r"<([0-9a-f-]{36})@")


@dataclass
class NotificationFigures:
    """Counts by status and type, and every violation found (the checker never stops at the first)."""

    notifications: int = 0
    alerts: int = 0
    sent: int = 0
    bundled: int = 0
    skipped: int = 0
    failed: int = 0
    unsettled: int = 0  # PENDING or SENDING
    digests: int = 0
    digests_sent: int = 0
    status_updates: int = 0
    in_app: int = 0
    max_attempts: int = 0
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0

    MAX_LISTED = 40

    def violate(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < self.MAX_LISTED:
            self.violations.append(text)

    def as_dict(self) -> dict:
        return {
            "notifications": self.notifications,
            "alerts": self.alerts,
            "sent": self.sent,
            "bundled": self.bundled,
            "skipped": self.skipped,
            "failed": self.failed,
            "unsettled": self.unsettled,
            "digests": self.digests,
            "digests_sent": self.digests_sent,
            "status_updates": self.status_updates,
            "in_app": self.in_app,
            "max_attempts": self.max_attempts,
            "notification_violations": self.violation_count,
        }


def _load(database_url: str) -> dict[str, list[dict]]:
    conn = psycopg2.connect(database_url, connect_timeout=5)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            # One snapshot for every table: a row and the rows it refers to are seen at one moment.
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            tables = {
                "notifications": (
                    "SELECT id, tenant, incident_id, escalation_id, contact_id, digest_id, channel, type,"
                    " level, status, attempts, next_attempt_at, claim_token, claimed_until, last_error,"
                    " provider_id, sent_at, created_at, updated_at FROM notifications"
                ),
                "contacts": (
                    "SELECT id, tenant, channel, levels, status_updates, enabled, created_at, updated_at,"
                    " deleted_at FROM contacts"
                ),
                "escalations": (
                    "SELECT id, incident_id, escalation_level, status, notify, executed_at FROM escalations"
                ),
                "incidents": (
                    "SELECT id, tenant, state, escalated_at, acknowledged_at, resolved_at, cancelled_at"
                    " FROM incidents"
                ),
                # The incidents' transitions (not their notification or execution entries).
                "transitions": (
                    "SELECT id, incident_id, type, from_state, to_state, at FROM incident_events"
                    " WHERE type IN ('escalated', 'acknowledged', 'resolved', 'cancelled') ORDER BY id"
                ),
                "entries": (
                    "SELECT id, incident_id, type, at, data FROM incident_events"
                    " WHERE type IN ('notification_sent', 'notification_failed') ORDER BY id"
                ),
            }
            loaded = {}
            for name, query in tables.items():
                cur.execute(query)
                loaded[name] = cur.fetchall()
            cur.execute("COMMIT")
    finally:
        conn.close()
    return loaded


def inspect_notifications(database_url: str) -> NotificationFigures:
    """Check N1-N6 on every notification of the database; return the counts and the violations."""
    data = _load(database_url)
    fig = NotificationFigures()
    rows = data["notifications"]
    by_id = {r["id"]: r for r in rows}
    contacts = {c["id"]: c for c in data["contacts"]}
    escalations = {e["id"]: e for e in data["escalations"]}
    incidents = {i["id"]: i for i in data["incidents"]}
    leaves: dict = defaultdict(list)  # incident -> [(at, to_state)] of its transitions out of ESCALATING
    transitions_after: dict = defaultdict(list)  # incident -> [(at, to_state)] after it escalated
    escalated_at: dict = {}
    for event in data["transitions"]:
        iid = event["incident_id"]
        if event["to_state"] == "ESCALATING":
            escalated_at.setdefault(iid, event["at"])
        elif iid in escalated_at:
            transitions_after[iid].append((event["at"], event["to_state"]))
            if event["from_state"] == "ESCALATING":
                leaves[iid].append((event["at"], event["to_state"]))
    members: dict = defaultdict(list)
    for row in rows:
        if row["digest_id"] is not None:
            members[row["digest_id"]].append(row)
    fig.notifications = len(rows)

    def left_escalating_after(incident_id, moment: datetime) -> datetime | None:
        """The moment the incident left ESCALATING after `moment` (the episode that moment is in)."""
        later = [at for at, _ in leaves.get(incident_id, []) if at >= moment]
        if later:
            return min(later)
        # The timeline is the record; the incident's columns say the same when it has no event
        # (which the escalation checker reports on its own).
        incident = incidents.get(incident_id) or {}
        columns = [incident.get(c) for c in ("acknowledged_at", "resolved_at", "cancelled_at")]
        return min((at for at in columns if at is not None and at >= moment), default=None)

    # -- N1: every notification settled, in a final state that says why ---------------------------
    for row in rows:
        nid, status = row["id"], row["status"]
        fig.max_attempts = max(fig.max_attempts, row["attempts"] or 0)
        fig.sent += status == "SENT"
        fig.bundled += status == "BUNDLED"
        fig.skipped += status == "SKIPPED"
        fig.failed += status == "FAILED"
        fig.alerts += row["type"] == ALERT
        fig.in_app += row["channel"] == "in_app"
        fig.digests += row["type"] == DIGEST
        fig.digests_sent += row["type"] == DIGEST and status == "SENT"
        fig.status_updates += row["type"] in STATUS_UPDATE.values()
        what = f"{row['type']} {row['channel']} {nid}"
        if status not in FINAL:
            fig.unsettled += 1
            fig.violate(
                f"[N1] {what} is {status} once settled (attempts {row['attempts']}, next at "
                f"{row['next_attempt_at']}, claimed until {row['claimed_until']}, last error "
                f"{row['last_error']!r})"
            )
            continue
        if status in ("FAILED", "SKIPPED") and not (row["last_error"] or "").strip():
            fig.violate(f"[N1] {what} is {status} without a reason")
        if status == "SENT" and row["sent_at"] is None:
            fig.violate(f"[N1] {what} is SENT without sent_at")
        if status != "SENT" and row["sent_at"] is not None:
            fig.violate(f"[N1] {what} is {status} but has sent_at {row['sent_at']}")
        if status in ("SENT", "FAILED") and row["channel"] != "in_app" and (row["attempts"] or 0) < 1:
            fig.violate(f"[N1] {what} is {status} after {row['attempts']} attempts")
        if status == "BUNDLED":
            digest = by_id.get(row["digest_id"])
            if digest is None:
                fig.violate(f"[N1] {what} is BUNDLED without a digest (digest_id {row['digest_id']})")
            elif digest["status"] not in ("SENT", "FAILED"):
                fig.violate(f"[N1] {what} is BUNDLED in digest {digest['id']}, which is {digest['status']}")

    # -- N2 and N3: alerts only for executed levels, never sent once the incident left ESCALATING ---
    alerts_by_key: Counter = Counter()
    in_app_by_escalation: Counter = Counter()
    for row in rows:
        if row["type"] != ALERT:
            continue
        nid, what = row["id"], f"alert {row['channel']} {row['id']}"
        esc = escalations.get(row["escalation_id"])
        if esc is None:
            fig.violate(f"[N2] {what} has no escalation (escalation_id {row['escalation_id']})")
            continue
        if row["channel"] == "in_app":
            in_app_by_escalation[esc["id"]] += 1
        elif row["contact_id"] is not None:
            alerts_by_key[(esc["id"], row["contact_id"])] += 1
        delivered = row["status"] == "SENT" or (
            row["status"] == "BUNDLED" and (by_id.get(row["digest_id"]) or {}).get("status") == "SENT"
        )
        if esc["status"] != "EXECUTED":
            # Alerts are written by the execution itself: one for a level that never ran is a page
            # for nothing (sent) or a row that should not exist (anything else).
            fig.violate(f"[N2] {what} is {row['status']} but its escalation {esc['id']} is {esc['status']}")
            continue
        if esc["incident_id"] != row["incident_id"] or esc["escalation_level"] != row["level"]:
            fig.violate(
                f"[N2] {what} is for incident {row['incident_id']} level {row['level']}, its escalation "
                f"{esc['id']} is level {esc['escalation_level']} of incident {esc['incident_id']}"
            )
        if row["channel"] not in (esc["notify"] or []):
            fig.violate(f"[N2] {what}: level {esc['escalation_level']} notifies {esc['notify']} only")
        if row["created_at"] != esc["executed_at"]:
            fig.violate(
                f"[N2] {what} written at {row['created_at']}, not with its level's execution at "
                f"{esc['executed_at']} (the outbox row belongs to that transaction)"
            )
        if row["channel"] == "in_app":
            continue  # the inbox entry is delivered when it is written
        left = left_escalating_after(row["incident_id"], esc["executed_at"])
        if left is None or not delivered:
            continue
        sent_at = row["sent_at"] if row["status"] == "SENT" else by_id[row["digest_id"]]["sent_at"]
        if sent_at is not None and sent_at >= left:
            how = "SENT" if row["status"] == "SENT" else f"BUNDLED in digest {row['digest_id']} sent"
            fig.violate(
                f"[N3] {what} (incident {row['incident_id']}) {how} at {sent_at}, "
                f"{(sent_at - left).total_seconds():.3f} s after the incident left ESCALATING at {left}"
            )

    # -- N4: one alert per (escalation, contact) reached, one in-app entry per level naming it -------
    for key, count in alerts_by_key.items():
        if count > 1:
            fig.violate(f"[N4] escalation {key[0]} has {count} alerts to contact {key[1]}")
    for esc in escalations.values():
        if esc["status"] != "EXECUTED":
            continue
        executed = esc["executed_at"]
        notify = list(esc["notify"] or [])
        wanted_in_app = int("in_app" in notify)
        if in_app_by_escalation.get(esc["id"], 0) != wanted_in_app:
            fig.violate(
                f"[N4] escalation {esc['id']} (notify {notify}) has "
                f"{in_app_by_escalation.get(esc['id'], 0)} in-app entries, {wanted_in_app} expected"
            )
        incident = incidents.get(esc["incident_id"])
        if incident is None:
            continue
        for contact in contacts.values():
            if contact["tenant"] != incident["tenant"] or contact["created_at"] > executed:
                continue
            have = alerts_by_key.get((esc["id"], contact["id"]), 0)
            if contact["updated_at"] > executed or (
                contact["deleted_at"] is not None and contact["deleted_at"] > executed
            ):
                continue  # changed since: what it was when the level executed is not on record
            reached = (
                contact["channel"] in notify
                and contact["enabled"]
                and contact["deleted_at"] is None
                and (contact["levels"] is None or esc["escalation_level"] in contact["levels"])
            )
            if reached and have == 0:
                fig.violate(
                    f"[N4] escalation {esc['id']} (level {esc['escalation_level']}, notify {notify}) "
                    f"executed without an alert to contact {contact['id']} ({contact['channel']})"
                )
            elif not reached and have:
                fig.violate(
                    f"[N4] escalation {esc['id']} (level {esc['escalation_level']}) alerted contact "
                    f"{contact['id']} ({contact['channel']}, levels {contact['levels']}, enabled "
                    f"{contact['enabled']}), which the level does not reach"
                )

    # -- N5: digests and their members agree ----------------------------------------------------------
    for row in rows:
        if row["type"] != DIGEST:
            if row["digest_id"] is not None and by_id.get(row["digest_id"], {}).get("type") != DIGEST:
                fig.violate(f"[N5] {row['id']} names {row['digest_id']} as its digest, which is no digest")
            continue
        mine = members.get(row["id"], [])
        if not mine:
            fig.violate(f"[N5] digest {row['id']} has no members")
        for member in mine:
            if member["type"] != ALERT or member["contact_id"] != row["contact_id"]:
                fig.violate(
                    f"[N5] digest {row['id']} holds {member['type']} {member['id']} of another contact"
                )
            if member["status"] not in MEMBER_STATUSES.get(row["status"], (member["status"],)):
                fig.violate(
                    f"[N5] digest {row['id']} is {row['status']} but its member {member['id']} is "
                    f"{member['status']}"
                )
        if row["status"] == "SENT" and not any(m["status"] == "BUNDLED" for m in mine):
            fig.violate(f"[N5] digest {row['id']} was SENT carrying no incident")

    # -- N6: status updates only to paged contacts, one per transition ------------------------------
    paged: set = set()
    for row in rows:
        if row["type"] == ALERT and row["contact_id"] is not None:
            digest_sent = (by_id.get(row["digest_id"]) or {}).get("status") == "SENT"
            if row["status"] == "SENT" or (row["status"] == "BUNDLED" and digest_sent):
                paged.add((row["incident_id"], row["contact_id"]))
    updates = Counter(
        (r["incident_id"], r["contact_id"], r["type"]) for r in rows if r["type"] in STATUS_UPDATE.values()
    )
    for (incident_id, contact_id, type_), count in updates.items():
        if (incident_id, contact_id) not in paged:
            fig.violate(
                f"[N6] {type_} to contact {contact_id} for incident {incident_id}, never paged for it"
            )
        if count > 1:
            fig.violate(f"[N6] {count} {type_} messages to contact {contact_id} for incident {incident_id}")
    for incident_id, contact_id in paged:
        contact = contacts.get(contact_id)
        for at, to_state in transitions_after.get(incident_id, []):
            if contact is None or contact["updated_at"] > at or contact["created_at"] > at:
                continue
            if contact["status_updates"] and contact["enabled"] and contact["deleted_at"] is None:
                if not updates.get((incident_id, contact_id, STATUS_UPDATE.get(to_state))):
                    fig.violate(
                        f"[N6] contact {contact_id} was paged for incident {incident_id} and has no "
                        f"{STATUS_UPDATE.get(to_state)} message"
                    )

    # -- N7: the timeline says what was sent and what failed, once per incident a message was about --
    expected: Counter = Counter()
    for row in rows:
        if row["channel"] == "in_app" or row["status"] not in ("SENT", "FAILED"):
            continue  # an in-app entry is delivered when written: no delivery to record
        entry = "notification_sent" if row["status"] == "SENT" else "notification_failed"
        if row["incident_id"] is not None:
            expected[(str(row["incident_id"]), str(row["id"]), entry)] += 1
        elif row["type"] == DIGEST:
            carried = "BUNDLED" if row["status"] == "SENT" else "FAILED"
            for member in members.get(row["id"], []):
                if member["status"] == carried:
                    expected[(str(member["incident_id"]), str(row["id"]), entry)] += 1
    found: Counter = Counter()
    for event in data["entries"]:
        nid = (event["data"] or {}).get("notification_id")
        found[(str(event["incident_id"]), str(nid), event["type"])] += 1
    for key in expected.keys() | found.keys():
        if expected[key] != found[key]:
            incident_id, nid, entry = key
            row = by_id.get(nid) or {}
            fig.violate(
                f"[N7] incident {incident_id} has {found[key]} {entry} entries for {row.get('type')} "
                f"{nid} ({row.get('status')}), {expected[key]} expected"
            )
    return fig


def check_notifications(database_url: str) -> list[str]:
    """The violations of N1-N6 (empty: every notification of the database is as promised)."""
    return inspect_notifications(database_url).violations


def unsettled(database_url: str) -> int:
    """Notifications still PENDING or SENDING."""
    conn = psycopg2.connect(database_url, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM notifications WHERE status IN ('PENDING', 'SENDING')")
            return cur.fetchone()[0]
    finally:
        conn.close()


def settle_notifications(database_url: str, timeout: float, interval: float = 0.25) -> float:
    """Wait until no notification is PENDING or SENDING; the seconds waited (a timeout is left for
    the checker to report, row by row)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if unsettled(database_url) == 0:
            break
        time.sleep(interval)
    return time.monotonic() - started


# -- what the receivers got ------------------------------------------------------------------------


def notification_id_of(received) -> str | None:
    """The notification id a received message carries: an HTTP request's webhook-id header, or an
    email's Message-ID (<notification-id@domain>). None for a message that carries none (SMS)."""
    headers = getattr(received, "headers", None)
    if isinstance(headers, dict) and "webhook-id" in headers:
        return headers["webhook-id"]
    message = getattr(received, "message", None)
    if message is not None:
        match = MESSAGE_ID.match(str(message["Message-ID"] or ""))
        return match.group(1) if match else None
    return None


def accepted(received) -> bool:
    """Whether the receiver accepted it: every mail the SMTP sink recorded; an HTTP request answered
    2xx (a receiver that records its answers sets `.answered`; one that does not answered 2xx)."""
    status = getattr(received, "answered", None)
    return status is None or 200 <= status < 300


def deliveries(*received: Iterable) -> Counter:
    """notification id -> how many times a receiver accepted it (mails and HTTP requests)."""
    counts: Counter = Counter()
    for items in received:
        for item in items:
            nid = notification_id_of(item)
            if nid is not None and accepted(item):
                counts[nid] += 1
    return counts


def duplicates(counts: Counter) -> dict[str, int]:
    """The notification ids accepted more than once, and how many times."""
    return {nid: n for nid, n in counts.items() if n > 1}


def check_receipts(database_url: str, counts: Counter, channels: Iterable[str]) -> list[str]:
    """Receivers and Postgres agree, for the channels whose messages carry their notification id:
    every notification SENT on them was accepted by its receiver, and everything a receiver accepted
    is a notification Postgres has SENT (accepted but recorded otherwise: a message a person got
    that the record denies)."""
    channels = tuple(channels)
    conn = psycopg2.connect(database_url, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id::text, status, type, channel FROM notifications WHERE channel = ANY(%s)",
                (list(channels),),
            )
            rows = {nid: (status, type_, channel) for nid, status, type_, channel in cur.fetchall()}
    finally:
        conn.close()
    problems = []
    for nid, (status, type_, channel) in rows.items():
        if status == "SENT" and not counts.get(nid):
            problems.append(f"[R] {type_} {channel} {nid} is SENT but its receiver never accepted it")
    for nid, n in counts.items():
        status = rows.get(nid, (None,))[0]
        if status is None:
            problems.append(f"[R] a receiver accepted {nid} ({n}x), which is no notification on {channels}")
        elif status != "SENT":
            problems.append(f"[R] a receiver accepted {nid} ({n}x) but it is {status} in Postgres")
    return problems
