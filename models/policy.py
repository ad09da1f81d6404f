"""Escalation policies: policy.yaml -> validated, frozen dataclasses.

Pure: parsing and validation only. A bad file raises PolicyError naming the file and the field, so the
web and worker processes refuse to start on it instead of failing at 3 a.m. when a level falls due.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 64 * 1024
MAX_POLICIES = 100
MAX_LEVELS = 20  # PagerDuty and Opsgenie stop around here; more is a typo, not a policy.
MAX_DELAY_MS = 7 * 24 * 3600 * 1000
# The channels a level can notify: each one is delivered (tasks/channels); a name that nothing can
# deliver is refused here, not discovered when the level fires.
CHANNELS = ("in_app", "email", "sms", "webhook", "slack")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$", re.ASCII)
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


class PolicyError(ValueError):
    """The policy file is unreadable or invalid; the message names the file and the field."""


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


@dataclass(frozen=True)
class PolicySet:
    default: str
    policies: dict[str, Policy]

    def get(self, name: str | None) -> Policy:
        """The named policy, or the default one for None."""
        return self.policies[name or self.default]


def parse_duration(text: Any) -> int:
    """'5m' -> 300000 (milliseconds). Accepts ms, s, m and h; nothing negative, nothing unitless."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as '5m' or '500ms', got {text!r}")
    match = DURATION_RE.match(text.strip())
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


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that refuses anchors and aliases (no 'billion laughs' through a policy file) and
    duplicate keys (YAML would silently keep the last: a second 'standard' policy replacing the first)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001 - PyYAML's signature
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
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


def _parse_level(where: str, raw: Any) -> Level:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected a mapping with 'delay' and 'notify'")
    unknown = set(raw) - {"delay", "notify"}
    if unknown:
        raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    if "delay" not in raw:
        raise PolicyError(f"{where}.delay: missing")
    try:
        delay_ms = parse_duration(raw["delay"])
    except ValueError as exc:
        raise PolicyError(f"{where}.delay: {exc}") from None
    notify = raw.get("notify", [])
    if not isinstance(notify, list) or not all(isinstance(c, str) for c in notify):
        raise PolicyError(f"{where}.notify: expected a list of channel names")
    bad = [c for c in notify if c not in CHANNELS]
    if bad:
        raise PolicyError(
            f"{where}.notify: channel(s) {', '.join(bad)} cannot be delivered; known: {', '.join(CHANNELS)}"
        )
    return Level(delay_ms=delay_ms, notify=tuple(dict.fromkeys(notify)))


def parse_policies(data: Any, source: str = "policy") -> PolicySet:
    """Validate an already-loaded document; `source` names it in error messages."""
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with 'default_policy' and 'policies'")
    unknown = set(data) - {"default_policy", "policies"}
    if unknown:
        raise PolicyError(f"{source}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
    raw_policies = data.get("policies")
    if not isinstance(raw_policies, dict) or not raw_policies:
        raise PolicyError(f"{source}: policies: expected a non-empty mapping of named policies")
    if len(raw_policies) > MAX_POLICIES:
        raise PolicyError(f"{source}: policies: more than {MAX_POLICIES} policies")
    policies: dict[str, Policy] = {}
    for name, body in raw_policies.items():
        where = f"{source}: policies.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise PolicyError(f"{where}: invalid name (letters, digits, '_', '.', '-'; 64 at most)")
        if not isinstance(body, dict) or set(body) != {"levels"}:
            raise PolicyError(f"{where}: expected a mapping with exactly one field, 'levels'")
        levels = body["levels"]
        if not isinstance(levels, list) or not levels:
            raise PolicyError(f"{where}.levels: expected a non-empty list")
        if len(levels) > MAX_LEVELS:
            raise PolicyError(f"{where}.levels: {len(levels)} levels, at most {MAX_LEVELS} allowed")
        policies[name] = Policy(
            name=name,
            levels=tuple(_parse_level(f"{where}.levels[{i}]", raw) for i, raw in enumerate(levels)),
        )
    default = data.get("default_policy")
    if default not in policies:
        raise PolicyError(
            f"{source}: default_policy: {default!r} is not one of the policies ({', '.join(policies)})"
        )
    return PolicySet(default=default, policies=policies)


def load_policies(path: str | Path) -> PolicySet:
    """Read, parse and validate a policy file."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)  # never more: the file may be huge or endless
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file ({exc.strerror})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise PolicyError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        data = yaml.load(raw, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    return parse_policies(data, str(path))
