"""Workers dying: kill -9 with hundreds of escalations due, kill -9 inside the executing
transaction, and workers killed every few seconds while thousands of escalations flow."""

from __future__ import annotations

import random
import threading
import time

import psycopg2
import pytest

from tests.faults.stack import scale, verdict
from tests.support.servers import wait_until

pytestmark = pytest.mark.faults

# A level due while its worker was dead runs at the latest a sweep interval plus the redelivery grace
# after the worker is back (the sweep runs in a worker), behind whatever fell due meanwhile: the
# bounds of tests/faults/stack.py, counted from the end of each kill (the killed worker ready again).
# Only kills the scenario makes count as process exits; any other exit fails it.


def test_s1_worker_killed_while_hundreds_are_due(make_stack):
    n = scale("s1_incidents", 200)
    stack = make_stack()
    web, worker, beat = stack.web(), stack.worker(), stack.beat()
    stack.start(web, worker, beat)
    stack.client(web)
    ids = stack.open_incidents(n)
    held = stack.pending()
    with stack.outage("the only worker killed and restarted"):
        stack.kill(worker)  # kill -9 the worker and its pool: every ETA task it held dies with it
        time.sleep(1)
        worker.start()
    waited = stack.settle(90)
    figures = stack.check(minimum={"incidents": n, "escalated": n, "executed": 3 * n})
    if held < n * 3 // 4:
        # Most chains must still have been under way at the kill, or it killed nothing that mattered.
        figures.violate(f"[0] only {held} escalations PENDING at the kill, for {n} incidents")
    verdict(
        "1. worker kill -9 with hundreds due",
        f"kill -9 of the only worker holding {held} PENDING escalations due within 2 s; restarted 1 s later",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
        incidents_created=len(ids),
        held=held,
    )


def _stuck_in_execute(stack) -> int:
    """Worker transactions that hold their incident's lock and wait for the escalation row's: the
    batch's select of its escalations (FOR UPDATE; the other selects of escalation rows that lock
    skip locked rows and never wait). Matched by its start: pg_stat_activity keeps the first 1 kB of
    a query, and a full batch's list of ids pushes its FOR UPDATE beyond that."""
    return stack.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query ILIKE 'SELECT escalations.id,%' AND query NOT ILIKE '%SKIP LOCKED%'"
    )[0][0]


def _hold_pending_until_workers_block(stack, want: int, enough: int, timeout: float = 60):
    """Lock every PENDING escalation row until `want` executions wait for one inside their transaction,
    or at least `enough` of them after 3 s.

    The lock is let go between tries: after the previous round's kills, the levels those workers held
    come back only through the sweep, which skips locked rows, so holding on would starve the very
    executions this waits for. `enough` is there because one message carries every level due within
    the same 100 ms: in the second round, with most chains done, fewer messages than worker processes
    may be in flight, and each let-go runs the chains further towards their end."""
    deadline = time.monotonic() + timeout
    while True:
        holder = psycopg2.connect(stack.database_url)
        with holder.cursor() as cur:
            cur.execute("SELECT id FROM escalations WHERE status = 'PENDING' FOR UPDATE")
        try:
            wait_until(lambda: _stuck_in_execute(stack) >= want, 3, what="workers blocked inside execute()")
            return holder
        except TimeoutError:
            if _stuck_in_execute(stack) >= enough:
                return holder
            holder.rollback()
            holder.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_s2_worker_killed_inside_the_executing_transaction(make_stack):
    n = scale("s2_incidents", 200)
    stack = make_stack()
    web, w1, w2, beat = stack.web(), stack.worker("w1"), stack.worker("w2"), stack.beat()
    stack.start(web, w1, w2, beat)
    stack.client(web)
    stack.open_incidents(n)
    rounds, in_flight = 2, []
    for index in range(rounds):
        # Hold every PENDING escalation's row lock: a worker executing one has locked the incident
        # and waits inside its transaction for ours. kill -9 it there, then let go. Until both
        # workers are back, nothing can run: the bounds count from then.
        with stack.outage(f"rows locked, both workers killed inside execute(), round {index + 1}"):
            holder = _hold_pending_until_workers_block(stack, want=4, enough=2)
            in_flight.append(_stuck_in_execute(stack))
            stack.kill(w1)
            stack.kill(w2)
            time.sleep(0.5)
            holder.rollback()  # the dead workers' backends get their row, cannot answer, roll back
            holder.close()
            stack.start(w1, w2)
        time.sleep(2)
    waited = stack.settle(90)
    figures = stack.check(minimum={"incidents": n, "escalated": n, "executed": 3 * n})
    verdict(
        "2. worker kill -9 inside the transaction",
        f"both workers kill -9 while {in_flight} executions had locked their incident and not committed "
        f"({rounds} rounds)",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
    )


def test_s11_workers_killed_every_few_seconds(make_stack):
    seconds = scale("s11_seconds", 15)
    rate = scale("s11_rate", 10)  # incidents escalated per second
    kill_every = float(scale("s11_kill_every", 3))
    stack = make_stack()
    web, w1, w2, beat = stack.web(), stack.worker("w1"), stack.worker("w2"), stack.beat()
    stack.start(web, w1, w2, beat)
    api = stack.client(web)
    stop = threading.Event()
    kills = 0
    rng = random.Random(11)
    timers: list[threading.Timer] = []

    def load():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            started = time.monotonic()
            sent = 0
            while not stop.is_set():
                due = int((time.monotonic() - started) * rate)
                for _ in range(due - sent):
                    pool.submit(one)
                sent = max(sent, due)
                time.sleep(0.05)

    def one():
        incident_id = api.create()
        if incident_id and api.act(incident_id, "escalate").status == 200 and rng.random() < 0.25:
            # A quarter are resolved or acknowledged while their levels are in flight, or after every
            # level should have run (so that a lost one shows as CANCELLED past its deadline).
            timer = threading.Timer(
                rng.uniform(0.5, 10), api.act, (incident_id, rng.choice(["resolve", "acknowledge"]))
            )
            timers.append(timer)
            timer.start()

    loader = threading.Thread(target=load)
    loader.start()
    deadline = time.monotonic() + seconds
    victims = [w1, w2]
    try:
        while time.monotonic() < deadline:
            time.sleep(kill_every)
            victim = victims[kills % 2]
            with stack.outage(f"{victim.name} killed and restarted"):
                stack.kill(victim)
                victim.start()
            kills += 1
    finally:
        stop.set()
        loader.join()
        for timer in timers:
            timer.join()
    waited = stack.settle(120)
    least = rate * seconds // 2
    figures = stack.check(minimum={"incidents": least, "escalated": least, "executed": 2 * least})
    verdict(
        "11. worker kill -9 every few seconds",
        f"{kills} kill -9s of one of two workers, one every {kill_every:g} s (plus its restart) for "
        f"{seconds} s, while {rate} incidents/s escalated and a quarter were resolved or acknowledged",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
    )


# Scenario 22 (issue 11): acknowledgements that run out. Level 1 pages at once, level 2 two seconds
# later; an acknowledgement nobody follows with a resolve runs out after 6 s and pages again.
ACK_TIMEOUT_POLICY = """\
default_policy: forgetful
policies:
  forgetful:
    ack_timeout: 6s
    levels:
      - {delay: 300ms, notify: [in_app]}
      - {delay: 2s, notify: [in_app]}
"""


def _timers(stack, status: str) -> int:
    query = "SELECT count(*) FROM escalations WHERE kind = 'ack_timeout' AND status = %s"
    return stack.sql(query, (status,))[0][0]


def test_s22_worker_killed_as_acknowledgement_timers_fall_due(make_stack):
    from concurrent.futures import ThreadPoolExecutor

    n = scale("s22_incidents", 100)
    stack = make_stack(policy=ACK_TIMEOUT_POLICY)
    web, worker, beat = stack.web(), stack.worker(), stack.beat()
    stack.start(web, worker, beat)
    api = stack.client(web)
    ids = stack.open_incidents(n)
    wait_until(
        lambda: stack.sql("SELECT count(*) FROM escalations WHERE status = 'EXECUTED'")[0][0] >= n,
        15,
        what="every level 1 executed",
    )
    acks_began = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        acked = sum(r.status == 200 for r in pool.map(lambda i: api.act(i, "acknowledge"), ids))
    timers = _timers(stack, "PENDING")
    # The timers fall due from 6 s after the first acknowledgement, the worker holding them meanwhile.
    # A quarter of the incidents are resolved just before theirs runs out (so it must never fire),
    # then the worker is killed as the rest fall due.
    time.sleep(max(0.0, acks_began + 5.0 - time.monotonic()))
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda i: api.act(i, "resolve"), ids[: n // 4]))
    time.sleep(max(0.0, acks_began + 5.8 - time.monotonic()))
    with stack.outage("the only worker killed as the timers fell due, and restarted"):
        stack.kill(worker)  # kill -9 the worker and its pool: the timers it held die with it
        time.sleep(1)
        worker.start()
    waited = stack.settle(90)
    fired = _timers(stack, "EXECUTED")
    figures = stack.check(minimum={"incidents": n, "escalated": n, "executed": 2 * (n - n // 4)})
    if acked < n or timers < n:
        figures.violate(f"[0] {acked} of {n} acknowledged, {timers} timers pending: the fault found few")
    if fired != n - n // 4:
        figures.violate(f"[2] {fired} timers fired for the {n - n // 4} incidents nobody resolved")
    verdict(
        "22. worker kill -9 as acknowledgement timers fall due",
        f"{n} incidents acknowledged after level 1 (ack_timeout 6 s); a quarter resolved just before their "
        "timers fell due; kill -9 of the only worker holding the timers as they fell due, restarted 1 s "
        "later",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
        timers=timers,
        timers_fired=fired,
    )
