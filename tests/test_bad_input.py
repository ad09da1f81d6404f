"""Bad input: property-based fuzzing of the served OpenAPI document (schemathesis), explicit hostile
requests and policy files, and a Hypothesis state machine driving the real API against the model in
models/lifecycle.py."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from schemathesis.specs.openapi.checks import positive_data_acceptance

from models.lifecycle import ALLOWED, CLIENT_ACTIONS, TARGET, Action, State
from models.policy import PolicyError, load_policies

# -- schemathesis against the served document -------------------------------------------------------


@pytest.fixture(scope="module")
def web_with_every_channel(process_env, log_dir):
    """A real gunicorn whose settings can send on every channel: a contact on any channel the
    document offers is then accepted."""
    from tests.support.processes import web as make_web
    from tests.test_contacts import CHANNEL_ENV

    proc = make_web({**process_env, **CHANNEL_ENV}, log_dir, name="web-every-channel").start()
    yield f"http://127.0.0.1:{proc.port}"
    proc.stop()


def _documented_refusal(response) -> bool:
    """The refusals of requests the document allows, each stated in the document: a policy name is
    any text to the schema, and only the names the server knows are policies; a contact's address is
    checked against its channel (a deliverable email domain, a phone number its numbering plan
    allows, a URL whose host resolves to a public address), which no schema can state; a policy's
    delay (and ack timeout) matches its pattern, and must also be whole milliseconds and 7 days at most
    (an ack timeout 1s at least); the level an escalate names must be one of the incident's policy, on
    an escalating incident."""
    if response.status_code != 422:
        return False
    errors = response.json().get("errors", {}).get("json", {})
    if list(errors) == ["policy"]:
        return all(message.startswith("Unknown policy") for message in errors["policy"])
    if errors and all(re.fullmatch(r"levels\[\d+\]\.delay|ack_timeout", field) for field in errors):
        return all(
            message.endswith(("longer than 7 days", "below one millisecond", "at least 1s"))
            for messages in errors.values()
            for message in messages
        )
    # A level to page now exists only on an escalating incident, and only up to its policy's levels.
    return list(errors) in (["address"], ["level"])


def test_every_operation_answers_within_its_schema(web_with_every_channel, auth):
    """No 5xx; every answer (status, content type, body) matches the documented schema; every request
    the document allows is accepted and every one it forbids is refused: each operation of the served
    /openapi.json, with generated valid and invalid requests and a valid key.
    (schemathesis.pytest.from_fixture does not run under pytest 9, so the operations are walked here.)"""
    served = schemathesis.openapi.from_url(f"{web_with_every_channel}/openapi.json")
    operations = [result.ok() for result in served.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers=auth, timeout=10)
            excluded = [positive_data_acceptance] if _documented_refusal(response) else []
            case.validate_response(response, headers=auth, excluded_checks=excluded)

        check()


# -- explicit hostile requests --------------------------------------------------------------------


def error(response, status):
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["code"] == status and body["message"], body
    assert "Traceback" not in response.get_data(as_text=True)
    return body


def create(client, auth, **body):
    return client.post("/incidents", json={"title": "bad input", **body}, headers=auth)


def test_malformed_json_is_a_400(client, auth):
    # The README: "Malformed JSON is 400".
    for raw in [b"{", b"{'title': 'x'}", b"\xff\xfe", b'{"title": "x"}}', b"[1, 2"]:
        response = client.post("/incidents", data=raw, headers={**auth, "Content-Type": "application/json"})
        error(response, 400)


@pytest.mark.parametrize(
    "body",
    [
        {"title": 123},
        {"title": None},
        {"title": ["x"]},
        {"title": "x", "severity": "apocalyptic"},
        {"title": "x", "severity": 1},
        {"title": "x", "description": {"a": 1}},
        {"title": "x", "policy": 5},
        {"title": "x", "unknown": "field"},
        {"title": "x", "state": "RESOLVED"},
        {"title": "x", "id": str(uuid.uuid4())},
        {"title": ""},
        {"title": "x" * 201},
        {"title": "x", "description": "y" * 10_001},
        {"title": "nul\x00byte"},
        {"title": "bell\x07"},
        {"title": "line\nbreak"},
        {"title": "x", "description": "esc\x1b[31m"},
        {"title": "x", "policy": "no-such-policy"},
        {},
    ],
)
def test_invalid_bodies_are_a_422_naming_the_field(client, auth, body):
    body_out = error(client.post("/incidents", json=body, headers=auth), 422)
    assert body_out.get("errors"), body_out


def test_a_json_array_or_scalar_body_is_refused(client, auth):
    # Well-formed JSON that is not the object the schema describes: invalid input, 422 (the README:
    # "unknown or invalid fields 422"); malformed JSON alone is 400.
    for payload in ([], [{"title": "x"}], "x", 1, None):
        response = client.post("/incidents", json=payload, headers=auth)
        assert error(response, 422).get("errors"), payload


def test_oversized_body_is_a_413(client, auth):
    response = client.post("/incidents", json={"title": "x", "description": "y" * (300 * 1024)}, headers=auth)
    error(response, 413)


def test_the_largest_valid_body_is_accepted(client, auth):
    """Every character of every text field as a JSON escape of an astral character (12 bytes each)."""
    body = {
        "title": "\U0001f525" * 200,
        "description": "\U0001f525" * 10_000,
        "dedup_key": "\U0001f525" * 255,
    }
    payload = json.dumps(body, ensure_ascii=True)
    assert len(payload) > 120_000
    response = client.post("/incidents", data=payload, content_type="application/json", headers=auth)
    assert response.status_code == 201, response.get_json()


def test_json_nested_deeper_than_the_parser_recurses_is_a_400(client, auth):
    deep = '{"title": "x", "description": ' + "[" * 60_000 + "]" * 60_000 + "}"
    body = error(client.post("/incidents", data=deep, content_type="application/json", headers=auth), 400)
    assert body["message"] == "The request body is nested too deeply."
    assert client.get("/incidents?limit=100", headers=auth).status_code == 200


@pytest.mark.parametrize(
    ("path", "content_type", "data"),
    [
        ("/incidents", "application/x-www-form-urlencoded", "title=x"),
        ("/incidents", "text/plain", '{"title": "x"}'),
        ("/contacts", "multipart/form-data; boundary=b", "--b--"),
    ],
)
def test_a_body_that_is_not_json_is_a_415(client, auth, path, content_type, data):
    body = error(client.post(path, data=data, content_type=content_type, headers=auth), 415)
    assert "application/json" in body["message"]


def test_an_optional_body_of_another_type_is_a_415_and_changes_nothing(client, auth):
    incident = client.post("/incidents", json={"title": "note as text"}, headers=auth).get_json()
    response = client.post(
        f"/incidents/{incident['id']}/acknowledge", data="note=x", content_type="text/plain", headers=auth
    )
    error(response, 415)
    assert client.get(f"/incidents/{incident['id']}", headers=auth).get_json()["state"] == "OPEN"


def test_transition_note_is_validated(client, auth):
    incident = create(client, auth).get_json()
    for note in ["x" * 2001, "nul\x00", 12, ["a"]]:
        error(client.post(f"/incidents/{incident['id']}/acknowledge", json={"note": note}, headers=auth), 422)
    error(client.post(f"/incidents/{incident['id']}/acknowledge", json={"other": 1}, headers=auth), 422)
    assert client.get(f"/incidents/{incident['id']}", headers=auth).get_json()["state"] == "OPEN"


@pytest.mark.parametrize(
    "bad_id", ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g", "%00", "..%2f"]
)
def test_non_uuid_ids_are_a_404(client, auth, bad_id):
    for path in [f"/incidents/{bad_id}", f"/incidents/{bad_id}/events", f"/incidents/{bad_id}/escalations"]:
        error(client.get(path, headers=auth), 404)
    error(client.post(f"/incidents/{bad_id}/resolve", headers=auth), 404)


def test_unknown_ids_are_a_404(client, auth):
    missing = uuid.uuid4()
    error(client.get(f"/incidents/{missing}", headers=auth), 404)
    error(client.post(f"/incidents/{missing}/escalate", headers=auth), 404)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=-1",
        "limit=101",
        "limit=99999999999999999999999",
        "limit=abc",
        "limit=1.5",
        "state=DONE",
        "cursor=!!!",
        "cursor=" + "A" * 201,
        "cursor=eyJ4IjogMX0",  # base64 of a JSON object, not a cursor
        "cursor=WyJub3QtYS1kYXRlIiwgIngiXQ",  # ["not-a-date", "x"]
        "cursor=WyIyMDI0LTAxLTAxVDAwOjAwOjAwIiwgIjEiXQ",  # naive date, bad uuid
    ],
)
def test_bad_listing_arguments_are_a_422(client, auth, query):
    error(client.get(f"/incidents?{query}", headers=auth), 422)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer inc_00000000_nope"},
        {"Authorization": "Bearer " + "x" * 10_000},
        {"Authorization": "Bearer \x00"},
    ],
)
def test_missing_or_invalid_keys_are_a_401(client, headers):
    error(client.get("/incidents", headers=headers), 401)
    error(client.post("/incidents", json={"title": "x"}, headers=headers), 401)


def test_revoked_key_is_a_401(client, make_key):
    revoked = make_key("acme", revoked=True)
    error(client.get("/incidents", headers=revoked), 401)


def test_read_key_cannot_write(client, make_key, auth):
    read = make_key("acme", scope="read")
    assert client.get("/incidents", headers=read).status_code == 200
    error(client.post("/incidents", json={"title": "x"}, headers=read), 403)
    incident = create(client, auth).get_json()
    for action in CLIENT_ACTIONS:
        error(client.post(f"/incidents/{incident['id']}/{action.value}", headers=read), 403)
    assert client.get(f"/incidents/{incident['id']}", headers=auth).get_json()["state"] == "OPEN"


def test_another_tenants_incidents_do_not_exist(client, make_key, auth):
    incident = create(client, auth).get_json()
    other = make_key("globex")
    for path in ["", "/events", "/escalations"]:
        error(client.get(f"/incidents/{incident['id']}{path}", headers=other), 404)
    for action in CLIENT_ACTIONS:
        error(client.post(f"/incidents/{incident['id']}/{action.value}", headers=other), 404)
    listed = client.get("/incidents?limit=100", headers=other).get_json()["items"]
    assert incident["id"] not in {i["id"] for i in listed}
    assert client.get(f"/incidents/{incident['id']}", headers=auth).get_json()["state"] == "OPEN"


# -- hostile policy files -------------------------------------------------------------------------

LEVEL = "      - {delay: 1s, notify: [email]}\n"


def policy(levels: str, extra: str = "") -> str:
    return f"default_policy: p\npolicies:\n  p:\n    levels:\n{levels}{extra}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (policy("      - {delay: soon, notify: [email]}\n"), "invalid duration"),
        (policy("      - {delay: -5m, notify: [email]}\n"), "invalid duration"),
        (policy("      - {delay: 5, notify: [email]}\n"), "expected a duration"),
        (policy("      - {delay: 0.0001ms, notify: [email]}\n"), "below one millisecond"),
        (policy("      - {delay: 9999h, notify: [email]}\n"), "longer than 7 days"),
        (policy("      - {notify: [email]}\n"), "delay: missing"),
        (policy("      - {delay: 1s, notify: [carrier_pigeon]}\n"), "cannot be delivered"),
        (policy("      - {delay: 1s, notify: email}\n"), "list of channel names"),
        (policy("      - {delay: 1s, notify: [email], retries: 3}\n"), "unknown field"),
        ("default_policy: p\npolicies:\n  p:\n    levels: []\n", "non-empty list"),
        ("default_policy: p\npolicies:\n  p: {}\n", "expected a mapping with 'levels'"),
        (policy(LEVEL) + "    repeat: 10\n", "whole number from 0 to 9"),
        ("default_policy: p\npolicies: {}\n", "non-empty mapping"),
        (policy(LEVEL * 1000), "at most 20 allowed"),
        (policy(LEVEL * 5000), "larger than"),
        (policy(LEVEL).replace("default_policy: p", "default_policy: q"), "default_policy"),
        ("", "expected a mapping"),
        ("- just\n- a list\n", "expected a mapping"),
        ("policies: [unclosed\n", "not valid YAML"),
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
            "aliases",
        ),
        (policy("      - &lvl {delay: 1s, notify: [email]}\n      - *lvl\n"), "aliases"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
        (policy(LEVEL) + "  " + "x" * 70_000 + ": 1\n", "larger than"),
    ],
)
def test_hostile_policy_files_are_refused_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as refused:
        load_policies(path)
    assert message in str(refused.value), str(refused.value)
    assert str(path) in str(refused.value)


def test_the_app_refuses_to_start_on_a_bad_policy(tmp_path, database_url):
    from api import create_app

    path = tmp_path / "policy.yaml"
    path.write_text(policy("      - {delay: -1s, notify: [email]}\n"))
    with pytest.raises(PolicyError, match="invalid duration"):
        create_app({"DATABASE_URL": database_url, "ESCALATION_POLICY_FILE": str(path)})


# -- a state machine driving the real API -----------------------------------------------------------


class IncidentMachine(RuleBasedStateMachine):
    """Creates incidents and applies random actions through the real API (the Flask app on the real
    database); each answer must be the one the lifecycle model predicts."""

    client = None
    auth: dict = {}
    incidents = Bundle("incidents")

    @initialize()
    def setup(self):
        self.model: dict[str, State] = {}

    @rule(target=incidents, severity=st.sampled_from(["critical", "high", "medium", "low"]))
    def create(self, severity):
        response = self.client.post(
            "/incidents", json={"title": "sm", "severity": severity}, headers=self.auth
        )
        assert response.status_code == 201, response.get_data(as_text=True)
        body = response.get_json()
        assert body["state"] == "OPEN" and body["severity"] == severity
        self.model[body["id"]] = State.OPEN
        return body["id"]

    @rule(incident=incidents, action=st.sampled_from(CLIENT_ACTIONS))
    def act(self, incident, action):
        before = self.model[incident]
        if before is State.ESCALATING and action is Action.ESCALATE:
            # Escalate now: pages the pending level (200, still ESCALATING), or 409 with none left.
            pending = [e for e in self.escalations(incident) if e["status"] == "PENDING"]
            response = self.client.post(f"/incidents/{incident}/escalate", headers=self.auth)
            assert response.status_code == (200 if pending else 409), response.get_data(as_text=True)
            if pending:
                assert response.get_json()["state"] == "ESCALATING"
                paged = {e["id"]: e for e in self.escalations(incident)}[pending[0]["id"]]
                assert (paged["status"], paged["manual"]) == ("EXECUTED", True)
            return
        response = self.client.post(f"/incidents/{incident}/{action.value}", headers=self.auth)
        if TARGET[action] in ALLOWED[before]:
            assert response.status_code == 200, (before, action, response.get_data(as_text=True))
            body = response.get_json()
            assert body["state"] == TARGET[action].value
            self.model[incident] = TARGET[action]
        else:
            assert response.status_code == 409, (before, action, response.get_data(as_text=True))
            assert response.get_json()["errors"]["state"] == [before.value]

    @rule(incident=incidents)
    def read(self, incident):
        body = self.client.get(f"/incidents/{incident}", headers=self.auth).get_json()
        assert body["state"] == self.model[incident].value
        events = self.client.get(f"/incidents/{incident}/events", headers=self.auth).get_json()["items"]
        transitions = [e for e in events if e["type"] != "escalation_executed"]
        assert transitions[0]["type"] == "created"
        assert transitions[-1]["to_state"] == self.model[incident].value
        for previous, event in zip(transitions, transitions[1:], strict=False):
            assert event["from_state"] == previous["to_state"]
        escalations = self.escalations(incident)
        if self.model[incident] not in (State.ESCALATING,):
            assert all(e["status"] != "PENDING" for e in escalations), escalations

    def escalations(self, incident) -> list[dict]:
        return self.client.get(f"/incidents/{incident}/escalations", headers=self.auth).get_json()["items"]

    @invariant()
    def the_api_agrees_with_the_model(self):
        """After every step, the tenant's listing (its own tenant: only this run's incidents, newest
        first) holds exactly the model's incidents, each in the model's state."""
        model = getattr(self, "model", {})
        if not model:
            return
        listed = self.client.get("/incidents?limit=100", headers=self.auth).get_json()["items"]
        ours = {i["id"]: i["state"] for i in listed if i["id"] in model}
        assert ours == {incident: state.value for incident, state in model.items()}


def test_state_machine_against_the_real_api(client, make_key):
    IncidentMachine.client = client
    IncidentMachine.auth = make_key(f"sm-{uuid.uuid4().hex[:12]}")
    run_state_machine_as_test(
        IncidentMachine,
        settings=settings(
            max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
        ),
    )
