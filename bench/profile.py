"""7. Where the CPU goes, and the proposed fixes measured: requests through Flask's test client and
escalations through the task function, in one process, one at a time (no network, no load
generator, no other request competing), so CPU per operation is steady even on a busy machine.

    python -m bench.profile TOKEN COUNT START REPEATS   # run by bench.run in a bench's environment

For each endpoint: CPU ms per request (time.process_time, median of REPEATS interleaved rounds)
for the bare app, the API as is, and the API with each proposed change; and the API's CPU split
by function (cProfile with a CPU clock: it inflates call-heavy code, so read it as proportions).
"""

from __future__ import annotations

import cProfile
import json
import logging
import pstats
import statistics
import sys
import tempfile
import time

# (area, (file suffix, function name)): the cumulative CPU of that function per request.
AREAS = [
    ("authenticate (api/auth.py): API key lookup", ("api/auth.py", "authenticate")),
    ("request parsing (webargs, marshmallow load)", ("webargs/core.py", "parse")),
    ("lock_incident (models/engine.py)", ("models/engine.py", "lock_incident")),
    ("ORM flush + COMMIT (Session.commit)", ("sqlalchemy/orm/session.py", "commit")),
    ("deliver: Celery publish + task-sent event", ("tasks/escalation.py", "deliver")),
    ("response serialisation (marshmallow dump)", ("marshmallow/schema.py", "dump")),
    ("pool checkout incl. pre-ping", ("sqlalchemy/pool/base.py", "_checkout")),
]


class Ids:
    def __init__(self, start: int):
        self.next = start

    def take(self, count: int) -> list[str]:
        from bench.common import seq_id

        ids = [seq_id(self.next + i) for i in range(count)]
        self.next += count
        return ids


def _use(app) -> None:
    """Make this app's Celery the one shared tasks publish through (create_app sets the last one)."""
    celery = app.extensions.get("celery")
    if celery is not None:
        celery.set_current()
        celery.set_default()


def _requests(app, token: str, endpoint: str, ids: list[str]) -> float:
    _use(app)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    started = time.process_time()
    for incident in ids:
        if endpoint == "create":
            response = client.post("/incidents", json={"title": "checkout is down"}, headers=headers)
        else:
            response = client.post(f"/incidents/{incident}/{endpoint}", headers=headers)
        assert response.status_code in (200, 201), response.text
    return (time.process_time() - started) * 1000 / len(ids)


def _areas(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile)
    total = stats.total_tt
    out = {}
    for area, (suffix, function) in AREAS:
        cpu = sum(
            ct
            for (filename, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items()
            if filename.endswith(suffix) and name == function
        )
        out[area] = cpu / total if total else 0.0
    return out


def main(token: str, count: int, start: int, repeats: int) -> dict:
    from bench.bare_app import create_app as create_bare
    from bench.variants import VARIANTS

    apps = {"bare": create_bare(), **{name: make() for name, make in VARIANTS.items()}}
    # INFO lines go to a file under gunicorn; here they would go to this process's stderr.
    logging.getLogger().setLevel(logging.WARNING)
    ids = Ids(start)
    result: dict = {}
    rounds_n = max(repeats, 5)

    def take(endpoint: str, n: int) -> list[str]:
        # Only escalate needs a fresh OPEN incident per request; create ignores the id.
        return ids.take(n) if endpoint == "escalate" else [""] * n

    for endpoint in ("create", "escalate"):
        for app in apps.values():
            _requests(app, token, endpoint, take(endpoint, 5))  # warm-up
        rounds: dict[str, list[float]] = {name: [] for name in apps}
        for rep in range(rounds_n):
            order = list(apps) if rep % 2 == 0 else list(reversed(apps))
            for name in order:
                rounds[name].append(_requests(apps[name], token, endpoint, take(endpoint, count)))
        profile = cProfile.Profile(time.process_time)
        profile.enable()
        _requests(apps["api as is"], token, endpoint, take(endpoint, count))
        profile.disable()
        result[endpoint] = {
            "cpu_ms": {name: statistics.median(values) for name, values in rounds.items()},
            "spread_ms": {name: [min(values), max(values)] for name, values in rounds.items()},
            "areas": _areas(profile),
        }
    result["worker"] = worker(apps["api as is"], count, repeats)
    return result


def worker(app, count: int, repeats: int) -> dict:
    """CPU per escalation of the task body (what a prefork child does), in messages of the engine's
    batch size, pre-ping on and off."""
    from sqlalchemy import text

    from bench.exec_rate import LEVELS
    from models.engine import EngineSettings
    from tasks.escalation import execute_escalations

    engine = app.extensions["db"].kw["bind"]
    rounds: dict[str, list[float]] = {"task body as is": [], "task body, no pool pre-ping": []}
    for rep in range(repeats):
        for name in rounds if rep % 2 == 0 else reversed(list(rounds)):
            engine.pool._pre_ping = name.endswith("as is")
            with engine.begin() as conn:
                # Only this round's levels pending: a batch would also pick up others left late (the
                # endpoints' escalations, on the bench's fast policy) and count their work here.
                conn.execute(text("UPDATE escalations SET status = 'CANCELLED' WHERE status = 'PENDING'"))
                ids = [
                    str(row[0])
                    for row in conn.execute(
                        text(
                            "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, "
                            "scheduled_at) SELECT gen_random_uuid(), i.id, 1, 'PENDING', '[]', "
                            "now() - interval '1 second' FROM incidents i WHERE i.state = 'OPEN' "
                            "AND NOT EXISTS (SELECT 1 FROM escalations e WHERE e.incident_id = i.id) "
                            "LIMIT :n RETURNING id"
                        ),
                        {"n": count},
                    )
                ]
                conn.execute(
                    text(
                        "UPDATE incidents SET state = 'ESCALATING', policy_levels = CAST(:levels AS JSONB) "
                        "WHERE id IN (SELECT incident_id FROM escalations WHERE id = ANY(CAST(:ids "
                        "AS uuid[])))"
                    ),
                    {"levels": json.dumps(LEVELS), "ids": ids},
                )
            _use(app)
            started = time.process_time()
            size, executed = EngineSettings().batch_size, 0
            for first in range(0, len(ids), size):
                outcomes = execute_escalations(ids[first : first + size])
                # A batch also picks up late levels (of the next batches, here): each runs once.
                executed += outcomes.get("executed", 0) + outcomes.get("picked up", 0)
            assert executed == len(ids)
            rounds[name].append((time.process_time() - started) * 1000 / max(1, len(ids)))
    engine.pool._pre_ping = True
    return {"cpu_ms": {name: statistics.median(values) for name, values in rounds.items()}}


if __name__ == "__main__":
    token, count, start, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sys.stdout.write("BENCH_JSON " + json.dumps(main(token, count, start, repeats)) + "\n")


def run(cfg, run_id: str, log_dir) -> dict:
    """The measurement as bench.run calls it: its own database, seeded incidents, one subprocess."""
    from bench.common import Bench
    from bench.throughput import Seeder

    with Bench("profile", run_id, log_dir) as bench:
        token, _hash, _key = bench.make_key()
        from bench.variants import VARIANTS

        # escalate: a warm-up of 5 and max(repeats, 5) rounds per app, one profiled round; the
        # worker part: 2 x repeats rounds of OPEN incidents left over (create needs none).
        apps, n = len(VARIANTS) + 1, cfg.profile_requests
        needed = 5 * apps + n * (apps * max(cfg.repeats, 5) + 1 + 2 * cfg.repeats) + 500
        seeder = Seeder(bench, "escalate")
        seeder.rate["profile"] = needed
        start = seeder.take(0.5)
        # The request metrics counted as under gunicorn: in files, summed over its processes.
        with tempfile.TemporaryDirectory(prefix="bench-metrics-") as counts:
            bench.env["PROMETHEUS_MULTIPROC_DIR"] = counts
            out = bench.python(
                "bench.profile", token, str(cfg.profile_requests), str(start), str(cfg.repeats), timeout=1200
            )
        return json.loads(out.split("BENCH_JSON ", 1)[1])
