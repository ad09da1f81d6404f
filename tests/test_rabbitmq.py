"""RabbitMQ as the broker, what Redis does not show: how fast a worker takes back ETA tasks waiting in
the queue, and a broker that accepts connections and never answers. (The end-to-end escalation tests
run on RabbitMQ too; its faults are in tests/faults/test_rabbitmq_faults.py.)"""

from __future__ import annotations

import re
import socket
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.faults.stack import DRAIN_PER_S
from tests.support import processes
from tests.support.servers import RedisServer, wait_until

pytestmark = pytest.mark.e2e


def client_app(broker_url: str):
    """A Celery client with the engine's settings (celeryconfig) on another broker."""
    from celery import Celery

    app = Celery("rabbitmq-tests", set_as_current=False)
    app.config_from_object("celeryconfig")
    app.conf.broker_url = broker_url
    return app


@pytest.fixture
def broker_url(request, tmp_path):
    if request.param == "rabbitmq":
        yield request.getfixturevalue("rabbitmq_url")
        return
    server = RedisServer(tmp_path / "redis").start()
    yield server.url
    server.stop(kill=True)


@pytest.mark.parametrize("broker_url", ["redis", "rabbitmq"], indirect=True)
def test_a_worker_takes_back_waiting_eta_tasks_as_fast_as_levels_fall_due(broker_url, process_env, log_dir):
    """A worker that starts, or reconnects after a broker restart (RabbitMQ keeps what the worker
    held), finds the ETA tasks it must hold waiting in the queue. It must take them back at least at
    the rate the fault suite holds workers to (DRAIN_PER_S): levels due meanwhile, and the sweep
    itself, wait behind them in the same queue.

    Celery raises a RabbitMQ consumer's prefetch by one for each ETA task it holds, so each round trip
    brings only worker_concurrency x worker_prefetch_multiplier new messages (2 x 4 here): about 10
    a second on this machine, 300 in half a minute; Redis hands them over in under a second."""
    n, queue = 300, f"takeback-{uuid.uuid4().hex[:8]}"
    app = client_app(broker_url)
    eta = datetime.now(UTC) + timedelta(minutes=10)
    with app.connection_for_write() as connection:
        for _ in range(n):
            app.send_task(
                "escalations.execute", (str(uuid.uuid4()),), eta=eta, queue=queue, connection=connection
            )
    env = {**process_env, "CELERY_BROKER_URL": broker_url, "CELERY_QUEUE": queue}
    worker = processes.worker(env, log_dir, name=f"takeback-{queue}").start()
    try:
        started = time.monotonic()
        pattern = re.compile(r"Task escalations\.execute\[[^\]]+\] received")

        def received() -> int:
            return len(pattern.findall(worker.log_text()))

        try:
            wait_until(lambda: received() >= n, 120, interval=0.1, what=f"the worker holding all {n}")
        finally:
            took = time.monotonic() - started
            print(f"\n{n} waiting ETA tasks taken back in {took:.1f} s ({received()} received)")
    finally:
        worker.stop()
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue)
        app.close()
    assert took <= n / DRAIN_PER_S, (
        f"{n} ETA tasks taken back in {took:.1f} s: under {DRAIN_PER_S:g} a second"
    )


def test_a_publish_to_an_amqp_broker_that_never_answers_gives_up_within_the_connection_timeout():
    """The Redis transport options in celeryconfig (socket_timeout ...) mean nothing to the amqp
    transport; what bounds a publish there is broker_connection_timeout, which also bounds the AMQP
    handshake (py-amqp waits for connection.start with it). A transition never waits longer than
    that, twice (the one quick retry), on a broker that accepts connections and never answers."""
    import celeryconfig

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    app = client_app(f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}//")
    started = time.monotonic()
    try:
        with pytest.raises(Exception) as raised:  # kombu's OperationalError: timed out
            app.send_task("escalations.execute", (str(uuid.uuid4()),))
        took = time.monotonic() - started
    finally:
        app.close()
        listener.close()
        for conn in held:
            conn.close()
    assert held, "the publish never reached the listener"
    assert "timed out" in str(raised.value)
    retries = celeryconfig.task_publish_retry_policy["max_retries"]
    assert took < celeryconfig.broker_connection_timeout * (1 + retries) + 0.5, took
