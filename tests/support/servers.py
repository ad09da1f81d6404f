"""Private PostgreSQL and Redis servers, and the `ensure` step of `make run` / `make test`.

Fault tests break servers, so they start their own here (installed binaries, a temporary directory,
a free port) and never touch the machine's shared ones. `python -m tests.support.servers ensure`
checks that DATABASE_URL and REDIS_URL answer; where one does not but its server binaries exist it
starts a private instance under .run/, and writes the URLs to use to .run/env.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/incidents"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and these machines run as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster: start, and stop (fast or kill -9) and start again on the same port."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> PostgresServer:
        initdb, postgres = find_binary("initdb"), find_binary("postgres")
        if not (initdb and postgres):
            raise RuntimeError("PostgreSQL server binaries not found: install postgresql")
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
            # pytest's temporary directories are 0700 root: let the postgres user pass through.
            for parent in self.directory.parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        if not (self.directory / "PG_VERSION").exists():
            subprocess.run(
                _as_postgres_user(
                    [initdb, "-D", str(self.directory), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
                ),
                check=True,
                capture_output=True,
            )
        return self

    def start(self) -> PostgresServer:
        postgres = find_binary("postgres")
        log = open(self.directory.parent / f"{self.directory.name}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            _as_postgres_user(
                [
                    postgres,
                    "-D",
                    str(self.directory),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.directory),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                ]
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the child keeps its copy; ours would leak (a ResourceWarning, an error here)
        wait_until(self._ready, 30, what=f"postgres on port {self.port}")
        return self

    def _ready(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(self.url, connect_timeout=1).close()
            return True
        except psycopg2.OperationalError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        if kill:
            # runuser forwards nothing on SIGKILL: kill the whole session (postmaster included).
            os.killpg(self.process.pid, 9)
        else:
            os.killpg(self.process.pid, 2)  # SIGINT: fast shutdown
        self.process.wait(30)
        if kill:
            # A killed postmaster leaves its children to notice; wait for the port to close.
            wait_until(lambda: not port_open("127.0.0.1", self.port, 0.2), 30, what="postgres down")
        self.process = None


@dataclass
class RedisServer:
    """A private Redis that keeps nothing on disk, like the machine's."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        server = find_binary("redis-server")
        if not server:
            raise RuntimeError("redis-server not found: install redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until(lambda: port_open("127.0.0.1", self.port, 0.2), 10, what="redis")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        self.process.send_signal(9 if kill else 15)
        self.process.wait(10)
        self.process = None

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()


def with_database(url: str, name: str) -> str:
    """The same server URL with another database name."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database(server_url: str, name: str) -> None:
    """CREATE DATABASE unless it exists."""
    import psycopg2

    conn = psycopg2.connect(with_database(server_url, "postgres"), connect_timeout=3)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def drop_database(server_url: str, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(with_database(server_url, "postgres"), connect_timeout=3)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def _postgres_answers(url: str) -> bool:
    import psycopg2

    try:
        psycopg2.connect(with_database(url, "postgres"), connect_timeout=2).close()
        return True
    except psycopg2.OperationalError:
        return False


def ensure(run_dir: Path) -> dict[str, str]:
    """Make sure a Postgres and a Redis answer; start private ones under run_dir if needed."""
    database_url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    database_url = database_url.replace("postgres://", "postgresql://", 1)
    db_name = urlsplit(database_url).path.lstrip("/") or "incidents"

    if not _postgres_answers(database_url):
        if not (find_binary("initdb") and find_binary("postgres")):
            sys.exit(f"PostgreSQL does not answer at {database_url} and is not installed: install postgresql")
        server = PostgresServer(run_dir / "postgres", port=int(os.environ.get("PRIVATE_PG_PORT", 55432)))
        if not port_open("127.0.0.1", server.port):
            print(f"starting a private PostgreSQL on port {server.port} (data in {server.directory})")
            server.init()
            server.start()
            server.process = None  # leave it running for the next command
        database_url = with_database(server.url, db_name)

    parts = urlsplit(redis_url)
    if not port_open(parts.hostname or "127.0.0.1", parts.port or 6379):
        if not find_binary("redis-server"):
            sys.exit(f"Redis does not answer at {redis_url} and is not installed: install redis-server")
        server = RedisServer(run_dir / "redis", port=int(os.environ.get("PRIVATE_REDIS_PORT", 56379)))
        if not port_open("127.0.0.1", server.port):
            print(f"starting a private Redis on port {server.port}")
            server.start()
            server.process = None
        redis_url = server.url

    create_database(database_url, db_name)
    return {"DATABASE_URL": database_url, "REDIS_URL": redis_url}


def main(argv: list[str]) -> None:
    if argv[1:2] != ["ensure"]:
        sys.exit("usage: python -m tests.support.servers ensure")
    run_dir = Path(os.environ.get("RUN_DIR") or PROJECT_ROOT / ".run")
    run_dir.mkdir(parents=True, exist_ok=True)
    env = ensure(run_dir)
    (run_dir / "env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    for key, value in env.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main(sys.argv)
