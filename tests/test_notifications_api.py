"""The in-app inbox (/notifications) and the incidents' delivery logs (/incidents/{id}/notifications)
against the real Postgres through the Flask test client.

The rows are written here as the delivery engine writes them (through the session factory); that
escalations produce them is the end-to-end tests' business. Incidents use the 'slow' policy, so no
worker is needed."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from models.notification import Notification, NotificationStatus, NotificationType
from tests.test_api import INVALID_REQUEST, MISSING_ID, assert_error, cursor_of, ts
from tests.test_contacts import NOTIFICATION_FIELDS, Tenant, insert_notification

ENTRY_FIELDS = {"id", "incident_id", "level", "type", "created_at", "read_at", "summary"}
READ_ONLY = "This API key is read-only."


@pytest.fixture
def tenant(make_key):
    return Tenant(make_key)


@pytest.fixture
def other(make_key):
    return Tenant(make_key)


@pytest.fixture
def base() -> datetime:
    """An hour ago: rows inserted at base + n seconds sort before anything written now."""
    return datetime.now().astimezone() - timedelta(hours=1)


def get(client, headers, url) -> dict:
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def incident(client, headers, **body) -> dict:
    response = client.post(
        "/incidents", json={"title": "checkout is down", "policy": "slow", **body}, headers=headers
    )
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.json


def entry(app, tenant: Tenant, incident_id: str | None, created_at: datetime, **values) -> str:
    """An in-app inbox entry, as a level's execution writes it (SENT when written)."""
    return insert_notification(
        app,
        tenant.name,
        created_at=created_at,
        channel="in_app",
        incident_id=uuid.UUID(incident_id) if incident_id else None,
        attempts=0,
        sent_at=created_at,
        **values,
    )


def read_at(app, notification_id: str) -> datetime | None:
    with app.extensions["db"]() as session:
        return session.get(Notification, uuid.UUID(notification_id)).read_at


# --- GET /notifications: the inbox ------------------------------------------------------------------


def test_inbox_lists_the_tenants_in_app_entries_newest_first_with_a_summary(client, app, tenant, other, base):
    paged = incident(client, tenant.write, title="Checkout returns 502", severity="critical")
    quiet = incident(client, tenant.write, title="Disk 91%", severity="low")
    first = entry(app, tenant, paged["id"], base, level=1)
    second = entry(app, tenant, paged["id"], base + timedelta(seconds=1), level=2)
    third = entry(app, tenant, quiet["id"], base + timedelta(seconds=2), level=1)
    # Not in the inbox: other channels, and other tenants' entries.
    insert_notification(app, tenant.name, created_at=base, incident_id=uuid.UUID(paged["id"]))
    insert_notification(app, tenant.name, created_at=base, channel="webhook", type=NotificationType.TEST)
    elsewhere = incident(client, other.write, title="secret-title-4711")
    entry(app, other, elsewhere["id"], base)

    page = get(client, tenant.read, "/notifications")
    assert page["next_cursor"] is None
    assert [e["id"] for e in page["items"]] == [third, second, first]
    assert all(set(e) == ENTRY_FIELDS for e in page["items"])
    newest = page["items"][0]
    assert (newest["incident_id"], newest["level"], newest["type"], newest["read_at"]) == (
        quiet["id"],
        1,
        "incident.escalated",
        None,
    )
    assert ts(newest["created_at"]) == base + timedelta(seconds=2)
    assert newest["summary"] == {"title": "Disk 91%", "severity": "low", "state": "OPEN"}
    assert page["items"][1]["summary"] == {
        "title": "Checkout returns 502",
        "severity": "critical",
        "state": "OPEN",
    }
    assert "secret" not in str(page)
    assert get(client, other.read, "/notifications")["items"][0]["summary"]["title"] == "secret-title-4711"


def test_the_summary_shows_the_incident_as_it_is_now(client, app, tenant, base):
    escalating = incident(client, tenant.write)
    client.post(f"/incidents/{escalating['id']}/escalate", headers=tenant.write)
    entry(app, tenant, escalating["id"], base)
    assert get(client, tenant.read, "/notifications")["items"][0]["summary"]["state"] == "ESCALATING"
    client.post(f"/incidents/{escalating['id']}/resolve", headers=tenant.write)
    assert get(client, tenant.read, "/notifications")["items"][0]["summary"]["state"] == "RESOLVED"


def test_an_entry_about_no_incident_has_no_summary(client, app, tenant, base):
    digest = entry(app, tenant, None, base, type=NotificationType.DIGEST, level=None)
    [item] = get(client, tenant.read, "/notifications")["items"]
    assert (item["id"], item["summary"], item["type"], item["level"]) == (
        digest,
        None,
        "notification.digest",
        None,
    )


def test_inbox_keyset_pages_cover_every_entry_once(client, app, tenant, base):
    subject = incident(client, tenant.write)
    # Five share one created_at (one transaction's now()): the id breaks the tie.
    ids = [entry(app, tenant, subject["id"], base, level=1) for _ in range(5)]
    ids += [entry(app, tenant, subject["id"], base + timedelta(seconds=s), level=2) for s in (1, 2)]
    seen, cursor, pages = [], None, 0
    while True:
        page = get(client, tenant.read, "/notifications?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        seen += [e["id"] for e in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == 7 and pages == 3
    assert seen[:2] == [ids[6], ids[5]]


def test_unread_filter_and_marking_one_read(client, app, tenant, base):
    subject = incident(client, tenant.write)
    older, newer = (
        entry(app, tenant, subject["id"], base),
        entry(app, tenant, subject["id"], base + timedelta(seconds=1)),
    )
    assert [e["id"] for e in get(client, tenant.read, "/notifications?unread=true")["items"]] == [
        newer,
        older,
    ]

    response = client.post(f"/notifications/{older}/read", headers=tenant.write)
    assert response.status_code == 200, response.get_data(as_text=True)
    marked = response.get_json()
    assert set(marked) == ENTRY_FIELDS and marked["id"] == older
    first_read = ts(marked["read_at"])
    assert abs((datetime.now(first_read.tzinfo) - first_read).total_seconds()) < 60
    assert read_at(app, older) == first_read

    assert [e["id"] for e in get(client, tenant.read, "/notifications?unread=true")["items"]] == [newer]
    assert [e["id"] for e in get(client, tenant.read, "/notifications?unread=false")["items"]] == [
        newer,
        older,
    ]
    # Idempotent: marking it again keeps the first read_at.
    again = client.post(f"/notifications/{older}/read", headers=tenant.write).get_json()
    assert again == marked and read_at(app, older) == first_read


def test_unread_filter_pages(client, app, tenant, base):
    subject = incident(client, tenant.write)
    ids = [entry(app, tenant, subject["id"], base + timedelta(seconds=s)) for s in range(5)]
    client.post(f"/notifications/{ids[3]}/read", headers=tenant.write)
    page = get(client, tenant.read, "/notifications?unread=1&limit=2")
    rest = get(client, tenant.read, f"/notifications?unread=1&limit=2&cursor={page['next_cursor']}")
    assert [e["id"] for e in page["items"] + rest["items"]] == [ids[4], ids[2], ids[1], ids[0]]
    assert rest["next_cursor"] is None


def test_read_is_404_for_another_tenants_entry_and_for_other_channels(client, app, tenant, other, base):
    theirs = entry(app, other, incident(client, other.write)["id"], base)
    email = insert_notification(app, tenant.name, created_at=base)
    for notification_id in (theirs, email, MISSING_ID):
        response = client.post(f"/notifications/{notification_id}/read", headers=tenant.write)
        assert_error(response, 404, "Not Found", f"Notification {notification_id} not found.")
    assert read_at(app, theirs) is None and read_at(app, email) is None
    assert client.post("/notifications/not-a-uuid/read", headers=tenant.write).status_code == 404


def test_read_all_marks_the_unread_ones_up_to_now_and_counts_them(client, app, tenant, other, base):
    subject = incident(client, tenant.write)
    ids = [entry(app, tenant, subject["id"], base + timedelta(seconds=s)) for s in range(3)]
    client.post(f"/notifications/{ids[0]}/read", headers=tenant.write)
    first_read = read_at(app, ids[0])
    theirs = entry(app, other, incident(client, other.write)["id"], base)
    email = insert_notification(app, tenant.name, created_at=base)
    later = entry(app, tenant, subject["id"], datetime.now().astimezone() + timedelta(hours=1))

    response = client.post("/notifications/read-all", headers=tenant.write)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"count": 2}
    assert read_at(app, ids[0]) == first_read
    assert read_at(app, ids[1]) is not None and read_at(app, ids[1]) == read_at(app, ids[2])
    # Another tenant's entries, other channels and entries newer than the request stay unread.
    assert read_at(app, theirs) is None and read_at(app, email) is None and read_at(app, later) is None
    assert [e["id"] for e in get(client, tenant.read, "/notifications?unread=true")["items"]] == [later]
    assert client.post("/notifications/read-all", json={}, headers=tenant.write).get_json() == {"count": 0}


def test_read_all_before_a_moment(client, app, tenant, base):
    subject = incident(client, tenant.write)
    ids = [entry(app, tenant, subject["id"], base + timedelta(seconds=s)) for s in range(4)]
    cutoff = (base + timedelta(seconds=1)).isoformat()
    response = client.post("/notifications/read-all", json={"before": cutoff}, headers=tenant.write)
    assert response.get_json() == {"count": 2}
    assert [read_at(app, i) is not None for i in ids] == [True, True, False, False]
    far_future = (datetime.now().astimezone() + timedelta(days=1)).isoformat()
    assert client.post(
        "/notifications/read-all", json={"before": far_future}, headers=tenant.write
    ).get_json() == {"count": 2}


def test_read_all_before_a_moment_with_an_offset_postgres_cannot_store(client, tenant):
    """ISO 8601 allows offsets up to ±23:59, Postgres only ±15:59 (schemathesis found the 500)."""
    response = client.post(
        "/notifications/read-all", json={"before": "1882-03-22T09:16:26+16:17"}, headers=tenant.write
    )
    assert response.status_code == 200 and response.get_json() == {"count": 0}


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({"before": "2026-01-01T00:00:00"}, {"before": ["Not a valid aware datetime."]}),
        ({"before": "yesterday"}, {"before": ["Not a valid datetime."]}),
        ({"before": None}, {"before": ["Field may not be null."]}),
        ({"all": True}, {"all": ["Unknown field."]}),
    ],
)
def test_read_all_body_is_validated(client, tenant, body, errors):
    response = client.post("/notifications/read-all", json=body, headers=tenant.write)
    assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"json": errors})


@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("unread=maybe", {"unread": ["Not a valid boolean."]}),
        ("limit=0", {"limit": ["Must be greater than or equal to 1 and less than or equal to 100."]}),
        ("limit=101", {"limit": ["Must be greater than or equal to 1 and less than or equal to 100."]}),
        ("cursor=nope", {"cursor": ["Invalid cursor."]}),
        (f"cursor={cursor_of(['2026-01-01T00:00:00+00:00', 5])}", {"cursor": ["Invalid cursor."]}),
        ("channel=email", {"channel": ["Unknown field."]}),
    ],
)
def test_inbox_query_is_validated(client, tenant, query, errors):
    response = client.get(f"/notifications?{query}", headers=tenant.read)
    assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"query": errors})


def test_a_read_key_reads_the_inbox_but_marks_nothing(client, app, tenant, base):
    subject = incident(client, tenant.write)
    unread = entry(app, tenant, subject["id"], base)
    assert [e["id"] for e in get(client, tenant.read, "/notifications")["items"]] == [unread]
    for url in (f"/notifications/{unread}/read", "/notifications/read-all"):
        assert_error(client.post(url, headers=tenant.read), 403, "Forbidden", READ_ONLY)
    assert read_at(app, unread) is None


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/notifications"),
        ("post", f"/notifications/{MISSING_ID}/read"),
        ("post", "/notifications/read-all"),
        ("get", f"/incidents/{MISSING_ID}/notifications"),
    ],
)
def test_every_notification_endpoint_needs_a_key(client, method, url):
    response = getattr(client, method)(url)
    assert_error(response, 401, "Unauthorized", "Missing API key: send 'Authorization: Bearer <key>'.")


# --- GET /incidents/{id}/notifications: the incident's delivery log --------------------------------


def test_incident_delivery_log_is_oldest_first_with_every_channel_and_status(client, app, tenant, base):
    subject = incident(client, tenant.write)
    unrelated = incident(client, tenant.write)
    incident_id = uuid.UUID(subject["id"])
    rows = [
        ("in_app", NotificationStatus.SENT, None),
        ("email", NotificationStatus.SENT, None),
        ("phone", NotificationStatus.SKIPPED, "channel 'phone' cannot be delivered"),
        ("webhook", NotificationStatus.FAILED, "HTTP 410: endpoint is gone"),
        ("sms", NotificationStatus.BUNDLED, None),
        ("slack", NotificationStatus.PENDING, "HTTP 503"),
    ]
    ids = [
        insert_notification(
            app,
            tenant.name,
            created_at=base + timedelta(seconds=i),
            channel=channel,
            incident_id=incident_id,
            status=status,
            last_error=error,
            provider_id="<n@example.com>" if channel == "email" else None,
        )
        for i, (channel, status, error) in enumerate(rows)
    ]
    insert_notification(app, tenant.name, created_at=base, incident_id=uuid.UUID(unrelated["id"]))

    first = get(client, tenant.read, f"/incidents/{subject['id']}/notifications?limit=4")
    assert first["next_cursor"]
    rest = get(client, tenant.read, f"/incidents/{subject['id']}/notifications?cursor={first['next_cursor']}")
    assert rest["next_cursor"] is None
    items = first["items"] + rest["items"]
    assert [n["id"] for n in items] == ids
    assert all(set(n) == NOTIFICATION_FIELDS for n in items)
    assert all(n["incident_id"] == subject["id"] for n in items)
    assert [(n["channel"], n["status"], n["last_error"]) for n in items] == [
        (channel, status.value, error) for channel, status, error in rows
    ]
    assert items[1]["provider_id"] == "<n@example.com>"
    assert (
        get(client, tenant.read, f"/incidents/{subject['id']}/notifications?limit=6")["next_cursor"] is None
    )


def test_incident_delivery_log_of_a_quiet_incident_is_empty(client, tenant):
    subject = incident(client, tenant.write)
    assert get(client, tenant.read, f"/incidents/{subject['id']}/notifications") == {
        "items": [],
        "next_cursor": None,
    }


def test_another_tenants_incident_log_is_404(client, app, tenant, other, base):
    subject = incident(client, tenant.write, title="secret-title-4711")
    insert_notification(app, tenant.name, created_at=base, incident_id=uuid.UUID(subject["id"]))
    for incident_id in (subject["id"], MISSING_ID):
        for headers in (other.read, other.write):
            response = client.get(f"/incidents/{incident_id}/notifications", headers=headers)
            assert_error(response, 404, "Not Found", f"Incident {incident_id} not found.")
            assert "secret" not in response.get_data(as_text=True)
    assert len(get(client, tenant.read, f"/incidents/{subject['id']}/notifications")["items"]) == 1


@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("limit=101", {"limit": ["Must be greater than or equal to 1 and less than or equal to 100."]}),
        ("cursor=nope", {"cursor": ["Invalid cursor."]}),
        ("status=SENT", {"status": ["Unknown field."]}),
    ],
)
def test_incident_delivery_log_query_is_validated(client, tenant, query, errors):
    subject = incident(client, tenant.write)
    response = client.get(f"/incidents/{subject['id']}/notifications?{query}", headers=tenant.read)
    assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST, {"query": errors})


def test_the_log_and_the_inbox_never_delete(client, app, tenant, base):
    subject = incident(client, tenant.write)
    kept = entry(app, tenant, subject["id"], base)
    client.post("/notifications/read-all", headers=tenant.write)
    with app.extensions["db"]() as session:
        assert session.scalars(select(Notification.id).where(Notification.id == uuid.UUID(kept))).all()
    assert [
        n["id"] for n in get(client, tenant.read, f"/incidents/{subject['id']}/notifications")["items"]
    ] == [kept]


# --- OpenAPI ----------------------------------------------------------------------------------------


def test_openapi_documents_contacts_inbox_and_delivery_logs(client):
    spec = get(client, {}, "/openapi.json")
    paths = spec["paths"]
    expected = {
        "/contacts": {"get", "post"},
        "/contacts/{contact_id}": {"get", "patch", "delete"},
        "/contacts/{contact_id}/rotate-secret": {"post"},
        "/contacts/{contact_id}/test": {"post"},
        "/contacts/{contact_id}/notifications": {"get"},
        "/notifications": {"get"},
        "/notifications/{notification_id}/read": {"post"},
        "/notifications/read-all": {"post"},
        "/incidents/{incident_id}/notifications": {"get"},
    }
    for path, methods in expected.items():
        assert set(paths[path]) - {"parameters"} == methods, path
        for method in methods:
            operation = paths[path][method]
            assert operation["summary"].endswith("."), (path, method)
    assert "201" in paths["/contacts"]["post"]["responses"]
    assert "202" in paths["/contacts/{contact_id}/test"]["post"]["responses"]
    assert "204" in paths["/contacts/{contact_id}"]["delete"]["responses"]
    schemas = spec["components"]["schemas"]
    assert set(schemas["ContactCreate"]["properties"]) == {
        "name",
        "channel",
        "address",
        "levels",
        "status_updates",
        "enabled",
    }
    assert sorted(schemas["ContactCreate"]["required"]) == ["address", "channel", "name"]
    assert schemas["ContactCreate"]["properties"]["channel"]["enum"] == ["email", "sms", "webhook", "slack"]
    assert set(schemas["ContactUpdate"]["properties"]) == {
        "name",
        "address",
        "levels",
        "status_updates",
        "enabled",
    }
    assert "secret" not in schemas["Contact"]["properties"]
    assert "secret" in schemas["ContactWithSecret"]["properties"]
    assert set(schemas["Notification"]["properties"]) == NOTIFICATION_FIELDS
    assert set(schemas["InboxEntry"]["properties"]) == ENTRY_FIELDS
    assert set(schemas["InboxSummary"]["properties"]) == {"title", "severity", "state"}
    statuses = schemas["Notification"]["properties"]["status"]["enum"]
    assert set(statuses) >= {"PENDING", "SENT", "FAILED", "SKIPPED", "BUNDLED"}
