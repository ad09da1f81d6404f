"""LOG_FORMAT=json: web (gunicorn's own lines and the access log included) and worker write one JSON
object per line, with the ids each line is about; every request has an id, echoed back."""

from __future__ import annotations

import json
import uuid

import requests

from tests.conftest import insert_key
from tests.support import processes
from tests.support.waiting import eventually


def json_lines(path) -> list[dict]:
    """Every line of the log, each of which must be a JSON object with the four fields."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= set(line), line
    return lines


def test_web_and_worker_write_json_lines_with_the_ids_they_are_about(process_env, app, tmp_path):
    env = {**process_env, "LOG_FORMAT": "json", "CELERY_QUEUE": f"logs-{uuid.uuid4().hex[:8]}"}
    web = processes.web(env, tmp_path, name="web-json", workers=1).start()
    worker = processes.worker(env, tmp_path, name="worker-json").start()
    beat = processes.beat(env, tmp_path, name="beat-json").start()
    try:
        base = f"http://127.0.0.1:{web.port}"
        headers = {
            **insert_key(app.extensions["db"], tenant=f"logs-{uuid.uuid4().hex[:6]}"),
            "Connection": "close",
        }
        created = requests.post(
            f"{base}/incidents",
            json={"title": "json logs", "policy": "single"},
            headers={**headers, "X-Request-ID": "req-42.a"},
            timeout=10,
        )
        assert created.status_code == 201 and created.headers["X-Request-ID"] == "req-42.a"
        incident_id = created.json()["id"]
        escalated = requests.post(f"{base}/incidents/{incident_id}/escalate", headers=headers, timeout=10)
        generated = escalated.headers["X-Request-ID"]
        assert len(generated) == 32 and generated != "req-42.a"
        # An id that is not one (spaces, quotes, too long) is replaced, never written into the logs.
        for forged_id in ('forged" "level": "ERROR', "forged" * 30):
            forged = requests.get(f"{base}/health", headers={"X-Request-ID": forged_id}, timeout=10)
            assert len(forged.headers["X-Request-ID"]) == 32

        def executed():
            return [
                line
                for line in json_lines(worker.log_path)
                if "EXECUTING level 1" in line["message"] and line.get("incident_id") == incident_id
            ]

        (execution,) = eventually(executed, timeout=30)
        assert execution["escalation_id"] and execution["logger"] == "escalation"
        assert any(line["logger"].startswith("celery") for line in json_lines(worker.log_path))
    finally:
        for proc in (web, worker, beat):
            proc.stop()
    assert any("beat: Starting" in line["message"] for line in json_lines(beat.log_path))
    lines = json_lines(web.log_path)
    scheduled = [line for line in lines if "Scheduled level 1" in line["message"]]
    assert [(s["incident_id"], s["request_id"]) for s in scheduled] == [(incident_id, generated)]
    assert any(line["logger"] == "gunicorn.error" for line in lines)  # the arbiter's own lines
    access = [line for line in lines if line["logger"] == "gunicorn.access"]
    assert any(f"/incidents/{incident_id}/escalate" in line["message"] for line in access)
    assert "forged" not in web.log_path.read_text()
