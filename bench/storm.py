"""2. Escalation lateness under a storm: N incidents whose level 1 falls due within one window
(fast policy: three levels a second apart), executed by one worker (or two): executed_at -
scheduled_at for every level, and whether any was lost or executed twice.

Run once more with notifications on: one email contact per tenant, the notifier (the Procfile's
process) delivering to a local SMTP sink while the storm runs, beside the run without contacts
(level 1's in-app entries are written in both).

And once through the API: the incidents created and escalated by HTTP, at a steady rate, the web
process running beside the worker."""

from __future__ import annotations

import time
import uuid

from bench.common import (
    Bench,
    CpuMeter,
    executed_twice,
    log_lines,
    percentile,
    publish_escalations,
    queue_length,
    seed_contacts,
    seed_escalating,
    tenant_name,
)
from bench.sinks import Sink


def storm(
    bench: Bench,
    incidents: int,
    window_s: float,
    workers: int,
    timeout_s: float,
    lead_min: float,
    tenants: int = 1,
    notify_settle_s: float | None = None,
) -> dict:
    """The storm; with notify_settle_s, notifications on (the notifier and the SMTP sink run too, and
    after the escalations the bench waits up to that long for every email to be sent or bundled)."""
    notifier = sink = None
    if notify_settle_s is not None:
        sink = bench.start(Sink.of("smtp", bench.env, bench.log_dir, f"{bench.name}-smtp"))
        bench.env_overrides.update(SMTP_URL=sink.url, NOTIFY_EMAIL_FROM="pager@bench.example")
        contacts = [
            (str(uuid.uuid4()), tenant_name(k, tenants), f"oncall-{k}@example.com") for k in range(tenants)
        ]
        seed_contacts(bench, "email", contacts)
        notifier = bench.notifier()
    procs = [bench.worker(f"worker{k}", beat=(k == 0)) for k in range(workers)]
    # Handing N tasks to Redis takes a while on a busy machine (10,000 took 41 s at load 10): the
    # window should open after it; the report shows how long it took.
    lead_s = max(lead_min, incidents / 150)
    step_ms = window_s * 1000 / incidents
    began = time.monotonic()
    rows = seed_escalating(
        bench,
        incidents,
        f"now() + interval '{lead_s} seconds' + {{i}} * interval '{step_ms} milliseconds'",
        published=True,
        returning=True,
        tenants=tenants,
    )
    publish_escalations(bench, rows)
    handover_s = time.monotonic() - began
    expected = incidents * 3
    pids = {f"w{k}": p.process.pid for k, p in enumerate(procs)}
    if notifier:
        pids.update(notifier=notifier.process.pid, sink=sink.process.pid)
    with CpuMeter(**pids) as meter:
        wait_executed(bench, expected, lead_s + window_s + timeout_s)
    outcome = executions(bench, procs, expected)
    notifications = settle(bench, notifier, sink, meter, notify_settle_s) if notifier else None
    return {
        "workers": workers,
        "incidents": incidents,
        "tenants": tenants,
        "window_s": window_s,
        "lead_s": lead_s,
        "handover_s": handover_s,
        "timeout_s": timeout_s,
        **outcome,
        "worker_cpu_s": sum(cpu for name, cpu in meter.cpu.items() if name.startswith("w")),
        "wall_s": meter.wall,
        "machine_busy": meter.machine,
        "notifications": notifications,
    }


def wait_executed(bench: Bench, expected: int, wait_s: float) -> None:
    """Wait up to wait_s for `expected` levels to have executed."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        done = bench.sql("SELECT count(*) FROM escalations WHERE status = 'EXECUTED'", fetch=True)[0][0]
        if done >= expected:
            break
        time.sleep(1)


def executions(bench: Bench, procs, expected: int) -> dict:
    """Stop the workers, then measure what they did: lateness by level (levels still pending past
    their due time count with their lateness so far), what was lost or doubled, the rate."""
    lateness = bench.sql(
        "SELECT escalation_level, extract(epoch FROM executed_at - scheduled_at) * 1000 "
        "FROM escalations WHERE status = 'EXECUTED'",
        fetch=True,
    )
    # Rows still pending past their due time when the wait ended: their lateness is at least this.
    censored = bench.sql(
        "SELECT escalation_level, extract(epoch FROM clock_timestamp() - scheduled_at) * 1000 "
        "FROM escalations WHERE status = 'PENDING' AND scheduled_at < clock_timestamp()",
        fetch=True,
    )
    statuses = dict(bench.sql("SELECT status, count(*) FROM escalations GROUP BY status", fetch=True))
    doubled = executed_twice(bench)
    short = bench.sql(
        "SELECT count(*) FROM (SELECT i.id FROM incidents i LEFT JOIN escalations e "
        "ON e.incident_id = i.id AND e.status = 'EXECUTED' GROUP BY i.id HAVING count(e.id) <> 3) s",
        fetch=True,
    )[0][0]
    span = bench.sql(
        "SELECT extract(epoch FROM max(executed_at) - min(executed_at)) FROM escalations", fetch=True
    )[0][0]
    fenced = sum(len(log_lines(p.log_path, "duplicate, nothing to do", p._offset)) for p in procs)
    for proc in procs:
        bench.stop(proc)
    late = lateness + censored

    def pct(values):
        return {
            "p50": percentile(values, 50),
            "p95": percentile(values, 95),
            "p99": percentile(values, 99),
            "max": max(values) if values else float("nan"),
        }

    return {
        "expected": expected,
        "executed": statuses.get("EXECUTED", 0),
        "pending": statuses.get("PENDING", 0),
        "unfinished": expected - statuses.get("EXECUTED", 0),
        "incidents_not_3": short,
        "doubled": doubled,
        "fenced_duplicates": fenced,
        "all": pct([float(ms) for _level, ms in late]),
        "level1": pct([float(ms) for level, ms in late if level == 1]),
        "levels": {level: pct([float(ms) for lv, ms in late if lv == level]) for level in (1, 2, 3)},
        "censored": len(censored),
        "rate": (len(lateness) / float(span)) if span else float("nan"),
    }


def api_storm(bench: Bench, incidents: int, rate: float, workers: int, timeout_s: float) -> dict:
    """The storm arriving through the API: `incidents` created by POST /incidents, then escalated by
    POST /incidents/{id}/escalate at a steady `rate` per second (no rows seeded), with the web (the
    Procfile's gunicorn) and the workers sharing the machine as they would."""
    from bench.loadgen import create_incidents, paced_posts

    web = bench.web()
    url = f"http://127.0.0.1:{web.port}"
    token, _hash, _key_id = bench.make_key()
    ids = create_incidents(url, token, incidents)
    procs = [bench.worker(f"worker{k}", beat=(k == 0)) for k in range(workers)]
    pids = {f"w{k}": p.process.pid for k, p in enumerate(procs)} | {"web": web.process.pid}
    with CpuMeter(**pids) as meter:
        load = paced_posts(url, token, [f"/incidents/{i}/escalate" for i in ids], rate)
        wait_executed(bench, 3 * incidents, timeout_s)
    # Messages whose levels a batch ran before them (_pick_up_due): each is a no-op when it comes.
    queued = queue_length(bench.queue)
    bench.stop(web)
    outcome = executions(bench, procs, 3 * incidents)
    return {
        "workers": workers,
        "incidents": incidents,
        "asked_rate": rate,
        "http": load,
        "queued_after": queued,
        "timeout_s": timeout_s,
        **outcome,
        "worker_cpu_s": sum(cpu for name, cpu in meter.cpu.items() if name.startswith("w")),
        "web_cpu_s": meter.cpu["web"],
        "wall_s": meter.wall,
        "machine_busy": meter.machine,
    }


def settle(bench: Bench, notifier, sink: Sink, meter: CpuMeter, settle_s: float) -> dict:
    """After the escalations: wait for every email to be final, then count what Postgres recorded and
    what the SMTP sink received (an incident throttled into a digest is BUNDLED, not lost)."""
    began = time.monotonic()
    while time.monotonic() < began + settle_s:
        left = bench.sql(
            "SELECT count(*) FROM notifications WHERE channel = 'email' AND status IN ('PENDING', 'SENDING')",
            fetch=True,
        )[0][0]
        if not left:
            break
        time.sleep(1)
    settled_s = time.monotonic() - began
    runs = log_lines(notifier.log_path, "Task notifications.deliver[", notifier._offset)
    bench.stop(notifier)
    received = sink.received()
    counts = bench.sql(
        "SELECT channel, type, status, count(*) FROM notifications GROUP BY channel, type, status", fetch=True
    )
    alerts = {
        status: n
        for channel, kind, status, n in counts
        if channel == "email" and kind == "incident.escalated"
    }
    return {
        "contacts": bench.sql("SELECT count(*) FROM contacts", fetch=True)[0][0],
        "alerts": alerts,
        "digests": sum(n for channel, kind, _s, n in counts if kind == "notification.digest"),
        "emails_sent": sum(n for channel, _k, status, n in counts if channel == "email" and status == "SENT"),
        "in_app": sum(n for channel, _k, _s, n in counts if channel == "in_app"),
        "received": received["messages"],
        "distinct": received["distinct"],
        "settled_s": settled_s,
        "deliverer_runs": sum(1 for line in runs if "succeeded in" in line),
        # A deliverer returns how many notifications it attempted: ": 0" ran for nothing.
        "idle_deliverer_runs": sum(
            1 for line in runs if "succeeded in" in line and line.rstrip().endswith(": 0")
        ),
        "notifier_cpu_s": meter.cpu["notifier"],
        "sink_cpu_s": meter.cpu["sink"],
    }


def run(cfg, run_id: str, log_dir) -> dict:
    sizes = (cfg.storm_incidents, cfg.storm_window)
    limits = (cfg.storm_timeout, cfg.storm_lead_min, cfg.storm_tenants)
    results, notified = [], None
    for workers in cfg.storm_workers:
        with Bench(f"storm{workers}", run_id, log_dir) as bench:
            results.append(storm(bench, *sizes, workers, *limits))
        if cfg.storm_notify and workers == cfg.storm_workers[0]:
            # Right after the run it is compared with, so that both see the machine alike.
            with Bench(f"stormnotify{workers}", run_id, log_dir) as bench:
                notified = storm(bench, *sizes, workers, *limits, notify_settle_s=cfg.storm_notify_settle)
    api = None
    if cfg.storm_api_rate:
        with Bench("stormapi", run_id, log_dir) as bench:
            api = api_storm(
                bench, cfg.storm_incidents, cfg.storm_api_rate, cfg.storm_workers[0], cfg.storm_timeout
            )
    return {"runs": results, "notified": notified, "api": api}
