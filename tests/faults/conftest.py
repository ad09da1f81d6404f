"""Fault scenarios: each one gets a whole private deployment (tests/faults/stack.py).

A Postgres cluster with the schema is made once per session (initdb + alembic upgrade head) and
copied for each scenario, so a scenario starts from a fresh database in about a second.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg2
import pytest
from alembic import command

from tests.conftest import alembic_config
from tests.faults.stack import Stack
from tests.support.servers import PostgresServer


@pytest.fixture(scope="session")
def fault_root():
    """A directory the postgres user can reach (pytest's tmp_path is private to root).
    Kept after the run when FAULTS_KEEP is set, to read the logs."""
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    root.chmod(0o755)
    yield root
    if not os.environ.get("FAULTS_KEEP"):
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"\nfault scenario files kept in {root}")


@pytest.fixture(scope="session")
def pg_template(fault_root):
    server = PostgresServer(fault_root / "pg-template").init().start()
    try:
        conn = psycopg2.connect(server.url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE incidents")
        conn.close()
        command.upgrade(alembic_config(server.url.rsplit("/", 1)[0] + "/incidents"), "head")
    finally:
        server.stop()
    return server.directory


@pytest.fixture
def make_stack(pg_template, fault_root, request):
    """make_stack(policy=..., **env) -> a Stack with its servers started; closed after the test."""
    stacks: list[Stack] = []
    base = fault_root / request.node.name.replace("/", "_").replace("[", "-").strip("]")

    def make(**kwargs) -> Stack:
        stack = Stack(base / f"stack{len(stacks)}", pg_template, **kwargs)
        stacks.append(stack)
        return stack.start_servers()

    yield make
    for stack in stacks:
        stack.close()
