"""docs/BENCHMARKS.md from one run's results: machine, versions, settings, each table, what limits it."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

from bench.common import ratio, server_url
from models.engine import EngineSettings

ENGINE = EngineSettings()  # the batch the engine hands over, as the bench runs it

PACKAGES = (
    "flask",
    "flask-smorest",
    "marshmallow",
    "sqlalchemy",
    "psycopg2-binary",
    "celery",
    "kombu",
    "redis",
    "gunicorn",
)


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "-"


def load_now() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"loadavg": f"{one:.2f} {five:.2f} {fifteen:.2f}", "at": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def environment() -> dict:
    import psycopg2

    from bench.common import redis_client
    from bench.loadgen import pgbench_binary, wrk_binary

    meminfo = Path("/proc/meminfo").read_text()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    conn = psycopg2.connect(server_url().rsplit("/", 1)[0] + "/postgres")
    with conn.cursor() as cur:
        pg = {}
        for name in ("server_version", "shared_buffers", "fsync", "synchronous_commit", "max_connections"):
            cur.execute(f"SHOW {name}")
            pg[name] = cur.fetchone()[0]
    conn.close()
    client = redis_client()
    redis_version = client.info("server")["redis_version"]
    client.close()
    return {
        "nproc": os.cpu_count(),
        "cpu": model.group(1) if model else platform.processor(),
        "memory_gb": round(int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {name: metadata.version(name) for name in PACKAGES},
        "postgres": pg,
        "redis": redis_version,
        "wrk": _run([wrk_binary(), "--version"]).splitlines()[0] if wrk_binary() else "not installed",
        "pgbench": _run([pgbench_binary(), "--version"]) if pgbench_binary() else "not installed",
        **load_now(),
    }


def f(value, digits: int = 0) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "**not shown**" if ok is None else "**met**" if ok else "**missed**"


# -- sections -----------------------------------------------------------------------------------------
def section_throughput(res: dict) -> tuple[list[str], list[tuple]]:
    lines, targets = ["## 1. Create and transition throughput", ""], []
    lines += [
        f"gunicorn `{res['web']}` (workers x gthreads, as the Procfile), wrk with one thread and keep-alive "
        "connections on loopback, each figure the median of the runs. **bare** is `bench/bare_app.py`: the "
        "same SQL through SQLAlchemy Core in a bare Flask view under the same gunicorn settings. **pgbench** "
        "runs the same statements (`bench/pgbench/*.sql`) with min(connections, 8) clients: the app never "
        "has more than 8 requests, so 8 database connections, in flight. Ratios are api / reference. "
        "CPU/req is gunicorn CPU (all workers) per request.",
        "",
    ]
    for endpoint, rows in res["tables"].items():
        lines += [
            f"### POST {'/incidents' if endpoint == 'create' else '/incidents/{id}/' + endpoint}",
            "",
            "| conns | api req/s | bare req/s | pgbench tx/s | api/bare | api/pgbench | api p50 / "
            "p95 / p99 ms "
            "| bare p50 / p95 / p99 ms | pgbench p50 / p95 / p99 ms | CPU/req api / bare ms | errors |",
            "|---:|---:|---:|---:|---:|---:|---|---|---|---|---:|",
        ]
        for row in rows:
            a, b, p = row["api"], row["bare"], row["pgbench"]
            lines.append(
                f"| {row['connections']} | {f(a['rps'])} | {f(b['rps'])} | {f(p['rps'])} "
                f"({row['pgbench_clients']}) "
                f"| {ratio(a['rps'], b['rps'])} | {ratio(a['rps'], p['rps'])} "
                f"| {f(a['p50'], 1)} / {f(a['p95'], 1)} / {f(a['p99'], 1)} "
                f"| {f(b['p50'], 1)} / {f(b['p95'], 1)} / {f(b['p99'], 1)} "
                f"| {f(p['p50'], 1)} / {f(p['p95'], 1)} / {f(p['p99'], 1)} "
                f"| {f(a['web_cpu_ms'], 1)} / {f(b['web_cpu_ms'], 1)} | "
                f"{a['errors'] + b['errors'] + p['errors']} |"
            )
        ratios = [row["api"]["rps"] / row["bare"]["rps"] for row in rows if row["bare"]["rps"]]
        at32 = [row for row in rows if row["connections"] == 32]
        worst = min(ratios) if ratios else float("nan")
        top = max(rows, key=lambda r: r["connections"])
        cpu_a, cpu_b = top["api"]["web_cpu_ms"], top["bare"]["web_cpu_ms"]
        busy = top["api"]["machine_busy"]
        lines += [
            "",
            f"*What limits it:* CPU. At {top['connections']} connections the machine's {res.get('nproc', 2)} "
            f"cores were {f(100 * busy)}% busy and each API request cost {f(cpu_a, 1)} ms of gunicorn CPU "
            f"against {f(cpu_b, 1)} ms for the bare endpoint, so req/s is about cores / (gunicorn CPU + "
            "Postgres CPU + wrk) per request; "
            "pgbench, with no Python in the way, shows what Postgres alone sustains on the same cores. "
            "Latency beyond 8 connections is queueing for the 8 gunicorn threads.",
            "",
        ]
        if at32 and at32[0]["bare"]["rps"]:
            bound = 32 / at32[0]["bare"]["rps"] * 1000
            lines += [
                "*Why p99 <= 50 ms at 32 connections cannot hold here:* with 32 requests always in "
                "flight, mean latency is 32 / throughput (Little's law), so 50 ms needs 640 req/s. The bare "
                "endpoint, the same SQL with no framework, managed "
                f"{f(at32[0]['bare']['rps'])} req/s, a mean of {f(bound)} ms, on these 2 cores; no "
                "Python endpoint doing this work can get under 50 ms at 32 connections on this machine. "
                "pgbench's figure is the ceiling Postgres sets.",
                "",
            ]
        # Issue 10's request-path goal: create >= 0.7x bare, each transition >= 0.6x, at every
        # connection count, and CPU per request within 1.5x of bare (the previous target: >= 0.5x).
        floor = 0.7 if endpoint == "create" else 0.6
        cpu = max(
            row["api"]["web_cpu_ms"] / row["bare"]["web_cpu_ms"] for row in rows if row["bare"]["web_cpu_ms"]
        )
        targets += [
            (
                f"{endpoint}: api >= {floor}x bare req/s at every connection count (was: >= 0.5x; 0.40x)",
                f"{worst:.2f}x",
                worst >= floor,
            ),
            (
                f"{endpoint}: CPU per request <= 1.5x bare (worst over connection counts)",
                f"{cpu:.2f}x",
                cpu <= 1.5,
            ),
        ]
    lines += [
        "### The statements each endpoint sends (recorded from the real endpoint by `bench/capture.py`)",
        "",
    ]
    for endpoint, statements in res["statements"].items():
        lines += [f"`{endpoint}`: {len(statements)} round trips", "", "```sql"]
        lines += [" ".join(s.split())[:400] + ";" for s in statements]
        lines += ["```", ""]
    return lines, targets


def section_storm(res: dict, cfg: dict) -> tuple[list[str], list[tuple]]:
    lines, targets = ["## 2. Escalation lateness under a storm", ""], []
    lines += [
        f"{cfg['storm_incidents']:,} ESCALATING incidents whose level 1 falls due evenly within one "
        f"{cfg['storm_window']:g} s window (fast policy: 3 levels, each 1 s after the previous one ran, so "
        f"{3 * cfg['storm_incidents']:,} executions), handed to Redis as the escalate endpoint does "
        "(ETA tasks) before the window opens. Each worker: `celery worker --pool prefork --concurrency 2` "
        "(prefetch multiplier 4, acks late), the first one with the sweep (`--beat`). Lateness = "
        "`executed_at - scheduled_at`, both from the database clock. The bench waits until every level "
        f"has run (then nothing was lost) or {cfg['storm_timeout']:g} s after the window; levels still "
        "pending then count with their lateness so far (so the percentiles are lower bounds when "
        "*unfinished* is not 0). "
        f"The incidents belong to {cfg.get('storm_tenants', 1):,} tenant(s) in turn.",
        "",
        "| workers | handed over in s (window opened at) | executed | unfinished | executed twice "
        "| fenced re-deliveries "
        "| level 1 p50 / p95 / p99 / max ms | all levels p50 / p95 / p99 / max ms | executions/s "
        "| worker CPU s | machine busy |",
        "|---:|---|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    notified = res.get("notified")
    rows = [("", run) for run in res["runs"]] + ([(", with notifications", notified)] if notified else [])
    for extra, run in rows:
        label = f"{run['workers']}{extra}"
        l1, al = run["level1"], run["all"]
        mark = ">= " if run["unfinished"] else ""
        lines.append(
            f"| {label} | {f(run['handover_s'])} ({f(run['lead_s'])}) "
            f"| {run['executed']:,} / {run['expected']:,} | {run['unfinished']:,} "
            f"| {run['doubled']} | {run['fenced_duplicates']} "
            f"| {mark}{f(l1['p50'])} / {f(l1['p95'])} / {f(l1['p99'])} / {f(l1['max'])} "
            f"| {mark}{f(al['p50'])} / {f(al['p95'])} / {f(al['p99'])} / {f(al['max'])} | {f(run['rate'])} "
            f"| {f(run['worker_cpu_s'], 1)} | {f(100 * run['machine_busy'])}% |"
        )
        # The worst level's p99 (runs saved before per-level figures: all levels together).
        worst = max((lv["p99"] for lv in run.get("levels", {}).values()), default=al["p99"])
        targets.append(
            (
                f"storm, {run['workers']} worker(s){extra}: p99 lateness <= 1 s at every level "
                "(was: <= 250 ms; 147 s with 1 worker)",
                f"{mark}{f(worst)} ms",
                worst <= 1000 and not run["unfinished"],
            )
        )
        targets.append(
            (
                f"storm, {run['workers']} worker(s){extra}: nothing lost or doubled",
                f"{run['doubled']} doubled, {run['unfinished']:,} unfinished after the wait",
                False if run["doubled"] else (None if run["unfinished"] else True),
            )
        )
    needed = 3 * cfg["storm_incidents"] / cfg["storm_window"]
    best = max((r["rate"] for r in res["runs"]), default=float("nan"))
    floor = cfg.get("_noop_rate")
    lines += [
        "",
        f"*What limits it:* the storm itself. At its peak it asks for about {f(needed)} executions/s "
        f"(level 1 arriving for {cfg['storm_window']:g} s, levels 2 and 3 following a second apart), and "
        f"the executions/s column is that demand as it was met (best {f(best)}/s), not the workers' "
        "capacity: section 3 measures that, and the worker scaling below. Levels due within the same "
        f"{ENGINE.batch_window_s * 1000:g} ms window share a message (up to {ENGINE.batch_size}) and a "
        "transaction, so a worker runs a few tasks a second however many levels fall due; a level "
        "waits at most the window for the others of its message. *Fenced re-deliveries* are messages "
        "that found their levels already executed: taken by another batch as late (the fairness "
        "slice, section 3b) before their own message came, or handed over again by a sweep; the row "
        "lock and status check turn them into no-ops. Many of them mean the worker fell behind "
        "(bench/NOTES.md, proposal 5e).",
        "",
    ]
    if floor:
        lines += [
            f"For scale: a no-op Celery task runs at {f(floor)}/s with these worker settings (section 3), "
            f"below the {f(needed)}/s this storm needs: one task per level could not keep up, whatever "
            "each task did (the previous design's storm ended with level 1 at p99 41.6 s and all "
            "levels at p99 147 s late with one worker, and worse with two).",
            "",
        ]
    if notified:
        without = next((r for r in res["runs"] if r["workers"] == notified["workers"]), None)
        more_lines, more_targets = storm_with_notifications(notified, without)
        lines += more_lines
        targets += more_targets
    if res.get("api"):
        more_lines, more_targets = storm_through_api(res["api"])
        lines += more_lines
        targets += more_targets
    return lines, targets


def storm_through_api(run: dict) -> tuple[list[str], list[tuple]]:
    """Section 2's storm arriving through the API."""
    # By level number: results read back from JSON (--report-from) have the numbers as strings.
    http, levels = run["http"], {int(level): lv for level, lv in run["levels"].items()}
    mark = ">= " if run["unfinished"] else ""
    lines = [
        "### Through the API",
        "",
        f"{run['incidents']:,} incidents created by `POST /incidents`, then escalated by `POST "
        f"/incidents/{{id}}/escalate` at a steady {f(run['asked_rate'])}/s (open loop: the n-th request "
        "is due n / rate s after the first and goes out on the first free of 32 keep-alive connections; "
        "*behind* is how late the client sent one), the web (gunicorn 2 workers x 4 threads) beside "
        f"{run['workers']} worker(s); no rows seeded. Each escalate request publishes its own level 1, "
        "one message per request; a batch also runs the levels of other messages due by then, up to "
        "its size, so levels due together run together and their next levels travel in one message "
        "(`models/engine.py` `_pick_up_due`). *Left in Redis*: messages still queued when the last "
        "level had executed, each a no-op when it comes.",
        "",
        "| escalations/s asked / answered | HTTP p50 / p99 ms | behind ms (max) | executed | unfinished "
        "| executed twice | p99 ms level 1 / 2 / 3 | max ms | worker CPU s | web CPU s | machine busy "
        "| left in Redis |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        f"| {f(run['asked_rate'])} / {f(http['rps'])} | {f(http['p50'])} / {f(http['p99'])} "
        f"| {f(http['behind_max_ms'])} | {run['executed']:,} / {run['expected']:,} | {run['unfinished']:,} "
        f"| {run['doubled']} | {mark}{' / '.join(f(levels[lv]['p99']) for lv in (1, 2, 3))} "
        f"| {mark}{f(run['all']['max'])} | {f(run['worker_cpu_s'], 1)} | {f(run['web_cpu_s'], 1)} "
        f"| {f(100 * run['machine_busy'])}% | {run['queued_after']:,} |",
        "",
    ]
    worst = max(lv["p99"] for lv in levels.values())
    label = f"storm through the API ({run['incidents']:,} escalated by HTTP at {f(run['asked_rate'])}/s)"
    targets = [
        (
            f"{label}: p99 lateness <= 1 s at every level (was: not measured; 7.6 s with 1,000 incidents "
            "before batches took other messages' due levels, bench/NOTES.md 2)",
            f"{mark}{f(worst)} ms",
            worst <= 1000 and not run["unfinished"] and not http["errors"],
        ),
        (
            f"{label}: nothing lost or doubled",
            f"{run['doubled']} doubled, {run['unfinished']:,} unfinished after the wait",
            False if run["doubled"] else (None if run["unfinished"] else True),
        ),
    ]
    return lines, targets


def storm_with_notifications(run: dict, without: dict | None) -> tuple[list[str], list[tuple]]:
    """Section 2's run with notifications on, beside the run without contacts it follows."""
    n = run["notifications"]
    alerts = n["alerts"]
    accounted = alerts.get("SENT", 0) + alerts.get("BUNDLED", 0)
    others = ", ".join(f"{k} {v:,}" for k, v in sorted(alerts.items()) if k not in ("SENT", "BUNDLED"))
    unsettled = alerts.get("PENDING", 0) + alerts.get("SENDING", 0)
    if accounted == run["incidents"]:
        delivered = n["received"] == n["distinct"] == n["emails_sent"]
    else:  # not shown when the wait was too short; missed when some were lost or failed
        delivered = None if accounted + unsettled == run["incidents"] else False
    per_tenant = run["incidents"] / max(1, run["tenants"])
    lines = [
        "### With notifications",
        "",
        "The *with notifications* row is the same storm with one email contact per tenant "
        f"({n['contacts']:,} contacts, {per_tenant:,.0f} incidents each): level 1 writes in-app "
        "entries (as in the runs without contacts), level 2 an email per incident, delivered while the "
        "storm runs by the notifier (the Procfile's process: `--concurrency 2` on the notification "
        "queue) to a local aiosmtpd sink (`bench/sinks.py`, a process of its own), throttled at 10 "
        "emails per contact per minute with the surplus bundled into digests. It runs right after the "
        "run it is compared with. After the "
        f"escalations the bench waited {f(n['settled_s'])} s for every email to be sent or bundled.",
        "",
        f"Emails: {sum(alerts.values()):,} level-2 alerts; sent on their own {alerts.get('SENT', 0):,}, "
        f"bundled {alerts.get('BUNDLED', 0):,} into {n['digests']:,} digest(s)"
        + (f", still {others}" if others else "")
        + f"; {n['emails_sent']:,} emails SENT in Postgres, {n['received']:,} received by the sink "
        f"({n['distinct']:,} distinct Message-IDs); {n['in_app']:,} in-app entries. During the storm the "
        f"notifier used {f(n['notifier_cpu_s'], 1)} s of CPU (the escalation worker "
        f"{f(run['worker_cpu_s'], 1)} s) and the sink {f(n['sink_cpu_s'], 1)} s; "
        f"{n['deliverer_runs']:,} deliverer tasks ran before the notifier was stopped, "
        f"{n.get('idle_deliverer_runs', 0):,} of them with nothing to send.",
        "",
    ]
    targets = [
        (
            "storm with notifications: every email sent or bundled, none received twice",
            f"{accounted:,} / {run['incidents']:,} accounted for; {n['received']:,} received, "
            f"{n['distinct']:,} distinct",
            delivered,
        )
    ]
    if without:
        ratios = {
            "executions/s": run["rate"] / without["rate"] if without["rate"] else float("nan"),
            "p50": run["all"]["p50"] / without["all"]["p50"] if without["all"]["p50"] else float("nan"),
            "p99": run["all"]["p99"] / without["all"]["p99"] if without["all"]["p99"] else float("nan"),
        }
        lines += [
            "| run | executions/s | all levels p50 / p99 ms | escalation worker CPU s | notifier CPU s |",
            "|---|---:|---|---:|---:|",
            f"| without contacts | {f(without['rate'])} | {f(without['all']['p50'])} / "
            f"{f(without['all']['p99'])} | {f(without['worker_cpu_s'], 1)} | - |",
            f"| with notifications | {f(run['rate'])} | {f(run['all']['p50'])} / {f(run['all']['p99'])} "
            f"| {f(run['worker_cpu_s'], 1)} | {f(n['notifier_cpu_s'], 1)} |",
            f"| ratio | {f(ratios['executions/s'], 2)} | {f(ratios['p50'], 2)} / {f(ratios['p99'], 2)} | "
            f"{ratio(run['worker_cpu_s'], without['worker_cpu_s'])} | |",
            "",
            "*What limits it:* the notifier shares the 2 cores with the escalation worker, Postgres and "
            "Redis; whatever CPU it spends on deliveries during the storm is taken from the escalations. "
            "Differences of a few percent are within the run-to-run spread of this shared machine.",
            "",
        ]
        targets += [
            (
                "storm with notifications: executions/s within 10% of the run without",
                f"{f(ratios['executions/s'], 2)}x",
                ratios["executions/s"] >= 0.9,
            ),
            (
                "storm with notifications: lateness p50 and p99 within 10% of the run without",
                f"p50 {f(ratios['p50'], 2)}x, p99 {f(ratios['p99'], 2)}x",
                ratios["p50"] <= 1.1 and ratios["p99"] <= 1.1,
            ),
        ]
    return lines, targets


def section_rate(res: dict) -> tuple[list[str], list[tuple]]:
    med = res["median"]
    esc, noop = med["escalation"], med["noop"]
    r = esc["rate"] / noop["rate"] if noop["rate"] else float("nan")
    lines = [
        "## 3. Escalation throughput (everything already due)",
        "",
        f"{res['escalations']:,} due escalations (each execution also inserts its next level, an hour "
        "out), handed to Redis as the engine hands over levels due at the same moment: in messages "
        f"of up to {ENGINE.batch_size} (`models/engine.py`, `Outbox.hand_over`), each executed in one "
        f"transaction; and {res['noops']:,} no-op tasks (`bench/worker_app.py`), one message each. "
        "The no-ops are queued before the worker starts, the escalations once it is ready; the same "
        "worker (`--concurrency 2`, prefork, "
        "prefetch 4, acks late, task events on). Escalations per second from the first to the last "
        "`executed_at` in Postgres, no-ops per second from the first to the last `succeeded` line of "
        "the worker log; median of the runs. CPU is the whole worker tree per execution (per task for "
        "the no-op).",
        "",
        "| task | executions/s | tasks | CPU per execution ms | machine busy | ratio to no-op |",
        "|---|---:|---:|---:|---:|---:|",
        f"| escalations.execute | {f(esc['rate'], 1)} | {f(esc.get('tasks'))} | {f(esc['cpu_ms'], 2)} | "
        f"{f(100 * esc['machine_busy'])}% "
        f"| {ratio(esc['rate'], noop['rate'])} |",
        f"| bench.noop | {f(noop['rate'], 1)} | {f(noop.get('tasks'))} | {f(noop['cpu_ms'], 2)} | "
        f"{f(100 * noop['machine_busy'])}% | 1.00 |",
    ]
    more = med.get("escalation_more")
    if more:
        lines.append(
            f"| escalations.execute, `--concurrency {res['more_concurrency']}` (experiment) "
            f"| {f(more['rate'], 1)} | {f(more.get('tasks'))} | {f(more['cpu_ms'], 2)} "
            f"| {f(100 * more['machine_busy'])}% | {ratio(more['rate'], noop['rate'])} |"
        )
    lines += [
        "",
        "*What limits it:* the no-op is bound by the worker's main process (fetch, unacked bookkeeping, "
        "ack and three task events: Redis round trips for every task). A batch pays that once for up to "
        f"{ENGINE.batch_size} executions, and one transaction (pre-ping, BEGIN, the incident locks, the "
        "escalation locks with the clock, the UPDATEs, one multi-row INSERT each for the timeline, the "
        "in-app entries and the next levels, COMMIT); what is left per execution is the ORM work on its "
        "rows in a prefork child, and Postgres's share of the same 2 cores.",
        "",
    ]
    targets = [("escalation throughput >= 3x the no-op rate (was: >= 30%, 0.36x)", f"{r:.2f}x", r >= 3)]
    scaling = [(w, med[f"workers{w}"]) for w in res.get("workers", []) if f"workers{w}" in med]
    if scaling:
        base = scaling[0][1]["rate"]
        lines += [
            "### Workers scale",
            "",
            f"The same {res['escalations']:,} due escalations drained by 1, 2 and 4 worker processes "
            "(each `--concurrency 2`) on the same Redis queue. CPU per execution of the workers, of "
            "Postgres (the postmaster and every backend) and of Redis, and Postgres commits per "
            "execution (`pg_stat_database`, every commit in the bench's database while it ran).",
            "",
            "| workers | executions/s | tasks | worker / Postgres / Redis CPU per execution ms "
            "| commits per execution | machine busy | ratio to 1 worker |",
            "|---:|---:|---:|---|---:|---:|---:|",
        ]
        for workers, run in scaling:
            cpus = " / ".join(f(run.get(key), 2) for key in ("cpu_ms", "postgres_cpu_ms", "redis_cpu_ms"))
            lines.append(
                f"| {workers} | {f(run['rate'], 1)} | {f(run.get('tasks'))} | {cpus} "
                f"| {f(run.get('commits_per_execution'), 3)} | {f(100 * run['machine_busy'])}% "
                f"| {ratio(run['rate'], base)} |"
            )
        busiest = max(scaling, key=lambda item: item[1]["machine_busy"])[1]
        shares = {
            "the workers": busiest["cpu_ms"],
            "Postgres": busiest.get("postgres_cpu_ms", 0),
            "Redis": busiest.get("redis_cpu_ms", 0),
        }
        total = sum(shares.values()) or 1
        lines += [
            "",
            f"*What limits it:* the machine's 2 cores ({f(100 * busiest['machine_busy'])}% busy at the "
            "most): of the CPU an execution costs, "
            + ", ".join(f"{name} {100 * cpu / total:.0f}%" for name, cpu in shares.items())
            + ". Postgres commits are a few per batch, not per execution, and Redis sees a few messages "
            "a second: neither is the limit. More workers add processes competing for the same cores; "
            "on a machine with more cores (or workers on machines of their own) the rate grows with them "
            "until Postgres's share saturates its own cores.",
            "",
        ]
        rates = [run["rate"] for _w, run in scaling]
        targets.append(
            (
                "workers scale: adding a worker never lowers executions/s (1, 2, 4 workers; was: 2 workers "
                "0.6x of 1 in the storm)",
                " / ".join(f(rate) for rate in rates) + " /s",
                all(b >= a for a, b in zip(rates, rates[1:], strict=False)),
            )
        )
    return lines, targets


def section_fairness(res: dict) -> tuple[list[str], list[tuple]]:
    lone, storm = res["lone_lateness"], res["storm_lateness"]
    lines = [
        "## 3b. Fairness under overload",
        "",
        f"One worker's capacity measured first in the same run ({f(res['capacity'])} executions/s, "
        "everything due, as in section 3); then one tenant's storm at "
        f"{f(res['rate'])} levels/s ({res['rate'] / res['capacity']:.1f}x that) for {f(res['window_s'])} s "
        f"({res['storm']:,} levels, handed over in the engine's batch messages), and {res['lone']} levels "
        "of another tenant falling due evenly through it, each handed over in a message of its own as "
        "the escalate endpoint does. One worker (`--concurrency 2`, with the sweep). Lateness = "
        "`executed_at - scheduled_at`; levels never executed count with their lateness at the end.",
        "",
        "| tenant | levels | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {count:,} | {f(pct['p50'])} | {f(pct['p99'])} | {f(pct['max'])} |"
            for name, count, pct in (
                ("the lone tenant", res["lone"], lone),
                ("the storm's tenant", res["storm"], storm),
            )
        ),
        "",
        f"Executed twice: {res['doubled']}; still pending at the end: {res['unfinished']:,}. "
        f"Machine busy {f(100 * res['machine_busy'])}%.",
        "",
        "*Why the lone tenant is not behind the storm:* a Celery worker runs due ETA tasks in the order "
        "they fell due, so a message of the lone tenant waits behind every overdue message of the "
        "storm. Every batch also takes up to 10 late levels of other messages, the oldest of each "
        "tenant among the levels that turned more than 0.5 s late within the last 0.5 s "
        "(`EngineSettings.late_*`), so the tasks the worker runs take the lone tenant's late level with "
        "them, whatever the storm's backlog.",
        "",
    ]
    return lines, [
        (
            "fairness: a lone tenant's level p99 <= 2 s late while another tenant's storm is 3x what the "
            "worker executes",
            f"{f(lone['p99'])} ms (the storm's tenant: {f(storm['p99'])} ms)",
            lone["p99"] <= 2000 and not res["doubled"],
        )
    ]


def section_memory(res: dict) -> tuple[list[str], list[tuple]]:
    lines = [
        "## 4. Worker memory",
        "",
        "The worker (`--concurrency 2` with `--beat`: main process, 2 prefork children, beat; the sweep "
        "every second here) measured a few sweeps after each step. RSS summed over the processes counts "
        "pages shared after fork several times; PSS shares them out, so PSS is the memory the worker "
        "really adds.",
        "",
        "| pending escalations | processes | RSS MB | PSS MB | RSS change MB | PSS change MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for p in res["phases"]:
        lines.append(
            f"| {p['phase']} | {p['processes']} | {f(p['rss_kb'] / 1024, 1)} | {f(p['pss_kb'] / 1024, 1)} "
            f"| {f(p['delta_rss_kb'] / 1024, 1)} | {f(p['delta_pss_kb'] / 1024, 1)} |"
        )
    far = [p for p in res["phases"] if p["phase"].endswith("1 h out")]
    worst = max((max(p["delta_rss_kb"], p["delta_pss_kb"]) for p in far), default=0) / 1024
    near = res["phases"][-1]
    lines += [
        "",
        "*What limits it:* far-future escalations live only in Postgres (the engine hands to Redis only "
        "what falls due within `ESCALATION_ETA_HORIZON`), so they cost the worker nothing. "
        "Escalations within "
        "the horizon are ETA tasks the worker holds unacknowledged in memory until due: "
        f"{f(near['delta_pss_kb'] / 1024, 1)} MB PSS for the last row.",
    ]
    if res.get("near"):
        lines += [
            "",
            "Sizing: far-future pending escalations are free for the worker; budget worker memory for the "
            "escalations due within the horizon (300 s), about "
            f"{f(near['delta_pss_kb'] / res['near'], 1)} kB PSS each here.",
        ]
    lines += [
        "",
    ]
    return lines, [
        (f"{far[-1]['phase'] if far else 'far-future'} adds < 10 MB", f"{worst:.1f} MB", worst < 10)
    ]


def section_sweep(res: dict) -> tuple[list[str], list[tuple]]:
    counts = ", ".join(f"{k} {v:,}" for k, v in sorted(res["counts"].items()))
    current = [s for s in res["scenarios"] if not s.get("proposed")]
    lines = [
        "## 5. Sweep cost",
        "",
        f"{res['rows']:,} escalation rows ({counts}); pending ones spread over the next hour, the "
        f"{res['in_flight']:,} within the 300 s horizon handed over (in flight), as a sweep leaves them. "
        "Time of the sweep's queries through `models.engine.sweep()` (client round trips, rolled back, "
        f"median of {current[0]['runs']}); table {res['table_size']}, partial indexes "
        f"{res['index_size']} (PENDING) and {res.get('unpublished_index_size', '-')} (never handed over).",
        "",
        "| scenario | rows returned | median ms | p95 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in current:
        lines.append(
            f"| {s['scenario']} | {s['rows_returned']} | {f(s['median_ms'], 2)} "
            f"| {f(s['p95_ms'], 2)} | {f(s['max_ms'], 2)} |"
        )
    lines += [
        "",
        "*What limits it:* nothing that grows with the rows in flight any more. The sweep takes its "
        "candidates from two index ranges that hold only candidates: the rows never handed over (their "
        "own partial index, migration 0009), then, only when those did not fill the batch, the rows "
        "handed over but due before the grace cutoff (the PENDING partial index, from the cutoff "
        "down). Before, one ordered scan read every PENDING row due within the horizon from the heap "
        "and discarded the ones in flight: 14.1 ms median in the steady scenario (run `4e4d1e`). "
        "Finished rows are in neither index, so however many pile up they cost nothing.",
        "",
        "The code's queries (steady scenario):",
        "",
        "```sql",
        current[0]["sql"].strip(),
        "```",
        "",
    ]
    for s in current:
        lines += [f"EXPLAIN (ANALYZE, BUFFERS), {s['scenario']}:", "", "```", s["explain"], "```", ""]
    worst = max(s["median_ms"] for s in current)
    return lines, [
        (
            f"sweep queries <= 20 ms with {res['rows']:,} rows (median, worst scenario; was 14.1 ms)",
            f"{worst:.1f} ms",
            worst <= 20,
        )
    ]


def section_cancel(res: dict) -> tuple[list[str], list[tuple]]:
    lines = [
        "## 6. Cancellation (resolve with a pending level)",
        "",
        "POST /incidents/{id}/resolve of ESCALATING incidents whose level 1 was handed to the broker: "
        "the resolve cancels it in the same transaction (no revoke: the row stops it). References as in "
        "section 1.",
        "",
        "| conns | api req/s | bare req/s | pgbench tx/s | api/bare | api p50 / p95 / p99 ms | "
        "bare p50 / p95 / p99 ms "
        "| pgbench p50 / p95 / p99 ms | CPU/req api / bare ms | errors |",
        "|---:|---:|---:|---:|---:|---|---|---|---|---:|",
    ]
    targets = []
    for row in res["table"]:
        a, b, p = row["api"], row["bare"], row["pgbench"]
        lines.append(
            f"| {row['connections']} | {f(a['rps'])} | {f(b['rps'])} | {f(p['rps'])} "
            f"({row['pgbench_clients']}) "
            f"| {ratio(a['rps'], b['rps'])} | {f(a['p50'], 1)} / {f(a['p95'], 1)} / {f(a['p99'], 1)} "
            f"| {f(b['p50'], 1)} / {f(b['p95'], 1)} / {f(b['p99'], 1)} | {f(p['p50'], 1)} / "
            f"{f(p['p95'], 1)} / "
            f"{f(p['p99'], 1)} | {f(a['web_cpu_ms'], 1)} / {f(b['web_cpu_ms'], 1)} "
            f"| {a['errors'] + b['errors'] + p['errors']} |"
        )
        if row["connections"] == 32:
            targets.append(
                (
                    "resolve p99 at 32 connections (no target; <= 50 ms as for transitions)",
                    f"{f(a['p99'], 1)} ms",
                    a["p99"] <= 50,
                )
            )
    lines += [
        "",
        "*What limits it:* as in section 1, gunicorn CPU per request.",
        "",
    ]
    return lines, targets


def section_profile(res: dict) -> tuple[list[str], list[tuple]]:
    lines = [
        "## 7. Where the CPU goes, and the proposed fixes measured",
        "",
        "`bench/profile.py`: requests through Flask's test client in one process, one at a time (no "
        "network, no load generator, nothing competing in the process), so CPU per request is steady "
        "even when the machine is not. Median of the rounds; the variants (`bench/variants.py`) are the "
        "real app with one setting changed.",
        "",
        "| app | create CPU ms/req (min-max) | escalate CPU ms/req (min-max) | create vs bare "
        "| escalate vs bare |",
        "|---|---:|---:|---:|---:|",
    ]
    create, escalate = res["create"]["cpu_ms"], res["escalate"]["cpu_ms"]

    def spread(endpoint: str, name: str) -> str:
        low, high = res[endpoint].get("spread_ms", {}).get(name, (None, None))
        return f" ({f(low, 2)}-{f(high, 2)})" if low is not None else ""

    for name in create:
        lines.append(
            f"| {name} | {f(create[name], 2)}{spread('create', name)} "
            f"| {f(escalate[name], 2)}{spread('escalate', name)} | {ratio(create[name], create['bare'])} "
            f"| {ratio(escalate[name], escalate['bare'])} |"
        )
    lines += [
        "",
        "Differences smaller than the min-max spread of the rounds are noise: the machine is shared "
        "and CPU time per request moves with what runs beside it.",
    ]
    lines += [
        "",
        "The API's CPU by function (cProfile with a CPU clock; share of the request's CPU; cProfile "
        "inflates code that makes many small calls, so read these as proportions):",
        "",
        "| function | create | escalate |",
        "|---|---:|---:|",
    ]
    for area in res["create"]["areas"]:
        lines.append(
            f"| {area} | {f(100 * res['create']['areas'][area])}% | "
            f"{f(100 * res['escalate']['areas'][area])}% |"
        )
    worker = res["worker"]["cpu_ms"]
    lines += [
        "",
        "The task body per escalation (`execute_escalations` on messages of 100, what a prefork child "
        "does; level 2 an hour out): "
        + ", ".join(f"{name} {f(value, 2)} ms CPU" for name, value in worker.items())
        + ".",
        "",
    ]
    return lines, []


DELIVERY_PATHS = {
    "email": (
        ("notifier", "notifier (`notifications.deliver`)"),
        ("bare", "bare loop: smtplib, a connection per message"),
        ("bare_one_connection", "bare loop: smtplib, one connection for all"),
    ),
    "webhook": (
        ("notifier", "notifier (`notifications.deliver`)"),
        ("bare", "bare loop: `requests.post`, signed"),
        ("bare_stdlib", "bare loop: `requests.post`, signed, to the stdlib receiver"),
    ),
}


def section_delivery(res: dict, cfg: dict) -> tuple[list[str], list[tuple]]:
    med, runs = res["median"], res["runs"]
    lines = [
        "## 8. Notification delivery rate",
        "",
        f"Per channel and round, {res['messages']:,} contacts each with one PENDING level-2 alert in "
        "Postgres, as an executed level leaves them; the bench wakes the contacts' deliverers as the "
        "engine does after commit (up to 20 contacts to a message), and the notifier (the Procfile's "
        f"process, `celery worker --pool prefork --concurrency {res['concurrency']}` on the notification "
        "queue, each deliverer sending to its contacts from up to 4 threads) claims, sends and records "
        "each one. Rate from the first to the last `sent_at` (the database clock). Next to it, in the same "
        "round against the same receiver, a bare loop of the same client in one thread of the bench "
        "process, composing (and, for webhooks, signing) each message with the product's own code from "
        "the same incidents inside the timed loop, so the ratio is what the delivery machinery adds. "
        "Like the product, the bare loops open one connection per message (email also over one "
        "connection, for reference). Receivers (`bench/sinks.py`) run in processes of their own: "
        "aiosmtpd for email, a small asyncio HTTP/1.1 server for webhooks (and the stdlib "
        "`ThreadingHTTPServer` of `tests/support/receivers.py`, to see whether it would be the "
        f"bottleneck). Median of {len(runs['email'])} round(s). CPU per message is the sender's (the "
        "notifier's whole process tree, or the bench's own thread) and the receiver's.",
        "",
        "| channel | path | messages/s | ratio to the bare loop | sender CPU/msg ms | receiver CPU/msg ms "
        "| receiver busy | machine busy | received (distinct) / sent |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    targets = []
    for channel, paths in DELIVERY_PATHS.items():
        bare = med[channel]["bare"]["rate"]
        for key, label in paths:
            m = med[channel][key]
            received = sum(r[key]["received"] for r in runs[channel])
            distinct = sum(r[key]["distinct"] for r in runs[channel])
            sent = sum(r[key]["sent"] for r in runs[channel])
            lines.append(
                f"| {channel} | {label} | {f(m['rate'])} | {ratio(m['rate'], bare)} | {f(m['cpu_ms'], 1)} "
                f"| {f(m['sink_cpu_ms'], 2)} | {f(100 * m['sink_busy'])}% | {f(100 * m['machine_busy'])}% "
                f"| {received:,} ({distinct:,}) / {sent:,} |"
            )
        r = med[channel]["notifier"]["rate"] / bare if bare else float("nan")
        targets.append((f"delivery, {channel}: notifier >= 0.5x the bare loop", f"{r:.2f}", r >= 0.5))
    lines += [
        "",
        "What each receiver answers with 8 keep-alive connections (`bench/loadgen.py`, the load "
        "generator of section 1) during the same run:",
        "",
        "| receiver | req/s | p99 ms | receiver busy | errors | tool |",
        "|---|---:|---:|---:|---:|---|",
    ]
    names = {"http": "asyncio (`bench/sinks.py`)", "http-stdlib": "ThreadingHTTPServer (tests/support)"}
    for kind, cap in res["receivers"].items():
        lines.append(
            f"| {names.get(kind, kind)} | {f(cap['rps'])} | {f(cap['p99'], 1)} | "
            f"{f(100 * cap['sink_busy'])}% | {cap['errors']} | {cap['tool']} |"
        )
    email, hook = med["email"], med["webhook"]
    stdlib = res["receivers"].get("http-stdlib", {})
    lines += [
        "",
        f"*What limits it:* the sender's CPU. The notifier spent {f(email['notifier']['cpu_ms'], 1)} ms of "
        f"CPU per email and {f(hook['notifier']['cpu_ms'], 1)} ms per webhook, against "
        f"{f(email['bare']['cpu_ms'], 1)} and {f(hook['bare']['cpu_ms'], 1)} ms for the bare loops: "
        "per message two transactions (the claim; then the locked re-check, the send and the recorded "
        "outcome with its timeline entry) of about a dozen round trips, the incident as the API shows "
        "it, and the channel's own work; a Celery task per 20 contacts (bench/NOTES.md, proposal 5). "
        f"The receivers were not the limit: busy {f(100 * email['bare']['sink_busy'])}% (aiosmtpd) and "
        f"{f(100 * hook['bare']['sink_busy'])}% (asyncio HTTP) of one core during the bare loops. The "
        "stdlib receiver answers a connection per message about as fast as the asyncio one (the "
        f"*to the stdlib receiver* row: {ratio(hook['bare_stdlib']['rate'], hook['bare']['rate'])} of "
        "the rate), but kept-alive connections only "
        f"{f(stdlib.get('rps'))} req/s, p99 {f(stdlib.get('p99'), 1)} ms, with its process nearly idle: "
        "its headers and body leave in separate writes, so Nagle's algorithm holds each body until the "
        "client's delayed ACK of the headers, about 40 ms per request on a kept-alive connection (well "
        "under 1 ms on a new one). It would be the bottleneck for any client that reuses connections; "
        "the product's and the bare loop's connection per message never meets it.",
        "",
    ]
    return lines, targets


def render(results: dict) -> str:
    env, cfg = results["environment"], results["config"]
    after = results.get("environment_after", {})
    body, targets = [], []
    sections = {
        "throughput": lambda r: section_throughput({**r, "nproc": env["nproc"]}),
        "storm": lambda r: section_storm(
            r,
            {**cfg, "_noop_rate": results.get("exec_rate", {}).get("median", {}).get("noop", {}).get("rate")},
        ),
        "exec_rate": section_rate,
        "fairness": section_fairness,
        "memory": section_memory,
        "sweep": section_sweep,
        "cancel": section_cancel,
        "profile": section_profile,
        "delivery": lambda r: section_delivery(r, cfg),
    }
    for name, make in sections.items():
        if name in results:
            lines, t = make(results[name])
            body += lines
            targets += t
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    pg = env["postgres"]
    head = [
        "# Benchmarks",
        "",
        f"Written by `make bench` ({cfg['mode']} run `{results['run_id']}`, {env['at']}, "
        f"{results.get('seconds', 0) / 60:.1f} min). Regenerate with `make bench`; `make bench "
        "BENCH_ARGS=--quick` is a few-minute version written to `.run/`. Every figure sits next to a "
        "reference measured in the same run on the same machine, with the ratio: absolute numbers on a "
        "shared 2-core machine drift from run to run, ratios much less.",
        "",
        "## Machine and versions",
        "",
        f"- {env['nproc']} CPUs ({env['cpu']}), {env['memory_gb']} GB memory, Linux {env['kernel']}; load "
        f"average {env['loadavg']} at the start, {after.get('loadavg', '-')} at the end (the machine is "
        "shared: other test suites ran during the measurements).",
        f"- Python {env['python']}; {pkgs}.",
        f"- PostgreSQL {pg['server_version']} (shared_buffers {pg['shared_buffers']}, fsync {pg['fsync']}, "
        f"synchronous_commit {pg['synchronous_commit']}, max_connections {pg['max_connections']}); "
        f"Redis {env['redis']}; {env['wrk']}; {env['pgbench']}.",
        "- Settings: gunicorn 2 workers x 4 threads (gthread); Celery worker prefork concurrency 2, prefetch "
        "multiplier 4, acks late, task events on; sweep every 5 s, ETA horizon 300 s, redelivery grace 30 s "
        "(the production defaults); policy `tests/policies/fast.yaml`. Each measurement uses its own "
        "database and Redis queue on the shared servers.",
        f"- Sizes: {cfg['duration']:g} s per load run, {cfg['repeats']} run(s) each (median reported).",
        *(
            f"- Re-measured in run `{m['run_id']}` ({m['at']}, load average {m['loadavg']}): "
            + ", ".join(m["sections"])
            + "."
            for m in results.get("merged", [])
        ),
        "",
        "## Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
    ]
    head += [f"| {name} | {value} | {verdict(ok)} |" for name, value, ok in targets]
    head.append("")
    tail = []
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():
        tail = ["", notes.read_text().strip(), ""]
    return "\n".join(head + body + tail) + "\n"
