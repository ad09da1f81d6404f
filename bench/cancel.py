"""6. Cancellation: POST /incidents/{id}/resolve of ESCALATING incidents with a pending level that
was handed to the broker (so the resolve cancels it), next to the bare
endpoint and pgbench running the same SQL."""

from __future__ import annotations

from bench.common import Bench
from bench.throughput import APPS, WEB_THREADS, WEB_WORKERS, compare


def run(cfg, run_id: str, log_dir) -> dict:
    with Bench("cancel", run_id, log_dir) as bench:
        token, secret_hash, key_id = bench.make_key()
        webs = bench.webs(APPS, WEB_WORKERS, WEB_THREADS)
        bench.prime(webs, token)
        fill = {"hash": secret_hash, "key_id": key_id}
        if cfg.warmup:
            compare(bench, "resolve", [8], min(2, cfg.duration), 1, token, fill, webs)
        rows = compare(bench, "resolve", cfg.cancel_connections, cfg.duration, cfg.repeats, token, fill, webs)
        # Every resolved incident's pending level must be CANCELLED, in the same transaction.
        left, resolved = bench.sql(
            "SELECT count(*) FILTER (WHERE e.status = 'PENDING'), count(DISTINCT i.id) FROM incidents i "
            "JOIN escalations e ON e.incident_id = i.id WHERE i.state = 'RESOLVED'",
            fetch=True,
        )[0]
        return {"table": rows, "resolved": resolved, "pending_left": left}
