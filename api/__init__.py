"""The Flask application factory. Nothing connects or reads files at import time."""

from __future__ import annotations

from typing import Any

import click
from flask import Flask

from api.config import Settings
from models.db import make_engine, make_session_factory
from models.policy import PolicyError, load_policies


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app: settings and policy validated, database, Celery, errors, blueprints, CLI.

    `overrides` replaces environment variables (tests use it to point at their own database).
    """
    import os

    from api import (
        bodies,
        cli,
        contacts,
        db,
        errors,
        hardening,
        health,
        incidents,
        limits,
        logs,
        metrics,
        notifications,
        policies,
    )
    from tasks.celery import celery_init_app
    from tasks.channels import ChannelSettings

    env = {**os.environ, **(overrides or {})}
    settings = Settings.from_env(env)
    # An invalid policy stops the process here, naming the file and the field: as a command's error
    # (no traceback) when a command loads the app, `flask --app api policy check` among them.
    try:
        policy_file = load_policies(settings.policy_file)
    except PolicyError as error:
        if click.get_current_context(silent=True) is None:
            raise
        raise click.ClickException(str(error)) from None

    app = Flask("incidents")
    app.config.update(
        SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.max_body_bytes,
        API_TITLE="Incident escalation service",
        API_VERSION="1.0",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL=hardening.SWAGGER_UI_ASSETS,
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
        },
    )
    logs.configure()

    app.extensions["engine_settings"] = settings.engine
    app.extensions["policies"] = policy_file
    app.extensions["channel_settings"] = ChannelSettings.from_env(env)
    app.extensions["db"] = make_session_factory(make_engine(settings.database_url))
    celery_init_app(app)

    api = errors.IncidentApi(app, spec_kwargs={"extra_plugins": [limits.TooManyRequestsDoc(app)]})
    errors.init_app(app, api)
    logs.init_app(app)
    metrics.init_app(app, settings)  # before any hook that may answer early: every answer is counted
    hardening.init_app(app, settings)  # first: a plain-http request is redirected before anything
    bodies.init_app(app)
    db.init_app(app)
    limits.init_app(app, settings.rate_limits)
    api.register_blueprint(health.blp)
    api.register_blueprint(incidents.blp)
    api.register_blueprint(notifications.incident_blp)
    api.register_blueprint(contacts.blp)
    api.register_blueprint(notifications.blp)
    policies.init_app(app, api)
    # What a schema's own validator enforces beyond its fields, which apispec cannot read: a PATCH
    # must name at least one field (ContactUpdateSchema.not_empty).
    api.spec.components.schemas["ContactUpdate"]["minProperties"] = 1
    app.cli.add_command(cli.keys)
    app.cli.add_command(cli.policy)
    return app
