"""Redis misbehaving: restarted empty, FLUSHALL, stopped during a burst, accepting connections and
never answering, and a visibility timeout below a level's delay (redelivery storms)."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from tests.faults.stack import Supervisor, scale, verdict

pytestmark = pytest.mark.faults

# Levels due while Redis was gone are handed over again by the sweep once they are overdue by the
# redelivery grace (2 s); the sweep itself needs the broker back, and the workers reconnect (or are
# restarted by their supervisor). The bound these scenarios state:
BROKER_BOUND_S = 20


@pytest.mark.parametrize("how", ["restart-empty", "flushall"])
def test_s3_redis_loses_everything(make_stack, how):
    n = scale("s3_incidents", 200)
    stack = make_stack()
    web, worker, beat = stack.web(), stack.worker(), stack.beat()
    stack.start(web, worker, beat)
    api = stack.client(web)
    ids = stack.open_incidents(n)
    pending = stack.pending()
    with Supervisor(worker, beat) as supervisor:
        if how == "flushall":
            client = redis.Redis.from_url(stack.redis.url)
            client.flushall()
            client.close()
        else:
            stack.redis.restart()  # kill -9 and start again, empty, on the same port
        # New work right after the loss must not be lost either (queues and bindings are gone).
        after = stack.open_incidents(scale("s3_after", 50))
        for incident_id in ids[: len(ids) // 4]:
            api.act(incident_id, "resolve")
        waited = stack.settle(90)
    figures = stack.check(lateness_bound_s=BROKER_BOUND_S)
    verdict(
        f"3. Redis {how}",
        f"Redis {'killed and restarted empty' if how != 'flushall' else 'FLUSHALL'} with {pending} "
        f"escalations PENDING, most held by the worker as ETA tasks; {len(after)} more incidents "
        "escalated right after, a quarter of the first ones resolved",
        figures,
        settled_s=round(waited, 1),
        process_restarts=supervisor.restarts,
    )


def test_s4_redis_stopped_during_a_burst(make_stack):
    n = scale("s4_incidents", 240)
    outage_s = 4.0
    stack = make_stack()
    web, worker, beat = stack.web(), stack.worker(), stack.beat()
    stack.start(web, worker, beat)
    api = stack.client(web)

    def one(i):
        incident_id = api.create()
        if incident_id and api.act(incident_id, "escalate").status == 200 and i % 3 == 0:
            api.act(incident_id, "resolve")

    with Supervisor(worker, beat) as supervisor, ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        while sum(f.done() for f in futures) < n // 3:
            time.sleep(0.05)
        stack.redis.stop(kill=True)
        time.sleep(outage_s)
        stack.redis.start()
        for future in futures:
            future.result()
        waited = stack.settle(90)
    during = [r for r in api.records if r.status == 200 and r.path.endswith(("/escalate", "/resolve"))]
    figures = stack.check(lateness_bound_s=BROKER_BOUND_S, response_bound_s=5)
    verdict(
        "4. Redis stopped during a burst",
        f"Redis kill -9 a third of the way into a burst of {n} create+escalate (a third resolved), "
        f"started again {outage_s:g} s later",
        figures,
        settled_s=round(waited, 1),
        process_restarts=supervisor.restarts,
        transitions_answered=len(during),
    )


class Blackhole:
    """A TCP endpoint that accepts connections and never answers (nor closes them)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


def test_s5_redis_that_never_answers(make_stack):
    n = scale("s5_incidents", 100)
    bound_s = 2.5
    stack = make_stack()
    hole = Blackhole()
    try:
        # The API's broker accepts and never answers; the workers' Redis is healthy, so the sweep
        # delivers what the API could not publish.
        web = stack.web(REDIS_URL=f"redis://127.0.0.1:{hole.port}/0")
        worker, beat = stack.worker(), stack.beat()
        stack.start(web, worker, beat)
        api = stack.client(web)
        # Fewer clients than server threads: the bound is on each answer, not on a queue of them.
        ids = stack.open_incidents(n, escalate=False, threads=8)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: api.act(i, "escalate"), ids))
            list(pool.map(lambda i: api.act(i, "resolve"), ids[: n // 4]))
        waited = stack.settle(60)
        health = api.call("GET", "/health", record=False)
    finally:
        hole.close()
    transitions = [r for r in api.records if r.path.endswith(("/escalate", "/resolve"))]
    figures = stack.check(lateness_bound_s=BROKER_BOUND_S, response_bound_s=bound_s)
    verdict(
        "5. Redis accepts and never answers",
        f"the API's REDIS_URL points at a TCP listener that accepts and never answers; {len(transitions)} "
        f"transitions must answer within {bound_s} s",
        figures,
        settled_s=round(waited, 1),
        worst_transition_s=round(max(r.elapsed_s for r in transitions), 3),
        health_status=health.status,
    )
    assert health.status == 503 and "broker" in health.text


def test_s9_visibility_timeout_below_the_level_delay(make_stack):
    n = scale("s9_incidents", 150)
    policy = """\
default_policy: slowfirst
policies:
  slowfirst:
    levels:
      - {delay: 7s, notify: [in_app]}
      - {delay: 1s, notify: [email]}
"""
    stack = make_stack(policy=policy)
    # The API publishes level 1 as an ETA task 7 s ahead (its horizon is 60 s, its visibility
    # timeout 3600 s). The workers' Redis transport gives a message back to the queue when it has
    # been unacknowledged for 2 s, checking every second: every ETA task is redelivered a few
    # times while it waits, to whichever worker. (A worker refuses a horizon above half its
    # visibility timeout, hence its 1 s horizon.)
    storm = {
        "BROKER_VISIBILITY_TIMEOUT": "2",
        "ESCALATION_ETA_HORIZON": "1",
        "BROKER_UNACKED_RESTORE_INTERVAL": "1",
    }
    web = stack.web()
    w1, w2 = stack.worker("w1", **storm), stack.worker("w2", **storm)
    beat = stack.beat(**storm)
    stack.start(web, w1, w2, beat)
    stack.client(web)
    stack.open_incidents(n)
    waited = stack.settle(90)
    logs = "".join(stack.worker_logs())
    received = len(re.findall(r"Task escalations\.execute\[[^\]]+\] received", logs))
    figures = stack.check(lateness_bound_s=BROKER_BOUND_S)
    verdict(
        "9. visibility timeout below the delay",
        "workers' visibility timeout 2 s (restore every 1 s) under a 7 s level-1 delay, two workers",
        figures,
        settled_s=round(waited, 1),
        deliveries=received,
    )
    # The storm did happen: far more deliveries than escalations.
    assert received > 1.5 * figures.escalations, (received, figures.escalations)
