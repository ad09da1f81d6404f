"""Load generators: wrk (from the OS packages) or, where it is missing, an asyncio client; pgbench.

Each returns one dict: requests, rps, latency p50/p95/p99/max in ms, errors (non-2xx, socket).
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from bench.common import ID_PREFIX, TENANT, percentile, seq_id, seq_id_sql
from tests.support.servers import find_binary

HERE = Path(__file__).resolve().parent

WRK_SCRIPT = r"""
local mode, n, token
local body = '{"title": "checkout is down", "severity": "high"}'
function init(args)
  mode = args[1]
  n = tonumber(args[2])
  token = args[3]
end
function request()
  local headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
  if mode == "create" then
    return wrk.format("POST", "/incidents", headers, body)
  end
  local path = string.format("/incidents/%s%012x/%s", "ID_PREFIX", n, mode)
  n = n + 1
  return wrk.format("POST", path, headers, "")
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50": %d, "p95": %d, "p99": %d, "max": %d, ' ..
    '"non2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, e.status, e.connect + e.read + e.write + e.timeout))
end
""".replace("ID_PREFIX", ID_PREFIX)


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def ensure_wrk() -> str | None:
    """wrk if installed; as root, install it from the OS packages first (apt-get)."""
    if wrk_binary() or os.geteuid() != 0 or not shutil.which("apt-get"):
        return wrk_binary()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return wrk_binary()


def http_load(
    base_url: str, mode: str, token: str, connections: int, duration: float, start: int = 0
) -> dict:
    """POST /incidents (mode 'create') or /incidents/{seq_id(n)}/{mode} for n = start, start+1, ..."""
    if wrk_binary():
        return _wrk(base_url, mode, token, connections, duration, start)
    return asyncio.run(_async_load(base_url, mode, token, connections, duration, start))


def _wrk(base_url, mode, token, connections, duration, start) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_SCRIPT)
    try:
        # One wrk thread: it needs a fraction of a core, and there are two on this machine.
        cmd = [wrk_binary(), "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s"]
        cmd += ["-s", fh.name, base_url, "--", mode, str(start), token]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    finally:
        os.unlink(fh.name)
    match = re.search(r"BENCH_JSON (\{.*\})", done.stdout)
    if not match:
        raise RuntimeError(f"wrk failed: {done.stdout}\n{done.stderr}")
    raw = json.loads(match.group(1))
    seconds = raw["duration_us"] / 1e6
    return {
        "tool": "wrk",
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds,
        "p50": raw["p50"] / 1000,
        "p95": raw["p95"] / 1000,
        "p99": raw["p99"] / 1000,
        "max": raw["max"] / 1000,
        "errors": raw["non2xx"] + raw["socket_errors"],
    }


async def _async_load(base_url, mode, token, connections, duration, start) -> dict:
    """The fallback: keep-alive HTTP/1.1 over asyncio streams, one coroutine per connection."""
    parts = urlsplit(base_url)
    counter = iter(range(start, 1 << 40))
    latencies: list[float] = []
    errors = 0
    body = b'{"title": "checkout is down", "severity": "high"}'
    deadline = time.perf_counter() + duration

    def request() -> bytes:
        if mode == "create":
            path, payload = "/incidents", body
        else:
            path, payload = f"/incidents/{seq_id(next(counter))}/{mode}", b""
        return _post(parts.netloc, token, path, payload)

    async def connection():
        nonlocal errors
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            ok, _body = await _exchange(reader, writer, request())
            latencies.append(time.perf_counter() - sent)
            errors += not ok
        writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    seconds = time.perf_counter() - began
    ms = [x * 1000 for x in latencies]
    return {
        "tool": "python-asyncio",
        "requests": len(ms),
        "rps": len(ms) / seconds,
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms),
        "errors": errors,
    }


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes):
    """One request on a kept-alive HTTP/1.1 connection: (2xx?, the response body)."""
    writer.write(request)
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    body = await reader.readexactly(length)
    return status_line.split(b" ")[1].startswith(b"2"), body


def _post(netloc: str, token: str, path: str, payload: bytes = b"") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def create_incidents(base_url: str, token: str, count: int, connections: int = 8) -> list[str]:
    """POST /incidents `count` times over `connections` kept-alive connections; the new ids."""

    async def run() -> list[str]:
        parts, todo, ids = urlsplit(base_url), iter(range(count)), []
        payload = b'{"title": "checkout is down", "severity": "high"}'

        async def connection():
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            for _ in todo:
                ok, body = await _exchange(reader, writer, _post(parts.netloc, token, "/incidents", payload))
                if not ok:
                    raise RuntimeError(f"POST /incidents failed: {body[:200]!r}")
                ids.append(json.loads(body)["id"])
            writer.close()

        await asyncio.gather(*(connection() for _ in range(connections)))
        return ids

    return asyncio.run(run())


def paced_posts(base_url: str, token: str, paths: list[str], rate: float, connections: int = 32) -> dict:
    """POST each path (no body) at a steady `rate` per second, open loop: the n-th is due n / rate s
    after the first and goes out on the first free connection. Says how the schedule was kept (the
    most a request went out behind it) beside the latencies."""

    async def run() -> dict:
        parts, queue = urlsplit(base_url), asyncio.Queue()
        latencies, behind, errors = [], [], 0
        began = time.perf_counter()

        async def connection():
            nonlocal errors
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            while (item := await queue.get()) is not None:
                due, path = item
                sent = time.perf_counter()
                behind.append(sent - due)
                ok, _body = await _exchange(reader, writer, _post(parts.netloc, token, path))
                latencies.append(time.perf_counter() - sent)
                errors += not ok
            writer.close()

        workers = [asyncio.create_task(connection()) for _ in range(connections)]
        for n, path in enumerate(paths):
            due = began + n / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            queue.put_nowait((due, path))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        ms = [x * 1000 for x in latencies]
        return {
            "requests": len(ms),
            "rps": len(ms) / (time.perf_counter() - began),
            "p50": percentile(ms, 50),
            "p99": percentile(ms, 99),
            "max": max(ms, default=float("nan")),
            "behind_max_ms": 1000 * max(behind, default=0.0),
            "errors": errors,
        }

    return asyncio.run(run())


def pgbench_binary() -> str | None:
    return find_binary("pgbench")


def pgbench(
    database_url: str, script: str, clients: int, duration: float, start: int, fill: dict[str, str]
) -> dict:
    """Run bench/pgbench/<script>.sql (simple protocol, like psycopg2) and read its per-transaction log."""
    text = (HERE / "pgbench" / f"{script}.sql").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    text = Template(text).substitute(tenant=TENANT, id=seq_id_sql(":n"), **fill)
    url = urlsplit(database_url)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{script}.sql"
        path.write_text(text + "\n")
        cmd = [pgbench_binary(), "-n", "-M", "simple", "-c", str(clients), "-j", "1"]
        cmd += ["-T", str(max(1, round(duration))), "-f", str(path), "-l", "--log-prefix", f"{tmp}/log"]
        cmd += ["-D", f"start={start}", "-D", "k=0", "-D", f"nclients={clients}"]
        cmd += ["-h", url.hostname or "127.0.0.1", "-p", str(url.port or 5432)]
        cmd += ["-U", url.username or "postgres", url.path.lstrip("/")]
        env = {**os.environ}
        if url.password:
            env["PGPASSWORD"] = url.password
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed: {done.stdout}\n{done.stderr}")
        ms = []
        for log in glob.glob(f"{tmp}/log*"):
            with open(log) as fh:
                ms.extend(int(line.split()[2]) / 1000 for line in fh if line.strip())
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    return {
        "tool": "pgbench",
        "requests": len(ms),
        "rps": float(tps.group(1)) if tps else len(ms) / duration,
        "p50": percentile(ms, 50),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else float("nan"),
        "errors": int(failed.group(1)) if failed else 0,
    }
