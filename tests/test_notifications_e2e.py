"""Notifications end to end: a real gunicorn, an escalation worker with the sweeps, a notifier worker,
and real receivers (an aiosmtpd SMTP server, HTTP listeners for webhooks, Slack and a Twilio-compatible
API). Levels fire by a fast policy; what the receivers got is what a person would have got."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import pytest
from standardwebhooks import Webhook

from tests.conftest import RUN_ID, insert_key
from tests.support import processes
from tests.support.receivers import HttpReceiver, Reply, SmtpSink
from tests.support.servers import api_session
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e

POLICY = """\
default_policy: pages
policies:
  pages:
    levels:
      - {delay: 300ms, notify: [in_app, email, webhook, slack, sms]}
      - {delay: 1s, notify: [email]}
  # Level 2 far enough out to resolve before it: what was not sent must never be.
  slow_second:
    levels:
      - {delay: 300ms, notify: [webhook]}
      - {delay: 1h, notify: [webhook, email]}
  email_only:
    levels:
      - {delay: 200ms, notify: [email]}
  sms_only:
    levels:
      - {delay: 100ms, notify: [sms]}
"""


@contextmanager
def running_stack(migrated_database, process_env, directory, name: str, **settings: str):
    """A database, receivers, web, escalation worker (with beat) and notifier of their own."""
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    smtp, hooks, twilio = SmtpSink().start(), HttpReceiver().start(), HttpReceiver.twilio().start()
    database_url = migrated_database(name)
    env = {
        **process_env,
        "DATABASE_URL": database_url,
        "ESCALATION_POLICY_FILE": str(policy),
        "CELERY_QUEUE": f"test-{RUN_ID}-{name}-e2e",
        "CELERY_NOTIFY_QUEUE": f"test-{RUN_ID}-{name}-e2e-send",
        "SMTP_URL": smtp.url,
        "NOTIFY_EMAIL_FROM": "pager@example.com",
        "TWILIO_ACCOUNT_SID": "AC0123456789",
        "TWILIO_AUTH_TOKEN": "twilio-token",
        "TWILIO_FROM": "+15005550006",
        "TWILIO_API_URL": twilio.url,
        "NOTIFY_ALLOW_PRIVATE_URLS": "1",
        **settings,
    }
    web = processes.web(env, directory, name=f"web-{name}").start()
    worker = processes.worker(env, directory, name=f"worker-{name}", beat=True).start()
    notifier_env = {**env, "CELERY_QUEUE": env["CELERY_NOTIFY_QUEUE"]}
    notifier = processes.worker(notifier_env, directory, name=f"notifier-{name}").start()
    from models.db import make_engine, make_session_factory

    db = make_session_factory(make_engine(database_url, pool_size=2))
    http = api_session(
        insert_key(db, tenant=f"{name}-{uuid.uuid4().hex[:6]}"), f"http://127.0.0.1:{web.port}"
    )
    try:
        yield Stack(http, smtp, hooks, twilio, db)
    finally:
        for proc in (notifier, worker, web):
            proc.stop()
        for server in (smtp, hooks, twilio):
            server.stop()
        db.kw["bind"].dispose()


@pytest.fixture(scope="module")
def stack(migrated_database, process_env, tmp_path_factory):
    """This module's stack. A 4 s throttle window, so that a digest goes out within the test."""
    directory = tmp_path_factory.mktemp("notify")
    settings = {"NOTIFY_RATE_WINDOW": "4", "NOTIFY_RATE_SMS": "3"}
    with running_stack(migrated_database, process_env, directory, "notify", **settings) as stack:
        yield stack


class Stack:
    def __init__(self, http, smtp, hooks, twilio, db):
        self.http, self.smtp, self.hooks, self.twilio, self.db = http, smtp, hooks, twilio, db

    def post(self, path: str, body: dict | None = None, expect: int = 200) -> dict:
        response = self.http.post(self.http.base + path, json=body, timeout=15)
        assert response.status_code == expect, response.text
        return response.json() if response.content else {}

    def get(self, path: str) -> dict:
        response = self.http.get(self.http.base + path, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def contact(self, channel: str, address: str, **body) -> dict:
        return self.post(
            "/contacts", {"name": f"{channel} on call", "channel": channel, "address": address, **body}, 201
        )

    def escalating(self, policy: str, title: str = "Checkout returns 502") -> str:
        incident = self.post("/incidents", {"title": title, "severity": "critical", "policy": policy}, 201)
        self.post(f"/incidents/{incident['id']}/escalate")
        return incident["id"]

    def log(self, incident_id: str) -> list[dict]:
        return self.get(f"/incidents/{incident_id}/notifications")["items"]

    def mails_about(self, incident_id: str) -> list:
        return [m for m in self.smtp.messages if incident_id in m.message.get_content()]

    def hooks_about(self, incident_id: str) -> list:
        return [r for r in self.hooks.requests if incident_id.encode() in r.body]

    def disable_all_contacts(self) -> None:
        for contact in self.get("/contacts?limit=100")["items"]:
            response = self.http.delete(f"{self.http.base}/contacts/{contact['id']}", timeout=10)
            assert response.status_code == 204


@pytest.fixture
def s(stack):
    """The module's stack, with no contact left over from the previous test."""
    stack.disable_all_contacts()
    stack.hooks.unscript()
    return stack


def test_a_level_reaches_every_channel_and_the_delivery_log_says_so(s):
    email = s.contact("email", "oncall@example.com")
    hook = s.contact("webhook", f"{s.hooks.url}/hooks/incidents")
    s.contact("slack", f"{s.hooks.url}/slack/T000/B000")
    s.contact("sms", "+1 (415) 555-2671")
    incident_id = s.escalating("pages")

    eventually(lambda: len(s.mails_about(incident_id)) == 2, timeout=30, interval=0.3)
    eventually(lambda: len(s.hooks_about(incident_id)) == 2 and s.twilio.requests, timeout=30, interval=0.3)
    eventually(lambda: all(n["status"] != "PENDING" for n in s.log(incident_id)), timeout=15, interval=0.3)

    # Email: one per level, the level and severity in the subject, a Message-ID from the notification.
    subjects = sorted(m.message["Subject"] for m in s.mails_about(incident_id))
    assert "Level 1" in subjects[0] and "Level 2" in subjects[1] and "CRITICAL" in subjects[0].upper()
    log = s.log(incident_id)
    sent_email = [n for n in log if n["channel"] == "email"]
    assert [n["status"] for n in sent_email] == ["SENT", "SENT"]
    assert {m.message["Message-ID"] for m in s.mails_about(incident_id)} == {
        n["provider_id"] for n in sent_email
    }
    assert all(n["id"] in n["provider_id"] for n in sent_email)

    # The webhook is signed per Standard Webhooks, with the secret the contact was created with.
    (webhook,) = [r for r in s.hooks_about(incident_id) if r.path == "/hooks/incidents"]
    payload = Webhook(hook["secret"]).verify(webhook.body, webhook.headers)
    assert payload["type"] == "incident.escalated" and payload["data"]["incident"]["id"] == incident_id
    assert payload["data"]["level"] == 1
    (slack,) = [r for r in s.hooks_about(incident_id) if r.path.startswith("/slack/")]
    assert slack.json()["blocks"]

    # SMS through the Twilio-compatible API, to the normalised number.
    (sms,) = s.twilio.requests
    form = dict(pair.split("=", 1) for pair in sms.body.decode().split("&"))
    assert form["To"] == "%2B14155552671" and sms.path == "/2010-04-01/Accounts/AC0123456789/Messages.json"

    # Every row accounted for: the in-app entry and four providers at level 1, email at level 2.
    assert sorted((n["level"], n["channel"], n["status"]) for n in log) == [
        (1, "email", "SENT"),
        (1, "in_app", "SENT"),
        (1, "slack", "SENT"),
        (1, "sms", "SENT"),
        (1, "webhook", "SENT"),
        (2, "email", "SENT"),
    ]
    inbox = s.get("/notifications?unread=true")["items"]
    assert [n["incident_id"] for n in inbox if n["incident_id"] == incident_id] == [incident_id]
    events = [e["type"] for e in s.get(f"/incidents/{incident_id}/events")["items"]]
    assert events.count("notification_sent") == 5  # in-app entries need no delivery
    contact_log = s.get(f"/contacts/{email['id']}/notifications")["items"]
    assert {n["incident_id"] for n in contact_log} == {incident_id}


def test_levels_pick_the_contacts_they_reach(s):
    first = s.contact("email", "first@example.com", levels=[1])
    second = s.contact("email", "second@example.com", levels=[2])
    s.contact("email", "nobody@example.com", enabled=False)
    incident_id = s.escalating("pages")
    eventually(lambda: len(s.mails_about(incident_id)) == 2, timeout=30, interval=0.3)
    time.sleep(1)  # nothing more arrives
    to = sorted((m.message["Subject"].split(":")[0], m.rcpt_tos[0]) for m in s.mails_about(incident_id))
    assert [rcpt for _, rcpt in to] == ["first@example.com", "second@example.com"]
    assert {n["contact_id"] for n in s.log(incident_id) if n["channel"] == "email"} == {
        first["id"],
        second["id"],
    }


def test_webhook_failing_twice_is_sent_once_with_the_same_id_and_a_valid_signature_each_time(s):
    hook = s.contact("webhook", f"{s.hooks.url}/flaky")
    s.hooks.script(503, 503, 200)
    incident_id = s.escalating("slow_second")
    eventually(lambda: len(s.hooks_about(incident_id)) == 3, timeout=30, interval=0.3)
    eventually(lambda: s.log(incident_id)[0]["status"] == "SENT", timeout=10, interval=0.3)
    attempts = s.hooks_about(incident_id)
    assert len({r.headers["webhook-id"] for r in attempts}) == 1
    for request in attempts:
        Webhook(hook["secret"]).verify(request.body, request.headers)
    (row,) = s.log(incident_id)
    assert row["attempts"] == 3 and row["id"] == attempts[0].headers["webhook-id"]
    time.sleep(2)
    assert len(s.hooks_about(incident_id)) == 3


def test_smtp_down_when_the_level_fires_is_sent_once_it_is_back(s):
    s.contact("email", "oncall@example.com")
    s.smtp.stop()
    try:
        incident_id = s.escalating("email_only")
        eventually(lambda: (s.log(incident_id) or [{}])[0].get("attempts", 0) >= 1, timeout=20, interval=0.3)
        (row,) = s.log(incident_id)
        assert row["status"] == "PENDING" and row["last_error"]
        time.sleep(3)
    finally:
        s.smtp.start()
    eventually(lambda: len(s.mails_about(incident_id)) == 1, timeout=40, interval=0.3)
    eventually(lambda: s.log(incident_id)[0]["status"] == "SENT", timeout=10, interval=0.3)
    time.sleep(2)
    assert len(s.mails_about(incident_id)) == 1


def test_resolve_skips_what_was_not_sent_and_status_updates_follow(s):
    # The webhook answers 503 for a while: level 1's alert to it is still being retried at resolve.
    failing = s.contact("webhook", f"{s.hooks.url}/down")
    updates = s.contact("webhook", f"{s.hooks.url}/updates")
    s.hooks.script(200, *([503] * 50))
    incident_id = s.escalating("slow_second")
    eventually(lambda: len(s.hooks_about(incident_id)) >= 3, timeout=30, interval=0.2)
    s.post(f"/incidents/{incident_id}/resolve", {"note": "rolled back"})
    resolved_at = time.time()
    time.sleep(6)  # longer than the retries' backoff so far
    s.hooks.unscript()
    log = {(n["contact_id"], n["type"]): n for n in s.log(incident_id)}
    paged = [c for c in (failing, updates) if log[(c["id"], "incident.escalated")]["status"] == "SENT"]
    unsent = [c for c in (failing, updates) if c not in paged]
    assert len(paged) == 1 and len(unsent) == 1
    assert log[(unsent[0]["id"], "incident.escalated")]["status"] == "SKIPPED"
    # Nothing reached the unpaged contact's URL after the resolve committed...
    late = [r for r in s.hooks_about(incident_id) if r.at > resolved_at and b"incident.escalated" in r.body]
    assert late == []
    # ...and the paged one was told of the resolution, once.
    eventually(
        lambda: log_status(s, incident_id, paged[0]["id"], "incident.resolved") == "SENT",
        timeout=30,
        interval=0.3,
    )
    assert (unsent[0]["id"], "incident.resolved") not in {
        (n["contact_id"], n["type"]) for n in s.log(incident_id)
    }


def log_status(s, incident_id, contact_id, type_) -> str | None:
    rows = [n for n in s.log(incident_id) if n["contact_id"] == contact_id and n["type"] == type_]
    return rows[0]["status"] if rows else None


def test_a_storm_to_one_phone_is_throttled_and_bundled_and_every_incident_is_in_some_message(s):
    phone = s.contact("sms", "+14155550100")
    before = len(s.twilio.requests)
    ids = [s.escalating("sms_only", title=f"storm {i}") for i in range(25)]
    eventually(
        lambda: (
            all(n["status"] in ("SENT", "BUNDLED") for i in ids for n in s.log(i))
            and all(s.log(i) for i in ids)
        ),
        timeout=60,
        interval=0.5,
    )
    sent = s.twilio.requests[before:]
    # 3 per 4 s window at most, and far fewer messages than incidents.
    times = sorted(r.at for r in sent)
    assert all(later - earlier >= 4 - 0.5 for earlier, later in zip(times, times[3:], strict=False))
    assert len(sent) < 12
    rows = [n for i in ids for n in s.log(i)]
    bundled = [n for n in rows if n["status"] == "BUNDLED"]
    assert bundled and all(n["digest_id"] for n in bundled)
    digests = {n["digest_id"] for n in bundled}
    log = s.get(f"/contacts/{phone['id']}/notifications?limit=100")["items"]
    assert {n["id"] for n in log if n["type"] == "notification.digest" and n["status"] == "SENT"} == digests
    bodies = " ".join(r.body.decode() for r in sent)
    assert "more" in bodies or "incidents" in bodies


def test_a_contact_test_message_checks_the_wiring(s):
    contact = s.contact("email", "wiring@example.com")
    notification = s.post(f"/contacts/{contact['id']}/test", expect=202)
    eventually(
        lambda: any(notification["id"] in m.message["Message-ID"] for m in s.smtp.messages), timeout=20
    )


def test_a_deliverer_message_from_before_deliverers_took_several_contacts_is_still_delivered(s, process_env):
    """A rolling deploy: a notifier of this version gets a message naming one contact, not a list."""
    import redis
    from celery import Celery

    contact = s.contact("email", "rolling@example.com")
    # The contact's wake-up flag up, as if a deliverer were on its way: the API publishes none.
    flags = redis.Redis.from_url(process_env["REDIS_URL"])
    flags.set(f"notify-wake:{contact['id']}", "1", ex=60)
    notification = s.post(f"/contacts/{contact['id']}/test", expect=202)
    time.sleep(1)
    assert not any(notification["id"] in m.message["Message-ID"] for m in s.smtp.messages)
    old = Celery(broker=process_env["REDIS_URL"])
    old.send_task("notifications.deliver", args=(contact["id"],), queue=f"test-{RUN_ID}-notify-e2e-send")
    eventually(
        lambda: any(notification["id"] in m.message["Message-ID"] for m in s.smtp.messages), timeout=20
    )


def test_a_level_that_comes_while_its_contact_is_being_sent_to_follows_at_once(
    migrated_database, process_env, tmp_path_factory
):
    """A deliverer woken for a contact whose rows another deliverer is sending leaves them to that
    one, which claims again as it ends: the second page follows the first, not the sweep (whose
    grace is a minute here)."""
    directory = tmp_path_factory.mktemp("handover")
    with running_stack(
        migrated_database, process_env, directory, "handover", ESCALATION_REDELIVERY_GRACE="60"
    ) as s:
        s.hooks.default = Reply(body=lambda: time.sleep(1.5) or b"ok")  # a slow receiver
        s.contact("webhook", f"{s.hooks.url}/hooks/slow")
        first = s.escalating("slow_second")
        eventually(lambda: s.hooks_about(first), timeout=10, interval=0.05)
        second = s.escalating("slow_second")  # its level falls due while the first is being sent
        (request,) = eventually(lambda: s.hooks_about(second), timeout=15, interval=0.1)
        (first_request,) = s.hooks_about(first)
        # After the first answer, not a minute later.
        assert request.at - first_request.at < 5
