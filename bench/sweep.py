"""5. Sweep cost: the sweep's query over 1,000,000 escalation rows (900,000 finished, 100,000
pending), timed through the real code (models.engine.sweep) and shown with EXPLAIN ANALYZE."""

from __future__ import annotations

import json

from bench.common import TENANT, Bench, median, percentile, seq_id_sql

LEVELS = 4


def load(bench: Bench, rows: int, pending: int) -> None:
    """rows escalations of rows/4 incidents. Finished ones lie in the past 30 days; pending ones
    are spread over the next hour, those within the 300 s horizon handed over (in flight)."""
    incidents = rows // LEVELS
    every = rows // pending
    bench.sql(
        "INSERT INTO incidents (id, tenant, title, description, severity, state, created_at, updated_at) "
        f"SELECT {seq_id_sql('g')}, %s, 'bench', '', 'high', 'RESOLVED', now(), now() "
        "FROM generate_series(1, %s) g",
        (TENANT, incidents),
    )
    bench.sql(
        f"""
        INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at,
                                 executed_at, task_id, published_at)
        SELECT gen_random_uuid(), {seq_id_sql("(g - 1) / %(levels)s + 1")}, (g - 1) %% %(levels)s + 1,
               s.status, '["in_app"]', s.at,
               CASE WHEN s.status = 'EXECUTED' THEN s.at END,
               CASE WHEN s.status <> 'PENDING' OR s.at < now() + interval '300 seconds'
                    THEN gen_random_uuid()::text END,
               CASE WHEN s.status <> 'PENDING' OR s.at < now() + interval '300 seconds'
                    THEN s.at - interval '1 second' END
        FROM generate_series(1, %(rows)s) g,
        LATERAL (SELECT CASE WHEN g %% %(every)s = 0 THEN 'PENDING'
                             WHEN g %% 3 = 0 THEN 'CANCELLED' ELSE 'EXECUTED' END AS status) st,
        LATERAL (SELECT st.status,
                        CASE WHEN st.status = 'PENDING' THEN now() + random() * interval '1 hour'
                             ELSE now() - random() * interval '30 days' END AS at) s
        """,
        {"levels": LEVELS, "rows": rows, "every": every},
    )
    bench.sql("VACUUM ANALYZE escalations")
    bench.sql("VACUUM ANALYZE incidents")


def measure(bench: Bench, runs: int, label: str) -> dict:
    """The sweep's query through the real code (models.engine.sweep), RUNS times, and its plan."""
    out = json.loads(bench.python("bench.capture", "sweep", str(runs)).split("BENCH_JSON ", 1)[1])
    walls = out["wall_ms"][1:] or out["wall_ms"]  # the first run warms the cache
    return {
        "scenario": label,
        "rows_returned": out["rows"],
        "median_ms": median(walls),
        "p95_ms": percentile(walls, 95),
        "max_ms": max(walls),
        "runs": len(walls),
        # Each statement on a partial index of PENDING rows: finished rows never cost it anything.
        "uses_index": "Seq Scan" not in out["explain"] and "ix_escalations_" in out["explain"],
        "explain": out["explain"],
        "sql": out["sql"],
    }


def run(cfg, run_id: str, log_dir) -> dict:
    rows, pending = cfg.sweep_rows, cfg.sweep_rows // 10
    with Bench("sweep", run_id, log_dir) as bench:
        load(bench, rows, pending)
        # As a sweep leaves it: every pending row within the horizon handed over (in flight).
        bench.sql(
            "UPDATE escalations SET published_at = now(), task_id = gen_random_uuid()::text "
            "WHERE status = 'PENDING' AND published_at IS NULL "
            "AND scheduled_at <= now() + interval '300 seconds'"
        )
        bench.sql("VACUUM ANALYZE escalations")
        counts = dict(bench.sql("SELECT status, count(*) FROM escalations GROUP BY status", fetch=True))
        in_flight = bench.sql(
            "SELECT count(*) FROM escalations WHERE status = 'PENDING' "
            "AND scheduled_at < now() + interval '300 seconds'",
            fetch=True,
        )[0][0]
        scenarios = [measure(bench, cfg.sweep_runs, "steady: the horizon's rows in flight")]
        # After a broker outage: 1,000 due rows the broker never got; a sweep takes a batch of 500.
        bench.sql(
            "UPDATE escalations SET scheduled_at = now() - interval '1 minute', published_at = NULL, "
            "task_id = NULL WHERE id IN (SELECT id FROM escalations WHERE status = 'PENDING' "
            "AND scheduled_at > now() + interval '600 seconds' LIMIT 1000)"
        )
        bench.sql("ANALYZE escalations")
        scenarios.append(measure(bench, cfg.sweep_runs, "backlog: 1,000 overdue never handed over"))
        size = bench.sql(
            "SELECT pg_size_pretty(pg_relation_size('ix_escalations_pending_scheduled_at')), "
            "pg_size_pretty(pg_total_relation_size('escalations')), "
            "pg_size_pretty(pg_relation_size('ix_escalations_unpublished_scheduled_at'))",
            fetch=True,
        )[0]
    return {
        "rows": rows,
        "counts": counts,
        "in_flight": in_flight,
        "scenarios": scenarios,
        "index_size": size[0],
        "table_size": size[1],
        "unpublished_index_size": size[2],
    }
