"""Log lines: readable text by default; with LOG_FORMAT=json, one JSON object per line (timestamp,
level, logger, message, and the ids a line is about: request_id, incident_id, escalation_id,
notification_id) from web (gunicorn included), worker, notifier and beat alike."""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from datetime import UTC, datetime

from gunicorn.glogging import Logger as GunicornLogger

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The ids a line may carry (logger.info(..., extra={"incident_id": ...})), in this order.
IDS = ("request_id", "incident_id", "escalation_id", "notification_id", "contact_id", "key_id")
# A client's X-Request-ID is kept when it looks like an id, and replaced otherwise: it goes into
# every log line of the request and back out in a header.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def json_lines() -> bool:
    return os.environ.get("LOG_FORMAT", "text").lower() == "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in IDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class RequestContext(logging.Filter):
    """Adds the request id of the request being served (web) to its records."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flask import g, has_request_context

        if getattr(record, "request_id", None) is None and has_request_context():
            record.request_id = g.get("request_id")
        return True


def formatter() -> logging.Formatter:
    return JsonFormatter() if json_lines() else logging.Formatter(TEXT_FORMAT)


def configure() -> None:
    """The root logger's one handler, on stderr (a PaaS collects both streams)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        if getattr(handler, "_incidents", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._incidents = True  # ours: replaced, not stacked, when the app is built again (tests)
    handler.setFormatter(formatter())
    handler.addFilter(RequestContext())
    root.addHandler(handler)
    # Python's warnings (Celery's about running as root, say) as records too: one format per line.
    logging.captureWarnings(True)


def request_id(header: str | None) -> str:
    """The client's X-Request-ID when it is a plausible id, else a new one."""
    if header and REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def init_app(app) -> None:
    """Every request has an id: the client's X-Request-ID or a new one, in each of its log lines
    and back in the answer's X-Request-ID."""
    from flask import g, request

    @app.before_request
    def assign_request_id() -> None:
        g.request_id = request_id(request.headers.get("X-Request-ID"))

    @app.after_request
    def echo_request_id(response):
        if "request_id" in g:
            response.headers["X-Request-ID"] = g.request_id
        return response


class Gunicorn(GunicornLogger):
    """gunicorn's own lines (the arbiter's, each worker's and the access log) in the same format
    (the Procfile's --logger-class)."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        if json_lines():
            for log in (self.error_log, self.access_log):
                for handler in log.handlers:
                    handler.setFormatter(JsonFormatter())
