"""Celery settings, all from the environment (12-factor). Each one says why it has its value.

Read by tasks/celery.py through `config_from_object("celeryconfig")`.
"""

import os
import ssl


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


# The broker: CELERY_BROKER_URL wins, else REDIS_URL. Redis by default; RabbitMQ (amqp://) works too.
broker_url = os.environ.get("CELERY_BROKER_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP = broker_url.startswith(("amqp://", "amqps://", "pyamqp://"))

# Managed Redis speaks TLS: a rediss:// URL, with a password (Heroku's, among others). Given no TLS
# options, kombu connects to it without checking its certificate at all; here the certificate is
# checked unless REDIS_SSL_CERT_REQS says otherwise:
# - required (the default): the server's certificate must be signed by a trusted CA (the system's,
#   or the file REDIS_SSL_CA_CERTS names) and name the host;
# - optional: the same for a client (a server always presents a certificate: it is checked);
# - none: encrypted but not authenticated, for a platform whose Redis has a self-signed certificate.
# An ssl_cert_reqs in the URL's query wins: kombu then takes every TLS option from the URL and none
# from here (give ssl_ca_certs there too). Every Redis client of the service goes through the
# broker's connection (the sweep's sentinel, the notifier's flags, /health, Flower): one setting.
REDIS_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
if broker_url.startswith("rediss://"):
    _cert_reqs = os.environ.get("REDIS_SSL_CERT_REQS") or "required"
    if _cert_reqs.lower() not in REDIS_CERT_REQS:
        raise ValueError(f"REDIS_SSL_CERT_REQS: expected required, optional or none, got {_cert_reqs!r}")
    broker_use_ssl = {"ssl_cert_reqs": REDIS_CERT_REQS[_cert_reqs.lower()]}
    if os.environ.get("REDIS_SSL_CA_CERTS"):
        broker_use_ssl["ssl_ca_certs"] = os.environ["REDIS_SSL_CA_CERTS"]

# Seconds a message may stay unacknowledged before Redis hands it to another worker. ETA tasks are
# unacknowledged until they run, so the engine only publishes tasks due within
# ESCALATION_ETA_HORIZON (checked at start-up to be well below this).
BROKER_VISIBILITY_TIMEOUT = _env_float("BROKER_VISIBILITY_TIMEOUT", 3600)
# Every wait on the broker is bounded: a hung Redis must not hang an API request (default: none).
BROKER_SOCKET_TIMEOUT = _env_float("BROKER_SOCKET_TIMEOUT", 1.0)

broker_transport_options = {
    "visibility_timeout": BROKER_VISIBILITY_TIMEOUT,
    "socket_timeout": BROKER_SOCKET_TIMEOUT,
    "socket_connect_timeout": BROKER_SOCKET_TIMEOUT,
    # Ping idle connections so a restarted Redis is noticed before a publish hits the dead socket.
    "health_check_interval": 10,
}
# How often a worker gives back messages unacknowledged past the visibility timeout (kombu's
# default: about every 100 s). Only the fault suite sets it, to make redelivery storms happen.
if os.environ.get("BROKER_UNACKED_RESTORE_INTERVAL"):
    broker_transport_options.update(
        unacked_restore_interval=_env_float("BROKER_UNACKED_RESTORE_INTERVAL", 10),
        unacked_restore_throttle=1,
    )
if AMQP:
    # py-amqp ignores the Redis transport's options; broker_connection_timeout bounds its connect and
    # handshake (1 s against a broker that never answers, tests/test_rabbitmq.py).
    broker_transport_options = {}
broker_connection_timeout = BROKER_SOCKET_TIMEOUT
broker_connection_retry_on_startup = True
# A worker never gives up on the broker: Celery's default (100 attempts, then exit) ends a worker
# after a 100 s outage now that it tries every second (tasks/consumer.py); a worker that exits
# waits for its supervisor, and no level runs meanwhile.
broker_connection_max_retries = None
broker_pool_limit = int(os.environ.get("BROKER_POOL_LIMIT", 10))

# A publish that fails is retried once, quickly; after that the row in Postgres is the record and
# the sweep delivers it. So a transition answers within ~2 s even when Redis is down or hung.
task_publish_retry_policy = {
    "max_retries": 1,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.2,
}

task_serializer = "json"
accept_content = ["json"]
enable_utc = True
timezone = "UTC"
task_ignore_result = True  # Postgres holds every outcome; no result backend to run or to fill.
task_default_queue = os.environ.get("CELERY_QUEUE", "escalations")
# Deliveries wait on SMTP servers and webhooks (up to 10 s an attempt): they run on a queue of their
# own, consumed by the Procfile's `notifier`, so they never hold up an escalation.
NOTIFY_QUEUE = os.environ.get("CELERY_NOTIFY_QUEUE", "notifications")
task_routes = {"notifications.*": {"queue": NOTIFY_QUEUE}}

# Acknowledge after the task ran, and give the message back if the worker process died in it:
# an escalation whose worker was killed runs again elsewhere (it is idempotent, fenced in Postgres).
task_acks_late = True
task_reject_on_worker_lost = True
worker_cancel_long_running_tasks_on_connection_loss = True
# Celery's consumer with one fix: without it, a worker holding ETA escalations exits when the broker
# restarts (Celery 5.7.0 closes a released connection a second time; tasks/consumer.py says how).
worker_consumer = "tasks.consumer:Consumer"
# An escalation step is a few milliseconds of SQL; a minute means something is stuck.
task_soft_time_limit = 50
task_time_limit = 60

# A PaaS stops a dyno (daily, and on every deploy) with SIGTERM to every process in it, pool
# processes included, then SIGKILL 30 s later. Celery's pool processes die of that SIGTERM in the
# middle of their task: a webhook the provider accepted is sent again (tests/faults/
# test_dyno_restarts.py). So the Procfile runs the workers with REMAP_SIGTERM=SIGQUIT: the pool
# processes ignore SIGTERM, and the worker stops taking tasks, lets those running finish for up to
# this long (a delivery attempt is bounded at 10 s), gives the rest back to the broker and exits,
# well inside the platform's 30 s. (Celery sleeps the whole of it when any task is running.)
worker_soft_shutdown_timeout = _env_float("WORKER_SOFT_SHUTDOWN_TIMEOUT", 12)

# An escalation spends most of its time waiting on Postgres, not on the CPU: twice the cores
# overlaps the waiting (measured in docs/BENCHMARKS.md). Each child holds a database connection.
worker_concurrency = int(os.environ.get("WORKER_CONCURRENCY", 2 * (os.cpu_count() or 2)))
# RabbitMQ gives a worker back the ETA tasks it held (after a reconnect or a restart) only
# concurrency x multiplier per turn of its event loop, about once a second when idle: with 4, 300
# held levels took 30 s to come back, and due levels and the sweep waited behind them; with 32, 5 s.
# Redis hands them all over at once (tests/test_rabbitmq.py).
worker_prefetch_multiplier = int(os.environ.get("WORKER_PREFETCH_MULTIPLIER", 32 if AMQP else 4))
worker_hijack_root_logger = False

# Flower builds its views from the workers' events (received, started, succeeded...). The
# "sent" event is left off: it would cost every publish, inside every escalate request, a second
# Redis write, and Flower shows tasks without it.
worker_send_task_events = True
task_send_sent_event = False

# The sweep hands over what the broker never got or lost. It queues behind the escalations, so a
# copy may wait as long as a burst's backlog: it must not expire after one interval, or every sweep
# is dropped for as long as the backlog lasts and a killed worker's escalations stay lost meanwhile
# (issue 4, scenario 11). One that waited longer than a minute is dropped (the next one is on its
# way), so a long worker outage leaves a minute's worth of sweeps queued, not hours of them.
ESCALATION_SWEEP_INTERVAL = _env_float("ESCALATION_SWEEP_INTERVAL", 5)
ESCALATION_SWEEP_EXPIRES = max(60.0, 10 * ESCALATION_SWEEP_INTERVAL)
beat_schedule = {
    "sweep-escalations": {
        "task": "escalations.sweep",
        "schedule": ESCALATION_SWEEP_INTERVAL,
        "options": {"expires": ESCALATION_SWEEP_EXPIRES},
    },
    "sweep-notifications": {
        "task": "notifications.sweep",
        "schedule": ESCALATION_SWEEP_INTERVAL,
        "options": {"expires": ESCALATION_SWEEP_EXPIRES},
    },
}
