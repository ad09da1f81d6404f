"""The worker app for the throughput floor: the service's Celery app (same settings, same tasks)
plus one no-op task. `celery -A bench.worker_app:celery_app worker` runs both kinds.

BENCH_TASK_EVENTS=0 turns task events off (a profiling experiment, not how the service runs)."""

import os

from tasks.app import celery_app

if os.environ.get("BENCH_TASK_EVENTS") == "0":
    celery_app.conf.worker_send_task_events = False
    celery_app.conf.task_send_sent_event = False


@celery_app.task(name="bench.noop")
def noop() -> None:
    """Nothing: what a Celery task costs on this broker and these worker settings."""


@celery_app.task(name="bench.sleep")
def sleep(ms: float) -> None:
    """A task that takes `ms` of wall time and no CPU: how the worker's main process fares meanwhile."""
    import time

    time.sleep(ms / 1000)
