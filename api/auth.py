"""Bearer API keys: who is calling, for which tenant, with which scope."""

from __future__ import annotations

from flask import g, request
from flask_smorest import abort
from sqlalchemy import select

from api.db import db_session
from models.api_key import ApiKey, Scope, hash_key

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def authenticate() -> None:
    """before_request: set g.api_key from the Authorization header, or answer 401/403."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        abort(
            401,
            message="Missing API key: send 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Four columns, not the ORM object: this runs on every request (a fifth of a create's CPU).
    # Never cached: a revoked key is refused from the next request on.
    key = (
        db_session()
        .execute(
            select(ApiKey.id, ApiKey.tenant, ApiKey.scope, ApiKey.revoked_at).where(
                ApiKey.secret_hash == hash_key(token.strip())
            )
        )
        .one_or_none()
    )
    if key is None or key.revoked_at is not None:
        abort(
            401,
            message="Invalid or revoked API key.",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    # The key's id, never the key, for the access log (the Procfile's %({api.key_id}e)s).
    request.environ["api.key_id"] = str(key.id)
    if request.method not in SAFE_METHODS and key.scope is not Scope.WRITE:
        abort(403, message="This API key is read-only.")
    g.api_key = key
