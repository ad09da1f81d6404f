"""What a PaaS does with the repository (issue 13). Heroku's Python buildpack, and Scalingo's and
Dokku's after it, finds the app by its requirements.txt, installs Python from .python-version, runs
`pip install -r requirements.txt` in a fresh virtualenv, runs the Procfile's `release` and starts its
processes. The buildpack files must agree with setup.cfg and constraints.txt, and the app installed
that way, and nothing else, must run every process."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import psycopg2
import pytest
import requests
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import SERVER_URL, TEST_DB
from tests.support import servers
from tests.support.processes import Process, procfile, procfile_env
from tests.support.servers import PROJECT_ROOT, free_port
from tests.support.waiting import eventually

# Heroku's run-time environment is the app's config vars and little else: the processes get these
# (and PATH to the virtualenv), not the test session's environment.
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def requirement_lines(path: Path) -> list[str]:
    """The lines of a requirements file that say something (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def pins() -> dict[str, str]:
    """constraints.txt: canonical name -> the exact version tested."""
    pinned = {}
    for line in requirement_lines(PROJECT_ROOT / "constraints.txt"):
        name, _, version = line.partition("==")
        assert version, f"constraints.txt: {line!r} is not an exact pin"
        pinned[canonicalize_name(name)] = version
    return pinned


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(PROJECT_ROOT / "setup.cfg")
    return cfg


def test_requirements_install_the_project_at_the_tested_pins():
    """requirements.txt installs the project (setup.cfg's ranges) under constraints.txt's pins, each
    pin inside its range, and each pin the version this test session runs with: what deploys is
    what was tested. A pin or a range changed on its own fails here."""
    # Nothing listed twice: the dependencies are setup.cfg's, their versions constraints.txt's.
    assert requirement_lines(PROJECT_ROOT / "requirements.txt") == ["-c constraints.txt", "."]
    pinned = pins()
    for line in setup_cfg()["options"]["install_requires"].strip().splitlines():
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"setup.cfg requires {line!r}; constraints.txt pins no version of it"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside setup.cfg's {line!r}"
        )
    for name, version in pinned.items():
        assert metadata.version(name) == version, (
            f"constraints.txt pins {name}=={version}; the tests ran with {metadata.version(name)} "
            "(reinstall: make install)"
        )


def test_python_version_is_the_tested_one():
    """.python-version names the minor version the tests run on, inside setup.cfg's python_requires
    (the buildpack installs the newest patch release of it)."""
    wanted = (PROJECT_ROOT / ".python-version").read_text().strip()
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert wanted == running, f".python-version says {wanted}; the tests run on {running}"
    assert SpecifierSet(setup_cfg()["options"]["python_requires"]).contains(f"{wanted}.0")


def test_app_json_matches_the_procfile():
    """app.json's formation is the Procfile's processes (exactly one beat, Flower off: it is not
    routed), its add-ons the Postgres and Redis the processes read, and Flower's password is made at
    creation (the Procfile's flower refuses to start without one)."""
    manifest = json.loads((PROJECT_ROOT / "app.json").read_text())
    processes = set(procfile()) - {"release"}
    assert set(manifest["formation"]) == processes
    quantities = {name: entry["quantity"] for name, entry in manifest["formation"].items()}
    assert quantities["beat"] == 1
    assert quantities["flower"] == 0
    assert all(quantities[name] >= 1 for name in ("web", "worker", "notifier"))
    addons = {addon["plan"].split(":")[0]: addon.get("as") for addon in manifest["addons"]}
    assert addons == {"heroku-postgresql": "DATABASE", "heroku-redis": "REDIS"}
    assert manifest["env"]["FLOWER_PASSWORD"]["generator"] == "secret"
    assert "$FLOWER_PASSWORD" in procfile()["flower"]
    assert manifest["env"]["REDIS_SSL_CERT_REQS"]["value"] in ("required", "optional", "none")


def test_flower_app_runs_the_procfile_flower_on_the_routed_port():
    """Flower's own app (README, Deploying) runs the very flower command, as its web on $PORT."""
    flower_app = procfile(PROJECT_ROOT / "Procfile.flower")
    assert flower_app == {"web": "FLOWER_PORT=$PORT FLOWER_ADDRESS=0.0.0.0 " + procfile()["flower"]}


# Heroku's time between SIGTERM and SIGKILL when it stops a dyno (daily, and on every deploy).
PLATFORM_GRACE_S = 30.0


def test_every_process_stops_within_the_platforms_grace():
    """gunicorn's graceful timeout and the workers' soft shutdown fit inside the 30 s a dyno gets
    between SIGTERM and SIGKILL, with room left to close; the workers run with REMAP_SIGTERM=SIGQUIT,
    so that the SIGTERM every process of the dyno gets does not kill their tasks (celeryconfig.py).
    tests/faults/test_dyno_restarts.py restarts a whole stack that way."""
    import celeryconfig

    graceful = re.search(r"--graceful-timeout (\d+)", procfile()["web"])
    assert graceful and float(graceful.group(1)) <= PLATFORM_GRACE_S - 5
    assert celeryconfig.worker_soft_shutdown_timeout <= PLATFORM_GRACE_S - 10
    for name in ("worker", "notifier"):
        assert procfile_env(name) == {"REMAP_SIGTERM": "SIGQUIT"}, name


def dockerfile_cmd(path: Path) -> list[str]:
    """The Dockerfile's CMD (its JSON form)."""
    (line,) = [line for line in path.read_text().splitlines() if line.startswith("CMD ")]
    return json.loads(line[len("CMD ") :])


def _copy_of_the_repository(destination: Path) -> Path:
    """What a push sends: the files git knows (tracked, or new and not ignored), without .venv,
    .run or caches."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = PROJECT_ROOT / name.decode()
        if source.is_file():  # a file deleted in the working tree is still listed
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} exited with {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.e2e
def test_the_buildpack_install_runs_every_procfile_process(tmp_path):
    """A fresh virtualenv, `pip install -r requirements.txt` in a copy of the repository and nothing
    else; then, from that copy and that virtualenv only: release (through the Dockerfile's CMD)
    migrates an empty database, web answers /health, worker, notifier and beat start and stay up,
    Flower's app asks for its password; and each stops cleanly on SIGTERM, as a dyno does."""
    timings = {}
    started = time.monotonic()
    app = _copy_of_the_repository(tmp_path / "app")
    venv = tmp_path / "venv"
    # The machine's pip settings (certificates, where PyPI is) stay; this session's virtualenv goes.
    install_env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    install_env["PATH"] = f"{venv / 'bin'}:{SYSTEM_PATH}"
    _run([sys.executable, "-m", "venv", str(venv)], app, install_env, 60)
    _run([str(venv / "bin" / "pip"), "install", "-q", "-r", "requirements.txt"], app, install_env, 300)
    timings["install_s"] = round(time.monotonic() - started, 1)

    # Everything it installed is pinned, at the pinned version (only the project itself is not).
    frozen = _run([str(venv / "bin" / "pip"), "freeze"], app, install_env, 60).split()
    pinned = pins()
    unpinned = [line for line in frozen if " @ " not in line and "==" in line]
    for line in unpinned:
        name, _, version = line.partition("==")
        assert pinned.get(canonicalize_name(name)) == version, f"installed {line}; constraints.txt: {name}"

    database = f"{TEST_DB}_buildpack"
    servers.create_database(SERVER_URL, database)
    run_id = f"buildpack-{os.getpid()}-{free_port()}"
    env = {
        "PATH": install_env["PATH"],
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "DATABASE_URL": servers.with_database(SERVER_URL, database),
        "REDIS_URL": os.environ["REDIS_URL"],
        # Queues of their own on the shared Redis: no other test's worker takes their tasks.
        "CELERY_QUEUE": run_id,
        "CELERY_NOTIFY_QUEUE": f"{run_id}-notify",
    }
    commands = procfile(app / "Procfile")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[Process] = []
    try:
        step = time.monotonic()
        # Run as the Dockerfile's CMD runs a Procfile entry (PROCESS=release): the container's way
        # of choosing a command, tried here without Docker.
        _run(dockerfile_cmd(app / "Dockerfile"), app, {**env, "PROCESS": "release"}, 120)
        with psycopg2.connect(env["DATABASE_URL"], connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM alembic_version")
            assert cur.fetchone() == (1,), "release did not migrate the database"
        conn.close()
        timings["release_s"] = round(time.monotonic() - step, 1)

        step = time.monotonic()
        web_port, flower_port = free_port(), free_port()

        def dyno(name: str, command: str, **kwargs) -> Process:
            # The platform runs each command with bash, which execs a single command: SIGTERM then
            # reaches gunicorn or celery itself, as on a dyno.
            env_ = {**env, **kwargs.pop("env", {})}
            return Process(name, ["bash", "-c", command], env_, logs / f"{name}.log", cwd=app, **kwargs)

        procs = [
            dyno("web", commands["web"], port=web_port, env={"PORT": str(web_port)}),
            dyno("worker", commands["worker"], ready_text="ready."),
            dyno("notifier", commands["notifier"], ready_text="ready."),
            dyno("beat", commands["beat"], ready_text="beat: Starting"),
            dyno(
                "flower",
                procfile(app / "Procfile.flower")["web"],
                port=flower_port,
                env={"PORT": str(flower_port), "FLOWER_PASSWORD": "from-app-json"},
            ),
        ]
        with ThreadPoolExecutor(len(procs)) as pool:
            for future in [pool.submit(p.start, 120) for p in procs]:
                future.result()
        health = eventually(
            lambda: (
                (r := _get(f"http://127.0.0.1:{web_port}/health")) is not None and r.status_code == 200 and r
            ),
            timeout=60,
            interval=0.5,
        )
        assert health.json()["checks"] == {"database": "ok", "broker": "ok"}
        flower = f"http://127.0.0.1:{flower_port}/api/workers"
        assert requests.get(flower, timeout=10).status_code == 401
        assert requests.get(flower, auth=("flower", "from-app-json"), timeout=10).status_code == 200
        timings["start_s"] = round(time.monotonic() - step, 1)
        time.sleep(3)  # they stay up
        for proc in procs:
            assert proc.alive, f"{proc.name} exited:\n{proc.log_tail()}"
            assert "Traceback" not in proc.log_text(), f"{proc.name}:\n{proc.log_tail()}"

        # A dyno's stop: SIGTERM, and each of them exits by itself, with 0, well within the grace.
        step = time.monotonic()
        for proc in procs:
            os.killpg(proc.process.pid, 15)
        for proc in procs:
            code = proc.process.wait(20)
            if proc.name != "flower":  # tornado's loop ends by the signal itself; nothing to hand back
                assert code == 0, f"{proc.name} exited with {code} on SIGTERM:\n{proc.log_tail()}"
        timings["stop_s"] = round(time.monotonic() - step, 1)
    finally:
        for proc in procs:
            proc.kill()
        servers.drop_database(SERVER_URL, database)
    print(f"\nbuildpack install and Procfile: {timings}, {time.monotonic() - started:.1f} s in all")


def _get(url: str) -> requests.Response | None:
    try:
        return requests.get(url, timeout=5)
    except requests.RequestException:
        return None
