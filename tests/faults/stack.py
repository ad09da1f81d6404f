"""A whole private deployment for one fault scenario: its own Postgres and Redis (on free ports, in a
temporary directory), its own gunicorn, workers and beat, an API client that records every answer,
and the helpers scenarios share (load, settling, supervision, the checker and the report).

Everything here is a real process; a scenario breaks only what this module started for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg2
import requests

from tests.support import invariants, processes
from tests.support.invariants import Figures, RequestRecord
from tests.support.servers import PostgresServer, RedisServer, wait_until

# Levels of a second or two: the same engine as production, with seconds instead of minutes.
FAST_POLICY = """\
default_policy: fast
policies:
  fast:
    levels:
      - {delay: 2s, notify: [in_app]}
      - {delay: 1s, notify: [email]}
      - {delay: 1s, notify: [sms]}
"""


def scale(name: str, default: int) -> int:
    """A scenario size, overridable for a longer run: FAULTS_<NAME>=..., times FAULTS_SCALE."""
    value = int(os.environ.get(f"FAULTS_{name.upper()}", default))
    return max(1, int(value * float(os.environ.get("FAULTS_SCALE", 1))))


class Api:
    """requests against the stack's gunicorn, one Session per thread; every call is recorded."""

    def __init__(self, base: str, headers: dict[str, str], timeout: float = 15.0):
        self.base = base
        self.headers = headers
        self.timeout = timeout
        self.records: list[RequestRecord] = []
        self._local = threading.local()
        self._lock = threading.Lock()
        self._sessions: list[requests.Session] = []

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers.update(self.headers)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def call(self, method: str, path: str, body: dict | None = None, record: bool = True) -> RequestRecord:
        started = time.monotonic()
        rec = RequestRecord(method, path, 0.0)
        try:
            response = self._session().request(method, self.base + path, json=body, timeout=self.timeout)
            rec.status = response.status_code
            rec.text = response.text
            try:
                rec.json_body = response.json()
            except ValueError:
                rec.json_body = None
        except requests.RequestException as exc:
            rec.error = f"{exc.__class__.__name__}: {exc}"[:300]
        rec.elapsed_s = time.monotonic() - started
        if record:
            with self._lock:
                self.records.append(rec)
        return rec

    def create(self, **body) -> str | None:
        rec = self.call("POST", "/incidents", {"title": "fault scenario", **body})
        return rec.json_body["id"] if rec.status == 201 else None

    def act(self, incident_id: str, action: str) -> RequestRecord:
        return self.call("POST", f"/incidents/{incident_id}/{action}")

    def close(self) -> None:
        for session in self._sessions:
            session.close()


class Stack:
    """Postgres + Redis + web + workers + beat for one scenario, all private to it."""

    def __init__(self, root: Path, template: Path, policy: str = FAST_POLICY, **env: str):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        pg_dir = root / "pg"
        # A copy of a cluster that already has the schema (alembic upgrade head ran on the template).
        subprocess.run(["cp", "-a", str(template), str(pg_dir)], check=True)
        self.pg = PostgresServer(pg_dir)
        self.redis = RedisServer(root / "redis")
        self.policy_file = root / "policy.yaml"
        self.policy_file.write_text(policy)
        self.procs: list[processes.Process] = []
        self.api: Api | None = None
        self.base_env = {
            "CELERY_QUEUE": "faults",
            "ESCALATION_POLICY_FILE": str(self.policy_file),
            "ESCALATION_SWEEP_INTERVAL": "1",
            "ESCALATION_REDELIVERY_GRACE": "2",
            "ESCALATION_ETA_HORIZON": "60",
            **env,
        }

    # -- servers and processes ---------------------------------------------------------------------
    def start_servers(self) -> Stack:
        self.pg.start()
        self.redis.start()
        return self

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg.port}/incidents"

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
        env.update(self.base_env)
        env.update(DATABASE_URL=self.database_url, REDIS_URL=self.redis.url)
        env.update(overrides)
        return env

    def web(self, name: str = "web", workers: int = 2, threads: int = 4, **env: str) -> processes.Process:
        proc = processes.web(self.env(**env), self.logs, name=name, workers=workers, threads=threads)
        self.procs.append(proc)
        return proc

    def worker(self, name: str = "worker", beat: bool = False, concurrency: int = 2, **env: str):
        proc = processes.worker(self.env(**env), self.logs, name=name, beat=beat, concurrency=concurrency)
        self.procs.append(proc)
        return proc

    def beat(self, name: str = "beat", **env: str) -> processes.Process:
        proc = processes.beat(self.env(**env), self.logs, name=name)
        self.procs.append(proc)
        return proc

    @staticmethod
    def start(*procs: processes.Process) -> None:
        """Start processes in parallel (each one's start-up is mostly imports: CPU, not waiting)."""
        with ThreadPoolExecutor(len(procs)) as pool:
            for future in [pool.submit(p.start) for p in procs]:
                future.result()

    def client(self, web: processes.Process, **kwargs) -> Api:
        self.api = Api(f"http://127.0.0.1:{web.port}", self.key(), **kwargs)
        return self.api

    def close(self) -> None:
        if self.api:
            self.api.close()
        for proc in self.procs:
            proc.kill()
        self.redis.stop(kill=True)
        self.pg.stop(kill=True)

    # -- the database ----------------------------------------------------------------------------
    def sql(self, query: str, args: tuple | None = None) -> list[tuple]:
        conn = psycopg2.connect(self.database_url, connect_timeout=5)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(query, args)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def key(self, tenant: str = "acme", scope: str = "write") -> dict[str, str]:
        """A new API key, inserted directly (as tests/conftest.make_key does)."""
        from models.api_key import hash_key, new_key

        key, prefix = new_key()
        self.sql(
            "INSERT INTO api_keys (id, tenant, name, prefix, secret_hash, scope) VALUES (%s,%s,%s,%s,%s,%s)",
            (str(uuid.uuid4()), tenant, "faults", prefix, hash_key(key), scope),
        )
        return {"Authorization": f"Bearer {key}"}

    def pending(self) -> int:
        return self.sql("SELECT count(*) FROM escalations WHERE status = 'PENDING'")[0][0]

    def overdue(self, by_s: float = 0.0) -> int:
        return self.sql(
            "SELECT count(*) FROM escalations WHERE status = 'PENDING' "
            "AND scheduled_at < clock_timestamp() - make_interval(secs => %s)",
            (by_s,),
        )[0][0]

    def settle(self, timeout: float = 60.0) -> float:
        """Wait until no escalation is PENDING (every chain ran to its end or was cancelled).
        Returns the seconds waited; a timeout is left for the checker to report as lost levels."""
        started = time.monotonic()
        try:
            wait_until(lambda: self.pending() == 0, timeout, interval=0.25, what="no PENDING escalation")
        except TimeoutError:
            pass
        return time.monotonic() - started

    # -- load --------------------------------------------------------------------------------------
    def open_incidents(self, n: int, escalate: bool = True, threads: int = 12) -> list[str]:
        """Create n incidents through the API (and escalate each); return the ids created."""

        def one(_):
            incident_id = self.api.create()
            if incident_id and escalate:
                self.api.act(incident_id, "escalate")
            return incident_id

        with ThreadPoolExecutor(threads) as pool:
            return [i for i in pool.map(one, range(n)) if i]

    def worker_logs(self) -> list[str]:
        return [p.log_text() for p in self.procs if p.cmd[3:4] == ["worker"]]

    # -- the verdict -------------------------------------------------------------------------------
    def check(self, **kwargs) -> Figures:
        return invariants.check(
            self.database_url,
            requests=self.api.records if self.api else [],
            logs=self.worker_logs(),
            **kwargs,
        )


class Supervisor:
    """Restarts a process that died (as the PaaS or honcho would), and counts the restarts."""

    def __init__(self, *procs: processes.Process, interval: float = 0.5):
        self.procs = procs
        self.interval = interval
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for proc in self.procs:
                if proc.process is not None and proc.process.poll() is not None:
                    self.restarts += 1
                    proc.process = None
                    try:
                        proc.start()
                    except Exception:  # noqa: BLE001 - try again on the next round
                        proc.kill()


def record(scenario: str, broken: str, figures: Figures, **extra) -> None:
    """Append the scenario's row to $RELIABILITY_REPORT (JSON lines), if set: docs/RELIABILITY.md is
    written from these rows (python -m tests.faults.report)."""
    path = os.environ.get("RELIABILITY_REPORT")
    if not path:
        return
    row = {
        "scenario": scenario,
        "broken": broken,
        **figures.as_dict(),
        "result": "pass" if figures.ok else f"FAIL ({figures.violation_count} violations)",
        "first_violations": figures.violations[:5],
        **extra,
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


def verdict(scenario: str, broken: str, figures: Figures, **extra) -> None:
    """Record the row, then fail the test on any violation (with every violation listed)."""
    record(scenario, broken, figures, **extra)
    print(f"\n[{scenario}] {figures.summary()} {extra}")
    assert figures.ok, figures.summary()
