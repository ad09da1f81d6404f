"""Escalation tasks: thin. Each takes an id, runs one engine step in one transaction, commits, then
tells the broker what the step decided (deliver)."""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from datetime import datetime

from celery import shared_task
from flask import current_app
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from models import engine, metrics
from models.engine import Outbox
from tasks.celery import on_broker_redis
from tasks.notifications import wake

logger = logging.getLogger("escalation")

# A sweep takes at most this many batches at a time; the next sweep goes on where it stopped.
MAX_SWEEP_BATCHES = 20

# Once the broker has failed a publish, this process leaves hand-overs to the sweep for this long
# instead of making every request wait out the broker's timeouts again: with a hung Redis each
# transition would spend a second or two there, and the web would run out of threads.
BROKER_REST_S = 5.0
ARGSREPR_MAX = 1024  # Celery's own bound (celery.app.amqp.AMQP.argsrepr_maxsize)
_broker_failed_at: float | None = None


def _broker_resting() -> bool:
    return _broker_failed_at is not None and time.monotonic() - _broker_failed_at < BROKER_REST_S


def _broker_failed(what: str, count: int, exc: Exception) -> None:
    global _broker_failed_at
    _broker_failed_at = time.monotonic()
    logger.warning(
        "[ESCALATION] broker failed to %s %d task(s) (%s); the sweep will deliver", what, count, exc
    )


def deliver(outbox: Outbox) -> bool:
    """After commit: log, publish the escalations handed over, and wake the deliverers of the
    contacts that have notifications.

    Never raises and never waits long on a sick broker: the rows in Postgres already say what must
    happen, and the sweep delivers whatever could not be published here. Returns False when the
    broker refused a publish.
    """
    for message, ids in outbox.log:
        logger.info(message, extra=ids)
    if outbox.publish and _broker_resting():
        _forget_publish(outbox.publish)
        return False
    for index, message in enumerate(outbox.publish):
        try:
            args = ([str(i) for i in message.escalation_ids],)
            execute_escalations.apply_async(
                args, task_id=message.task_id, eta=message.eta, argsrepr=_repr(args), kwargsrepr="{}"
            )
        except Exception as exc:  # noqa: BLE001 - any broker failure means: leave it to the sweep
            _broker_failed("publish", len(outbox.publish) - index, exc)
            _forget_publish(outbox.publish[index:])
            return False
    # A wake-up that fails leaves due rows in Postgres: the notification sweep wakes them.
    if outbox.wake and not _broker_resting():
        wake(outbox.wake)
    return True


def _repr(args: tuple) -> str:
    """The arguments as Flower and the worker's log show them, cut as Celery cuts them. Given, not
    left to Celery: its saferepr() cost a seventh of a publish, which escalate requests all pay."""
    text = repr(args)
    return text if len(text) <= ARGSREPR_MAX else text[: ARGSREPR_MAX - 3] + "..."


def _forget_publish(failed: list[engine.Message]) -> None:
    try:
        with current_app.extensions["db"].begin() as session:
            engine.forget_publish(session, failed)
    except Exception as exc:  # noqa: BLE001 - the redelivery grace covers this too
        logger.warning("[ESCALATION] could not mark %d publish(es) as failed: %s", len(failed), exc)


@shared_task(
    bind=True,
    name="escalations.execute",
    autoretry_for=(DBAPIError, PoolTimeoutError),
    retry_backoff=1,
    retry_backoff_max=30,
    retry_jitter=True,
    max_retries=20,
)
def execute_escalations(self, escalation_ids: list[str] | str) -> dict[str, int]:
    """Execute the escalations of one message that are still due, and schedule their next levels.

    A message published before messages carried batches names one escalation, not a list.
    """
    ids = [uuid.UUID(i) for i in ([escalation_ids] if isinstance(escalation_ids, str) else escalation_ids)]
    try:
        outcomes = _execute(ids, self.request.id)
    except (DBAPIError, PoolTimeoutError):
        raise  # the whole message is retried (autoretry_for): the database was the trouble
    except Exception:
        if len(ids) == 1:
            raise
        # One bad escalation must not hold up the others of its message: each in a transaction of
        # its own. The task fails once the others are done, and the sweep hands the failing ones
        # over again after the redelivery grace.
        logger.exception("[ESCALATION] a batch of %d escalations failed: executing them one by one", len(ids))
        outcomes, failed = Counter(), []
        for one in ids:
            try:
                outcomes.update(_execute([one], self.request.id))
            except Exception:  # noqa: BLE001 - logged here, the task fails below
                logger.exception("[ESCALATION] escalation %s failed", one, extra={"escalation_id": one})
                failed.append(one)
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(ids)} escalations failed") from None
    if outcomes["missing"]:
        logger.warning(
            "[ESCALATION] %d escalation(s) of task %s not found", outcomes["missing"], self.request.id
        )
    return dict(outcomes)


def _execute(ids: list[uuid.UUID], task_id: str) -> Counter[str]:
    outbox = Outbox()
    with current_app.extensions["db"].begin() as session:
        outcomes = engine.execute(session, ids, task_id, current_app.extensions["engine_settings"], outbox)
    deliver(outbox)
    return outcomes


# The sweep's key in the Redis broker: "kept by the sweep", or the time of a loss whose hand-over
# again has not finished yet (ISO 8601, the database's clock).
KEPT = "kept by the sweep"


def _sentinel() -> str:
    return f"{current_app.extensions['celery'].conf.task_default_queue}:sweep-sentinel"


def _broker_lost_its_data() -> datetime | None:
    """When the Redis broker lost its data (restarted empty, or flushed): the time before which
    whatever it was handed is gone; None when it lost nothing.

    A key the sweep keeps there is missing: every message Redis held went with it. The key then
    holds that time until a sweep has handed everything lost over again: a pass cut short (the
    broker failing again, the cap on batches, the database) leaves the rest to the next sweep, not
    to the ordinary grace and backoff. Only for Redis (RabbitMQ keeps Celery's durable queues and
    persistent messages across a restart). The first sweep after a deploy finds no key either: it
    hands over again what is in flight, a few duplicate wake-ups that the engine's re-check turns
    into nothing.
    """
    with current_app.extensions["db"].begin() as session:
        now = engine.db_now(session)

    def look(client) -> datetime | None:
        if client.set(_sentinel(), now.isoformat(), nx=True):
            return now
        try:
            return datetime.fromisoformat(client.get(_sentinel()).decode())
        except (AttributeError, ValueError):  # kept (or gone this instant: the next sweep sees it)
            return None

    try:
        return on_broker_redis(current_app.extensions["celery"], look)
    except Exception as exc:  # noqa: BLE001 - a broker that cannot answer cannot be handed anything
        logger.warning("[SWEEP] could not check the broker's sentinel (%s)", exc)
        return None


def _loss_handed_over() -> None:
    # XX: a key gone meanwhile is a new loss, for the next sweep to find.
    try:
        on_broker_redis(
            current_app.extensions["celery"], lambda client: client.set(_sentinel(), KEPT, xx=True)
        )
    except Exception as exc:  # noqa: BLE001 - the next sweep hands the loss over again: duplicates only
        logger.warning("[SWEEP] could not update the broker's sentinel (%s)", exc)


@shared_task(name="escalations.sweep")
def sweep_escalations() -> int:
    """Hand to the broker every PENDING escalation now within the horizon that it does not hold."""
    settings = current_app.extensions["engine_settings"]
    lost_before = _broker_lost_its_data()
    if lost_before is not None:
        logger.warning("[SWEEP] the broker lost its data: handing over again everything it held")
    total = overdue = 0
    for _ in range(MAX_SWEEP_BATCHES):
        outbox = Outbox()
        with current_app.extensions["db"].begin() as session:
            handed, late = engine.sweep(session, settings, outbox, lost_before)
        total += handed
        overdue += late
        if not deliver(outbox):
            break
        if handed < settings.sweep_batch:
            if lost_before is not None:
                _loss_handed_over()
            break
    with current_app.extensions["db"].begin() as session:
        metrics.record_sweep(session, settings, handed=total, redelivered=overdue)
    if overdue:
        logger.warning("[SWEEP] re-delivered %d overdue escalation(s)", overdue)
    if total - overdue:
        logger.info("[SWEEP] handed over %d escalation(s) now within the horizon", total - overdue)
    return total
