"""The worker's broker consumer: Celery's, with two fixes so that a worker rides through a broker
restart: it does not exit, and it is back within a second of the broker.

Celery 5.7.0 (`Consumer.on_connection_error_after_connected`) added a `connection.close()` right after
the `connection.collect()` that already released the broken connection. With the Redis transport:

1. `collect()` closes the default channel; `redis.Channel.close()` first reads the reply of the BRPOP
   in flight, the read fails on the dead socket, and the exception leaves the channel half-closed
   (`closed` still False, its unacknowledged messages still held); kombu swallows the error.
2. `collect()` then detaches the transport from the connection (`transport.client = None`).
3. The new `close()` closes the same channel again. This time the BRPOP is gone, so it reaches
   `QoS.restore_unacked_once()`, which builds a Redis client from `transport.client`: AttributeError
   "'NoneType' object has no attribute 'hostname'" (kombu#582 shows the same error on channel close).
   `ignore_errors()` lets only connection errors through, the consumer's blueprint dies and the worker
   exits with "Unrecoverable error".

Only a worker holding unacknowledged messages (our ETA escalations) gets there: with none, step 3 has
nothing to restore. Celery 5.6.3 had no such `close()` (its handler stops after `collect()`).

The fix, at the depth of the bug: release the connection ourselves the way Celery does (`collect()`,
with its socket bounded) and then drop the channel `collect()` could not close, so Celery's own
`collect()` and `close()` find nothing left to close. What that channel held is not lost: the broker
was unreachable, so nothing could have been restored through it anyway; Redis keeps the messages in
its unacked hash (given back after the visibility timeout) when it kept its data, and the escalation
sweep re-delivers every level overdue by the redelivery grace either way. Remove this class when
Celery closes only connections that collect() has not released (check on every Celery upgrade:
tests/test_broker_loss.py fails without it).
"""

from __future__ import annotations

from celery.utils.threads import bound_open_broker_sockets
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.consumer import COLLECT_SOCKET_TIMEOUT

# kombu's default reconnect back-off (Connection.ensure_connection: 2, 4, 6 ... up to 30 s apart;
# Celery passes none of its own) kept a worker away for up to 30 s after a long broker outage had
# ended, and no level runs while no worker is connected (tests/faults/findings.md). Trying every
# second costs a refused TCP connection a second per worker while the broker is down.
RECONNECT_BACKOFF = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 1.0}


class Consumer(CeleryConsumer):
    """Celery's consumer; a broken broker connection is released once, not closed twice, and a lost
    broker is tried again every second, not every 30."""

    def ensure_connected(self, conn):  # noqa: ANN001, ANN201 - Celery's signature
        retry = conn.ensure_connection
        conn.ensure_connection = lambda *args, **kwargs: retry(*args, **{**RECONNECT_BACKOFF, **kwargs})
        return super().ensure_connected(conn)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            bound_open_broker_sockets(connection, COLLECT_SOCKET_TIMEOUT)
            try:
                connection.collect(socket_timeout=COLLECT_SOCKET_TIMEOUT)
            except Exception:  # noqa: BLE001, S110 - as Celery's: releasing a dead connection may fail
                pass
            # Forget the channel collect() left half-closed (see the module docstring, step 3).
            connection._default_channel = None
        super().on_connection_error_after_connected(exc)
