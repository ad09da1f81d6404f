"""Request bodies are JSON: checked once, before any view, for what the schemas cannot see."""

from __future__ import annotations

import json

from flask import Flask, request
from flask_smorest import abort

BODY_METHODS = ("POST", "PUT", "PATCH")
# A policy may also come in YAML, the policy file's own notation: its view parses it with the file's
# loader (models/policy.py), which refuses what nests too deep.
YAML_TYPES = ("application/yaml", "text/yaml")
YAML_ENDPOINTS = ("policies.Policy",)
# A body with fewer opening brackets than this nests less deep than Python's recursion limit (1000)
# allows the JSON parser, whatever the strings hold: the view's own parse is enough.
SHALLOW = 500


def check_body() -> None:
    """A non-empty body that is not JSON is a 415 (without this, an optional body of another type
    would be ignored and the call would succeed). JSON nested deeper than Python's parser recurses
    is a 400, not a RecursionError's 500: no valid request nests more than a few levels."""
    if request.method not in BODY_METHODS:
        return
    data = request.get_data(cache=True)  # within MAX_CONTENT_LENGTH, else a 413
    if not data:
        return
    takes_yaml = request.endpoint in YAML_ENDPOINTS
    if takes_yaml and request.mimetype in YAML_TYPES:
        return
    if not request.is_json:
        abort(
            415,
            message="The request body must be JSON (Content-Type: application/json)"
            + (" or YAML (application/yaml, text/yaml)." if takes_yaml else "."),
        )
    if data.count(b"[") + data.count(b"{") < SHALLOW:
        return  # cannot nest deeper than the parser recurses: no second parse on the request path
    try:
        json.loads(data)
    except RecursionError:
        abort(400, message="The request body is nested too deeply.")
    except ValueError:
        pass  # malformed JSON: the view's parser answers 400 "Invalid JSON body." as for any other


def init_app(app: Flask) -> None:
    app.before_request(check_body)
