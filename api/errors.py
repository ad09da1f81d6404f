"""One JSON error shape for everything: {"code", "status", "message", "errors"?}."""

from __future__ import annotations

import logging
import traceback

from flask import Flask
from flask_smorest import Api
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable

logger = logging.getLogger("api")


# Clearer than Werkzeug's descriptions for the errors a client can fix.
MESSAGES = {
    400: "The request body is not valid JSON.",
    422: "The request is invalid: `errors` names each field and what is wrong with it.",
}


class IncidentApi(Api):
    """flask-smorest's Api, with a `message` on every error."""

    def handle_http_exception(self, error: HTTPException):
        data = getattr(error, "data", None) or {}
        if "message" not in data:
            data = {**data, "message": MESSAGES.get(error.code, error.description)}
        # flask-smorest answers with only the headers passed to abort(): keep those Werkzeug's
        # exception carries, such as Allow on a 405 (which HTTP requires).
        carried = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        if carried:
            data = {**data, "headers": {**carried, **data.get("headers", {})}}
        error.data = data
        return super().handle_http_exception(error)


def init_app(app: Flask, api: IncidentApi) -> None:
    """Map database outages to 503 and anything unexpected to a JSON 500 without a traceback."""

    def unavailable(error: Exception):
        logger.warning("database unavailable: %s", error.__class__.__name__)
        return api.handle_http_exception(
            ServiceUnavailable("The database is unavailable; try again shortly.")
        )

    def unexpected(error: Exception):
        if isinstance(error, HTTPException):
            return api.handle_http_exception(error)
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return unavailable(error)
        if isinstance(error, DBAPIError):
            # The statement and where it ran, never the server's message: Postgres quotes the values
            # it refused (a title, a note, an address), and those are the tenants' data.
            logger.error(
                "unexpected database error %s (SQLSTATE %s) in: %s\n%s",
                type(error.orig).__name__,
                getattr(error.orig, "pgcode", None),
                error.statement,
                "".join(traceback.format_tb(error.__traceback__)),
            )
        else:
            logger.exception("unexpected error")
        return api.handle_http_exception(InternalServerError())

    app.register_error_handler(OperationalError, unavailable)
    app.register_error_handler(PoolTimeoutError, unavailable)
    app.register_error_handler(Exception, unexpected)
