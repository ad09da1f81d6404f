"""What every measurement shares: its own database and queue, real processes, statistics."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import processes, servers
from tests.support.processes import Process
from tests.support.servers import PROJECT_ROOT, wait_until

FAST_POLICY = PROJECT_ROOT / "tests" / "policies" / "fast.yaml"
TENANT = "bench"
# Incidents the bench creates in bulk get ids computable from an integer in SQL, Lua and Python.
ID_PREFIX = "00000000-0000-4000-8000-"


def seq_id(n: int) -> str:
    return f"{ID_PREFIX}{n:012x}"


def seq_id_sql(expr: str) -> str:
    """SQL for seq_id() of an integer expression."""
    return f"CAST('{ID_PREFIX}' || lpad(to_hex({expr}), 12, '0') AS uuid)"


def server_url() -> str:
    url = os.environ.get("DATABASE_URL") or servers.DEFAULT_DATABASE_URL
    return url.replace("postgres://", "postgresql://", 1)


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or servers.DEFAULT_REDIS_URL


@dataclass
class Bench:
    """One measurement's private world: a database and a queue on the shared servers, a log folder."""

    name: str
    run_id: str
    log_dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    next_seq: int = 1  # the next free seq_id() for bulk-created incidents

    @property
    def db_name(self) -> str:
        return f"bench_{self.run_id}_{self.name}"

    @property
    def queue(self) -> str:
        return f"bench-{self.run_id}-{self.name}"

    @property
    def notify_queue(self) -> str:
        """The notification queue (CELERY_NOTIFY_QUEUE): the bench's own, never the shared default."""
        return f"{self.queue}-notify"

    @property
    def database_url(self) -> str:
        return servers.with_database(server_url(), self.db_name)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
        env.update(
            {
                "DATABASE_URL": self.database_url,
                "REDIS_URL": redis_url(),
                "CELERY_QUEUE": self.queue,
                "CELERY_NOTIFY_QUEUE": self.notify_queue,
                # Production defaults, spelled out: the report states them.
                "ESCALATION_POLICY_FILE": str(FAST_POLICY),
                "ESCALATION_SWEEP_INTERVAL": "5",
                "ESCALATION_ETA_HORIZON": "300",
                "ESCALATION_REDELIVERY_GRACE": "30",
                # Not production's: the benchmarks drive one key from one address far past any rate
                # limit, and keep more incidents open than the quota (env_overrides turns them on
                # to measure them).
                "RATE_LIMIT_PER_KEY": "off",
                "RATE_LIMIT_FAILED_AUTH": "off",
                "TENANT_MAX_ACTIVE_INCIDENTS": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env_overrides)
        return env

    def __enter__(self) -> Bench:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        servers.drop_database(server_url(), self.db_name)
        servers.create_database(server_url(), self.db_name)
        from alembic import command
        from alembic.config import Config

        cfg = Config(str(PROJECT_ROOT / "migrations" / "alembic.ini"))
        cfg.attributes["database_url"] = self.database_url
        cfg.attributes["configure_logger"] = False
        command.upgrade(cfg, "head")
        # The sweep's sentinel, as a deployment that has been running keeps it in Redis: without it,
        # a worker's first sweep takes Redis for one that lost its data and hands over again every
        # level in flight (tasks/escalation.py), which a deploy never does.
        redis_client().set(f"{self.queue}:sweep-sentinel", "set by the bench")
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.processes):
            proc.stop(timeout=15)
        self.processes.clear()
        delete_queue(self.queue)
        delete_queue(self.notify_queue)
        servers.drop_database(server_url(), self.db_name)

    # -- database ---------------------------------------------------------------------------------
    def connect(self):
        import psycopg2

        conn = psycopg2.connect(self.database_url)
        conn.autocommit = True
        return conn

    def sql(self, statement: str, params=None, fetch: bool = False):
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if fetch else None
        finally:
            conn.close()

    def make_key(self) -> tuple[str, str, str]:
        """A write key of the bench tenant: (token, secret hash, key id)."""
        from models.api_key import hash_key, new_key

        token, prefix = new_key()
        key_id = str(uuid.uuid4())
        self.sql(
            "INSERT INTO api_keys (id, tenant, name, prefix, secret_hash, scope) "
            "VALUES (%s, %s, 'bench', %s, %s, 'write')",
            (key_id, TENANT, prefix, hash_key(token)),
        )
        return token, hash_key(token), key_id

    # -- processes --------------------------------------------------------------------------------
    def start(self, proc: Process, timeout: float = 60) -> Process:
        self.processes.append(proc)
        return proc.start(timeout=timeout)

    def prime(self, webs: dict[str, Process], token: str) -> None:
        """One request to each worker of each gunicorn: first requests pay for lazy imports and pools."""
        import http.client

        for proc in webs.values():
            for _ in range(4):
                conn = http.client.HTTPConnection("127.0.0.1", proc.port, timeout=30)
                try:
                    conn.request(
                        "POST",
                        "/incidents",
                        body=b'{"title": "warm-up"}',
                        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                    )
                    conn.getresponse().read()
                finally:
                    conn.close()

    def stop(self, proc: Process) -> None:
        proc.stop(timeout=15)
        self.processes.remove(proc)

    def webs(self, specs: dict[str, str], workers: int = 2, threads: int = 4) -> dict[str, Process]:
        """Start several gunicorns at once ({name: app}), each answered one request before returning."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(specs)) as pool:
            futures = {
                name: pool.submit(self.web, app, name, workers, threads) for name, app in specs.items()
            }
            return {name: future.result() for name, future in futures.items()}

    def web(self, app: str = "api:create_app()", name: str = "web", workers: int = 2, threads: int = 4):
        proc = self.start(
            processes.web(
                self.env, self.log_dir, name=f"{self.name}-{name}", workers=workers, threads=threads, app=app
            )
        )
        port = proc.port
        wait_until(lambda: _answers(port), 30, what=f"{name} answers")
        return proc

    def worker(self, name: str = "worker", beat: bool = False, concurrency: int = 2, app: str | None = None):
        return self.start(
            processes.worker(
                self.env,
                self.log_dir,
                name=f"{self.name}-{name}",
                beat=beat,
                concurrency=concurrency,
                app=app or "tasks.app:celery_app",
            )
        )

    def notifier(self, name: str = "notifier", concurrency: int = 2) -> Process:
        """The Procfile's notifier: the same worker command on the notification queue."""
        return self.start(
            processes.worker(
                {**self.env, "CELERY_QUEUE": self.notify_queue},
                self.log_dir,
                name=f"{self.name}-{name}",
                concurrency=concurrency,
            )
        )

    def python(self, module: str, *args: str, timeout: float = 300) -> str:
        """Run `python -m module args` in this bench's environment; return its stdout."""
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=PROJECT_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{module} failed:\n{done.stderr[-4000:]}")
        return done.stdout


def _answers(port: int) -> bool:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/nonexistent-bench-probe")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def redis_client():
    import redis

    return redis.Redis.from_url(redis_url())


def delete_queue(queue: str) -> None:
    """Delete this bench's queue keys (its own name only: the shared Redis is never flushed)."""
    try:
        client = redis_client()
        keys = list(client.scan_iter(match=f"{queue}*", count=1000))
        if keys:
            client.delete(*keys)
        # Messages a killed worker left unacknowledged (kombu keeps them in one hash for all queues):
        # only those routed to this queue.
        needle = f'"{queue}"]'.encode()
        for tag, payload in client.hscan_iter("unacked", count=1000):
            if payload.endswith(needle):
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        client.close()
    except Exception as exc:  # noqa: BLE001
        print(f"bench: could not delete queue {queue}: {exc}", file=sys.stderr)


def queue_length(queue: str) -> int:
    client = redis_client()
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def celery_sender():
    """A Celery app that only publishes (never the process's current app)."""
    from celery import Celery

    app = Celery("bench-sender", broker=redis_url(), set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app


# -- statistics -------------------------------------------------------------------------------------
def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def ratio(value: float, reference: float) -> str:
    if not reference or reference != reference or value != value:
        return "-"
    return f"{value / reference:.2f}"


# -- process memory ---------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def memory_kb(pid: int) -> dict[str, int]:
    """RSS and PSS (kB) summed over a process and all its descendants, and how many processes."""
    rss = pss = count = 0
    for member in process_tree(pid):
        try:
            text = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        rss += int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1))
        pss += int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))
    return {"rss_kb": rss, "pss_kb": pss, "processes": count}


def log_lines(path: Path, needle: str, offset: int = 0) -> list[str]:
    """Lines of a log holding `needle`, from byte `offset` on (a restarted process appends)."""
    try:
        with open(path, errors="replace") as fh:
            fh.seek(offset)
            return [line for line in fh if needle in line]
    except FileNotFoundError:
        return []


def now() -> float:
    return time.monotonic()


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a process and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / tick


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs so far: sample before and after, busy share = d(busy)/d(total)."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def server_pids(bench: Bench) -> dict[str, int]:
    """The shared Postgres's postmaster and Redis server, to meter with CpuMeter (Postgres's
    backends are the postmaster's children)."""
    data_directory = bench.sql("SHOW data_directory", fetch=True)[0][0]
    postmaster = int(Path(data_directory, "postmaster.pid").read_text().split()[0])
    return {"postgres": postmaster, "redis": int(redis_client().info("server")["process_id"])}


class CpuMeter:
    """CPU used by some process trees and by the whole machine over a `with` block."""

    def __init__(self, **pids: int):
        self.pids = pids

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.m0 = machine_busy()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.t0
        self.cpu = {name: cpu_seconds(pid) - self.c0[name] for name, pid in self.pids.items()}
        busy, total = machine_busy()
        self.machine = (busy - self.m0[0]) / max(1, total - self.m0[1])


# -- escalations in bulk ----------------------------------------------------------------------------
FAST_LEVELS = [
    {"delay_ms": 1000, "notify": ["in_app"]},
    {"delay_ms": 1000, "notify": ["email"]},
    {"delay_ms": 1000, "notify": ["sms"]},
]


def tenant_name(k: int, tenants: int = 1) -> str:
    """The k-th of `tenants` bench tenants (0-based); with one tenant, TENANT itself."""
    return TENANT if tenants == 1 else f"{TENANT}-{k}"


def seed_escalating(
    bench: Bench,
    count: int,
    scheduled: str,
    *,
    levels: list[dict] | None = None,
    published: bool = False,
    returning: bool = False,
    tenants: int = 1,
):
    """`count` ESCALATING incidents, each with level 1 PENDING as the engine leaves it.

    `scheduled` is an SQL expression of {i} (0..count-1) for scheduled_at. published=True: handed to
    the broker (task id and published_at set; the caller publishes). Incident i belongs to
    tenant_name(i % tenants, tenants). Returns (id, task_id, scheduled_at) rows when `returning`.
    """
    import json

    start = bench.next_seq
    bench.next_seq += count
    ident = seq_id_sql("g")
    levels = levels or FAST_LEVELS
    bench.sql(
        "INSERT INTO incidents (id, tenant, title, description, severity, state, policy_levels, "
        f"escalated_at) SELECT {ident}, %s || CASE WHEN %s > 1 THEN '-' || mod(g - %s, %s) ELSE '' END, "
        "'bench', '', 'high', 'ESCALATING', CAST(%s AS JSONB), now() FROM generate_series(%s, %s) g",
        (TENANT, tenants, start, tenants, json.dumps(levels), start, start + count - 1),
    )
    expr = scheduled.format(i=f"(g - {start})")
    return bench.sql(
        "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at, "
        f"task_id, published_at) SELECT gen_random_uuid(), {ident}, 1, 'PENDING', CAST(%s AS JSONB), "
        f"{expr}, CASE WHEN %s THEN gen_random_uuid()::text END, CASE WHEN %s THEN now() END "
        "FROM generate_series(%s, %s) g" + (" RETURNING id, task_id, scheduled_at" if returning else ""),
        (json.dumps(levels[0]["notify"]), published, published, start, start + count - 1),
        fetch=returning,
    )


def executed_twice(bench: Bench) -> int:
    """Escalations with more than one 'escalation_executed' timeline entry: 0, or a level doubled."""
    return bench.sql(
        "SELECT count(*) FROM (SELECT data->>'escalation_id' FROM incident_events "
        "WHERE type = 'escalation_executed' GROUP BY 1 HAVING count(*) > 1) d",
        fetch=True,
    )[0][0]


def seed_contacts(bench: Bench, channel: str, contacts: list[tuple[str, str, str]], secret=None) -> None:
    """Contacts (id, tenant, address) on `channel`, reached by every level, enabled, no status updates;
    webhook contacts sign with `secret`. Addresses are taken as given (the API would normalise them)."""
    from psycopg2.extras import execute_values

    conn = bench.connect()
    try:
        with conn.cursor() as cur:
            execute_values(
                cur,
                "INSERT INTO contacts (id, tenant, name, channel, address, status_updates, enabled, secret) "
                "VALUES %s",
                [(ident, tenant, f"bench {channel}", channel, address, False, True, secret)
                 for ident, tenant, address in contacts],
                page_size=1000,
            )  # fmt: skip
    finally:
        conn.close()


def send_tasks(name: str, queue: str, calls) -> None:
    """Publish one `name` task per call (a dict of apply_async options: args, task_id, eta) to `queue`."""
    sender = celery_sender()
    with sender.producer_or_acquire() as producer:
        for call in calls:
            sender.send_task(name, queue=queue, producer=producer, **call)
    sender.close()


def publish_escalations(bench: Bench, rows) -> None:
    """What the engine and tasks.escalation.deliver do for (id, task_id, scheduled_at) rows handed
    over in one transaction: rows due within one batch window share a message, and its task id."""
    from datetime import UTC, datetime

    from psycopg2.extras import execute_values

    from models.engine import EngineSettings, Outbox

    outbox, settings, now = Outbox(), EngineSettings(), datetime.now(UTC)
    task_ids = [(str(e), outbox.hand_over(e, due, now, settings)) for e, _task_id, due in rows]
    conn = bench.connect()
    try:
        with conn, conn.cursor() as cur:
            execute_values(
                cur,
                "UPDATE escalations SET task_id = v.task_id FROM (VALUES %s) v (id, task_id) "
                "WHERE escalations.id = CAST(v.id AS uuid)",
                task_ids,
                page_size=1000,
            )
    finally:
        conn.close()
    calls = (
        {"args": ([str(e) for e in m.escalation_ids],), "task_id": m.task_id, "eta": m.eta}
        for m in outbox.publish
    )
    send_tasks("escalations.execute", bench.queue, calls)


def publish_wakes(bench: Bench, contact_ids) -> None:
    """What tasks.notifications.wake does after commit: deliverers for the contacts woken, up to
    CONTACTS_PER_DELIVERER contacts to a message."""
    from tasks.notifications import CONTACTS_PER_DELIVERER as per

    ids = [str(c) for c in contact_ids]
    chunks = (ids[start : start + per] for start in range(0, len(ids), per))
    send_tasks("notifications.deliver", bench.notify_queue, ({"args": (chunk,)} for chunk in chunks))


def publish_noop(bench: Bench, count: int) -> None:
    send_tasks("bench.noop", bench.queue, ({} for _ in range(count)))


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_time(line: str) -> float:
    from datetime import datetime

    return datetime.strptime(LOG_TIME.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
