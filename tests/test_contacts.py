"""The contacts API against the real Postgres through the Flask test client: creation on each channel
with normalised addresses, the 422s (bad address, unknown channel, a channel the server has no settings
for), the webhook secret shown once and rotated, PATCH, DELETE, tenancy, scopes, paging, the test
message and the contact's delivery log.

Two apps of their own: `configured` has every channel's settings and accepts local URLs (as tests and
`make run` do); `bare` has none and refuses private URLs, as a server without them would.
No worker: the test message is only queued here (its delivery is the notification tests' business)."""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select
from standardwebhooks import Webhook

from api.schemas import SINGLE_LINE_ERROR
from models.contact import Contact
from models.notification import Notification, NotificationStatus, NotificationType
from tests.test_api import INVALID_REQUEST, MISSING_ID, assert_error, cursor_of, ts

CHANNEL_ENV = {
    "SMTP_URL": "smtp://127.0.0.1:2525",
    "TWILIO_ACCOUNT_SID": "AC00000000000000000000000000000000",
    "TWILIO_AUTH_TOKEN": "token",
    "TWILIO_FROM": "+15005550006",
    "NOTIFY_ALLOW_PRIVATE_URLS": "1",
}
BARE_ENV = dict.fromkeys(CHANNEL_ENV, "")

CONTACT_FIELDS = {
    "id",
    "name",
    "channel",
    "address",
    "levels",
    "status_updates",
    "enabled",
    "created_at",
    "updated_at",
}
NOTIFICATION_FIELDS = {
    "id",
    "incident_id",
    "contact_id",
    "channel",
    "type",
    "level",
    "status",
    "attempts",
    "last_error",
    "sent_at",
    "provider_id",
    "digest_id",
    "created_at",
    "updated_at",
}
READ_ONLY = "This API key is read-only."


@contextmanager
def app_with(session_app, database_url, overrides):
    """An app on the session's database with its own channel settings."""
    from api import create_app

    other = create_app({"DATABASE_URL": database_url, **overrides})
    other.config["TESTING"] = True
    try:
        yield other
    finally:
        other.extensions["db"].kw["bind"].dispose()
        # create_app made its Celery app the current one: give the session's app its place back.
        session_app.extensions["celery"].set_current()
        session_app.extensions["celery"].set_default()


@pytest.fixture(scope="module")
def configured_app(app, database_url):
    with app_with(app, database_url, CHANNEL_ENV) as configured:
        yield configured


@pytest.fixture(scope="module")
def bare_app(app, database_url):
    with app_with(app, database_url, BARE_ENV) as bare:
        yield bare


@pytest.fixture
def client(configured_app):
    return configured_app.test_client()


@pytest.fixture
def bare(bare_app):
    return bare_app.test_client()


class Tenant:
    def __init__(self, make_key):
        self.name = f"t-{uuid.uuid4().hex[:12]}"
        self.write = make_key(self.name)
        self.read = make_key(self.name, scope="read")


@pytest.fixture
def tenant(make_key):
    return Tenant(make_key)


@pytest.fixture
def other(make_key):
    return Tenant(make_key)


def add(client, headers, expect=201, **body) -> dict:
    body = {"name": "on-call", "channel": "email", "address": "oncall@example.com", **body}
    response = client.post("/contacts", json=body, headers=headers)
    assert response.status_code == expect, response.get_data(as_text=True)
    return response.get_json()


def get(client, headers, url) -> dict:
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def stored(app, contact_id) -> Contact:
    with app.extensions["db"]() as session:
        return session.get(Contact, uuid.UUID(contact_id))


def without_secret(contact: dict) -> dict:
    return {name: value for name, value in contact.items() if name != "secret"}


def insert_notification(app, tenant: str, *, created_at: datetime, **values) -> str:
    """A notification row as the delivery engine writes it (the log only reads them)."""
    row = Notification(
        id=uuid.uuid4(),
        tenant=tenant,
        channel=values.pop("channel", "email"),
        type=values.pop("type", NotificationType.ESCALATED),
        level=values.pop("level", 1),
        status=values.pop("status", NotificationStatus.SENT),
        attempts=values.pop("attempts", 1),
        created_at=created_at,
        updated_at=created_at,
        **values,
    )
    with app.extensions["db"].begin() as session:
        session.add(row)
    return str(row.id)


def create_incident(client, headers) -> str:
    response = client.post("/incidents", json={"title": "checkout is down"}, headers=headers)
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["id"]


# --- POST /contacts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "address", "normalised", "status_updates"),
    [
        ("email", " Alice.Smith@EXAMPLE.COM ", "Alice.Smith@example.com", False),
        ("sms", "+1 (650) 253-0000", "+16502530000", False),
        ("sms", "+44 20 7946 0958", "+442079460958", False),
        ("webhook", "HTTP://LocalHost:8080/Hooks?x=1", "http://localhost:8080/Hooks?x=1", True),
        ("slack", "http://127.0.0.1:9000", "http://127.0.0.1:9000/", True),
    ],
)
def test_create_each_channel_with_its_address_normalised(
    client, configured_app, tenant, channel, address, normalised, status_updates
):
    response = client.post(
        "/contacts", json={"name": "Alice", "channel": channel, "address": address}, headers=tenant.write
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    contact = response.get_json()
    assert set(contact) == CONTACT_FIELDS | {"secret"}
    assert response.headers["Location"] == f"/contacts/{contact['id']}"
    assert (contact["name"], contact["channel"], contact["address"]) == ("Alice", channel, normalised)
    # Defaults: every level, status updates for machines only, enabled.
    assert (contact["levels"], contact["status_updates"], contact["enabled"]) == (None, status_updates, True)
    created = ts(contact["created_at"])
    assert created.utcoffset() == timedelta(0) and contact["updated_at"] == contact["created_at"]
    row = stored(configured_app, contact["id"])
    assert (row.tenant, row.address, row.deleted_at) == (tenant.name, normalised, None)
    if channel == "webhook":
        assert contact["secret"].startswith("whsec_") and row.secret == contact["secret"]
    else:
        assert contact["secret"] is None and row.secret is None
    assert get(client, tenant.read, response.headers["Location"]) == without_secret(contact)


def test_create_with_levels_status_updates_and_enabled(client, tenant):
    contact = add(client, tenant.write, levels=[3, 1], status_updates=True, enabled=False)
    assert (contact["levels"], contact["status_updates"], contact["enabled"]) == ([1, 3], True, False)
    hook = add(client, tenant.write, channel="webhook", address="http://127.0.0.1:9/", status_updates=False)
    assert hook["status_updates"] is False
    assert add(client, tenant.write, levels=None)["levels"] is None
    assert add(client, tenant.write, name="n" * 200, levels=list(range(1, 101)))["levels"] == list(
        range(1, 101)
    )


@pytest.mark.parametrize(
    ("channel", "address", "says"),
    [
        ("email", "not-an-email", "not a valid email address"),
        ("email", "alice@", "not a valid email address"),
        ("sms", "650 253 0000", "international form"),
        ("sms", "+1 555", "not a valid phone number"),
        ("sms", "+1 phone", "not a"),
        ("webhook", "ftp://127.0.0.1/hook", "URL must start with https://"),
        ("webhook", "https://host.invalid/hook", "does not resolve"),
        ("slack", "not a url", "URL must start with https://"),
        ("slack", "https://[::1/x", "not a valid URL"),
        ("webhook", "   ", "non-empty"),
    ],
)
def test_a_bad_address_is_422_naming_it(client, tenant, channel, address, says):
    response = client.post(
        "/contacts", json={"name": "x", "channel": channel, "address": address}, headers=tenant.write
    )
    body = assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST)
    assert list(body["errors"]) == ["json"] and list(body["errors"]["json"]) == ["address"]
    assert says in body["errors"]["json"]["address"][0]
    assert get(client, tenant.read, "/contacts")["items"] == []


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("http://example.com/hook", "http:// only with NOTIFY_ALLOW_PRIVATE_URLS=1"),
        ("https://127.0.0.1/hook", "loopback"),
        ("https://localhost:8443/hook", "loopback"),
        ("https://10.1.2.3/hook", "private"),
        ("https://169.254.169.254/latest/meta-data", "cloud metadata"),
        ("https://[::ffff:127.0.0.1]/hook", "loopback"),
    ],
)
def test_private_and_plain_http_urls_are_refused_unless_allowed(bare, client, tenant, address, says):
    for channel in ("webhook", "slack"):
        response = bare.post(
            "/contacts", json={"name": "x", "channel": channel, "address": address}, headers=tenant.write
        )
        body = assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST)
        assert says in body["errors"]["json"]["address"][0]
    # The configured app (NOTIFY_ALLOW_PRIVATE_URLS=1, as tests and make run) takes the local ones.
    if "example.com" not in address:
        assert add(client, tenant.write, channel="webhook", address=address)["channel"] == "webhook"


@pytest.mark.parametrize(("channel", "setting"), [("email", "SMTP_URL"), ("sms", "TWILIO_ACCOUNT_SID")])
def test_a_channel_without_server_settings_is_422_naming_the_setting(bare, tenant, channel, setting):
    address = {"email": "a@example.com", "sms": "+16502530000"}[channel]
    response = bare.post(
        "/contacts", json={"name": "x", "channel": channel, "address": address}, headers=tenant.write
    )
    assert_error(
        response,
        422,
        "Unprocessable Entity",
        INVALID_REQUEST,
        {"json": {"channel": [f"This server cannot send {channel}: {setting} is not set."]}},
    )
    assert get(bare, tenant.read, "/contacts")["items"] == []


def test_twilio_settings_are_needed_all_three(app, database_url, tenant):
    partial = {**CHANNEL_ENV, "TWILIO_FROM": ""}
    with app_with(app, database_url, partial) as half:
        response = half.test_client().post(
            "/contacts", json={"name": "x", "channel": "sms", "address": "+16502530000"}, headers=tenant.write
        )
    assert response.get_json()["errors"] == {
        "json": {"channel": ["This server cannot send sms: TWILIO_FROM is not set."]}
    }


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        (
            {},
            {
                "name": ["Missing data for required field."],
                "channel": ["Missing data for required field."],
                "address": ["Missing data for required field."],
            },
        ),
        ({"channel": "phone"}, {"channel": ["Must be one of: email, sms, webhook, slack."]}),
        ({"channel": "in_app"}, {"channel": ["Must be one of: email, sms, webhook, slack."]}),
        ({"channel": None}, {"channel": ["Field may not be null."]}),
        ({"name": ""}, {"name": ["Length must be between 1 and 200."]}),
        ({"name": "n" * 201}, {"name": ["Length must be between 1 and 200."]}),
        ({"name": "on\ncall"}, {"name": [SINGLE_LINE_ERROR]}),
        ({"name": "on\tcall"}, {"name": [SINGLE_LINE_ERROR]}),
        ({"name": "a\x00b"}, {"name": [SINGLE_LINE_ERROR]}),
        ({"name": "a\ud800b"}, {"name": ["Unpaired surrogates are not valid text."]}),
        ({"name": 5}, {"name": ["Not a valid string."]}),
        (
            {"address": "a@example.com\r\nBcc: x@example.com"},
            {"address": [SINGLE_LINE_ERROR]},
        ),
        ({"address": "x" * 2049}, {"address": ["Length must be between 1 and 2048."]}),
        ({"levels": []}, {"levels": ["Length must be between 1 and 100."]}),
        (
            {"levels": [0]},
            {"levels": {"0": ["Must be greater than or equal to 1 and less than or equal to 100."]}},
        ),
        (
            {"levels": [101]},
            {"levels": {"0": ["Must be greater than or equal to 1 and less than or equal to 100."]}},
        ),
        ({"levels": [1, 2, 1]}, {"levels": ["Levels must not repeat."]}),
        ({"levels": ["1"]}, {"levels": {"0": ["Not a valid integer."]}}),
        ({"levels": [1.5]}, {"levels": {"0": ["Not a valid integer."]}}),
        ({"levels": [True]}, {"levels": {"0": ["Not a valid integer."]}}),
        ({"levels": "all"}, {"levels": ["Not a valid list."]}),
        ({"status_updates": "maybe"}, {"status_updates": ["Not a valid boolean."]}),
        ({"enabled": None}, {"enabled": ["Field may not be null."]}),
        ({"secret": "whsec_mine"}, {"secret": ["Unknown field."]}),
        ({"id": MISSING_ID}, {"id": ["Unknown field."]}),
        ({"tenant": "other"}, {"tenant": ["Unknown field."]}),
    ],
)
def test_create_body_is_validated(client, tenant, body, errors):
    full = {"name": "x", "channel": "email", "address": "a@example.com"}
    payload = {**full, **body} if body else {}
    response = client.post("/contacts", json=payload, headers=tenant.write)
    assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"json": errors})
    assert get(client, tenant.read, "/contacts")["items"] == []


def test_malformed_json_is_400(client, tenant):
    response = client.post(
        "/contacts", data='{"name": ', headers={**tenant.write, "Content-Type": "application/json"}
    )
    assert_error(response, 400, "Bad Request", "The request body is not valid JSON.")


# --- the webhook secret ---------------------------------------------------------------------------


def test_the_secret_is_shown_once_and_signs_standard_webhooks(client, configured_app, tenant):
    created = add(client, tenant.write, channel="webhook", address="http://127.0.0.1:9/hook")
    secret = created["secret"]
    assert secret.startswith("whsec_")
    # A Standard Webhooks library accepts it and verifies what it signs.
    hook = Webhook(secret)
    now = datetime.now().astimezone()
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": hook.sign("msg_1", now, "{}"),
    }
    assert hook.verify("{}", headers) == {}
    one = get(client, tenant.read, f"/contacts/{created['id']}")
    assert "secret" not in one and one == without_secret(created)
    listed = get(client, tenant.read, "/contacts")["items"]
    assert listed == [without_secret(created)]
    patched = client.patch(f"/contacts/{created['id']}", json={"name": "renamed"}, headers=tenant.write)
    assert "secret" not in patched.get_json()
    assert stored(configured_app, created["id"]).secret == secret
    # Secrets differ from contact to contact.
    assert add(client, tenant.write, channel="webhook", address="http://127.0.0.1:9/")["secret"] != secret


def test_rotate_secret_issues_a_new_one(client, configured_app, tenant):
    created = add(client, tenant.write, channel="webhook", address="http://127.0.0.1:9/hook")
    response = client.post(f"/contacts/{created['id']}/rotate-secret", headers=tenant.write)
    assert response.status_code == 200, response.get_data(as_text=True)
    rotated = response.get_json()
    assert set(rotated) == CONTACT_FIELDS | {"secret"}
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert ts(rotated["updated_at"]) > ts(created["updated_at"])
    assert stored(configured_app, created["id"]).secret == rotated["secret"]
    assert "secret" not in get(client, tenant.read, f"/contacts/{created['id']}")
    again = client.post(f"/contacts/{created['id']}/rotate-secret", headers=tenant.write).get_json()
    assert again["secret"] not in (created["secret"], rotated["secret"])


@pytest.mark.parametrize(
    ("channel", "address"),
    [("email", "a@example.com"), ("sms", "+16502530000"), ("slack", "http://127.0.0.1/")],
)
def test_rotate_secret_of_a_contact_without_one_is_409(client, configured_app, tenant, channel, address):
    created = add(client, tenant.write, channel=channel, address=address)
    response = client.post(f"/contacts/{created['id']}/rotate-secret", headers=tenant.write)
    assert_error(
        response,
        409,
        "Conflict",
        f"Only webhook contacts have a signing secret; this one is an {channel} contact.",
        {"channel": [channel]},
    )
    assert stored(configured_app, created["id"]).secret is None


# --- GET, PATCH, DELETE ---------------------------------------------------------------------------


def test_patch_changes_what_it_names_and_renormalises_the_address(client, configured_app, tenant):
    created = add(client, tenant.write, channel="sms", address="+16502530000", levels=[1])
    response = client.patch(
        f"/contacts/{created['id']}",
        json={"name": "Manager", "address": "+44 20 7946 0958", "levels": [3, 2]},
        headers=tenant.write,
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    patched = response.get_json()
    assert set(patched) == CONTACT_FIELDS
    assert (patched["name"], patched["address"], patched["levels"]) == ("Manager", "+442079460958", [2, 3])
    assert (patched["channel"], patched["status_updates"], patched["enabled"]) == ("sms", False, True)
    assert patched["created_at"] == created["created_at"]
    assert ts(patched["updated_at"]) > ts(created["updated_at"])
    assert get(client, tenant.read, f"/contacts/{created['id']}") == patched
    toggled = client.patch(
        f"/contacts/{created['id']}",
        json={"levels": None, "status_updates": True, "enabled": False},
        headers=tenant.write,
    ).get_json()
    assert (toggled["levels"], toggled["status_updates"], toggled["enabled"]) == (None, True, False)
    assert toggled["name"] == "Manager"
    row = stored(configured_app, created["id"])
    assert (row.levels, row.status_updates, row.enabled) == (None, True, False)


def test_patch_address_is_checked_for_the_contacts_own_channel(client, bare, tenant):
    hook = add(client, tenant.write, channel="webhook", address="http://127.0.0.1:9/a")
    moved = client.patch(
        f"/contacts/{hook['id']}", json={"address": "HTTP://LOCALHOST:9/b"}, headers=tenant.write
    )
    assert moved.get_json()["address"] == "http://localhost:9/b"
    email = add(client, tenant.write)
    response = client.patch(
        f"/contacts/{email['id']}", json={"address": "+16502530000"}, headers=tenant.write
    )
    body = assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST)
    assert "not a valid email address" in body["errors"]["json"]["address"][0]
    # A server that refuses private URLs refuses them on PATCH too.
    response = bare.patch(
        f"/contacts/{hook['id']}", json={"address": "https://127.0.0.1/c"}, headers=tenant.write
    )
    assert "loopback" in response.get_json()["errors"]["json"]["address"][0]
    assert get(client, tenant.read, f"/contacts/{hook['id']}")["address"] == "http://localhost:9/b"


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, {"_schema": ["Name at least one field to change."]}),
        (
            {"channel": "sms"},
            {"channel": ["A contact's channel cannot be changed: create a new contact instead."]},
        ),
        (
            {"channel": "email", "name": "x"},
            {"channel": ["A contact's channel cannot be changed: create a new contact instead."]},
        ),
        ({"secret": "whsec_x"}, {"secret": ["Unknown field."]}),
        ({"deleted_at": None}, {"deleted_at": ["Unknown field."]}),
        ({"name": None}, {"name": ["Field may not be null."]}),
        ({"name": ""}, {"name": ["Length must be between 1 and 200."]}),
        ({"name": "a\nb"}, {"name": [SINGLE_LINE_ERROR]}),
        ({"address": None}, {"address": ["Field may not be null."]}),
        ({"levels": []}, {"levels": ["Length must be between 1 and 100."]}),
        ({"levels": [2, 2]}, {"levels": ["Levels must not repeat."]}),
        ({"enabled": "nope"}, {"enabled": ["Not a valid boolean."]}),
        ({"status_updates": None}, {"status_updates": ["Field may not be null."]}),
    ],
)
def test_patch_body_is_validated(client, tenant, body, errors):
    created = add(client, tenant.write)
    response = client.patch(f"/contacts/{created['id']}", json=body, headers=tenant.write)
    assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"json": errors})
    assert get(client, tenant.read, f"/contacts/{created['id']}") == without_secret(created)


def test_patch_without_a_body_is_422(client, tenant):
    created = add(client, tenant.write)
    response = client.patch(f"/contacts/{created['id']}", headers=tenant.write)
    assert response.status_code == 422, response.get_data(as_text=True)


def test_delete_stops_the_contact_and_keeps_its_history(client, configured_app, tenant):
    created = add(client, tenant.write)
    kept = add(client, tenant.write, name="kept")
    incident_id = create_incident(client, tenant.write)
    sent = insert_notification(
        configured_app,
        tenant.name,
        created_at=datetime.now().astimezone(),
        incident_id=uuid.UUID(incident_id),
        contact_id=uuid.UUID(created["id"]),
    )
    response = client.delete(f"/contacts/{created['id']}", headers=tenant.write)
    assert response.status_code == 204 and response.get_data() == b""
    row = stored(configured_app, created["id"])
    assert row.deleted_at is not None and row.deleted_at == row.updated_at
    url = f"/contacts/{created['id']}"
    message = f"Contact {created['id']} not found."
    for method, path in [
        ("get", url),
        ("patch", url),
        ("delete", url),
        ("post", f"{url}/test"),
        ("post", f"{url}/rotate-secret"),
        ("get", f"{url}/notifications"),
    ]:
        response = getattr(client, method)(
            path, json={"name": "x"} if method == "patch" else None, headers=tenant.write
        )
        assert_error(response, 404, "Not Found", message)
    assert [c["id"] for c in get(client, tenant.read, "/contacts")["items"]] == [kept["id"]]
    # Its delivery history stays readable in the incident's log.
    log = get(client, tenant.read, f"/incidents/{incident_id}/notifications")["items"]
    assert [(n["id"], n["contact_id"]) for n in log] == [(sent, created["id"])]


def test_another_tenants_contact_is_404_everywhere(client, configured_app, tenant, other):
    hook = add(
        client, tenant.write, name="secret-name-4711", channel="webhook", address="http://127.0.0.1:9/"
    )
    url = f"/contacts/{hook['id']}"
    for headers in (other.write, other.read):
        for method, path in [
            ("get", url),
            ("patch", url),
            ("delete", url),
            ("post", f"{url}/test"),
            ("post", f"{url}/rotate-secret"),
            ("get", f"{url}/notifications"),
        ]:
            if method != "get" and headers is other.read:
                continue  # a read key is refused writing before the contact is looked up
            response = getattr(client, method)(
                path, json={"name": "x"} if method == "patch" else None, headers=headers
            )
            assert_error(response, 404, "Not Found", f"Contact {hook['id']} not found.")
            assert "secret" not in response.get_data(as_text=True)
    assert get(client, other.read, "/contacts") == {"items": [], "next_cursor": None}
    row = stored(configured_app, hook["id"])
    assert (row.name, row.secret, row.deleted_at) == ("secret-name-4711", hook["secret"], None)


def test_missing_contact_is_404(client, tenant):
    assert_error(
        client.get(f"/contacts/{MISSING_ID}", headers=tenant.read),
        404,
        "Not Found",
        f"Contact {MISSING_ID} not found.",
    )
    assert client.get("/contacts/not-a-uuid", headers=tenant.read).status_code == 404


def test_a_read_key_may_only_get(client, tenant):
    created = add(client, tenant.write, channel="webhook", address="http://127.0.0.1:9/")
    url = f"/contacts/{created['id']}"
    assert get(client, tenant.read, url) == without_secret(created)
    assert get(client, tenant.read, "/contacts")["items"] == [without_secret(created)]
    assert get(client, tenant.read, f"{url}/notifications")["items"] == []
    for method, path, body in [
        ("post", "/contacts", {"name": "x", "channel": "email", "address": "a@example.com"}),
        ("patch", url, {"name": "x"}),
        ("delete", url, None),
        ("post", f"{url}/test", None),
        ("post", f"{url}/rotate-secret", None),
    ]:
        assert_error(
            getattr(client, method)(path, json=body, headers=tenant.read), 403, "Forbidden", READ_ONLY
        )
    assert get(client, tenant.read, url) == without_secret(created)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/contacts"),
        ("post", "/contacts"),
        ("get", "/contacts/{id}"),
        ("patch", "/contacts/{id}"),
        ("delete", "/contacts/{id}"),
        ("post", "/contacts/{id}/test"),
        ("post", "/contacts/{id}/rotate-secret"),
        ("get", "/contacts/{id}/notifications"),
    ],
)
def test_every_contact_endpoint_needs_a_key(client, method, path):
    response = getattr(client, method)(path.format(id=MISSING_ID), json={"name": "x"})
    assert_error(response, 401, "Unauthorized", "Missing API key: send 'Authorization: Bearer <key>'.")


def test_wrong_method_is_405(client, tenant):
    created = add(client, tenant.write)
    response = client.put(f"/contacts/{created['id']}", json={"name": "x"}, headers=tenant.write)
    assert_error(response, 405, "Method Not Allowed")
    assert set(response.headers["Allow"].split(", ")) == {"GET", "HEAD", "OPTIONS", "PATCH", "DELETE"}
    assert client.get(f"/contacts/{created['id']}/test", headers=tenant.read).status_code == 405


# --- GET /contacts: keyset pagination -------------------------------------------------------------


def test_list_is_newest_first_in_keyset_pages(client, tenant, other):
    created = [add(client, tenant.write, name=f"c{i}")["id"] for i in range(5)]
    add(client, other.write, name="not mine")
    seen, cursor, pages = [], None, 0
    while True:
        page = get(client, tenant.read, "/contacts?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        pages += 1
        seen += [c["id"] for c in page["items"]]
        assert all(set(c) == CONTACT_FIELDS for c in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created[::-1] and pages == 3
    # No empty last page when the items end exactly on a page boundary.
    page = get(client, tenant.read, "/contacts?limit=5")
    assert len(page["items"]) == 5 and page["next_cursor"] is None
    assert len(get(client, tenant.read, "/contacts")["items"]) == 5  # default limit 20


@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("limit=0", {"limit": ["Must be greater than or equal to 1 and less than or equal to 100."]}),
        ("limit=101", {"limit": ["Must be greater than or equal to 1 and less than or equal to 100."]}),
        ("limit=x", {"limit": ["Not a valid integer."]}),
        ("cursor=nope", {"cursor": ["Invalid cursor."]}),
        (f"cursor={cursor_of(['2026-01-01T00:00:00', MISSING_ID])}", {"cursor": ["Invalid cursor."]}),
        (f"cursor={'a' * 201}", {"cursor": ["Invalid cursor."]}),
        ("channel=email", {"channel": ["Unknown field."]}),
    ],
)
def test_list_query_is_validated(client, tenant, query, errors):
    for url in ("/contacts", f"/contacts/{add(client, tenant.write)['id']}/notifications"):
        response = client.get(f"{url}?{query}", headers=tenant.read)
        assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"query": errors})


# --- POST /contacts/{id}/test ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channel", "address"),
    [
        ("email", "a@example.com"),
        ("sms", "+16502530000"),
        ("webhook", "http://127.0.0.1:9/"),
        ("slack", "http://127.0.0.1:9/"),
    ],
)
def test_test_message_is_queued_and_logged(client, configured_app, tenant, channel, address):
    contact = add(client, tenant.write, channel=channel, address=address)
    response = client.post(f"/contacts/{contact['id']}/test", headers=tenant.write)
    assert response.status_code == 202, response.get_data(as_text=True)
    queued = response.get_json()
    assert set(queued) == NOTIFICATION_FIELDS
    assert (queued["contact_id"], queued["channel"], queued["type"]) == (
        contact["id"],
        channel,
        "notification.test",
    )
    assert (queued["incident_id"], queued["level"], queued["digest_id"]) == (None, None, None)
    assert queued["status"] in ("PENDING", "SENDING", "SENT", "FAILED")
    with configured_app.extensions["db"]() as session:
        row = session.get(Notification, uuid.UUID(queued["id"]))
        assert (row.tenant, row.type) == (tenant.name, NotificationType.TEST)
    log = get(client, tenant.read, f"/contacts/{contact['id']}/notifications")
    assert [n["id"] for n in log["items"]] == [queued["id"]] and log["next_cursor"] is None


def test_test_message_to_a_disabled_contact_is_409(client, configured_app, tenant):
    contact = add(client, tenant.write, enabled=False)
    response = client.post(f"/contacts/{contact['id']}/test", headers=tenant.write)
    assert_error(response, 409, "Conflict", "This contact is disabled: enable it to send it a test message.")
    with configured_app.extensions["db"]() as session:
        assert session.scalars(select(Notification).where(Notification.tenant == tenant.name)).all() == []


def test_test_message_on_a_server_without_the_channels_settings_is_409(client, bare, tenant):
    contact = add(client, tenant.write)  # created while SMTP_URL was set
    response = bare.post(f"/contacts/{contact['id']}/test", headers=tenant.write)
    assert_error(
        response,
        409,
        "Conflict",
        "This server cannot send email: SMTP_URL is not set.",
        {"channel": ["email"]},
    )
    assert get(client, tenant.read, f"/contacts/{contact['id']}/notifications")["items"] == []


# --- GET /contacts/{id}/notifications: the contact's delivery log ---------------------------------


def test_contact_delivery_log_is_newest_first_in_pages_with_every_field(client, configured_app, tenant):
    contact = add(client, tenant.write, channel="sms", address="+16502530000")
    neighbour = add(client, tenant.write, name="neighbour")
    incident_id = uuid.UUID(create_incident(client, tenant.write))
    base = datetime.now().astimezone() - timedelta(hours=1)
    digest = insert_notification(
        configured_app,
        tenant.name,
        created_at=base + timedelta(seconds=9),
        channel="sms",
        contact_id=uuid.UUID(contact["id"]),
        type=NotificationType.DIGEST,
        level=None,
        provider_id="SM123",
        sent_at=base + timedelta(seconds=10),
    )
    statuses = [
        (NotificationStatus.SENT, None),
        (NotificationStatus.FAILED, "HTTP 400: invalid To number"),
        (NotificationStatus.SKIPPED, "incident resolved before it was sent"),
        (NotificationStatus.BUNDLED, None),
        (NotificationStatus.PENDING, "HTTP 503"),
    ]
    ids = [
        insert_notification(
            configured_app,
            tenant.name,
            created_at=base + timedelta(seconds=i),
            channel="sms",
            contact_id=uuid.UUID(contact["id"]),
            incident_id=incident_id,
            level=i + 1,
            status=status,
            last_error=error,
            digest_id=uuid.UUID(digest) if status is NotificationStatus.BUNDLED else None,
        )
        for i, (status, error) in enumerate(statuses)
    ]
    insert_notification(configured_app, tenant.name, created_at=base, contact_id=uuid.UUID(neighbour["id"]))
    first = get(client, tenant.read, f"/contacts/{contact['id']}/notifications?limit=4")
    rest = get(
        client, tenant.read, f"/contacts/{contact['id']}/notifications?limit=4&cursor={first['next_cursor']}"
    )
    assert rest["next_cursor"] is None
    items = first["items"] + rest["items"]
    assert [n["id"] for n in items] == [digest, *ids[::-1]]
    assert all(set(n) == NOTIFICATION_FIELDS for n in items)
    assert [n["status"] for n in items] == ["SENT", "PENDING", "BUNDLED", "SKIPPED", "FAILED", "SENT"]
    top = items[0]
    assert (top["type"], top["provider_id"], top["incident_id"], top["level"]) == (
        "notification.digest",
        "SM123",
        None,
        None,
    )
    assert ts(top["sent_at"]) == base + timedelta(seconds=10)
    bundled = items[2]
    assert (bundled["digest_id"], bundled["incident_id"], bundled["level"]) == (digest, str(incident_id), 4)
    failed = items[4]
    assert (failed["last_error"], failed["attempts"], failed["channel"]) == (
        "HTTP 400: invalid To number",
        1,
        "sms",
    )
    assert ts(failed["created_at"]) == base + timedelta(seconds=1)
