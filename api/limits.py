"""Rate limits on the Redis at REDIS_URL (whatever the broker is): per API key, and per client
address for failed authentications only. Fixed windows of the `limits` library (Flask-Limiter's
own): one Redis round trip (an INCR) per counted request, more only to refuse one. When Redis does
not answer, nothing is limited (fail open) and the log says so: the API keeps answering."""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field

from apispec import BasePlugin
from flask import Flask
from flask_smorest import abort
from limits import RateLimitItem, parse
from limits.errors import StorageError
from limits.storage import RedisStorage
from limits.strategies import FixedWindowRateLimiter
from redis.backoff import NoBackoff
from redis.retry import Retry

from api.auth import LiveKeyHashes, authenticate

logger = logging.getLogger("api")

# After a Redis error, this long without asking Redis: a Redis that hangs would otherwise hold every
# request for its timeout, and the log would get a line per request.
FAIL_OPEN_S = 5.0
# Addresses this process remembers as blocked; past this many (addresses an attacker made up), it
# starts over: each then costs one more database lookup and Redis hit before it is blocked again.
MAX_BLOCKED = 10_000


@dataclass(frozen=True)
class RateLimitSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    # redis-py's connection options: timeouts, and TLS as the broker's (REDIS_SSL_CERT_REQS,
    # REDIS_SSL_CA_CERTS; an ssl_cert_reqs in a rediss:// URL wins, as for the broker).
    redis_options: dict = field(default_factory=dict)
    # None: off.
    per_key: RateLimitItem | None = parse("1200/minute")
    failed_auth: RateLimitItem | None = parse("60/minute")


class Limiter:
    """The limits of one app, counted in Redis; what this process knows to be blocked, in memory."""

    def __init__(self, settings: RateLimitSettings):
        self.settings = settings
        storage = RedisStorage(
            settings.redis_url,
            key_prefix="incidents-limits",
            wrap_exceptions=True,
            # redis-py retries a failed command ten times by default: fail open at once instead.
            retry=Retry(NoBackoff(), 0),
            **settings.redis_options,
        )
        self.windows = FixedWindowRateLimiter(storage)
        self._skip_until = 0.0
        self._blocked: dict[str, float] = {}  # address -> time.monotonic() its block ends

    def count_request(self, key_id: uuid.UUID) -> None:
        """Count a request of an authenticated API key: 429 past RATE_LIMIT_PER_KEY."""
        item = self.settings.per_key
        if item is None:
            return
        retry_after = self._hit(item, "key", str(key_id))
        if retry_after is not None:
            _refuse(item, retry_after, f"Rate limit exceeded for this API key: {item} (RATE_LIMIT_PER_KEY).")

    def is_blocked(self, address: str | None) -> bool:
        """Has this address, to this process's knowledge, used up its failed authentications?"""
        return self._blocked.get(address, 0.0) > time.monotonic()

    def count_failure(self, address: str | None) -> None:
        """Count a failed authentication from this address: 429 past RATE_LIMIT_FAILED_AUTH, and
        from then on, until its window ends, without asking Redis again."""
        item = self.settings.failed_auth
        if item is None:
            return
        retry_after = self._blocked.get(address, 0.0) - time.monotonic()
        if retry_after <= 0:
            retry_after = self._hit(item, "failed-auth", str(address))
            if retry_after is None:
                return
            if len(self._blocked) >= MAX_BLOCKED:
                self._blocked.clear()
            self._blocked[address] = time.monotonic() + retry_after
        _refuse(
            item,
            retry_after,
            f"Too many failed authentications from this address: {item} (RATE_LIMIT_FAILED_AUTH).",
        )

    def _hit(self, item: RateLimitItem, *identifiers: str) -> int | None:
        """Count one against `item`: None while within it (or when Redis fails), else the seconds
        until its window ends."""
        if time.monotonic() < self._skip_until:
            return None
        try:
            if self.windows.hit(item, *identifiers):
                return None
            reset_at = self.windows.get_window_stats(item, *identifiers).reset_time
        except StorageError as error:
            self._skip_until = time.monotonic() + FAIL_OPEN_S
            logger.warning(
                "rate limiter failed open: Redis unavailable (%s); requests are not limited for %g s",
                type(error.storage_error).__name__,
                FAIL_OPEN_S,
            )
            return None
        return max(1, math.ceil(reset_at - time.time()))


def _refuse(item: RateLimitItem, retry_after: float, message: str) -> None:
    """Answer 429 in the one error shape, saying when to come back."""
    seconds = str(max(1, math.ceil(retry_after)))
    abort(
        429,
        message=f"{message} Retry in {seconds} s.",
        headers={
            "Retry-After": seconds,
            "RateLimit-Limit": str(item.amount),
            "RateLimit-Remaining": "0",
            "RateLimit-Reset": seconds,
        },
    )


def init_app(app: Flask, settings: RateLimitSettings) -> None:
    """The app's limiter, and the valid keys' hashes that let a valid key through a blocked address."""
    app.extensions["limiter"] = Limiter(settings)
    app.extensions["live_key_hashes"] = LiveKeyHashes()


class TooManyRequestsDoc(BasePlugin):
    """An apispec plugin: states the 429 on every operation that authenticates (where the limits
    apply)."""

    HEADERS = {
        "Retry-After": "Seconds to wait before trying again (rate limits only)",
        "RateLimit-Limit": "Requests allowed in the limit's window",
        "RateLimit-Remaining": "Requests left in the window (none, on a 429)",
        "RateLimit-Reset": "Seconds until the window ends",
    }

    def __init__(self, app: Flask):
        self.app = app

    def init_spec(self, spec) -> None:
        super().init_spec(spec)
        spec.components.response(
            "RATE_LIMITED",
            {
                "description": (
                    "Too many requests: this API key's rate limit (RATE_LIMIT_PER_KEY) or the failed "
                    "authentications allowed from this address (RATE_LIMIT_FAILED_AUTH) are used up "
                    "until `Retry-After`; on POST /incidents, also: the tenant has its quota of active "
                    "incidents (TENANT_MAX_ACTIVE_INCIDENTS) and must resolve or cancel one first"
                ),
                "content": {"application/json": {"schema": "Error"}},
                "headers": {
                    name: {"description": text, "schema": {"type": "integer"}}
                    for name, text in self.HEADERS.items()
                },
            },
        )

    def operation_helper(self, path=None, operations=None, **kwargs) -> None:
        blueprint = kwargs["rule"].endpoint.rpartition(".")[0]
        if authenticate in self.app.before_request_funcs.get(blueprint, ()):
            for operation in operations.values():
                operation.setdefault("responses", {})["429"] = "RATE_LIMITED"
