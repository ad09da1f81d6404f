"""Policy parsing and validation as pure unit tests: durations, the shipped files, every kind of bad
file (each error naming the file and the field), the `policy check` command and start-up refusals."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from api.config import ConfigError, Settings
from models.policy import (
    CHANNELS,
    MAX_DELAY_MS,
    MAX_FILE_BYTES,
    MAX_LEVELS,
    MAX_POLICIES,
    SEVERITIES,
    Level,
    Policy,
    PolicyError,
    PolicySet,
    format_duration,
    format_elapsed,
    load_policies,
    parse_duration,
    parse_policies,
    parse_policy,
)
from tests.support.servers import PROJECT_ROOT

FAST = PROJECT_ROOT / "tests" / "policies" / "fast.yaml"
SHIPPED = PROJECT_ROOT / "policy.yaml"

VALID = """\
default_policy: standard
policies:
  standard:
    levels:
      - delay: 5m
        notify: [in_app]
      - delay: 15m
        notify: [email]
"""


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> tuple[Path, str]:
    """Write `text` to a file, load it, and return (path, the PolicyError's message)."""
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    return path, str(info.value)


# --- durations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("0ms", 0),
        ("1ms", 1),
        ("500ms", 500),
        ("0s", 0),
        ("1s", 1000),
        ("90s", 90_000),
        ("5m", 300_000),
        ("15m", 900_000),
        ("1h", 3_600_000),
        ("24h", 86_400_000),
        ("1.5s", 1500),
        ("0.5s", 500),
        ("0.25m", 15_000),
        ("1.5h", 5_400_000),
        ("2.50s", 2500),
        # Decimals that binary floating point cannot hold exactly are still whole milliseconds.
        ("1.001s", 1001),
        ("4.35s", 4350),
        ("0.007s", 7),
        ("1.07m", 64_200),
        ("0.27m", 16_200),
        ("168h", MAX_DELAY_MS),
        ("10080m", MAX_DELAY_MS),
        (" 5m ", 300_000),
        ("007s", 7000),
    ],
)
def test_valid_durations(text, ms):
    assert parse_duration(text) == ms


def test_every_millisecond_decimal_of_seconds_and_minutes_parses_exactly():
    for i in range(10_000):
        assert parse_duration(f"{i // 1000}.{i % 1000:03d}s") == i
    for i in range(0, 100_000, 7):
        assert parse_duration(f"{i // 100}.{i % 100:02d}m") == i * 600


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("5", "use a number with ms, s, m or h"),  # unitless
        ("5d", "use a number with ms, s, m or h"),
        ("5M", "use a number with ms, s, m or h"),
        ("5 m", "use a number with ms, s, m or h"),
        ("5min", "use a number with ms, s, m or h"),
        ("5sec", "use a number with ms, s, m or h"),
        ("-5m", "use a number with ms, s, m or h"),  # negative
        ("-0s", "use a number with ms, s, m or h"),
        ("+5m", "use a number with ms, s, m or h"),
        (".5s", "use a number with ms, s, m or h"),
        ("5.s", "use a number with ms, s, m or h"),
        ("1e3s", "use a number with ms, s, m or h"),
        ("inf s", "use a number with ms, s, m or h"),
        ("nanms", "use a number with ms, s, m or h"),
        ("1h30m", "use a number with ms, s, m or h"),
        ("", "use a number with ms, s, m or h"),
        ("m", "use a number with ms, s, m or h"),
        ("\u0665m", "use a number with ms, s, m or h"),  # an Arabic-Indic five is not a digit here
        ("0.5ms", "below one millisecond"),
        ("1.0005s", "below one millisecond"),
        ("0.00001m", "below one millisecond"),
        ("169h", "longer than 7 days"),
        ("168.001h", "longer than 7 days"),
        ("604800001ms", "longer than 7 days"),
        ("10081m", "longer than 7 days"),
        ("1" * 400 + "s", "longer than 7 days"),  # far beyond a float: still a clean error
    ],
)
def test_invalid_durations(text, reason):
    with pytest.raises(ValueError, match="invalid duration") as info:
        parse_duration(text)
    assert reason in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("value", [5, 5.0, None, True, ["5m"], {"m": 5}])
def test_durations_must_be_strings(value):
    with pytest.raises(ValueError, match=r"expected a duration such as '5m' or '500ms', got "):
        parse_duration(value)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (1, "1ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1500ms"),
        (59_000, "59s"),
        (60_000, "1m"),
        (90_000, "90s"),
        (300_000, "5m"),
        (3_600_000, "1h"),
        (5_400_000, "90m"),
        (MAX_DELAY_MS, "168h"),
    ],
)
def test_format_duration(ms, text):
    assert format_duration(ms) == text


def test_format_duration_round_trips():
    for ms in (0, 1, 7, 999, 1000, 1001, 59_999, 60_000, 61_000, 3_599_000, 3_600_000, MAX_DELAY_MS):
        assert parse_duration(format_duration(ms)) == ms


# --- the shipped files ------------------------------------------------------------------------


def test_shipped_policy_file_loads():
    policies = load_policies(SHIPPED)
    assert policies.default == "standard"
    assert list(policies.policies) == ["standard", "critical"]
    assert policies.get(None) == Policy(
        name="standard",
        levels=(
            Level(300_000, ("in_app",)),
            Level(900_000, ("email",)),
            Level(3_600_000, ("sms",)),
        ),
    )
    assert policies.get("critical").levels == (
        Level(0, ("in_app", "sms")),
        Level(300_000, ("sms", "webhook")),
        Level(900_000, ("sms", "email", "slack")),
    )


def test_fast_test_policy_file_loads():
    policies = load_policies(str(FAST))  # a str path works as well as a Path
    assert policies.default == "fast"
    assert {name: [lv.delay_ms for lv in p.levels] for name, p in policies.policies.items()} == {
        "fast": [1000, 1000, 1000],
        "slow": [3_600_000, 3_600_000],
        "single": [500],
        "held": [4000, 1000],
        "repeating": [300, 300],
        "forgetful": [300, 3000],
    }
    assert [lv.notify for lv in policies.get("fast").levels] == [("in_app", "webhook"), ("email",), ("sms",)]
    assert policies.get("single").levels[0].as_json() == {"delay_ms": 500, "notify": ["sms"]}


def test_policy_set_get_unknown_name_raises_key_error():
    with pytest.raises(KeyError):
        load_policies(FAST).get("nope")


def test_parsed_policies_are_frozen():
    policies = load_policies(FAST)
    with pytest.raises(AttributeError):
        policies.get("fast").levels[0].delay_ms = 1  # type: ignore[misc]
    assert isinstance(policies, PolicySet)


def test_notify_is_optional_and_deduplicated_in_order(tmp_path):
    path = write(
        tmp_path,
        """\
        default_policy: p
        policies:
          p:
            levels:
              - delay: 1s
              - delay: 2s
                notify: [sms, email, sms, email]
        """,
    )
    levels = load_policies(path).get("p").levels
    assert levels == (Level(1000, ()), Level(2000, ("sms", "email")))


def test_every_known_channel_is_accepted(tmp_path):
    path = write(
        tmp_path,
        f"""\
        default_policy: all
        policies:
          all:
            levels:
              - delay: 1s
                notify: [{", ".join(CHANNELS)}]
        """,
    )
    assert load_policies(path).get("all").levels[0].notify == CHANNELS


def test_exactly_max_levels_and_max_policies_are_accepted():
    level = {"delay": "1s", "notify": ["email"]}
    data = {
        "default_policy": "p0",
        "policies": {f"p{i}": {"levels": [level] * MAX_LEVELS} for i in range(MAX_POLICIES)},
    }
    policies = parse_policies(data, "mem.yaml")
    assert len(policies.policies) == MAX_POLICIES
    assert len(policies.get(None).levels) == MAX_LEVELS


# --- bad files: every message names the file and the field ----------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    assert str(info.value) == f"{path}: cannot read the policy file (No such file or directory)"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read the policy file") as info:
        load_policies(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")


@pytest.mark.parametrize(
    "text",
    [
        "default_policy: [unclosed\n",
        "policies:\n  a: b\n c: d\n",
        "key: 'unterminated\n",
        "foo: bar\n\tbaz: 1\n",
        "- a\nb: c\n",
    ],
)
def test_not_yaml(tmp_path, text):
    path, message = load_error(tmp_path, text)
    assert message.startswith(f"{path}: not valid YAML: ")


def test_not_utf8(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"default_policy: \xff\xfe\x00\x01")
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    assert str(info.value).startswith(f"{path}: not valid YAML: ")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n", "42\n", "~\n"])
def test_not_a_mapping(tmp_path, text):
    path, message = load_error(tmp_path, text)
    assert message == f"{path}: expected a mapping with 'default_policy' and 'policies'"


def test_unknown_top_level_fields(tmp_path):
    path, message = load_error(tmp_path, VALID + "version: 2\nextra: true\n")
    assert message == f"{path}: unknown field(s) extra, version"


def test_unknown_policy_field(tmp_path):
    path, message = load_error(tmp_path, VALID + "    retries: 3\n")
    assert message == f"{path}: policies.standard: unknown field(s) retries"


def test_repeat_runs_the_chain_again_and_the_timeline_says_when_the_last_page_goes(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(VALID + "    repeat: 2\n")
    standard = load_policies(path).policies["standard"]
    assert standard.repeat == 2
    assert standard.timeline() == ("level 1 at +5m, level 2 at +20m, repeat 2x -> last page at +1h")
    assert parse_policy("standard", standard.as_body()) == standard
    assert "repeat" not in load_policies(SHIPPED).policies["standard"].as_body()  # 0: left out


@pytest.mark.parametrize("value", ["-1", "10", "1.5", "true", "'2'", "[1]"])
def test_repeat_is_a_whole_number_from_0_to_9(tmp_path, value):
    path, message = load_error(tmp_path, VALID + f"    repeat: {value}\n")
    assert message == f"{path}: policies.standard.repeat: expected a whole number from 0 to 9"


def test_unknown_level_field(tmp_path):
    path, message = load_error(tmp_path, VALID + "        channel: sms\n")
    assert message == f"{path}: policies.standard.levels[1]: unknown field(s) channel"


@pytest.mark.parametrize(
    ("policies_yaml", "expected"),
    [
        ("policies: {}", "policies: expected a non-empty mapping of named policies"),
        ("policies:", "policies: expected a non-empty mapping of named policies"),
        ("policies: [standard]", "policies: expected a non-empty mapping of named policies"),
        ("", "policies: expected a non-empty mapping of named policies"),
    ],
)
def test_empty_or_missing_policies(tmp_path, policies_yaml, expected):
    path, message = load_error(tmp_path, f"default_policy: standard\n{policies_yaml}\n")
    assert message == f"{path}: {expected}"


@pytest.mark.parametrize(
    "levels_yaml",
    ["    levels: []", "    levels:", "    levels: {delay: 5m}", "    levels: 5m"],
)
def test_no_levels(tmp_path, levels_yaml):
    path, message = load_error(tmp_path, f"default_policy: standard\npolicies:\n  standard:\n{levels_yaml}\n")
    assert message == f"{path}: policies.standard.levels: expected a non-empty list"


def test_policy_without_levels_field(tmp_path):
    path, message = load_error(tmp_path, "default_policy: standard\npolicies:\n  standard: {}\n")
    expected = "expected a mapping with 'levels' (and optionally 'repeat', 'ack_timeout')"
    assert message == f"{path}: policies.standard: {expected}"


def test_too_many_levels(tmp_path):
    levels = "".join("      - delay: 1s\n" for _ in range(MAX_LEVELS + 1))
    path, message = load_error(tmp_path, f"default_policy: big\npolicies:\n  big:\n    levels:\n{levels}")
    assert message == (f"{path}: policies.big.levels: {MAX_LEVELS + 1} levels, at most {MAX_LEVELS} allowed")


def test_too_many_policies():
    data = {
        "default_policy": "p0",
        "policies": {f"p{i}": {"levels": [{"delay": "1s"}]} for i in range(MAX_POLICIES + 1)},
    }
    with pytest.raises(PolicyError) as info:
        parse_policies(data, "many.yaml")
    assert str(info.value) == f"many.yaml: policies: more than {MAX_POLICIES} policies"


@pytest.mark.parametrize(
    ("notify", "expected"),
    [
        ("[pager]", "notify: channel(s) pager cannot be delivered; known: " + ", ".join(CHANNELS)),
        # Named by the first policies, delivered by nothing: refused rather than silently dropped.
        ("[phone]", "notify: channel(s) phone cannot be delivered; known: "),
        ("[in_app, chat]", "notify: channel(s) chat cannot be delivered; known: "),
        (
            "[email, carrier_pigeon, fax]",
            "notify: channel(s) carrier_pigeon, fax cannot be delivered; known: ",
        ),
        ("[EMAIL]", "notify: channel(s) EMAIL cannot be delivered; known: "),
        ("email", "notify: expected a list of channel names"),
        ("[email, 3]", "notify: expected a list of channel names"),
        ("{email: true}", "notify: expected a list of channel names"),
        ("[[email]]", "notify: expected a list of channel names"),
    ],
)
def test_bad_channel(tmp_path, notify, expected):
    path, message = load_error(
        tmp_path,
        f"default_policy: p\npolicies:\n  p:\n    levels:\n      - delay: 1s\n      - delay: 2s\n"
        f"        notify: {notify}\n",
    )
    assert message.startswith(f"{path}: policies.p.levels[1].{expected}")


@pytest.mark.parametrize(
    ("delay", "expected"),
    [
        ("5", "delay: expected a duration such as '5m' or '500ms', got 5"),
        ("'5'", "delay: invalid duration '5': use a number with ms, s, m or h, e.g. '5m'"),
        ("-1m", "delay: invalid duration '-1m': use a number with ms, s, m or h, e.g. '5m'"),
        ("8d", "delay: invalid duration '8d': use a number with ms, s, m or h, e.g. '5m'"),
        ("200h", "delay: invalid duration '200h': longer than 7 days"),
        ("0.1ms", "delay: invalid duration '0.1ms': below one millisecond"),
        ("~", "delay: expected a duration such as '5m' or '500ms', got None"),
    ],
)
def test_bad_delay(tmp_path, delay, expected):
    path, message = load_error(
        tmp_path, f"default_policy: p\npolicies:\n  p:\n    levels:\n      - delay: {delay}\n"
    )
    assert message == f"{path}: policies.p.levels[0].{expected}"


def test_missing_delay(tmp_path):
    path, message = load_error(
        tmp_path, "default_policy: p\npolicies:\n  p:\n    levels:\n      - notify: [sms]\n"
    )
    assert message == f"{path}: policies.p.levels[0].delay: missing"


@pytest.mark.parametrize("level", ["5m", "[5m]", "~"])
def test_level_not_a_mapping(tmp_path, level):
    path, message = load_error(
        tmp_path, f"default_policy: p\npolicies:\n  p:\n    levels:\n      - {level}\n"
    )
    assert message == f"{path}: policies.p.levels[0]: expected a mapping with 'delay' and 'notify'"


@pytest.mark.parametrize("name", ["has space", "-dash-first", "x" * 65, "ünïcode", "a/b"])
def test_bad_policy_name(tmp_path, name):
    path, message = load_error(
        tmp_path, f"default_policy: p\npolicies:\n  '{name}':\n    levels:\n      - delay: 1s\n"
    )
    assert message == (f"{path}: policies.{name}: invalid name (letters, digits, '_', '.', '-'; 64 at most)")


def test_non_string_policy_name(tmp_path):
    path, message = load_error(
        tmp_path, "default_policy: p\npolicies:\n  1:\n    levels:\n      - delay: 1s\n"
    )
    assert message == f"{path}: policies.1: invalid name (letters, digits, '_', '.', '-'; 64 at most)"


def test_default_policy_not_among_policies(tmp_path):
    path, message = load_error(tmp_path, VALID.replace("default_policy: standard", "default_policy: gold"))
    assert message == f"{path}: default_policy: 'gold' is not one of the policies (standard)"


def test_default_policy_missing(tmp_path):
    path, message = load_error(tmp_path, VALID.replace("default_policy: standard\n", ""))
    assert message == f"{path}: default_policy: None is not one of the policies (standard)"


def test_yaml_alias_bomb_is_refused(tmp_path):
    bomb = """\
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    """
    path, message = load_error(tmp_path, bomb)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert "aliases (*name) are not allowed in a policy file" in message


def test_even_a_harmless_alias_is_refused(tmp_path):
    text = """\
    default_policy: a
    policies:
      a:
        levels: &levels
          - delay: 1s
      b:
        levels: *levels
    """
    path, message = load_error(tmp_path, text)
    assert "aliases (*name) are not allowed in a policy file" in message
    assert message.startswith(f"{path}: not valid YAML: ")


def test_duplicate_keys_are_refused_not_silently_last_wins(tmp_path):
    text = """\
    default_policy: standard
    policies:
      standard:
        levels:
          - delay: 5m
      standard:
        levels:
          - delay: 1h
    """
    path, message = load_error(tmp_path, text)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert "duplicate key 'standard'" in message
    # A level's own fields too.
    path, message = load_error(tmp_path, VALID.replace("delay: 5m", "delay: 5m\n        delay: 1s", 1))
    assert "duplicate key 'delay'" in message


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    path, message = load_error(tmp_path, "default_policy: !!python/object/apply:os.system ['true']\n")
    assert message.startswith(f"{path}: not valid YAML: ")


def test_file_larger_than_64_kib(tmp_path):
    assert MAX_FILE_BYTES == 64 * 1024
    padding = "# padding\n" * (MAX_FILE_BYTES // 10 + 1)
    path, message = load_error(tmp_path, VALID + padding)
    assert path.stat().st_size > MAX_FILE_BYTES
    assert message == f"{path}: larger than {MAX_FILE_BYTES} bytes"


def test_file_of_exactly_64_kib_is_accepted(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(VALID + "#" * (MAX_FILE_BYTES - len(VALID) - 1) + "\n")
    assert path.stat().st_size == MAX_FILE_BYTES
    assert load_policies(path).default == "standard"


def test_parse_policies_names_its_source():
    with pytest.raises(PolicyError) as info:
        parse_policies({"default_policy": "x", "policies": {"x": {"levels": [{"delay": "1y"}]}}}, "from-env")
    assert str(info.value).startswith("from-env: policies.x.levels[0].delay: invalid duration '1y'")


# --- severity routing ------------------------------------------------------------------------


def test_severity_policies_route_incidents_that_name_no_policy(tmp_path):
    path = write(tmp_path, VALID + "  quiet:\n    levels:\n      - delay: 1h\n")
    path.write_text(path.read_text() + "severity_policies:\n  critical: standard\n  low: quiet\n")
    policies = load_policies(path)
    assert policies.severity_policies == {"critical": "standard", "low": "quiet"}
    assert policies.name_for(None, "low") == "quiet"
    assert policies.name_for(None, "critical") == "standard"
    assert policies.name_for(None, "high") == "standard"  # unmapped: the default
    assert policies.name_for("standard", "low") == "standard"  # a named policy wins


def test_severity_policies_are_optional_and_may_be_empty(tmp_path):
    assert load_policies(write(tmp_path, VALID)).severity_policies == {}
    assert load_policies(write(tmp_path, VALID + "severity_policies: {}\n")).severity_policies == {}


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "severity_policies: [critical]",
            "severity_policies: expected a mapping of severities to policy names",
        ),
        ("severity_policies:", "severity_policies: expected a mapping of severities to policy names"),
        (
            "severity_policies: {urgent: standard}",
            "severity_policies.urgent: unknown severity; known: critical, high, medium, low",
        ),
        (
            "severity_policies: {Critical: standard}",
            "severity_policies.Critical: unknown severity; known: critical, high, medium, low",
        ),
        (
            "severity_policies: {critical: gold}",
            "severity_policies.critical: 'gold' is not one of the policies (standard)",
        ),
        (
            "severity_policies: {low: [standard]}",
            "severity_policies.low: ['standard'] is not one of the policies (standard)",
        ),
        ("severity_policies: {low: ~}", "severity_policies.low: None is not one of the policies (standard)"),
    ],
)
def test_bad_severity_policies(tmp_path, yaml_text, expected):
    path, message = load_error(tmp_path, VALID + yaml_text + "\n")
    assert message == f"{path}: {expected}"


def test_severities_are_the_ones_incidents_take():
    from api.schemas import IncidentCreateSchema
    from models.incident import Incident

    assert IncidentCreateSchema().fields["severity"].validate.choices == SEVERITIES
    assert tuple(Incident.__table__.c.severity.type.enums) == SEVERITIES


# --- one policy: the body PUT /policies/{name} takes; timelines --------------------------------


def test_parse_policy_names_fields_relative_to_the_body():
    with pytest.raises(PolicyError) as info:
        parse_policy("p", {"levels": [{"delay": "1m"}, {"delay": "1y"}]})
    assert (info.value.field, str(info.value)) == (
        "levels[1].delay",
        "levels[1].delay: invalid duration '1y': use a number with ms, s, m or h, e.g. '5m'",
    )
    with pytest.raises(PolicyError) as info:
        parse_policy("p", ["levels"])
    assert (info.value.field, info.value.reason) == (
        "",
        "expected a mapping with 'levels' (and optionally 'repeat', 'ack_timeout')",
    )


def test_a_policy_as_a_body_parses_back_to_itself():
    for policy in load_policies(SHIPPED).policies.values():
        assert parse_policy(policy.name, policy.as_body()) == policy
    assert parse_policy("p", {"levels": [{"delay": " 90m ", "notify": ["sms", "sms"]}]}).as_body() == {
        "levels": [{"delay": "90m", "notify": ["sms"]}]
    }


def test_timelines_count_from_the_start_of_the_escalation():
    policies = load_policies(SHIPPED)
    assert policies.get("standard").timeline() == "level 1 at +5m, level 2 at +20m, level 3 at +1h20m"
    assert policies.get("critical").timeline() == (
        "level 1 at +0s, level 2 at +5m, level 3 at +20m, repeat 2x -> last page at +1h"
    )


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0s"),
        (1, "1ms"),
        (1500, "1s500ms"),
        (90_000, "1m30s"),
        (4_800_000, "1h20m"),
        (MAX_DELAY_MS, "168h"),
    ],
)
def test_format_elapsed(ms, text):
    assert format_elapsed(ms) == text


# --- `flask --app api policy check [FILE]` -----------------------------------------------------


def test_policy_check_prints_each_timeline(app):
    result = app.test_cli_runner().invoke(args=["policy", "check", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{SHIPPED}: OK, default policy 'standard'",
        "standard: level 1 at +5m, level 2 at +20m, level 3 at +1h20m",
        "  level 1, +5m: in_app",
        "  level 2, +15m: email",
        "  level 3, +1h: sms",
        "critical: level 1 at +0s, level 2 at +5m, level 3 at +20m, repeat 2x -> last page at +1h",
        "  level 1, +0s: in_app, sms",
        "  level 2, +5m: sms, webhook",
        "  level 3, +15m: sms, email, slack",
        "severity critical -> critical",
        "severity high -> standard (default)",
        "severity medium -> standard (default)",
        "severity low -> standard (default)",
    ]


def test_policy_check_defaults_to_the_file_in_force(app):
    # The test session runs with ESCALATION_POLICY_FILE=tests/policies/fast.yaml.
    result = app.test_cli_runner().invoke(args=["policy", "check"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{FAST}: OK, default policy 'fast'"
    assert lines[1:5] == [
        "fast: level 1 at +1s, level 2 at +2s, level 3 at +3s",
        "  level 1, +1s: in_app, webhook",
        "  level 2, +1s: email",
        "  level 3, +1s: sms",
    ]
    assert "single: level 1 at +500ms" in lines and "  level 1, +500ms: sms" in lines


def test_policy_check_level_without_channels(app, tmp_path):
    path = write(tmp_path, "default_policy: quiet\npolicies:\n  quiet:\n    levels:\n      - delay: 90s\n")
    result = app.test_cli_runner().invoke(args=["policy", "check", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[1:3] == ["quiet: level 1 at +1m30s", "  level 1, +1m30s: -"]


def test_policy_check_with_a_tenant_prints_its_own_policies_and_what_they_shadow(app, tmp_path):
    from models import tenant_policy

    tenant = f"t-{uuid.uuid4().hex[:12]}"
    with app.extensions["db"].begin() as session:
        for name, body in (
            (
                "critical",
                {"levels": [{"delay": "0s", "notify": ["sms"]}, {"delay": "2m", "notify": ["email"]}]},
            ),
            ("critical", {"levels": [{"delay": "1m", "notify": ["sms"]}, {"delay": "90m"}]}),
            ("db-team", {"levels": [{"delay": "10m", "notify": ["slack"]}]}),
        ):
            tenant_policy.put(session, tenant, parse_policy(name, body))
    result = app.test_cli_runner().invoke(args=["policy", "check", str(SHIPPED), "--tenant", tenant])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[9:] == [
        f"tenant {tenant!r}: 2 policies of its own",
        "critical version 2 (shadows the file's): level 1 at +1m, level 2 at +1h31m",
        "  level 1, +1m: sms",
        "  level 2, +1h30m: -",
        "db-team version 1: level 1 at +10m",
        "  level 1, +10m: slack",
        "severity critical -> critical (tenant's version 2)",
        "severity high -> standard (default)",
        "severity medium -> standard (default)",
        "severity low -> standard (default)",
    ]
    result = app.test_cli_runner().invoke(args=["policy", "check", str(SHIPPED), "--tenant", "nobody-at-all"])
    assert result.output.splitlines()[9:11] == [
        "tenant 'nobody-at-all': no policies of its own",
        "severity critical -> critical",
    ]


def test_policy_check_names_the_field_of_a_bad_severity_map(app, tmp_path):
    path = write(tmp_path, VALID + "severity_policies:\n  critical: gold\n")
    result = app.test_cli_runner().invoke(args=["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {path}: severity_policies.critical: 'gold' is not one of the policies (standard)"
    )


def test_policy_check_fails_with_the_message_for_a_bad_file(app, tmp_path):
    path = write(tmp_path, VALID.replace("[email]", "[pager]"))
    result = app.test_cli_runner().invoke(args=["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {path}: policies.standard.levels[1].notify: channel(s) pager cannot be delivered; "
        f"known: {', '.join(CHANNELS)}"
    )
    assert "Traceback" not in result.output


def test_policy_check_missing_file(app, tmp_path):
    path = tmp_path / "missing.yaml"
    result = app.test_cli_runner().invoke(args=["policy", "check", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {path}: cannot read the policy file (No such file or directory)"


def test_policy_check_as_a_real_command(tmp_path):
    """The command an operator types: a separate process, exit status and stderr."""
    bad = write(tmp_path, VALID.replace("15m", "15 minutes"))
    env_run = [sys.executable, "-m", "flask", "--app", "api", "policy", "check"]
    ok = subprocess.run([*env_run, str(FAST)], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == f"{FAST}: OK, default policy 'fast'"
    failed = subprocess.run(
        [*env_run, str(bad)], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT
    )
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr.strip() == (
        f"Error: {bad}: policies.standard.levels[1].delay: invalid duration '15 minutes': "
        "use a number with ms, s, m or h, e.g. '5m'"
    )


def test_policy_check_of_an_invalid_file_in_force_names_it_without_a_traceback(tmp_path):
    """The app cannot start on that file, and the command says why as its own error."""
    bad = write(tmp_path, VALID.replace("15m", "15 minutes"))
    checked = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "api", "policy", "check"],
        env={**os.environ, "ESCALATION_POLICY_FILE": str(bad)},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
    )
    assert checked.returncode == 1
    assert "Traceback" not in checked.stderr
    assert checked.stderr.strip() == (
        f"Error: {bad}: policies.standard.levels[1].delay: invalid duration '15 minutes': "
        "use a number with ms, s, m or h, e.g. '5m'"
    )


# --- start-up refuses invalid settings --------------------------------------------------------


def test_create_app_refuses_an_invalid_policy_file(database_url, tmp_path):
    from api import create_app

    path = write(tmp_path, VALID.replace("5m", "5 parsecs"))
    with pytest.raises(PolicyError) as info:
        create_app({"DATABASE_URL": database_url, "ESCALATION_POLICY_FILE": str(path)})
    assert str(info.value) == (
        f"{path}: policies.standard.levels[0].delay: invalid duration '5 parsecs': "
        "use a number with ms, s, m or h, e.g. '5m'"
    )


def test_create_app_refuses_a_missing_policy_file(database_url, tmp_path):
    from api import create_app

    path = tmp_path / "gone.yaml"
    with pytest.raises(PolicyError, match=r"cannot read the policy file"):
        create_app({"DATABASE_URL": database_url, "ESCALATION_POLICY_FILE": str(path)})


def test_create_app_uses_the_policy_file_from_the_environment(app, database_url, tmp_path):
    from api import create_app

    path = write(tmp_path, VALID)
    try:
        other = create_app({"DATABASE_URL": database_url, "ESCALATION_POLICY_FILE": str(path)})
        assert other.extensions["policies"].default == "standard"
        assert other.config["SETTINGS"].policy_file == path
        assert list(other.extensions["policies"].policies) == ["standard"]
    finally:
        # create_app made its Celery app the current one: give the session's app its place back.
        app.extensions["celery"].set_current()
        app.extensions["celery"].set_default()


def test_default_policy_file_is_the_shipped_one():
    assert Settings.from_env({}).policy_file == SHIPPED


@pytest.mark.parametrize(
    ("horizon", "visibility"),
    [("1801", "3600"), ("3600", "3600"), ("100", "199"), ("7200", "3600"), ("0.6", "1")],
)
def test_create_app_refuses_an_eta_horizon_above_half_the_visibility_timeout(
    database_url, horizon, visibility
):
    from api import create_app

    with pytest.raises(ConfigError) as info:
        create_app(
            {
                "DATABASE_URL": database_url,
                "ESCALATION_ETA_HORIZON": horizon,
                "BROKER_VISIBILITY_TIMEOUT": visibility,
            }
        )
    assert str(info.value) == (
        f"ESCALATION_ETA_HORIZON ({float(horizon):g} s) must be at most half of "
        f"BROKER_VISIBILITY_TIMEOUT ({float(visibility):g} s): escalations held longer than the "
        "visibility timeout are redelivered by Redis"
    )


def test_default_eta_horizon_must_fit_a_smaller_visibility_timeout():
    # The defaults (horizon 300 s) against a 500 s visibility timeout: refused.
    with pytest.raises(ConfigError, match=r"^ESCALATION_ETA_HORIZON \(300 s\) must be at most half"):
        Settings.from_env({"BROKER_VISIBILITY_TIMEOUT": "500"})


AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def test_on_rabbitmq_the_horizon_must_fit_its_consumer_timeout_not_the_visibility_timeout():
    """A delivery held past RabbitMQ's consumer_timeout closes the channel and the worker exits."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"CELERY_BROKER_URL": AMQP_URL, "BROKER_CONSUMER_TIMEOUT": "500"})
    assert str(info.value) == (
        "ESCALATION_ETA_HORIZON (300 s) must be at most half of BROKER_CONSUMER_TIMEOUT (500 s, "
        "RabbitMQ's consumer_timeout): a worker holding an escalation longer is disconnected by RabbitMQ "
        "and exits"
    )
    # The visibility timeout is Redis's: on RabbitMQ it does not limit the horizon.
    settings = Settings.from_env({"CELERY_BROKER_URL": AMQP_URL, "BROKER_VISIBILITY_TIMEOUT": "100"})
    assert settings.consumer_timeout_s == 1800 and settings.engine.eta_horizon_s == 300
    # And on Redis the consumer timeout means nothing.
    assert Settings.from_env({"BROKER_CONSUMER_TIMEOUT": "100"}).engine.eta_horizon_s == 300


@pytest.mark.parametrize(("horizon", "visibility"), [("1800", "3600"), ("300", None), ("60", "120")])
def test_eta_horizon_up_to_half_the_visibility_timeout_is_accepted(horizon, visibility):
    env = {"ESCALATION_ETA_HORIZON": horizon}
    if visibility is not None:
        env["BROKER_VISIBILITY_TIMEOUT"] = visibility
    settings = Settings.from_env(env)
    assert settings.engine.eta_horizon_s == float(horizon)
    assert settings.visibility_timeout_s == float(visibility or 3600)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ESCALATION_ETA_HORIZON": "0"}, "ESCALATION_ETA_HORIZON must be positive"),
        ({"ESCALATION_ETA_HORIZON": "-5"}, "ESCALATION_ETA_HORIZON must be positive"),
        ({"ESCALATION_ETA_HORIZON": "5m"}, "ESCALATION_ETA_HORIZON: expected a number of seconds, got '5m'"),
        (
            {"BROKER_VISIBILITY_TIMEOUT": "1h"},
            "BROKER_VISIBILITY_TIMEOUT: expected a number of seconds, got '1h'",
        ),
        ({"ESCALATION_REDELIVERY_GRACE": "0"}, "ESCALATION_REDELIVERY_GRACE must be positive"),
    ],
)
def test_settings_refuse_bad_numbers(env, message):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert str(info.value) == message


def test_web_process_refuses_to_start_on_a_bad_eta_horizon():
    """The real start-up path: importing the app factory in a fresh process fails with the message."""
    code = "from api import create_app; create_app()"
    env = {"PATH": "/usr/bin:/bin", "ESCALATION_ETA_HORIZON": "2000", "BROKER_VISIBILITY_TIMEOUT": "3600"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT, env=env
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "api.config.ConfigError: ESCALATION_ETA_HORIZON (2000 s) must be at most half of "
        "BROKER_VISIBILITY_TIMEOUT (3600 s): escalations held longer than the visibility timeout "
        "are redelivered by Redis"
    )
