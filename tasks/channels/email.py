"""Email through SMTP with the standard library: STARTTLS when offered (smtps:// for implicit TLS).

The Message-ID is derived from the notification id, so a message resent after a lost
acknowledgement is recognisably the same one (mail clients and the provider id both show it).
"""

from __future__ import annotations

import functools
import smtplib
import socket
import ssl
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from urllib.parse import unquote, urlsplit

from tasks.channels import ChannelSettings, Message, Outcome, text
from tasks.channels.deadline import Deadline

DEFAULT_PORTS = {"smtp": 25, "smtps": 465}


def send(message: Message, settings: ChannelSettings) -> Outcome:
    """Deliver one email; 5xx replies fail at once, 4xx replies and connection problems are retried."""
    try:
        mail = compose(message, settings)
    except ValueError as error:  # e.g. an address EmailMessage cannot put in a header
        return Outcome("failed", error=f"cannot compose the email: {error}"[:200])
    message_id = mail["Message-ID"]
    deadline = Deadline(settings.attempt_timeout_s)
    try:
        with deadline:
            _deliver(mail, settings, deadline)
    except smtplib.SMTPRecipientsRefused as error:
        code, reply = next(iter(error.recipients.values()))
        return _reply_outcome(code, reply, "recipient refused")
    except smtplib.SMTPAuthenticationError as error:
        # A wrong password does not heal by retrying; the error names no credentials.
        return Outcome("failed", error=f"SMTP authentication failed ({error.smtp_code})")
    except smtplib.SMTPResponseException as error:
        return _reply_outcome(error.smtp_code, error.smtp_error, "refused")
    except _CannotSend as error:
        return Outcome("failed", error=str(error))
    except (smtplib.SMTPException, OSError) as error:
        if deadline.expired:
            return Outcome("retry", error=f"SMTP server: no complete answer within {deadline.seconds:g} s")
        return Outcome("retry", error=f"SMTP server unreachable or disconnected ({type(error).__name__})")
    return Outcome("sent", provider_id=message_id)


def compose(message: Message, settings: ChannelSettings) -> EmailMessage:
    """The email for `message`: subject, plain-text body and a Message-ID fixed by the notification id."""
    mail = EmailMessage()
    mail["Subject"] = text.subject(message)
    mail["From"] = settings.email_from
    mail["To"] = message.address
    mail["Date"] = format_datetime(message.created_at)
    mail["Message-ID"] = message_id(message, settings)
    mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: out-of-office replies should not answer
    if message.incident:
        mail["X-Incident-Id"] = str(message.incident.get("id"))
    mail.set_content(body(message, settings))
    return mail


def message_id(message: Message, settings: ChannelSettings) -> str:
    """`<notification_id@domain of NOTIFY_EMAIL_FROM>`: the same on every attempt."""
    domain = parseaddr(settings.email_from)[1].rpartition("@")[2] or "localhost"
    return f"<{message.notification_id}@{domain}>"


def body(message: Message, settings: ChannelSettings) -> str:
    """What happened, the incident's state, and how to acknowledge it."""
    if message.type == "notification.test":
        return (
            f"This is a test notification from the incident escalation service at {settings.public_url}.\n"
            "If you can read it, notifications to this address work.\n"
        )
    if message.type == "notification.digest":
        lines = "\n".join(f"  {line}" for line in text.digest_lines(message))
        return (
            f"{text.headline(message)} while this address was at its message limit:\n\n{lines}\n\n"
            f"Each one is at {settings.public_url}/incidents/<id>; acknowledge one with\n"
            f"  POST {settings.public_url}/incidents/<id>/acknowledge\n"
        )
    incident = message.incident or {}
    if message.type in ("incident.escalated", "incident.reescalated"):
        again = " again" if message.type == "incident.reescalated" else ""
        opening = f"Incident escalated to level {message.level}{again}."
        closing = f"To acknowledge it:\n  {text.acknowledge_request(settings, incident)}\n"
    else:
        opening = f"Incident {message.type.removeprefix('incident.')}."
        closing = ""
    description = str(incident.get("description") or "").strip()
    return (
        f"{opening}\n\n"
        f"  {text.title(message)}\n"
        f"  Severity: {incident.get('severity')}\n"
        f"  State:    {incident.get('state')}\n"
        f"  Opened:   {incident.get('created_at')}\n"
        f"  Incident: {incident.get('id')}\n\n"
        + (f"{description}\n\n" if description else "")
        + closing
        + f"Details: {text.incident_url(settings, incident)}\n"
    )


class _CannotSend(Exception):
    """The settings or the server's capabilities rule sending out, whatever the retries."""


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context per process, made when first needed: loading the system's CA bundle
    cost about 28 ms of CPU, most of what an email took when every message made its own (bench/NOTES)."""
    return ssl.create_default_context()


def _deliver(mail: EmailMessage, settings: ChannelSettings, deadline: Deadline) -> None:
    target = urlsplit(settings.smtp_url or "")
    if target.scheme not in DEFAULT_PORTS or not target.hostname:
        raise _CannotSend("SMTP_URL must be smtp://[user:pass@]host:port or smtps://...")
    implicit_tls = _tls_context() if target.scheme == "smtps" else None
    smtp = _BoundedSMTP(deadline, implicit_tls, timeout=settings.connect_timeout_s)
    try:
        smtp.connect(target.hostname, target.port or DEFAULT_PORTS[target.scheme])
        smtp.ehlo_or_helo_if_needed()
        encrypted = implicit_tls is not None
        if not encrypted and smtp.has_extn("starttls"):
            smtp.starttls(context=_tls_context())
            smtp.ehlo()
            encrypted = True
        if target.username:
            if not encrypted:
                raise _CannotSend("SMTP server offers no STARTTLS: credentials are not sent in clear")
            smtp.login(unquote(target.username), unquote(target.password or ""))
        smtp.send_message(mail)
    finally:
        _quit_quietly(smtp)


class _BoundedSMTP(smtplib.SMTP):
    """smtplib.SMTP whose socket the Deadline watches from the moment TCP connects (before the
    greeting and any TLS handshake), with implicit TLS (smtps) when given a context."""

    def __init__(self, deadline: Deadline, implicit_tls: ssl.SSLContext | None, timeout: float) -> None:
        self._deadline = deadline
        self._implicit_tls = implicit_tls
        super().__init__(timeout=timeout)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        # smtplib's own hook for making the connection (SMTP_SSL overrides it the same way).
        sock = super()._get_socket(host, port, timeout)
        self._deadline.watch(sock)
        # Per-read timeouts may now be as long as the attempt: the Deadline ends it on time. A second
        # beyond it, so that the Deadline (whose error says why) always fires first: with the same
        # value the socket's own timeout won half of the races and read as "disconnected".
        sock.settimeout(self._deadline.remaining() + 1.0)
        if self._implicit_tls is not None:
            sock = self._implicit_tls.wrap_socket(sock, server_hostname=host)
        return sock


def _quit_quietly(smtp: smtplib.SMTP) -> None:
    # The message is accepted once DATA is answered 250: a QUIT that fails after it must not turn a
    # sent message into a retry (a second copy), so its errors are ignored.
    try:
        if smtp.sock is not None:
            smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()


def _reply_outcome(code: int, reply: bytes | str, what: str) -> Outcome:
    words = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    words = " ".join(words.split())[:200]
    status = "failed" if code >= 500 else "retry"
    return Outcome(status, error=f"SMTP {what}: {code} {words}")
