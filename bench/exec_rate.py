"""3. Escalation throughput with everything already due (handed over as the engine does: in batch
messages), next to a no-op Celery task on the same Redis and the same worker settings (the floor of
a design with one Celery task per level)."""

from __future__ import annotations

import time

from bench.common import (
    Bench,
    CpuMeter,
    log_lines,
    log_time,
    median,
    publish_escalations,
    publish_noop,
    seed_escalating,
    server_pids,
)

# Level 1 is due; level 2 an hour out (beyond the horizon: inserted, not published). So each
# execution does the whole step, next level included, without feeding the queue during the run.
LEVELS = [{"delay_ms": 0, "notify": ["in_app"]}, {"delay_ms": 3_600_000, "notify": ["email"]}]
APP = "bench.worker_app:celery_app"


def drain(bench: Bench, task: str, count: int, timeout_s: float, concurrency: int = 2) -> dict:
    """Start a worker on a queue already holding `count` tasks; tasks/s from first to last success."""
    proc = bench.worker(f"rate-{task}-{concurrency}", app=APP, concurrency=concurrency)
    needle = f"Task {task}["
    done: list[str] = []
    with CpuMeter(w=proc.process.pid) as meter:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [line for line in log_lines(proc.log_path, needle, proc._offset) if "succeeded in" in line]
            if len(done) >= count:
                break
            time.sleep(0.5)
    bench.stop(proc)
    span = log_time(done[-1]) - log_time(done[0]) if len(done) > 1 else float("nan")
    return {
        "tasks": len(done),
        "rate": (len(done) - 1) / span if span else float("nan"),
        "cpu_ms": 1000 * meter.cpu["w"] / max(1, len(done)),
        "machine_busy": meter.machine,
    }


def drain_escalations(
    bench: Bench, count: int, timeout_s: float, concurrency: int = 2, workers: int = 1
) -> dict:
    """Start `workers` workers, and once all are ready queue `count` due escalations (in the
    engine's batch messages); executions/s from the first to the last, as Postgres recorded them (a
    task runs a batch)."""
    procs = [
        bench.worker(f"rate-escalations-{concurrency}-{k}of{workers}", app=APP, concurrency=concurrency)
        for k in range(workers)
    ]
    since = bench.sql("SELECT clock_timestamp()", fetch=True)[0][0]
    queue_due_escalations(bench, count)

    def executed():
        return bench.sql(
            "SELECT count(*), extract(epoch FROM max(executed_at) - min(executed_at)) FROM escalations "
            "WHERE status = 'EXECUTED' AND executed_at > %s",
            (since,),
            fetch=True,
        )[0]

    def commits() -> int:
        return bench.sql(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()", fetch=True
        )[0][0]

    committed = commits()
    metered = {**{f"w{k}": p.process.pid for k, p in enumerate(procs)}, **server_pids(bench)}
    with CpuMeter(**metered) as meter:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and executed()[0] < count:
            time.sleep(0.5)
    # The statistics collector reports a backend's commits within half a second or so.
    time.sleep(1)
    committed = commits() - committed
    runs = 0
    for proc in procs:
        bench.stop(proc)
        lines = log_lines(proc.log_path, "Task escalations.execute[", proc._offset)
        runs += sum(1 for line in lines if "succeeded in" in line)
    done, span = executed()
    return {
        "executions": done,
        "tasks": runs,
        "rate": (done - 1) / float(span) if span else float("nan"),
        "cpu_ms": 1000 * sum(cpu for name, cpu in meter.cpu.items() if name.startswith("w")) / max(1, done),
        "postgres_cpu_ms": 1000 * meter.cpu["postgres"] / max(1, done),
        "redis_cpu_ms": 1000 * meter.cpu["redis"] / max(1, done),
        # Every commit in this database while it ran (the bench's own polling included, one a 0.5 s).
        "commits_per_execution": committed / max(1, done),
        "machine_busy": meter.machine,
    }


def queue_due_escalations(bench, count: int) -> list:
    """`count` escalations already due, handed to the broker as the engine would."""
    rows = seed_escalating(
        bench, count, "now() - interval '1 second'", levels=LEVELS, published=True, returning=True
    )
    publish_escalations(bench, rows)
    return rows


def run(cfg, run_id: str, log_dir) -> dict:
    runs = []
    with Bench("rate", run_id, log_dir) as bench:
        for _ in range(cfg.repeats):
            escalation = drain_escalations(bench, cfg.rate_escalations, timeout_s=600)
            executed = bench.sql(
                "SELECT count(*) FROM escalations WHERE status = 'EXECUTED' AND escalation_level = 1",
                fetch=True,
            )[0][0]
            publish_noop(bench, cfg.rate_noops)
            noop = drain(bench, "bench.noop", cfg.rate_noops, timeout_s=300)
            run = {"escalation": escalation, "noop": noop, "executed_total": executed}
            if cfg.rate_concurrency:
                # The same escalations with more prefork children (WORKER_CONCURRENCY): an experiment.
                run["escalation_more"] = drain_escalations(
                    bench, cfg.rate_escalations, timeout_s=600, concurrency=cfg.rate_concurrency
                )
            # The same escalations drained by 1, 2 and 4 workers (each --concurrency 2).
            for workers in cfg.rate_workers:
                run[f"workers{workers}"] = drain_escalations(
                    bench, cfg.rate_escalations, timeout_s=600, workers=workers
                )
            runs.append(run)
    kinds = ["escalation", "noop"] + (["escalation_more"] if cfg.rate_concurrency else [])
    kinds += [f"workers{workers}" for workers in cfg.rate_workers]
    summary = {
        kind: {key: median([r[kind][key] for r in runs]) for key in runs[0][kind] if key != "tasks"}
        | {"tasks": runs[0][kind]["tasks"]}
        for kind in kinds
    }
    return {
        "runs": runs,
        "median": summary,
        "escalations": cfg.rate_escalations,
        "noops": cfg.rate_noops,
        "more_concurrency": cfg.rate_concurrency,
        "workers": list(cfg.rate_workers),
    }
