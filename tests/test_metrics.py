"""Metrics (issue 12 part 5): a real gunicorn with two processes, a worker with the sweep and a
notifier, scraped after known actions; the rollup folded between two reads changes none of the
figures; gunicorn's metrics directory; the dashboard and the alert rules name only metrics the
service exports."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select, text

from api import gunicorn_config
from models import metrics
from models.db import make_engine, make_session_factory
from models.engine import EngineSettings
from tests.conftest import RUN_ID, insert_key
from tests.support import processes
from tests.support.receivers import HttpReceiver, Reply
from tests.support.servers import PROJECT_ROOT, api_session, free_port
from tests.support.waiting import eventually

POLICY = """\
default_policy: page
policies:
  page:
    levels:
      - {delay: 200ms, notify: [in_app, webhook]}
  # Far beyond the ETA horizon: nothing is handed to the broker until a test moves it.
  later:
    levels:
      - {delay: 1h, notify: [in_app]}
"""
TOKEN = f"metrics-{uuid.uuid4().hex}"
DEPLOY = PROJECT_ROOT / "deploy"


class Scrape:
    """One scrape's samples."""

    def __init__(self, body: str):
        self.text = body
        self.families = list(text_string_to_metric_families(body))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(
            sample.value
            for family in self.families
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def names(self) -> set[str]:
        """Every sample name the scrape exports, a family without samples included (a histogram's
        _bucket, _sum and _count, a counter's _total)."""
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        return {
            family.name + suffix for family in self.families for suffix in suffixes.get(family.type, [""])
        } | {sample.name for family in self.families for sample in family.samples}


def scrape(url: str, token: str | None = TOKEN) -> Scrape:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(response.text)


@pytest.fixture(scope="module")
def stack(migrated_database, process_env, tmp_path_factory):
    """This module's own database, gunicorn (two processes, METRICS_TOKEN set), worker with beat and
    WORKER_METRICS_PORT, notifier, and two webhook receivers: one takes every hook, one is gone."""
    directory = tmp_path_factory.mktemp("metrics")
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    # gunicorn's temporary directory lands here, where the test can look into it.
    tmp = directory / "tmp"
    tmp.mkdir()
    hooks, gone = HttpReceiver().start(), HttpReceiver(default=Reply(404, b"no such hook")).start()
    database_url = migrated_database("metrics")
    env = {
        **process_env,
        "DATABASE_URL": database_url,
        "ESCALATION_POLICY_FILE": str(policy),
        "CELERY_QUEUE": f"test-{RUN_ID}-metrics",
        "CELERY_NOTIFY_QUEUE": f"test-{RUN_ID}-metrics-send",
        "NOTIFY_ALLOW_PRIVATE_URLS": "1",
        "METRICS_TOKEN": TOKEN,
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker_port = free_port()
    web = processes.web({**env, "TMPDIR": str(tmp)}, directory, name="web-metrics", workers=2)
    worker = processes.worker(
        {**env, "WORKER_METRICS_PORT": str(worker_port)}, directory, name="worker-metrics", beat=True
    )
    notifier = processes.worker(
        {**env, "CELERY_QUEUE": env["CELERY_NOTIFY_QUEUE"]}, directory, name="notifier-metrics"
    )
    db = make_session_factory(make_engine(database_url, pool_size=2))
    try:
        with ThreadPoolExecutor(3) as pool:
            for future in [pool.submit(proc.start, 120) for proc in (web, worker, notifier)]:
                future.result()
        base = f"http://127.0.0.1:{web.port}"
        http = api_session(insert_key(db, tenant=f"metrics-{uuid.uuid4().hex[:6]}"), base)
        yield SimpleNamespace(
            http=http,
            db=db,
            hooks=hooks,
            gone=gone,
            metrics=f"{base}/metrics",
            worker_metrics=f"http://127.0.0.1:{worker_port}/metrics",
            tmp=tmp,
        )
    finally:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(processes.Process.stop, (notifier, worker, web)))
        for receiver in (hooks, gone):
            receiver.stop()
        db.kw["bind"].dispose()
    # gunicorn made its metrics directory at start, and removes it as it exits.
    assert list(tmp.glob("incident-metrics-*")) == []


def post(stack, path: str, body: dict | None = None, expect: int = 200) -> dict:
    response = stack.http.post(stack.http.base + path, json=body, timeout=15)
    assert response.status_code == expect, response.text
    return response.json()


def test_a_scrape_adds_up_every_process_and_what_postgres_holds(stack):
    # The first sweep has run: it found the broker's sentinel missing and handed over again
    # whatever was in flight, which is nothing yet.
    eventually(lambda: scrape(stack.metrics).value("incident_sweep_runs_total") >= 1, timeout=30)
    for name, receiver in (("ops bot", stack.hooks), ("old bot", stack.gone)):
        post(stack, "/contacts", {"name": name, "channel": "webhook", "address": f"{receiver.url}/h"}, 201)

    # Requests at once, each on a connection of its own: both gunicorn processes answer some.
    with ThreadPoolExecutor(8) as pool:
        created = list(
            pool.map(lambda i: post(stack, "/incidents", {"title": f"disk {i}"}, 201)["id"], range(16))
        )
    lost, late = (post(stack, "/incidents", {"title": t, "policy": "later"}, 201)["id"] for t in "ab")
    for incident_id in [*created[:3], lost, late]:
        post(stack, f"/incidents/{incident_id}/escalate")
    assert stack.http.get(f"{stack.http.base}/nowhere", timeout=10).status_code == 404
    with stack.db.begin() as session:
        # `lost`: handed to a broker that lost it an hour late; the sweep's backoff waits as long
        # before handing it over again, so it stays overdue. `late`: due 100 s ago and never handed
        # over: the next sweep re-delivers it, and it runs about 100 s late.
        session.execute(
            text(
                "UPDATE escalations SET scheduled_at = clock_timestamp() - interval '1 hour', "
                "published_at = clock_timestamp() WHERE incident_id = :id"
            ),
            {"id": lost},
        )
        session.execute(
            text(
                "UPDATE escalations SET scheduled_at = clock_timestamp() - interval '100 seconds' "
                "WHERE incident_id = :id"
            ),
            {"id": late},
        )

    def settled() -> Scrape | None:
        s = scrape(stack.metrics)
        done = (
            s.value("incident_escalation_lateness_seconds_count") == 4
            and s.value("incident_notifications_total", channel="webhook") == 6
            and s.value("incident_escalations_overdue") == 1
            and s.value("incident_escalations_due") == 1
        )
        return s if done else None

    s = eventually(settled, timeout=30, interval=0.3)

    # Requests, summed over gunicorn's processes, each of which counted some of them.
    assert s.value("incident_http_requests_total", route="/incidents", method="POST", status="201") == 18
    escalate = "/incidents/<uuid:incident_id>/escalate"
    assert s.value("incident_http_requests_total", route=escalate, method="POST", status="200") == 5
    assert s.value("incident_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert s.value("incident_http_request_duration_seconds_count", route="/incidents", method="POST") == 18
    assert "/nowhere" not in s.text  # routes by template, never by the path a client sent
    (counts,) = stack.tmp.glob("incident-metrics-*")
    counted_by = {re.fullmatch(r"counter_(\d+)\.db", p.name).group(1) for p in counts.glob("counter_*.db")}
    assert len(counted_by) == 2, counted_by

    # Executions and their lateness, from the database's clock: three on time, one 100 s late.
    assert s.value("incident_escalation_lateness_seconds_bucket", le="60.0") == 3
    assert s.value("incident_escalation_lateness_seconds_bucket", le="120.0") == 4
    assert s.value("incident_escalation_lateness_seconds_bucket", le="+Inf") == 4
    assert 100 <= s.value("incident_escalation_lateness_seconds_sum") < 130
    # The lost level is due, and overdue past the grace (settled() waited for a sweep that saw only
    # it); the late one was re-delivered by a sweep.
    assert s.value("incident_sweep_redeliveries_total") >= 1
    assert s.value("incident_sweep_handovers_total") >= s.value("incident_sweep_redeliveries_total")
    assert time.time() - s.value("incident_sweep_last_run_timestamp_seconds") < 10

    # Notifications: an in-app entry per executed level, a webhook sent and one refused for good each.
    assert s.value("incident_notifications_total", channel="in_app", status="SENT") == 4
    assert s.value("incident_notifications_total", channel="webhook", status="SENT") == 3
    assert s.value("incident_notifications_total", channel="webhook", status="FAILED") == 3
    assert 'incident_notifications_total{channel="email",status="FAILED"} 0.0' in s.text  # there, at 0
    assert s.value("incident_notifications_waiting") == 0
    assert s.value("incident_notification_delivery_seconds_count", channel="webhook") == 3
    assert s.value("incident_notification_delivery_seconds_bucket", channel="webhook", le="30.0") == 3
    assert s.value("incident_database_up") == 1

    # The worker's own process metrics, on its port.
    worker = scrape(stack.worker_metrics, token=None)
    assert worker.value("process_resident_memory_bytes") > 0


def test_metrics_answer_only_the_token_when_one_is_set(stack):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = requests.get(stack.metrics, headers=headers, timeout=10)
        assert response.status_code == 401, response.text
        assert response.json()["code"] == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert scrape(stack.metrics).value("incident_database_up") == 1
    # Keys of the API are not the metrics token.
    assert requests.get(stack.metrics, headers=stack.http.headers, timeout=10).status_code == 401


def test_without_a_token_metrics_are_open_and_outside_the_api_document(client):
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "incident_database_up 1.0" in response.get_data(as_text=True)
    assert "/metrics" not in client.get("/openapi.json").get_json()["paths"]


# -- the rollup, folded by the sweep ---------------------------------------------------------------------


@pytest.fixture
def fold_db(migrated_database):
    """A database of its own: the rollup's figures are the whole database's."""
    db = make_session_factory(make_engine(migrated_database(f"fold_{uuid.uuid4().hex[:6]}"), pool_size=2))
    # The counts start at the upgrade: these tests write rows dated hours before it.
    with db.begin() as session:
        session.execute(
            text(
                "UPDATE metrics_rollup SET escalations_before = now() - interval '1 day', "
                "notifications_before = now() - interval '1 day'"
            )
        )
    yield db
    db.kw["bind"].dispose()


def _insert(session, incident_id: uuid.UUID, escalations: list[tuple], notifications: list[tuple]) -> None:
    """An incident with escalations (status, due ago, executed ago) and notifications (channel, status,
    created ago, sent ago): times as intervals before now, as Postgres reads them."""
    session.execute(
        text(
            "INSERT INTO incidents (id, tenant, title, description, severity, state, created_at, updated_at) "
            "VALUES (:id, 'metrics', 'fold', '', 'high', 'ESCALATING', now(), now())"
        ),
        {"id": incident_id},
    )
    for level, (status, due_ago, executed_ago) in enumerate(escalations, start=1):
        session.execute(
            text(
                "INSERT INTO escalations (id, incident_id, escalation_level, status, notify, scheduled_at, "
                "executed_at, created_at, updated_at) VALUES (gen_random_uuid(), :incident, :level, "
                ":status, '[\"in_app\"]', now() - CAST(:due AS interval), "
                "now() - CAST(:executed AS interval), now(), now())"
            ),
            {"incident": incident_id, "level": level, "status": status, "due": due_ago,
             "executed": executed_ago},
        )  # fmt: skip
    for channel, status, created_ago, sent_ago in notifications:
        session.execute(
            text(
                "INSERT INTO notifications (id, tenant, incident_id, channel, type, status, attempts, "
                "created_at, updated_at, sent_at) VALUES (gen_random_uuid(), 'metrics', :incident, :channel, "
                "'incident.escalated', :status, 1, "
                "now() - CAST(:created AS interval), now(), now() - CAST(:sent AS interval))"
            ),
            {"incident": incident_id, "channel": channel, "status": status, "created": created_ago,
             "sent": sent_ago},
        )  # fmt: skip


def _read(db) -> metrics.Figures:
    with db() as session:
        return metrics.read(session)


def _fold(db, lag: timedelta = timedelta(0)) -> None:
    """What a sweep does after handing over two escalations, one of them overdue."""
    with db.begin() as session:
        metrics.record_sweep(session, EngineSettings(), handed=2, redelivered=1, lag=lag)


def test_a_fold_moves_settled_rows_into_the_rollup_and_changes_no_figure(fold_db):
    incident_id = uuid.uuid4()
    with fold_db.begin() as session:
        _insert(
            session,
            incident_id,
            escalations=[
                ("EXECUTED", "2 hours", "2 hours"),  # on time
                ("EXECUTED", "3 hours", "1 hour"),  # two hours late
                ("PENDING", "1 hour", None),  # due, and overdue
            ],
            notifications=[
                ("webhook", "SENT", "3 hours", "175 minutes"),  # sent 5 minutes after
                ("email", "FAILED", "3 hours", None),
                ("sms", "PENDING", "2 hours", None),  # unsent: the watermark stops here
                ("webhook", "SENT", "1 hour", "1 hour"),
            ],
        )
    before = _read(fold_db)
    assert before.lateness.count == 2 and before.lateness.sum == pytest.approx(7200, abs=1)
    assert before.lateness.counts[metrics.LATENESS_BUCKETS.index(0.01)] == 1

    _fold(fold_db)
    after = _read(fold_db)
    assert after.lateness == before.lateness and after.notifications == before.notifications
    assert (after.escalations_due, after.escalations_overdue) == (1, 1)
    assert (after.sweep_runs, after.sweep_handovers, after.sweep_redeliveries) == (1, 2, 1)
    with fold_db() as session:
        rollup = session.scalars(select(metrics.MetricsRollup)).one()
        rows = session.scalars(select(metrics.NotificationRollup))
        folded = {(row.channel, row.status): row.counts[-1] for row in rows}
        unsent_at = session.scalar(text("SELECT created_at FROM notifications WHERE status = 'PENDING'"))
    assert rollup.lateness_counts[-1] == 2  # both executions are in the rollup now
    assert rollup.notifications_before == unsent_at
    assert folded == {("webhook", "SENT"): 1, ("email", "FAILED"): 1}
    assert after.notifications[("webhook", "SENT")].count == 2
    assert after.notifications[("sms", "PENDING")].count == 1

    # The unsent one is sent: the next fold takes it and everything after it.
    with fold_db.begin() as session:
        session.execute(
            text("UPDATE notifications SET status = 'SENT', sent_at = now() WHERE status = 'PENDING'")
        )
    sent = _read(fold_db)
    assert ("sms", "PENDING") not in sent.notifications and sent.notifications[("sms", "SENT")].count == 1
    _fold(fold_db, lag=metrics.FOLD_LAG)  # the default lag: rows from the last minutes stay live
    assert _read(fold_db).notifications == sent.notifications
    with fold_db() as session:
        assert session.scalar(text("SELECT count(*) FROM metrics_rollup_notifications")) == 3


def test_new_bucket_bounds_restart_the_counts(fold_db):
    with fold_db.begin() as session:
        _insert(
            session,
            uuid.uuid4(),
            escalations=[("EXECUTED", "10 minutes", "10 minutes")],
            notifications=[
                ("sms", "SENT", "10 minutes", "9 minutes"),
                ("email", "FAILED", "10 minutes", None),
            ],
        )
    _fold(fold_db)
    with fold_db.begin() as session:
        session.execute(text("UPDATE metrics_rollup SET lateness_bounds = '{1, 2}', delivery_bounds = '{1}'"))
        _insert(
            session,
            uuid.uuid4(),
            escalations=[("EXECUTED", "1 second", "0 seconds")],
            notifications=[("sms", "SENT", "0 seconds", "0 seconds")],
        )
    # What was folded with other bounds is dropped (Prometheus sees a counter reset); the rows since
    # the watermark count, and the next fold stores them with today's bounds.
    for _ in range(2):
        figures = _read(fold_db)
        assert figures.lateness.count == 1 and figures.notifications[("sms", "SENT")].count == 1
        assert figures.notifications[("email", "FAILED")].count == 0
        _fold(fold_db)


# -- gunicorn's metrics directory ----------------------------------------------------------------------


def test_gunicorn_empties_a_given_metrics_directory_and_makes_one_otherwise(tmp_path, monkeypatch):
    master = SimpleNamespace(master_pid=0, reexec_pid=0)
    given = tmp_path / "given"
    given.mkdir()
    (given / "counter_123.db").write_bytes(b"a previous run's counts")
    (given / "notes.txt").write_text("not ours")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    monkeypatch.setattr(gunicorn_config, "_made", None)
    gunicorn_config.on_starting(master)
    assert sorted(p.name for p in given.iterdir()) == ["notes.txt"]
    gunicorn_config.on_exit(master)
    assert given.exists()  # not ours to remove

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile reads TMPDIR once
    gunicorn_config.on_starting(master)
    made = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert made.parent == tmp_path and made.is_dir()
    gunicorn_config.on_exit(master)
    assert not made.exists()


# -- the dashboard and the alerts ----------------------------------------------------------------------

# What PromQL spells with letters that is not a metric: functions are followed by "(".
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "offset"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings: label values, legend formats
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [5m], [$__rate_interval]
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    words = re.findall(r"(?<![\w$.])([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()", expr)
    return set(words) - PROMQL_WORDS


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    # Importable: the data source is asked for on import, and every panel reads it.
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert panels and all(panel["datasource"]["uid"] == "${DS_PROMETHEUS}" for panel in panels)
    return [target["expr"] for panel in panels for target in panel["targets"]]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    for rule in rules:
        assert rule["alert"] and rule["labels"]["severity"] and rule["annotations"]["summary"], rule
    exprs = {rule["alert"]: rule["expr"] for rule in rules}
    # The alerts the issue asks for.
    assert "incident_escalations_overdue" in exprs["EscalationsOverdue"]
    assert "histogram_quantile(0.99" in exprs["EscalationLatenessHigh"]
    assert 'status="FAILED"' in exprs["NotificationDeliveryFailures"]
    assert exprs["EscalationSweepStalled"] == "time() - max(incident_sweep_last_run_timestamp_seconds) > 60"
    return list(exprs.values())


def test_the_dashboard_and_the_alerts_name_only_metrics_the_service_exports(stack):
    # A request first: the request metrics appear once one was counted, and under pytest-xdist this
    # test may have the module's stack to itself.
    assert stack.http.get(f"{stack.http.base}/nowhere", timeout=10).status_code == 404
    exported = scrape(stack.metrics).names() | scrape(stack.worker_metrics, token=None).names()
    for exprs in (dashboard_exprs(), alert_exprs()):
        named = set().union(*map(metric_names, exprs))
        assert len(named) >= 5, named
        assert named <= exported, f"not exported: {sorted(named - exported)}"


def test_metric_names_are_found_in_promql():
    expr = (
        "histogram_quantile(0.99, max by (le, channel)"
        ' (rate(a_bucket{status=~"5..", x="y"}[$__rate_interval])))'
        " / on (job) group_left sum without (instance) (b_total offset 5m)"
        " > bool 2 and time() - c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
