"""GET /metrics, for Prometheus: the web's requests, counted in every gunicorn process, and what
Postgres holds (models/metrics.py), read at scrape time; so one scrape of the one process a PaaS
routes to covers the whole service.

Each gunicorn process counts its own requests. Under gunicorn, PROMETHEUS_MULTIPROC_DIR is set before
the processes start (api/gunicorn_config.py): each one writes its counts to files there, and whichever
one answers the scrape adds them all up. Without it (the Flask test client, `flask run`), the one
process's counts are served.
"""

from __future__ import annotations

import hmac
import logging
import os
import time

from flask import Flask, Response, current_app, g, request
from flask_smorest import abort
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import SQLAlchemyError

from api.config import Settings
from models import metrics
from models.contact import CONTACT_CHANNELS
from models.notification import FINAL_STATUSES, NotificationStatus

logger = logging.getLogger("api")

# This process's requests: read from here only without multiprocess mode.
REQUESTS_REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "incident_http_requests",
    "Requests answered, by route template, method and status",
    ["route", "method", "status"],
    registry=REQUESTS_REGISTRY,
)
DURATION = Histogram(
    "incident_http_request_duration_seconds",
    "Time the app took to answer a request, by route template and method",
    ["route", "method"],
    registry=REQUESTS_REGISTRY,
)
# Labels take a bounded set of values: a route's template, never the path a client sent.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # no route (404, 405)


def init_app(app: Flask, settings: Settings) -> None:
    """Count every request, and serve /metrics. /metrics is left out of the OpenAPI document: it is
    not part of the API, and answers in Prometheus's text format."""

    @app.before_request
    def start_clock() -> None:
        g.metrics_started = time.perf_counter()

    @app.after_request
    def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else UNMATCHED
        method = request.method if request.method in METHODS else "other"
        REQUESTS.labels(route, method, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:  # None: a hook registered before ours answered first
            DURATION.labels(route, method).observe(time.perf_counter() - started)
        return response

    app.add_url_rule("/metrics", "metrics", lambda: scrape(settings.metrics_token))


def scrape(token: str | None) -> Response:
    """The metrics in Prometheus's text format; with METRICS_TOKEN set, for its bearer only."""
    if token is not None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            abort(
                401,
                message="Missing token: send 'Authorization: Bearer <METRICS_TOKEN>'.",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            abort(
                401,
                message="Wrong metrics token.",
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MultiProcessCollector(None, directory) if directory else REQUESTS_REGISTRY)
    registry.register(DatabaseFigures(_read_figures()))
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def _read_figures() -> metrics.Figures | None:
    """None when the database does not answer: the requests' metrics are still served, which is
    when they matter most."""
    try:
        with current_app.extensions["db"]() as session:
            return metrics.read(session)
    except SQLAlchemyError as exc:
        logger.warning("metrics: the database did not answer (%s)", exc.__class__.__name__)
        return None


class DatabaseFigures:
    """A collector of what Postgres holds, read once for this scrape."""

    def __init__(self, figures: metrics.Figures | None):
        self.figures = figures

    def collect(self):
        figures = self.figures
        yield GaugeMetricFamily(
            "incident_database_up",
            "1 when this scrape read the figures Postgres holds; 0 when it did not answer (they are missing)",
            value=0 if figures is None else 1,
        )
        if figures is None:
            return
        lateness = HistogramMetricFamily(
            "incident_escalation_lateness_seconds",
            "Escalations executed, by how long after they were due (executed_at - scheduled_at, the "
            "database's clock)",
        )
        lateness.add_metric([], _buckets(figures.lateness, metrics.LATENESS_BUCKETS), figures.lateness.sum)
        yield lateness
        yield GaugeMetricFamily(
            "incident_escalations_due",
            "PENDING escalations already due, at the last sweep",
            figures.escalations_due,
        )
        yield GaugeMetricFamily(
            "incident_escalations_overdue",
            "PENDING escalations due for longer than ESCALATION_REDELIVERY_GRACE, at the last sweep",
            figures.escalations_overdue,
        )
        yield GaugeMetricFamily(
            "incident_sweep_last_run_timestamp_seconds",
            "When the escalation sweep last ran, by the database's clock (0: not since the upgrade)",
            figures.sweep_at.timestamp() if figures.sweep_at else 0,
        )
        yield CounterMetricFamily("incident_sweep_runs", "Escalation sweeps run", figures.sweep_runs)
        yield CounterMetricFamily(
            "incident_sweep_handovers",
            "Escalations the sweep handed to the broker (re-deliveries included)",
            figures.sweep_handovers,
        )
        yield CounterMetricFamily(
            "incident_sweep_redeliveries",
            "Escalations the sweep handed over already overdue: the broker lost them, or never got them",
            figures.sweep_redeliveries,
        )
        yield from _notifications(figures.notifications)


def _notifications(tallies: dict[tuple[str, str], metrics.Tally]):
    final = CounterMetricFamily(
        "incident_notifications",
        "Notifications that reached a final status (SENT, FAILED, SKIPPED, BUNDLED), by channel",
        labels=["channel", "status"],
    )
    waiting = GaugeMetricFamily(
        "incident_notifications_waiting",
        "Notifications not sent yet (PENDING, SENDING), by channel",
        labels=["channel", "status"],
    )
    delivery = HistogramMetricFamily(
        "incident_notification_delivery_seconds",
        "Notifications SENT, by how long after they were created (a level's execution, a transition)",
        labels=["channel"],
    )
    # Every contact channel's series from the start, at 0: a rate needs a sample before the first event.
    zero = metrics.Tally.zero(metrics.DELIVERY_BUCKETS)
    every = {(channel, status.value): zero for channel in CONTACT_CHANNELS for status in NotificationStatus}
    for (channel, status), tally in sorted({**every, **tallies}.items()):
        (final if status in FINAL_STATUSES else waiting).add_metric([channel, status], tally.count)
        if status == NotificationStatus.SENT:
            delivery.add_metric([channel], _buckets(tally, metrics.DELIVERY_BUCKETS), tally.sum)
    yield from (final, waiting, delivery)


def _buckets(tally: metrics.Tally, bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    finite = zip(bounds, tally.counts[:-1], strict=True)
    return [(floatToGoString(bound), n) for bound, n in finite] + [("+Inf", tally.count)]
