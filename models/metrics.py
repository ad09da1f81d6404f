"""The figures Postgres keeps for /metrics: escalation lateness, notifications by channel and status
with their delivery latency, and the sweeps.

Postgres is the record, so what lives there is counted there, and one scrape of the web covers the
work of every worker. Rows are never deleted, so counts over all of them never go down; but counting
millions of rows at every scrape would not stay cheap. So the sweep folds the rows that have settled
into a rollup and moves a watermark past them, and a scrape reads the rollup plus the rows since the
watermark (a few minutes' worth), in one snapshot:
- an executed escalation has settled FOLD_LAG after its executed_at: by then the transaction that
  executed it has ended (a worker process is killed 60 s into a task, celeryconfig.task_time_limit);
- a notification is folded by created_at once final (FINAL_STATUSES never change again): the
  watermark never passes one still PENDING or SENDING, so everything before it is final and counted.

The counts start when the rollup was created (migration 0006): Prometheus reads counters as rates,
and what happened before that does not change any rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    ARRAY,
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    Integer,
    SmallInteger,
    String,
    func,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from models.db import Base
from models.engine import EngineSettings, db_now
from models.escalation import Escalation, EscalationStatus
from models.notification import FINAL_STATUSES, Notification, NotificationStatus

# Histogram buckets, in seconds. Changing them restarts the histograms' counts from the next fold
# (the rollup keeps the bounds it counted with; Prometheus takes the drop as a counter reset).
LATENESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DELIVERY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
# Twice the longest a transaction that executes an escalation or writes a notification can stay open.
FOLD_LAG = timedelta(minutes=2)
UNFINISHED = tuple(status for status in NotificationStatus if status not in FINAL_STATUSES)


class MetricsRollup(Base):
    """The rollup's one row: what the sweeps have folded, up to each watermark, and the last sweep."""

    __tablename__ = "metrics_rollup"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    # Escalations executed before this are counted in lateness_*.
    escalations_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lateness_bounds: Mapped[list[float]] = mapped_column(ARRAY(Double), server_default=text("'{}'"))
    lateness_counts: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), server_default=text("'{}'"))
    lateness_sum: Mapped[float] = mapped_column(Double, server_default=text("0"))
    # Notifications created before this are final and counted in metrics_rollup_notifications.
    notifications_before: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivery_bounds: Mapped[list[float]] = mapped_column(ARRAY(Double), server_default=text("'{}'"))
    sweep_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sweep_runs: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    sweep_handovers: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    sweep_redeliveries: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    escalations_due: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    escalations_overdue: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)


class NotificationRollup(Base):
    """Final notifications folded so far by channel and status: counts cumulative by delivery latency
    (SENT rows only: created_at to sent_at), the last one counting every row."""

    __tablename__ = "metrics_rollup_notifications"

    channel: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(32), primary_key=True)
    counts: Mapped[list[int]] = mapped_column(ARRAY(BigInteger))
    latency_sum: Mapped[float] = mapped_column(Double)


@dataclass(frozen=True)
class Tally:
    """A histogram's state: counts cumulative by bucket bound, the last one counting every row; and
    the sum of the values."""

    counts: tuple[int, ...]
    sum: float

    @classmethod
    def zero(cls, bounds: tuple[float, ...]) -> Tally:
        return cls((0,) * (len(bounds) + 1), 0.0)

    @property
    def count(self) -> int:
        return self.counts[-1]

    def __add__(self, other: Tally) -> Tally:
        counts = tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        return Tally(counts, self.sum + other.sum)


@dataclass(frozen=True)
class Figures:
    """Everything /metrics exports from Postgres."""

    lateness: Tally  # executed escalations, by executed_at - scheduled_at
    notifications: dict[tuple[str, str], Tally]  # (channel, status): rows; SENT ones by delivery latency
    escalations_due: int  # PENDING and due, at the last sweep
    escalations_overdue: int  # of which due for longer than the redelivery grace
    sweep_at: datetime | None
    sweep_runs: int
    sweep_handovers: int
    sweep_redeliveries: int


def read(session: Session) -> Figures:
    """The rollup plus the rows past its watermarks, in one snapshot: a fold committed between two of
    these statements would otherwise count its rows twice, or not at all."""
    session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    rollup = session.scalars(select(MetricsRollup)).one()
    stored = _stored_notifications(rollup, session.scalars(select(NotificationRollup)))
    return Figures(
        lateness=_stored_lateness(rollup) + _lateness(session, rollup.escalations_before),
        notifications=_merged(stored, _notification_tallies(session, rollup.notifications_before)),
        escalations_due=rollup.escalations_due,
        escalations_overdue=rollup.escalations_overdue,
        sweep_at=rollup.sweep_at,
        sweep_runs=rollup.sweep_runs,
        sweep_handovers=rollup.sweep_handovers,
        sweep_redeliveries=rollup.sweep_redeliveries,
    )


def record_sweep(
    session: Session, settings: EngineSettings, handed: int, redelivered: int, lag: timedelta = FOLD_LAG
) -> None:
    """After a sweep: count it, refresh the due and overdue gauges, and fold what has settled.

    The rollup's row lock serialises sweeps that run at once: each folds from where the last one
    stopped. `lag`: how long after a row was written it is taken as settled (tests fold at once).
    """
    # Not worth waiting for the disk: a crash may lose this transaction whole, and the next sweep
    # folds the same rows again.
    session.execute(text("SET LOCAL synchronous_commit = off"))
    rollup = session.scalars(select(MetricsRollup).with_for_update()).one()
    now = db_now(session)
    overdue_before = now - timedelta(seconds=settings.redelivery_grace_s)
    with session.no_autoflush:  # the rollup is written once, at commit
        rollup.escalations_due, rollup.escalations_overdue = session.execute(
            select(func.count(), func.count().filter(Escalation.scheduled_at < overdue_before)).where(
                Escalation.status == EscalationStatus.PENDING, Escalation.scheduled_at <= now
            )
        ).one()
        rollup.sweep_at = now
        rollup.sweep_runs += 1
        rollup.sweep_handovers += handed
        rollup.sweep_redeliveries += redelivered
        _fold_escalations(session, rollup, now - lag)
        _fold_notifications(session, rollup, now - lag)


def _fold_escalations(session: Session, rollup: MetricsRollup, settled_before: datetime) -> None:
    if settled_before <= rollup.escalations_before:
        return
    folded = _stored_lateness(rollup) + _lateness(session, rollup.escalations_before, settled_before)
    rollup.lateness_bounds, rollup.lateness_counts = list(LATENESS_BUCKETS), list(folded.counts)
    rollup.lateness_sum = folded.sum
    rollup.escalations_before = settled_before


def _fold_notifications(session: Session, rollup: MetricsRollup, settled_before: datetime) -> None:
    oldest_unfinished = session.scalar(
        select(func.min(Notification.created_at)).where(
            Notification.created_at >= rollup.notifications_before, Notification.status.in_(UNFINISHED)
        )
    )
    if oldest_unfinished is not None:
        settled_before = min(settled_before, oldest_unfinished)
    if settled_before <= rollup.notifications_before:
        return
    rows = {(row.channel, row.status): row for row in session.scalars(select(NotificationRollup))}
    settled = _notification_tallies(session, rollup.notifications_before, settled_before)
    for (channel, status), tally in _merged(_stored_notifications(rollup, rows.values()), settled).items():
        row = rows.get((channel, status))
        if row is None:
            row = NotificationRollup(channel=channel, status=status)
            session.add(row)
        row.counts, row.latency_sum = list(tally.counts), tally.sum
    rollup.delivery_bounds = list(DELIVERY_BUCKETS)
    rollup.notifications_before = settled_before


def _stored_lateness(rollup: MetricsRollup) -> Tally:
    """The folded lateness, or nothing when it was counted with other bucket bounds."""
    if rollup.lateness_bounds != list(LATENESS_BUCKETS):
        return Tally.zero(LATENESS_BUCKETS)
    return Tally(tuple(rollup.lateness_counts), rollup.lateness_sum)


def _stored_notifications(rollup: MetricsRollup, rows) -> dict[tuple[str, str], Tally]:
    """The folded notifications; nothing for each when they were counted with other bucket bounds."""
    if rollup.delivery_bounds != list(DELIVERY_BUCKETS):
        return {(row.channel, row.status): Tally.zero(DELIVERY_BUCKETS) for row in rows}
    return {(row.channel, row.status): Tally(tuple(row.counts), row.latency_sum) for row in rows}


def _merged(a: dict[tuple[str, str], Tally], b: dict[tuple[str, str], Tally]) -> dict[tuple[str, str], Tally]:
    zero = Tally.zero(DELIVERY_BUCKETS)
    return {key: a.get(key, zero) + b.get(key, zero) for key in a.keys() | b.keys()}


def _tally_columns(value, bounds: tuple[float, ...]) -> list:
    """count(*) cumulatively by `value` <= each bound (NULL counts in none), then of every row, and
    the sum of `value`: a Tally's columns."""
    by_bound = [func.count().filter(value <= bound) for bound in bounds]
    return [*by_bound, func.count(), func.coalesce(func.sum(value), 0)]


# Built once: fifteen FILTER clauses cost more to build than the query costs to run.
LATENESS_TALLY = _tally_columns(
    func.extract("epoch", Escalation.executed_at - Escalation.scheduled_at), LATENESS_BUCKETS
)
DELIVERY_TALLY = _tally_columns(
    func.extract("epoch", Notification.sent_at - Notification.created_at), DELIVERY_BUCKETS
)


def _lateness(session: Session, since: datetime, before: datetime | None = None) -> Tally:
    """Escalations executed in [since, before), by lateness (both times from the database clock)."""
    window = [Escalation.executed_at >= since]
    if before is not None:
        window.append(Escalation.executed_at < before)
    return _tallies(session, LATENESS_TALLY, window)[()]


def _notification_tallies(
    session: Session, since: datetime, before: datetime | None = None
) -> dict[tuple[str, str], Tally]:
    """Notifications created in [since, before) by channel and status, SENT ones by delivery latency."""
    window = [Notification.created_at >= since]
    if before is not None:
        window.append(Notification.created_at < before)
    groups = (Notification.channel, Notification.status)
    tallies = _tallies(session, DELIVERY_TALLY, window, groups)
    return {(channel, status.value): tally for (channel, status), tally in tallies.items()}


def _tallies(session: Session, columns: list, where: list, groups: tuple = ()) -> dict:
    """One query: a Tally of the rows `where` selects, per group."""
    rows = session.execute(select(*groups, *columns).where(*where).group_by(*groups)).all()
    return {tuple(row[: len(groups)]): Tally(tuple(row[len(groups) : -1]), float(row[-1])) for row in rows}
