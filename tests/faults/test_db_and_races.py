"""Postgres restarted (fast shutdown) and killed (kill -9) under load, resolve racing with execution, 50
conflicting transitions on one incident, and two beats with two workers."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from models.lifecycle import ALLOWED, CLIENT_ACTIONS, TARGET, Action, State
from tests.faults.stack import scale, verdict

pytestmark = pytest.mark.faults


def _postgres_outage(make_stack, kill: bool, scenario: str, how: str):
    """6 clients create, escalate, resolve and read incidents for `seconds`, each at most `pace`
    incidents a second (together about what the workers execute: the scenario is about the outage,
    not an overload); a third of the way in, Postgres goes away (a fast shutdown, or kill -9 of the
    postmaster and every backend) for 3 s."""
    seconds = scale("s6_seconds", 12)
    pace = float(scale("s6_pace", 3))
    outage_s = 3.0
    stack = make_stack()
    web, worker, beat = stack.web(), stack.worker(), stack.beat()
    stack.start(web, worker, beat)
    api = stack.client(web)
    stop = threading.Event()
    rng = random.Random(6)

    def client():
        while not stop.wait(1 / pace):
            incident_id = api.create()
            if incident_id is None:
                time.sleep(0.1)
                continue
            if api.act(incident_id, "escalate").status == 200 and rng.random() < 0.3:
                api.act(incident_id, "resolve")
            api.call("GET", f"/incidents/{incident_id}")

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(seconds / 3)
    with stack.outage(f"postgres {how}"):
        if kill:
            stack.kill_postgres()  # kill -9: no checkpoint, crash recovery at the next start
        else:
            stack.pg.stop()  # fast shutdown: every connection of web, worker and beat is cut
        time.sleep(outage_s)
        stack.pg.start()
    outage = (stack.outages[-1][1] - stack.outages[-1][0]).total_seconds()
    time.sleep(seconds * 2 / 3)
    stop.set()
    for thread in threads:
        thread.join()
    # Full recovery: every new request succeeds again.
    after = [api.create() for _ in range(20)]
    recovered = all(after) and all(api.act(i, "escalate").status == 200 for i in after)
    waited = stack.settle(90)
    # Six clients for 12 s at 3 a second create a couple of hundred incidents; half that at least, and
    # the escalated ones run their levels (a third are resolved at once).
    least = int(6 * pace * seconds / 2)
    figures = stack.check(
        response_bound_s=8, minimum={"incidents": least, "escalated": least, "executed": least}
    )
    unavailable = figures.statuses.get("503", 0)
    if unavailable == 0:
        figures.violate("[0] the outage was not seen: no request answered 503")
    if not recovered:
        figures.violate("[5] requests after Postgres was back did not all succeed")
    verdict(
        scenario,
        f"Postgres {how} for {outage:.1f} s while 6 clients created ({pace:g}/s each), escalated, resolved "
        "and read incidents; workers and beat cut off too",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
        answered_503=unavailable,
        recovered=recovered,
    )


def test_s6_postgres_restarted_under_load(make_stack):
    _postgres_outage(
        make_stack, kill=False, scenario="6. Postgres restarted under load", how="stopped (fast shutdown)"
    )


def test_s15_postgres_killed_under_load(make_stack):
    _postgres_outage(
        make_stack,
        kill=True,
        scenario="15. Postgres kill -9 under load",
        how="kill -9 (postmaster and backends)",
    )


def test_s7_resolve_races_the_level_falling_due(make_stack):
    n = scale("s7_incidents", 300)
    policy = """\
default_policy: race
policies:
  race:
    levels:
      - {delay: 8s, notify: [in_app]}
      - {delay: 1s, notify: [email]}
"""
    stack = make_stack(policy=policy)
    web, w1, w2, beat = stack.web(), stack.worker("w1"), stack.worker("w2"), stack.beat()
    stack.start(web, w1, w2, beat)
    api = stack.client(web)
    ids = stack.open_incidents(n, escalate=False, threads=16)
    with ThreadPoolExecutor(16) as pool:  # all of them escalate within a few seconds: level 1 is 8 s
        list(pool.map(lambda i: api.act(i, "escalate"), ids))
    due = dict(
        (str(incident_id), scheduled.timestamp())
        for incident_id, scheduled in stack.sql(
            "SELECT incident_id, scheduled_at FROM escalations WHERE escalation_level = 1"
        )
    )
    rng = random.Random(7)

    def resolve_at(incident_id):
        # Sent so as to arrive at the very moment level 1 falls due (on the same machine's clock):
        # a request takes some tens of milliseconds to reach its transaction, so from 250 ms before
        # to 50 ms after; either the execution or the transition takes the incident's lock first.
        delay = due[incident_id] + rng.uniform(-0.25, 0.05) - time.time()
        if delay > 0:
            time.sleep(delay)
        return api.act(incident_id, rng.choice(["resolve", "acknowledge", "cancel"]))

    with ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(resolve_at, sorted(ids, key=due.get)))
    waited = stack.settle(60)
    outcome = Counter(
        status for (status,) in stack.sql("SELECT status FROM escalations WHERE escalation_level = 1")
    )
    figures = stack.check(minimum={"incidents": n, "escalated": n, "executed": n // 20})
    refused = [a for a in answers if a.status != 200]
    if refused:
        figures.violate(
            f"[7] {len(refused)} of the racing transitions were refused, e.g. {refused[0].status}"
        )
    # The race was run: both sides won it many times.
    if not (outcome["EXECUTED"] > n // 20 and outcome["CANCELLED"] > n // 20):
        figures.violate(f"[7] the race was not run: level 1 outcomes {dict(outcome)}")
    verdict(
        "7. resolve races the level falling due",
        f"{len(answers)} incidents resolved, acknowledged or cancelled as their level 1 fell due "
        "(sent 250 ms before to 50 ms after), two workers executing",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
        level1_executed_first=outcome["EXECUTED"],
        level1_cancelled_first=outcome["CANCELLED"],
    )


def test_s8_fifty_concurrent_conflicting_transitions(make_stack):
    m = scale("s8_incidents", 30)
    k = 50
    stack = make_stack()
    web, worker, beat = stack.web(threads=8), stack.worker(), stack.beat()
    stack.start(web, worker, beat)
    api = stack.client(web)
    rng = random.Random(8)
    actions = [a.value for a in CLIENT_ACTIONS]
    won: dict[str, list[dict]] = {}
    with ThreadPoolExecutor(k) as pool:
        for index in range(m):
            incident_id = api.create()
            if index % 2:
                api.act(incident_id, "escalate")  # half of them race while escalating
            barrier = threading.Barrier(k)

            def race(action, incident_id=incident_id, barrier=barrier):
                barrier.wait()
                return action, api.act(incident_id, action)

            results = list(pool.map(race, [rng.choice(actions) for _ in range(k)]))
            # Escalate on an incident escalating already pages a level now (no transition): its answer
            # says so by an escalated_at older than the change it made.
            won[incident_id] = [
                {"action": a, "state": r.json_body["state"], "updated_at": r.json_body["updated_at"]}
                for a, r in results
                if r.status == 200
                and not (a == "escalate" and r.json_body["escalated_at"] != r.json_body["updated_at"])
            ]
            for action, r in results:
                if r.status == 409:
                    # A refusal names the state that refused it, and that state does refuse it.
                    refused_in = State(r.json_body["errors"]["state"][0])
                    assert TARGET[Action(action)] not in ALLOWED[refused_in], (action, refused_in)
    waited = stack.settle(60)
    # Half the incidents escalate before the race; nothing promises that any level runs.
    figures = stack.check(
        allowed_statuses=frozenset({200, 201, 409}), minimum={"incidents": m, "escalated": m // 2}
    )
    # Each 200 is exactly one transition event, in the order the answers' timestamps say.
    events = stack.sql(
        "SELECT incident_id::text, to_state, at FROM incident_events "
        "WHERE type NOT IN ('created', 'escalation_executed') ORDER BY id"
    )
    by_incident: dict[str, list] = {}
    for incident_id, to_state, _at in events:
        by_incident.setdefault(incident_id, []).append(to_state)
    for incident_id, wins in won.items():
        expected = [w["state"] for w in sorted(wins, key=lambda w: w["updated_at"])]
        recorded = by_incident.get(incident_id, [])
        escalated_first = recorded[:1] == ["ESCALATING"] and expected[:1] != ["ESCALATING"]
        if escalated_first:
            recorded = recorded[1:]
        if recorded != expected:
            figures.violate(f"[8] incident {incident_id}: 200 answers {expected} but events {recorded}")
    verdict(
        "8. 50 concurrent conflicting transitions",
        f"{k} concurrent random transitions on each of {m} incidents (half of them escalating)",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
        transitions_won=sum(len(w) for w in won.values()),
    )


def test_s10_two_beats_and_two_workers(make_stack):
    n = scale("s10_incidents", 250)
    # A horizon shorter than every delay: every level is handed over by a sweep, and two beats run
    # the sweeps, twice as often and at the same time.
    stack = make_stack(ESCALATION_ETA_HORIZON="0.5")
    web = stack.web()
    w1, w2, b1, b2 = stack.worker("w1"), stack.worker("w2"), stack.beat("b1"), stack.beat("b2")
    stack.start(web, w1, w2, b1, b2)
    stack.client(web)
    started = time.monotonic()
    stack.open_incidents(n)
    waited = stack.settle(60)
    elapsed = time.monotonic() - started
    figures = stack.check(minimum={"incidents": n, "escalated": n, "executed": 3 * n})
    sweeps = sum(text.count("escalations.sweep[") for text in stack.worker_logs()) // 2
    sent = {b.name: b.log_text().count("Sending due task sweep-escalations") for b in (b1, b2)}
    redelivered, handed = stack.swept()
    # Both beats sent their sweeps (one a second each, the interval), and the workers ran them.
    for name, count in sent.items():
        if count < elapsed / 2:
            figures.violate(f"[0] beat {name} sent {count} sweeps in {elapsed:.0f} s (one a second expected)")
    if sweeps < sum(sent.values()) / 2:
        figures.violate(f"[0] the workers ran {sweeps} sweeps of the {sum(sent.values())} sent")
    # Every level was handed over by a sweep (none within the horizon when it was created), or taken
    # by a batch of another message when it fell due before a sweep came.
    picked = stack.picked_up()
    if redelivered + handed + picked < figures.executed:
        figures.violate(
            f"[0] the sweeps handed over {redelivered + handed} levels and batches took {picked} of "
            f"other messages, {figures.executed} executed"
        )
    verdict(
        "10. two beats and two workers",
        "two beat processes and two workers; every level handed over by a sweep (horizon 0.5 s) or taken "
        "by a batch when it fell due first",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
        sweeps=sweeps,
        sweeps_sent=sent,
        swept_handed_over=handed,
        picked_up=picked,
        swept_redelivered=redelivered,
    )


# Scenario 23 (issue 11): escalate now racing the level falling due. Level 1 is due 2 s after the
# escalation; as it falls due, two responders press escalate {"level": 1} together.
ESCALATE_NOW_POLICY = """\
default_policy: pressed
policies:
  pressed:
    levels:
      - {delay: 2s, notify: [in_app]}
      - {delay: 1s, notify: [in_app]}
      - {delay: 1s, notify: [in_app]}
"""


def test_s23_two_escalate_now_calls_race_the_level_falling_due(make_stack):
    n = scale("s23_incidents", 60)
    stack = make_stack(policy=ESCALATE_NOW_POLICY)
    web, worker, beat = stack.web(), stack.worker(), stack.beat()
    stack.start(web, worker, beat)
    api = stack.client(web)
    ids = stack.open_incidents(n)
    due = dict(
        stack.sql(
            "SELECT incident_id::text, extract(epoch FROM scheduled_at)::float FROM escalations "
            "WHERE escalation_level = 1"
        )
    )
    rng = random.Random(23)

    def two_responders(incident_id: str) -> list[int]:
        # Each from 30 ms before to 300 ms after the moment its level 1 falls due (the database's
        # clock is this one): some come before the worker executes it, some after (about a third).
        time.sleep(max(0.0, due[incident_id] + rng.uniform(-0.03, 0.3) - time.time()))
        with ThreadPoolExecutor(2) as both:
            return list(both.map(lambda _: api.act(incident_id, "escalate", {"level": 1}).status, range(2)))

    with ThreadPoolExecutor(len(ids)) as pool:
        answers = [status for statuses in pool.map(two_responders, ids) for status in statuses]
    waited = stack.settle(60)
    paged, by_worker, unasked = stack.sql(
        "SELECT count(*) FILTER (WHERE manual AND escalation_level = 1), "
        "count(*) FILTER (WHERE NOT manual AND escalation_level = 1), "
        "count(*) FILTER (WHERE manual AND escalation_level > 1) FROM escalations WHERE status = 'EXECUTED'"
    )[0]
    figures = stack.check(minimum={"incidents": n, "escalated": n, "executed": 3 * n})
    if sorted(set(answers)) != [200]:
        figures.violate(f"[5] escalate now answered {sorted(answers)}, not 200 each time")
    if paged + by_worker != n:
        figures.violate(f"[1] level 1 ran {paged} times paged now and {by_worker} on its timer, for {n}")
    if unasked:
        # A press for level 1 that comes after it ran changes nothing: it never pages the next level.
        figures.violate(f"[1] {unasked} later level(s) paged now, which nobody asked for")
    if not (paged and by_worker):
        figures.violate(f"[0] no race: level 1 paged now {paged} times, on its timer {by_worker} times")
    verdict(
        "23. escalate now racing the level falling due",
        f'two POST .../escalate {{"level": 1}} at once on each of {n} incidents from 30 ms before to 300 '
        "ms after their level 1 fell due, the worker executing the levels as they fall due",
        figures,
        stack=stack,
        settled_s=round(waited, 1),
        level_1_paged_now=paged,
        level_1_on_its_timer=by_worker,
    )
