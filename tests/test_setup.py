"""The set-up `make run` and `make test` rely on, and the Procfile's processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.processes import procfile
from tests.support.servers import PROJECT_ROOT, free_port, port_open, wait_until


def test_procfile_has_every_process():
    assert set(procfile()) == {"release", "web", "worker", "notifier", "beat", "flower"}
    # Deliveries have a queue and a process of their own: a hung webhook never holds up a level.
    assert "-Q ${CELERY_QUEUE:-escalations}" in procfile()["worker"]
    assert "-Q ${CELERY_NOTIFY_QUEUE:-notifications}" in procfile()["notifier"]
    assert "alembic" in procfile()["release"] and "upgrade head" in procfile()["release"]
    assert "$PORT" in procfile()["web"] or "${PORT" in procfile()["web"]


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return {**env, **extra}


def test_flower_refuses_to_start_without_basic_auth():
    result = subprocess.run(
        ["sh", "-c", procfile()["flower"]],
        env=_env(),
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "FLOWER_PASSWORD" in result.stderr and "FLOWER_BASIC_AUTH" in result.stderr


def test_flower_starts_with_basic_auth_and_asks_for_it(worker):
    port = free_port()
    proc = subprocess.Popen(
        ["sh", "-c", procfile()["flower"]],
        env=_env(FLOWER_USER="ops", FLOWER_PASSWORD="secret", FLOWER_PORT=str(port)),
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 60, what="flower")
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/api/workers", timeout=10).status_code == 401
        assert requests.get(f"{base}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
        assert requests.get(f"{base}/", auth=("ops", "secret"), timeout=10).status_code == 200
        assert requests.get(f"{base}/api/workers", auth=("ops", "secret"), timeout=10).status_code == 200
        assert requests.get(f"{base}/healthcheck", timeout=10).text == "OK"
        # The password is in Flower's environment (readable by its user only), not its command
        # line (readable by every local user, and shown by ps).
        command_line = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert b"flower" in command_line and b"secret" not in command_line
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(10)


@pytest.mark.skipif(os.geteuid() == 0 and not Path("/usr/sbin/runuser").exists(), reason="needs runuser")
def test_ensure_starts_private_servers_when_none_answer(tmp_path):
    """Nothing answers at DATABASE_URL/REDIS_URL: `ensure` starts a private Postgres and Redis."""
    pg_port, redis_port = free_port(), free_port()
    env = _env(
        DATABASE_URL=f"postgresql://127.0.0.1:{free_port()}/incidents_private",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        PRIVATE_PG_PORT=str(pg_port),
        PRIVATE_REDIS_PORT=str(redis_port),
        RUN_DIR=str(tmp_path),
    )
    try:
        for _ in range(2):  # idempotent: the second run finds them running
            result = subprocess.run(
                [sys.executable, "-m", "tests.support.servers", "ensure"],
                env=env,
                cwd=PROJECT_ROOT,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert result.returncode == 0, result.stderr
        written = (tmp_path / "env").read_text()
        assert f"DATABASE_URL=postgresql://postgres@127.0.0.1:{pg_port}/incidents_private" in written
        assert f"REDIS_URL=redis://127.0.0.1:{redis_port}/0" in written
        import psycopg2

        psycopg2.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/incidents_private").close()
        assert port_open("127.0.0.1", redis_port)
    finally:
        subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], capture_output=True)
        pid_file = tmp_path / "postgres" / "postmaster.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text().split()[0]), 2)
            deadline = time.monotonic() + 30
            while port_open("127.0.0.1", pg_port) and time.monotonic() < deadline:
                time.sleep(0.1)
