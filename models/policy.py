"""Escalation policies: policy.yaml -> validated, frozen dataclasses.

Pure: parsing and validation only. A bad file raises PolicyError naming the file and the field, so the
web and worker processes refuse to start on it instead of failing at 3 a.m. when a level falls due.
A tenant's own policy (PUT /policies/{name}) goes through the same parse_policy(), so it is refused
with the same messages.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import accumulate
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 64 * 1024
MAX_POLICIES = 100
MAX_LEVELS = 20  # PagerDuty and Opsgenie stop around here; more is a typo, not a policy.
MAX_DELAY_MS = 7 * 24 * 3600 * 1000
# Rounds after the first when nobody answers (`repeat`): ten rounds of a page is a runaway, not a plan.
MAX_REPEAT = 9
# An acknowledgement lasts at least this long before it times out (0 would page again at once).
MIN_ACK_TIMEOUT_MS = 1000
# The channels a level can notify: each one is delivered (tasks/channels); a name that nothing can
# deliver is refused here, not discovered when the level fires.
CHANNELS = ("in_app", "email", "sms", "webhook", "slack")
# An incident's severities, most urgent first (models/incident.py stores them, the API accepts them):
# severity_policies maps them to policies.
SEVERITIES = ("critical", "high", "medium", "low")
# Unanchored, for fullmatch: the API's URLs take policy names by the same pattern (api/policies.py).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
# Unanchored, for fullmatch; [0-9], not \d, which would take other scripts' digits. The OpenAPI
# document states the same pattern (api/schemas.py).
DURATION_PATTERN = r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)"
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


class PolicyError(ValueError):
    """A policy file, or a policy sent to the API, is unreadable or invalid. The message names the file
    and the field; `field` and `reason` are its parts, for the API's 422 that names the field."""

    def __init__(self, source: str, where: str, reason: str):
        super().__init__(": ".join(part for part in (source, where, reason) if part))
        self.field = where
        self.reason = reason


@dataclass(frozen=True)
class Level:
    delay_ms: int
    notify: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """The form a level is snapshotted in on an incident."""
        return {"delay_ms": self.delay_ms, "notify": list(self.notify)}


@dataclass(frozen=True)
class Policy:
    name: str
    levels: tuple[Level, ...]
    # After the last level, when the incident is still escalating (nobody acknowledged), the chain
    # starts again at level 1 this many more times: a policy that runs out of levels never goes silent
    # on an incident nobody answered.
    repeat: int = 0
    # An incident acknowledged while escalating, and neither resolved nor cancelled within this, goes
    # back to escalating and pages again from the level last executed (None: never).
    ack_timeout_ms: int | None = None

    def as_body(self) -> dict[str, Any]:
        """The policy in the file's notation, normalised: what PUT /policies/{name} takes and GET shows."""
        body: dict[str, Any] = {
            "levels": [
                {"delay": format_duration(lv.delay_ms), "notify": list(lv.notify)} for lv in self.levels
            ]
        }
        if self.repeat:
            body["repeat"] = self.repeat
        if self.ack_timeout_ms is not None:
            body["ack_timeout"] = format_duration(self.ack_timeout_ms)
        return body

    def timeline(self) -> str:
        """'level 1 at +5m, level 2 at +20m, level 3 at +1h20m, repeat 2x -> last page at +4h': when each
        level falls due, counted from the moment the incident starts escalating (and nobody answers)."""
        due = list(accumulate(level.delay_ms for level in self.levels))
        line = ", ".join(f"level {number} at +{format_elapsed(ms)}" for number, ms in enumerate(due, start=1))
        if self.repeat:
            # Each round starts when the previous one's last level has executed: rounds add up.
            line += f", repeat {self.repeat}x -> last page at +{format_elapsed(due[-1] * (self.repeat + 1))}"
        if self.ack_timeout_ms is not None:
            line += f"; acknowledged and not resolved for {format_elapsed(self.ack_timeout_ms)}: pages again"
        return line


@dataclass(frozen=True)
class PolicySet:
    default: str
    policies: dict[str, Policy]
    # severity -> the name of the policy an incident of that severity escalates by when it names none.
    severity_policies: dict[str, str] = field(default_factory=dict)

    def get(self, name: str | None) -> Policy:
        """The named policy, or the default one for None."""
        return self.policies[name or self.default]

    def name_for(self, named: str | None, severity: str) -> str:
        """The name of the policy an incident escalates by: the one it names, else the one its severity
        maps to, else the default."""
        return named or self.severity_policies.get(severity) or self.default


def parse_duration(text: Any) -> int:
    """'5m' -> 300000 (milliseconds). Accepts ms, s, m and h; nothing negative, nothing unitless."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as '5m' or '500ms', got {text!r}")
    match = re.fullmatch(DURATION_PATTERN, text.strip())
    if not match:
        raise ValueError(f"invalid duration {text!r}: use a number with ms, s, m or h, e.g. '5m'")
    # Exact arithmetic: a float turns '1.001s' into 1000.9999999999999 ms and '1' * 400 into inf.
    value = Fraction(match.group(1)) * UNIT_MS[match.group(2)]
    if value.denominator != 1:
        raise ValueError(f"invalid duration {text!r}: below one millisecond")
    if value > MAX_DELAY_MS:
        raise ValueError(f"invalid duration {text!r}: longer than 7 days")
    return int(value)


def format_duration(ms: int) -> str:
    """300000 -> '5m': the shortest exact form, for timelines and logs."""
    for unit in ("h", "m", "s"):
        if ms and ms % UNIT_MS[unit] == 0:
            return f"{ms // UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def format_elapsed(ms: int) -> str:
    """4800000 -> '1h20m': a span as people read it (timelines; not a duration the parser takes)."""
    parts = []
    for unit in ("h", "m", "s", "ms"):
        count, ms = divmod(ms, UNIT_MS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses anchors and aliases (no 'billion laughs' through a policy file) and
    duplicate keys (YAML would silently keep the last: a second 'standard' policy replacing the first)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # PyYAML's own construct_mapping refuses it, as a YAMLError
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a policy file", event.start_mark
            )
        return super().compose_node(parent, index)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _one_of(name: Any, policies: dict[str, Policy]) -> str | None:
    """None when `name` names one of the policies, else what is wrong with it."""
    if isinstance(name, str) and name in policies:
        return None
    return f"{name!r} is not one of the policies ({', '.join(policies)})"


def _parse_level(source: str, where: str, raw: Any) -> Level:
    if not isinstance(raw, dict):
        raise PolicyError(source, where, "expected a mapping with 'delay' and 'notify'")
    unknown = set(raw) - {"delay", "notify"}
    if unknown:
        raise PolicyError(source, where, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    if "delay" not in raw:
        raise PolicyError(source, f"{where}.delay", "missing")
    try:
        delay_ms = parse_duration(raw["delay"])
    except ValueError as exc:
        raise PolicyError(source, f"{where}.delay", str(exc)) from None
    notify = raw.get("notify", [])
    if not isinstance(notify, list) or not all(isinstance(c, str) for c in notify):
        raise PolicyError(source, f"{where}.notify", "expected a list of channel names")
    bad = [c for c in notify if c not in CHANNELS]
    if bad:
        raise PolicyError(
            source,
            f"{where}.notify",
            f"channel(s) {', '.join(bad)} cannot be delivered; known: {', '.join(CHANNELS)}",
        )
    return Level(delay_ms=delay_ms, notify=tuple(dict.fromkeys(notify)))


def parse_policy(name: str, body: Any, source: str = "", where: str = "") -> Policy:
    """One policy's body, {'levels': [...]}, as in the file and in PUT /policies/{name}. `where` is the
    body's place in `source` ('policies.<name>' in a file; '' for a request's body): errors name both."""
    if not isinstance(body, dict) or "levels" not in body:
        raise PolicyError(
            source, where, "expected a mapping with 'levels' (and optionally 'repeat', 'ack_timeout')"
        )
    unknown = set(body) - {"levels", "repeat", "ack_timeout"}
    if unknown:
        raise PolicyError(source, where, f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    repeat = body.get("repeat", 0)
    if type(repeat) is not int or not 0 <= repeat <= MAX_REPEAT:  # bool is an int: not here
        raise PolicyError(source, _join(where, "repeat"), f"expected a whole number from 0 to {MAX_REPEAT}")
    ack_timeout_ms = None
    if body.get("ack_timeout") is not None:
        try:
            ack_timeout_ms = parse_duration(body["ack_timeout"])
        except ValueError as exc:
            raise PolicyError(source, _join(where, "ack_timeout"), str(exc)) from None
        if ack_timeout_ms < MIN_ACK_TIMEOUT_MS:
            raise PolicyError(source, _join(where, "ack_timeout"), "at least 1s")
    levels_at = _join(where, "levels")
    levels = body["levels"]
    if not isinstance(levels, list) or not levels:
        raise PolicyError(source, levels_at, "expected a non-empty list")
    if len(levels) > MAX_LEVELS:
        raise PolicyError(source, levels_at, f"{len(levels)} levels, at most {MAX_LEVELS} allowed")
    return Policy(
        name=name,
        levels=tuple(_parse_level(source, f"{levels_at}[{i}]", raw) for i, raw in enumerate(levels)),
        repeat=repeat,
        ack_timeout_ms=ack_timeout_ms,
    )


def _parse_severity_policies(raw: Any, policies: dict[str, Policy], source: str) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise PolicyError(source, "severity_policies", "expected a mapping of severities to policy names")
    for severity, name in raw.items():
        where = f"severity_policies.{severity}"
        if severity not in SEVERITIES:
            raise PolicyError(source, where, f"unknown severity; known: {', '.join(SEVERITIES)}")
        wrong = _one_of(name, policies)
        if wrong:
            raise PolicyError(source, where, wrong)
    return dict(raw)


def parse_policies(data: Any, source: str = "policy") -> PolicySet:
    """Validate an already-loaded document; `source` names it in error messages."""
    if not isinstance(data, dict):
        raise PolicyError(source, "", "expected a mapping with 'default_policy' and 'policies'")
    unknown = set(data) - {"default_policy", "policies", "severity_policies"}
    if unknown:
        raise PolicyError(source, "", f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    raw_policies = data.get("policies")
    if not isinstance(raw_policies, dict) or not raw_policies:
        raise PolicyError(source, "policies", "expected a non-empty mapping of named policies")
    if len(raw_policies) > MAX_POLICIES:
        raise PolicyError(source, "policies", f"more than {MAX_POLICIES} policies")
    policies: dict[str, Policy] = {}
    for name, body in raw_policies.items():
        if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
            raise PolicyError(
                source, f"policies.{name}", "invalid name (letters, digits, '_', '.', '-'; 64 at most)"
            )
        policies[name] = parse_policy(name, body, source, f"policies.{name}")
    default = data.get("default_policy")
    wrong = _one_of(default, policies)
    if wrong:
        raise PolicyError(source, "default_policy", wrong)
    return PolicySet(
        default=default,
        policies=policies,
        severity_policies=_parse_severity_policies(data.get("severity_policies", {}), policies, source),
    )


def load_yaml(raw: bytes, source: str) -> Any:
    """Parse policy YAML, from the file or a request: safely (no object tags), without aliases or
    duplicate keys, and refusing what nests deeper than the parser recurses (a RecursionError
    otherwise)."""
    try:
        return yaml.load(raw, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(source, "", f"not valid YAML: {exc}") from None
    except RecursionError:
        raise PolicyError(source, "", "not valid YAML: nested too deeply") from None


def load_policies(path: str | Path) -> PolicySet:
    """Read, parse and validate a policy file."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)  # never more: the file may be huge or endless
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot read the policy file ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError(str(path), "", f"larger than {MAX_FILE_BYTES} bytes")
    return parse_policies(load_yaml(raw, str(path)), str(path))
