"""Each provider against a real local server (aiosmtpd, http.server, raw sockets): what arrives, and how
every kind of answer or silence is classified. Nothing is mocked."""

from __future__ import annotations

import base64
import dataclasses
import shutil
import ssl
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qs

import pytest
from standardwebhooks import Webhook

from tasks.channels import ChannelSettings, Message, Outcome, send
from tasks.channels import http as outbound
from tasks.channels.deadline import Deadline
from tasks.channels.sms import body as sms_body
from tasks.channels.webhook import new_secret
from tests.support.receivers import HangListener, HttpReceiver, Reply, SmtpSink
from tests.support.servers import free_port, wait_until

INCIDENT_ID = "3f2c9a1e-7b4d-4c6e-9f10-2a8b7c6d5e4f"
INCIDENT = {
    "id": INCIDENT_ID,
    "title": "Checkout returns 502",
    "description": "Payments <gateway> & friends time out",
    "severity": "critical",
    "state": "ESCALATING",
    "created_at": "2030-01-02T03:04:05+00:00",
}
PUBLIC_URL = "http://incidents.test:5000"


@pytest.fixture
def smtp():
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def receiver():
    with HttpReceiver() as listener:
        yield listener


def settings(**overrides) -> ChannelSettings:
    values = {
        "email_from": "Incidents <incidents@example.com>",
        "public_url": PUBLIC_URL,
        "allow_private_urls": True,
        "twilio_account_sid": "AC0123456789abcdef",
        "twilio_auth_token": "tok-SECRET-0123",
        "twilio_from": "+14155550100",
    }
    return ChannelSettings(**{**values, **overrides})


def message(channel: str, address: str, type: str = "incident.escalated", **fields) -> Message:
    values = {
        "notification_id": str(uuid.uuid4()),
        "type": type,
        "channel": channel,
        "address": address,
        "incident": INCIDENT,
        "level": 2,
        "created_at": datetime(2030, 1, 2, 3, 5, tzinfo=UTC),
    }
    return Message(**{**values, **fields})


def digest(channel: str, address: str, **fields) -> Message:
    members = tuple(
        {"id": str(uuid.uuid4()), "title": f"Disk full on db-{n}", "severity": "high", "level": 1}
        for n in range(3)
    )
    return message(
        channel,
        address,
        "notification.digest",
        incident=None,
        level=None,
        digest=members,
        digest_total=37,
        **fields,
    )


# --- settings and dispatch -----------------------------------------------------------------------


def test_settings_from_env_defaults_and_missing():
    empty = ChannelSettings.from_env({})
    assert (empty.email_from, empty.public_url, empty.twilio_api_url) == (
        "incidents@localhost",
        "http://127.0.0.1:5000",
        "https://api.twilio.com",
    )
    assert (empty.allow_private_urls, empty.connect_timeout_s, empty.attempt_timeout_s) == (False, 3, 10)
    assert empty.missing_for("email") == "SMTP_URL"
    assert empty.missing_for("sms") == "TWILIO_ACCOUNT_SID"
    assert [empty.missing_for(c) for c in ("webhook", "slack", "in_app")] == [None, None, None]

    env = {"SMTP_URL": "smtp://h:25", "TWILIO_ACCOUNT_SID": "AC1", "TWILIO_AUTH_TOKEN": "t"}
    partial = ChannelSettings.from_env({**env, "NOTIFY_ALLOW_PRIVATE_URLS": "1", "PUBLIC_URL": "https://x/"})
    assert partial.missing_for("email") is None and partial.missing_for("sms") == "TWILIO_FROM"
    assert partial.allow_private_urls and partial.public_url == "https://x"
    assert "tok-SECRET" not in repr(settings())  # logs of settings never show the token


def test_unconfigured_and_unknown_channels_fail_without_raising():
    outcome = send(message("sms", "+14155552671"), ChannelSettings())
    assert outcome == Outcome("failed", error="sms is not configured: TWILIO_ACCOUNT_SID is not set")
    assert send(message("email", "a@example.com"), ChannelSettings()).error.endswith("SMTP_URL is not set")
    assert send(message("pager", "x"), settings()).status == "failed"
    assert send(message("in_app", ""), settings()).status == "sent"  # the inbox row is the delivery


# --- email -------------------------------------------------------------------------------------------


def test_email_arrives_with_subject_body_and_message_id(smtp):
    note = message("email", "oncall@example.com")
    outcome = send(note, settings(smtp_url=smtp.url))

    assert outcome == Outcome("sent", provider_id=f"<{note.notification_id}@example.com>")
    [mail] = smtp.messages
    assert mail.rcpt_tos == ["oncall@example.com"]
    assert mail.message["Subject"] == "[CRITICAL] Level 2: Checkout returns 502"
    assert mail.message["Message-ID"] == outcome.provider_id
    assert mail.message["Date"] == format_datetime(note.created_at)
    text = mail.message.get_content()
    assert "escalated to level 2" in text and "ESCALATING" in text
    assert f"POST {PUBLIC_URL}/incidents/{INCIDENT_ID}/acknowledge" in text
    assert f"Details: {PUBLIC_URL}/incidents/{INCIDENT_ID}" in text.splitlines()


def test_resent_email_is_recognisably_the_same(smtp):
    note = message("email", "oncall@example.com")
    first, second = send(note, settings(smtp_url=smtp.url)), send(note, settings(smtp_url=smtp.url))
    assert first == second
    assert [m.message["Message-ID"] for m in smtp.messages] == [first.provider_id] * 2


@pytest.mark.parametrize(
    ("kind", "subject", "words"),
    [
        ("incident.resolved", "[CRITICAL] Resolved: Checkout returns 502", "Incident resolved."),
        ("incident.acknowledged", "[CRITICAL] Acknowledged: Checkout returns 502", "Incident acknowledged."),
        ("incident.cancelled", "[CRITICAL] Cancelled: Checkout returns 502", "Incident cancelled."),
        ("incident.reescalated", "[CRITICAL] Level 2 (re-escalated): Checkout returns 502", "level 2 again"),
        ("notification.test", "[TEST] Test notification", "notifications to this address work"),
    ],
)
def test_email_subjects_for_every_message_type(smtp, kind, subject, words):
    assert send(message("email", "a@example.com", kind), settings(smtp_url=smtp.url)).status == "sent"
    [mail] = smtp.messages
    assert mail.message["Subject"] == subject
    assert words in mail.message.get_content()


def test_email_digest_lists_its_incidents(smtp):
    note = digest("email", "a@example.com")
    assert send(note, settings(smtp_url=smtp.url)).status == "sent"
    [mail] = smtp.messages
    assert mail.message["Subject"] == "[INCIDENTS] 37 more incidents escalated"
    text = mail.message.get_content()
    assert all(member["title"] in text for member in note.digest) and "... and 34 more" in text


@pytest.mark.parametrize(
    ("stage", "reply", "status"),
    [
        ("rcpt_reply", "550 5.1.1 No such user", "failed"),
        ("rcpt_reply", "451 4.3.0 Try again later", "retry"),
        ("data_reply", "554 5.6.0 Message rejected", "failed"),
        ("data_reply", "452 4.3.1 Insufficient storage", "retry"),
    ],
)
def test_email_refusals_are_classified_by_reply_code(smtp, stage, reply, status):
    setattr(smtp, stage, reply)
    outcome = send(message("email", "nobody@example.com"), settings(smtp_url=smtp.url))
    assert outcome.status == status
    assert reply.split()[0] in outcome.error and outcome.provider_id is None
    assert smtp.messages == []


def test_email_is_retried_while_smtp_is_down_and_sent_once_it_is_back(smtp):
    note = message("email", "oncall@example.com")
    smtp.stop()
    down = send(note, settings(smtp_url=smtp.url))
    assert down.status == "retry" and "unreachable" in down.error
    smtp.start()  # the same port
    assert send(note, settings(smtp_url=smtp.url)).status == "sent"
    assert len(smtp.messages) == 1


@pytest.mark.parametrize("drip_every", [None, 0.3])
def test_silent_or_trickling_smtp_server_is_bounded_by_the_attempt_deadline(drip_every):
    # A short attempt keeps the test fast; the webhook test below uses the real 10 s.
    with HangListener(drip_every=drip_every) as silent:
        started = time.monotonic()
        outcome = send(
            message("email", "a@example.com"),
            settings(smtp_url=f"smtp://127.0.0.1:{silent.port}", attempt_timeout_s=1.5),
        )
        elapsed = time.monotonic() - started
    assert outcome.status == "retry" and "within 1.5 s" in outcome.error
    assert elapsed < 5


def test_title_with_a_line_break_stays_on_the_subject_line(smtp):
    broken = {**INCIDENT, "title": "Checkout\r\nBcc: everyone@example.com"}
    assert (
        send(message("email", "a@example.com", incident=broken), settings(smtp_url=smtp.url)).status == "sent"
    )
    [mail] = smtp.messages
    assert mail.message["Subject"] == "[CRITICAL] Level 2: Checkout Bcc: everyone@example.com"
    assert mail.rcpt_tos == ["a@example.com"] and mail.message["Bcc"] is None


def test_smtp_credentials_are_not_sent_without_tls(smtp):
    outcome = send(
        message("email", "a@example.com"), settings(smtp_url=f"smtp://user:pw@127.0.0.1:{smtp.port}")
    )
    assert outcome.status == "failed" and "STARTTLS" in outcome.error and "pw" not in outcome.error


# --- webhook -----------------------------------------------------------------------------------------


def verify(request, secret: str) -> dict:
    return Webhook(secret).verify(request.body, request.headers)


def test_webhook_is_signed_per_standard_webhooks(receiver):
    secret = new_secret()
    note = message("webhook", f"{receiver.url}/in", secret=secret)
    assert send(note, settings()) == Outcome("sent", provider_id="200")

    [request] = receiver.requests
    assert (request.method, request.path) == ("POST", "/in")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == note.notification_id
    assert request.headers["webhook-signature"].startswith("v1,")
    assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 5
    assert verify(request, secret) == {
        "type": "incident.escalated",
        "timestamp": "2030-01-02T03:05:00+00:00",
        "data": {"incident": INCIDENT, "level": 2, "notification_id": note.notification_id},
    }
    with pytest.raises(Exception, match="signature"):
        Webhook(new_secret()).verify(request.body, request.headers)


def test_webhook_retries_keep_the_id_and_sign_each_attempt_again(receiver):
    secret = new_secret()
    note = message("webhook", receiver.url, secret=secret)
    receiver.script(503, 503, 200)
    outcomes = [send(note, settings())]
    for _ in range(2):
        time.sleep(1.05)  # webhook-timestamp has a resolution of one second
        outcomes.append(send(note, settings()))
    assert [o.status for o in outcomes] == ["retry", "retry", "sent"]
    assert outcomes[0].provider_id == "503" and outcomes[0].error == "answered 503"

    assert {r.headers["webhook-id"] for r in receiver.requests} == {note.notification_id}
    stamps = [int(r.headers["webhook-timestamp"]) for r in receiver.requests]
    assert stamps == sorted(set(stamps))  # a fresh timestamp on every attempt
    assert all(
        verify(r, secret)["data"]["notification_id"] == note.notification_id for r in receiver.requests
    )


def test_webhook_digest_carries_incidents_and_total(receiver):
    secret = new_secret()
    note = digest("webhook", receiver.url, secret=secret)
    assert send(note, settings()).status == "sent"
    document = verify(receiver.requests[0], secret)
    assert document["type"] == "notification.digest"
    assert document["data"] == {
        "incidents": list(note.digest),
        "total": 37,
        "notification_id": note.notification_id,
    }


def test_new_secret_is_32_random_bytes_in_whsec_form():
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert secret != new_secret()


@pytest.mark.parametrize(
    ("reply", "status", "retry_after", "error"),
    [
        (Reply(429, b"slow down", {"Retry-After": "7"}), "retry", 7.0, "answered 429"),
        (Reply(503, b"", {"Retry-After": "0"}), "retry", 0.0, "answered 503"),
        (Reply(500), "retry", None, "answered 500"),
        (Reply(408), "retry", None, "answered 408"),
        (Reply(404), "failed", None, "answered 404"),
        (Reply(400), "failed", None, "answered 400"),
        (Reply(410), "failed", None, "answered 410: the endpoint is gone"),
        (Reply(204, b""), "sent", None, None),
    ],
)
def test_webhook_answers_are_classified(receiver, reply, status, retry_after, error):
    receiver.script(reply)
    outcome = send(message("webhook", receiver.url, secret=new_secret()), settings())
    assert outcome == Outcome(status, provider_id=str(reply.status), error=error, retry_after_s=retry_after)


def test_retry_after_as_an_http_date(receiver):
    later = datetime.now(UTC) + timedelta(seconds=120)
    receiver.script(429, retry_after=format_datetime(later, usegmt=True))
    outcome = send(message("webhook", receiver.url, secret=new_secret()), settings())
    assert outcome.status == "retry" and 100 < outcome.retry_after_s <= 120


def test_parse_retry_after():
    now = datetime(2030, 1, 1, tzinfo=UTC)
    assert outbound.parse_retry_after("Tue, 01 Jan 2030 00:00:30 GMT", now) == 30
    assert outbound.parse_retry_after("Mon, 31 Dec 2029 23:00:00 GMT", now) == 0
    assert outbound.parse_retry_after("2.5") == 2.5
    assert outbound.parse_retry_after("soon") is None and outbound.parse_retry_after(None) is None


def test_redirects_are_not_followed(receiver):
    with HttpReceiver() as elsewhere:
        receiver.script(Reply(302, b"", {"Location": f"{elsewhere.url}/stolen"}))
        outcome = send(message("webhook", receiver.url, secret=new_secret()), settings())
        assert outcome.status == "failed" and "redirects are not followed" in outcome.error
        assert elsewhere.requests == []


def test_connection_refused_is_retried():
    outcome = send(message("webhook", f"http://127.0.0.1:{free_port()}/", secret=new_secret()), settings())
    assert outcome.status == "retry" and outcome.error == "127.0.0.1: connection refused"


def test_listener_that_never_answers_is_given_up_on_within_the_attempt_bound():
    with HangListener() as silent:
        started = time.monotonic()
        outcome = send(message("webhook", silent.url, secret=new_secret()), settings())
        elapsed = time.monotonic() - started
        assert silent.accepted == 1
    assert outcome.status == "retry" and "no complete answer within 10 s" in outcome.error
    assert elapsed < 15


def test_trickling_listener_is_cut_at_the_attempt_deadline_not_per_read():
    # A byte every 0.3 s: a per-read timeout would never fire.
    with HangListener(drip_every=0.3) as trickle:
        started = time.monotonic()
        outcome = send(message("webhook", trickle.url, secret=new_secret()), settings(attempt_timeout_s=1.5))
        elapsed = time.monotonic() - started
    assert outcome.status == "retry" and "within 1.5 s" in outcome.error
    assert elapsed < 5


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_private_targets_are_refused_at_send_time_unless_allowed(receiver, host):
    url = f"https://{host}:{receiver.port}/in"
    outcome = send(message("webhook", url, secret=new_secret()), settings(allow_private_urls=False))
    assert outcome.status == "failed" and "unsafe URL" in outcome.error and "loopback" in outcome.error
    plain = send(message("webhook", receiver.url, secret=new_secret()), settings(allow_private_urls=False))
    assert plain.status == "failed" and "https://" in plain.error
    assert receiver.requests == []
    assert send(message("webhook", receiver.url, secret=new_secret()), settings()).status == "sent"


def test_connected_peer_is_checked_again_before_anything_is_sent(receiver):
    # The URL check passed for a name that then resolved elsewhere (DNS rebinding) cannot be staged
    # without owning a DNS server, so this drives the guarded connection pool directly: the TCP
    # connection to a loopback peer is made, and closed before a byte of the request is sent.
    pool = outbound._GuardedHTTPPool("127.0.0.1", receiver.port)
    with Deadline(5) as deadline:
        token = outbound._current.set(outbound._Attempt(deadline, allow_private_urls=False))
        try:
            with pytest.raises(
                outbound.UnsafePeer, match="connected address 127.0.0.1 is a loopback address"
            ):
                pool.urlopen("POST", "/in", body=b"{}", retries=False)
        finally:
            outbound._current.reset(token)
            pool.close()
    assert receiver.requests == []


@pytest.fixture(scope="module")
def localhost_certificate(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_https_checks_the_certificate_against_the_host_name(localhost_certificate):
    cert, key = localhost_certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with HttpReceiver(ssl_context=context) as secure:
        url = f"https://localhost:{secure.port}/in"
        body, headers = b"{}", {"Content-Type": "application/json"}
        outcome, _ = outbound.post(url, settings(), headers=headers, data=body, verify=str(cert))
        assert outcome.status == "sent"
        # The certificate names localhost, not 127.0.0.1: the name is what is checked.
        wrong_name = f"https://127.0.0.1:{secure.port}/in"
        outcome, _ = outbound.post(wrong_name, settings(), headers=headers, data=body, verify=str(cert))
        assert (
            outcome.status == "retry" and outcome.error == "127.0.0.1: TLS failed (certificate or handshake)"
        )
        assert len(secure.requests) == 1


# --- sms ---------------------------------------------------------------------------------------------


def test_sms_posts_twilio_form_fields_with_basic_auth():
    with HttpReceiver.twilio() as twilio:
        # TWILIO_API_URL is the operator's setting, not a user's URL: a local gateway is allowed.
        config = settings(twilio_api_url=twilio.url, allow_private_urls=False)
        outcome = send(message("sms", "+14155552671"), config)
        assert (
            outcome.status == "sent"
            and outcome.provider_id.startswith("SM")
            and len(outcome.provider_id) == 34
        )
        [request] = twilio.requests
    assert request.path == "/2010-04-01/Accounts/AC0123456789abcdef/Messages.json"
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert (
        base64.b64decode(request.headers["authorization"].removeprefix("Basic "))
        == b"AC0123456789abcdef:tok-SECRET-0123"
    )
    form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
    assert form["To"] == "+14155552671" and form["From"] == "+14155550100"
    assert (
        form["Body"] == f"[CRITICAL] L2 #3f2c9a1e: Checkout returns 502 {PUBLIC_URL}/incidents/{INCIDENT_ID}"
    )


def test_sms_body_fits_one_message_and_keeps_the_essentials():
    long_incident = {**INCIDENT, "title": "Database primary failover loops " * 10}
    for kind in ("incident.escalated", "incident.reescalated", "incident.resolved", "notification.test"):
        text = sms_body(message("sms", "+14155552671", kind, incident=long_incident), settings())
        assert len(text) <= 160
    text = sms_body(message("sms", "+14155552671", incident=long_incident), settings())
    assert text.startswith("[CRITICAL] L2 #3f2c9a1e: Database primary failover") and "..." in text
    digest_text = sms_body(digest("sms", "+14155552671"), settings())
    assert (
        digest_text.startswith("[INCIDENTS] 37 more incidents escalated: Disk full on db-0")
        and len(digest_text) <= 160
    )


def test_sms_refusals_say_why_without_the_token():
    with HttpReceiver.twilio() as twilio:
        twilio.script(Reply(400, b'{"code": 21211, "message": "Invalid \'To\' Phone Number"}'), 503)
        refused = send(message("sms", "+14155552671"), settings(twilio_api_url=twilio.url))
        busy = send(message("sms", "+14155552671"), settings(twilio_api_url=twilio.url))
    assert refused.status == "failed" and "21211" in refused.error and "tok-SECRET" not in refused.error
    assert busy.status == "retry"


# --- slack -------------------------------------------------------------------------------------------


def test_slack_gets_blocks_and_a_text_fallback(receiver):
    outcome = send(message("slack", f"{receiver.url}/services/T0/B0/XYZ"), settings())
    assert outcome == Outcome("sent", provider_id="200")
    document = receiver.requests[0].json()
    assert document["text"] == "[CRITICAL] Level 2: Checkout returns 502"
    header, section, description, context = document["blocks"]
    assert header == {
        "type": "header",
        "text": {"type": "plain_text", "text": "Level 2: Checkout returns 502"},
    }
    fields = [field["text"] for field in section["fields"]]
    assert fields[:3] == ["*Severity*\nCRITICAL", "*Level*\n2", "*State*\nESCALATING"]
    assert fields[3] == f"*Incident*\n<{PUBLIC_URL}/incidents/{INCIDENT_ID}|3f2c9a1e>"
    assert description["text"]["text"] == "Payments &lt;gateway&gt; &amp; friends time out"
    assert "acknowledge" in context["elements"][0]["text"]


def test_slack_digest_and_status_update(receiver):
    assert send(digest("slack", receiver.url), settings()).status == "sent"
    assert send(message("slack", receiver.url, "incident.resolved"), settings()).status == "sent"
    digest_doc, resolved_doc = (r.json() for r in receiver.requests)
    assert digest_doc["blocks"][0]["text"]["text"] == "37 more incidents escalated"
    assert "Disk full on db-2" in digest_doc["blocks"][1]["text"]["text"]
    assert resolved_doc["text"] == "[CRITICAL] Resolved: Checkout returns 502"
    assert len(resolved_doc["blocks"]) == 3  # no acknowledge hint once resolved


def test_slack_errors_keep_slacks_word_but_not_the_secret_url(receiver):
    receiver.script(Reply(404, b"channel_not_found"))
    url = f"{receiver.url}/services/T0/B0/SECRETPATH"
    outcome = send(message("slack", url), settings())
    assert outcome == Outcome("failed", provider_id="404", error="answered 404: channel_not_found")
    receiver.stop()
    down = send(message("slack", url), settings())
    assert down.status == "retry" and "SECRETPATH" not in down.error


def test_messages_are_frozen_and_keep_the_secret_out_of_repr():
    note = message("webhook", "https://example.com/", secret="whsec_c2VjcmV0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        note.address = "https://example.org/"  # type: ignore[misc]
    assert "whsec_" not in repr(note)


def test_smtp_sink_restarts_on_the_same_port(smtp):
    port = smtp.port
    smtp.restart()
    assert smtp.port == port
    assert send(message("email", "a@example.com"), settings(smtp_url=smtp.url)).status == "sent"
    wait_until(lambda: len(smtp.messages) == 1, 5, what="the message")
