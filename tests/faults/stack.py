"""A whole private deployment for one fault scenario: its own Postgres and Redis (on free ports, in a
temporary directory), its own gunicorn, workers, beat and Flower, an API client that records every
answer, and the helpers scenarios share (load, settling, supervision, the checker and the report).

Everything here is a real process; a scenario breaks only what this module started for it. Every
process the stack starts is watched from its start to the end of the scenario: each exit is recorded
(name, pid, exit code, when), and the verdict fails on any exit the scenario did not cause itself
(`Stack.kill`), on any process not alive at the end, and, for broker faults, on any process that is
not the very one (same pid) that started.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg2
import requests

from tests.support import invariants, processes
from tests.support.invariants import Figures, RequestRecord
from tests.support.servers import PostgresServer, RedisServer, wait_until

# What every stack runs with (production: 5 s and 30 s).
SWEEP_INTERVAL_S = 1.0
REDELIVERY_GRACE_S = 2.0
# The README's promise: a level runs when due or, when the broker or a worker lost it, at the latest
# a sweep interval plus the grace after it fell due or after the fault ended. The bounds the checker
# holds every scenario to, counted from the later of "due" and "the fault under way ended"
# (invariants.fault_deadline):
#
# - the sweep's hand-over of a level handed over after it fell due: interval + grace + HANDOVER_MARGIN_S
#   (the worker's reconnection to a restarted broker: kombu retries a refused connection after 2 s,
#   and the sweep runs in a worker), plus the time to drain what fell due at the same time (the sweep
#   message waits in the same queue as the executions): the backlog (levels due and not yet run,
#   counted in the database when each fault ended, and by a fluid queue over every level's due time
#   for bursts) at DRAIN_PER_S, the floor this suite holds a worker to on this shared 2-core machine
#   (docs/BENCHMARKS.md measures about 80 executions/s for a lone worker, and so do these
#   scenarios' drains; here the API, the load, Flower and the sweep share the cores);
# - its execution: that, plus RUN_MARGIN_S for the task's own run.
HANDOVER_MARGIN_S = 2.0
RUN_MARGIN_S = 1.0
DRAIN_PER_S = 40.0

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


def held_policy(delays_s: range) -> str:
    """FAST_POLICY plus a policy `held<d>` per delay d: level 1 d seconds out (the worker holds it as
    an ETA task meanwhile), level 2 one second later."""
    return FAST_POLICY + "".join(
        f"  held{d}:\n    levels:\n      - {{delay: {d}s, notify: [in_app]}}\n"
        "      - {delay: 1s, notify: [sms]}\n"
        for d in delays_s
    )


def lateness_bound(margin_s: float) -> float:
    """A sweep interval, the redelivery grace, and a stated margin."""
    return SWEEP_INTERVAL_S + REDELIVERY_GRACE_S + margin_s


def handover_bound(backlog: int = 0) -> float:
    return lateness_bound(HANDOVER_MARGIN_S + backlog / DRAIN_PER_S)


def execution_bound(backlog: int = 0) -> float:
    return handover_bound(backlog) + RUN_MARGIN_S


def scale(name: str, default: int) -> int:
    """A scenario size, overridable for a longer run: FAULTS_<NAME>=..., times FAULTS_SCALE."""
    value = int(os.environ.get(f"FAULTS_{name.upper()}", default))
    return max(1, int(value * float(os.environ.get("FAULTS_SCALE", 1))))


class Api:
    """requests against the stack's gunicorn, one Session per thread (a connection per request);
    every call is recorded."""

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
            # A connection per request: a thread idle past gunicorn's 2 s keep-alive would otherwise
            # send its next POST on a connection gunicorn is closing, and lose it to a reset
            # (scenario Ne lost a create so: "incident not created"), as tests/support/servers.api_session.
            session.headers.update({**self.headers, "Connection": "close"})
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

    def act(self, incident_id: str, action: str, body: dict | None = None) -> RequestRecord:
        return self.call("POST", f"/incidents/{incident_id}/{action}", body)

    def close(self) -> None:
        for session in self._sessions:
            session.close()


@dataclass
class Exit:
    """A process of the stack that exited: which, when (seconds since the stack started), how."""

    name: str
    pid: int
    code: int | None
    at_s: float
    intended: bool = False
    note: str = ""

    def __str__(self) -> str:
        how = "killed on purpose" if self.intended else f"exited with {self.code}"
        return f"{self.name} (pid {self.pid}) {how} at {self.at_s:.1f} s" + (
            f": {self.note}" if self.note else ""
        )


def _last_error(proc: processes.Process) -> str:
    """The line of a process's log that says why it went (Celery's 'Unrecoverable error', a traceback's
    last line), for the report."""
    lines = [line for line in proc.log_tail(80).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"CRITICAL|Unrecoverable|Error|Exception", line):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else ""


class Supervisor:
    """Watches processes: records every exit (name, pid, exit code, when) and, while `restart` is on,
    starts a process that died again (as the PaaS or honcho would), retrying on the next round when
    that start fails. A kill a scenario intends goes through kill(), which records it as intended.

    The stack owns one over all its processes (Stack.supervisor); it can also be used on its own:
    `with Supervisor(worker, beat) as supervisor:` restarts them while the block runs."""

    def __init__(self, *procs: processes.Process, interval: float = 0.25, restart: bool = True):
        self.procs: list[processes.Process] = list(procs)
        self.interval = interval
        self.restart = restart
        self.restarts = 0
        self.exits: list[Exit] = []
        self.lock = threading.RLock()
        self.started = time.monotonic()
        self._down: dict[int, processes.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="supervisor")

    def __enter__(self) -> Supervisor:
        self.begin()
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def begin(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def end(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self.lock:
            self.poll()  # an exit in the last interval is an exit too

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                self.poll()

    def _now(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def poll(self) -> None:
        for proc in list(self.procs):
            popen = proc.process
            if popen is not None and popen.poll() is not None:
                self.exits.append(
                    Exit(proc.name, popen.pid, popen.returncode, self._now(), note=_last_error(proc))
                )
                proc.process = None
                self._down[id(proc)] = proc
        if not self.restart or self._stop.is_set():
            return
        for key, proc in list(self._down.items()):
            if proc.process is not None:  # started again meanwhile (by the scenario itself)
                del self._down[key]
                continue
            try:
                proc.start()
            except Exception as exc:  # noqa: BLE001 - recorded; tried again on the next round
                popen = proc.process
                if popen is not None and popen.poll() is not None:
                    self.exits.append(
                        Exit(
                            proc.name,
                            popen.pid,
                            popen.returncode,
                            self._now(),
                            note=f"restart failed: {exc}"[:300],
                        )
                    )
                proc.kill()  # a start that hung: kill it, and leave the process down for the next round
            else:
                self.restarts += 1
                del self._down[key]

    def kill(self, proc: processes.Process) -> None:
        """kill -9 on purpose: recorded as intended, never restarted by the supervisor."""
        with self.lock:
            self.poll()  # an exit that came first is not the scenario's kill
            popen = proc.process
            if popen is None:
                return
            proc.kill()
            self.exits.append(Exit(proc.name, popen.pid, popen.returncode, self._now(), intended=True))

    def terminate(self, procs: list[processes.Process], grace_s: float) -> dict[str, str]:
        """A PaaS's restart of these processes: SIGTERM to every process of each (its whole process
        group: the platform signals every process of a dyno, pool processes included), then SIGKILL
        to whatever is left grace_s later. Each exit is recorded as intended, saying how it ended;
        returns {name: how}. Nothing is started again here."""
        with self.lock:
            self.poll()  # an exit that came first is not the scenario's
            live = {proc.name: proc for proc in procs if proc.process is not None}
            began = time.monotonic()
            for proc in live.values():
                os.killpg(proc.process.pid, signal.SIGTERM)
            ended: dict[str, str] = {}
            while len(ended) < len(live) and time.monotonic() - began < grace_s:
                for name, proc in live.items():
                    if name not in ended and proc.process.poll() is not None:
                        after = time.monotonic() - began
                        ended[name] = f"exited {proc.process.returncode} {after:.1f} s after SIGTERM"
                time.sleep(0.05)
            for name, proc in live.items():
                popen = proc.process
                ended.setdefault(name, f"SIGKILL after the {grace_s:g} s grace")
                proc.kill()  # SIGKILL to the group: the process, or pool processes that outlived it
                self.exits.append(
                    Exit(name, popen.pid, popen.returncode, self._now(), intended=True, note=ended[name])
                )
            return ended

    def unintended(self) -> list[Exit]:
        return [e for e in self.exits if not e.intended]

    def intended(self) -> list[Exit]:
        return [e for e in self.exits if e.intended]


class Stack:
    """Postgres + Redis + web + workers + beat (+ Flower) for one scenario, all private to it."""

    def __init__(
        self,
        root: Path,
        template: Path,
        policy: str = FAST_POLICY,
        durable_redis: bool = False,
        **env: str,
    ):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        pg_dir = root / "pg"
        # A copy of a cluster that already has the schema (alembic upgrade head ran on the template).
        subprocess.run(["cp", "-a", str(template), str(pg_dir)], check=True)
        self.pg = PostgresServer(pg_dir)
        self.redis = RedisServer(root / "redis", durable=durable_redis)
        self.policy_file = root / "policy.yaml"
        self.policy_file.write_text(policy)
        self.procs: list[processes.Process] = []
        self.api: Api | None = None
        self.base_env = {
            "CELERY_QUEUE": "faults",
            "ESCALATION_POLICY_FILE": str(self.policy_file),
            "ESCALATION_SWEEP_INTERVAL": f"{SWEEP_INTERVAL_S:g}",
            "ESCALATION_REDELIVERY_GRACE": f"{REDELIVERY_GRACE_S:g}",
            "ESCALATION_ETA_HORIZON": "60",
            # The scenarios flood the API with one key from one address: what they measure is the
            # engine under faults, not the rate limits (tests/test_limits.py) or the quota.
            "RATE_LIMIT_PER_KEY": "off",
            "RATE_LIMIT_FAILED_AUTH": "off",
            "TENANT_MAX_ACTIVE_INCIDENTS": "0",
            **env,
        }
        # Watches every process from its first start; restarts only inside supervise().
        self.supervisor = Supervisor(restart=False)
        self.supervisor.procs = self.procs
        self.first_pids: dict[str, int] = {}
        # (began, ended, what): the faults the scenario caused, on the machine's (and Postgres's) clock.
        self.outages: list[tuple[datetime, datetime, str]] = []
        self.postgres_kills = 0
        self.backlogs: list[int] = []  # Stack.backlog() at the end of each outage
        self.same_pids = False
        self.flower_auth = ("faults", uuid.uuid4().hex[:12])

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

    def flower(self, name: str = "flower", **env: str) -> processes.Process:
        proc = processes.flower(self.env(**env), self.logs, name=name, basic_auth=":".join(self.flower_auth))
        self.procs.append(proc)
        return proc

    def start(self, *procs: processes.Process) -> None:
        """Start processes in parallel (each one's start-up is mostly imports: CPU, not waiting); from
        then on the supervisor watches them."""
        with ThreadPoolExecutor(len(procs)) as pool:
            for future in [pool.submit(p.start) for p in procs]:
                future.result()
        for proc in procs:
            self.first_pids.setdefault(proc.name, proc.process.pid)
        self.supervisor.begin()

    @contextmanager
    def supervise(self) -> Iterator[Supervisor]:
        """Restart any process that dies while the block runs (every exit still counts)."""
        self.supervisor.restart = True
        try:
            yield self.supervisor
        finally:
            self.supervisor.restart = False

    def kill(self, proc: processes.Process) -> None:
        """kill -9 a process on purpose (the scenario's fault, not a process exit)."""
        self.supervisor.kill(proc)

    def kill_postgres(self) -> None:
        """kill -9 the postmaster and every backend: a commit in flight may be durable while its client
        never hears so."""
        self.postgres_kills += 1
        self.pg.stop(kill=True)

    @contextmanager
    def outage(self, what: str) -> Iterator[None]:
        """Record the block as a fault under way: a level due before it, or within the bound of it,
        is judged from the moment it ended (invariants.fault_deadline)."""
        began = datetime.now(UTC)
        try:
            yield
        finally:
            self.outages.append((began, datetime.now(UTC), what))
        try:
            self.backlogs.append(self.backlog())
        except psycopg2.Error:
            pass  # Postgres itself is down: the fault's end is when it is back (a later outage)

    def client(self, web: processes.Process, **kwargs) -> Api:
        self.api = Api(f"http://127.0.0.1:{web.port}", self.key(), **kwargs)
        return self.api

    def close(self) -> None:
        self.supervisor.end()
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

    def backlog(self) -> int:
        """Levels due now and not run yet: what the workers must drain once a fault is over."""
        return self.overdue()

    def wave_backlog(self) -> int:
        """The most levels that can have been due and waiting at once for workers that drain
        DRAIN_PER_S: a fluid queue, second by second, over the due time of every escalation that had
        to run (all but those cancelled before they fell due). Bursts that escalate hundreds of
        incidents within a few seconds make their levels fall due together."""
        rows = self.sql(
            "SELECT floor(extract(epoch FROM scheduled_at))::bigint, count(*) FROM escalations "
            "WHERE status <> 'CANCELLED' OR updated_at >= scheduled_at GROUP BY 1 ORDER BY 1"
        )
        waiting = worst = 0.0
        previous = None
        for second, count in rows:
            if previous is not None:
                waiting = max(0.0, waiting - DRAIN_PER_S * (second - previous))
            waiting += count
            worst = max(worst, waiting)
            previous = second
        return int(worst)

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
    def open_incidents(self, n: int, escalate: bool = True, threads: int = 12, **body) -> list[str]:
        """Create n incidents through the API (and escalate each); return the ids created."""

        def one(_):
            incident_id = self.api.create(**body)
            if incident_id and escalate:
                self.api.act(incident_id, "escalate")
            return incident_id

        with ThreadPoolExecutor(threads) as pool:
            return [i for i in pool.map(one, range(n)) if i]

    # -- what the logs say -------------------------------------------------------------------------
    def workers(self) -> list[processes.Process]:
        return [p for p in self.procs if p.cmd[3:4] == ["worker"]]

    def worker_logs(self) -> list[str]:
        return [p.log_text() for p in self.workers()]

    def received(self) -> int:
        """escalations.execute deliveries the workers received (each ETA task is received, then held)."""
        pattern = re.compile(r"Task escalations\.execute\[([0-9a-f-]+)\] received")
        return len({m.group(1) for text in self.worker_logs() for m in pattern.finditer(text)})

    def swept(self) -> tuple[int, int]:
        """(escalations the sweeps re-delivered overdue, escalations they handed over before due)."""
        logs = "".join(self.worker_logs())
        redelivered = sum(int(n) for n in re.findall(r"\[SWEEP\] re-delivered (\d+)", logs))
        handed = sum(int(n) for n in re.findall(r"\[SWEEP\] handed over (\d+)", logs))
        return redelivered, handed

    def picked_up(self) -> int:
        """Levels that batches took from other messages (models/engine.py: the late ones, and those
        due before their own message ran), from the task results the workers logged."""
        return sum(int(n) for n in re.findall(r"'picked up': (\d+)", "".join(self.worker_logs())))

    def terminated_tasks(self) -> frozenset[str]:
        """escalations.execute tasks a worker terminated itself on a broker connection loss (Celery's
        worker_cancel_long_running_tasks_on_connection_loss: "cannot be acknowledged after a
        connection loss ... Terminating it instead"): such a task may have committed its level and
        died before announcing it."""
        pattern = re.compile(
            r"Task escalations\.execute\[([0-9a-f-]+)\][^\n]*cannot be acknowledged after a connection loss"
        )
        return frozenset(m.group(1) for text in self.worker_logs() for m in pattern.finditer(text))

    def _unannounced_allowed(self) -> int:
        """Transactions (each a batch of levels) whose EXECUTING lines may be missing: one per pool
        process of each worker killed (on purpose or not: an unintended exit fails the scenario
        anyway), every pool process for each kill -9 of Postgres (a commit that took effect while its
        client saw the connection drop)."""

        def concurrency(proc: processes.Process) -> int:
            return int(proc.cmd[proc.cmd.index("--concurrency") + 1])

        by_name = {p.name: p for p in self.workers()}
        killed = sum(concurrency(by_name[e.name]) for e in self.supervisor.exits if e.name in by_name)
        return killed + self.postgres_kills * sum(concurrency(p) for p in by_name.values())

    # -- the verdict -------------------------------------------------------------------------------
    def check(
        self,
        *,
        minimum: dict[str, int] | None = None,
        same_pids: bool = False,
        extra_margin_s: float = 0.0,
        **kwargs,
    ) -> Figures:
        """The invariant checker on this stack's database, logs and policy file, with the bounds
        above (plus a scenario's own stated extra_margin_s, if any); then the minimum work the
        scenario states, and its processes (check_processes)."""
        self.backlog_used = max([self.wave_backlog(), *self.backlogs])
        self.bounds = {
            "handover_bound_s": round(handover_bound(self.backlog_used) + extra_margin_s, 1),
            "execution_bound_s": round(execution_bound(self.backlog_used) + extra_margin_s, 1),
        }
        figures = invariants.check(
            self.database_url,
            requests=self.api.records if self.api else [],
            logs=self.worker_logs(),
            outages=[(began, ended) for began, ended, _ in self.outages],
            unannounced_allowed=self._unannounced_allowed(),
            terminated_tasks=self.terminated_tasks(),
            policy_text=self.policy_file.read_text(),
            lateness_bound_s=self.bounds["execution_bound_s"],
            handover_bound_s=self.bounds["handover_bound_s"],
            **kwargs,
        )
        if minimum:
            figures.require(**minimum)
        self.check_processes(figures, same_pids=same_pids)
        return figures

    def check_processes(self, figures: Figures, same_pids: bool) -> None:
        """[6] No process exited unless the scenario killed it; every long-running process is alive
        now; with same_pids (broker faults), each is the very process that started; Flower answers."""
        with self.supervisor.lock:
            self.supervisor.poll()
            for exit_ in self.supervisor.unintended():
                figures.violate(f"[6] {exit_}")
            for proc in self.procs:
                if not proc.alive:
                    figures.violate(f"[6] {proc.name} is not running at the end of the scenario")
                elif same_pids and proc.process.pid != self.first_pids.get(proc.name):
                    figures.violate(
                        f"[6] {proc.name} is pid {proc.process.pid}, not the pid that started "
                        f"({self.first_pids.get(proc.name)}): it was replaced"
                    )
        self.same_pids = same_pids
        for proc in self.procs:
            if proc.cmd[3:4] == ["flower"] and proc.alive:
                self._check_flower(figures, proc)

    def _check_flower(self, figures: Figures, proc: processes.Process) -> None:
        """Flower still works through the broker: it refuses a request without its credentials, and
        with them lists every worker of the stack (an inspect round trip through the broker)."""
        base = f"http://127.0.0.1:{proc.port}"
        try:
            anonymous = requests.get(f"{base}/api/workers", timeout=10)
            if anonymous.status_code != 401:
                figures.violate(f"[6] Flower answered {anonymous.status_code} without credentials")
            names = [w.name for w in self.workers() if w.alive]
            seen: list[str] = []

            def lists_every_worker() -> bool:
                answer = requests.get(f"{base}/api/workers?refresh=1", auth=self.flower_auth, timeout=10)
                seen[:] = list(answer.json()) if answer.status_code == 200 else [f"HTTP {answer.status_code}"]
                return all(any(h.startswith(f"{n}-") for h in seen) for n in names)

            try:
                wait_until(lists_every_worker, 20, interval=1, what="Flower listing every worker")
            except TimeoutError:
                figures.violate(f"[6] Flower lists {seen}, not every worker of {names}")
        except requests.RequestException as exc:
            figures.violate(f"[6] Flower does not answer: {exc.__class__.__name__}: {exc}"[:300])

    def process_row(self) -> dict:
        """The report's process and bound figures: exits nobody asked for (must be 0), kills on
        purpose, the faults and the bounds they were judged by."""
        return {
            **getattr(self, "bounds", {}),
            "backlog": getattr(self, "backlog_used", None),
            "outages": [
                f"{what} ({(ended - began).total_seconds():.1f} s)" for began, ended, what in self.outages
            ],
            "process_exits": len(self.supervisor.unintended()),
            "killed_on_purpose": len(self.supervisor.intended()),
            "restarts": self.supervisor.restarts,
            "tasks_terminated_on_connection_loss": len(self.terminated_tasks()),
            "same_pids_required": self.same_pids,
            "processes": sorted({p.name for p in self.procs}),
            "exits": [str(e) for e in self.supervisor.exits],
        }


# Incidents created and escalated per second by Traffic during a broker fault.
TRAFFIC_RATE = 2.0


def held_minimum(held_ids: list[str], fault_s: float) -> dict[str, int]:
    """The work a held-ETA broker scenario must show: the held incidents and at least half of
    Traffic's ticks created and escalated; every held incident nobody resolved (Traffic resolves a
    quarter) ran both its levels."""
    least_traffic = int(TRAFFIC_RATE * fault_s / 2)
    return {
        "incidents": len(held_ids) + least_traffic,
        "escalated": len(held_ids) + least_traffic,
        "executed": 2 * (len(held_ids) - len(held_ids) // 4),
    }


@contextmanager
def burst(api: Api, n: int) -> Iterator[None]:
    """Create and escalate n incidents from 8 threads (every third one resolved at once); the body
    runs once a third of them are done (the fault), and the burst is finished when it returns."""

    def one(i: int) -> None:
        incident_id = api.create()
        if incident_id and api.act(incident_id, "escalate").status == 200 and i % 3 == 0:
            api.act(incident_id, "resolve")

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        while sum(f.done() for f in futures) < n // 3:
            time.sleep(0.05)
        yield
        for future in futures:
            future.result()


def burst_minimum(n: int) -> dict[str, int]:
    """Every create and escalate of a burst answers with the broker down (the sweep delivers later);
    the two thirds not resolved run their three levels."""
    return {"incidents": n, "escalated": n, "executed": 3 * (n - (n + 2) // 3)}


class Traffic:
    """Transitions that keep arriving through the API during a fault: `rate` times a second one
    incident is created and escalated (the stack's default policy); a third of them are resolved or
    acknowledged 0.5 to 10 s later (some while their levels are in flight, some after every level
    should have run, so that a lost level shows as CANCELLED past its deadline); and every fourth
    tick one of `resolvable` (incidents whose levels a worker holds) is resolved. Runs in a thread
    between start and stop; a resolve not yet due at stop is dropped (its incident escalates on)."""

    def __init__(self, api: Api, rate: float = 4.0, resolvable: list[str] = (), seed: int = 0):
        self.api = api
        self.rate = rate
        self.resolvable = list(resolvable)
        self.rng = random.Random(seed)
        self.created: list[str] = []
        self.escalated = 0
        self.resolved_held = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(8)
        self._timers: list[threading.Timer] = []
        self._thread = threading.Thread(target=self._run, daemon=True, name="traffic")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)
        with self._lock:
            timers = list(self._timers)
        for timer in timers:
            timer.cancel()
            if timer.is_alive():
                timer.join()

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(1 / self.rate):
            tick += 1
            leave_after = self.rng.uniform(0.5, 10) if self.rng.random() < 1 / 3 else None
            self._pool.submit(self._one, leave_after, self.rng.choice(["resolve", "acknowledge"]))
            if tick % 4 == 0 and self.resolvable:
                held = self.resolvable.pop(self.rng.randrange(len(self.resolvable)))
                self._pool.submit(self._resolve_held, held)

    def _one(self, leave_after: float | None, action: str) -> None:
        incident_id = self.api.create()
        if incident_id is None:
            return
        with self._lock:
            self.created.append(incident_id)
        if self.api.act(incident_id, "escalate").status != 200:
            return
        with self._lock:
            self.escalated += 1
            if leave_after is not None and not self._stop.is_set():
                timer = threading.Timer(leave_after, self.api.act, (incident_id, action))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()

    def _resolve_held(self, incident_id: str) -> None:
        if self.api.act(incident_id, "resolve").status == 200:
            with self._lock:
                self.resolved_held += 1


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


def verdict(scenario: str, broken: str, figures: Figures, stack: Stack | None = None, **extra) -> None:
    """Record the row (with the stack's process figures), then fail the test on any violation (with
    every violation listed)."""
    if stack is not None:
        extra = {**stack.process_row(), **extra}
    record(scenario, broken, figures, **extra)
    print(f"\n[{scenario}] {figures.summary()} {extra}")
    assert figures.ok, figures.summary()
