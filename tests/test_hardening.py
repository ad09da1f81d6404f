"""What every response carries, the forwarded headers believed only behind a configured proxy, https
enforced behind a router, /docs offline, and logs that name neither a key nor a tenant's data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from api import create_app
from api.config import ConfigError
from tests.support.servers import free_port, port_open, wait_until
from tests.test_setup import PROJECT_ROOT, procfile


def test_api_answers_are_never_stored_nor_sniffed(client, make_key):
    for response in (
        client.get("/incidents", headers=make_key()),
        client.get("/incidents"),  # the 401 too
        client.get("/health"),
    ):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Cache-Control"] == "no-store"
        assert "Strict-Transport-Security" not in response.headers  # only with FORCE_HTTPS=1


def test_docs_load_swagger_ui_from_the_service_itself(client):
    page = client.get("/docs").get_data(as_text=True)
    assert "cdn." not in page and "https://" not in page
    assert '"/docs/assets/swagger-ui-bundle.js"' in page
    # (Each answer closed: a file's answer holds the file open until then.)
    with client.get("/docs/assets/swagger-ui-bundle.js") as script:
        assert script.status_code == 200 and b"SwaggerUIBundle" in script.data
        assert "max-age" in script.headers["Cache-Control"]  # the files may be kept; answers not
    with client.get("/docs/assets/swagger-ui.css") as style:
        assert style.status_code == 200
    with client.get("/docs/assets/../../api/config.py") as outside:
        assert outside.status_code == 404


def test_force_https_without_a_trusted_proxy_is_refused(database_url):
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES"):
        create_app({"DATABASE_URL": database_url, "FORCE_HTTPS": "1"})


def test_force_https_redirects_plain_http_and_sends_hsts(database_url, make_key):
    app = create_app({"DATABASE_URL": database_url, "FORCE_HTTPS": "1", "TRUSTED_PROXIES": "1"})
    client = app.test_client()
    plain = client.post("/incidents", json={"title": "x"}, headers={"X-Forwarded-Proto": "http"})
    assert plain.status_code == 308  # the method and body are kept
    assert plain.headers["Location"] == "https://localhost/incidents"
    secure = client.get("/health", headers={"X-Forwarded-Proto": "https"})
    assert secure.status_code == 200
    assert secure.headers["Strict-Transport-Security"].startswith("max-age=")


def test_database_errors_are_logged_without_the_values(database_url, caplog):
    """Neither SQLAlchemy's parameter list nor Postgres's own message (which quotes the value it
    refused) reaches the log; the statement and the SQLSTATE do."""
    from api.db import db_session

    app = create_app({"DATABASE_URL": database_url})
    refused = "db-secret-title"  # (a line of its own: the traceback shows the view's source line)
    app.add_url_rule(
        "/test-only/refused-value",
        "refused_value",
        lambda: db_session().execute(text("SELECT CAST(:title AS integer)"), {"title": refused}),
    )
    with caplog.at_level("ERROR", logger="api"):
        response = app.test_client().get("/test-only/refused-value")
    assert response.status_code == 500 and response.get_json()["code"] == 500
    logged = caplog.text
    assert "CAST(%(title)s AS integer)" in logged and "SQLSTATE 22P02" in logged
    assert "db-secret-title" not in logged


@pytest.mark.parametrize(("trusted_proxies", "client_address"), [("1", "203.0.113.9"), ("0", "127.0.0.1")])
def test_the_access_log_has_the_client_and_the_key_id_never_the_key(
    process_env, make_key, tmp_path, trusted_proxies, client_address
):
    """The Procfile's web, behind one trusted proxy (a PaaS router) or none: X-Forwarded-For is
    believed only from a trusted proxy."""
    headers = make_key(f"t-{uuid.uuid4().hex[:12]}")
    secret = headers["Authorization"].split()[1]
    port = free_port()
    log = tmp_path / "web.log"
    env = {
        **process_env,
        "PORT": str(port),
        "TRUSTED_PROXIES": trusted_proxies,
        "WEB_CONCURRENCY": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["sh", "-c", procfile()["web"]],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # sh may not exec gunicorn: stop the whole group
        )
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 60, what="web")
        response = requests.get(
            f"http://127.0.0.1:{port}/incidents?limit=1",
            headers={**headers, "X-Forwarded-For": "203.0.113.9"},
            timeout=10,
        )
        assert response.status_code == 200
        wait_until(lambda: "/incidents?limit=1" in log.read_text(), 10, what="the access log line")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    (line,) = [line for line in log.read_text().splitlines() if "/incidents?limit=1" in line]
    assert line.startswith(f"{client_address} key=")
    key_id = line.split()[1].removeprefix("key=")
    assert uuid.UUID(key_id) and secret not in log.read_text()
