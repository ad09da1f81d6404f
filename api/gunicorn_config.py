"""gunicorn's hooks (the Procfile's `--config python:api.gunicorn_config`): the directory in which the
web's processes keep their Prometheus counts (api/metrics.py), fresh at each start."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# The directory this master made, removed when it exits.
_made: str | None = None


def on_starting(server) -> None:
    """Before any worker is forked: a worker reads PROMETHEUS_MULTIPROC_DIR once, when it imports
    prometheus_client. A directory given there is emptied of a previous run's counts (a restart
    starts them again, as Prometheus expects); without one (a PaaS), a new temporary directory."""
    global _made
    if server.master_pid:
        return  # a re-exec (USR2): the old master's workers still count in its directory
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        for stale in Path(directory).glob("*.db"):
            stale.unlink()
    else:
        _made = tempfile.mkdtemp(prefix="incident-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _made


def child_exit(server, worker) -> None:
    """A worker is gone: its live gauges go with it (its counters stay, counted in every total)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:
    if _made and not server.reexec_pid:  # unless a new master (USR2) carries on with it
        shutil.rmtree(_made, ignore_errors=True)
