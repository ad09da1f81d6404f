"""Bearer API keys: who is calling, for which tenant, with which scope."""

from __future__ import annotations

import threading
import time

from flask import current_app, g, request
from flask_smorest import abort
from sqlalchemy import bindparam, select

from api.db import db_session
from models.api_key import ApiKey, Scope, hash_key

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LiveKeyHashes:
    """The hashes of the keys not revoked, as the database had them at most REFRESH_S ago: what
    lets a valid key through its address's failed-authentication block, while the guesses behind
    that block never reach the database (re-read only when asked about a hash it lacks, so at most
    once per REFRESH_S however many guesses come)."""

    REFRESH_S = 5.0

    def __init__(self):
        self._hashes: frozenset[str] = frozenset()
        self._read_at = float("-inf")
        self._lock = threading.Lock()

    def __contains__(self, secret_hash: str) -> bool:
        if secret_hash in self._hashes:
            return True
        with self._lock:
            if time.monotonic() - self._read_at >= self.REFRESH_S:
                query = select(ApiKey.secret_hash).where(ApiKey.revoked_at.is_(None))
                self._hashes = frozenset(db_session().scalars(query))
                self._read_at = time.monotonic()
        return secret_hash in self._hashes


# Four columns, not the ORM object, through the session's connection, not the ORM's execution, and
# built once: this runs on every request (a fifth of a create's CPU). The key is never cached: a
# revoked key is refused from the next request on.
_KEYS = ApiKey.__table__.c
_KEY = select(_KEYS.id, _KEYS.tenant, _KEYS.scope, _KEYS.revoked_at).where(
    _KEYS.secret_hash == bindparam("secret_hash")
)


def authenticate() -> None:
    """before_request: set g.api_key from the Authorization header, or answer 401/403; 429 past the
    key's rate limit or its address's failed authentications (api/limits.py)."""
    limiter = current_app.extensions["limiter"]
    address = request.remote_addr  # the client's own behind TRUSTED_PROXIES (api/hardening.py)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        limiter.count_failure(address)
        abort(
            401,
            message="Missing API key: send 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    secret_hash = hash_key(token.strip())
    # A blocked address's guesses are refused (429) here, before any database lookup; its valid
    # keys go on.
    if limiter.is_blocked(address) and secret_hash not in current_app.extensions["live_key_hashes"]:
        limiter.count_failure(address)
    key = db_session().connection().execute(_KEY, {"secret_hash": secret_hash}).one_or_none()
    if key is None or key.revoked_at is not None:
        limiter.count_failure(address)
        abort(
            401,
            message="Invalid or revoked API key.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    # The key's id, never the key, for the access log (the Procfile's %({api.key_id}e)s).
    request.environ["api.key_id"] = str(key.id)
    limiter.count_request(key.id)
    if request.method not in SAFE_METHODS and key.scope is not Scope.WRITE:
        abort(403, message="This API key is read-only.")
    g.api_key = key
