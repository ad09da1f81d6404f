"""Record every round trip the real code makes to Postgres, and time the real sweep query.

Run as a subprocess in a bench's environment (it builds the Flask app, which must never happen in
the process that drives the bench): `python -m bench.capture endpoints TOKEN` prints, as JSON, the
statements each endpoint sends (pool pre-ping, BEGIN and COMMIT included) with their parameters
filled in; `python -m bench.capture sweep RUNS` runs models.engine.sweep() RUNS times in
rolled-back transactions and prints its SQL, the query's wall times and EXPLAIN ANALYZE.
"""

from __future__ import annotations

import json
import sys
import time

import psycopg2.extensions

LOG: list[str] = []
TIMES: list[float] = []


class RecordingCursor(psycopg2.extensions.cursor):
    def execute(self, query, vars=None):  # noqa: A002 - psycopg2's name
        conn = self.connection
        if not conn.autocommit and conn.status == psycopg2.extensions.STATUS_READY:
            LOG.append("BEGIN")  # psycopg2 sends it as its own round trip before the first query
        LOG.append(self.mogrify(query, vars).decode())
        started = time.perf_counter()
        try:
            return super().execute(query, vars)
        finally:
            TIMES.append(time.perf_counter() - started)


class RecordingConnection(psycopg2.extensions.connection):
    def cursor(self, *args, **kwargs):
        kwargs.setdefault("cursor_factory", RecordingCursor)
        return super().cursor(*args, **kwargs)

    def commit(self):
        if self.status != psycopg2.extensions.STATUS_READY:
            LOG.append("COMMIT")
        return super().commit()

    def rollback(self):
        if self.status != psycopg2.extensions.STATUS_READY:
            LOG.append("ROLLBACK")
        return super().rollback()


def _app():
    from sqlalchemy import create_engine

    from api import create_app
    from models.db import make_engine, make_session_factory, normalize_database_url

    app = create_app()
    real = make_engine(app.config["SETTINGS"].database_url)
    # The app's engine settings, with a recording connection class added.
    engine = create_engine(
        normalize_database_url(app.config["SETTINGS"].database_url),
        pool_size=real.pool.size(),
        pool_pre_ping=True,
        connect_args={"connection_factory": RecordingConnection},
    )
    real.dispose()
    app.extensions["db"] = make_session_factory(engine)
    return app


def endpoints(token: str) -> dict:
    app = _app()
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    out = {}
    # Warm the pool (first connect) so the log shows a steady-state request.
    client.post("/incidents", json={"title": "warm-up"}, headers=headers)
    LOG.clear()
    response = client.post("/incidents", json={"title": "checkout is down"}, headers=headers)
    assert response.status_code == 201, response.text
    out["create"] = list(LOG)
    incident = response.get_json()["id"]
    for action in ("escalate", "resolve"):
        LOG.clear()
        response = client.post(f"/incidents/{incident}/{action}", headers=headers)
        assert response.status_code == 200, response.text
        out[action] = list(LOG)
    return out


def sweep(runs: int) -> dict:
    from models import engine as domain
    from models.engine import Outbox

    app = _app()
    settings = app.extensions["engine_settings"]
    factory = app.extensions["db"]
    walls, handed = [], 0
    statements: list[str] = []
    for _ in range(runs):
        with factory() as session:
            session.connection()  # pre-ping and BEGIN outside the timing
            LOG.clear()
            TIMES.clear()
            handed, _late = domain.sweep(session, settings, Outbox())
            # LOG: clock_timestamp(), then the sweep's queries (one or two); time the latter.
            statements = LOG[1:]
            walls.append(sum(TIMES[1:]) * 1000)
            session.rollback()
    plans = []
    with factory() as session:
        raw = session.connection().connection.dbapi_connection
        with raw.cursor() as cur:
            for statement in statements:
                cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement)
                plans.append("\n".join(row[0] for row in cur.fetchall()))
        session.rollback()
    return {"sql": ";\n\n".join(statements), "wall_ms": walls, "rows": handed, "explain": "\n\n".join(plans)}


def main(argv: list[str]) -> None:
    mode = argv[1]
    if mode == "endpoints":
        result = endpoints(argv[2])
    elif mode == "sweep":
        result = sweep(int(argv[2]))
    else:
        sys.exit("usage: python -m bench.capture endpoints TOKEN | sweep RUNS")
    sys.stdout.write("BENCH_JSON " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv)
