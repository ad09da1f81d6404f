"""GET /health: is the database reachable, is the broker reachable. Bounded by timeouts, no auth."""

from __future__ import annotations

from flask import current_app
from flask_smorest import Blueprint
from sqlalchemy import text

blp = Blueprint("health", __name__, description="Liveness of the service and what it depends on")


def _check_database() -> None:
    with current_app.extensions["db"]() as session:
        session.execute(text("SELECT 1"))


def _check_broker() -> None:
    with current_app.extensions["celery"].connection_for_write() as connection:
        # One attempt, bounded by the broker socket timeouts in celeryconfig.
        connection.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        _ = connection.default_channel  # the Redis transport PINGs when it opens a channel


@blp.route("/health")
@blp.response(200)
@blp.alt_response(503, description="A dependency is down; `checks` names it")
def health():
    """200 when the database and the broker answer, 503 naming the one that does not."""
    checks = {}
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            checks[name] = f"unavailable: {exc.__class__.__name__}"
    ok = all(value == "ok" for value in checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
