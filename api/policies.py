"""The policies resource: the operator's policy file and the tenant's own policies, which shadow the
file's of the same name for that tenant only.

Thin views, as api/incidents.py. A policy's body is parsed by models/policy.py, the policy file's own
parser, so a request is refused with the file's messages.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, current_app, g, request, url_for
from flask.views import MethodView
from flask_smorest import Api, Blueprint, abort
from sqlalchemy import Row
from werkzeug.routing import BaseConverter

from api.auth import authenticate
from api.bodies import YAML_TYPES
from api.db import db_session
from api.schemas import PolicyBodySchema, PolicyListSchema, PolicySchema
from models import tenant_policy
from models.policy import (
    MAX_FILE_BYTES,
    NAME_PATTERN,
    Policy,
    PolicyError,
    PolicySet,
    load_yaml,
    parse_policy,
)
from models.tenant_policy import MAX_TENANT_POLICIES, TenantPolicy

blp = Blueprint(
    "policies",
    __name__,
    url_prefix="/policies",
    description="Escalation policies: the file's and the tenant's own",
)
blp.before_request(authenticate)


class PolicyNameConverter(BaseConverter):
    """A policy name in a URL: what no policy can be named is a URL that does not exist (404)."""

    regex = NAME_PATTERN


def _file() -> PolicySet:
    return current_app.extensions["policies"]


def _describe(policy: Policy, own: TenantPolicy | Row | None) -> dict[str, Any]:
    """A policy as the API shows it: where it comes from, its levels in the file's notation, its timeline."""
    return {
        "name": policy.name,
        "source": "tenant" if own else "file",
        "version": own.version if own else None,
        "shadows": own is not None and policy.name in _file().policies,
        "levels": policy.as_body()["levels"],
        "repeat": policy.repeat,
        "ack_timeout": policy.as_body().get("ack_timeout"),
        "timeline": policy.timeline(),
        "created_at": own.created_at if own else None,
    }


def _body() -> Any:
    """The request's policy: JSON, or YAML read as the policy file is (an empty body is None)."""
    raw = request.get_data(cache=True)
    if len(raw) > MAX_FILE_BYTES:
        abort(413, message=f"A policy is at most {MAX_FILE_BYTES} bytes, as the policy file.")
    if not raw:
        return None
    if request.mimetype in YAML_TYPES:
        try:
            return load_yaml(raw, "")
        except PolicyError as exc:
            abort(400, message=f"The request body is {exc.reason}")
    return request.get_json()  # JSON (api/bodies.py refused any other type); malformed: a 400


@blp.route("")
@blp.response(200, PolicyListSchema)
def list_policies():
    """The policies the tenant's incidents may name, by name: the policy file's and the tenant's own
    (which take the place of the file's of the same name); the default and the severity map."""
    own = {row.name: row for row in tenant_policy.current(db_session(), g.api_key.tenant)}
    file = _file()
    items = [
        _describe(own[name].policy(), own[name]) if name in own else _describe(file.policies[name], None)
        for name in sorted(own.keys() | file.policies.keys())
    ]
    return {"items": items, "default_policy": file.default, "severity_policies": file.severity_policies}


@blp.route("/<policy_name:name>", endpoint="Policy")
class PolicyByName(MethodView):
    @blp.response(200, PolicySchema)
    def get(self, name):
        """Read a policy as the tenant's incidents see it: its own of that name, else the file's."""
        found = tenant_policy.find(db_session(), _file(), g.api_key.tenant, name)
        if found is None:
            abort(404, message=f"Policy {name!r} not found.")
        return _describe(*found)

    @blp.doc(
        requestBody={
            "required": True,
            "content": {media: {"schema": PolicyBodySchema} for media in ("application/json", *YAML_TYPES)},
        }
    )
    @blp.response(200, PolicySchema)
    @blp.alt_response(201, schema=PolicySchema, description="The tenant had no policy of this name: created")
    def put(self, name):
        """Store the tenant's policy as its next version: one policy of the policy file, {"levels": [...]},
        in JSON or YAML. Incidents escalating already keep the levels they started with."""
        try:
            policy = parse_policy(name, _body())
        except PolicyError as exc:
            abort(422, errors={"json": {exc.field or "_schema": [exc.reason]}})
        session = db_session()
        try:
            own, created = tenant_policy.put(session, g.api_key.tenant, policy)
        except tenant_policy.TooManyPolicies:
            session.rollback()
            abort(
                409,
                message=f"This tenant has {MAX_TENANT_POLICIES} policies of its own, the most it may have: "
                "delete one to add another.",
            )
        session.commit()
        return (
            _describe(policy, own),
            201 if created else 200,
            {"Location": url_for("policies.Policy", name=name)},
        )

    @blp.response(204)
    def delete(self, name):
        """Delete the tenant's own policy (its versions stay on record). Incidents escalating already
        keep their levels; one that names it and escalates later does so by the file's policy of that
        name, else by the default policy."""
        session = db_session()
        if not tenant_policy.delete(session, g.api_key.tenant, name):
            if name in _file().policies:
                abort(
                    409,
                    message=f"Policy {name!r} is the policy file's: only the operator changes it.",
                )
            abort(404, message=f"Policy {name!r} not found.")
        session.commit()


def init_app(app: Flask, api: Api) -> None:
    """Policy names in URLs (documented by their pattern), then the blueprint."""
    app.url_map.converters["policy_name"] = PolicyNameConverter
    api.register_converter(
        PolicyNameConverter, lambda _converter: {"type": "string", "pattern": f"^{NAME_PATTERN}$"}
    )
    api.register_blueprint(blp)
