"""Contact addresses: validation and normalisation per channel, and the outbound URL safety check.

Pure apart from DNS: `check_url_target` resolves the host, because whether a URL is safe to call
depends on where its name points (at contact creation and again at send time).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import phonenumbers
from email_validator import EmailNotValidError, validate_email

CHANNELS = ("email", "sms", "webhook", "slack")
URL_CHANNELS = ("webhook", "slack")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services answer on these; they are link-local / unique-local too, but are named
# so that the error says what the danger is.
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)


class InvalidAddress(ValueError):
    """An address that cannot be used for its channel; the message says why, for the API's 422."""


class UnresolvableHost(InvalidAddress):
    """The URL's host name does not resolve (possibly a passing DNS failure at send time)."""


def normalise(channel: str, address: str, *, allow_private_urls: bool) -> str:
    """The canonical form of `address` for `channel`, or InvalidAddress saying what is wrong."""
    if not isinstance(address, str) or not address.strip():
        raise InvalidAddress("address must be a non-empty string")
    address = address.strip()
    if channel == "email":
        return _normalise_email(address)
    if channel == "sms":
        return _normalise_phone(address)
    if channel in URL_CHANNELS:
        check_url_target(address, allow_private_urls=allow_private_urls)
        return _normalise_url(address)
    raise InvalidAddress(f"unknown channel {channel!r}: expected one of {', '.join(CHANNELS)}")


def _normalise_email(address: str) -> str:
    try:
        # Syntax only: a DNS lookup at contact creation would make the API slow and flaky offline.
        return validate_email(address, check_deliverability=False).normalized
    except EmailNotValidError as error:
        raise InvalidAddress(f"not a valid email address: {error}") from None


def _normalise_phone(address: str) -> str:
    if not address.startswith("+"):
        raise InvalidAddress("phone number must be in international form, starting with + and a country code")
    try:
        number = phonenumbers.parse(address, None)
    except phonenumbers.NumberParseException as error:
        raise InvalidAddress(f"not a phone number: {error}") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidAddress("not a valid phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _normalise_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    netloc[-1] = netloc[-1].lower()
    return urlunsplit((parts.scheme.lower(), "@".join(netloc), parts.path or "/", parts.query, ""))


def check_url_target(url: str, *, allow_private_urls: bool) -> list[IPAddress]:
    """Check that `url` is an https URL whose host resolves only to public addresses; return them.

    With allow_private_urls, http:// and any address are accepted (local receivers in tests and
    development). Raises InvalidAddress (UnresolvableHost when the name does not resolve).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise InvalidAddress(f"not a valid URL: {error}") from None
    allowed_schemes = ("https", "http") if allow_private_urls else ("https",)
    if parts.scheme.lower() not in allowed_schemes:
        detail = "" if allow_private_urls else " (http:// only with NOTIFY_ALLOW_PRIVATE_URLS=1)"
        raise InvalidAddress(f"URL must start with https://{detail}")
    host = parts.hostname
    if not host:
        raise InvalidAddress("URL has no host")
    try:
        infos = socket.getaddrinfo(host, port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UnresolvableHost(f"host {host} does not resolve") from None
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
    if not allow_private_urls:
        # Every address must be safe, not just the first: the connection may use any of them.
        for address in addresses:
            reason = unsafe_reason(address)
            if reason:
                raise InvalidAddress(
                    f"host {host} resolves to {address}, a {reason} address; such targets are refused "
                    "unless NOTIFY_ALLOW_PRIVATE_URLS=1"
                )
    return addresses


def unsafe_reason(address: IPAddress) -> str | None:
    """Why an outbound connection to `address` is refused (None when it is a public address)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    checks = (
        (address in METADATA_ADDRESSES, "cloud metadata"),
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_reserved, "reserved"),  # before private: Python counts 240.0.0.0/4 as both
        (address.is_private, "private"),
        # Shared (100.64/10), documentation and other special ranges that are not on the internet.
        (not address.is_global, "non-public"),
    )
    return next((reason for refused, reason in checks if refused), None)
