"""Write docs/RELIABILITY.md from the rows a fault-suite run appended to $RELIABILITY_REPORT.

    RELIABILITY_REPORT=/tmp/rows.jsonl make faults
    .venv/bin/python -m tests.faults.report /tmp/rows.jsonl docs/RELIABILITY.md --wall 312

(`make reliability` does both.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from tests.support.servers import find_binary


def _out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine() -> dict[str, str]:
    mem_kb = next(
        (
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "?",
    )
    postgres = _out([find_binary("postgres") or "postgres", "--version"])
    redis = _out([find_binary("redis-server") or "redis-server", "--version"])
    return {
        "CPU": f"{os.cpu_count()} cores ({cpu})",
        "Memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "PostgreSQL": re.sub(r"^postgres \(PostgreSQL\) ", "", postgres),
        "Redis": (re.search(r"v=(\S+)", redis) or [None, redis])[1],
        "Celery / kombu / redis-py": f"{version('celery')} / {version('kombu')} / {version('redis')}",
        "SQLAlchemy / psycopg2": f"{version('sqlalchemy')} / {version('psycopg2-binary')}",
        "Load average at the end of the run": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _order(row: dict) -> tuple:
    """Escalation scenarios by number (1, 2 ... 19), then the notification ones (Na, Nb ...)."""
    label = row["scenario"].split(".")[0]
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def render(rows: list[dict], wall_s: float | None) -> str:
    rows = sorted(rows, key=_order)
    info = machine()
    lines = [
        "# Reliability: what breaks, and what the escalation engine does about it",
        "",
        "Written by `make reliability` from a real run of the fault suite (`tests/faults/`, `make faults`):",
        "every scenario starts its own PostgreSQL and Redis (installed binaries, temporary directories,",
        "free ports), its own gunicorn, Celery workers and beat (and Flower in the broker scenarios), breaks",
        "them for real (`kill -9`, server restarts, `FLUSHALL`, a TCP listener that never answers) and then",
        "runs the invariant checker (`tests/support/invariants.py`) over every incident's `escalations` and",
        "`incident_events`:",
        "",
        "1. at most one execution per (incident, level), each level created by the previous one's, with",
        "   the delays and channels of its policy in the policy file the stack ran with;",
        "2. no due level lost: every level due while its incident escalated ran, within the bound;",
        "3. nothing executed at or after the incident left ESCALATING, nothing left PENDING after it;",
        "4. the timeline is a valid path of the state machine, one event per transition, no gaps;",
        "5. every request answered in bounded time with a 2xx, a 409 or a JSON 503 (no 500, no hang);",
        "6. no process exited unless the scenario killed it on purpose, every long-running process",
        "   (web, workers, beat, Flower) is alive at the end, and in the broker faults (Redis restarted,",
        "   flushed, stopped) each is the very process that started (same pid) and there are zero exits;",
        "",
        "and that the scenario did the work it claims (a minimum of incidents created and escalated and",
        "of levels executed: a run where every request failed does not pass).",
        "",
        "Duplicates are counted twice over: execution events per escalation in Postgres, and `EXECUTING`",
        "announcements in the worker logs, which must match the executed escalations exactly (a line may",
        "be missing only where the scenario killed a worker or Postgres between a commit and its log line).",
        "Lateness is `executed_at - scheduled_at`, both read from Postgres's clock. Policies are fast",
        "(levels of 1 to 17 seconds); the sweep runs every second and re-delivers after a 2 s grace",
        "(production: 5 s and 30 s). The bounds are counted from the later of the level's due time and",
        "the end of the fault under way then (the broker back, the killed worker ready again, Postgres",
        "back): a hand-over by the sweep within the sweep interval + the grace + 2 s (a worker's",
        "reconnection); an execution within that + 1 s + the time to drain the backlog (levels due and not",
        "yet run when the fault ended, or falling due together in a burst) at 40 executions/s. A",
        "CANCELLED level counts as lost when it was cancelled after that deadline.",
        "",
        f"Run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
        + (f", whole fault suite {wall_s:.0f} s wall-clock." if wall_s else "."),
        "",
        "| Machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        "The machine is shared with other work: the load average above is part of the conditions.",
        "",
        "| # | What was broken | Incidents | Escalations | Executed | Lost | Duplicated |"
        " Executed after leave | Worst lateness (p99) | Worst after the fault (bound) | Requests (statuses) |"
        " Worst answer | Process exits | Result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        lines.append(
            f"| {r['scenario']} | {r['broken']} | {r['incidents']} | {r['escalations']} | {r['executed']} |"
            f" {r['lost']} | {r['duplicated']} | {r['executed_after_leave']} |"
            f" {r['worst_lateness_s']:.1f} s ({r['p99_lateness_s']:.1f} s) | {after_fault(r)} |"
            f" {r['requests']} ({statuses}) | {r['worst_response_s']:.2f} s | {exits(r)} | {r['result']} |"
        )
    lines += ["", "## Per scenario", ""]
    skip = {
        "scenario", "broken", "incidents", "escalations", "executed", "lost", "duplicated",
        "executed_after_leave", "worst_lateness_s", "p99_lateness_s", "requests", "statuses",
        "worst_response_s", "result", "first_violations", "violations", "cancelled", "pending",
        "process_exits", "killed_on_purpose", "same_pids_required", "exits", "outages",
        "worst_after_recovery_s", "execution_bound_s",
    }  # fmt: skip
    for r in rows:
        extra = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r.items() if k not in skip)
        lines.append(f"- **{r['scenario']}** ({r['result']}): cancelled {r['cancelled']}; {extra}")
        if r.get("outages"):
            lines.append(f"  - faults: {'; '.join(r['outages'])}")
        if r.get("exits"):
            lines.append(f"  - process exits: {'; '.join(r['exits'])}")
        for violation in r.get("first_violations", []):
            lines.append(f"  - `{violation}`")
    return "\n".join(lines) + "\n"


def after_fault(r: dict) -> str:
    """Worst execution counted from the later of due and the fault's end, and the bound it had."""
    if "execution_bound_s" not in r:
        return "-"
    return f"{r.get('worst_after_recovery_s', 0):.1f} s ({r['execution_bound_s']:.1f} s)"


def exits(r: dict) -> str:
    """Exits nobody asked for (0 required in every scenario; in the broker faults also the same pids),
    and kills the scenario made on purpose."""
    if "process_exits" not in r:
        return "not recorded"
    text = f"{r['process_exits']}"
    if r.get("same_pids_required"):
        text += " (0 required, same pids)"
    else:
        text += " (0 required)"
    if r.get("killed_on_purpose"):
        text += f" + {r['killed_on_purpose']} kill -9 on purpose"
    return text


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows")
    parser.add_argument("out")
    parser.add_argument("--wall", type=float, default=None, help="the suite's wall-clock seconds")
    parser.add_argument("--extra", default=None, help="a markdown file appended as is (findings)")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]
    text = render(rows, args.wall)
    if args.extra and Path(args.extra).exists():
        text += "\n" + Path(args.extra).read_text()
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({len(rows)} scenarios)")


if __name__ == "__main__":
    main(sys.argv[1:])
