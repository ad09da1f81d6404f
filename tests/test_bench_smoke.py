"""The benchmarks, seconds-long: each measurement runs end to end on tiny sizes and yields numbers,
and the report renders. Nothing here asserts on speed (`make bench` measures; this keeps it working)."""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict

import pytest

from bench import report
from bench.loadgen import pgbench_binary
from bench.run import MEASUREMENTS, SMOKE, Config, measure

pytestmark = [pytest.mark.bench, pytest.mark.timeout(180)]


def number(value) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cfg = Config(**SMOKE)
    out = {"config": asdict(cfg), "run_id": uuid.uuid4().hex[:6], "environment": report.environment()}
    return cfg, out, tmp_path_factory.mktemp("bench")


def run(results, name: str) -> dict:
    """The measurement's results: measured now, unless an earlier test of this module already did."""
    cfg, out, log_dir = results
    if name not in out:
        measure(cfg, [name], out["run_id"], log_dir, out, None)
    return out[name]


def test_throughput_measures_api_bare_and_pgbench(results):
    res = run(results, "throughput")
    # create, escalate (which also looks for a tenant policy of the name), resolve (which also skips
    # unsent notifications and queues status updates); a transition's UPDATE reads the clock
    assert [len(s) for s in res["statements"].values()] == [6, 9, 11]
    # pgbench ships with the PostgreSQL server packages; without it the reference is left out.
    impls = ("api", "bare", "pgbench") if pgbench_binary() else ("api", "bare")
    for rows in res["tables"].values():
        for impl in impls:
            assert number(rows[0][impl]["rps"]) and rows[0][impl]["rps"] > 0, impl
            assert number(rows[0][impl]["p99"]), impl
            assert rows[0][impl]["errors"] == 0, impl


def test_storm_executes_every_level_once(results):
    (storm,) = run(results, "storm")["runs"]
    assert storm["unfinished"] == 0 and storm["doubled"] == 0
    assert storm["executed"] == storm["expected"]
    assert number(storm["all"]["p99"])


def test_storm_with_notifications_delivers_every_email(results):
    storm = run(results, "storm")["notified"]
    assert storm["unfinished"] == 0 and storm["doubled"] == 0
    assert number(storm["all"]["p99"]) and number(storm["rate"])
    sent = storm["notifications"]
    # The smoke sizes keep every contact within its throttle: each level-2 email is sent on its own.
    assert sent["alerts"] == {"SENT": storm["incidents"]}
    assert sent["received"] == sent["distinct"] == sent["emails_sent"] == storm["incidents"]
    assert sent["in_app"] == storm["incidents"]
    assert sent["contacts"] == storm["tenants"] > 1
    assert number(sent["notifier_cpu_s"])


def test_storm_through_the_api_executes_every_level_once(results):
    storm = run(results, "storm")["api"]
    assert storm["unfinished"] == 0 and storm["doubled"] == 0
    assert storm["executed"] == storm["expected"] == 3 * storm["incidents"]
    assert storm["http"]["requests"] == storm["incidents"] and storm["http"]["errors"] == 0
    assert number(storm["levels"][3]["p99"]) and number(storm["web_cpu_s"])


def test_exec_rate_measures_escalations_and_the_noop_floor(results):
    res = run(results, "exec_rate")
    assert res["runs"][0]["executed_total"] == res["escalations"]
    assert number(res["median"]["escalation"]["rate"]) and number(res["median"]["noop"]["rate"])
    scaled = res["median"]["workers2"]  # two workers draining the same batches
    assert scaled["executions"] == res["escalations"] and number(scaled["postgres_cpu_ms"])


def test_memory_is_sampled_at_each_phase(results):
    phases = run(results, "memory")["phases"]
    assert len(phases) == 3
    assert all(p["rss_kb"] > 0 and p["processes"] >= 3 for p in phases)


def test_sweep_query_uses_the_partial_index(results):
    res = run(results, "sweep")
    current = [s for s in res["scenarios"] if not s.get("proposed")]
    assert all(s["uses_index"] for s in current)
    assert current[1]["rows_returned"] == 500
    assert all(s["same_rows"] for s in res["scenarios"] if s.get("proposed"))


def test_cancel_measures_resolve(results):
    res = run(results, "cancel")
    assert res["resolved"] > 0 and res["pending_left"] == 0
    assert number(res["table"][0]["api"]["p99"])


def test_delivery_measures_the_notifier_and_the_bare_loops(results):
    res = run(results, "delivery")
    count = res["messages"]
    for channel, (round_,) in res["runs"].items():
        assert round_["notifier"]["statuses"] == {"SENT": count}, channel
        assert set(round_) == {
            "notifier",
            "bare",
            "bare_one_connection" if channel == "email" else "bare_stdlib",
        }
        for path, measured in round_.items():
            assert measured["sent"] == measured["received"] == measured["distinct"] == count, (channel, path)
            assert number(measured["rate"]) and number(measured["cpu_ms"]), (channel, path)
    for receiver in res["receivers"].values():
        assert number(receiver["rps"]) and receiver["errors"] == 0


def test_profile_measures_cpu_per_request_of_each_variant(results):
    res = run(results, "profile")
    for endpoint in ("create", "escalate"):
        assert all(number(v) and v > 0 for v in res[endpoint]["cpu_ms"].values())
    assert all(number(v) and v > 0 for v in res["worker"]["cpu_ms"].values())


def test_fairness_measures_the_lone_tenant_beside_the_storm(results):
    res = run(results, "fairness")
    assert res["doubled"] == 0 and res["unfinished"] == 0
    assert number(res["capacity"]) and number(res["lone_lateness"]["p99"])


@pytest.mark.timeout(480)  # may measure every section itself
def test_report_renders_every_section(results):
    _cfg, out, _log_dir = results
    # Every section, whichever xdist process ran the other tests: those not measured here yet now.
    for name in MEASUREMENTS:
        run(results, name)
    text = report.render(out)
    headings = ("## 1.", "## 2.", "### With notifications", "## 3.", "## 3b.", "## 4.", "## 5.", "## 6.")
    for heading in (*headings, "## 7.", "## 8.", "## Targets"):
        assert heading in text
