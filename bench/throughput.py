"""1. Create and transition throughput: POST /incidents and POST /incidents/{id}/escalate through
gunicorn, next to the same SQL through pgbench and through a bare Flask + SQLAlchemy Core endpoint."""

from __future__ import annotations

import json
from collections import defaultdict

from bench.common import TENANT, Bench, CpuMeter, median, seq_id_sql
from bench.loadgen import http_load, pgbench, pgbench_binary

# gunicorn as in the Procfile (WEB_CONCURRENCY=2, WEB_THREADS=4): at most 8 requests in the app at
# once, so at most 8 database connections in use; pgbench runs with min(connections, 8) clients.
WEB_WORKERS, WEB_THREADS = 2, 4
DB_CONCURRENCY = WEB_WORKERS * WEB_THREADS
APPS = {"api": "api:create_app()", "bare": "bench.bare_app:create_app()"}


class Seeder:
    """Hands out ranges of pre-created incidents (seq ids) so every transition hits a fresh one."""

    def __init__(self, bench: Bench, kind: str):
        self.bench, self.kind = bench, kind
        self.rate: dict[str, float] = {}

    def take(self, duration: float) -> int:
        # Sized on the fastest rate seen so far, and never below 3,000/s: pgbench at 8 clients runs
        # far faster than at 1 (1,929 tx/s against 743 in one run), and a range that runs out aborts
        # the run on a foreign key. Unused rows cost nothing but their insert.
        fastest = max([3000, *self.rate.values()])
        count = int(fastest * duration * 2) + 1000
        start = self.bench.next_seq
        self.bench.next_seq += count
        ident = seq_id_sql("g")
        escalating = self.kind == "resolve"
        self.bench.sql(
            "INSERT INTO incidents (id, tenant, title, description, severity, state, policy_levels, "
            "escalated_at) SELECT "
            + ident
            + ", %s, 'seeded', '', 'high', %s, CAST(%s AS JSONB), CASE WHEN %s THEN now() END "
            "FROM generate_series(%s, %s) g",
            (
                TENANT,
                "ESCALATING" if escalating else "OPEN",
                json.dumps([{"delay_ms": 240_000, "notify": ["in_app"]}]) if escalating else None,
                escalating,
                start,
                start + count - 1,
            ),
        )
        if escalating:
            # One pending level each, handed to the broker (task id set) as the engine leaves it.
            self.bench.sql(
                "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, "
                "scheduled_at, task_id, published_at) SELECT gen_random_uuid(), "
                + ident
                + ", 1, 'PENDING', '[\"in_app\"]', now() + interval '4 minutes', "
                "gen_random_uuid()::text, now() FROM generate_series(%s, %s) g",
                (start, start + count - 1),
            )
        self.bench.sql("ANALYZE incidents")
        return start


def capture(bench: Bench, token: str) -> dict[str, list[str]]:
    out = bench.python("bench.capture", "endpoints", token)
    return json.loads(out.split("BENCH_JSON ", 1)[1])


def compare(
    bench: Bench,
    endpoint: str,
    connections: list[int],
    duration: float,
    repeats: int,
    token: str,
    fill: dict[str, str],
    webs: dict,
) -> list[dict]:
    """Each connection count, each implementation, `repeats` times (interleaved): median figures."""
    seeders = {} if endpoint == "create" else {"x": Seeder(bench, endpoint)}
    samples: dict[tuple, list[dict]] = defaultdict(list)
    pgbench_done: set[tuple[int, int]] = set()
    for rep in range(repeats):
        for conns in connections:
            order = list(webs) if rep % 2 == 0 else list(reversed(webs))
            for impl in order:
                proc = webs[impl]
                start = seeders["x"].take(duration) if seeders else 0
                with CpuMeter(web=proc.process.pid) as meter:
                    result = http_load(
                        f"http://127.0.0.1:{proc.port}", endpoint, token, conns, duration, start
                    )
                if seeders:
                    seeders["x"].rate[impl] = result["rps"]
                result["web_cpu_ms"] = 1000 * meter.cpu["web"] / max(1, result["requests"])
                result["machine_busy"] = meter.machine
                samples[(conns, impl)].append(result)
            clients = min(conns, DB_CONCURRENCY)
            if pgbench_binary() and (clients, rep) not in pgbench_done:
                pgbench_done.add((clients, rep))
                start = seeders["x"].take(duration) if seeders else 0
                with CpuMeter() as meter:
                    result = pgbench(bench.database_url, endpoint, clients, duration, start, fill)
                if seeders:
                    seeders["x"].rate["pgbench"] = result["rps"]
                result["machine_busy"] = meter.machine
                samples[(clients, "pgbench")].append(result)
    rows = []
    for conns in connections:
        row = {"endpoint": endpoint, "connections": conns, "pgbench_clients": min(conns, DB_CONCURRENCY)}
        for impl in [*webs, "pgbench"]:
            runs = samples.get((row["pgbench_clients"] if impl == "pgbench" else conns, impl), [])
            row[impl] = {
                key: median([r[key] for r in runs if key in r])
                for key in ("rps", "p50", "p95", "p99", "max", "web_cpu_ms", "machine_busy")
            }
            row[impl]["errors"] = sum(r["errors"] for r in runs)
            row[impl]["runs"] = len(runs)
            row[impl]["tool"] = runs[0]["tool"] if runs else "-"
        rows.append(row)
    return rows


def run(cfg, run_id: str, log_dir) -> dict:
    with Bench("tput", run_id, log_dir) as bench:
        token, secret_hash, key_id = bench.make_key()
        statements = capture(bench, token)
        webs = bench.webs(APPS, WEB_WORKERS, WEB_THREADS)
        bench.prime(webs, token)
        fill = {"hash": secret_hash, "key_id": key_id}
        # Warm-up: first requests import lazily and open pools.
        for endpoint in cfg.endpoints if cfg.warmup else []:
            compare(bench, endpoint, [8], min(2, cfg.duration), 1, token, fill, webs)
        tables = {
            endpoint: compare(bench, endpoint, cfg.connections, cfg.duration, cfg.repeats, token, fill, webs)
            for endpoint in cfg.endpoints
        }
        return {"statements": statements, "tables": tables, "web": f"{WEB_WORKERS}x{WEB_THREADS}"}
