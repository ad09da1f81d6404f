"""Notification delivery under faults (issue 9): a provider down, failing, hung or slow, the notifier
killed, resolves racing the sends, and a storm against one phone. Every scenario runs a whole stack
(its own Postgres and Redis, gunicorn, an escalation worker, beat, and a notifier consuming the
notification queue) against real receivers: an aiosmtpd SMTP server, HTTP listeners (webhooks and a
Twilio-compatible API) and a TCP listener that never answers.

Each ends with both checkers, required clean: the escalation invariants (stack.check(): the chain
ran, once, on time, whatever the deliveries did) and the notification invariants
(tests/support/notification_invariants.py), plus what the receivers got, counted per notification id.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from models.notify import NotifySettings
from tasks.notifications import SENDING_THREADS
from tests.faults.stack import REDELIVERY_GRACE_S, SWEEP_INTERVAL_S, scale, verdict
from tests.support.notification_invariants import (
    check_receipts,
    deliveries,
    duplicates,
    inspect_notifications,
    notification_id_of,
    settle_notifications,
    unsettled,
)
from tests.support.receivers import HangListener, HttpReceiver, SmtpSink
from tests.support.servers import wait_until

pytestmark = pytest.mark.faults

NOTIFY_QUEUE = "faults-notify"
# What every process of a notification stack runs with (web, escalation worker, notifier, beat): the
# notification queue, and settings for every channel, pointed at the scenario's receivers.
CHANNEL_ENV = {
    "CELERY_NOTIFY_QUEUE": NOTIFY_QUEUE,
    "NOTIFY_ALLOW_PRIVATE_URLS": "1",
    "NOTIFY_EMAIL_FROM": "pager@example.com",
    "TWILIO_ACCOUNT_SID": "AC0123456789",
    "TWILIO_AUTH_TOKEN": "faults-twilio-token",
    "TWILIO_FROM": "+15005550006",
}
# Final and not sent: what a scenario whose every message must go out reports on its own (a row still
# PENDING or SENDING is the notification checker's to report, with its claim).
UNSENT_FINAL = ("FAILED", "SKIPPED", "BUNDLED")
# The whole-attempt bound of tasks/channels (connect 3 s, whole attempt 10 s).
ATTEMPT_TIMEOUT_S = NotifySettings.attempt_timeout_s


class Recorder(HttpReceiver):
    """An HttpReceiver that records its answer to each request (`.answered`, `.answer`, `.answered_at`)
    and, with `delay`, takes that long to answer: a slow provider, so that sends are in flight."""

    def __init__(self, *args, delay: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay

    def _next_reply(self, request):
        status, headers, body = super()._next_reply(request)
        request.answered, request.answer, request.answered_at = status, body, None
        if self.delay:
            time.sleep(self.delay)
        request.answered_at = time.time()
        return status, headers, body

    def in_progress(self, at: float) -> int:
        """Requests that had arrived by `at` and were not answered yet."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.at <= at and (getattr(r, "answered_at", None) or float("inf")) > at
            )


class TimedHangListener(HangListener):
    """A HangListener that records, per connection, when it was accepted and when the client gave
    up on it (closed or shut it down): how long each attempt against a silent peer lasted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.connections: list[list[float | None]] = []  # [accepted_at, client_gave_up_at or None]

    def _hold(self, conn: socket.socket) -> None:
        record: list[float | None] = [time.time(), None]
        self.connections.append(record)
        with conn:
            conn.settimeout(self.drip_every or 0.1)
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)  # the request, then nothing until the client gives up
                except TimeoutError:
                    if self.drip_every:
                        try:
                            conn.sendall(b"2")  # a byte now and then: no per-read timeout ever fires
                        except OSError:
                            record[1] = time.time()
                            return
                    continue
                except OSError:
                    record[1] = time.time()
                    return
                if not data:
                    record[1] = time.time()
                    return

    def attempts(self) -> list[float]:
        """Durations of the connections the client gave up on."""
        return [ended - began for began, ended in list(self.connections) if ended is not None]


# -- the stack -----------------------------------------------------------------------------------------


def notify_stack(make_stack, policy: str, *, notifier_concurrency: int = 2, **env: str):
    """A stack whose every process has CHANNEL_ENV (+ env), with web, escalation worker, notifier and
    beat started; returns (stack, notifier)."""
    stack = make_stack(policy=policy, **CHANNEL_ENV, **env)
    web, worker, beat = stack.web(), stack.worker(), stack.beat()
    notifier = stack.worker("notifier", CELERY_QUEUE=NOTIFY_QUEUE, concurrency=notifier_concurrency)
    stack.start(web, worker, notifier, beat)
    stack.client(web)
    return stack, notifier


def add_contact(stack, channel: str, address: str, **body) -> dict:
    """A contact created through the API (201 required): its JSON, with the secret of a webhook."""
    rec = stack.api.call(
        "POST", "/contacts", {"name": f"{channel} on call", "channel": channel, "address": address, **body}
    )
    assert rec.status == 201, (rec.status, rec.text)
    return rec.json_body


def escalate_one(stack, title: str, **body) -> tuple[str, float]:
    """Create and escalate one incident; (its id, when the escalate answered, on the machine's clock)."""
    incident_id = stack.api.create(title=title, **body)
    assert incident_id, "incident not created"
    rec = stack.api.act(incident_id, "escalate")
    assert rec.status == 200, (rec.status, rec.text)
    return incident_id, time.time()


def rows(stack, where: str = "TRUE", args: tuple | None = None) -> list[dict]:
    names = [
        "id", "incident_id", "contact_id", "channel", "type", "level", "status", "attempts",
        "last_error", "sent_at", "created_at", "digest_id", "provider_id",
    ]  # fmt: skip
    found = stack.sql(f"SELECT {', '.join(names)} FROM notifications WHERE {where}", args)
    return [dict(zip(names, row, strict=True)) for row in found]


def notifier_tasks(notifier) -> int:
    """Deliverer tasks the notifier received (each a broker message)."""
    pattern = re.compile(r"Task notifications\.deliver\[([0-9a-f-]+)\] received")
    return len(set(pattern.findall(notifier.log_text())))


def conclude(
    stack,
    scenario: str,
    broken: str,
    *,
    started: float,
    minimum: dict[str, int],
    problems: list[str] = (),
    **extra,
) -> None:
    """Both checkers and the scenario's own findings, in one verdict: the escalation invariants
    (stack.check), the notification invariants, then `problems` (receipts, timing)."""
    figures = stack.check(minimum=minimum)
    notes = inspect_notifications(stack.database_url)
    # Listed a share of each (the scenario's own, the notification checker's, the escalation
    # checker's), so that hundreds of one kind do not hide the others; all are counted.
    sources = [list(problems), notes.violations, figures.violations]
    share = figures.MAX_LISTED // len(sources)
    listed = [v for source in sources for v in source[:share]]
    listed += [v for source in sources for v in source[share:]][: figures.MAX_LISTED - len(listed)]
    figures.violation_count += len(problems) + notes.violation_count
    figures.violations = listed
    verdict(
        scenario,
        broken,
        figures,
        stack,
        **notes.as_dict(),
        **extra,
        wall_s=round(time.monotonic() - started, 1),
    )


# -- a. SMTP down when the level fires --------------------------------------------------------------

MAIL_POLICY = """\
default_policy: mail
policies:
  mail:
    levels:
      - {delay: 1s, notify: [in_app, email]}
      - {delay: 2s, notify: [email]}
      - {delay: 2s, notify: [in_app]}
"""
SMTP_DOWN_S = 10.0
# After 10 s down a row has failed at most at ages 0, 2 and 6 s; its next attempt comes 8 s after the
# last one at most (backoff 2, 4, 8 s), i.e. at most 8 s after the server is back, plus the time to
# send what is due (milliseconds each) on a busy machine.
SMTP_BACK_BOUND_S = 8.0 + 4.0


def test_na_smtp_down_when_the_level_fires(make_stack):
    started = time.monotonic()
    n = scale("na_incidents", 10)
    sink = SmtpSink()  # its URL is known before it listens: the processes start with it
    # The throttle is not under test here: a rate no burst reaches, so every email is its own.
    stack, _ = notify_stack(make_stack, MAIL_POLICY, SMTP_URL=sink.url, NOTIFY_RATE_EMAIL="1000")
    add_contact(stack, "email", "oncall@example.com")
    add_contact(stack, "email", "lead@example.com", levels=[2])
    for i in range(n):
        escalate_one(stack, f"checkout {i} returns 502")

    def failed_once() -> bool:
        query = "SELECT count(*) FROM notifications WHERE channel = 'email' AND attempts > 0"
        return stack.sql(query)[0][0] > 0

    # Down when the level fires: from the first failed attempt, 10 s more.
    wait_until(failed_once, 30, interval=0.1, what="a first failed email attempt")
    first_failure = time.time()
    time.sleep(max(0.0, first_failure + SMTP_DOWN_S - time.time()))
    sink.start()
    back_at = time.time()
    try:
        waited = stack.settle(60)
        waited += settle_notifications(stack.database_url, 90)
        time.sleep(2)  # anything sent twice would arrive now
        mails = list(sink.messages)
    finally:
        sink.stop()

    emails = rows(stack, "channel = 'email'")
    counts = deliveries(mails)
    twice = duplicates(counts)
    problems = check_receipts(stack.database_url, counts, ["email"])
    problems += [f"[R] email {nid} accepted {k} times" for nid, k in twice.items()]
    problems += [
        f"[a] email {r['id']} is {r['status']} ({r['last_error']})"
        for r in emails
        if r["status"] in UNSENT_FINAL
    ]
    retried = [r for r in emails if r["attempts"] >= 2]
    if not retried:
        problems.append("[a] no email needed a retry: the outage did not happen while levels fired")
    if any(m.at < back_at for m in mails):
        problems.append("[a] an email arrived while the SMTP server was down")
    lateness = [m.at - back_at for m in mails]
    worst = max(lateness, default=0.0)
    if worst > SMTP_BACK_BOUND_S:
        problems.append(
            f"[a] an email arrived {worst:.1f} s after the server was back (bound {SMTP_BACK_BOUND_S} s)"
        )
    expected = 2 * n + n  # levels 1 and 2 reach `every`, level 2 reaches `second`
    if len(emails) != expected:
        problems.append(f"[a] {len(emails)} email notifications, {expected} expected")
    conclude(
        stack,
        "Na. SMTP down when the level fires",
        f"SMTP server refusing connections from the first level-1 email attempt until {SMTP_DOWN_S:g} s "
        f"later, {n} incidents, 2 email contacts (levels 1-2 and 2 only)",
        started=started,
        minimum={"incidents": n, "executed": 3 * n},
        problems=problems,
        emails=len(emails),
        received=len(mails),
        duplicates=sum(k - 1 for k in twice.values()),
        retried=len(retried),
        max_email_attempts=max((r["attempts"] for r in emails), default=0),
        worst_after_back_s=round(worst, 2),
        settled_s=round(waited, 1),
    )


# -- b. a webhook answering 503 twice, then 200 -----------------------------------------------------

HOOK_POLICY = """\
default_policy: hooks
policies:
  hooks:
    levels:
      - {delay: 1s, notify: [in_app, webhook]}
      - {delay: 2s, notify: [in_app]}
"""


def test_nb_webhook_503_twice_then_200(make_stack):
    started = time.monotonic()
    receiver = Recorder().start()
    try:
        stack, _ = notify_stack(make_stack, HOOK_POLICY)
        hook = add_contact(stack, "webhook", f"{receiver.url}/hooks/pager")
        receiver.script(503, 503, 200)
        incident_id, _ = escalate_one(stack, "payments API down")
        waited = stack.settle(30)
        waited += settle_notifications(stack.database_url, 60)
        time.sleep(2)  # a fourth copy would come now
        got = list(receiver.requests)
    finally:
        receiver.stop()

    problems = []
    (alert,) = rows(stack, "channel = 'webhook'")
    if [r.answered for r in got] != [503, 503, 200]:
        problems.append(f"[b] the receiver answered {[r.answered for r in got]}, not 503, 503, 200")
    ids = {r.headers.get("webhook-id") for r in got}
    if ids != {str(alert["id"])}:
        problems.append(f"[b] webhook-ids {ids} on the attempts; the notification is {alert['id']}")
    stamps, signatures = [], set()
    for number, request in enumerate(got, start=1):
        try:
            payload = Webhook(hook["secret"]).verify(request.body, request.headers)
        except Exception as exc:  # noqa: BLE001 - any refusal is the finding
            problems.append(f"[b] attempt {number}: signature refused: {exc.__class__.__name__}: {exc}")
            continue
        if payload["type"] != "incident.escalated" or payload["data"]["incident"]["id"] != incident_id:
            problems.append(f"[b] attempt {number} carries {payload['type']} for another incident")
        if payload["data"]["notification_id"] != str(alert["id"]):
            problems.append(f"[b] attempt {number} names notification {payload['data']['notification_id']}")
        stamps.append(int(request.headers["webhook-timestamp"]))
        signatures.add(request.headers["webhook-signature"])
    if len(signatures) != len(got) or stamps != sorted(stamps) or len(set(stamps)) != len(stamps):
        problems.append(f"[b] attempts not signed afresh: timestamps {stamps}, {len(signatures)} signatures")
    gaps = [later.at - earlier.at for earlier, later in zip(got, got[1:], strict=False)]
    # Backoff 2 s then 4 s: at least that, and a retry within seconds of it (a page held back for
    # minutes after a blip is a failure too).
    for gap, backoff in zip(gaps, (2.0, 4.0), strict=False):
        if not backoff - 0.05 <= gap <= backoff + 3.0:
            problems.append(f"[b] retry {gap:.2f} s after the previous attempt, backoff {backoff:g} s")
    if alert["status"] != "SENT" or alert["attempts"] != 3:
        problems.append(
            f"[b] the alert is {alert['status']} after {alert['attempts']} attempts, SENT after 3 wanted"
        )
    counts = deliveries(got)
    problems += check_receipts(stack.database_url, counts, ["webhook"])
    conclude(
        stack,
        "Nb. webhook 503 twice, then 200",
        "a webhook receiver answering 503, 503, then 200 to the level-1 alert of one incident",
        started=started,
        minimum={"incidents": 1, "executed": 2},
        problems=problems,
        requests=len(got),
        retry_gaps_s=[round(g, 2) for g in gaps],
        duplicates=sum(k - 1 for k in duplicates(counts).values()),
        settled_s=round(waited, 1),
    )


# -- c. a listener that accepts and never answers ---------------------------------------------------

HANG_POLICY = """\
default_policy: hang
policies:
  hang:
    levels:
      - {delay: 1s, notify: [in_app, webhook]}
      - {delay: 2s, notify: [in_app, webhook]}
      - {delay: 2s, notify: [in_app]}
"""
HANG_S = 25.0  # how long the listeners hang before real receivers take their ports over
ATTEMPT_SLACK_S = 1.5  # thread scheduling on a busy machine, around the 10 s deadline


def test_nc_listener_that_never_answers(make_stack):
    started = time.monotonic()
    n = scale("nc_incidents", 6)
    drip, silent = TimedHangListener(drip_every=1.0).start(), TimedHangListener().start()
    stack, notifier = notify_stack(make_stack, HANG_POLICY)
    # Both reached by levels 1 and 2: each level wakes both deliverers, so both listeners get attempts.
    add_contact(stack, "webhook", f"{drip.url}/drip")
    add_contact(stack, "webhook", f"{silent.url}/silent")
    hang_began = time.time()
    for i in range(n):
        escalate_one(stack, f"queue {i} stuck")
    waited = stack.settle(60)
    time.sleep(max(0.0, hang_began + HANG_S - time.time()))
    # The providers come back: real receivers on the same ports answer 200 from now on.
    drip.stop()
    silent.stop()
    back = [Recorder(port=drip.port).start(), Recorder(port=silent.port).start()]
    try:
        waited += settle_notifications(stack.database_url, 90)
        time.sleep(2)
        got = [r for receiver in back for r in receiver.requests]
    finally:
        for receiver in back:
            receiver.stop()

    durations = drip.attempts() + silent.attempts()
    problems = []
    for name, listener in (("dripping", drip), ("silent", silent)):
        if not listener.attempts():
            problems.append(f"[c] only {len(listener.attempts())} attempts against the {name} listener ended")
    too_long = [round(d, 2) for d in durations if d > ATTEMPT_TIMEOUT_S + ATTEMPT_SLACK_S]
    if too_long:
        problems.append(f"[c] attempts lasted {too_long} s, beyond the {ATTEMPT_TIMEOUT_S:g} s bound")
    alerts = rows(stack, "channel = 'webhook'")
    problems += [
        f"[c] alert {r['id']} is {r['status']} ({r['last_error']})"
        for r in alerts
        if r["status"] in UNSENT_FINAL
    ]
    counts = deliveries(got)
    problems += check_receipts(stack.database_url, counts, ["webhook"])
    twice = duplicates(counts)
    problems += [f"[R] webhook {nid} accepted {k} times" for nid, k in twice.items()]
    timeouts = len(re.findall(r"no complete answer within|no answer in time", notifier.log_text()))
    conclude(
        stack,
        "Nc. webhook listener that never answers",
        f"two webhook contacts on TCP listeners that accept and never answer (one trickling a byte a "
        f"second) for {HANG_S:g} s while {n} incidents escalate through 3 levels; then 200s",
        started=started,
        minimum={"incidents": n, "executed": 3 * n},
        problems=problems,
        hung_attempts=len(durations),
        attempt_s_min_max=[round(min(durations, default=0), 2), round(max(durations, default=0), 2)],
        timeouts_logged=timeouts,
        webhook_alerts=len(alerts),
        duplicates=sum(k - 1 for k in twice.values()),
        settled_s=round(waited, 1),
    )


# -- g. healthy contacts beside a hung one ---------------------------------------------------------------

ISOLATION_POLICY = """\
default_policy: mixed
policies:
  mixed:
    levels:
      - {delay: 1s, notify: [in_app, webhook, email]}
      - {delay: 2s, notify: [in_app, email]}
"""
ISOLATION_EVERY_S = 1.0
# A page to a contact whose provider works goes out within seconds of its level, whatever another
# contact's provider does: at the latest when the sweep wakes its contact (interval + grace), plus a
# margin for the send itself on a busy machine.
HEALTHY_BOUND_S = SWEEP_INTERVAL_S + REDELIVERY_GRACE_S + 2.0


def test_ng_healthy_contacts_beside_a_hung_one(make_stack):
    started = time.monotonic()
    n = scale("ng_incidents", 6)
    hung, sink = TimedHangListener().start(), SmtpSink().start()
    try:
        stack, notifier = notify_stack(
            make_stack, ISOLATION_POLICY, SMTP_URL=sink.url, NOTIFY_RATE_EMAIL="1000"
        )
        add_contact(stack, "webhook", f"{hung.url}/hooks/broken")
        add_contact(stack, "email", "oncall@example.com")
        for i in range(n):  # a steady trickle, as incidents come in a real outage
            escalate_one(stack, f"region {i} degraded")
            time.sleep(ISOLATION_EVERY_S)
        waited = stack.settle(60)
        try:
            wait_until(
                lambda: not rows(stack, "channel = 'email' AND status IN ('PENDING', 'SENDING')"),
                60,
                interval=0.25,
                what="every email sent",
            )
        except TimeoutError:
            pass  # the checker reports what is left
        emails = rows(stack, "channel = 'email'")
        mails = list(sink.messages)
        # The webhook comes back: a real receiver on its port, so that everything settles.
        hung.stop()
        back = Recorder(port=hung.port).start()
        try:
            waited += settle_notifications(stack.database_url, 90)
            time.sleep(1)
            got = list(back.requests)
        finally:
            back.stop()
    finally:
        sink.stop()
        hung.stop()

    problems = []
    arrived = {}
    for mail in mails:
        nid = notification_id_of(mail)
        arrived.setdefault(nid, mail.at)
    delays = []
    for row in emails:
        at = arrived.get(str(row["id"]))
        if at is None:
            problems.append(
                f"[g] email {row['id']} (level {row['level']}) never arrived while the webhook hung"
            )
            continue
        delays.append(at - row["created_at"].timestamp())
    slow = sorted((round(d, 1) for d in delays if d > HEALTHY_BOUND_S), reverse=True)
    if slow:
        problems.append(
            f"[g] {len(slow)} of {len(emails)} emails to a working SMTP server arrived more than "
            f"{HEALTHY_BOUND_S:g} s after their level executed, while a webhook hung: {slow[:10]} s"
        )
    counts = deliveries(mails, got)
    problems += check_receipts(stack.database_url, counts, ["email", "webhook"])
    twice = duplicates(counts)
    problems += [f"[R] {nid} accepted {k} times" for nid, k in twice.items()]
    conclude(
        stack,
        "Ng. healthy contact beside a hung webhook",
        f"one webhook contact on a listener that accepts and never answers, one email contact on a working "
        f"SMTP server; {n} incidents escalated one a second, each level paging both",
        started=started,
        minimum={"incidents": n, "executed": 2 * n},
        problems=problems,
        emails=len(emails),
        worst_email_delay_s=round(max(delays, default=0.0), 2),
        median_email_delay_s=round(sorted(delays)[len(delays) // 2], 2) if delays else None,
        hung_attempts=len(hung.attempts()),
        deliverer_tasks=notifier_tasks(notifier),
        duplicates=sum(k - 1 for k in twice.values()),
        settled_s=round(waited, 1),
    )


# -- d. kill -9 of the notifier while deliveries are in flight -----------------------------------------

KILL_POLICY = HOOK_POLICY
SLOW_REPLY_S = 0.3
CLAIM_MARGIN_S = NotifySettings.claim_margin_s
RECOVERY_MARGIN_S = 5.0  # the restarted notifier's start-up and a busy machine


def test_nd_notifier_killed_while_delivering(make_stack):
    started = time.monotonic()
    n = scale("nd_incidents", 40)
    kills_wanted = scale("nd_kills", 3)
    concurrency = 2
    receiver = Recorder(delay=SLOW_REPLY_S).start()
    try:
        stack, notifier = notify_stack(make_stack, KILL_POLICY, notifier_concurrency=concurrency)
        for path in ("a", "b", "c"):
            add_contact(stack, "webhook", f"{receiver.url}/hooks/{path}")
        stack.open_incidents(n, threads=8)
        kills: list[tuple[float, int]] = []  # (when, requests in progress at the receiver then)
        for _ in range(kills_wanted):
            wait_until(
                lambda: receiver.in_progress(time.time()) > 0, 60, interval=0.02, what="a send in flight"
            )
            time.sleep(random.uniform(0.0, SLOW_REPLY_S))
            at = time.time()
            in_flight = receiver.in_progress(at)
            stack.kill(notifier)
            kills.append((at, in_flight))
            time.sleep(1.0)
            notifier.start()
            time.sleep(2.0)
        restarted = time.time()
        unsent = unsettled(stack.database_url)
        # Once the notifier is back, what a killed deliverer had claimed comes back when its claim
        # expires: a claim must outlast the attempt in flight (ATTEMPT_TIMEOUT_S) plus the margin,
        # then the next sweep gives it back and wakes its contact after the redelivery grace; then
        # it waits its turn behind what is left to send, SLOW_REPLY_S each over the processes.
        bound = (
            ATTEMPT_TIMEOUT_S + CLAIM_MARGIN_S + SWEEP_INTERVAL_S + REDELIVERY_GRACE_S
            + unsent * SLOW_REPLY_S / concurrency + RECOVERY_MARGIN_S
        )  # fmt: skip
        waited = stack.settle(60)
        waited += settle_notifications(stack.database_url, max(0.0, restarted + bound + 15 - time.time()))
        settled = time.time()
        held = stack.sql(
            "SELECT count(*), max(claimed_until) - clock_timestamp() FROM notifications"
            " WHERE status IN ('PENDING', 'SENDING')"
        )[0]
        time.sleep(2)
        got = list(receiver.requests)
    finally:
        receiver.stop()

    problems = []
    if held[0] or settled - restarted > bound:
        problems.append(
            f"[d] {held[0]} notifications still unsent {settled - restarted:.1f} s after the notifier was "
            f"back (bound {bound:.1f} s for {unsent} unsent then); claims held {held[1]} longer"
        )
    alerts = rows(stack, "channel = 'webhook'")
    problems += [
        f"[d] alert {r['id']} is {r['status']} ({r['last_error']})"
        for r in alerts
        if r["status"] in UNSENT_FINAL
    ]
    counts = deliveries(got)
    problems += check_receipts(stack.database_url, counts, ["webhook"])
    twice = duplicates(counts)
    # The exact bound: a second copy comes only from an attempt the provider accepted and whose
    # commit a kill prevented, so each copy is attributable to one kill that fell between its first
    # receipt and the next, within one attempt of the first; and a kill can cause at most one per
    # provider call in flight, which is at most one per sending thread of each pool process.
    calls = concurrency * SENDING_THREADS
    per_kill = [0] * len(kills)
    for nid, _ in twice.items():
        times = sorted(r.at for r in got if r.headers.get("webhook-id") == nid and 200 <= r.answered < 300)
        for first, second in zip(times, times[1:], strict=False):
            culprit = [
                k
                for k, (at, _) in enumerate(kills)
                if first <= at <= second and at - first <= ATTEMPT_TIMEOUT_S
            ]
            if not culprit:
                problems.append(
                    f"[d] {nid} accepted at {first:.3f} and again at {second:.3f} with no kill between"
                )
            else:
                per_kill[culprit[0]] += 1
    for k, count in enumerate(per_kill):
        if count > calls:
            problems.append(f"[d] kill {k + 1} caused {count} second copies, beyond {calls} calls in flight")
    copies = sum(k - 1 for k in twice.values())
    if copies > len(kills) * calls:
        problems.append(
            f"[d] {copies} second copies for {len(kills)} kills of a notifier with {calls} sending threads"
        )
    conclude(
        stack,
        "Nd. notifier kill -9 while delivering",
        f"{len(kills)} kill -9s of the notifier ({concurrency} processes) while a webhook receiver taking "
        f"{SLOW_REPLY_S:g} s an answer had sends in flight, each restarted 1 s later; "
        f"{n} incidents x 3 contacts",
        started=started,
        minimum={"incidents": n, "executed": 2 * n},
        problems=problems,
        webhook_alerts=len(alerts),
        received=len(got),
        duplicates=copies,
        duplicate_ids=sorted(twice),
        kills=len(kills),
        in_flight_at_kills=[k[1] for k in kills],
        duplicates_per_kill=per_kill,
        unsent_at_restart=unsent,
        recovery_bound_s=round(bound, 1),
        settled_after_restart_s=round(settled - restarted, 1),
        settled_s=round(waited, 1),
    )


# -- e. resolve racing the send ------------------------------------------------------------------------

RACE_POLICY = """\
default_policy: race
policies:
  race:
    levels:
      - {delay: 1s, notify: [in_app, webhook]}
      - {delay: 2s, notify: [in_app, webhook]}
"""
# Sends take a second, so that a resolve 0.9-2.2 s after the escalate often lands while one is in
# flight (level 1 is due at 1 s); incidents come every 0.6 s, within what 4 notifier processes send.
RACE_REPLY_S = 1.0
RACE_EVERY_S = 0.6


def test_ne_resolve_racing_the_send(make_stack):
    started = time.monotonic()
    n = scale("ne_incidents", 40)
    rng = random.Random(9)
    receiver = Recorder(delay=RACE_REPLY_S).start()
    try:
        stack, _ = notify_stack(make_stack, RACE_POLICY, notifier_concurrency=4)
        add_contact(stack, "webhook", f"{receiver.url}/hooks/one")
        add_contact(stack, "webhook", f"{receiver.url}/hooks/two")
        delays = [rng.uniform(0.9, 2.2) for _ in range(n)]
        left: dict[str, tuple[str, float, float]] = {}  # incident -> (action, sent at, answered at)
        lock = threading.Lock()

        def one(i: int) -> None:
            time.sleep(max(0.0, begin + i * RACE_EVERY_S - time.monotonic()))
            incident_id, _ = escalate_one(stack, f"race {i}")
            time.sleep(delays[i])
            action = "resolve" if i % 3 else "acknowledge"
            asked = time.time()
            rec = stack.api.act(incident_id, action)
            if rec.status == 200:
                with lock:
                    left[incident_id] = (action, asked, time.time())

        begin = time.monotonic()
        with ThreadPoolExecutor(8) as pool:  # each incident's thread is busy about 3 s
            list(pool.map(one, range(n)))
        waited = stack.settle(60)
        waited += settle_notifications(stack.database_url, 90)
        time.sleep(2)
        got = list(receiver.requests)
    finally:
        receiver.stop()

    problems = []
    late, raced = [], 0
    for request in got:
        body = json.loads(request.body)
        if body["type"] != "incident.escalated":
            continue
        incident_id = body["data"]["incident"]["id"]
        if incident_id not in left:
            continue
        _, asked, answered = left[incident_id]
        if request.at > answered:
            late.append((incident_id, round(request.at - answered, 3)))
        elif request.at > asked:
            raced += 1  # arrived while the resolve was in flight: the send won the race
    problems += [f"[e] incident.escalated for {i} received {d} s after its resolve answered" for i, d in late]
    alerts = rows(stack, "type = 'incident.escalated' AND channel = 'webhook'")
    problems += [
        f"[e] alert {r['id']} is {r['status']} ({r['last_error']})"
        for r in alerts
        if r["status"] not in ("SENT", "SKIPPED")
    ]
    counts = deliveries(got)
    problems += check_receipts(stack.database_url, counts, ["webhook"])
    twice = duplicates(counts)
    problems += [f"[R] webhook {nid} accepted {k} times" for nid, k in twice.items()]
    if len(left) < n:
        problems.append(f"[e] only {len(left)} of {n} incidents left ESCALATING through the API")
    transitions = [r for r in stack.api.records if r.path.endswith(("/resolve", "/acknowledge"))]
    conclude(
        stack,
        "Ne. resolve racing the send",
        f"{n} incidents resolved or acknowledged 0.9-2.2 s after escalating, as their level-1 webhook alerts "
        f"(due at 1 s, {RACE_REPLY_S:g} s an answer) were being sent to 2 contacts",
        started=started,
        # Some are resolved before level 1 falls due (0.9 s < 1 s) on purpose; those a good while
        # after it (1.2 s or more, allowing for the level's run) must have executed it first.
        minimum={"incidents": n, "executed": sum(delay >= 1.2 for delay in delays)},
        problems=problems,
        alerts_sent=sum(r["status"] == "SENT" for r in alerts),
        alerts_skipped=sum(r["status"] == "SKIPPED" for r in alerts),
        received_while_resolving=raced,
        received_after_resolve=len(late),
        worst_transition_s=round(max((r.elapsed_s for r in transitions), default=0.0), 2),
        duplicates=sum(k - 1 for k in twice.values()),
        settled_s=round(waited, 1),
    )


# -- f. a storm of 1,000 incidents against one phone ------------------------------------------------

STORM_POLICY = """\
default_policy: storm
policies:
  storm:
    levels:
      - {delay: 1s, notify: [sms]}
"""
STORM_RATE = 3
STORM_WINDOW_S = 5.0


def test_nf_storm_against_one_phone(make_stack):
    started = time.monotonic()
    n = scale("nf_incidents", 1000)
    twilio = Recorder.twilio().start()
    try:
        stack, notifier = notify_stack(
            make_stack,
            STORM_POLICY,
            TWILIO_API_URL=twilio.url,
            NOTIFY_RATE_SMS=str(STORM_RATE),
            NOTIFY_RATE_WINDOW=f"{STORM_WINDOW_S:g}",
        )
        add_contact(stack, "sms", "+14155550100")
        opened = time.monotonic()
        ids = stack.open_incidents(n, threads=12)
        opened = time.monotonic() - opened
        waited = stack.settle(120)
        waited += settle_notifications(stack.database_url, 120)
        time.sleep(STORM_WINDOW_S)  # a message beyond the throttle would come now
        got = list(twilio.requests)
    finally:
        twilio.stop()

    problems = []
    times = sorted(r.at for r in got if 200 <= r.answered < 300)
    # At most `rate` messages in any window: the (rate+1)-th after any message comes a window later.
    crowded = [
        (round(later - earlier, 3), datetime.fromtimestamp(earlier, UTC).isoformat())
        for earlier, later in zip(times, times[STORM_RATE:], strict=False)
        if later - earlier < STORM_WINDOW_S - 0.001
    ]
    if crowded:
        problems.append(f"[f] {STORM_RATE + 1} SMS within {STORM_WINDOW_S:g} s: {crowded[:5]}")
    # Every SMS the gateway accepted is a notification Postgres has SENT, by the sid it answered.
    sids = [json.loads(r.answer)["sid"] for r in got if 200 <= r.answered < 300]
    sent = rows(stack, "channel = 'sms' AND status = 'SENT'")
    recorded = [r["provider_id"] for r in sent]
    if sorted(sids) != sorted(recorded):
        problems.append(
            f"[f] the gateway accepted {len(sids)} SMS, Postgres has {len(recorded)} SENT; "
            f"unrecorded {len(set(sids) - set(recorded))}, never received {len(set(recorded) - set(sids))}"
        )
    # Every incident is in some message: its alert SENT, or BUNDLED in a digest SENT.
    covered = stack.sql(
        "SELECT count(DISTINCT a.incident_id) FROM notifications a"
        " LEFT JOIN notifications d ON d.id = a.digest_id WHERE a.type = 'incident.escalated'"
        " AND (a.status = 'SENT' OR (a.status = 'BUNDLED' AND d.status = 'SENT'))"
    )[0][0]
    if covered != len(ids):
        problems.append(f"[f] {covered} of {len(ids)} incidents are in a message that went out")
    alerts = rows(stack, "type = 'incident.escalated'")
    digests = rows(stack, "type = 'notification.digest'")
    span = (times[-1] - times[0]) if times else 0.0
    conclude(
        stack,
        "Nf. storm of incidents against one phone",
        f"{len(ids)} incidents escalated at once, one SMS contact, NOTIFY_RATE_SMS={STORM_RATE} per "
        f"{STORM_WINDOW_S:g} s window (Twilio-compatible local API)",
        started=started,
        minimum={"incidents": n, "executed": n},
        problems=problems,
        sms_received=len(got),
        sms_span_s=round(span, 1),
        most_in_a_window=max_in_window(times, STORM_WINDOW_S),
        alerts_sent=sum(r["status"] == "SENT" for r in alerts),
        alerts_bundled=sum(r["status"] == "BUNDLED" for r in alerts),
        digests_made=len(digests),
        deliverer_tasks=notifier_tasks(notifier),
        opened_s=round(opened, 1),
        settled_s=round(waited, 1),
    )


def max_in_window(times: list[float], window: float) -> int:
    """The most messages any window of that length held."""
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        most = max(most, end - start + 1)
    return most
