"""GET /health: is the database reachable, is the broker reachable. Bounded by timeouts, no auth."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from flask import current_app
from flask_smorest import Blueprint
from sqlalchemy import text

blp = Blueprint("health", __name__, description="Liveness of the service and what it depends on")

# Each process answers from its last check for this long: a flood of /health (or many routers
# polling it) costs no database session and no broker connection per request.
CACHE_S = 2.0


@dataclass
class _LastAnswer:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answer: tuple[dict, int] | None = None
    checked_at: float = float("-inf")


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
    """200 when the database and the broker answer, 503 naming the one that does not (from this
    process's last check, at most a couple of seconds old)."""
    last = current_app.extensions.setdefault("health", _LastAnswer())
    # Concurrent requests wait for the one check under way rather than each starting their own.
    with last.lock:
        if time.monotonic() - last.checked_at >= CACHE_S:
            last.answer = _check()
            last.checked_at = time.monotonic()
        return last.answer


def _check() -> tuple[dict, int]:
    checks = {}
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            checks[name] = f"unavailable: {exc.__class__.__name__}"
    ok = all(value == "ok" for value in checks.values())
    return {"status": "ok" if ok else "unavailable", "checks": checks}, 200 if ok else 503
