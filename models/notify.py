"""Notification delivery's database side: who a level reaches, claims, throttling, bundling, retries.

Postgres is the outbox: notification rows are written in the transaction that executes a level (or
changes an incident's state), and delivery tasks only claim, send and record. Like models/engine.py,
every function here changes rows in the caller's transaction and notes in the Outbox which contacts'
deliverers to wake once it has committed.

The promises and how they are kept:
- At least once: a row stays PENDING (or SENDING with a deadline) until an attempt is recorded; the
  sweep resets expired claims and wakes contacts whose due rows nobody took.
- Not twice: a deliverer claims rows (SENDING, its token) under the contact's row lock, and holds the
  notification's row lock from the re-check through the provider call to the recorded outcome, so no
  other deliverer or sweep can take it meanwhile. The one window for a second copy is a deliverer
  killed after the provider accepted and before its commit (the claim expires, the row is sent again
  with the same webhook-id / Message-ID, so a receiver can tell).
- Never after the incident left ESCALATING: acknowledge, resolve and cancel mark the incident's
  unsent alerts SKIPPED in their own transaction; that UPDATE waits for a send in flight (it holds the
  row lock), so whatever a person receives was sent before the transition committed.
- Throttled without loss: at most `rate` messages per contact in any window; the surplus of alerts is
  bundled into one digest message (its members BUNDLED once it is sent), nothing is dropped.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import SimpleNamespace

from sqlalchemy import (
    ARRAY,
    DateTime,
    Integer,
    Interval,
    String,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    column,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
    values,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session, aliased

from models.contact import CONTACT_CHANNELS, Contact
from models.escalation import Escalation
from models.incident import Incident
from models.lifecycle import State
from models.notification import Notification, NotificationStatus, NotificationType
from models.policy import CHANNELS

PENDING = NotificationStatus.PENDING
SENDING = NotificationStatus.SENDING
ALERT = NotificationType.ESCALATED
STATUS_UPDATE = {
    State.ACKNOWLEDGED: NotificationType.ACKNOWLEDGED,
    State.RESOLVED: NotificationType.RESOLVED,
    State.CANCELLED: NotificationType.CANCELLED,
}
# Due rows one claim reads at most (a storm's surplus beyond them is bundled by the next round).
DUE_LIMIT = 1000
# Messages per contact per window when the environment says nothing (NOTIFY_RATE_<CHANNEL>).
DEFAULT_RATES = {"sms": 3, "email": 10, "slack": 20, "webhook": 120}


@dataclass(frozen=True)
class NotifySettings:
    rates: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_RATES))
    window_s: float = 60.0
    # Transient failures are retried for this long after the notification was created, then FAILED.
    retry_for_s: float = 900.0
    # The first retry comes within seconds (a page held back for minutes after a blip is a failure
    # too); each later one waits twice as long, up to max_backoff_s.
    first_retry_s: float = 2.0
    max_backoff_s: float = 120.0
    # A provider call is bounded by this (tasks/channels); claims expire after it, plus a margin.
    attempt_timeout_s: float = 10.0
    claim_margin_s: float = 5.0
    # Rows claimed per round; alerts beyond the throttle are bundled however many there are.
    batch: int = 20
    # Due rows nobody took for this long get their contact's deliverer woken by the sweep.
    redelivery_grace_s: float = 30.0
    # A deliverer task starts no claim and no send after this many seconds: it gives back what it
    # claimed and hands its contacts to a fresh task. Its sends end one attempt later at most, well
    # before Celery's soft time limit (celeryconfig: 50 s) and the kill after it, which would cut
    # sends in flight: a second copy of whatever a provider had accepted. Short enough, too, that a
    # deliverer at work when its dyno is told to stop (SIGTERM on every deploy) is done within the
    # worker's soft shutdown (WORKER_SOFT_SHUTDOWN_TIMEOUT, 12 s) when its receivers answer: one
    # that sent a storm's backlog in one task held the notifier past the platform's grace
    # (fault scenario 20), and the platform's SIGKILL is that same cut.
    deliverer_budget_s: float = 10.0

    @property
    def claim_lasts(self) -> timedelta:
        """How long a claim holds its rows: one attempt, and a margin."""
        return timedelta(seconds=self.attempt_timeout_s + self.claim_margin_s)


@dataclass
class Claim:
    """What one claim took: the rows to send now, in order, and when to come back."""

    ids: list[uuid.UUID] = field(default_factory=list)
    # The throttle is full: come back then.
    wake_at: datetime | None = None
    # A wake-up for wake_at is already on its way (an earlier claim asked for the same moment).
    wake_scheduled: bool = False
    # Due rows are left that this claim neither took, bundled nor set to wait: claim again after
    # sending these. Otherwise a row committed later wakes a deliverer of its own, and one more
    # claim round would find nothing (for a contact with one message, it would cost half the work).
    more: bool = False
    # Another deliverer holds a live claim of this contact's rows: it was at work here first.
    busy: bool = False


@dataclass
class Attempt:
    """A claimed notification, locked, re-checked and ready to send; members when it is a digest."""

    # The notification's columns as begin_send read them under its row lock (a Core row).
    notification: Row
    address: str  # the contact's
    secret: str | None  # the contact's, for a webhook's signature
    # The incident's columns, as the API's schema dumps them; None for a digest or a test message.
    incident: SimpleNamespace | None
    members: list[tuple[Notification, Incident]] = field(default_factory=list)


def plan_level(session: Session, incident: Incident, escalation: Escalation, now: datetime, outbox) -> None:
    """Write the notifications of a level that has just executed: one per enabled contact of the
    tenant on each channel the level names whose levels include it, an in-app inbox entry for
    in_app, and a SKIPPED row for a channel nothing can deliver (an old snapshot's 'phone')."""
    level = escalation.escalation_level
    base = {"tenant": incident.tenant, "incident_id": incident.id, "escalation_id": escalation.id}
    for channel in escalation.notify:
        if channel == "in_app":
            session.add(
                Notification(
                    **base,
                    channel=channel,
                    type=ALERT,
                    level=level,
                    status=NotificationStatus.SENT,
                    sent_at=now,
                    created_at=now,
                    updated_at=now,
                )  # fmt: skip
            )
        elif channel not in CHANNELS:
            session.add(
                Notification(
                    **base,
                    channel=channel,
                    type=ALERT,
                    level=level,
                    status=NotificationStatus.SKIPPED,
                    last_error=f"channel {channel!r} cannot be delivered",
                    created_at=now,
                    updated_at=now,
                )  # fmt: skip
            )
    channels = [c for c in escalation.notify if c in CONTACT_CHANNELS]
    if channels:
        # The contacts' rows are written for every level of the transaction at once (reach_contacts).
        outbox.reach.append((incident.tenant, incident.id, escalation.id, level, channels, now))


# The levels a transaction executed, as plan_level queues them for reach_contacts.
REACH = values(
    column("tenant", String),
    column("incident_id", Uuid),
    column("escalation_id", Uuid),
    column("level", Integer),
    column("channels", ARRAY(String)),
    column("at", DateTime(timezone=True)),
    name="reach",
)


def reach_contacts(session: Session, outbox) -> None:
    """The contacts' notifications of every level plan_level queued: one INSERT ... SELECT, whatever
    the number of levels (a batch executes up to a hundred). Every engine step that executes levels
    ends with it, in its transaction."""
    if not outbox.reach:
        return
    levels = REACH.data(outbox.reach)
    reached = (
        select(
            func.gen_random_uuid(),
            levels.c.tenant,
            levels.c.incident_id,
            levels.c.escalation_id,
            Contact.id,
            Contact.channel,
            literal(ALERT.value),
            levels.c.level,
            literal(PENDING.value),
            levels.c.at,
            levels.c.at,
            levels.c.at,
        )
        .join_from(
            levels,
            Contact,
            and_(
                Contact.tenant == levels.c.tenant,
                Contact.channel == any_(levels.c.channels),
                Contact.deleted_at.is_(None),
                Contact.enabled,
                or_(Contact.levels.is_(None), levels.c.level == any_(Contact.levels)),
            ),
        )
        .order_by(levels.c.escalation_id, Contact.created_at)
    )
    _insert_for_contacts(session, reached, outbox)
    outbox.reach.clear()


def _insert_for_contacts(session: Session, rows, outbox) -> None:
    """INSERT ... SELECT of PENDING rows, one per contact; those contacts are woken after commit."""
    columns = [
        "id", "tenant", "incident_id", "escalation_id", "contact_id", "channel", "type", "level",
        "status", "next_attempt_at", "created_at", "updated_at",
    ]  # fmt: skip
    woken = session.scalars(
        insert(Notification).from_select(columns, rows).returning(Notification.contact_id)
    ).all()
    outbox.wake.update(woken)


def skip_unsent(session: Session, incident: Incident, target: State) -> None:
    """The incident is being acknowledged, resolved or cancelled: its unsent alerts are SKIPPED.

    Called before the transition reads its clock: the UPDATE waits for a send in flight (its row
    lock), so that send's sent_at, and its timeline entry, come before the transition's.
    """
    if target not in STATUS_UPDATE or incident.escalated_at is None:
        return  # never escalated: nothing was or will be sent for it
    # A send in flight holds its row lock for at most one provider attempt; wait for it rather than
    # fail the transition (the server-wide lock and statement timeouts are shorter).
    wait_ms = int(1000 * (NotifySettings.attempt_timeout_s + NotifySettings.claim_margin_s))
    session.execute(text(f"SET LOCAL lock_timeout = {wait_ms}; SET LOCAL statement_timeout = {2 * wait_ms}"))
    session.execute(
        update(Notification)
        .where(
            Notification.incident_id == incident.id,
            Notification.type == ALERT,
            Notification.status.in_((PENDING, SENDING)),
        )
        .values(
            status=NotificationStatus.SKIPPED,
            last_error=f"incident {target.value.lower()} before it was sent",
            claim_token=None,
            updated_at=func.clock_timestamp(),
        ),
        execution_options={"synchronize_session": False},
    )


def queue_status_updates(session: Session, incident: Incident, target: State, now: datetime, outbox) -> None:
    """Every contact with status updates that was paged for the incident gets one message saying it
    was acknowledged, resolved or cancelled (after skip_unsent: what it waited for counts as paged)."""
    if target not in STATUS_UPDATE or incident.escalated_at is None:
        return
    paged = select(Notification.id).where(
        Notification.incident_id == incident.id,
        Notification.contact_id == Contact.id,
        Notification.type == ALERT,
        Notification.status.in_((NotificationStatus.SENT, NotificationStatus.BUNDLED)),
    )
    updates = select(
        func.gen_random_uuid(),
        literal(incident.tenant),
        literal(incident.id),
        literal(None, type_=Notification.escalation_id.type),
        Contact.id,
        Contact.channel,
        literal(STATUS_UPDATE[target].value),
        literal(None, type_=Notification.level.type),
        literal(PENDING.value),
        literal(now),
        literal(now),
        literal(now),
    ).where(
        Contact.tenant == incident.tenant,
        Contact.status_updates,
        Contact.enabled,
        Contact.deleted_at.is_(None),
        paged.exists(),
    )
    _insert_for_contacts(session, updates, outbox)


def queue_test(session: Session, contact: Contact, now: datetime, outbox) -> Notification:
    """A test message to the contact, sent now (throttled like any other)."""
    notification = Notification(
        id=uuid.uuid4(),
        tenant=contact.tenant,
        contact_id=contact.id,
        channel=contact.channel,
        type=NotificationType.TEST,
        status=PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
        updated_at=now,
    )
    session.add(notification)
    outbox.wake.add(contact.id)
    return notification


# The claim's and the send's statements, built once: a deliverer runs them for every message, and
# building a statement cost more CPU than executing it (bench/NOTES.md 5b). Executed on the session's
# connection as Core statements: nothing here needs the ORM's identity map.
_N, _C = Notification.__table__, Contact.__table__
# FOR NO KEY UPDATE: claims of one contact queue behind each other, but an escalation inserting a
# notification for it (whose foreign key takes KEY SHARE on the contact) does not wait for one.
_LOCK_CONTACT = (
    select(_C.c.tenant, _C.c.channel, _C.c.enabled, _C.c.deleted_at)
    .where(_C.c.id == bindparam("contact"))
    .with_for_update(key_share=True)
)
# The claim's clock: the start of the statement after the lock was granted (a clock read in the
# locking statement is read before it waits), so it is later than whatever the previous claim of
# this contact did.
_NOW = func.statement_timestamp()
_WINDOW_START = _NOW - bindparam("window", type_=Interval)
# (Bind parameters are not named after columns: an UPDATE reserves those names for its SET clause.)
_MINE = and_(_N.c.contact_id == bindparam("contact"), _N.c.status == PENDING)
# Messages are rows that are not digest members: a digest is one message however many it holds.
_IN_WINDOW = and_(
    _N.c.digest_id.is_(None),
    or_(and_(_N.c.status == NotificationStatus.SENT, _N.c.sent_at > _WINDOW_START), _N.c.status == SENDING),
)
_LIVE_CLAIM = and_(_N.c.status == SENDING, _N.c.claim_token != bindparam("token"), _N.c.claimed_until > _NOW)
# One round trip for the clock and what the claim weighs: another deliverer's live claim, and the
# messages in the throttle's window (with the oldest, which says when a full window has room again).
_WEIGH = select(
    _NOW,
    func.count().filter(_LIVE_CLAIM) > 0,
    func.count().filter(_IN_WINDOW),
    func.min(_N.c.sent_at).filter(_IN_WINDOW),
).where(
    _N.c.contact_id == bindparam("contact"),
    or_(_N.c.status == SENDING, _N.c.sent_at > _WINDOW_START),
)
_DUE = (
    select(_N.c.id, _N.c.type)
    .where(_MINE, _N.c.next_attempt_at <= bindparam("now"), _N.c.digest_id.is_(None))
    .order_by(_N.c.created_at, _N.c.id)
    .limit(DUE_LIMIT)
    .with_for_update(skip_locked=True)
)
# A claim's rows, and the members of a digest among them.
_TAKE = (
    update(_N)
    .where(
        or_(
            _N.c.id == any_(bindparam("ids", type_=ARRAY(Uuid))),
            and_(_N.c.digest_id == any_(bindparam("digests", type_=ARRAY(Uuid))), _N.c.status == PENDING),
        )
    )
    .values(status=SENDING, claim_token=bindparam("token"), claimed_until=bindparam("until"),
            updated_at=bindparam("now"))
)  # fmt: skip
# Dated by the database clock when the provider has accepted, without a round trip for it.
_SENT = (
    update(_N)
    .where(_N.c.id == bindparam("notification_id"))
    .values(status=NotificationStatus.SENT, sent_at=func.clock_timestamp(),
            updated_at=func.clock_timestamp(), provider_id=bindparam("provider_id"), last_error=None,
            attempts=bindparam("attempts"), claim_token=None)
)  # fmt: skip


def claim(session: Session, contact_id: uuid.UUID, token: uuid.UUID, settings: NotifySettings) -> Claim:
    """Take the contact's due notifications for sending, within its throttle; bundle the surplus.

    The contact's row lock serialises claims, so two deliverers never overrun the throttle together.
    """
    conn = session.connection()
    found = conn.execute(_LOCK_CONTACT, {"contact": contact_id}).one_or_none()
    if found is None:
        return Claim()
    tenant, channel, enabled, deleted_at = found
    params = {"contact": contact_id, "token": token, "window": timedelta(seconds=settings.window_s)}
    now, busy, used, oldest = conn.execute(_WEIGH, params).one()
    params["now"] = now
    # One deliverer at a time per contact: another one's live claim means it is at work here, and it
    # claims again when its batch is done (tasks/notifications.py: it is told). Otherwise a hung
    # webhook would take every notifier process, each woken by a new level, and stall every other
    # contact's messages.
    if busy:
        return Claim(busy=True)
    if deleted_at is not None or not enabled:
        why = "contact deleted" if deleted_at is not None else "contact disabled"
        conn.execute(
            update(_N).where(_MINE).values(status=NotificationStatus.SKIPPED, last_error=why, updated_at=now),
            params,
        )
        return Claim()
    due = conn.execute(_DUE, params).all()
    if not due:
        return Claim()
    capacity = settings.rates.get(channel, 60) - used
    if capacity <= 0:
        wake_at = (oldest + timedelta(seconds=settings.window_s)) if oldest else now + timedelta(seconds=1)
        # Rows an earlier claim already set to wait for this very moment: their wake-up is on its way.
        scheduled = conn.scalar(
            select(
                select(_N.c.id)
                .where(_MINE, _N.c.next_attempt_at == wake_at, _N.c.digest_id.is_(None))
                .exists()
            ),
            params,
        )
        _wait(session, due, wake_at)
        return Claim(wake_at=wake_at, wake_scheduled=scheduled)
    # The query's limit reached: rows beyond it are due too.
    truncated = len(due) == DUE_LIMIT
    chosen = list(due[: min(capacity, settings.batch)])
    if len(due) > capacity:
        # Over the throttle: every alert beyond the slots left (one kept for the digest) goes into
        # one digest; other kinds (status updates, tests) wait for the next window.
        individual = due[: capacity - 1]
        members = [row for row in due[capacity - 1 :] if row.type is ALERT]
        if len(members) >= 2:
            digest = Notification(
                id=uuid.uuid4(), tenant=tenant, contact_id=contact_id, channel=channel,
                type=NotificationType.DIGEST, status=PENDING, attempts=0, next_attempt_at=now,
                created_at=now, updated_at=now,
            )  # fmt: skip
            session.add(digest)
            session.flush()  # the digest row first: its members' digest_id refers to it
            session.execute(
                update(Notification)
                .where(Notification.id.in_([row.id for row in members]))
                .values(digest_id=digest.id),
                execution_options={"synchronize_session": False},
            )
            chosen = [*individual[: settings.batch - 1], digest]
            more = truncated or len(individual) > len(chosen) - 1
            waiting = [row for row in due[capacity - 1 :] if row.type is not ALERT]
            if waiting:
                wake_at = now + timedelta(seconds=settings.window_s)
                _wait(session, waiting, wake_at)
                return _take(session, chosen, token, now, settings, Claim(wake_at=wake_at, more=more))
            return _take(session, chosen, token, now, settings, Claim(more=more))
    # Over the throttle without a digest to make: the next round finds it full and says when.
    return _take(session, chosen, token, now, settings, Claim(more=truncated or len(due) > len(chosen)))


def _wait(session: Session, rows: list[Notification], until: datetime) -> None:
    """Hold rows back until the throttle's window has room again."""
    session.execute(
        update(Notification)
        .where(Notification.id.in_([row.id for row in rows]))
        .values(next_attempt_at=until),
        execution_options={"synchronize_session": False},
    )


def _take(session: Session, rows: list[Notification], token, now, settings: NotifySettings, result: Claim):
    """Mark rows SENDING for this deliverer, in one statement (with a digest's members). A claim
    lasts one attempt: a deliverer that dies gives its rows back within seconds (the sweep), and one
    that is slow has the rows it has not reached taken over by another (begin_send then finds the
    token changed and leaves them)."""
    ids = [row.id for row in rows]
    digests = [row.id for row in rows if row.type is NotificationType.DIGEST]
    until = now + settings.claim_lasts
    session.connection().execute(
        _TAKE, {"ids": ids, "digests": digests, "token": token, "until": until, "now": now}
    )
    result.ids = ids
    return result


def release(session: Session, token: uuid.UUID, until: datetime, now: datetime) -> None:
    """Give back what this deliverer claimed and has not attempted, to be tried again `until`: after
    a transient failure the contact's next messages would most likely fail the same way, each holding
    a notifier process for a whole attempt (a hung webhook would stall every other contact)."""
    session.execute(
        update(Notification)
        .where(Notification.claim_token == token, Notification.status == SENDING)
        .values(status=PENDING, claim_token=None, claimed_until=None, next_attempt_at=until, updated_at=now),
        execution_options={"synchronize_session": False},
    )


_I = Incident.__table__
# The row (locked), its contact's address and secret, its incident, and the clock, in one round trip.
# The incident's columns are labelled: a notification has an id and a created_at of its own.
_INCIDENT_COLUMNS = {f"incident_{c.key}_": c.key for c in _I.c}
_BEGIN_SEND = (
    select(
        _N,
        _C.c.address,
        _C.c.secret,
        *(_I.c[key].label(label) for label, key in _INCIDENT_COLUMNS.items()),
        func.clock_timestamp().label("now"),
    )
    .join_from(_N, _C, _C.c.id == _N.c.contact_id)
    .outerjoin(_I, _I.c.id == _N.c.incident_id)
    .where(_N.c.id == bindparam("notification_id"))
    .with_for_update(of=_N)
)


def begin_send(session: Session, notification_id: uuid.UUID, token: uuid.UUID) -> Attempt | None:
    """Lock a claimed notification and re-check it: still this deliverer's, still worth sending.

    The row lock is held through the provider call until finish() commits: a transition's SKIP waits
    for it, and no sweep or other deliverer can take the row meanwhile. None: nothing to send.
    """
    found = session.connection().execute(_BEGIN_SEND, {"notification_id": notification_id}).one_or_none()
    if found is None:
        return None
    if found.status is not SENDING or found.claim_token != token:
        return None  # skipped by a transition, or the claim expired and another deliverer has it
    now = found.now
    incident = None
    if found.incident_id is not None:
        incident = SimpleNamespace(**{key: getattr(found, label) for label, key in _INCIDENT_COLUMNS.items()})
    if found.type is ALERT and incident.state is not State.ESCALATING:
        _skip(session, [found.id], f"incident {incident.state.value.lower()} before it was sent", now)
        return None
    attempt = Attempt(found, found.address, found.secret, incident)
    if found.type is NotificationType.DIGEST:
        members = session.execute(
            select(Notification, Incident)
            .join(Incident, Incident.id == Notification.incident_id)
            .where(Notification.digest_id == found.id, Notification.status == SENDING)
            .order_by(Notification.created_at, Notification.id)
            .with_for_update(of=Notification)
        ).all()
        for member, member_incident in members:
            if member_incident.state is State.ESCALATING:
                attempt.members.append((member, member_incident))
            else:
                why = f"incident {member_incident.state.value.lower()} before the digest was sent"
                _skip(session, [member.id], why, now)
        if not attempt.members:
            _skip(session, [found.id], "every incident in the digest left ESCALATING first", now)
            return None
    return attempt


def _skip(session: Session, ids: list[uuid.UUID], why: str, now: datetime) -> None:
    _set(session, ids, status=NotificationStatus.SKIPPED, last_error=why, claim_token=None, updated_at=now)


def finish(session: Session, attempt: Attempt, outcome, settings: NotifySettings) -> datetime | None:
    """Record one attempt's outcome (channels.Outcome): SENT, FAILED, or PENDING again for a retry.

    Returns when to try again, for a transient failure inside the retry period.
    """
    row = attempt.notification
    attempts = row.attempts + 1
    members = [member.id for member, _ in attempt.members]
    if outcome.status == "sent":
        session.connection().execute(
            _SENT, {"notification_id": row.id, "provider_id": outcome.provider_id, "attempts": attempts}
        )
        _set(session, members, status=NotificationStatus.BUNDLED, updated_at=func.clock_timestamp())
        _record(session, attempt, "notification_sent", attempts, None)
        return None
    now = session.scalar(select(func.clock_timestamp()))  # the backoff and the retry period's clock
    age = (now - row.created_at).total_seconds()
    if outcome.status == "retry" and age < settings.retry_for_s:
        backoff = min(settings.max_backoff_s, settings.first_retry_s * 2 ** (attempts - 1))
        retry_at = now + timedelta(seconds=max(backoff, outcome.retry_after_s or 0))
        _set(session, [row.id], status=PENDING, next_attempt_at=retry_at, last_error=outcome.error,
             attempts=attempts, claim_token=None, updated_at=now)  # fmt: skip
        _set(session, members, status=PENDING, claim_token=None, updated_at=now)
        return retry_at
    reason = outcome.error or "failed"
    if outcome.status == "retry":
        reason = f"still failing after {attempts} attempts over {age:.0f} s: {reason}"
    _set(session, [row.id], status=NotificationStatus.FAILED, last_error=reason, attempts=attempts,
         claim_token=None, updated_at=now)  # fmt: skip
    _set(session, members, status=NotificationStatus.FAILED, last_error=f"digest {row.id} failed: {reason}",
         updated_at=now)  # fmt: skip
    _record(session, attempt, "notification_failed", attempts, reason)
    return None


def _set(session: Session, ids: list[uuid.UUID], **values) -> None:
    """One UPDATE of the rows `ids` (nothing when there are none)."""
    if ids:
        session.connection().execute(update(_N).where(_N.c.id.in_(ids)).values(**values))


def _record(session: Session, attempt: Attempt, type_: str, attempts: int, error: str | None) -> None:
    """The timeline entry of every incident the message was about."""
    from models.engine import record_event  # the engine imports this module

    row = attempt.notification
    incidents = [attempt.incident] if attempt.incident else [incident for _, incident in attempt.members]
    for incident in incidents:
        data = {
            "notification_id": str(row.id),
            "channel": row.channel,
            "contact_id": str(row.contact_id),
            "type": row.type.value,
            "level": row.level,
            "attempts": attempts,
        }
        if error:
            data["error"] = error
        # Dated when written, not when the attempt ended: no incident lock orders these entries, and
        # two deliverers' clocks read before their inserts came out of order (by milliseconds).
        record_event(session, incident, type_, None, actor=None, from_state=incident.state, data=data)


def sweep(
    session: Session, now: datetime, settings: NotifySettings, outbox, limit: int = 1000
) -> tuple[int, int]:
    """Give expired claims back (a deliverer died) and wake contacts whose due rows nobody took.

    Returns (claims given back, rows woken). SKIP LOCKED: a row being sent right now is never taken.
    """
    # Messages only (alerts, status updates, digests), and a digest's members with their digest, in
    # the same statement, never on their own: a digest being sent is locked (SKIP LOCKED leaves it)
    # before begin_send locks its members, and members given back meanwhile would be PENDING under
    # a digest then sent without them, never claimed again (a claim takes members only through
    # their PENDING digest). So would members cut off from their digest by the limit.
    expired = (
        select(Notification.id)
        .where(
            Notification.status == SENDING, Notification.claimed_until < now, Notification.digest_id.is_(None)
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("expired")
    )
    released = session.scalars(
        update(Notification)
        .where(
            or_(
                Notification.id.in_(select(expired.c.id)),
                and_(Notification.digest_id.in_(select(expired.c.id)), Notification.status == SENDING),
            )
        )
        .values(status=PENDING, claim_token=None, claimed_until=None, next_attempt_at=now, updated_at=now)
        .returning(Notification.contact_id),
        execution_options={"synchronize_session": False},
    ).all()
    # Woken rows count as due from now: the next sweep wakes them again only after another grace.
    forgotten = (
        select(Notification.id)
        .where(
            Notification.status == PENDING,
            Notification.contact_id.is_not(None),
            Notification.next_attempt_at < now - timedelta(seconds=settings.redelivery_grace_s),
        )
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    # A member left PENDING under a digest that went out or was skipped without it (given back on its
    # own by a sweep before the one above) is a message of its own again: claims take it.
    digest = aliased(Notification)
    digest_gone = (
        ~select(digest.id)
        .where(digest.id == Notification.digest_id, digest.status.in_((PENDING, SENDING)))
        .exists()
    )
    woken = session.scalars(
        update(Notification)
        .where(Notification.id.in_(forgotten))
        .values(next_attempt_at=now, digest_id=case((digest_gone, None), else_=Notification.digest_id))
        .returning(Notification.contact_id),
        execution_options={"synchronize_session": False},
    ).all()
    outbox.wake.update(released)
    outbox.wake.update(woken)
    return len(released), len(woken)
