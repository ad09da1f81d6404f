"""The escalation engine's database side: every decision, taken under row locks in one transaction.

Postgres is the clock and the record of what must happen; the broker only wakes workers up. Each
function here changes rows in the caller's transaction and notes in an Outbox what must be told to the
broker once that transaction has committed (tasks.escalation.deliver does the telling). Lock order is
always incident, then escalation: the API and the worker take it the same way, so they cannot deadlock.
"""

from __future__ import annotations

import copy
import math
import uuid
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from models import notify, tenant_policy
from models.db import queue_insert, savepoint
from models.escalation import Escalation, EscalationKind, EscalationStatus
from models.incident import ACTIVE_STATES, DEDUP_INDEX, Incident, IncidentEvent
from models.lifecycle import EVENT_TYPE, STATE_TIMESTAMP, SYSTEM_EVENT_TYPE, Action, State, next_state
from models.policy import PolicySet

PENDING = EscalationStatus.PENDING

# New levels and timeline entries: queued and written one statement per transaction (models/db.py).
INSERT_ESCALATION = insert(Escalation.__table__)
INSERT_EVENT = insert(IncidentEvent.__table__)
INSERT_EVENT_WRITTEN_AT = INSERT_EVENT.values(at=func.clock_timestamp())


@dataclass(frozen=True)
class EngineSettings:
    # Only escalations due within this many seconds are handed to the broker: a Celery ETA task is
    # held unacknowledged in a worker's memory until it runs, so far-future ones would be redelivered
    # past the visibility timeout and would cost worker memory. The sweep hands them over later.
    eta_horizon_s: float = 300.0
    # A delivered escalation still PENDING this long after it was due is taken as lost by the broker.
    redelivery_grace_s: float = 30.0
    sweep_batch: int = 500
    # Levels falling due within one window of this many seconds travel in one broker message and run
    # in one transaction, up to batch_size of them: in a storm a Celery task and a commit per level
    # cost more than the level itself (docs/BENCHMARKS.md). The window is the most a level waits
    # for the others of its message.
    batch_window_s: float = 0.1
    batch_size: int = 100
    # A level this late (seconds) is late because the workers are behind: every batch also takes up
    # to late_batch such levels of other messages, the oldest late one of each tenant, so one
    # tenant's storm cannot hold another tenant's level behind its backlog (a worker runs its due
    # tasks in the order they fell due). Only the levels that turned late within the last
    # late_window_s are looked at: the look stays cheap however long the backlog, and with a task
    # finishing every few milliseconds in a backlog, one of them sees each late level in time. Only
    # batches late themselves look (execute()).
    late_after_s: float = 0.5
    late_window_s: float = 0.5
    late_batch: int = 10
    # A tenant's active incidents (not resolved or cancelled) at most; 0: no quota.
    max_active_incidents: int = 10_000


@dataclass
class Message:
    """One ETA task for the broker: escalations falling due within one batch window, executed
    together when the last of them is due (its eta). Each row carries the message's task id."""

    task_id: str
    eta: datetime
    escalation_ids: list[uuid.UUID] = field(default_factory=list)


@dataclass
class Outbox:
    """What the broker must be told once the transaction has committed, and what to log then."""

    publish: list[Message] = field(default_factory=list)
    # Contacts with notifications to deliver: each one's deliverer is woken (models/notify.py).
    wake: set[uuid.UUID] = field(default_factory=set)
    # Levels executed whose contacts' notifications are still to be written (notify.reach_contacts).
    reach: list[tuple] = field(default_factory=list)
    # (message, ids) to log: the ids (incident_id, escalation_id) go into a JSON line's fields.
    log: list[tuple[str, dict[str, uuid.UUID]]] = field(default_factory=list)
    # The message still taking escalations, by batch window (None: already due).
    _open: dict[int | None, Message] = field(default_factory=dict)

    def note(self, message: str, **ids: uuid.UUID) -> None:
        self.log.append((message, ids))

    def hand_over(self, escalation_id: uuid.UUID, due: datetime, now: datetime, settings) -> str:
        """Put an escalation due at `due` into the message of its batch window; returns its task id."""
        window = None if due <= now else math.ceil(due.timestamp() / settings.batch_window_s)
        message = self._open.get(window)
        if message is None or len(message.escalation_ids) >= settings.batch_size:
            message = self._open[window] = Message(str(uuid.uuid4()), due)
            self.publish.append(message)
        message.escalation_ids.append(escalation_id)
        message.eta = max(message.eta, due)
        return message.task_id


# Statements run on every request or step are built once, here: building one per call (and its cache
# key) cost more CPU than executing it (docs/BENCHMARKS.md section 1).
_CLOCK = select(func.clock_timestamp())


def db_now(session: Session) -> datetime:
    """The database's clock, read now (not at transaction start): every due time is judged by it."""
    return session.scalar(_CLOCK)


# Incidents are locked FOR NO KEY UPDATE: it serialises every engine step on an incident as FOR UPDATE
# would, but lets other transactions insert rows that refer to it (their foreign key takes KEY SHARE).
# A notification sender holds its row lock through the provider call and then appends to the timeline;
# a transition locks the incident and then waits for that row: with FOR UPDATE the two deadlock.
INCIDENT_LOCK = {"key_share": True}

_LOCK = select(Incident).where(Incident.id == bindparam("incident_id")).with_for_update(**INCIDENT_LOCK)
_LOCK_OF_TENANT = _LOCK.where(Incident.tenant == bindparam("tenant"))


def lock_incident(session: Session, incident_id: uuid.UUID, tenant: str | None = None) -> Incident | None:
    """Load the incident under a row lock (SELECT ... FOR NO KEY UPDATE), optionally within one tenant."""
    if tenant is None:
        return session.scalars(_LOCK, {"incident_id": incident_id}).one_or_none()
    return session.scalars(_LOCK_OF_TENANT, {"incident_id": incident_id, "tenant": tenant}).one_or_none()


# Reports of an active incident's dedup_key add to its report_count each time, and to its timeline
# at most this often.
REPORTED_AGAIN_EVERY = timedelta(minutes=1)


# The columns are the parameters' (compiled once per set of names); RETURNING fills in what the
# database set (created_at: the timeline entry shares it).
_INSERT_INCIDENT = insert(Incident.__table__).returning(*Incident.__table__.c)


class QuotaExceeded(Exception):
    """The tenant has its quota of active incidents: a new one is not opened."""


def report(
    session: Session, incident: Incident, *, actor: uuid.UUID, max_active: int = 0
) -> tuple[Incident, bool]:
    """Insert a new incident with its 'created' entry; or, when an active incident of the tenant has
    the same dedup_key, count the report on that one (and say so in its timeline at most once a
    minute) instead. Returns (incident, created). Raises QuotaExceeded, the insert left for the
    caller to roll back, when it would open the tenant's active incident number max_active + 1 (a
    report counted on an existing one opens nothing, and is never refused).

    The partial unique index decides, so however many reports race, one incident is opened. The
    quota is counted without a lock: reports racing past it may each open one.
    """
    while True:
        try:
            # A savepoint only where a conflict is possible: it costs two round trips.
            with session.begin_nested() if incident.dedup_key else nullcontext():
                # A Core INSERT, not the unit of work (models/db.py says why).
                inserted = session.connection().execute(_INSERT_INCIDENT, _columns(incident)).one()
        except IntegrityError as exc:
            if exc.orig.diag.constraint_name != DEDUP_INDEX:
                raise
            existing = session.scalars(
                select(Incident)
                .where(
                    Incident.tenant == incident.tenant,
                    Incident.dedup_key == incident.dedup_key,
                    Incident.state.in_(ACTIVE_STATES),
                )
                .with_for_update(**INCIDENT_LOCK)
            ).one_or_none()
            if existing is None:
                continue  # resolved or cancelled meanwhile: the key is free again
            now = db_now(session)
            existing.report_count += 1
            existing.last_reported_at = now
            last_entry = session.scalar(
                select(func.max(IncidentEvent.at)).where(
                    IncidentEvent.incident_id == existing.id, IncidentEvent.type == "reported_again"
                )
            )
            if last_entry is None or now - last_entry >= REPORTED_AGAIN_EVERY:
                record_event(
                    session,
                    existing,
                    "reported_again",
                    now,
                    actor=actor,
                    from_state=existing.state,
                    data={
                        "title": incident.title,
                        "severity": incident.severity,
                        "report_count": existing.report_count,
                    },
                )
            return existing, False
        for name, value in inserted._mapping.items():
            setattr(incident, name, value)  # never added to the session: nothing to flush
        if max_active and _count_active(session, incident.tenant, up_to=max_active + 1) > max_active:
            raise QuotaExceeded
        record_event(session, incident, "created", incident.created_at, actor=actor)
        return incident, True


def _columns(row) -> dict:
    """The column values set on a new ORM object, for a Core INSERT (the rest take their defaults)."""
    return {name: value for name, value in vars(row).items() if not name.startswith("_")}


def _count_active(session: Session, tenant: str, up_to: int) -> int:
    """The tenant's active incidents, counted up to `up_to` only: a range of the (tenant, state, ...)
    index, never longer than the quota."""
    active = select(Incident.id).where(Incident.tenant == tenant, Incident.state.in_(ACTIVE_STATES))
    return session.scalar(select(func.count()).select_from(active.limit(up_to).subquery()))


def _hand_over(escalation: Escalation, now: datetime, outbox: Outbox, settings: EngineSettings) -> None:
    """Mark the escalation as handed to the broker now, in its batch's message, published after commit."""
    escalation.task_id = outbox.hand_over(escalation.id, escalation.scheduled_at, now, settings)
    escalation.published_at = now


def _schedule_level(
    session: Session,
    incident: Incident,
    level: int,
    base: datetime,
    settings: EngineSettings,
    outbox: Outbox,
    round_: int = 1,
    kind: EscalationKind = EscalationKind.LEVEL,
) -> Escalation:
    """Insert level `level` of round `round_` PENDING, due its delay after `base` (an acknowledgement
    timer: the policy's ack_timeout after it); hand it over if within the horizon."""
    spec = incident.policy_levels[level - 1]
    delay_ms = incident.policy_ack_timeout_ms if kind is EscalationKind.ACK_TIMEOUT else spec["delay_ms"]
    escalation = Escalation(
        id=uuid.uuid4(),
        incident_id=incident.id,
        escalation_level=level,
        round=round_,
        kind=kind,
        manual=False,
        actor=None,
        reason=None,
        status=PENDING,
        notify=list(spec["notify"]),
        scheduled_at=base + timedelta(milliseconds=delay_ms),
        executed_at=None,
        task_id=None,
        published_at=None,
        created_at=base,
        updated_at=base,
    )
    if escalation.scheduled_at <= base + timedelta(seconds=settings.eta_horizon_s):
        _hand_over(escalation, base, outbox, settings)
    # Written with the transaction's other new levels in one INSERT (models/db.py), so every column
    # is named. The object returned is never added to the session.
    queue_insert(session, INSERT_ESCALATION, _columns(escalation))
    what = "the acknowledgement's timer, then level" if kind is EscalationKind.ACK_TIMEOUT else "level"
    outbox.note(
        f"[ESCALATION] Scheduled {what} {level} for incident {incident.id} at "
        f"{escalation.scheduled_at.isoformat()} (escalation {escalation.id}, round {round_})",
        incident_id=incident.id,
        escalation_id=escalation.id,
    )
    return escalation


_CANCEL_PENDING = (
    update(Escalation.__table__)
    .where(Escalation.incident_id == bindparam("of_incident"), Escalation.status == PENDING)
    .values(status=EscalationStatus.CANCELLED, updated_at=bindparam("now"))
)


def cancel_pending(session: Session, incident_id: uuid.UUID, now: datetime, outbox: Outbox) -> int:
    """Mark every PENDING escalation of the incident CANCELLED: the row is what stops the level.

    Their tasks are not revoked: a revoke is a broadcast that kombu retries without limit, so with
    the broker gone it held a resolve request for as long as the outage lasted (RabbitMQ and Redis
    alike). A cancelled level's task wakes a worker, which finds it CANCELLED and does nothing.
    """
    params = {"of_incident": incident_id, "now": now}
    cancelled = session.execute(_CANCEL_PENDING, params).rowcount  # after the queued inserts
    if cancelled:
        outbox.note(
            f"[ESCALATION] Cancelled {cancelled} pending escalation(s) for incident {incident_id}",
            incident_id=incident_id,
        )
    return cancelled


def record_event(
    session: Session,
    incident: Incident,
    type_: str,
    at: datetime | None,
    *,
    actor: uuid.UUID | None,
    from_state: State | None = None,
    data: dict | None = None,
) -> None:
    """Append a typed row to the incident's timeline, in the caller's transaction (queued, and
    written with its other new timeline rows: models/db.py). `at` None: the database's clock when
    the row is written."""
    row = {
        "incident_id": incident.id,
        "type": type_,
        "from_state": from_state,
        "to_state": incident.state,
        "actor": actor,
        "data": data or {},
    }
    if at is None:
        queue_insert(session, INSERT_EVENT_WRITTEN_AT, row)
    else:
        queue_insert(session, INSERT_EVENT, {**row, "at": at})


# A transition's UPDATE, one per state reached. Its SET clause is the parameters' columns (compiled
# and cached once per set of names) and the timestamps, which it reads from the database's clock and
# returns: one round trip less than reading the clock first (the request path's cost is its round
# trips and the Python around each). statement_timestamp() is one reading for both columns, and the
# statement begins after lock_incident() took the lock, so it is the step's time, as db_now() after
# the lock would be. The key's parameter is not named after a column: an UPDATE reserves those.
_TRANSITION_UPDATE = {
    state: update(Incident.__table__)
    .where(Incident.__table__.c.id == bindparam("incident_key"))
    .values({"updated_at": func.statement_timestamp(), column: func.statement_timestamp()})
    .returning(Incident.__table__.c.updated_at)
    for state, column in STATE_TIMESTAMP.items()
}


def _update(session: Session, incident: Incident, target: State, changes: dict) -> datetime:
    """UPDATE the locked incident to `target` with `changes`, stamped with the database's clock, and
    set the values on the loaded object as if loaded so (no flush: models/db.py says why); returns
    the stamp. Only for an incident with no change pending in the unit of work: a later flush would
    write those over these."""
    changes = {"state": target, **changes}
    now = (
        session.connection()
        .execute(_TRANSITION_UPDATE[target], {"incident_key": incident.id, **changes})
        .scalar_one()
    )
    for name, value in {**changes, "updated_at": now, STATE_TIMESTAMP[target]: now}.items():
        set_committed_value(incident, name, value)
    return now


def transition(
    session: Session,
    incident: Incident,
    action: Action,
    *,
    actor: uuid.UUID | None,
    policies: PolicySet,
    settings: EngineSettings,
    outbox: Outbox,
    note: str | None = None,
) -> None:
    """Apply `action` to an incident locked by lock_incident(): state, timestamps, timeline, and
    the escalations that start or stop with it. Raises InvalidTransition and changes nothing."""
    current = incident.state
    target = next_state(current, action)
    notify.skip_unsent(session, incident, target)  # may wait for a send in flight: before the clock
    if target is State.ESCALATING:
        policy, own = tenant_policy.escalation_policy(session, policies, incident)
    changes: dict = {}
    data: dict = {"note": note} if note else {}
    if target is State.ESCALATING:
        changes.update(
            policy_levels=[level.as_json() for level in policy.levels],
            policy_repeat=policy.repeat,
            policy_ack_timeout_ms=policy.ack_timeout_ms,
            policy_version=own.version if own else None,
        )
    now = _update(session, incident, target, changes)
    if target is State.ESCALATING:
        data.update(policy=policy.name, levels=len(policy.levels), repeat=policy.repeat)
        if own:
            data["version"] = own.version
        _schedule_level(session, incident, 1, now, settings, outbox)
    elif current in (State.ESCALATING, State.ACKNOWLEDGED):
        # Its pending levels, or the timer of its acknowledgement.
        cancelled = cancel_pending(session, incident.id, now, outbox)
        if current is State.ESCALATING or cancelled:
            data["cancelled_escalations"] = cancelled
        if current is State.ESCALATING and target is State.ACKNOWLEDGED and incident.policy_ack_timeout_ms:
            timer = _start_ack_timer(session, incident, now, settings, outbox)
            data["ack_timeout_at"] = timer.scheduled_at.isoformat()
    notify.queue_status_updates(session, incident, target, now, outbox)
    record_event(session, incident, EVENT_TYPE[target], now, actor=actor, from_state=current, data=data)


def _start_ack_timer(
    session: Session, incident: Incident, now: datetime, settings: EngineSettings, outbox: Outbox
) -> Escalation:
    """The acknowledgement's timer: the first row of a new round, at the level last executed (level 1
    when none has), due when the acknowledgement runs out. Not one of the policy's repeats."""
    of_incident = Escalation.incident_id == incident.id
    last_round, last_level = session.execute(
        select(
            select(func.max(Escalation.round)).where(of_incident).scalar_subquery(),
            select(Escalation.escalation_level)
            .where(of_incident, Escalation.status == EscalationStatus.EXECUTED)
            .order_by(Escalation.executed_at.desc())
            .limit(1)
            .scalar_subquery(),
        )
    ).one()
    return _schedule_level(
        session, incident, last_level or 1, now, settings, outbox,
        round_=(last_round or 0) + 1, kind=EscalationKind.ACK_TIMEOUT,
    )  # fmt: skip


def _ack_timed_out(
    session: Session, incident: Incident, escalation: Escalation, now: datetime, outbox: Outbox
) -> None:
    """The system transition ACKNOWLEDGED -> ESCALATING (the state machine says who may take it):
    the acknowledgement ran out with the incident neither resolved nor cancelled."""
    previous = incident.state
    incident.state = next_state(previous, Action.ACK_TIMEOUT)
    incident.updated_at = now
    record_event(
        session,
        incident,
        SYSTEM_EVENT_TYPE[Action.ACK_TIMEOUT],
        now,
        actor=None,
        from_state=previous,
        data={"acknowledged_at": incident.acknowledged_at.isoformat(), **escalation.as_event_data()},
    )
    outbox.note(
        f"[ESCALATION] Acknowledgement of incident {incident.id} ran out: escalating again from level "
        f"{escalation.escalation_level} (round {escalation.round})",
        incident_id=incident.id,
        escalation_id=escalation.id,
    )


def execute(
    session: Session,
    escalation_ids: list[uuid.UUID],
    task_id: str | None,
    settings: EngineSettings,
    outbox: Outbox,
) -> Counter[str]:
    """Execute each of the escalations of one message that, under lock, is still due and whose
    incident is still escalating, in one transaction; then late levels of other messages
    (_pick_up_late), and levels of other messages due by now, up to a full batch (_pick_up_due).

    Counts what happened to them: 'executed', 'duplicate' (not PENDING any more: another delivery did
    it, or it was cancelled), 'cancelled' (the incident left ESCALATING), 'early' (handed back with its
    ETA), 'stale' (an early copy that is not the current delivery) or 'missing'; and 'picked up', the
    levels of other messages executed.
    """
    # The incidents first, in id order, then their escalations with the database clock, read once
    # the incident locks are held. The API locks one incident and then its escalations; any two
    # batches take their common incidents in the same order: no lock order can deadlock.
    incidents = {
        incident.id: incident
        for incident in session.scalars(
            select(Incident)
            .where(Incident.id.in_(select(Escalation.incident_id).where(Escalation.id.in_(escalation_ids))))
            .order_by(Incident.id)
            .with_for_update(**INCIDENT_LOCK)
        )
    }
    rows = session.execute(
        # One clock for the whole batch (an InitPlan: read once, as the statement starts).
        select(Escalation, select(func.clock_timestamp()).scalar_subquery())
        .where(Escalation.id.in_(escalation_ids))
        .order_by(Escalation.id)
        .with_for_update()
    ).all()
    outcomes: Counter[str] = Counter(missing=len(escalation_ids) - len(rows))
    for escalation, now in rows:
        outcome = _execute_one(
            session, incidents[escalation.incident_id], escalation, now, task_id, settings, outbox
        )
        outcomes[outcome] += 1
        if outcome not in ("executed", "early"):
            outbox.note(
                f"[ESCALATION] escalation {escalation.id}: {outcome}, nothing to do",
                incident_id=escalation.incident_id,
                escalation_id=escalation.id,
            )
    if rows:
        now = rows[0][1]
        # Only a batch that is late itself looks for other late levels: a worker keeping up has no
        # backlog for a level to wait behind, and the look (a join, a DISTINCT ON and its planning)
        # was a fifth of a storm's task time when taken by every batch (bench/NOTES.md 5f).
        if now - min(escalation.scheduled_at for escalation, _now in rows) >= timedelta(
            seconds=settings.late_after_s
        ):
            outcomes["picked up"] += _pick_up_late(session, now, settings.late_batch, settings, outbox)
        room = settings.batch_size - outcomes["executed"] - outcomes["picked up"]
        if room > 0:
            outcomes["picked up"] += _pick_up_due(session, now, room, settings, outbox)
    notify.reach_contacts(session, outbox)
    return +outcomes


def _pick_up_due(session: Session, now: datetime, room: int, settings: EngineSettings, outbox: Outbox) -> int:
    """Execute up to `room` levels of other messages that are due by now, the earliest first: levels
    that fell due together but travel in messages of their own (each escalate request publishes
    one) run in this transaction, and their next levels go out in one message with this batch's.
    Their own messages then find them executed. A worker keeping up finds none (each message runs
    as it falls due); one falling behind executes its backlog in ever fuller batches. A level due
    longer ago than the redelivery grace is taken as lost by the broker: the sweep's."""
    candidates = session.execute(
        select(Escalation.id, Escalation.incident_id)
        .where(
            Escalation.status == PENDING,
            Escalation.scheduled_at <= now,
            Escalation.scheduled_at > now - timedelta(seconds=settings.redelivery_grace_s),
        )
        .order_by(Escalation.scheduled_at)
        .limit(room)
    ).all()
    return _execute_others(session, candidates, now, settings, outbox)


def _pick_up_late(
    session: Session, now: datetime, room: int, settings: EngineSettings, outbox: Outbox
) -> int:
    """Execute up to `room` late levels of other messages, the oldest late one of each tenant
    (EngineSettings.late_after_s says why). SKIP LOCKED throughout: rows a transition or another
    task holds are left to them, and this transaction, already holding its own incidents, never
    waits for a lock. Returns how many it executed."""
    late_since = now - timedelta(seconds=settings.late_after_s)
    oldest = (
        select(Escalation.id, Escalation.incident_id, Escalation.scheduled_at)
        .join(Incident, Incident.id == Escalation.incident_id)
        .where(
            Escalation.status == PENDING,
            Escalation.scheduled_at <= late_since,
            Escalation.scheduled_at > late_since - timedelta(seconds=settings.late_window_s),
        )
        .order_by(Incident.tenant, Escalation.scheduled_at)
        .ext(distinct_on(Incident.tenant))
        .subquery()
    )
    candidates = session.execute(
        select(oldest.c.id, oldest.c.incident_id).order_by(oldest.c.scheduled_at).limit(room)
    ).all()
    return _execute_others(session, candidates, now, settings, outbox)


def _execute_others(
    session: Session, candidates: list, now: datetime, settings: EngineSettings, outbox: Outbox
) -> int:
    """Execute the (escalation id, incident id) candidates of other messages that no other
    transaction holds; returns how many it executed.

    In a savepoint, with a copy of the outbox: a level of another message whose step fails (a
    corrupt row, a bug) must not fail this batch, nor every batch that picks it up after it. It is
    left to its own message (which fails alone) and the sweep; the batch commits without it.
    """
    if not candidates:
        return 0
    trial = copy.deepcopy(outbox)
    try:
        with savepoint(session):
            picked = _execute_candidates(session, candidates, now, settings, trial)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the batch goes on without them
        outbox.note(f"[ESCALATION] levels of other messages left to their own messages: {exc!r}")
        return 0
    vars(outbox).update(vars(trial))
    return picked


def _execute_candidates(
    session: Session, candidates: list, now: datetime, settings: EngineSettings, outbox: Outbox
) -> int:
    incidents = {
        incident.id: incident
        for incident in session.scalars(
            select(Incident)
            .where(Incident.id.in_([incident_id for _id, incident_id in candidates]))
            .order_by(Incident.id)
            .with_for_update(skip_locked=True, **INCIDENT_LOCK)
        )
    }
    rows = session.scalars(
        select(Escalation)
        .where(
            Escalation.id.in_([escalation_id for escalation_id, _incident in candidates]),
            Escalation.incident_id.in_(incidents),
            Escalation.status == PENDING,
        )
        .with_for_update(skip_locked=True)
    ).all()
    picked = 0
    for escalation in rows:
        incident = incidents[escalation.incident_id]
        picked += _execute_one(session, incident, escalation, now, None, settings, outbox) == "executed"
    return picked


def _execute_one(
    session: Session,
    incident: Incident,
    escalation: Escalation,
    now: datetime,
    task_id: str | None,
    settings: EngineSettings,
    outbox: Outbox,
) -> str:
    """One escalation of execute(), its incident and itself locked."""
    if escalation.status is not PENDING:
        return "duplicate"
    timer = escalation.kind is EscalationKind.ACK_TIMEOUT
    if incident.state is not (State.ACKNOWLEDGED if timer else State.ESCALATING):
        # Leaving ESCALATING (or, for a timer, ACKNOWLEDGED) cancels pending rows in the same
        # transaction, so this is a guard only.
        escalation.status = EscalationStatus.CANCELLED
        escalation.updated_at = now
        return "cancelled"
    if escalation.scheduled_at > now:
        # Delivered early (a worker clock ahead of the database's, or a sweep): hand it back once.
        if task_id != escalation.task_id:
            return "stale"
        _hand_over(escalation, now, outbox, settings)
        return "early"
    if timer:
        _ack_timed_out(session, incident, escalation, now, outbox)
    _run(session, incident, escalation, now, settings, outbox)
    return "executed"


def _run(
    session: Session,
    incident: Incident,
    escalation: Escalation,
    now: datetime,
    settings: EngineSettings,
    outbox: Outbox,
    actor: uuid.UUID | None = None,
) -> None:
    """Execute a step of the chain (its incident locked and escalating): the row, its timeline entry,
    its notifications, and the next step. `actor`: the responder who paged it now (escalate_now).
    The caller ends its transaction's steps with notify.reach_contacts (one statement for them all)."""
    escalation.status = EscalationStatus.EXECUTED
    escalation.executed_at = now
    escalation.updated_at = now
    escalation.manual = actor is not None
    escalation.actor = actor
    lateness_ms = round((now - escalation.scheduled_at).total_seconds() * 1000, 1)
    record_event(
        session,
        incident,
        "escalation_executed",
        now,
        actor=actor,
        from_state=incident.state,
        data={
            **escalation.as_event_data(),
            "lateness_ms": lateness_ms,
            **({"manual": True} if actor else {}),
        },
    )
    notify.plan_level(session, incident, escalation, now, outbox)
    how = f"paged now by {actor}" if actor else f"{lateness_ms} ms after due"
    outbox.note(
        f"[ESCALATION] EXECUTING level {escalation.escalation_level} for incident {incident.id} "
        f"(escalation {escalation.id}, round {escalation.round}, {how})",
        incident_id=incident.id,
        escalation_id=escalation.id,
    )
    if escalation.escalation_level < len(incident.policy_levels):
        next_level, next_round = escalation.escalation_level + 1, escalation.round
    elif incident.rounds_repeated < incident.policy_repeat:
        # The last level, and nobody has acknowledged: the chain starts again (the policy's repeat).
        incident.rounds_repeated += 1
        next_level, next_round = 1, escalation.round + 1
    else:
        return
    _schedule_level(session, incident, next_level, now, settings, outbox, round_=next_round)


class NoLevelLeft(Exception):
    """Escalate now on an incident whose chain has run to its end: nothing is left to page."""


def _has_passed(session: Session, incident: Incident, level: int) -> bool:
    """Has the incident's latest round passed level `level` (executed it, or skipped it)?"""
    of_incident = Escalation.incident_id == incident.id
    latest = select(func.max(Escalation.round)).where(of_incident).scalar_subquery()
    return session.scalar(
        select(
            select(Escalation.id)
            .where(
                of_incident,
                Escalation.round == latest,
                Escalation.escalation_level == level,
                Escalation.status != PENDING,
            )
            .exists()
        )
    )


def escalate_now(
    session: Session,
    incident: Incident,
    level: int | None,
    *,
    actor: uuid.UUID,
    settings: EngineSettings,
    outbox: Outbox,
) -> bool:
    """A responder pages a level now (POST .../escalate on an incident locked by lock_incident() and
    ESCALATING): `level`, or the lowest PENDING one as read under the lock. Levels skipped on the way
    are CANCELLED, saying so. False, and nothing changes, when level `level` of the current round has
    run already: two responders pressing together page once, and so do a responder and the level
    falling due (both take the incident's lock first). Raises NoLevelLeft when nothing is pending.
    """
    # A chain has one step pending at most: the next one (a timer only while acknowledged).
    found = session.execute(
        select(Escalation, func.clock_timestamp())
        .where(Escalation.incident_id == incident.id, Escalation.status == PENDING)
        .with_for_update()
    ).one_or_none()
    if found is None:
        if level is not None and _has_passed(session, incident, level):
            return False
        raise NoLevelLeft
    pending, now = found
    target = level or pending.escalation_level
    if target < pending.escalation_level:
        return False
    if target > pending.escalation_level:
        # The levels on the way are skipped: the pending one CANCELLED, the ones after it written
        # CANCELLED (the chain keeps a row per level it passed), and the target written to run now.
        reason = f"skipped: level {target} paged now"
        pending.status, pending.updated_at, pending.reason = EscalationStatus.CANCELLED, now, reason
        for number in range(pending.escalation_level + 1, target + 1):
            step = Escalation(
                id=uuid.uuid4(),
                incident_id=incident.id,
                escalation_level=number,
                round=pending.round,
                kind=EscalationKind.LEVEL,
                status=PENDING if number == target else EscalationStatus.CANCELLED,
                reason=None if number == target else reason,
                notify=list(incident.policy_levels[number - 1]["notify"]),
                scheduled_at=now,
                created_at=now,
                updated_at=now,
            )
            session.add(step)
        pending = step
    incident.updated_at = now  # a level paged: the incident changed, although its state did not
    _run(session, incident, pending, now, settings, outbox, actor=actor)
    notify.reach_contacts(session, outbox)
    return True


def sweep(
    session: Session, settings: EngineSettings, outbox: Outbox, lost_before: datetime | None = None
) -> tuple[int, int]:
    """Hand over one batch of PENDING escalations due within the horizon that have no delivery in
    flight: never handed over, or handed over and now overdue past the grace (the broker lost them).

    A row handed over again when it was already overdue by d is handed over once more only after
    another d (at least the grace): overdue by g, 2g, 4g... Without that backoff, a queue whose
    wait exceeds the grace got one more copy of every waiting row at each sweep; the copies, each a
    full task run, starved the real work and the backlog never drained (issue 4, scenario 3).

    `lost_before`: the broker is known to have lost everything it held (Redis restarted empty or
    flushed; tasks.escalation says how that is known), so every row handed over before then is
    handed over again at once, due or not, whatever its backoff: a level lost in two restarts in a
    row would otherwise wait out the backoff of the first (issue 8, scenario 14).

    SKIP LOCKED: two sweeps at once take disjoint rows, and rows a worker is executing are skipped.
    Returns (rows handed over, of which already overdue).
    """
    now = db_now(session)
    horizon = now + timedelta(seconds=settings.eta_horizon_s)
    grace_cutoff = now - timedelta(seconds=settings.redelivery_grace_s)
    # Two index ranges that hold only candidates, not one that walks every row in flight (each
    # sweep read them all from the heap: docs/BENCHMARKS.md section 5). First the rows never handed
    # over (a partial index of their own)...
    rows = _lock_for_sweep(
        session, settings.sweep_batch, Escalation.published_at.is_(None), Escalation.scheduled_at <= horizon
    )
    if len(rows) < settings.sweep_batch:
        # ...then those the broker evidently lost: handed over, and overdue past the grace (with the
        # backoff), or every one handed over before the broker lost its data, due or not.
        lost = and_(
            Escalation.scheduled_at < grace_cutoff,
            Escalation.published_at < grace_cutoff,
            Escalation.published_at - Escalation.scheduled_at < now - Escalation.published_at,
        )
        rows += _lock_for_sweep(
            session,
            settings.sweep_batch - len(rows),
            Escalation.published_at.is_not(None),
            or_(lost, and_(Escalation.published_at < lost_before, Escalation.scheduled_at <= horizon))
            if lost_before
            else lost,
        )
    for escalation in rows:
        _hand_over(escalation, now, outbox, settings)
    return len(rows), sum(1 for escalation in rows if escalation.scheduled_at < now)


def _lock_for_sweep(session: Session, limit: int, *where) -> list[Escalation]:
    return list(
        session.scalars(
            select(Escalation)
            .where(Escalation.status == PENDING, *where)
            .order_by(Escalation.scheduled_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )


def forget_publish(session: Session, failed: list[Message]) -> None:
    """Clear published_at of escalations whose message the broker refused, so the next sweep takes
    them at once. Only where the row still carries that message's task id: a newer delivery is left
    alone."""
    for message in failed:
        session.execute(
            update(Escalation)
            .where(
                Escalation.id.in_(message.escalation_ids),
                Escalation.task_id == message.task_id,
                Escalation.status == PENDING,
            )
            .values(published_at=None),
            execution_options={"synchronize_session": False},
        )
