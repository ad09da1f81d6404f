"""Batches: the levels falling due within one window travel in one broker message and run in one
transaction (models/engine.py). On the real Postgres, each step called as the task calls it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text

from models import engine
from models.engine import EngineSettings, Outbox
from models.escalation import Escalation
from models.incident import Incident
from models.lifecycle import Action
from models.policy import parse_policies
from tests.support.incidents import escalate_new

POLICIES = parse_policies(
    {
        "default_policy": "two",
        "policies": {
            "two": {"levels": [{"delay": "1h", "notify": ["in_app"]}, {"delay": "2s", "notify": ["in_app"]}]}
        },
    }
)
SETTINGS = EngineSettings(batch_window_s=0.1, batch_size=3, late_window_s=3, late_batch=2)
T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def test_escalations_due_within_one_window_share_a_message_of_at_most_the_batch_size():
    outbox = Outbox()
    ids = [uuid.uuid4() for _ in range(7)]
    due = [
        T0 - timedelta(seconds=5),  # already due: with the other due one, whatever their times
        T0 - timedelta(seconds=1),
        T0 + timedelta(milliseconds=10),  # one window...
        T0 + timedelta(milliseconds=90),
        T0 + timedelta(milliseconds=150),  # ...the next
        T0 + timedelta(milliseconds=20),  # the first window again, and full at three
        T0 + timedelta(milliseconds=30),  # so a second message for that window
    ]
    task_ids = [outbox.hand_over(i, d, T0, SETTINGS) for i, d in zip(ids, due, strict=True)]
    groups = [(m.escalation_ids, m.eta) for m in outbox.publish]
    assert groups == [
        (ids[0:2], due[1]),
        ([ids[2], ids[3], ids[5]], due[3]),  # sent when the last of them is due
        ([ids[4]], due[4]),
        ([ids[6]], due[6]),
    ]
    by_message = {m.task_id: m.escalation_ids for m in outbox.publish}
    assert all(i in by_message[t] for i, t in zip(ids, task_ids, strict=True))


@pytest.fixture(scope="module")
def db(migrated_database):
    """This module's own database: no worker executes what these tests write."""
    from models.db import make_engine, make_session_factory

    factory = make_session_factory(make_engine(migrated_database("batches_unit"), pool_size=4))
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture(autouse=True)
def quiet(request):
    """Each test starts with no level pending but its own: a batch also runs other messages' levels
    that are due, and the earlier tests' next levels fall due while the module runs."""
    if "db" in request.fixturenames:
        with request.getfixturevalue("db").begin() as session:
            session.execute(text("UPDATE escalations SET status = 'CANCELLED' WHERE status = 'PENDING'"))


def escalating(db, count: int) -> list[uuid.UUID]:
    """`count` incidents escalated by POLICIES, their level 1 made due a second ago; level 1's ids."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with db.begin() as session:
        for _ in range(count):
            escalate_new(session, tenant, POLICIES, SETTINGS)
        return list(
            session.scalars(
                text(
                    "UPDATE escalations SET scheduled_at = clock_timestamp() - interval '1 second' "
                    "WHERE incident_id IN (SELECT id FROM incidents WHERE tenant = :tenant) RETURNING id"
                ),
                {"tenant": tenant},
            )
        )


def make_late(db, *lates: tuple[list[uuid.UUID], float], jitter_ms: int = 0) -> None:
    """Make each (ids, seconds) due that many seconds ago, less up to jitter_ms at random."""
    with db.begin() as session:
        session.execute(
            text(
                "UPDATE escalations SET scheduled_at = clock_timestamp() - make_interval(secs => :s) "
                "- random() * make_interval(secs => :jitter) WHERE id = ANY(:ids)"
            ),
            [{"ids": ids, "s": seconds, "jitter": jitter_ms / 1000} for ids, seconds in lates],
        )


def rows(db, ids) -> list[Escalation]:
    with db() as session:
        return list(session.scalars(select(Escalation).where(Escalation.id.in_(ids))))


def test_one_transaction_executes_every_level_of_its_message_and_schedules_the_next_ones_together(db):
    ids = escalating(db, 4)
    with db.begin() as session:  # one incident resolved: its level is cancelled with it
        resolved = session.scalar(select(Incident).join(Escalation).where(Escalation.id == ids[3]))
        engine.lock_incident(session, resolved.id)
        engine.transition(
            session, resolved, Action.RESOLVE, actor=None, policies=POLICIES, settings=SETTINGS,
            outbox=Outbox(),
        )  # fmt: skip
    outbox = Outbox()
    with db.begin() as session:
        outcomes = engine.execute(session, [*ids, uuid.uuid4()], None, SETTINGS, outbox)
    assert outcomes == {"executed": 3, "duplicate": 1, "missing": 1}
    executed = [r for r in rows(db, ids) if r.status == "EXECUTED"]
    assert len({r.executed_at for r in executed}) == 1  # one transaction, one clock
    # Their level 2s fall due together: one message (batch_size 3) carries them, each row its task id.
    [message] = outbox.publish
    level2 = rows(db, message.escalation_ids)
    assert sorted(r.incident_id for r in level2) == sorted(r.incident_id for r in executed)
    assert {(r.escalation_level, r.status, r.task_id) for r in level2} == {(2, "PENDING", message.task_id)}
    assert message.eta == max(r.scheduled_at for r in level2)
    lines = [line for line, _ids in outbox.log if "EXECUTING level 1" in line]
    assert len(lines) == 3

    # The same message again (the broker's redelivery): nothing runs twice.
    with db.begin() as session:
        assert engine.execute(session, ids, None, SETTINGS, Outbox()) == {"duplicate": 4}


def test_an_early_level_of_a_batch_is_handed_back_only_by_its_own_message(db):
    ids = escalating(db, 2)
    with db.begin() as session:
        session.execute(
            text(
                # now(): one due time for both (clock_timestamp() differs by row, and two times
                # microseconds apart can fall either side of a batch window's edge: two messages).
                "UPDATE escalations SET scheduled_at = now() + interval '1 minute', "
                "task_id = 'current' WHERE id = ANY(:ids)"
            ),
            {"ids": ids},
        )
    with db.begin() as session:
        assert engine.execute(session, ids, "an older copy", SETTINGS, Outbox()) == {"stale": 2}
    outbox = Outbox()
    with db.begin() as session:
        assert engine.execute(session, ids, "current", SETTINGS, outbox) == {"early": 2}
    [message] = outbox.publish
    assert sorted(message.escalation_ids) == sorted(ids)
    assert {r.task_id for r in rows(db, ids)} == {message.task_id}


def test_a_batch_also_runs_the_oldest_late_level_of_each_tenant(db):
    own = escalating(db, 1)
    storm = escalating(db, 3)  # one tenant's backlog
    lone = escalating(db, 1)  # another tenant's level, late behind it
    long_late = escalating(db, 1)  # late by more than the look covers: left to its own message
    make_late(db, (storm, 2.0), (lone, 1.0), (long_late, 10.0), jitter_ms=100)
    outbox = Outbox()
    with db.begin() as session:
        assert engine.execute(session, own, None, SETTINGS, outbox) == {"executed": 1, "picked up": 2}
    executed = {r.id for r in rows(db, own + storm + lone + long_late) if r.status == "EXECUTED"}
    oldest_of_storm = min(rows(db, storm), key=lambda r: r.scheduled_at).id
    assert executed == {own[0], lone[0], oldest_of_storm}
    assert sum("EXECUTING level 1" in line for line, _ids in outbox.log) == 3


def test_a_batch_on_time_does_not_look_for_late_levels(db):
    """Only a batch late itself takes others' late levels: a worker on time has no backlog. (A full
    batch, so that the levels due by now are not taken either.)"""
    own = escalating(db, 1)
    late = escalating(db, 1)
    make_late(db, (own, 0.1), (late, 1.0))
    full = EngineSettings(batch_size=1, late_window_s=3, late_batch=2)
    with db.begin() as session:
        assert engine.execute(session, own, None, full, Outbox()) == {"executed": 1}
    assert {r.id: r.status for r in rows(db, own + late)} == {own[0]: "EXECUTED", late[0]: "PENDING"}


def test_a_batch_fills_up_with_levels_of_other_messages_due_by_now(db):
    """Each escalate request publishes its level 1 alone: levels due together run together."""
    own = escalating(db, 1)
    others = escalating(db, 3)  # due as long ago as own, each in a message of its own
    make_late(db, (own, 0.1), (others, 0.2))  # on time: no late look, the due ones only
    outbox = Outbox()
    with db.begin() as session:
        assert engine.execute(session, own, None, SETTINGS, outbox) == {"executed": 1, "picked up": 2}
    executed = [r for r in rows(db, own + others) if r.status == "EXECUTED"]
    assert len(executed) == SETTINGS.batch_size
    picked = [r.id for r in executed if r.id not in own]
    # The earliest due first; their next levels travel in one message.
    assert sorted(r.scheduled_at for r in rows(db, others))[:2] == sorted(
        r.scheduled_at for r in rows(db, picked)
    )
    [message] = outbox.publish
    assert len(message.escalation_ids) == SETTINGS.batch_size
    # A picked-up level's own message finds it executed, and takes the one still due.
    with db.begin() as session:
        outcomes = engine.execute(session, picked[:1], None, SETTINGS, Outbox())
    assert outcomes == {"duplicate": 1, "picked up": 1}
    assert all(r.status == "EXECUTED" for r in rows(db, own + others))


def test_a_broken_level_of_another_message_is_left_to_it_and_fails_no_batch(db):
    """A level whose step fails (its incident's stored levels are corrupt: the next level cannot be
    scheduled) is picked up in a savepoint: the batch commits without it, and the next batch does
    the same, instead of every batch failing on it."""
    own = escalating(db, 2)
    broken = escalating(db, 1)
    make_late(db, (own, 0.1), (broken, 0.2))
    corrupt = '[{"delay_ms": 0, "notify": ["in_app"]}, {"delay_ms": 1000}]'
    of_broken = "(SELECT incident_id FROM escalations WHERE id = :id)"
    with db.begin() as session:
        session.execute(
            text(f"UPDATE incidents SET policy_levels = CAST(:levels AS JSONB) WHERE id = {of_broken}"),
            {"levels": corrupt, "id": broken[0]},
        )

    def written() -> tuple[int, int]:
        """The broken incident's timeline entries and escalations."""
        with db() as session:
            return tuple(
                session.scalar(
                    text(f"SELECT count(*) FROM {table} WHERE incident_id = {of_broken}"), {"id": broken[0]}
                )
                for table in ("incident_events", "escalations")
            )

    before = written()
    for one in own:
        outbox = Outbox()
        with db.begin() as session:
            assert engine.execute(session, [one], None, SETTINGS, outbox) == {"executed": 1}
        assert len(outbox.publish) == 1  # its own next level, nothing of the broken one's
        assert any("left to their own messages" in line for line, _ids in outbox.log)
    statuses = {r.id: r.status for r in rows(db, own + broken)}
    assert statuses == {own[0]: "EXECUTED", own[1]: "EXECUTED", broken[0]: "PENDING"}
    assert written() == before  # nothing of the rolled-back step: no timeline entry, no next level
