"""Settings from the environment, with working defaults for a developer machine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from limits import RateLimitItem, parse

from api.limits import RateLimitSettings
from models.engine import EngineSettings
from models.notify import DEFAULT_RATES, NotifySettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting is invalid; the process must not start."""


def _float(env: dict, name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None


def _port(env: dict, name: str) -> int | None:
    raw = env.get(name)
    if raw in (None, ""):
        return None
    if not raw.strip().isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(f"{name}: expected a TCP port number, got {raw!r}")
    return int(raw)


def _rate(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}: expected a whole number of messages per minute (at least 1), got {raw!r}")
    return int(raw)


def _count(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    if not raw.strip().isdigit():
        raise ConfigError(f"{name}: expected a whole number (0: no limit), got {raw!r}")
    return int(raw)


def _limit(env: dict, name: str, default: str) -> RateLimitItem | None:
    """A rate in the notation of the `limits` library (`1200/minute`, `20 per second`), or None
    for `off`."""
    raw = (env.get(name) or default).strip()
    if raw.lower() == "off":
        return None
    try:
        item = parse(raw)
    except ValueError:
        item = None
    if item is None or item.amount < 1:
        raise ConfigError(f"{name}: expected a rate such as 1200/minute, or off; got {raw!r}")
    return item


def _redis_options(env: dict, url: str) -> dict:
    """redis-py's options for the rate limits' Redis: waits bounded as the broker's, and TLS checked
    as the broker's (celeryconfig.py says how)."""
    timeout = _float(env, "BROKER_SOCKET_TIMEOUT", 1.0)
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if url.startswith("rediss://"):
        raw = env.get("REDIS_SSL_CERT_REQS") or "required"
        if raw.lower() not in ("required", "optional", "none"):
            raise ConfigError(f"REDIS_SSL_CERT_REQS: expected required, optional or none, got {raw!r}")
        options["ssl_cert_reqs"] = raw.lower()
        if env.get("REDIS_SSL_CA_CERTS"):
            options["ssl_ca_certs"] = env["REDIS_SSL_CA_CERTS"]
    return options


@dataclass(frozen=True)
class Settings:
    database_url: str
    policy_file: Path
    engine: EngineSettings
    visibility_timeout_s: float
    # Above the largest valid body: an incident's 10,563 characters of text may each arrive as a
    # 12-byte JSON escape (an astral character as two \uXXXX), 127 KB in all.
    max_body_bytes: int = 256 * 1024
    notify: NotifySettings = field(default_factory=NotifySettings)
    broker_url: str = "redis://127.0.0.1:6379/0"
    consumer_timeout_s: float = 1800.0
    # Proxies in front of the web process whose X-Forwarded-* headers are believed (a PaaS router:
    # 1). With 0, a client could name any address and scheme it likes.
    trusted_proxies: int = 0
    # Redirect http:// to https:// and send HSTS (behind a router that terminates TLS).
    force_https: bool = False
    # /metrics answers only `Authorization: Bearer <metrics_token>` when it is set.
    metrics_token: str | None = None
    # The worker's own process metrics are served on this port when it is set (tasks/celery.py).
    worker_metrics_port: int | None = None
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)

    @classmethod
    def from_env(cls, env: dict | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        # The broker's unless CELERY_BROKER_URL names another; the rate limits' Redis either way.
        redis_url = env.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
        settings = cls(
            database_url=env.get("DATABASE_URL", "postgresql://127.0.0.1:5432/incidents"),
            policy_file=Path(env.get("ESCALATION_POLICY_FILE") or PROJECT_ROOT / "policy.yaml"),
            engine=EngineSettings(
                eta_horizon_s=_float(env, "ESCALATION_ETA_HORIZON", 300),
                redelivery_grace_s=_float(env, "ESCALATION_REDELIVERY_GRACE", 30),
                max_active_incidents=_count(env, "TENANT_MAX_ACTIVE_INCIDENTS", 10_000),
            ),
            visibility_timeout_s=_float(env, "BROKER_VISIBILITY_TIMEOUT", 3600),
            broker_url=env.get("CELERY_BROKER_URL") or redis_url,
            consumer_timeout_s=_float(env, "BROKER_CONSUMER_TIMEOUT", 1800),
            trusted_proxies=int(_float(env, "TRUSTED_PROXIES", 0)),
            force_https=env.get("FORCE_HTTPS", "") == "1",
            metrics_token=env.get("METRICS_TOKEN") or None,
            worker_metrics_port=_port(env, "WORKER_METRICS_PORT"),
            rate_limits=RateLimitSettings(
                redis_url=redis_url,
                redis_options=_redis_options(env, redis_url),
                per_key=_limit(env, "RATE_LIMIT_PER_KEY", "1200/minute"),
                failed_auth=_limit(env, "RATE_LIMIT_FAILED_AUTH", "60/minute"),
            ),
            notify=NotifySettings(
                rates={
                    channel: _rate(env, f"NOTIFY_RATE_{channel.upper()}", default)
                    for channel, default in DEFAULT_RATES.items()
                },
                # The throttle's window: 60 s in production; tests shorten it to see digests go out.
                window_s=_float(env, "NOTIFY_RATE_WINDOW", 60),
                retry_for_s=_float(env, "NOTIFY_RETRY_FOR", 900),
                redelivery_grace_s=_float(env, "ESCALATION_REDELIVERY_GRACE", 30),
                # Tests shorten it to see a deliverer hand over to the next one.
                deliverer_budget_s=_float(env, "NOTIFY_DELIVERER_BUDGET", 10),
            ),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse settings under which Redis would deliver an escalation twice or not at all, or the
        web would redirect every request for ever."""
        if self.force_https and self.trusted_proxies < 1:
            raise ConfigError(
                "FORCE_HTTPS=1 needs TRUSTED_PROXIES (1 behind a PaaS router): without it every request "
                "looks like plain http and is redirected again"
            )
        horizon = self.engine.eta_horizon_s
        if horizon <= 0:
            raise ConfigError("ESCALATION_ETA_HORIZON must be positive")
        # An ETA task is unacknowledged until it runs. RabbitMQ closes a channel whose delivery
        # outlives its consumer_timeout, and a Celery worker exits on that (celery/celery#6760,
        # tests/faults/test_rabbitmq_faults.py); Redis hands it to a second worker after the
        # visibility timeout. Either way it must run well before.
        if self.broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
            if horizon > self.consumer_timeout_s / 2:
                raise ConfigError(
                    f"ESCALATION_ETA_HORIZON ({horizon:g} s) must be at most half of "
                    f"BROKER_CONSUMER_TIMEOUT ({self.consumer_timeout_s:g} s, RabbitMQ's consumer_timeout): "
                    "a worker holding an escalation longer is disconnected by RabbitMQ and exits"
                )
        elif horizon > self.visibility_timeout_s / 2:
            raise ConfigError(
                f"ESCALATION_ETA_HORIZON ({horizon:g} s) must be at most half of "
                f"BROKER_VISIBILITY_TIMEOUT ({self.visibility_timeout_s:g} s): escalations held "
                "longer than the visibility timeout are redelivered by Redis"
            )
        if self.engine.redelivery_grace_s <= 0:
            raise ConfigError("ESCALATION_REDELIVERY_GRACE must be positive")
