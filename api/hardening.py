"""What every response carries, the forwarded headers believed, and the API docs served offline."""

from __future__ import annotations

import swagger_ui_bundle
from flask import Flask, redirect, request, send_from_directory
from werkzeug.middleware.proxy_fix import ProxyFix

from api.config import Settings

# Swagger UI's files, from a pinned package: /docs works offline, and no CDN runs script on the
# API's origin.
SWAGGER_UI_ASSETS = "/docs/assets/"
HSTS = "max-age=31536000; includeSubDomains"


def init_app(app: Flask, settings: Settings) -> None:
    if settings.trusted_proxies:
        # The client's address and scheme as the router saw them (access logs, https checks).
        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)

    app.add_url_rule(
        f"{SWAGGER_UI_ASSETS}<path:filename>",
        "swagger_ui_assets",
        lambda filename: send_from_directory(swagger_ui_bundle.swagger_ui_path, filename, max_age=86400),
    )

    if settings.force_https:

        @app.before_request
        def to_https():
            if not request.is_secure:
                # 308 keeps the method and body: a POST is not turned into a GET.
                return redirect(request.url.replace("http://", "https://", 1), code=308)
            return None

    @app.after_request
    def headers(response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.endpoint != "swagger_ui_assets":
            # Incidents, keys' answers and secrets are never kept by a browser or a shared cache.
            response.headers["Cache-Control"] = "no-store"
        if settings.force_https:
            response.headers["Strict-Transport-Security"] = HSTS
        return response
