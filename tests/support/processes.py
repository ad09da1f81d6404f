"""Real processes for tests: a Celery worker (optionally with beat), gunicorn, beat alone.

Each helper starts the process in its own session so that a test can kill -9 it and everything it
forked, and waits until it is ready.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.servers import PROJECT_ROOT, free_port, port_open, wait_until

BIN = Path(sys.executable).parent


def procfile(path: Path = PROJECT_ROOT / "Procfile") -> dict[str, str]:
    """A Procfile's process types and their commands."""
    lines = path.read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line and not line.startswith("#"))


def procfile_env(process: str) -> dict[str, str]:
    """The variables the Procfile's command for `process` sets before its program
    (`REMAP_SIGTERM=SIGQUIT celery ...`): the helpers below start the same program with them."""
    words = procfile()[process].split()
    assignments = itertools.takewhile(lambda word: re.fullmatch(r"[A-Z_]+=\S*", word), words)
    return dict(word.split("=", 1) for word in assignments)


@dataclass
class Process:
    """A started process and its log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    ready_text: str | None = None
    port: int | None = None
    cwd: Path = PROJECT_ROOT
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = 60) -> Process:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open by the child
        self.process = subprocess.Popen(
            self.cmd,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if self.ready_text:
            wait_until(self._logged_ready, timeout, interval=0.1, what=f"{self.name} ready")
        if self.port:
            wait_until(lambda: port_open("127.0.0.1", self.port, 0.2), timeout, what=f"{self.name} port")
        return self

    def _logged_ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            return self.ready_text.encode() in fh.read()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9 the process and everything in its session (prefork children included)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.process = None

    def stop(self, timeout: float = 20) -> None:
        """Ask politely (SIGTERM: a Celery warm shutdown), then kill -9."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        self.kill()


TEST_SOFT_SHUTDOWN_S = "2"


def worker(
    env: dict[str, str],
    log_dir: Path,
    *,
    name: str = "worker",
    beat: bool = False,
    concurrency: int = 2,
    app: str = "tasks.app:celery_app",
) -> Process:
    """A real Celery worker on env's queue; with beat=True it also runs the sweep schedule."""
    cmd = [
        str(BIN / "celery"),
        "-A",
        app,
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "--hostname",
        f"{name}-{os.getpid()}-{free_port()}@%h",
        "--without-gossip",
        "--without-mingle",
        "-Q",
        env["CELERY_QUEUE"],
    ]
    if beat:
        cmd += ["--beat", "--scheduler", "celery.beat:Scheduler"]
    # Tests stop their workers at every teardown, often with a task running: production's soft
    # shutdown (12 s) would be waited out each time. A scenario about shutting down sets its own.
    env = {**procfile_env("worker"), "WORKER_SOFT_SHUTDOWN_TIMEOUT": TEST_SOFT_SHUTDOWN_S, **env}
    return Process(name, cmd, env, log_dir / f"{name}.log", ready_text="ready.")


def beat(env: dict[str, str], log_dir: Path, *, name: str = "beat") -> Process:
    """celery beat alone (the Procfile's beat process)."""
    cmd = [
        str(BIN / "celery"),
        "-A",
        "tasks.app:celery_app",
        "--quiet",  # as the Procfile's: its banner is printed, not logged
        "beat",
        "--loglevel",
        "INFO",
        "--scheduler",
        "celery.beat:Scheduler",
    ]
    return Process(name, cmd, env, log_dir / f"{name}.log", ready_text="beat: Starting")


def web(
    env: dict[str, str],
    log_dir: Path,
    *,
    name: str = "web",
    workers: int = 2,
    threads: int = 4,
    app: str = "api:create_app()",
) -> Process:
    """gunicorn serving `app` on a free port (the Procfile's web process)."""
    port = free_port()
    cmd = [
        str(BIN / "gunicorn"),
        app,
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--graceful-timeout",
        "5",
        "--access-logfile",
        "-",
        "--logger-class",
        "api.logs.Gunicorn",
        "--config",
        "python:api.gunicorn_config",
    ]
    return Process(name, cmd, env, log_dir / f"{name}.log", port=port)


def flower(
    env: dict[str, str],
    log_dir: Path,
    *,
    name: str = "flower",
    basic_auth: str = "faults:faults",
    app: str = "tasks.app:celery_app",
) -> Process:
    """Flower on a free port (the Procfile's flower process), with FLOWER_BASIC_AUTH in its
    environment as the Procfile requires; ready when its port answers."""
    port = free_port()
    cmd = [str(BIN / "celery"), "-A", app, "flower", f"--port={port}", "--address=127.0.0.1"]
    return Process(name, cmd, {**env, "FLOWER_BASIC_AUTH": basic_auth}, log_dir / f"{name}.log", port=port)
