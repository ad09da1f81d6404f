"""4. Worker memory: RSS and PSS of the worker and all its processes (prefork children, embedded
beat) with 0, 10,000 and 100,000 escalations pending an hour out, and with 10,000 due within the
ETA horizon (which the sweep hands to the worker, and which it then holds until they are due)."""

from __future__ import annotations

import time

from bench.common import Bench, median, memory_kb, queue_length, seed_escalating

# The sweep runs every second here (it is what reads pending rows): each level is measured after a
# few sweeps have run over it.
SWEEP_S = 1


def sample(pid: int, samples: int = 3) -> dict:
    readings = []
    for _ in range(samples):
        readings.append(memory_kb(pid))
        time.sleep(0.5)
    return {key: median([r[key] for r in readings]) for key in readings[0]}


def run(cfg, run_id: str, log_dir) -> dict:
    far, near = cfg.memory_far, cfg.memory_near
    phases = []
    settle = cfg.memory_settle
    with Bench("memory", run_id, log_dir, {"ESCALATION_SWEEP_INTERVAL": str(SWEEP_S)}) as bench:
        proc = bench.worker("worker", beat=True)
        pid = proc.process.pid
        time.sleep(settle)  # let the first sweeps run: their imports and pools count
        phases.append({"phase": "0 pending", **sample(pid)})
        pending = 0
        for target in far:
            seed_escalating(bench, target - pending, "now() + interval '1 hour' + {i} * interval '1 ms'")
            pending = target
            time.sleep(settle)
            phases.append({"phase": f"{target:,} pending 1 h out", **sample(pid)})
        # Within the horizon (300 s) but not due during the measurement: the sweep hands them over.
        seed_escalating(bench, near, "now() + interval '200 seconds' + {i} * interval '1 ms'")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            unpublished = bench.sql(
                "SELECT count(*) FROM escalations WHERE published_at IS NULL "
                "AND scheduled_at < now() + interval '300 seconds'",
                fetch=True,
            )[0][0]
            if not unpublished and queue_length(bench.queue) == 0:
                break
            time.sleep(1)
        time.sleep(settle)
        phases.append({"phase": f"{far[-1]:,} 1 h out + {near:,} within the horizon", **sample(pid)})
        bench.stop(proc)
    base = phases[0]["rss_kb"]
    for phase in phases:
        phase["delta_rss_kb"] = phase["rss_kb"] - base
        phase["delta_pss_kb"] = phase["pss_kb"] - phases[0]["pss_kb"]
    return {"phases": phases, "near": near}
