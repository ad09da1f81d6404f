"""`make bench` (python -m bench.run): every measurement, then docs/BENCHMARKS.md.

make bench                          # the full set (about 35 minutes on 2 cores)
make bench BENCH_ARGS=--quick       # a few minutes, written to .run/BENCHMARKS-quick.md
make bench BENCH_ARGS='--only storm memory'
python -m bench.run --report-from .run/bench-results.json   # rewrite the report only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.support.servers import PROJECT_ROOT

MEASUREMENTS = (
    "throughput",
    "storm",
    "exec_rate",
    "fairness",
    "memory",
    "sweep",
    "cancel",
    "delivery",
    "profile",
)


@dataclass
class Config:
    mode: str = "full"
    endpoints: list[str] = field(default_factory=lambda: ["create", "escalate"])
    connections: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    duration: float = 4
    repeats: int = 3
    storm_incidents: int = 10_000
    storm_window: float = 60
    storm_workers: list[int] = field(default_factory=lambda: [1, 2, 4])
    storm_timeout: float = 300  # how long after the window to wait for the backlog to drain
    # The storm's incidents are spread over this many tenants. The storm runs once more with one email
    # contact per tenant and the notifier on (storm_notify), paired with the first storm_workers run;
    # after the escalations it waits up to storm_notify_settle s for every email to be sent or bundled.
    storm_tenants: int = 100
    storm_notify: bool = True
    storm_notify_settle: float = 180
    # The storm once more through the API: storm_incidents escalated by HTTP at this many a second
    # (created by HTTP first), with the first storm_workers count of workers; 0: not run.
    storm_api_rate: float = 150
    rate_escalations: int = 10_000
    rate_noops: int = 4_000
    rate_concurrency: int = 8  # an extra escalation run with this many children (0: none)
    rate_workers: list[int] = field(default_factory=lambda: [1, 2, 4])  # worker processes, scaling
    # Fairness: one worker's capacity measured on fair_probe due escalations; then one tenant's storm
    # at fair_factor times it for fair_window s, and fair_lone escalations of another tenant through it.
    fair_probe: int = 5_000
    fair_factor: float = 3
    fair_window: float = 10
    fair_lone: int = 100
    memory_far: list[int] = field(default_factory=lambda: [10_000, 100_000])
    memory_near: int = 10_000
    sweep_rows: int = 1_000_000
    sweep_runs: int = 30
    cancel_connections: list[int] = field(default_factory=lambda: [1, 32])
    warmup: bool = True
    storm_lead_min: float = 10
    memory_settle: float = 5
    profile_requests: int = 200
    delivery_messages: int = 1_000  # per channel and round, one per contact
    delivery_concurrency: int = 2  # the notifier's prefork children


QUICK = dict(
    mode="quick",
    connections=[1, 32],
    duration=2,
    repeats=1,
    storm_incidents=1_000,
    storm_window=10,
    storm_workers=[1],
    storm_timeout=120,
    storm_tenants=20,
    storm_notify_settle=120,
    rate_escalations=2_000,
    rate_noops=1_000,
    rate_workers=[1, 2],
    fair_probe=2_000,
    fair_window=5,
    fair_lone=50,
    memory_far=[1_000, 10_000],
    memory_near=1_000,
    sweep_rows=100_000,
    sweep_runs=10,
    cancel_connections=[32],
    profile_requests=50,
    delivery_messages=300,
)

# The pytest smoke run (tests/test_bench_smoke.py): seconds per measurement.
SMOKE = dict(
    mode="smoke",
    connections=[4],
    duration=1,
    repeats=1,
    storm_incidents=60,
    storm_window=2,
    storm_workers=[1],
    storm_timeout=60,
    storm_tenants=6,  # 10 incidents each: every email within its contact's throttle, sent at once
    storm_notify_settle=60,
    storm_api_rate=60,
    rate_escalations=300,  # three batches: a rate needs more than one transaction's clock
    rate_noops=100,
    rate_concurrency=0,
    rate_workers=[2],
    fair_probe=300,
    fair_window=2,
    fair_lone=10,
    memory_far=[500],
    memory_near=100,
    sweep_rows=20_000,
    sweep_runs=3,
    cancel_connections=[4],
    warmup=False,
    storm_lead_min=3,
    memory_settle=1.5,
    profile_requests=10,
    delivery_messages=20,
)


def module(name: str):
    import importlib

    return importlib.import_module(f"bench.{name}")


def measure(cfg: Config, names, run_id: str, log_dir: Path, results: dict, save: Path | None) -> dict:
    for name in names:
        began = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        results[name] = module(name).run(cfg, run_id, log_dir)
        results[name]["seconds"] = time.monotonic() - began
        print(f"bench: {name} done in {results[name]['seconds']:.0f} s", flush=True)
        if save:
            save.write_text(json.dumps(results, indent=1, default=str))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run each (minutes)")
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, help="run only these measurements")
    parser.add_argument(
        "--out", type=Path, help="report path (default docs/BENCHMARKS.md, or .run/ for --quick)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="re-measure only --only's sections into the saved results of the last run, then report",
    )
    parser.add_argument(
        "--report-from", type=Path, help="write the report from saved results, measure nothing"
    )
    args = parser.parse_args(argv)

    from bench import report
    from bench.loadgen import ensure_wrk

    run_dir = PROJECT_ROOT / ".run"
    run_dir.mkdir(exist_ok=True)
    if args.report_from:
        saved = json.loads(args.report_from.read_text())
        out = args.out or PROJECT_ROOT / "docs" / "BENCHMARKS.md"
        out.write_text(report.render(saved))
        print(f"bench: wrote {out}")
        return
    cfg = Config(**QUICK) if args.quick else Config()
    out = args.out or (
        run_dir / "BENCHMARKS-quick.md" if args.quick else PROJECT_ROOT / "docs" / "BENCHMARKS.md"
    )
    if not ensure_wrk():
        print(
            "bench: wrk not available; using the asyncio load generator (it shares the CPUs)", file=sys.stderr
        )
    run_id = uuid.uuid4().hex[:6]
    log_dir = run_dir / f"bench-{run_id}"
    saved_path = run_dir / ("bench-results-quick.json" if args.quick else "bench-results.json")
    results: dict = {"config": asdict(cfg), "run_id": run_id, "environment": report.environment()}
    if args.merge and saved_path.exists():
        # Keep the other sections (and their run's machine and settings); note the merged ones.
        previous = json.loads(saved_path.read_text())
        previous.setdefault("merged", []).append(
            {"run_id": run_id, "sections": args.only or list(MEASUREMENTS), **report.load_now()}
        )
        previous["config"] = asdict(cfg)  # the merged sections ran with these settings
        results = previous
    began = time.monotonic()
    measure(cfg, args.only or MEASUREMENTS, run_id, log_dir, results, saved_path)
    results["seconds"] = results.get("seconds", 0) + time.monotonic() - began
    results["environment_after"] = report.load_now()
    saved_path.write_text(json.dumps(results, indent=1, default=str))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.render(results))
    print(
        f"bench: wrote {out} ({results['seconds'] / 60:.1f} min; raw results in {saved_path}, logs "
        f"in {log_dir})"
    )


if __name__ == "__main__":
    main()
