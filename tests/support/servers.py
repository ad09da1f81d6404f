"""Private PostgreSQL, Redis and RabbitMQ servers, and the `ensure` step of `make run` / `make test`.

Fault tests break servers, so they start their own here (installed binaries, a temporary directory,
a free port) and never touch the machine's shared ones. `python -m tests.support.servers ensure`
checks that DATABASE_URL and REDIS_URL answer; where one does not but its server binaries exist it
starts a private instance under .run/, and writes the URLs to use to .run/env.

RabbitMQ: tests that only use a broker get a vhost of their own on the machine's RabbitMQ
(`rabbitmq_for_tests`); tests that break the broker start a private node (`RabbitMQServer`).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATABASE_URL = "postgresql://127.0.0.1:5432/incidents"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"


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


def api_session(headers: dict[str, str], base: str):
    """A requests session for a test's own gunicorn: `session.base` is its URL. A connection per
    request: gunicorn closes a kept-alive connection after 2 s idle, and a request sent on it as it
    closes fails with RemoteDisconnected (between two tests, say), which is no fault of the API."""
    import requests

    session = requests.Session()
    session.headers.update({**headers, "Connection": "close"})
    session.base = base
    return session


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


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate (its own CA, as a managed Redis's is) and its private key."""

    cert: Path
    key: Path


def make_certificate(directory: Path, name: str = "server") -> Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, valid for two days, made with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    made = Certificate(directory / f"{name}.crt", directory / f"{name}.key")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(made.key), "-out", str(made.cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return made


def _as_postgres_user(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and these machines run as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster: start, and stop (fast or kill -9) and start again on the same port.

    With `ssl`, it serves TLS with that certificate and refuses TCP connections without it, as a
    managed Postgres does; its URL then says sslmode=require."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    ssl: Certificate | None = None

    @property
    def url(self) -> str:
        query = "?sslmode=require" if self.ssl else ""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres{query}"

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
        if self.ssl:
            self._serve_tls_only()
        return self

    def _serve_tls_only(self) -> None:
        # The server reads its key only when the postgres user owns it and nobody else can read it.
        for source, name in ((self.ssl.cert, "server.crt"), (self.ssl.key, "server.key")):
            target = self.directory / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if os.geteuid() == 0:
                shutil.chown(target, "postgres", "postgres")
        (self.directory / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
        )
        with open(self.directory / "postgresql.conf", "a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")

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
    """A private Redis that keeps nothing on disk, like the machine's; `durable`, one that keeps its
    data across a restart as a production one does (an append-only file, fsynced every second and
    on a graceful shutdown, read back at start). With `tls` and `password`, one as a PaaS hands it
    over: TLS only, with that certificate, and a password (a rediss:// URL)."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    durable: bool = False
    tls: Certificate | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        credentials = f":{self.password}@" if self.password else ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}/0"

    def _server_options(self) -> list[str]:
        options = ["--port", str(self.port)]
        if self.tls:
            options = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            options += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            options += ["--tls-ca-cert-file", str(self.tls.cert)]
        if self.password:
            options += ["--requirepass", self.password]
        return options

    def start(self) -> RedisServer:
        server = find_binary("redis-server")
        if not server:
            raise RuntimeError("redis-server not found: install redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                server,
                *self._server_options(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "everysec",
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
        if self.durable:
            # Answering is not enough: Redis refuses commands while it loads its file (LOADING).
            wait_until(self._loaded, 10, interval=0.1, what="redis loaded its data")
        return self

    def _loaded(self) -> bool:
        import redis

        trust = {"ssl_ca_certs": str(self.tls.cert)} if self.tls else {}
        client = redis.Redis.from_url(self.url, socket_timeout=1, **trust)
        try:
            return client.ping()
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self, kill: bool = False) -> None:
        if self.process is None:
            return
        self.process.send_signal(9 if kill else 15)
        self.process.wait(10)
        self.process = None

    def restart(self, graceful: bool = False) -> None:
        """kill -9 and start again; `graceful`: SHUTDOWN as an operator's restart does it (SIGTERM,
        so a durable server flushes its file first)."""
        self.stop(kill=not graceful)
        self.start()


# Debian's /usr/sbin/rabbitmq-server and rabbitmqctl are wrappers that run the real scripts as the
# rabbitmq user, with its HOME and so its Erlang cookie: right for the machine's node, wrong for a
# private one. The real scripts are here (elsewhere, e.g. a generic Unix install, they are on PATH).
RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_script(name: str) -> str | None:
    """The RabbitMQ script itself (rabbitmq-server, rabbitmqctl), not the distribution's su wrapper."""
    if (RABBITMQ_SCRIPTS / name).exists():
        return str(RABBITMQ_SCRIPTS / name)
    return shutil.which(name)


def with_vhost(url: str, vhost: str) -> str:
    """The same amqp:// URL with another vhost ('/' is written %2F, as kombu reads it)."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def epmd_names(port: int | None = None) -> list[str]:
    """The node names registered with epmd (Erlang's port mapper), [] when no epmd answers."""
    try:
        with socket.create_connection(
            ("127.0.0.1", port or int(os.environ.get("ERL_EPMD_PORT", 4369))), 1
        ) as s:
            s.sendall(b"\x00\x01n")  # NAMES_REQ
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return []
    return re.findall(r"^name (\S+) at port", data[4:].decode(errors="replace"), re.M)


@dataclass
class RabbitMQServer:
    """A private RabbitMQ node: its own node name, ports, data, logs, config and Erlang cookie under
    `directory`, no plugins. kill -9 and start again keep its data (durable queues, persistent
    messages), as a restarted production broker does.

    `settings` are extra settings of the `rabbit` application, as Erlang terms: {"consumer_timeout":
    "5000"}. It runs as the current user: the package's wrapper would switch to the rabbitmq user,
    who cannot read a test's directory. Started in about 5 s on a 2-core machine, most of it the
    Erlang VM loading every module of RabbitMQ's applications (once to collect the boot steps, once
    more at "Upgrading Mnesia schema"); the config format and a cached code path change nothing.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    settings: dict[str, str] = field(default_factory=dict)
    name: str = field(default_factory=lambda: f"tests-{os.getpid()}-{free_port()}")
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def nodename(self) -> str:
        return f"{self.name}@localhost"

    @property
    def url(self) -> str:
        """The default vhost, as user guest (allowed from 127.0.0.1 only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def env(self) -> dict[str, str]:
        """The environment of the node and of rabbitmqctl for it (the same HOME: the same cookie)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **env,
            "HOME": str(self.directory / "home"),
            # None (this file is never written), not the machine's: that one names the machine's node.
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "no-rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            # exec the VM instead of running it under a shell that traps signals: the process we
            # start is the node itself, so kill -9 kills it and wait() reaps it (no orphans). Its
            # Erlang shell reads a pipe nobody writes to.
            "RABBITMQ_ALLOW_INPUT": "1",
        }

    def _write_files(self) -> None:
        home = self.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(uuid.uuid4().hex.upper())
            cookie.chmod(0o400)
        (self.directory / "enabled_plugins").write_text("[].\n")
        settings = "".join(f", {{{key}, {value}}}" for key, value in self.settings.items())
        (self.directory / "rabbitmq.config").write_text(
            f"[{{rabbit, [{{log, [{{console, [{{enabled, false}}]}}]}}{settings}]}}].\n"
        )

    def start(self, wait: bool = True) -> RabbitMQServer:
        server = rabbitmq_script("rabbitmq-server")
        if not server:
            raise RuntimeError("rabbitmq-server not found: install rabbitmq-server")
        self._write_files()
        log = open(self.directory / "server.log", "ab")  # noqa: SIM115 - the child keeps its copy
        self.process = subprocess.Popen(
            [server],
            env=self.env(),
            cwd=self.directory,
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> RabbitMQServer:
        """The AMQP listener opens last in RabbitMQ's boot: once it accepts, the node serves."""

        def ready() -> bool:
            if self.process.poll() is not None:
                log = (self.directory / "server.log").read_text(errors="replace")
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}:\n{log[-3000:]}")
            return port_open("127.0.0.1", self.port, 0.2)

        wait_until(ready, timeout, interval=0.05, what=f"rabbitmq on port {self.port}")
        return self

    def stop(self, kill: bool = False) -> None:
        """SIGTERM: RabbitMQ's graceful shutdown; kill=True: kill -9 (queues recover from disk)."""
        if self.process is None:
            return
        if kill:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.terminate()
        self.process.wait(60)
        self.process.stdin.close()
        self.process = None
        # epmd forgets a node when its connection closes; starting again before that fails with
        # "name ... seems to be in use".
        wait_until(lambda: self.name not in epmd_names(), 10, what=f"epmd to forget {self.nodename}")

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node; its output."""
        result = subprocess.run(
            [rabbitmq_script("rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
        return result.stdout

    def queues(self, vhost: str = "/") -> dict[str, tuple[int, int]]:
        """{queue: (messages ready, messages delivered and not yet acknowledged)}."""
        out = self.ctl(
            "list_queues",
            "-p",
            vhost,
            "--quiet",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        )
        rows = [line.split("\t") for line in out.splitlines() if line.strip()]
        return {name: (int(ready), int(unacked)) for name, ready, unacked in rows}


def amqp_answers(url: str, timeout: float = 3.0) -> bool:
    """Can guest log in to this vhost (an AMQP handshake, not just an open port)?"""
    import kombu

    try:
        with kombu.Connection(url, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means no
        return False


@dataclass
class SharedVhost:
    """A vhost of the tests' own on the machine's RabbitMQ, made with its rabbitmqctl (the package's
    wrapper, which runs as the rabbitmq user with the node's cookie) and deleted afterwards. The
    tests never restart or reconfigure that node; they only add and delete their vhost."""

    base_url: str
    name: str = field(default_factory=lambda: f"incidents-test-{os.getpid()}-{uuid.uuid4().hex[:6]}")

    PREFIX: ClassVar[str] = "incidents-test-"

    @property
    def url(self) -> str:
        return with_vhost(self.base_url, self.name)

    @staticmethod
    def ctl(*args: str) -> str:
        ctl = shutil.which("rabbitmqctl") or rabbitmq_script("rabbitmqctl")
        if not ctl:
            raise RuntimeError("rabbitmqctl not found")
        result = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {(result.stderr or result.stdout).strip()}")
        return result.stdout

    def create(self) -> SharedVhost:
        # Vhosts left by test sessions that were killed before their clean-up (their pid is gone).
        for vhost in self.ctl("list_vhosts", "--quiet", "--no-table-headers").split():
            pid = vhost[len(self.PREFIX) :].split("-")[0]
            if vhost.startswith(self.PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                self.ctl("delete_vhost", vhost)
        self.ctl("add_vhost", self.name)
        user = urlsplit(self.base_url).username or "guest"
        self.ctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        self.ctl("delete_vhost", self.name)


@contextmanager
def rabbitmq_for_tests(directory: Path, base_url: str | None = None):
    """Yield the amqp:// URL of a RabbitMQ vhost of the caller's own: a new vhost on the RabbitMQ at
    base_url (RABBITMQ_URL, else 127.0.0.1:5672 as guest), deleted afterwards; when none answers
    there (or no vhost can be made on it), the default vhost of a private node, stopped afterwards."""
    base_url = base_url or os.environ.get("RABBITMQ_URL") or DEFAULT_RABBITMQ_URL
    parts = urlsplit(base_url)
    if port_open(parts.hostname or "127.0.0.1", parts.port or 5672):
        vhost = SharedVhost(base_url)
        try:
            vhost.create()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            print(
                f"no vhost of our own on the RabbitMQ at {parts.hostname}:{parts.port} ({exc}); a private one"
            )
        else:
            try:
                if not amqp_answers(vhost.url):
                    raise RuntimeError(f"guest cannot use the new vhost at {vhost.url}")
                yield vhost.url
            finally:
                vhost.delete()
            return
    server = RabbitMQServer(directory).start()
    try:
        yield server.url
    finally:
        server.stop(kill=True)


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
