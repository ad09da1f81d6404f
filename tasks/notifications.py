"""Notification tasks: thin. A deliverer claims each of its contacts' due notifications, sends each
one through its channel and records the outcome; the sweep finds what no deliverer took.

They run on a queue of their own (CELERY_NOTIFY_QUEUE, the Procfile's `notifier`), so a slow or dead
SMTP server or webhook never holds up an escalation worker.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from celery import shared_task
from celery.utils.time import get_exponential_backoff_interval
from flask import current_app
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from models import notify
from models.engine import Outbox, db_now
from models.notification import NotificationType
from tasks import channels
from tasks.celery import on_broker_redis

logger = logging.getLogger("notifications")

# Claims a deliverer makes before it leaves the rest to a fresh task (a backlog never pins a process).
MAX_ROUNDS = 10


@functools.cache
def _incident_schemas():
    """The incident as the API shows it, whole and in brief (built once: a schema costs more to build
    than to use)."""
    from api.schemas import IncidentSchema  # the API's own representation, not a second one

    return IncidentSchema(), IncidentSchema(only=("id", "title", "severity", "state"))


def _message(attempt: notify.Attempt) -> channels.Message:
    """What the channel sends: the notification, its contact, and the incident as the API shows it."""
    whole, brief = _incident_schemas()
    row = attempt.notification
    incident = whole.dump(attempt.incident) if attempt.incident else None
    # The first ten incidents of a digest by name; its total counts all of them.
    digest = tuple(
        {**brief.dump(member_incident), "level": member.level}
        for member, member_incident in attempt.members[:10]
    )
    return channels.Message(
        notification_id=str(row.id),
        type=row.type.value,
        channel=row.channel,
        address=attempt.address,
        created_at=row.created_at,
        secret=attempt.secret,
        incident=incident,
        level=row.level,
        digest=digest,
        digest_total=len(attempt.members),
    )


# A contact is woken once per deliverer, not once per level that reaches it (a storm would cost a
# message per notification): a flag in the broker says a deliverer is on its way and has not claimed
# yet. The deliverer clears it before each claim, so a row committed before the clear is seen by that
# claim, and a row committed after it sets the flag again and publishes a new deliverer. The flag
# expires in case its deliverer was lost with its message (the sweep wakes those rows meanwhile).
WAKE_FLAG_TTL_S = 60


def _wake_flag(contact_id: uuid.UUID | str) -> str:
    return f"notify-wake:{contact_id}"


def _raise_wake_flags(contact_ids: list[uuid.UUID]) -> list[uuid.UUID]:
    """Set the flags of the contacts that have none, in one broker round trip (a storm's batch of
    levels reaches a hundred contacts); returns those that had none, whose deliverers must go out."""
    celery_app = current_app.extensions["celery"]

    def raise_all(client) -> list:
        pipe = client.pipeline(transaction=False)
        for contact_id in contact_ids:
            pipe.set(_wake_flag(contact_id), "1", nx=True, ex=WAKE_FLAG_TTL_S)
        return pipe.execute()

    try:
        raised = on_broker_redis(celery_app, raise_all)
    except Exception:  # noqa: BLE001 - cannot tell: wake them all (a spare deliverer claims nothing)
        return contact_ids
    if raised is None:  # the broker is not Redis: every wake-up is published
        return contact_ids
    return [contact_id for contact_id, was_raised in zip(contact_ids, raised, strict=True) if was_raised]


def _clear_wake_flags(contact_ids: list) -> bool:
    """Clear the flags (one broker round trip); True when any was set (a wake-up came since the last
    clear)."""
    keys = [_wake_flag(contact_id) for contact_id in contact_ids]
    try:
        return bool(on_broker_redis(current_app.extensions["celery"], lambda client: client.delete(*keys)))
    except Exception:  # noqa: BLE001 - the flag expires; meanwhile the sweep wakes what waits
        return False


def _hand_to_busy_deliverer(contact_id: str, settings: notify.NotifySettings) -> None:
    """Another deliverer is sending this contact's rows: leave what woke this one to it. The flag,
    set again, tells it to claim once more when its batch is done (it clears the flag as it ends);
    a deliverer at the latest moment its claim can last covers one that ended before the flag was
    set, without waiting for the sweep."""
    _hold_wake_flag(contact_id, datetime.now(UTC) + timedelta(seconds=WAKE_FLAG_TTL_S))
    wake_at(uuid.UUID(contact_id), datetime.now(UTC) + settings.claim_lasts)


def _hold_wake_flag(contact_id: str, until: datetime) -> None:
    """Keep wake-ups for now from publishing until `until`, when a deliverer is due anyway."""
    seconds = max(1, math.ceil((until - datetime.now(UTC)).total_seconds()))
    try:
        on_broker_redis(
            current_app.extensions["celery"],
            lambda client: client.set(_wake_flag(contact_id), "1", ex=seconds),
        )
    except Exception:  # noqa: BLE001, S110 - then the levels meanwhile wake deliverers that wait too
        pass


def wake(contact_ids) -> bool:
    """Publish deliverers for the contacts that have none on its way, now (after a commit that gave
    them notifications). On a broker failure the sweep wakes the rest later; False then."""
    waking = _raise_wake_flags(list(contact_ids))
    unpublished = _publish(waking, None)
    if unpublished:
        _clear_wake_flags(unpublished)  # or they would hold back wake-ups until they expire
    return not unpublished


def wake_at(contact_id: uuid.UUID, when: datetime | None) -> bool:
    """Publish a deliverer for the contact at `when`, or now (when None) whatever its flag says."""
    return not _publish([contact_id], when)


def _publish(contact_ids: list, when: datetime | None) -> list:
    """Publish deliverers for the contacts, CONTACTS_PER_DELIVERER to a message; returns the contacts
    left unpublished by a broker failure (the rows are due in Postgres: the sweep wakes them)."""
    for start in range(0, len(contact_ids), CONTACTS_PER_DELIVERER):
        chunk = [str(contact_id) for contact_id in contact_ids[start : start + CONTACTS_PER_DELIVERER]]
        try:
            deliver_notifications.apply_async((chunk,), eta=when)
        except Exception as exc:  # noqa: BLE001 - any broker failure: leave them to the sweep
            logger.warning(
                "[NOTIFY] could not wake the deliverers of %d contact(s) (%s); the sweep will",
                len(contact_ids) - start,
                exc,
            )
            return contact_ids[start:]
    return []


# A deliverer message names up to CONTACTS_PER_DELIVERER contacts, not one: a storm's batch of levels
# reaches a hundred contacts, and a Celery message (its events, its log lines, its round trips) cost
# the notifier more CPU than the send it carried. Each contact is sent to from a thread of its own,
# up to SENDING_THREADS at a time, so a hung webhook holds up its own thread, not the contacts after it.
CONTACTS_PER_DELIVERER = 20
SENDING_THREADS = 4


@shared_task(bind=True, name="notifications.deliver", max_retries=20)
def deliver_notifications(self, contact_ids: list[str] | str) -> int:
    """Send each contact's due notifications, within its throttle; returns how many were attempted.
    A message published before deliverers took several contacts names one, not a list."""
    ids = [contact_ids] if isinstance(contact_ids, str) else list(contact_ids)
    app = current_app._get_current_object()
    deadline = time.monotonic() + current_app.config["SETTINGS"].notify.deliverer_budget_s

    def deliver_in_thread(contact_id: str) -> int:
        with app.app_context():
            return _deliver(contact_id, deadline)

    # Every contact's flag in one round trip, before any of their claims (see WAKE_FLAG_TTL_S).
    _clear_wake_flags(ids)
    attempted, retry, failed, trouble = 0, [], [], None
    with ThreadPoolExecutor(max_workers=min(SENDING_THREADS, len(ids))) as pool:
        futures = [(contact_id, pool.submit(deliver_in_thread, contact_id)) for contact_id in ids]
        for contact_id, future in futures:
            try:
                attempted += future.result()
            except (DBAPIError, PoolTimeoutError) as exc:
                retry.append(contact_id)
                trouble = exc
            except Exception:  # noqa: BLE001 - one contact's fault must not hold up the others
                logger.exception("[NOTIFY] delivering to contact %s failed", contact_id)
                failed.append(contact_id)
    if retry:
        # The database was the trouble: those contacts again, backing off as the escalation task does.
        countdown = get_exponential_backoff_interval(1, self.request.retries, 30, full_jitter=True)
        raise self.retry(args=(retry,), exc=trouble, countdown=countdown)
    if failed:
        # Their claims expire and the sweep wakes them again.
        raise RuntimeError(f"delivering to {len(failed)} of {len(ids)} contact(s) failed")
    return attempted


def _deliver(contact_id: str, deadline: float) -> int:
    """Send the contact's due notifications, within its throttle, until the task's `deadline`
    (time.monotonic()); returns how many were attempted."""
    settings = current_app.config["SETTINGS"].notify
    provider_settings = current_app.extensions["channel_settings"]
    db = current_app.extensions["db"]
    token = uuid.uuid4()
    attempted = 0
    cleared = True  # the deliverer cleared the flag before the first claim (and at the end of a round)
    for _ in range(MAX_ROUNDS):
        if time.monotonic() >= deadline:
            wake_at(uuid.UUID(contact_id), None)  # a fresh deliverer, whatever the flag says
            return attempted
        if not cleared:
            _clear_wake_flags([contact_id])  # before the claim: see WAKE_FLAG_TTL_S
        with db.begin() as session:
            claim = notify.claim(session, uuid.UUID(contact_id), token, settings)
        if claim.busy:
            _hand_to_busy_deliverer(contact_id, settings)
            break
        # The rows the claim set to wait for the throttle's window are woken then, whatever happens
        # to this round's sends (a retry ends the round early).
        if claim.wake_at is not None and not claim.wake_scheduled:
            wake_at(uuid.UUID(contact_id), claim.wake_at)
        for notification_id in claim.ids:
            if time.monotonic() >= deadline:
                _give_back(contact_id, token, None)  # to a fresh deliverer
                return attempted
            with db.begin() as session:
                attempt = notify.begin_send(session, notification_id, token)
                if attempt is None:
                    continue
                # The row lock is held through the provider call: see models/notify.py.
                outcome = channels.send(_message(attempt), provider_settings)
                retry_at = notify.finish(session, attempt, outcome, settings)
            attempted += 1
            _log(attempt, outcome)
            if retry_at is not None:
                _give_back(contact_id, token, retry_at)
                return attempted
        # Due rows left for another round come first: rows waiting for the window (a claim that
        # made a digest may leave both) have their wake-up.
        if claim.more:
            cleared = False
            continue
        if claim.wake_at is not None:
            # Until then a new alert has nothing to wake: it waits for the same window.
            _hold_wake_flag(contact_id, claim.wake_at)
            break
        # Nothing left, unless a deliverer woken meanwhile found this one busy and left its rows to it
        # (or it is still on its way, and will find nothing). Rows that come later wake their own.
        cleared = _clear_wake_flags([contact_id])
        if not cleared:
            break
    else:
        wake([uuid.UUID(contact_id)])
    return attempted


def _give_back(contact_id: str, token: uuid.UUID, until: datetime | None) -> None:
    """Give back what this deliverer claimed and has not attempted, due `until` (None: now), and
    publish a deliverer for the contact then."""
    with current_app.extensions["db"].begin() as session:
        now = db_now(session)
        notify.release(session, token, until or now, now)
    wake_at(uuid.UUID(contact_id), until)


def _log(attempt: notify.Attempt, outcome: channels.Outcome) -> None:
    row = attempt.notification
    about = f"incident {attempt.incident.id}" if attempt.incident else row.type.value
    if row.type is NotificationType.DIGEST:
        about = f"digest of {len(attempt.members)} incident(s)"
    line = f"[NOTIFY] {row.channel} {row.id} to contact {row.contact_id} ({about}): {outcome.status}"
    if outcome.error:
        line += f" ({outcome.error})"
    ids = {"notification_id": row.id, "contact_id": row.contact_id, "incident_id": row.incident_id}
    (logger.info if outcome.status == "sent" else logger.warning)(line, extra=ids)


@shared_task(name="notifications.sweep")
def sweep_notifications() -> int:
    """Give back claims of deliverers that died, and wake contacts whose due rows nobody took."""
    settings = current_app.config["SETTINGS"].notify
    outbox = Outbox()
    with current_app.extensions["db"].begin() as session:
        released, woken = notify.sweep(session, db_now(session), settings, outbox)
    _publish(list(outbox.wake), None)
    if released or woken:
        logger.warning("[NOTIFY] sweep: %d expired claim(s) given back, %d due row(s) woken", released, woken)
    return released + woken
