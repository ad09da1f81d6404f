"""The one outbound HTTP POST behind the webhook, Slack and SMS channels, and how its answers are read.

Safety: the URL is checked before the attempt (scheme, and every address its host resolves to), and
the connection itself is checked again once it is open, against the peer address it actually
reached, before a byte is sent. The second check is the one that counts: a name that resolved to a
public address for the first check and to 127.0.0.1 for urllib3's own lookup (DNS rebinding) is
refused there, and the TLS name check still uses the host name, unlike connecting to a pinned IP.

Bounds: connect timeout 3 s, whole attempt 10 s (a Deadline shuts the socket down, since requests'
read timeout is per read); no redirects; no proxies or .netrc from the environment; at most 64 KiB
of the answer is read.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
import ssl
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from models.addresses import InvalidAddress, UnresolvableHost, check_url_target, unsafe_reason
from tasks.channels import ChannelSettings, Outcome
from tasks.channels.deadline import Deadline

MAX_ANSWER_BYTES = 64 * 1024
USER_AGENT = "incident-escalation-notifier/1"


class UnsafePeer(Exception):
    """The connection reached an address the safety check refuses (raised before anything is sent)."""


class _Attempt:
    """What a connection opened during one post() must obey: its deadline and the address policy."""

    def __init__(self, deadline: Deadline, allow_private_urls: bool) -> None:
        self.deadline = deadline
        self.allow_private_urls = allow_private_urls


# The attempt in progress in this thread: requests gives its connections no way to carry it.
_current: contextvars.ContextVar[_Attempt] = contextvars.ContextVar("outbound_attempt")


class _GuardedConnectionMixin:
    def _new_conn(self) -> socket.socket:
        # urllib3's hook between "TCP connected" and "first byte (TLS hello or request) sent".
        sock = super()._new_conn()  # type: ignore[misc]
        attempt = _current.get()
        peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
        reason = None if attempt.allow_private_urls else unsafe_reason(peer)
        if reason:
            sock.close()
            raise UnsafePeer(f"connected address {peer} is a {reason} address")
        attempt.deadline.watch(sock)
        return sock


class _GuardedHTTPConnection(_GuardedConnectionMixin, urllib3.connection.HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedConnectionMixin, urllib3.connection.HTTPSConnection):
    pass


class _GuardedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


def post(
    url: str,
    settings: ChannelSettings,
    *,
    headers: dict[str, str],
    data: bytes | dict[str, str],
    auth: tuple[str, str] | None = None,
    verify: bool | str = True,
    operator_url: bool = False,
) -> tuple[Outcome, bytes]:
    """POST once within the settings' bounds; the Outcome (provider_id = HTTP status) and the answer."""
    host = urlsplit(url).hostname or "?"
    # The address checks keep users' URLs off internal networks; a URL from the server's own
    # settings (operator_url: TWILIO_API_URL) may point at an internal gateway on purpose.
    allow_private = settings.allow_private_urls or operator_url
    try:
        check_url_target(url, allow_private_urls=allow_private)
    except UnresolvableHost as error:
        return Outcome("retry", error=str(error)), b""  # DNS may be down for a moment
    except InvalidAddress as error:
        return Outcome("failed", error=f"unsafe URL: {error}"), b""

    with Deadline(settings.attempt_timeout_s) as deadline, requests.Session() as session:
        session.trust_env = False  # no proxy (it would defeat the peer check) and no .netrc credentials
        session.mount("http://", _GuardedAdapter(max_retries=0))
        session.mount("https://", _GuardedAdapter(max_retries=0))
        token = _current.set(_Attempt(deadline, allow_private))
        try:
            response = session.post(
                url,
                headers={"User-Agent": USER_AGENT, **headers},
                data=data,
                auth=auth,
                verify=verify,
                allow_redirects=False,
                stream=True,
                timeout=(settings.connect_timeout_s, settings.attempt_timeout_s),
            )
            with response:
                body = response.raw.read(MAX_ANSWER_BYTES, decode_content=True) or b""
        except UnsafePeer as error:
            return Outcome("failed", error=f"unsafe URL: {error}"), b""
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            return Outcome("retry", error=_describe(error, host, deadline)), b""
        finally:
            _current.reset(token)
    return classify(response.status_code, response.headers.get("Retry-After")), body


def _describe(error: Exception, host: str, deadline: Deadline) -> str:
    # Our own words: requests' messages quote the URL, and a Slack URL's path is its secret.
    if deadline.expired:
        return f"{host}: no complete answer within {deadline.seconds:g} s"
    if isinstance(error, requests.ConnectTimeout):
        return f"{host}: connection timed out"
    if isinstance(error, requests.Timeout):
        return f"{host}: no answer in time"
    if isinstance(error, requests.exceptions.SSLError) or isinstance(error.__context__, ssl.SSLError):
        return f"{host}: TLS failed (certificate or handshake)"
    if _caused_by(error, ConnectionRefusedError):
        return f"{host}: connection refused"
    return f"{host}: connection failed ({type(error).__name__})"


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    # requests wraps urllib3's error, which names the OSError as `reason` or as its cause.
    pending: list[object] = [error]
    for _ in range(20):
        if not pending:
            return False
        current = pending.pop()
        if isinstance(current, kind):
            return True
        if isinstance(current, BaseException):
            pending += [current.__cause__, getattr(current, "reason", None), *current.args[:1]]
    return False


def classify(status: int, retry_after: str | None) -> Outcome:
    """An HTTP status as an Outcome: 2xx sent; 408, 429 and 5xx retry; redirects and other 4xx failed."""
    if 200 <= status < 300:
        return Outcome("sent", provider_id=str(status))
    if status in (408, 429) or status >= 500:
        return Outcome(
            "retry",
            provider_id=str(status),
            error=f"answered {status}",
            retry_after_s=parse_retry_after(retry_after),
        )
    if 300 <= status < 400:
        return Outcome(
            "failed", provider_id=str(status), error=f"answered {status}: redirects are not followed"
        )
    if status == 410:
        return Outcome("failed", provider_id="410", error="answered 410: the endpoint is gone")
    return Outcome("failed", provider_id=str(status), error=f"answered {status}")


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # HTTP dates are GMT
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
