"""Bind a Celery app to a Flask app (the Flask docs' pattern): tasks run inside the app context."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery.signals import celeryd_after_setup, setup_logging, worker_init, worker_process_init
from flask import Flask

from api import logs

logger = logging.getLogger("metrics")


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app from celeryconfig.py and keep it in app.extensions['celery']."""

    class FlaskTask(Task):
        def __call__(self, *args, **kwargs):
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    # Read now, not at the first publish: a setting celeryconfig refuses (REDIS_SSL_CERT_REQS=maybe)
    # stops the process as it starts, instead of a web that answers 503 for ever.
    celery_app.config_from_object("celeryconfig", force=True)
    celery_app.set_default()
    # Register the tasks with this app (shared_task binds them to every app).
    import tasks.escalation  # noqa: F401
    import tasks.notifications  # noqa: F401

    def fresh_pool(**_kwargs) -> None:
        # A forked pool process must not share the parent's database connections.
        app.extensions["db"].kw["bind"].dispose(close=False)

    worker_process_init.connect(fresh_pool, weak=False)

    def keep_our_logging(**_kwargs) -> None:
        # create_app configured logging (api/logs.py): with a receiver here, Celery configures none
        # of its own, and its lines come out in the same format as the rest (LOG_FORMAT).
        pass

    setup_logging.connect(keep_our_logging, weak=False)

    def banner_only_as_text(instance, **_kwargs) -> None:
        # The worker's start-up banner is printed, not logged: with JSON lines it would be the only
        # text in the stream.
        if logs.json_lines():
            instance.quiet = True

    celeryd_after_setup.connect(banner_only_as_text, weak=False)

    def serve_metrics(**_kwargs) -> None:
        # The worker's own process metrics (its main process's memory, CPU, open files), where the
        # platform lets a port reach it. What the workers do is counted in Postgres, and served by
        # the web's /metrics.
        port = app.config["SETTINGS"].worker_metrics_port
        if port is None:
            return
        from prometheus_client import start_http_server

        try:
            start_http_server(port)
        except OSError as exc:  # another worker on this machine has it (make run's notifier)
            logger.warning("metrics: cannot listen on WORKER_METRICS_PORT %d (%s); serving none", port, exc)

    worker_init.connect(serve_metrics, weak=False)
    app.extensions["celery"] = celery_app
    return celery_app


def on_broker_redis(celery_app: Celery, command: Callable[[Any], Any]) -> Any:
    """Run `command(client)` with a client of the broker when the broker is Redis, through kombu's
    own connection pool; None when the broker is not Redis. Errors are the caller's to handle.

    For the engine's few keys beside the queues: what lives in the broker is lost with the broker,
    and that is what these keys are about (the sweep's sentinel, the notifier's wake-up flags).
    """
    if not celery_app.conf.broker_url.startswith(("redis://", "rediss://")):
        return None
    with celery_app.pool.acquire(block=True, timeout=2) as connection:
        channel = connection.default_channel
        client = _clients.get(channel)
        if client is None or client.connection_pool is not channel.pool:
            with channel.conn_or_acquire() as client:
                _clients[channel] = client
        return command(client)


# A client per kombu channel, on the channel's connection pool, kept: kombu builds a new redis.Redis
# for each use (conn_or_acquire), and building one cost as much CPU as the command it runs (a DEL for
# each contact the notifier delivers to). A channel that reconnects gets a new pool, and with it a
# new client; a channel that is closed drops out with its client.
_clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
