"""A PaaS's restart (issue 13): every dyno is restarted at least daily, and on every deploy; the
platform sends SIGTERM to every process of the dyno and, after a grace (30 s on Heroku), SIGKILL to
whatever is left. Here web, worker, notifier and beat are restarted that way at once, in the middle
of a burst of transitions while levels fall due and webhooks are being sent, then started again.

Shorter than production, in proportion, so that the scenario stays short: a 10 s grace (30 s),
gunicorn's graceful timeout 5 s (the Procfile's 20 s), the workers' soft shutdown 4 s (12 s).
tests/test_deploy.py checks that the production values fit inside 30 s.
"""

from __future__ import annotations

import time

import pytest
import redis

from tests.faults.stack import burst, scale
from tests.faults.test_notification_faults import Recorder, add_contact, conclude, notify_stack
from tests.support.invariants import RequestRecord
from tests.support.notification_invariants import (
    check_receipts,
    deliveries,
    duplicates,
    settle_notifications,
)
from tests.support.servers import wait_until

pytestmark = pytest.mark.faults

# The platform's grace, scaled down from Heroku's 30 s as the soft shutdown is from production's 12 s.
# After the soft shutdown the worker still stops its pool and gives its messages back: 1.5 s on a
# quiet machine, more than 6 s once under CI's load, so 15 s and not 10.
GRACE_S = 15.0
SOFT_SHUTDOWN_S = 4.0
# Webhooks answer in 0.2 s: sends are in flight when the SIGTERM comes.
REPLY_S = 0.2
RESTART_POLICY = """\
default_policy: restart
policies:
  restart:
    levels:
      - {delay: 1s, notify: [in_app, webhook]}
      - {delay: 1s, notify: [webhook]}
      - {delay: 1s, notify: [in_app]}
"""
# The event each transition the burst makes writes, in the transaction that makes it.
EVENT_OF = {"escalate": "escalated", "resolve": "resolved", "acknowledge": "acknowledged"}


def held_by_workers(stack) -> int:
    """Messages delivered to a worker and not acknowledged (ETA levels it holds, tasks running): kombu
    keeps them in Redis's `unacked` hash until they are acknowledged or given back."""
    client = redis.Redis.from_url(stack.redis.url, socket_timeout=2)
    try:
        return client.hlen("unacked")
    finally:
        client.close()


def refused_cleanly(stack, records: list[RequestRecord]) -> tuple[list[RequestRecord], list[str]]:
    """The requests that got no answer because the web was stopping or down: the connection was
    refused or reset before any answer (the platform's router answers those with a 503). Each must
    have left nothing in Postgres: a transition applied without an answer is half applied, for its
    client. Returns (the requests refused cleanly, the problems)."""
    unanswered = [r for r in records if r.status is None and (r.error or "").startswith("ConnectionError")]
    events = {(str(i), t) for i, t in stack.sql("SELECT incident_id, type FROM incident_events")}
    problems = []
    for rec in unanswered:
        incident_id, action = (rec.path.split("/") + ["", ""])[2:4]
        if action in EVENT_OF and (incident_id, EVENT_OF[action]) in events:
            problems.append(f"[20] {rec.path} got no answer ({rec.error[:80]}) but was applied")
    created = sum(1 for r in records if r.path == "/incidents" and r.status == 201)
    incidents = stack.sql("SELECT count(*) FROM incidents")[0][0]
    if incidents != created:
        problems.append(f"[20] {incidents} incidents in Postgres, {created} creates answered 201")
    return unanswered, problems


def test_s20_every_dyno_restarted_during_a_burst(make_stack):
    started = time.monotonic()
    n = scale("s20_incidents", 90)
    receiver = Recorder(delay=REPLY_S).start()
    try:
        # The throttle is not under test: a rate no burst reaches, so every alert is its own.
        stack, _ = notify_stack(
            make_stack,
            RESTART_POLICY,
            notifier_concurrency=4,
            NOTIFY_RATE_WEBHOOK="1000",
            WORKER_SOFT_SHUTDOWN_TIMEOUT=f"{SOFT_SHUTDOWN_S:g}",
        )
        # A PaaS router stands between clients and dynos: no client keeps a connection to a dyno
        # across its restart. Each request on a connection of its own, as through the router.
        stack.api.headers["Connection"] = "close"
        add_contact(stack, "webhook", f"{receiver.url}/hooks/oncall")
        procs = list(stack.procs)
        with burst(stack.api, n):
            # The first levels have fallen due and their webhooks are under way: stop now.
            wait_until(
                lambda: receiver.in_progress(time.time()) > 0, 20, interval=0.02, what="a send in flight"
            )
            with stack.outage("every dyno restarted: SIGTERM, SIGKILL after the grace, started again"):
                held_before, pending = held_by_workers(stack), stack.pending()
                in_flight = receiver.in_progress(time.time())
                ended = stack.supervisor.terminate(procs, GRACE_S)
                held_after = held_by_workers(stack)
                stack.start(*procs)
        waited = stack.settle(60)
        waited += settle_notifications(stack.database_url, 60)
        time.sleep(2)  # a second copy of anything would arrive now
        got = list(receiver.requests)
    finally:
        receiver.stop()

    refused, problems = refused_cleanly(stack, stack.api.records)
    stack.api.records = [r for r in stack.api.records if all(r is not x for x in refused)]
    for name, how in ended.items():
        if not how.startswith("exited 0 "):
            problems.append(f"[20] {name} {how}: not a clean stop within the grace")
    if held_after:
        problems.append(
            f"[20] the stopped workers kept {held_after} messages unacknowledged (of {held_before})"
        )
    counts = deliveries(got)
    problems += check_receipts(stack.database_url, counts, ["webhook"])
    twice = duplicates(counts)
    problems += [f"[20] webhook {nid} accepted {k} times" for nid, k in twice.items()]

    answered = [r for r in stack.api.records if r.status in (200, 201)]
    created = sum(r.path == "/incidents" for r in answered)
    escalated = {r.path.split("/")[2] for r in answered if r.path.endswith("/escalate")}
    left = {r.path.split("/")[2] for r in answered if r.path.endswith(("/resolve", "/acknowledge"))}
    if created < n // 3:
        problems.append(f"[0] only {created} incidents created for a burst of {n}")
    conclude(
        stack,
        "20. every dyno restarted",
        f"SIGTERM to web, worker, notifier and beat at once (every process of each) a third into a burst "
        f"of {n} incidents escalated (a third resolved) while webhooks answer in {REPLY_S:g} s; SIGKILL "
        f"to what was left after {GRACE_S:g} s; all started again",
        started=started,
        minimum={"incidents": created, "escalated": len(escalated), "executed": 3 * len(escalated - left)},
        problems=problems,
        ended=ended,
        pending_at_sigterm=pending,
        held_by_workers_at_sigterm=held_before,
        held_after_they_stopped=held_after,
        sends_in_flight_at_sigterm=in_flight,
        refused_while_stopping=len(refused),
        received=len(got),
        duplicates=sum(k - 1 for k in twice.values()),
        settled_s=round(waited, 1),
    )
