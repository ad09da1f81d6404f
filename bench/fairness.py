"""4. Fairness under overload: one tenant's storm at `fair_factor` times what one worker executes
(its capacity measured first, in the same run), and another tenant's lone escalations falling due
through it, each handed over in a message of its own as the escalate endpoint does. The lone
tenant's lateness is the figure; the storm tenant's is shown beside it."""

from __future__ import annotations

import time

from bench.common import Bench, CpuMeter, executed_twice, percentile, publish_escalations, seed_escalating
from bench.exec_rate import LEVELS, drain_escalations

LONE_TENANT = "bench-lone"


def fairness(bench: Bench, cfg) -> dict:
    capacity = drain_escalations(bench, cfg.fair_probe, timeout_s=300)["rate"]
    bench.sql("UPDATE escalations SET status = 'CANCELLED' WHERE status = 'PENDING'")  # the probe's level 2s
    since = bench.sql("SELECT now()", fetch=True)[0][0]  # after the probe: its rows are older
    rate = cfg.fair_factor * capacity
    storm_n = int(rate * cfg.fair_window)
    lead_s = max(cfg.storm_lead_min, storm_n / 4000)
    began = time.monotonic()
    storm = seed_escalating(
        bench,
        storm_n,
        f"now() + interval '{lead_s} seconds' + {{i}} * interval '{1000 * cfg.fair_window / storm_n} ms'",
        levels=LEVELS,
        published=True,
        returning=True,
    )
    publish_escalations(bench, storm)
    # The lone tenant's levels fall due evenly through the storm's window, one message each.
    step_ms = 1000 * cfg.fair_window / cfg.fair_lone
    lone = seed_escalating(
        bench,
        cfg.fair_lone,
        f"now() + interval '{lead_s} seconds' + ({{i}} + 0.5) * interval '{step_ms} ms'",
        levels=LEVELS,
        published=True,
        returning=True,
    )
    bench.sql(
        "UPDATE incidents SET tenant = %s "
        "WHERE id IN (SELECT incident_id FROM escalations WHERE id = ANY(CAST(%s AS uuid[])))",
        (LONE_TENANT, [str(row[0]) for row in lone]),
    )
    for row in lone:
        publish_escalations(bench, [row])
    handover_s = time.monotonic() - began
    worker = bench.worker("worker", beat=True)
    expected = storm_n + cfg.fair_lone
    with CpuMeter(w=worker.process.pid) as meter:
        deadline = time.monotonic() + lead_s + cfg.fair_window + cfg.storm_timeout
        while time.monotonic() < deadline:
            done = bench.sql(
                "SELECT count(*) FROM escalations WHERE status = 'EXECUTED' AND escalation_level = 1 "
                "AND scheduled_at > %s",
                (since,),
                fetch=True,
            )[0][0]
            if done >= expected:
                break
            time.sleep(1)
    bench.stop(worker)
    by_tenant = {
        tenant: [float(ms) for ms in lateness]
        for tenant, lateness in bench.sql(
            "SELECT i.tenant = %s, array_agg(extract(epoch FROM coalesce(e.executed_at, clock_timestamp()) "
            "- e.scheduled_at) * 1000) FROM escalations e JOIN incidents i ON i.id = e.incident_id "
            "WHERE e.escalation_level = 1 AND e.status <> 'CANCELLED' AND e.scheduled_at > %s GROUP BY 1",
            (LONE_TENANT, since),
            fetch=True,
        )
    }
    doubled = executed_twice(bench)
    unfinished = bench.sql(
        "SELECT count(*) FROM escalations WHERE status = 'PENDING' AND escalation_level = 1", fetch=True
    )[0][0]

    def pct(values):
        return {p: percentile(values, q) for p, q in (("p50", 50), ("p99", 99))} | {"max": max(values)}

    return {
        "capacity": capacity,
        "rate": rate,
        "storm": storm_n,
        "lone": cfg.fair_lone,
        "window_s": cfg.fair_window,
        "lead_s": lead_s,
        "handover_s": handover_s,
        "storm_lateness": pct(by_tenant.get(False, [float("nan")])),
        "lone_lateness": pct(by_tenant.get(True, [float("nan")])),
        "doubled": doubled,
        "unfinished": unfinished,
        "worker_cpu_s": meter.cpu["w"],
        "machine_busy": meter.machine,
    }


def run(cfg, run_id: str, log_dir) -> dict:
    with Bench("fairness", run_id, log_dir) as bench:
        return fairness(bench, cfg)
