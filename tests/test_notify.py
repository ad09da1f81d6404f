"""The delivery engine's database side (models/notify.py) step by step, on the real Postgres: who a
level reaches, claims and the throttle, digests, retries, SKIP on transitions, the sweep, and a resolve
waiting for a send in flight. No worker: each step is called as the tasks call it."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, text, update

from models import engine, notify
from models.contact import Contact
from models.engine import EngineSettings, Outbox, db_now
from models.escalation import Escalation
from models.incident import Incident, IncidentEvent
from models.lifecycle import Action, State
from models.notification import Notification, NotificationStatus, NotificationType
from models.policy import parse_policies
from tasks.channels import Outcome
from tests.support.incidents import escalate_new

POLICIES = parse_policies(
    {
        "default_policy": "two",
        "policies": {
            "two": {
                "levels": [
                    {"delay": "1h", "notify": ["in_app", "email", "sms"]},
                    {"delay": "1h", "notify": ["email"]},
                ]
            }
        },
    }
)
SETTINGS = EngineSettings()
RULES = notify.NotifySettings(rates={"sms": 2, "email": 10, "slack": 20, "webhook": 120})


@pytest.fixture(scope="module")
def db(migrated_database):
    """This module's own database: no worker sweeps or delivers what these tests write."""
    from models.db import make_engine, make_session_factory

    factory = make_session_factory(make_engine(migrated_database("notify_unit"), pool_size=4))
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def contact(db, tenant, channel="email", **fields) -> uuid.UUID:
    with db.begin() as session:
        row = Contact(
            id=uuid.uuid4(),
            tenant=tenant,
            name="on call",
            channel=channel,
            address=fields.pop("address", "+14155550100" if channel == "sms" else "oncall@example.com"),
            status_updates=fields.pop("status_updates", False),
            **fields,
        )
        session.add(row)
    return row.id


def escalate(db, tenant) -> uuid.UUID:
    """A new incident of the tenant, escalated (level 1 PENDING, an hour out)."""
    with db.begin() as session:
        return escalate_new(session, tenant, POLICIES, SETTINGS).id


def execute_level(db, tenant, incident_id=None, notify_override=None) -> tuple[uuid.UUID, Outbox]:
    """Escalate a new incident (or the given one) and execute its next level now; (incident, outbox)."""
    outbox = Outbox()
    if incident_id is None:
        incident_id = escalate(db, tenant)
    with db.begin() as session:
        values = {"scheduled_at": db_now(session) - timedelta(seconds=1)}
        if notify_override is not None:
            values["notify"] = notify_override
        escalation_id = session.scalar(
            update(Escalation)
            .where(Escalation.incident_id == incident_id, Escalation.status == "PENDING")
            .values(**values)
            .returning(Escalation.id)
        )
    with db.begin() as session:
        assert engine.execute(session, [escalation_id], None, SETTINGS, outbox) == {"executed": 1}
    return incident_id, outbox


def rows(db, **where) -> list[Notification]:
    with db() as session:
        stmt = select(Notification).order_by(Notification.created_at, Notification.id)
        for name, value in where.items():
            stmt = stmt.where(getattr(Notification, name) == value)
        return session.scalars(stmt).all()


def claim(db, contact_id, token=None) -> notify.Claim:
    with db.begin() as session:
        return notify.claim(session, contact_id, token or uuid.uuid4(), RULES)


def attempt(db, notification_id, token, outcome: Outcome):
    """begin_send + finish in one transaction, as the deliverer does around the provider call."""
    with db.begin() as session:
        started = notify.begin_send(session, notification_id, token)
        if started is None:
            return None
        return notify.finish(session, started, outcome, RULES)


def transition(db, incident_id, action: Action) -> Outbox:
    outbox = Outbox()
    with db.begin() as session:
        incident = engine.lock_incident(session, incident_id)
        engine.transition(
            session, incident, action, actor=None, policies=POLICIES, settings=SETTINGS, outbox=outbox
        )
    return outbox


def test_a_level_reaches_the_enabled_contacts_whose_levels_include_it(db, tenant):
    reached = contact(db, tenant, "email")
    sms = contact(db, tenant, "sms", levels=[1, 3])
    contact(db, tenant, "email", levels=[2])  # a later level only
    contact(db, tenant, "email", enabled=False)
    contact(db, tenant, "email", deleted_at=text("now()"))
    contact(db, tenant, "webhook", address="https://example.com/h")  # a channel level 1 does not name
    contact(db, f"{tenant}-other", "email")  # another tenant's
    incident_id, outbox = execute_level(db, tenant)
    written = rows(db, incident_id=incident_id)
    assert sorted((n.channel, n.status.value) for n in written) == [
        ("email", "PENDING"),
        ("in_app", "SENT"),
        ("sms", "PENDING"),
    ]
    assert {n.contact_id for n in written if n.channel != "in_app"} == {reached, sms}
    assert all(n.level == 1 and n.type is NotificationType.ESCALATED for n in written)
    assert outbox.wake == {reached, sms}


def test_levels_executed_together_each_reach_their_own_tenants_contacts(db, tenant):
    """A batch writes every level's contact rows in one statement: each row is its own level's."""
    other = f"{tenant}-b"
    mine, theirs = contact(db, tenant, "email"), contact(db, other, "email")  # level 2: email only
    first, _ = execute_level(db, tenant)
    second, _ = execute_level(db, other)
    levels = []
    for incident_id in (first, second):
        with db.begin() as session:  # level 2 of each, due now
            levels.append(
                session.scalar(
                    update(Escalation)
                    .where(Escalation.incident_id == incident_id, Escalation.status == "PENDING")
                    .values(scheduled_at=db_now(session))
                    .returning(Escalation.id)
                )
            )
    outbox = Outbox()
    with db.begin() as session:
        assert engine.execute(session, levels, None, SETTINGS, outbox) == {"executed": 2}
    for incident_id, contact_id, channel in ((first, mine, "email"), (second, theirs, "email")):
        level2 = [
            (n.contact_id, n.channel, n.level) for n in rows(db, incident_id=incident_id) if n.level == 2
        ]
        assert level2 == [(contact_id, channel, 2)]
    assert outbox.wake == {mine, theirs} and outbox.reach == []


def test_a_level_paged_now_reaches_its_contacts(db, tenant):
    reached = contact(db, tenant, "email")
    incident_id = escalate(db, tenant)
    outbox = Outbox()
    with db.begin() as session:
        locked = engine.lock_incident(session, incident_id)
        assert engine.escalate_now(
            session, locked, None, actor=uuid.uuid4(), settings=SETTINGS, outbox=outbox
        )
    email = [n for n in rows(db, incident_id=incident_id) if n.channel == "email"]
    assert [(n.contact_id, n.level) for n in email] == [(reached, 1)]
    assert outbox.wake == {reached}


def test_a_snapshot_naming_a_channel_nothing_delivers_gets_a_skipped_row_not_a_crash(db, tenant):
    incident_id, _ = execute_level(db, tenant, notify_override=["phone", "in_app"])
    (skipped,) = [n for n in rows(db, incident_id=incident_id) if n.channel == "phone"]
    assert skipped.status is NotificationStatus.SKIPPED and "cannot be delivered" in skipped.last_error


def test_claims_keep_within_the_throttle_and_bundle_the_surplus_into_one_digest(db, tenant):
    phone = contact(db, tenant, "sms")
    incidents = [execute_level(db, tenant)[0] for _ in range(6)]
    token = uuid.uuid4()
    first = claim(db, phone, token)
    # Rate 2: one slot for the oldest alert, one for a digest of the other five.
    assert len(first.ids) == 2 and first.wake_at is None
    digest_id = first.ids[1]
    (digest,) = rows(db, id=digest_id)
    assert digest.type is NotificationType.DIGEST and digest.status is NotificationStatus.SENDING
    members = rows(db, digest_id=digest_id)
    assert {m.incident_id for m in members} == set(incidents[1:])
    assert all(m.status is NotificationStatus.SENDING and m.claim_token == token for m in members)
    assert attempt(db, first.ids[0], token, Outcome("sent", provider_id="SM1")) is None
    assert attempt(db, digest_id, token, Outcome("sent", provider_id="SM2")) is None
    assert {m.status for m in rows(db, digest_id=digest_id)} == {NotificationStatus.BUNDLED}
    # Each member's incident says it was sent (in the digest).
    with db() as session:
        sent_events = session.scalars(
            select(IncidentEvent.incident_id).where(
                IncidentEvent.type == "notification_sent", IncidentEvent.incident_id.in_(incidents)
            )
        ).all()
    assert sorted(sent_events) == sorted(incidents)
    # The window is full: a new alert waits for it, and the claim says when to come back.
    later, _ = execute_level(db, tenant)
    full = claim(db, phone)
    assert full.ids == [] and full.wake_at is not None and not full.wake_scheduled
    (waiting,) = rows(db, incident_id=later, channel="sms")
    assert waiting.status is NotificationStatus.PENDING and waiting.next_attempt_at == full.wake_at
    # Another alert in the same window waits for the same moment, whose wake-up is already asked for.
    execute_level(db, tenant)
    again = claim(db, phone)
    assert again.ids == [] and again.wake_at == full.wake_at and again.wake_scheduled


def test_a_claim_belongs_to_its_deliverer_and_an_alert_is_re_checked_before_it_is_sent(db, tenant):
    mail = contact(db, tenant)
    incident_id, _ = execute_level(db, tenant)
    token = uuid.uuid4()
    (notification_id,) = claim(db, mail, token).ids
    assert attempt(db, notification_id, uuid.uuid4(), Outcome("sent")) is None  # not its claim
    assert rows(db, id=notification_id)[0].status is NotificationStatus.SENDING
    # The incident is resolved between the claim and the send: nothing is sent.
    with db.begin() as session:
        session.execute(update(Incident).where(Incident.id == incident_id).values(state=State.RESOLVED))
    assert attempt(db, notification_id, token, Outcome("sent")) is None
    (row,) = rows(db, id=notification_id)
    assert row.status is NotificationStatus.SKIPPED and "resolved" in row.last_error


def test_transient_failures_retry_with_backoff_then_fail_with_the_reason(db, tenant):
    mail = contact(db, tenant)
    incident_id, _ = execute_level(db, tenant)
    token = uuid.uuid4()
    (notification_id,) = claim(db, mail, token).ids
    retry_at = attempt(db, notification_id, token, Outcome("retry", error="connection refused"))
    (row,) = rows(db, id=notification_id)
    assert (
        row.status is NotificationStatus.PENDING
        and row.attempts == 1
        and row.last_error == "connection refused"
    )
    assert timedelta(seconds=1.5) < retry_at - row.updated_at <= timedelta(seconds=2.5)
    # Retry-After wins over a shorter backoff.
    with db.begin() as session:
        session.execute(
            update(Notification)
            .where(Notification.id == notification_id)
            .values(next_attempt_at=text("now()"))
        )
    (again,) = claim(db, mail, token).ids
    retry_at = attempt(db, again, token, Outcome("retry", error="429", retry_after_s=30))
    assert retry_at - rows(db, id=notification_id)[0].updated_at >= timedelta(seconds=30)
    # Past the retry period, the next transient failure is final.
    with db.begin() as session:
        session.execute(
            update(Notification)
            .where(Notification.id == notification_id)
            .values(next_attempt_at=text("now()"), created_at=text("now() - interval '16 minutes'"))
        )
    (last,) = claim(db, mail, token).ids
    assert attempt(db, last, token, Outcome("retry", error="503 Service Unavailable")) is None
    (row,) = rows(db, id=notification_id)
    assert row.status is NotificationStatus.FAILED and row.attempts == 3
    assert "still failing after 3 attempts" in row.last_error and "503" in row.last_error
    with db() as session:
        types = session.scalars(
            select(IncidentEvent.type).where(IncidentEvent.incident_id == incident_id)
        ).all()
    assert "notification_failed" in types


def test_a_permanent_failure_fails_at_once(db, tenant):
    mail = contact(db, tenant)
    execute_level(db, tenant)
    token = uuid.uuid4()
    (notification_id,) = claim(db, mail, token).ids
    assert attempt(db, notification_id, token, Outcome("failed", error="550 no such user")) is None
    (row,) = rows(db, id=notification_id)
    assert (row.status, row.attempts, row.last_error) == (NotificationStatus.FAILED, 1, "550 no such user")


def test_resolve_skips_unsent_alerts_and_tells_contacts_that_were_paged(db, tenant):
    paged = contact(db, tenant, "email", status_updates=True)
    quiet = contact(db, tenant, "email", status_updates=False)
    late = contact(db, tenant, "email", status_updates=True, levels=[2])
    incident_id, _ = execute_level(db, tenant)
    token = uuid.uuid4()
    (sent_id,) = claim(db, paged, token).ids
    attempt(db, sent_id, token, Outcome("sent"))
    (quiet_id,) = claim(db, quiet, uuid.uuid4()).ids  # claimed (SENDING), not sent yet
    outbox = transition(db, incident_id, Action.RESOLVE)
    by_contact = {(n.contact_id, n.type): n for n in rows(db, incident_id=incident_id) if n.contact_id}
    assert by_contact[(paged, NotificationType.ESCALATED)].status is NotificationStatus.SENT
    skipped = by_contact[(quiet, NotificationType.ESCALATED)]
    assert skipped.id == quiet_id and skipped.status is NotificationStatus.SKIPPED
    assert "resolved" in skipped.last_error
    # Only the contact that was paged and wants status updates hears of the resolution.
    update_row = by_contact[(paged, NotificationType.RESOLVED)]
    assert update_row.status is NotificationStatus.PENDING
    assert (quiet, NotificationType.RESOLVED) not in by_contact and (
        late,
        NotificationType.RESOLVED,
    ) not in by_contact
    assert outbox.wake == {paged}


def test_a_resolve_waits_for_a_send_in_flight_so_nothing_arrives_after_it_commits(db, tenant):
    mail = contact(db, tenant)
    incident_id, _ = execute_level(db, tenant)
    token = uuid.uuid4()
    (notification_id,) = claim(db, mail, token).ids
    provider_called = threading.Event()
    resolved_at: list[float] = []

    def resolve():
        provider_called.wait(5)
        transition(db, incident_id, Action.RESOLVE)
        resolved_at.append(time.monotonic())

    resolver = threading.Thread(target=resolve)
    resolver.start()
    with db.begin() as session:
        started = notify.begin_send(session, notification_id, token)
        provider_called.set()
        time.sleep(1.0)  # the provider takes its time; the resolve is waiting meanwhile
        accepted_at = time.monotonic()
        notify.finish(session, started, Outcome("sent"), RULES)
    resolver.join(10)
    assert resolved_at and resolved_at[0] > accepted_at
    (row,) = rows(db, id=notification_id)
    assert row.status is NotificationStatus.SENT  # sent before the resolve committed, and so recorded
    # ...and the record says so in order: the resolve read its clock after the send it waited for.
    with db() as session:
        incident = session.get(Incident, incident_id)
        timeline = session.scalars(
            select(IncidentEvent).where(IncidentEvent.incident_id == incident_id).order_by(IncidentEvent.id)
        ).all()
    assert row.sent_at < incident.resolved_at
    assert [e.type for e in timeline][-2:] == ["notification_sent", "resolved"]
    assert timeline[-2].at < timeline[-1].at


def test_a_transient_failure_gives_back_the_rest_of_the_claim_for_the_same_retry_time(db, tenant):
    hook = contact(db, tenant, "webhook", address="https://example.com/hook")
    for _ in range(3):
        execute_level(db, tenant, notify_override=["webhook"])
    token = uuid.uuid4()
    first, *rest = claim(db, hook, token).ids
    assert len(rest) == 2
    retry_at = attempt(db, first, token, Outcome("retry", error="timed out"))
    with db.begin() as session:
        notify.release(session, token, retry_at, db_now(session))
    for row in rows(db, contact_id=hook):
        assert row.status is NotificationStatus.PENDING and row.next_attempt_at == retry_at
        assert row.claim_token is None
    assert [r.attempts for r in rows(db, contact_id=hook) if r.id in rest] == [0, 0]


def test_the_sweep_gives_back_expired_claims_and_wakes_forgotten_rows_but_never_one_being_sent(db, tenant):
    mail = contact(db, tenant)
    other = contact(db, tenant)
    execute_level(db, tenant)
    token = uuid.uuid4()
    (in_flight,) = claim(db, mail, token).ids
    (expired,) = claim(db, other, uuid.uuid4()).ids
    with db.begin() as session:
        session.execute(
            update(Notification)
            .where(Notification.id.in_([in_flight, expired]))
            .values(claimed_until=text("now() - interval '1 second'"))
        )
    with db.begin() as sending:
        assert notify.begin_send(sending, in_flight, token) is not None  # its lock held
        outbox = Outbox()
        with db.begin() as session:
            released, _ = notify.sweep(session, db_now(session), RULES, outbox)
        assert released >= 1 and other in outbox.wake
        assert rows(db, id=expired)[0].status is NotificationStatus.PENDING
        assert rows(db, id=in_flight)[0].status is NotificationStatus.SENDING
        sending.rollback()
    # A due row nobody took for longer than the grace: its contact's deliverer is woken.
    with db.begin() as session:
        session.execute(
            update(Notification)
            .where(Notification.id == expired)
            .values(next_attempt_at=text("now() - interval '1 hour'"))
        )
    outbox = Outbox()
    with db.begin() as session:
        notify.sweep(session, db_now(session), RULES, outbox)
    assert other in outbox.wake


def test_a_deleted_contact_stops_receiving_and_keeps_its_history(db, tenant):
    mail = contact(db, tenant)
    execute_level(db, tenant)
    with db.begin() as session:
        session.execute(update(Contact).where(Contact.id == mail).values(deleted_at=text("now()")))
    assert claim(db, mail).ids == []
    (row,) = rows(db, contact_id=mail)
    assert row.status is NotificationStatus.SKIPPED and row.last_error == "contact deleted"


def test_one_deliverer_at_a_time_per_contact(db, tenant):
    mail = contact(db, tenant)
    execute_level(db, tenant)
    first = uuid.uuid4()
    (in_hand,) = claim(db, mail, first).ids
    execute_level(db, tenant)  # a new alert while the first deliverer is at work
    assert claim(db, mail, uuid.uuid4()).ids == []  # a second deliverer leaves it to the first
    attempt(db, in_hand, first, Outcome("sent"))
    (taken,) = claim(db, mail, first).ids  # the first one's next round takes it
    assert taken != in_hand


def test_a_claim_says_whether_due_rows_are_left_for_another_round(db, tenant):
    hook = contact(db, tenant, "webhook", address="https://example.com/hook")
    for _ in range(RULES.batch + 2):
        execute_level(db, tenant, notify_override=["webhook"])
    token = uuid.uuid4()
    first = claim(db, hook, token)
    assert len(first.ids) == RULES.batch and first.more  # a batch taken, two rows left
    for notification_id in first.ids:
        attempt(db, notification_id, token, Outcome("sent"))
    second = claim(db, hook, token)
    assert len(second.ids) == 2 and not second.more  # the last ones: no third round
    for notification_id in second.ids:
        attempt(db, notification_id, token, Outcome("sent"))
    assert claim(db, hook, token) == notify.Claim()


def test_one_round_trip_raises_the_wake_flags_and_names_only_the_contacts_without_a_deliverer(app):
    """After a batch's commit the escalation worker asks Redis once which of the contacts it reached
    have no deliverer on its way (tasks/notifications.py): those, and only those, are published."""
    from tasks.notifications import _clear_wake_flags, _raise_wake_flags

    on_its_way, fresh, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with app.app_context():
        assert _raise_wake_flags([on_its_way]) == [on_its_way]
        assert _raise_wake_flags([on_its_way, fresh, other]) == [fresh, other]
        assert _raise_wake_flags([fresh, on_its_way, other]) == []
        # A deliverer clears its flag before it claims: the next level's wake-up publishes again.
        assert _clear_wake_flags([fresh])
        assert not _clear_wake_flags([uuid.uuid4()])
        assert _raise_wake_flags([other, fresh]) == [fresh]
        assert _clear_wake_flags([on_its_way, fresh, other])
        assert _raise_wake_flags([other]) == [other]
        _clear_wake_flags([other])


def expired_digest_claim(db, tenant) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A new SMS contact (rate 2) paged by six levels, claimed: one alert and a digest of the other
    five, the claim since expired (its deliverer died, or is slow). Returns (token, ids)."""
    phone = contact(db, tenant, "sms")
    for _ in range(6):
        execute_level(db, tenant)
    token = uuid.uuid4()
    ids = claim(db, phone, token).ids
    with db.begin() as session:
        session.execute(
            update(Notification)
            .where(Notification.claim_token == token)
            .values(claimed_until=text("now() - interval '1 second'"))
        )
    return token, ids


def test_the_sweep_gives_a_digests_members_back_only_with_their_digest(db, tenant):
    """A digest being sent is locked before its members are: a sweep in between must not give the
    members back on their own, or the digest goes out without them and they are never claimed."""
    token, (alert_id, digest_id) = expired_digest_claim(db, tenant)
    with db.begin() as sending:
        # begin_send's first statement: the digest locked, its members not yet.
        sending.execute(select(Notification.id).where(Notification.id == digest_id).with_for_update())
        with db.begin() as session:
            released, _ = notify.sweep(session, db_now(session), RULES, Outbox())
        assert released == 1 and rows(db, id=alert_id)[0].status is NotificationStatus.PENDING
        assert {m.status for m in rows(db, digest_id=digest_id)} == {NotificationStatus.SENDING}
        sending.rollback()
    assert attempt(db, digest_id, token, Outcome("sent", provider_id="SM1")) is None
    members = rows(db, digest_id=digest_id)
    assert len(members) == 5 and {m.status for m in members} == {NotificationStatus.BUNDLED}
    # However small the sweep's batch, a digest given back takes its members with it.
    _token, (_alert_id, digest_id) = expired_digest_claim(db, tenant)
    for _ in range(2):
        with db.begin() as session:
            notify.sweep(session, db_now(session), RULES, Outbox(), limit=1)
        (digest,) = rows(db, id=digest_id)
        assert {m.status for m in rows(db, digest_id=digest_id)} == {digest.status}
    assert digest.status is NotificationStatus.PENDING


def test_a_member_left_behind_by_a_digest_that_went_out_is_sent_on_its_own(db, tenant):
    """Members given back on their own by an earlier version's sweep, under a digest since sent: the
    sweep makes each a message of its own again, and a claim takes it."""
    phone = contact(db, tenant, "sms")
    for _ in range(4):
        execute_level(db, tenant)
    token = uuid.uuid4()
    alert_id, digest_id = claim(db, phone, token).ids
    stranded, *_ = rows(db, digest_id=digest_id)
    with db.begin() as session:
        session.execute(
            update(Notification)
            .where(Notification.id == stranded.id)
            .values(status=NotificationStatus.PENDING, claim_token=None, claimed_until=None,
                    next_attempt_at=text("now() - interval '1 hour'"))
        )  # fmt: skip
    attempt(db, alert_id, token, Outcome("sent"))
    attempt(db, digest_id, token, Outcome("sent"))
    assert rows(db, id=stranded.id)[0].status is NotificationStatus.PENDING
    outbox = Outbox()
    with db.begin() as session:
        notify.sweep(session, db_now(session), RULES, outbox)
    (row,) = rows(db, id=stranded.id)
    assert row.digest_id is None and phone in outbox.wake
    with db.begin() as session:  # the window has room again
        session.execute(
            text("UPDATE notifications SET sent_at = sent_at - interval '1 hour' WHERE contact_id = :c"),
            {"c": phone},
        )
    token = uuid.uuid4()
    assert claim(db, phone, token).ids == [stranded.id]


def _deliverer_app(db, **env: str):
    """The app as a notifier runs it, on this module's database, sending to local receivers."""
    from api import create_app

    url = db.kw["bind"].url.render_as_string(hide_password=False)
    return create_app({"DATABASE_URL": url, "NOTIFY_ALLOW_PRIVATE_URLS": "1", **env})


def test_a_deliverer_past_its_budget_gives_back_the_rest_and_leaves_it_to_a_fresh_one(db, tenant):
    """A deliverer stops starting sends at its budget, long before Celery's time limit would kill it
    in the middle of one (a second copy of what the receiver had accepted)."""
    from tasks.channels.webhook import new_secret
    from tasks.notifications import deliver_notifications
    from tests.support.receivers import HttpReceiver, Reply

    slow = Reply(200, lambda: (time.sleep(0.4), b"ok")[1])
    app = _deliverer_app(db, NOTIFY_DELIVERER_BUDGET="1")
    with HttpReceiver(default=slow) as hooks:
        hook = contact(db, tenant, "webhook", address=hooks.url + "/hook", secret=new_secret())
        for _ in range(6):
            execute_level(db, tenant, notify_override=["webhook"])
        with app.app_context():
            first = deliver_notifications([str(hook)])
        assert 2 <= first <= 4 and len(hooks.requests) == first
        statuses = [row.status for row in rows(db, contact_id=hook)]
        assert statuses.count(NotificationStatus.SENT) == first
        left = [row for row in rows(db, contact_id=hook) if row.status is not NotificationStatus.SENT]
        assert left and all(r.status is NotificationStatus.PENDING and r.claim_token is None for r in left)
        with app.app_context():
            for _ in range(3):  # fresh deliverers, as the one published would be
                deliver_notifications([str(hook)])
        assert {row.status for row in rows(db, contact_id=hook)} == {NotificationStatus.SENT}
        ids = [r.headers["webhook-id"] for r in hooks.requests]
        assert len(ids) == len(set(ids)) == 6


def test_a_deliverer_sends_what_a_digest_left_within_the_throttle_before_it_waits(db, tenant):
    """A claim that made a digest and set a later kind of message to wait for the window may leave due
    alerts for another round: the deliverer takes them now, not when the window has passed."""
    from tasks.channels.webhook import new_secret
    from tasks.notifications import deliver_notifications
    from tests.support.receivers import HttpReceiver

    app = _deliverer_app(db, NOTIFY_RATE_WEBHOOK="25")
    with HttpReceiver() as hooks:
        hook = contact(db, tenant, "webhook", address=hooks.url + "/hook", secret=new_secret())
        for _ in range(30):
            execute_level(db, tenant, notify_override=["webhook"])
        with db.begin() as session:
            notify.queue_test(session, session.get(Contact, hook), db_now(session), Outbox())
        with app.app_context():
            deliver_notifications([str(hook)])
        alerts = [r for r in rows(db, contact_id=hook) if r.type is NotificationType.ESCALATED]
        assert len(alerts) == 30 and {r.status for r in alerts} == {
            NotificationStatus.SENT,
            NotificationStatus.BUNDLED,
        }
        (test_message,) = rows(db, contact_id=hook, type=NotificationType.TEST)
        assert test_message.status is NotificationStatus.PENDING  # the window is full: it waits
        assert len(hooks.requests) == 25  # 24 alerts and one digest of the other 6
