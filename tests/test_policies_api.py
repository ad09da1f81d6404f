"""Tenant policies over the API, and severity routing, against the real Postgres through the Flask test
client: PUT in JSON and YAML (each PUT a new version), GET, the list with the file's policies, DELETE
(the history stays), shadowing and tenant isolation, every refusal with the policy file's own message,
scopes, the per-tenant limit; and incidents escalating by a tenant's policy or by their severity, with
the levels snapshotted and the version recorded.

An app of its own, on a policy file with a severity map; every level an hour or more away, so no
worker is needed and nothing is handed to the broker."""

from __future__ import annotations

import textwrap
import threading
import uuid

import pytest
from sqlalchemy import select

from models import tenant_policy
from models.incident import Incident
from models.policy import MAX_LEVELS, PolicyError, parse_policies, parse_policy
from models.tenant_policy import MAX_TENANT_POLICIES, TenantPolicy
from tests.test_api import INVALID_REQUEST, act, assert_error, create, escalations, events, get
from tests.test_contacts import READ_ONLY, Tenant, app_with

POLICY_FILE = """\
default_policy: standard
severity_policies:
  critical: urgent
  low: quiet
policies:
  standard:
    levels:
      - {delay: 1h, notify: [in_app]}
      - {delay: 2h, notify: [email]}
  urgent:
    levels:
      - {delay: 90m, notify: [sms]}
  quiet:
    levels:
      - {delay: 3h}
"""
HOUR_MS = 3_600_000
STANDARD = [{"delay_ms": HOUR_MS, "notify": ["in_app"]}, {"delay_ms": 2 * HOUR_MS, "notify": ["email"]}]
URGENT = [{"delay_ms": 90 * 60_000, "notify": ["sms"]}]
QUIET = [{"delay_ms": 3 * HOUR_MS, "notify": []}]
ONCALL = {"levels": [{"delay": "2h", "notify": ["email", "sms", "email"]}, {"delay": "90m"}]}
ONCALL_LEVELS = [{"delay": "2h", "notify": ["email", "sms"]}, {"delay": "90m", "notify": []}]
ONCALL_SNAPSHOT = [
    {"delay_ms": 2 * HOUR_MS, "notify": ["email", "sms"]},
    {"delay_ms": 90 * 60_000, "notify": []},
]
POLICY_FIELDS = {
    "name", "source", "version", "shadows", "levels", "repeat", "ack_timeout", "timeline", "created_at"
}  # fmt: skip


@pytest.fixture(scope="module")
def routed_app(app, database_url, tmp_path_factory):
    path = tmp_path_factory.mktemp("policies") / "policy.yaml"
    path.write_text(POLICY_FILE)
    with app_with(app, database_url, {"ESCALATION_POLICY_FILE": str(path)}) as routed:
        yield routed


@pytest.fixture
def client(routed_app):
    return routed_app.test_client()


@pytest.fixture
def tenant(make_key):
    return Tenant(make_key)


@pytest.fixture
def other(make_key):
    return Tenant(make_key)


def put(client, headers, name, body, expect=200, content_type=None) -> dict:
    if content_type is None:
        response = client.put(f"/policies/{name}", json=body, headers=headers)
    else:
        response = client.put(
            f"/policies/{name}", data=body, headers={**headers, "Content-Type": content_type}
        )
    assert response.status_code == expect, response.get_data(as_text=True)
    return response.get_json()


def stored_incident(app, incident_id) -> Incident:
    with app.extensions["db"]() as session:
        return session.get(Incident, uuid.UUID(incident_id))


def versions(app, tenant_name, name) -> list[tuple[int, bool]]:
    """(version, deleted) of every stored version, oldest first."""
    with app.extensions["db"]() as session:
        rows = session.scalars(
            select(TenantPolicy)
            .where(TenantPolicy.tenant == tenant_name, TenantPolicy.name == name)
            .order_by(TenantPolicy.version)
        )
        return [(row.version, row.deleted_at is not None) for row in rows]


def escalate(client, headers, **body) -> tuple[dict, Incident]:
    """Create an incident, escalate it; (its escalated timeline entry's data, its stored row)."""
    incident = create(client, headers, **body)
    act(client, headers, incident["id"], "escalate")
    escalated = [e for e in events(client, headers, incident["id"]) if e["type"] == "escalated"]
    return escalated[0]["data"], stored_incident(client.application, incident["id"])


# --- PUT, GET, list -------------------------------------------------------------------------------


def test_each_put_stores_the_next_version_normalised(client, tenant):
    response = client.put("/policies/oncall", json=ONCALL, headers=tenant.write)
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.headers["Location"].endswith("/policies/oncall")
    first = response.get_json()
    assert set(first) == POLICY_FIELDS
    assert first["created_at"] is not None
    assert {k: v for k, v in first.items() if k != "created_at"} == {
        "name": "oncall",
        "source": "tenant",
        "version": 1,
        "shadows": False,
        "levels": ONCALL_LEVELS,
        "repeat": 0,
        "ack_timeout": None,
        "timeline": "level 1 at +2h, level 2 at +3h30m",
    }
    second = put(client, tenant.write, "oncall", {"levels": [{"delay": "30s", "notify": ["slack"]}]})
    assert (second["version"], second["levels"], second["timeline"]) == (
        2,
        [{"delay": "30s", "notify": ["slack"]}],
        "level 1 at +30s",
    )
    assert get(client, tenant.read, "/policies/oncall") == second
    # What GET shows, PUT takes back: the same policy as a third version.
    third = put(client, tenant.write, "oncall", {"levels": second["levels"]})
    assert (third["version"], third["levels"]) == (3, second["levels"])
    assert versions(client.application, tenant.name, "oncall") == [(1, False), (2, False), (3, False)]


@pytest.mark.parametrize("content_type", ["application/yaml", "text/yaml", "application/yaml; charset=utf-8"])
def test_put_takes_yaml_as_the_policy_file_writes_it(client, tenant, content_type):
    body = """\
    # one policy, as under `policies:` in the file
    levels:
      - delay: 2h
        notify: [email, sms, email]
      - {delay: 90m}
    """
    created = put(client, tenant.write, "oncall", textwrap.dedent(body), 201, content_type)
    assert (created["version"], created["levels"]) == (1, ONCALL_LEVELS)


def test_the_list_holds_the_files_policies_and_the_tenants_own_by_name(client, tenant):
    put(client, tenant.write, "oncall", ONCALL, 201)
    shadowing = put(client, tenant.write, "standard", {"levels": [{"delay": "4h"}]}, 201)
    assert (shadowing["source"], shadowing["shadows"]) == ("tenant", True)
    listing = get(client, tenant.read, "/policies")
    assert listing["default_policy"] == "standard"
    assert listing["severity_policies"] == {"critical": "urgent", "low": "quiet"}
    assert [(p["name"], p["source"], p["version"], p["shadows"]) for p in listing["items"]] == [
        ("oncall", "tenant", 1, False),
        ("quiet", "file", None, False),
        ("standard", "tenant", 1, True),
        ("urgent", "file", None, False),
    ]
    urgent = listing["items"][3]
    assert urgent == {
        "name": "urgent",
        "source": "file",
        "version": None,
        "shadows": False,
        "levels": [{"delay": "90m", "notify": ["sms"]}],
        "repeat": 0,
        "ack_timeout": None,
        "timeline": "level 1 at +1h30m",
        "created_at": None,
    }
    assert get(client, tenant.read, "/policies/urgent") == urgent
    assert get(client, tenant.read, "/policies/standard") == shadowing


def test_another_tenant_never_sees_a_tenants_policy(client, tenant, other):
    put(client, tenant.write, "oncall", ONCALL, 201)
    put(client, tenant.write, "standard", {"levels": [{"delay": "4h"}]}, 201)
    for headers in (other.read, other.write):
        assert_error(
            client.get("/policies/oncall", headers=headers), 404, "Not Found", "Policy 'oncall' not found."
        )
        assert get(client, headers, "/policies/standard")["source"] == "file"
    assert [p["source"] for p in get(client, other.read, "/policies")["items"]] == ["file"] * 3
    assert_error(
        client.delete("/policies/oncall", headers=other.write), 404, "Not Found", "Policy 'oncall' not found."
    )
    response = client.post("/incidents", json={"title": "x", "policy": "oncall"}, headers=other.write)
    assert_error(
        response, 422, "Unprocessable Entity", errors={"json": {"policy": ["Unknown policy 'oncall'."]}}
    )
    # Another tenant's policy of the same name is its own, versioned on its own.
    assert put(client, other.write, "oncall", {"levels": [{"delay": "1h"}]}, 201)["version"] == 1
    assert get(client, tenant.read, "/policies/oncall")["levels"] == ONCALL_LEVELS


def test_unknown_and_impossible_names_are_404(client, tenant):
    assert_error(
        client.get("/policies/gold", headers=tenant.read), 404, "Not Found", "Policy 'gold' not found."
    )
    for name in ("-dash-first", "x" * 65, "has%20space", "%C3%BCnicode"):
        assert client.get(f"/policies/{name}", headers=tenant.read).status_code == 404
        assert client.put(f"/policies/{name}", json=ONCALL, headers=tenant.write).status_code == 404
    assert versions(client.application, tenant.name, "-dash-first") == []


# --- DELETE ---------------------------------------------------------------------------------------


def test_delete_marks_the_policy_deleted_and_keeps_every_version(client, tenant):
    put(client, tenant.write, "oncall", ONCALL, 201)
    put(client, tenant.write, "oncall", ONCALL)
    response = client.delete("/policies/oncall", headers=tenant.write)
    assert response.status_code == 204 and response.get_data() == b""
    assert_error(
        client.get("/policies/oncall", headers=tenant.read), 404, "Not Found", "Policy 'oncall' not found."
    )
    assert_error(client.delete("/policies/oncall", headers=tenant.write), 404, "Not Found")
    assert versions(client.application, tenant.name, "oncall") == [(1, False), (2, True)]
    # The name is free again; versions go on from where they were.
    assert put(client, tenant.write, "oncall", ONCALL, 201)["version"] == 3


def test_deleting_a_shadowing_policy_brings_the_files_back_and_the_files_cannot_be_deleted(client, tenant):
    put(client, tenant.write, "urgent", {"levels": [{"delay": "4h"}]}, 201)
    assert client.delete("/policies/urgent", headers=tenant.write).status_code == 204
    assert get(client, tenant.read, "/policies/urgent")["source"] == "file"
    assert_error(
        client.delete("/policies/urgent", headers=tenant.write),
        409,
        "Conflict",
        "Policy 'urgent' is the policy file's: only the operator changes it.",
    )


def test_versions_are_never_deleted(client, tenant):
    put(client, tenant.write, "oncall", ONCALL, 201)
    with pytest.raises(Exception, match="tenant_policies rows are never deleted"):
        with client.application.extensions["db"].begin() as session:
            session.delete(session.get(TenantPolicy, (tenant.name, "oncall", 1)))


# --- refusals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (None, "_schema"),
        ([], "_schema"),
        ("levels", "_schema"),
        ({}, "_schema"),
        ({"levels": [{"delay": "1m"}], "owner": "ops"}, "_schema"),
        ({"levels": []}, "levels"),
        ({"levels": {"delay": "1m"}}, "levels"),
        ({"levels": [{"delay": "1s"}] * (MAX_LEVELS + 1)}, "levels"),
        ({"levels": ["5m"]}, "levels[0]"),
        ({"levels": [{"delay": "1m"}, {"delay": "1m", "channel": "sms"}]}, "levels[1]"),
        ({"levels": [{"notify": ["sms"]}]}, "levels[0].delay"),
        ({"levels": [{"delay": 5}]}, "levels[0].delay"),
        ({"levels": [{"delay": "5"}]}, "levels[0].delay"),
        ({"levels": [{"delay": "1h30m"}]}, "levels[0].delay"),
        ({"levels": [{"delay": "8d"}]}, "levels[0].delay"),
        ({"levels": [{"delay": "169h"}]}, "levels[0].delay"),
        ({"levels": [{"delay": "0.5ms"}]}, "levels[0].delay"),
        ({"levels": [{"delay": "1m", "notify": "sms"}]}, "levels[0].notify"),
        ({"levels": [{"delay": "1m", "notify": None}]}, "levels[0].notify"),
        ({"levels": [{"delay": "1m", "notify": ["sms", "pager"]}]}, "levels[0].notify"),
    ],
)
def test_every_invalid_policy_is_a_422_naming_the_field_with_the_files_message(client, tenant, body, field):
    response = client.put("/policies/oncall", json=body, headers=tenant.write)
    errors = assert_error(response, 422, "Unprocessable Entity", INVALID_REQUEST)["errors"]
    assert list(errors) == ["json"] and list(errors["json"]) == [field]
    (reason,) = errors["json"][field]
    # The same words as for the same policy in a policy file, where it sits under policies.oncall.
    with pytest.raises(PolicyError) as in_a_file:
        parse_policies({"default_policy": "oncall", "policies": {"oncall": body}}, "policy.yaml")
    where = "policies.oncall" + ("" if field == "_schema" else f".{field}")
    assert str(in_a_file.value) == f"policy.yaml: {where}: {reason}"
    assert versions(client.application, tenant.name, "oncall") == []


def test_the_same_refusals_in_yaml(client, tenant):
    response = client.put(
        "/policies/oncall",
        data="levels:\n  - {delay: 8d}\n",
        headers={**tenant.write, "Content-Type": "text/yaml"},
    )
    assert assert_error(response, 422, "Unprocessable Entity")["errors"] == {
        "json": {"levels[0].delay": ["invalid duration '8d': use a number with ms, s, m or h, e.g. '5m'"]}
    }


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("levels: [", "The request body is not valid YAML: "),
        ("levels:\n  - &l {delay: 1m}\n  - *l\n", "aliases (*name) are not allowed in a policy file"),
        ("levels: []\nlevels: []\n", "duplicate key 'levels'"),
        ("levels: !!python/object/apply:os.system ['true']\n", "The request body is not valid YAML: "),
        ("[" * 5000, "The request body is not valid YAML: nested too deeply"),
    ],
)
def test_yaml_that_is_not_a_policy_file_s_yaml_is_a_400(client, tenant, text, says):
    response = client.put(
        "/policies/oncall", data=text, headers={**tenant.write, "Content-Type": "application/yaml"}
    )
    assert says in assert_error(response, 400, "Bad Request")["message"]


def test_bodies_of_another_type_too_large_or_malformed_are_refused(client, tenant):
    headers = {**tenant.write, "Content-Type": "text/plain"}
    assert_error(
        client.put("/policies/oncall", data="levels: []", headers=headers),
        415,
        "Unsupported Media Type",
        "The request body must be JSON (Content-Type: application/json) or YAML "
        "(application/yaml, text/yaml).",
    )
    big = {"levels": [{"delay": "1m", "notify": ["sms"] * 10_000}]}
    assert_error(
        client.put("/policies/oncall", json=big, headers=tenant.write),
        413,
        "Request Entity Too Large",
        "A policy is at most 65536 bytes, as the policy file.",
    )
    response = client.put(
        "/policies/oncall", data=b'{"levels": [', headers={**tenant.write, "Content-Type": "application/json"}
    )
    assert_error(response, 400, "Bad Request")
    # YAML anywhere else is still refused.
    response = client.post(
        "/incidents", data="title: x\n", headers={**tenant.write, "Content-Type": "application/yaml"}
    )
    assert_error(response, 415, "Unsupported Media Type")


def test_writes_need_a_write_key_and_reads_any_key(client, tenant):
    put(client, tenant.write, "oncall", ONCALL, 201)
    for response in (
        client.put("/policies/oncall", json=ONCALL, headers=tenant.read),
        client.delete("/policies/oncall", headers=tenant.read),
    ):
        assert_error(response, 403, "Forbidden", READ_ONLY)
    assert get(client, tenant.read, "/policies/oncall")["version"] == 1
    for method, path in (
        ("get", "/policies"),
        ("get", "/policies/oncall"),
        ("put", "/policies/x"),
        ("delete", "/policies/x"),
    ):
        assert getattr(client, method)(path).status_code == 401


def test_a_tenant_has_at_most_max_tenant_policies_of_its_own(client, routed_app, tenant):
    with routed_app.extensions["db"].begin() as session:
        for i in range(MAX_TENANT_POLICIES - 1):
            session.add(TenantPolicy(tenant=tenant.name, name=f"p{i}", version=1, body=ONCALL))
    put(client, tenant.write, "last", ONCALL, 201)
    response = client.put("/policies/one-more", json=ONCALL, headers=tenant.write)
    assert_error(
        response,
        409,
        "Conflict",
        f"This tenant has {MAX_TENANT_POLICIES} policies of its own, the most it may have: "
        "delete one to add another.",
    )
    assert put(client, tenant.write, "p0", ONCALL)["version"] == 2  # a new version of one it has
    assert client.delete("/policies/p1", headers=tenant.write).status_code == 204
    put(client, tenant.write, "one-more", ONCALL, 201)


def test_puts_racing_on_one_name_each_get_a_version(routed_app, tenant):
    """The second PUT waits on the first's uncommitted version 1, then takes version 2."""
    factory = routed_app.extensions["db"]
    policy = parse_policy("oncall", ONCALL)
    first = factory()
    first.begin()
    assert tenant_policy.put(first, tenant.name, policy)[0].version == 1
    results = []

    def second():
        with factory.begin() as session:
            row, created = tenant_policy.put(session, tenant.name, policy)
            results.append((row.version, created))

    racer = threading.Thread(target=second)
    racer.start()
    racer.join(0.3)
    assert racer.is_alive()  # waiting on the first's version 1
    first.commit()
    first.close()
    racer.join(10)
    assert results == [(2, False)]


# --- incidents escalating by a tenant's policy, and by severity -----------------------------------


def test_an_incident_escalates_by_the_tenants_policy_and_keeps_that_version(client, tenant):
    put(client, tenant.write, "oncall", {"levels": [{"delay": "1h"}]}, 201)
    put(client, tenant.write, "oncall", ONCALL)
    incident = create(client, tenant.write, policy="oncall")
    escalated = act(client, tenant.write, incident["id"], "escalate")
    assert (escalated["policy"], escalated["policy_version"]) == ("oncall", 2)
    stored = stored_incident(client.application, incident["id"])
    assert (stored.policy_version, stored.policy_levels) == (2, ONCALL_SNAPSHOT)
    (entry,) = [e for e in events(client, tenant.read, incident["id"]) if e["type"] == "escalated"]
    assert entry["data"] == {"policy": "oncall", "levels": 2, "repeat": 0, "version": 2}
    (level_1,) = escalations(client, tenant.read, incident["id"])
    assert level_1["notify"] == ["email", "sms"]
    # Editing or deleting the policy afterwards changes nothing for it.
    put(client, tenant.write, "oncall", {"levels": [{"delay": "1s", "notify": ["in_app"]}]})
    assert client.delete("/policies/oncall", headers=tenant.write).status_code == 204
    stored = stored_incident(client.application, incident["id"])
    assert (stored.policy_version, stored.policy_levels) == (2, ONCALL_SNAPSHOT)
    assert escalations(client, tenant.read, incident["id"]) == [level_1]
    assert get(client, tenant.read, f"/incidents/{incident['id']}")["policy_version"] == 2


def test_an_incident_of_a_file_policy_records_no_version(client, tenant):
    data, stored = escalate(client, tenant.write, policy="urgent")
    assert data == {"policy": "urgent", "levels": 1, "repeat": 0}
    assert (stored.policy_version, stored.policy_levels) == (None, URGENT)


@pytest.mark.parametrize(
    ("severity", "policy", "levels"),
    [
        ("critical", "urgent", URGENT),
        ("low", "quiet", QUIET),
        ("high", "standard", STANDARD),
        ("medium", "standard", STANDARD),
    ],
)
def test_an_incident_naming_no_policy_escalates_by_its_severitys_else_the_default(
    client, tenant, severity, policy, levels
):
    data, stored = escalate(client, tenant.write, severity=severity)
    assert data == {"policy": policy, "levels": len(levels), "repeat": 0}
    assert (stored.policy, stored.policy_version, stored.policy_levels) == (None, None, levels)


def test_a_named_policy_wins_over_the_severity(client, tenant):
    data, stored = escalate(client, tenant.write, severity="critical", policy="quiet")
    assert (data["policy"], stored.policy_levels) == ("quiet", QUIET)


def test_a_tenants_policy_shadows_the_one_its_severity_maps_to_and_the_default(client, tenant, other):
    put(client, tenant.write, "urgent", ONCALL, 201)
    put(client, tenant.write, "standard", ONCALL, 201)
    for severity in ("critical", "high"):
        data, stored = escalate(client, tenant.write, severity=severity)
        assert data["version"] == 1 and (stored.policy_version, stored.policy_levels) == (1, ONCALL_SNAPSHOT)
    # Only for that tenant.
    _, stored = escalate(client, other.write, severity="critical")
    assert (stored.policy_version, stored.policy_levels) == (None, URGENT)


def test_an_incident_whose_tenant_policy_was_deleted_escalates_by_the_default(client, tenant):
    put(client, tenant.write, "oncall", ONCALL, 201)
    put(client, tenant.write, "urgent", ONCALL, 201)
    named = create(client, tenant.write, policy="oncall", severity="critical")
    shadowed = create(client, tenant.write, policy="urgent")
    for name in ("oncall", "urgent"):
        assert client.delete(f"/policies/{name}", headers=tenant.write).status_code == 204
    act(client, tenant.write, named["id"], "escalate")
    act(client, tenant.write, shadowed["id"], "escalate")
    stored = stored_incident(client.application, named["id"])
    assert (stored.policy, stored.policy_version, stored.policy_levels) == ("oncall", None, STANDARD)
    # The file's policy of the same name applies again.
    stored = stored_incident(client.application, shadowed["id"])
    assert (stored.policy_version, stored.policy_levels) == (None, URGENT)
