"""5. Sweep cost: the sweep's query over 1,000,000 escalation rows (900,000 finished, 100,000
pending), timed through the real code (models.engine.sweep) and shown with EXPLAIN ANALYZE."""

from __future__ import annotations

import json
import re
import time

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
        "uses_index": "ix_escalations_pending_scheduled_at" in out["explain"],
        "explain": out["explain"],
        "sql": out["sql"],
    }


PROPOSED_INDEX = (
    "CREATE INDEX ix_escalations_unpublished_scheduled_at ON escalations (scheduled_at) "
    "WHERE status = 'PENDING' AND published_at IS NULL"
)


def proposed_sql(sql: str) -> list[str] | None:
    """The proposed form of the sweep's query, built from the statement the code sends now.

    Two ordered index scans whose ranges hold only candidates, instead of one that walks every row
    in flight: (1) rows never handed over and due within the horizon (a new partial index on
    unpublished rows); (2) only when (1) did not fill the batch, rows handed over but due before the
    grace cutoff (the existing partial index, with the code's own conditions). Each keeps ORDER BY
    scheduled_at, the batch limit and FOR UPDATE SKIP LOCKED. Measured with both always run.
    """
    match = re.match(r"(?s)(SELECT .*?)\s+FROM escalations\s+WHERE (.*) ORDER BY (.*)$", sql.strip())
    horizon = re.search(r"escalations\.scheduled_at <= ('[^']+'::timestamptz)", sql)
    cutoff = re.search(r"escalations\.scheduled_at < ('[^']+'::timestamptz)", sql)
    if not (match and horizon and cutoff):
        return None
    columns, where, tail = match.groups()
    return [
        f"{columns} FROM escalations WHERE escalations.status = 'PENDING' "
        f"AND escalations.published_at IS NULL AND escalations.scheduled_at <= {horizon.group(1)} "
        f"ORDER BY {tail}",
        f"{columns} FROM escalations WHERE {where} AND escalations.published_at IS NOT NULL "
        f"AND escalations.scheduled_at < {cutoff.group(1)} ORDER BY {tail}",
    ]


def measure_sql(bench: Bench, statements: list[str], runs: int, label: str, original: str) -> dict:
    """Time statements run one after the other in rolled-back transactions; check that together
    they pick the rows `original` picks."""
    conn = bench.connect()
    walls = []
    with conn.cursor() as cur:
        for _ in range(runs):
            cur.execute("BEGIN")
            rows, wall = [], 0.0
            for sql in statements:
                # execute() only, as bench.capture times the code's query (psycopg2 has the rows then).
                started = time.perf_counter()
                cur.execute(sql)
                wall += time.perf_counter() - started
                rows += cur.fetchall()
            walls.append(wall * 1000)
            cur.execute("ROLLBACK")
        plans = []
        cur.execute("BEGIN")
        for sql in statements:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql)
            plans.append("\n".join(row[0] for row in cur.fetchall()))
        cur.execute("ROLLBACK")
        unlocked = " FOR UPDATE SKIP LOCKED"
        mine = []
        for sql in statements:
            cur.execute(sql.replace(unlocked, ""))
            mine += [row[0] for row in cur.fetchall()]
        cur.execute(original.replace(unlocked, ""))
        theirs = sorted(row[0] for row in cur.fetchall())
    conn.close()
    walls = walls[1:] or walls
    batch = int(re.search(r"LIMIT (\d+)", original).group(1))
    return {
        "scenario": label,
        "rows_returned": min(len(rows), batch),
        "median_ms": median(walls),
        "p95_ms": percentile(walls, 95),
        "max_ms": max(walls),
        "runs": len(walls),
        "uses_index": "ix_escalations_unpublished_scheduled_at" in plans[0],
        "same_rows": sorted(mine)[: len(theirs)] == theirs
        if len(mine) <= batch
        else set(theirs) <= set(mine),
        "explain": "\n\n".join(plans),
        "sql": ";\n\n".join(statements),
        "proposed": True,
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
        bench.sql(PROPOSED_INDEX)
        bench.sql("ANALYZE escalations")
        steady_sql = proposed_sql(scenarios[0]["sql"])
        if steady_sql:
            scenarios.append(
                measure_sql(bench, steady_sql, cfg.sweep_runs, "proposed, steady", scenarios[0]["sql"])
            )
        # After a broker outage: 1,000 due rows the broker never got; a sweep takes a batch of 500.
        bench.sql(
            "UPDATE escalations SET scheduled_at = now() - interval '1 minute', published_at = NULL, "
            "task_id = NULL WHERE id IN (SELECT id FROM escalations WHERE status = 'PENDING' "
            "AND scheduled_at > now() + interval '600 seconds' LIMIT 1000)"
        )
        bench.sql("ANALYZE escalations")
        backlog = measure(bench, cfg.sweep_runs, "backlog: 1,000 overdue never handed over")
        scenarios.insert(1, backlog)
        backlog_sql = proposed_sql(backlog["sql"])
        if backlog_sql:
            scenarios.append(
                measure_sql(bench, backlog_sql, cfg.sweep_runs, "proposed, backlog", backlog["sql"])
            )
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
        "proposed_index_size": size[2],
        "proposed_index": PROPOSED_INDEX,
    }
