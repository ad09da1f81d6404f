"""Contact address validation: email syntax, E.164 phone numbers, and which URLs may be called."""

import ipaddress

import pytest

from models.addresses import (
    CHANNELS,
    InvalidAddress,
    UnresolvableHost,
    check_url_target,
    normalise,
    unsafe_reason,
)

PUBLIC = "93.184.216.34"  # an address on the internet; literal, so no DNS is needed


def test_channels():
    assert CHANNELS == ("email", "sms", "webhook", "slack")


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("  Alice@Example.COM ", "Alice@example.com"),  # the domain is case-insensitive, the local part not
        ("on-call+db@sub.example.org", "on-call+db@sub.example.org"),
    ],
)
def test_email_is_normalised(address, expected):
    assert normalise("email", address, allow_private_urls=False) == expected


@pytest.mark.parametrize("address", ["not-an-email", "a@b", "a@@example.com", "@example.com", "alice@", " "])
def test_bad_email_is_refused(address):
    with pytest.raises(InvalidAddress, match="email|non-empty"):
        normalise("email", address, allow_private_urls=False)


def test_email_validation_needs_no_dns():
    # A domain that does not exist is still valid syntax: deliverability is the SMTP server's call.
    assert normalise("email", "ops@no-such-domain-4f2a9c.com", allow_private_urls=False)


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("+1 (415) 555-2671", "+14155552671"),
        ("+14155552671", "+14155552671"),
        ("+44 20 7183 8750", "+442071838750"),
        ("+33 1 42 68 53 00", "+33142685300"),
    ],
)
def test_phone_number_is_normalised_to_e164(number, expected):
    assert normalise("sms", number, allow_private_urls=False) == expected


def test_number_without_country_code_is_refused():
    with pytest.raises(InvalidAddress, match=r"starting with \+ and a country code"):
        normalise("sms", "(415) 555-2671", allow_private_urls=False)


@pytest.mark.parametrize("number", ["+1 555", "+999 1234567", "+1 (415) 555-26711234", "+abc"])
def test_invalid_number_is_refused(number):
    with pytest.raises(InvalidAddress, match="phone number"):
        normalise("sms", number, allow_private_urls=False)


@pytest.mark.parametrize("channel", ["webhook", "slack"])
def test_https_url_to_a_public_address_is_accepted(channel):
    url = f"HTTPS://{PUBLIC}/hooks/T0/B0?x=1#fragment"
    assert normalise(channel, url, allow_private_urls=False) == f"https://{PUBLIC}/hooks/T0/B0?x=1"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"ftp://{PUBLIC}/", "https://"),
        (f"http://{PUBLIC}/", "NOTIFY_ALLOW_PRIVATE_URLS"),
        ("https:///path", "no host"),
        ("https://[::1", "not a valid URL"),
        ("hooks.example.com/x", "https://"),
    ],
)
def test_url_shape_is_checked(url, message):
    with pytest.raises(InvalidAddress, match=message):
        normalise("webhook", url, allow_private_urls=False)


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("localhost", "loopback"),
        ("[::1]", "loopback"),
        ("[::ffff:127.0.0.1]", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.10", "private"),
        ("172.16.5.4", "private"),
        ("169.254.169.254", "cloud metadata"),
        ("[fd00:ec2::254]", "cloud metadata"),
        ("169.254.1.1", "link-local"),
        ("[fe80::1]", "link-local"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 (a target refused, not a bind)
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "non-public"),
        ("240.0.0.1", "reserved"),
    ],
)
def test_private_targets_are_refused_unless_allowed(host, reason):
    url = f"https://{host}:8443/hook"
    with pytest.raises(InvalidAddress, match=f"a {reason} address"):
        normalise("webhook", url, allow_private_urls=False)
    with pytest.raises(InvalidAddress, match=f"a {reason} address"):
        check_url_target(url, allow_private_urls=False)
    assert normalise("slack", url, allow_private_urls=True) == url


def test_http_is_allowed_with_private_urls():
    assert (
        normalise("webhook", "http://127.0.0.1:8080/in", allow_private_urls=True)
        == "http://127.0.0.1:8080/in"
    )
    assert check_url_target("http://localhost:9/x", allow_private_urls=True)


def test_unresolvable_host_is_its_own_error():
    # At send time this is a passing DNS failure (retried); at creation it is a 422 like any other.
    with pytest.raises(UnresolvableHost, match="does not resolve"):
        check_url_target("https://no-such-host.invalid/hook", allow_private_urls=False)


def test_check_returns_the_addresses_it_checked():
    assert check_url_target(f"https://{PUBLIC}/", allow_private_urls=False) == [ipaddress.ip_address(PUBLIC)]


def test_unsafe_reason_passes_public_addresses():
    assert unsafe_reason(ipaddress.ip_address(PUBLIC)) is None
    assert unsafe_reason(ipaddress.ip_address("2606:4700:4700::1111")) is None


@pytest.mark.parametrize("address", [None, 42, ""])
def test_address_must_be_a_string(address):
    with pytest.raises(InvalidAddress, match="non-empty string"):
        normalise("email", address, allow_private_urls=False)


def test_unknown_channel_is_refused():
    with pytest.raises(InvalidAddress, match="unknown channel 'pager'"):
        normalise("pager", "x", allow_private_urls=False)
