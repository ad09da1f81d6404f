"""8. Notification delivery rate per channel: N contacts, each with one PENDING level-2 alert in
Postgres, delivered by the notifier (the Procfile's notifier: a Celery worker on the notification
queue whose deliverers claim, send and record), next to a bare loop of the same client against the
same local receiver (bench/sinks.py, a process of its own) in the same run.

The bare loops compose each message with the product's own composer (tasks/channels: the same
subject, body, headers and signature) from the same incidents, inside the timed loop, so the ratio is
what the delivery machinery adds (Celery, the claim, the row locks, the recorded outcome, the URL
checks), not what a message is. Like the product, they open one connection per message; email also
runs over one connection for every message, as a second reference.
"""

from __future__ import annotations

import smtplib
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from bench.common import (
    TENANT,
    Bench,
    CpuMeter,
    log_lines,
    median,
    publish_wakes,
    seed_contacts,
    seed_escalating,
    seq_id,
)
from bench.sinks import Sink

CHANNELS = ("email", "webhook")
INCIDENT_COLUMNS = (
    "id", "title", "description", "severity", "state", "policy", "dedup_key", "created_at", "updated_at",
    "acknowledged_at", "escalated_at", "resolved_at", "cancelled_at",
)  # fmt: skip
ENV = {"NOTIFY_EMAIL_FROM": "pager@bench.example", "NOTIFY_ALLOW_PRIVATE_URLS": "1"}


def span_rate(count: int, seconds: float | None) -> float:
    """Messages per second from the first to the last completion (the first one starts the clock)."""
    return (count - 1) / seconds if seconds and count > 1 else float("nan")


def seed_pending(bench: Bench, channel: str, count: int, address: str, secret: str | None) -> list[str]:
    """`count` ESCALATING incidents, each with a contact of its own on `channel` (with the incident's
    id) holding one PENDING level-2 alert, as a level's execution leaves them. Returns the ids."""
    seed_escalating(bench, count, "now() + interval '1 day'")  # level 1 not due: no worker runs it
    ids = [seq_id(n) for n in range(bench.next_seq - count, bench.next_seq)]
    seed_contacts(bench, channel, [(i, TENANT, address.format(i=i)) for i in ids], secret)
    bench.sql(
        "INSERT INTO notifications (id, tenant, incident_id, contact_id, channel, type, level, status, "
        "attempts, next_attempt_at, created_at, updated_at) SELECT gen_random_uuid(), c.tenant, c.id, "
        "c.id, c.channel, 'incident.escalated', 2, 'PENDING', 0, now(), now(), now() FROM contacts c "
        "WHERE c.id = ANY(CAST(%s AS uuid[]))",
        (ids,),
    )
    return ids


def through_notifier(bench: Bench, sink: Sink, ids: list[str], concurrency: int, timeout_s: float) -> dict:
    """Start the notifier, wake every contact's deliverer as the engine does after commit, and wait until
    every notification is final. Rate from the first to the last sent_at (the database clock)."""
    proc = bench.notifier(concurrency=concurrency)
    with CpuMeter(notifier=proc.process.pid, sink=sink.process.pid) as meter:
        publish_wakes(bench, ids)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            (left,) = bench.sql(
                "SELECT count(*) FROM notifications WHERE contact_id = ANY(CAST(%s AS uuid[])) "
                "AND status IN ('PENDING', 'SENDING')",
                (ids,),
                fetch=True,
            )[0]
            if not left:
                break
            time.sleep(0.5)
    runs = log_lines(proc.log_path, "Task notifications.deliver[", proc._offset)
    bench.stop(proc)
    statuses = dict(
        bench.sql(
            "SELECT status, count(*) FROM notifications WHERE contact_id = ANY(CAST(%s AS uuid[])) "
            "GROUP BY status",
            (ids,),
            fetch=True,
        )
    )
    span = bench.sql(
        "SELECT extract(epoch FROM max(sent_at) - min(sent_at)) FROM notifications "
        "WHERE contact_id = ANY(CAST(%s AS uuid[])) AND status = 'SENT'",
        (ids,),
        fetch=True,
    )[0][0]
    sent = statuses.get("SENT", 0)
    return {
        "rate": span_rate(sent, float(span) if span is not None else None),
        "sent": sent,
        "statuses": statuses,
        "deliverer_runs": sum(1 for line in runs if "succeeded in" in line),
        "cpu_ms": 1000 * meter.cpu["notifier"] / max(1, sent),
        **_receiver(sink, meter, sent),
    }


def _receiver(sink: Sink, meter: CpuMeter, count: int) -> dict:
    """What the receiver got during the phase (it is started again for the next one), and its CPU."""
    got = sink.received()
    sink.start()
    return {
        "received": got["messages"],
        "distinct": got["distinct"],
        "sink_cpu_ms": 1000 * meter.cpu["sink"] / max(1, count),
        "sink_busy": meter.cpu["sink"] / meter.wall,
        "machine_busy": meter.machine,
    }


def bare_messages(bench: Bench, ids: list[str], channel: str, secret: str | None, address: str) -> list:
    """The messages of the notifier's rows as tasks/notifications builds them (new notification ids)."""
    from api.schemas import IncidentSchema
    from models.lifecycle import State
    from tasks import channels

    rows = bench.sql(
        f"SELECT {', '.join(INCIDENT_COLUMNS)} FROM incidents WHERE id = ANY(CAST(%s AS uuid[])) ORDER BY id",
        (ids,),
        fetch=True,
    )
    schema, now = IncidentSchema(), datetime.now(UTC)
    messages = []
    for row in rows:
        incident = dict(zip(INCIDENT_COLUMNS, row, strict=True))
        incident["state"] = State(incident["state"])
        messages.append(
            channels.Message(
                notification_id=str(uuid.uuid4()),
                type="incident.escalated",
                channel=channel,
                address=address.format(i=incident["id"]),
                secret=secret,
                incident=schema.dump(incident),
                level=2,
                created_at=now,
            )
        )
    return messages


def bare_loop(send: Callable, messages: list, sink: Sink) -> dict:
    """Send every message in turn; rate from the first to the last completion, client CPU per message."""
    with CpuMeter(sink=sink.process.pid) as meter:
        client = time.process_time()
        finished = []
        for message in messages:
            send(message)
            finished.append(time.perf_counter())
        client = time.process_time() - client
    return {
        "rate": span_rate(len(finished), finished[-1] - finished[0] if finished else None),
        "sent": len(finished),
        "cpu_ms": 1000 * client / max(1, len(finished)),
        **_receiver(sink, meter, len(finished)),
    }


def webhook_sender(base_url: str) -> Callable:
    """requests.post (a session, so a connection, per call, as tasks/channels/http.py), each message
    signed as the product signs it (Standard Webhooks, at send time)."""
    import requests

    from tasks.channels.http import USER_AGENT
    from tasks.channels.webhook import signed_request

    def post(message) -> None:
        body, headers = signed_request(message)
        response = requests.post(
            f"{base_url}/hooks/{message.notification_id}",
            data=body,
            headers={"User-Agent": USER_AGENT, **headers},
            timeout=(3, 10),
            allow_redirects=False,
        )
        response.raise_for_status()

    return post


def email_round(bench: Bench, smtp: Sink, count: int, concurrency: int, timeout_s: float) -> dict:
    """The notifier, then smtplib: a connection per message as tasks/channels/email.py opens one
    (connect, EHLO, MAIL, RCPT, DATA, QUIT), then every message over one connection."""
    from tasks.channels import ChannelSettings
    from tasks.channels.email import compose

    address = "oncall-{i}@example.com"
    ids = seed_pending(bench, "email", count, address, None)
    result = {"notifier": through_notifier(bench, smtp, ids, concurrency, timeout_s)}
    settings = ChannelSettings.from_env(bench.env)
    messages = bare_messages(bench, ids, "email", None, address)

    def per_message(message) -> None:
        with smtplib.SMTP("127.0.0.1", smtp.port, timeout=10) as client:
            client.send_message(compose(message, settings))

    result["bare"] = bare_loop(per_message, messages, smtp)
    with smtplib.SMTP("127.0.0.1", smtp.port, timeout=10) as client:
        result["bare_one_connection"] = bare_loop(
            lambda message: client.send_message(compose(message, settings)), messages, smtp
        )
    return result


def webhook_round(
    bench: Bench, fast: Sink, stdlib: Sink, count: int, concurrency: int, timeout_s: float
) -> dict:
    from tasks.channels.webhook import new_secret

    secret = new_secret()
    address = fast.url + "/hooks/{i}"
    ids = seed_pending(bench, "webhook", count, address, secret)
    result = {"notifier": through_notifier(bench, fast, ids, concurrency, timeout_s)}
    messages = bare_messages(bench, ids, "webhook", secret, address)
    result["bare"] = bare_loop(webhook_sender(fast.url), messages, fast)
    result["bare_stdlib"] = bare_loop(webhook_sender(stdlib.url), messages, stdlib)
    return result


def capacity(sink: Sink, duration: float) -> dict:
    """What the receiver answers with 8 keep-alive connections (wrk, or the asyncio fallback), and how
    busy it kept the receiver's process."""
    from bench.loadgen import http_load

    with CpuMeter(sink=sink.process.pid) as meter:
        load = http_load(sink.url, "create", "bench", connections=8, duration=duration)
    sink.received()  # counts of no interest; listening again for whatever comes next
    sink.start()
    busy = meter.cpu["sink"] / meter.wall
    return {**{key: load[key] for key in ("rps", "tool", "errors", "p99")}, "sink_busy": busy}


def run(cfg, run_id: str, log_dir) -> dict:
    count, concurrency = cfg.delivery_messages, cfg.delivery_concurrency
    timeout_s = 120 + count / 5
    rounds: dict[str, list] = {channel: [] for channel in CHANNELS}
    with Bench("delivery", run_id, log_dir, dict(ENV)) as bench:
        smtp, fast, stdlib = (
            bench.start(Sink.of(kind, bench.env, log_dir, f"{bench.name}-{kind}"))
            for kind in ("smtp", "http", "http-stdlib")
        )
        bench.env_overrides["SMTP_URL"] = smtp.url
        for _ in range(cfg.repeats):
            rounds["email"].append(email_round(bench, smtp, count, concurrency, timeout_s))
            rounds["webhook"].append(webhook_round(bench, fast, stdlib, count, concurrency, timeout_s))
        receivers = {"http": capacity(fast, cfg.duration), "http-stdlib": capacity(stdlib, cfg.duration)}
    keys = ("rate", "cpu_ms", "sink_cpu_ms", "sink_busy", "machine_busy")
    summary = {
        channel: {
            variant: {key: median([r[variant][key] for r in runs]) for key in keys} for variant in runs[0]
        }
        for channel, runs in rounds.items()
    }
    return {
        "messages": count,
        "concurrency": concurrency,
        "runs": rounds,
        "median": summary,
        "receivers": receivers,
    }
