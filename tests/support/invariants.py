"""The invariant checker: reads `incidents`, `escalations` and `incident_events` after a scenario and
checks, on every incident, what the product promises (issue 4):

1. At most one EXECUTED escalation per (incident, round, level), and at most one next level per
   execution: the levels of a round in order, then (the policy's `repeat`) the next round's.
2. Every incident still ESCALATING has all its due levels EXECUTED (none lost), within the bound.
3. No escalation EXECUTED at or after the moment its incident left ESCALATING; every PENDING
   escalation of an incident that left ESCALATING is CANCELLED.
4. The incident's state sequence in `incident_events` is a valid path of the state machine, one event
   per transition, with no gaps.
5. Every request got an answer in bounded time: a valid response, a 409, or a 503 JSON error.

And, so that a scenario cannot pass by doing nothing or by checking itself against itself:

- the minimum work the scenario states (incidents created, escalated, levels executed) was done;
- every incident's stored `policy_levels` are the levels of its policy in the policy file the stack
  ran with (parsed here, independently of models/policy.py);
- the worker logs announce EXECUTING exactly the escalations Postgres has EXECUTED, each once (a line
  may be missing only where the scenario killed a process between a commit and its log line).

"Due" is fault-aware: a level must run within the bound of the moment it fell due or, when a fault
(an outage: broker down, worker killed, Postgres down) began before that deadline, within the bound
of the moment that fault ended.

It never stops at the first violation: it returns Figures (counts, worst lateness, every violation
found) so a failing scenario says how bad it was, and the report can print them.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

import psycopg2
import psycopg2.extras
import yaml

from models.lifecycle import EVENT_TYPE, STATE_TIMESTAMP, SYSTEM_EVENT_TYPE, Action, State, is_valid_path

EXECUTING_LINE = re.compile(r"EXECUTING level (\d+) for incident (\S+) \(escalation ([0-9a-f-]{36})")
TRANSITION_TYPES = {"created", *EVENT_TYPE.values(), *SYSTEM_EVENT_TYPE.values()}
ACK_TIMEOUT = SYSTEM_EVENT_TYPE[Action.ACK_TIMEOUT]
# A level is due at scheduled_at; its next level is created in the same transaction, so their
# timestamps agree to the microsecond. Allow for rounding only.
EPSILON = timedelta(milliseconds=1)
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


@dataclass
class RequestRecord:
    """One HTTP request a scenario made, and what came of it (invariant 5)."""

    method: str
    path: str
    elapsed_s: float
    status: int | None = None  # None: no answer (timeout, connection error)
    error: str | None = None
    json_body: dict | None = None
    text: str = ""


@dataclass
class Figures:
    incidents: int = 0
    escalated: int = 0  # incidents that entered ESCALATING
    escalations: int = 0
    executed: int = 0
    cancelled: int = 0
    pending: int = 0
    lost: int = 0
    duplicated: int = 0
    executed_after_leave: int = 0
    worst_lateness_s: float = 0.0
    p99_lateness_s: float = 0.0
    # Counted from the later of "due" and "the fault that began before its deadline ended".
    worst_after_recovery_s: float = 0.0
    # Hand-overs made after the level was due (the sweep's re-deliveries and late first hand-overs),
    # counted the same way: the engine's own promise, before any queueing in the broker or worker.
    late_handovers: int = 0
    worst_handover_after_recovery_s: float = 0.0
    announced: int = 0  # EXECUTING announcements in the worker logs
    unannounced: int = 0  # EXECUTED in Postgres, never announced in a worker log
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    worst_response_s: float = 0.0
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0

    MAX_LISTED = 40

    def violate(self, text: str) -> None:
        self.violation_count += 1
        if len(self.violations) < self.MAX_LISTED:
            self.violations.append(text)

    def require(self, **minimum: int) -> None:
        """Fail unless the scenario did at least this much work (incidents=, escalated=, executed=):
        a run where every request was refused must not pass on an empty database."""
        for name, least in minimum.items():
            got = getattr(self, name)
            if got < least:
                self.violate(
                    f"[0] only {got} {name}, at least {least} required: the scenario did not do its work"
                )

    @property
    def ok(self) -> bool:
        return self.violation_count == 0

    def as_dict(self) -> dict:
        return {
            "incidents": self.incidents,
            "escalated": self.escalated,
            "escalations": self.escalations,
            "executed": self.executed,
            "cancelled": self.cancelled,
            "pending": self.pending,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "executed_after_leave": self.executed_after_leave,
            "worst_lateness_s": round(self.worst_lateness_s, 3),
            "p99_lateness_s": round(self.p99_lateness_s, 3),
            "worst_after_recovery_s": round(self.worst_after_recovery_s, 3),
            "late_handovers": self.late_handovers,
            "worst_handover_after_recovery_s": round(self.worst_handover_after_recovery_s, 3),
            "announced": self.announced,
            "unannounced": self.unannounced,
            "requests": self.requests,
            "statuses": dict(sorted(self.statuses.items())),
            "worst_response_s": round(self.worst_response_s, 3),
            "violations": self.violation_count,
        }

    def summary(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        if self.ok:
            return head
        more = self.violation_count - len(self.violations)
        listed = "\n  ".join(self.violations)
        return f"{head}\n  {listed}" + (f"\n  ... and {more} more" if more > 0 else "")


def _load(database_url: str):
    conn = psycopg2.connect(database_url, connect_timeout=5)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            # One snapshot for all three tables and the clock.
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            cur.execute("SELECT now() AS now")
            now = cur.fetchone()["now"]
            cur.execute(
                "SELECT id, state, severity, policy, policy_levels, policy_repeat, policy_ack_timeout_ms,"
                " escalated_at, acknowledged_at, resolved_at, cancelled_at FROM incidents"
            )
            incidents = cur.fetchall()
            cur.execute(
                "SELECT id, incident_id, round, escalation_level, kind, status, manual, reason, notify,"
                " scheduled_at, executed_at, published_at, task_id, created_at, updated_at FROM escalations"
            )
            escalations = cur.fetchall()
            cur.execute(
                "SELECT id, incident_id, type, from_state, to_state, at, data"
                " FROM incident_events ORDER BY id"
            )
            events = cur.fetchall()
            cur.execute("COMMIT")
    finally:
        conn.close()
    return now, incidents, escalations, events


def parse_policy_file(text: str) -> dict:
    """{'default': name, 'severity_policies': {severity: name}, 'policies': {name: [{'delay_ms', 'notify'},
    ...]}, 'repeats': {name: repeat}} from a policy file's text.

    Deliberately not models/policy.py: the checker compares what the engine stored against the file,
    so it reads the file on its own (durations: a number and ms, s, m or h)."""
    data = yaml.safe_load(text)
    policies, repeats, ack_timeouts = {}, {}, {}
    for name, body in data["policies"].items():
        repeats[name] = int(body.get("repeat", 0))
        ack_timeouts[name] = _duration_ms(body["ack_timeout"]) if body.get("ack_timeout") else None
        levels = []
        for level in body["levels"]:
            notify = list(dict.fromkeys(level.get("notify", [])))
            levels.append({"delay_ms": _duration_ms(level["delay"]), "notify": notify})
        policies[name] = levels
    return {
        "default": data["default_policy"],
        "severity_policies": data.get("severity_policies") or {},
        "policies": policies,
        "repeats": repeats,
        "ack_timeouts": ack_timeouts,
    }


def _duration_ms(text: str) -> int:
    match = DURATION.match(str(text).strip())
    if not match:
        raise ValueError(f"cannot read duration {text!r}")
    return int(Decimal(match.group(1)) * UNIT_MS[match.group(2)])


def _skipped(esc) -> bool:
    """CANCELLED because a responder paged a later level now (escalate now), not by a transition."""
    return esc["status"] == "CANCELLED" and (esc["reason"] or "").startswith("skipped")


def _origin(esc, previous, escalated, acks, escs, levels, ack_timeout_ms):
    """The step (round, level) a row must be, given the row before it in the chain, and when it must
    have been created (base) and its delay after that: (step, base, delay_ms); step None if no rule
    allows the row at all."""
    if esc["kind"] == "ack_timeout":
        # Written by an acknowledgement of the escalating incident: the next round, at the level last
        # executed (level 1 if none had), due when the acknowledgement runs out.
        ack = next((a for a in acks if a["at"] == esc["created_at"]), None)
        if ack is None or not ack_timeout_ms or previous is None:
            return None, None, None
        done = [e for e in escs if e["status"] == "EXECUTED" and e["executed_at"] <= ack["at"]]
        level = max(done, key=lambda e: e["executed_at"])["escalation_level"] if done else 1
        return (previous["round"] + 1, level), ack["at"], ack_timeout_ms
    if previous is None:
        return (1, 1), escalated["at"], levels[0]["delay_ms"] if levels else None
    if _skipped(previous) and previous["updated_at"] == esc["created_at"]:
        # A responder paged a later level now: the levels on the way were written at that moment.
        return (previous["round"], previous["escalation_level"] + 1), None, None
    if previous["status"] != "EXECUTED" or previous["executed_at"] is None:
        return None, None, None  # nothing follows a step that did not run
    if previous["escalation_level"] < len(levels):
        step = (previous["round"], previous["escalation_level"] + 1)
    else:
        step = (previous["round"] + 1, 1)  # a repeat: the last level ran, the chain starts again
    return step, previous["executed_at"], levels[step[1] - 1]["delay_ms"]


def fault_deadline(due: datetime, bound: timedelta, outages: Sequence[tuple[datetime, datetime]]) -> datetime:
    """The latest a level due at `due` may run: `bound` after it fell due or, when an outage began
    before that deadline, `bound` after the later of "due" and the end of that outage."""
    deadline = due + bound
    for down, back in sorted(outages):
        if down < deadline:
            deadline = max(deadline, max(due, back) + bound)
    return deadline


def _check_handover(fig: Figures, eid: str, esc: dict, bound_s: float | None, outages: Sequence) -> None:
    """A level handed over after it fell due (re-delivered by the sweep, or first handed over after a
    failed publish): its last hand-over within bound_s of its due time or of the end of the fault."""
    published = esc["published_at"]
    if published is None or published <= esc["scheduled_at"] + EPSILON:
        return
    fig.late_handovers += 1
    if bound_s is None:
        return
    bound = timedelta(seconds=bound_s)
    latest = fault_deadline(esc["scheduled_at"], bound, outages)
    after = (published - (latest - bound)).total_seconds()
    fig.worst_handover_after_recovery_s = max(fig.worst_handover_after_recovery_s, after)
    if published > latest:
        fig.violate(
            f"[2] escalation {eid} handed over {published - esc['scheduled_at']} after due, {after:.1f} s "
            f"after it fell due or the fault under way ended (bound {bound})"
        )


def check(
    database_url: str,
    *,
    lateness_bound_s: float,
    requests: list[RequestRecord] = (),
    response_bound_s: float = 5.0,
    allowed_statuses: frozenset[int] = frozenset({200, 201, 409, 503}),
    logs: list[str] = (),
    outages: Sequence[tuple[datetime, datetime]] = (),
    unannounced_allowed: int = 0,
    terminated_tasks: frozenset[str] = frozenset(),
    policy_text: str | None = None,
    handover_bound_s: float | None = None,
) -> Figures:
    """Check invariants 1-5 on every incident of the database; return the figures.

    lateness_bound_s: the longest an escalation may run after it was due (or after the fault that
    began before its deadline ended; see fault_deadline) before it counts as late, or lost when it is
    still PENDING or was CANCELLED only after that. outages: (began, ended) pairs, aware datetimes on
    the machine's clock (Postgres's clock_timestamp() is the same clock).
    logs: worker log texts: each escalation EXECUTED in Postgres must be announced EXECUTING exactly
    once, and nothing else; the announcements of up to `unannounced_allowed` transactions (each a
    batch of levels) may be missing (the scenario killed a worker or Postgres between a commit and its
    log lines), and so may the announcement of an
    escalation whose task Celery itself terminated (`terminated_tasks`: task ids a worker's log says
    it terminated on a broker connection loss).
    policy_text: the policy file the stack ran with; every escalated incident's stored levels must
    be its policy's.
    handover_bound_s: the same deadline for the last hand-over of a level handed over after it fell
    due (a re-delivery by the sweep, or a first hand-over after a failed publish): the sweep's own
    promise, a sweep interval plus the grace, without the queueing that follows it.
    """
    now, incidents, escalations, events = _load(database_url)
    fig = Figures(incidents=len(incidents), escalations=len(escalations))
    bound = timedelta(seconds=lateness_bound_s)
    policy_file = parse_policy_file(policy_text) if policy_text is not None else None
    by_incident_esc: dict = defaultdict(list)
    for row in escalations:
        by_incident_esc[row["incident_id"]].append(row)
    by_incident_ev: dict = defaultdict(list)
    for row in events:
        by_incident_ev[row["incident_id"]].append(row)
    latenesses: list[float] = []
    executed_rows: dict[str, dict] = {}

    def deadline(due: datetime) -> datetime:
        return fault_deadline(due, bound, outages)

    for incident in incidents:
        iid = incident["id"]
        state = State(incident["state"])
        evs = by_incident_ev.get(iid, [])
        # The chain in the order it runs: a round's levels, then the next round's.
        escs = sorted(by_incident_esc.get(iid, []), key=lambda r: (r["round"], r["escalation_level"]))

        # -- 4. the timeline is a valid path, one event per transition, no gaps ------------------
        transitions = [e for e in evs if e["type"] in TRANSITION_TYPES]
        # Delivery entries are checked against the notifications by notification_invariants (N7).
        known = TRANSITION_TYPES | {"escalation_executed", "notification_sent", "notification_failed"}
        unknown = [e["type"] for e in evs if e["type"] not in known]
        if unknown:
            fig.violate(f"[4] incident {iid}: unknown event types {unknown}")
        if not transitions or transitions[0]["type"] != "created" or transitions[0]["to_state"] != "OPEN":
            fig.violate(f"[4] incident {iid}: timeline does not start with 'created' -> OPEN")
            continue
        if sum(1 for e in transitions if e["type"] == "created") != 1:
            fig.violate(f"[4] incident {iid}: more than one 'created' event")
        path = [State.OPEN]
        for previous, event in zip(transitions, transitions[1:], strict=False):
            to_state = State(event["to_state"]) if event["to_state"] else None
            if event["from_state"] != previous["to_state"]:
                fig.violate(
                    f"[4] incident {iid}: gap: event {event['id']} goes from {event['from_state']} "
                    f"but the previous one ended in {previous['to_state']}"
                )
            # Every transition records its state's entry, but an acknowledgement that ran out its own.
            timed_out = (previous["to_state"], event["to_state"]) == ("ACKNOWLEDGED", "ESCALATING")
            expected_type = ACK_TIMEOUT if timed_out else EVENT_TYPE.get(to_state)
            if to_state is None or event["type"] != expected_type:
                fig.violate(f"[4] incident {iid}: event {event['id']} type {event['type']} -> {to_state}")
                continue
            path.append(to_state)
        if not is_valid_path(path):
            fig.violate(f"[4] incident {iid}: invalid path {[s.value for s in path]}")
        if path[-1] is not state:
            fig.violate(f"[4] incident {iid}: timeline ends in {path[-1]} but the incident is {state}")
        # Steps under the incident lock come in time order; delivery entries are written without it
        # (models/notify.py, _record), so they are not held to the ids of the others.
        locked = [e for e in evs if not e["type"].startswith("notification_")]
        for earlier, later in zip(locked, locked[1:], strict=False):
            if later["at"] < earlier["at"]:
                fig.violate(f"[4] incident {iid}: event {later['id']} is dated before event {earlier['id']}")
        # A state's timestamp is when a client's transition last reached it (an ack timeout sets none).
        for target, column in STATE_TIMESTAMP.items():
            entries = [e for e in transitions if e["type"] == EVENT_TYPE[target]]
            if entries and incident[column] != entries[-1]["at"]:
                fig.violate(
                    f"[4] incident {iid}: {column}={incident[column]} but its last event is at "
                    f"{entries[-1]['at']}"
                )
        reached = {State(e["to_state"]) for e in transitions}
        for target, column in STATE_TIMESTAMP.items():
            if target not in reached and incident[column] is not None:
                fig.violate(f"[4] incident {iid}: {column} is set but no event reached {target}")

        # When it escalated (from the timeline): each span from entering ESCALATING to leaving it (an
        # acknowledgement that ran out enters it again).
        spans: list[list] = []
        for event in transitions:
            if event["to_state"] == "ESCALATING":
                spans.append([event, None])
            elif event["from_state"] == "ESCALATING" and spans:
                spans[-1][1] = event
        escalated = spans[0][0] if spans else None
        executed_events = [e for e in evs if e["type"] == "escalation_executed"]
        for event in executed_events:
            if event["from_state"] != "ESCALATING" or event["to_state"] != "ESCALATING":
                fig.violate(f"[4] incident {iid}: escalation_executed event {event['id']} outside ESCALATING")
            if not any(a["id"] < event["id"] and (b is None or event["id"] < b["id"]) for a, b in spans):
                fig.violate(
                    f"[3] incident {iid}: escalation_executed event {event['id']} outside the escalation"
                )

        if escalated is None:
            if escs:
                fig.violate(f"[1] incident {iid}: {len(escs)} escalation(s) but it never escalated")
            continue
        fig.escalated += 1
        levels = incident["policy_levels"] or []
        ack_timeout_ms = incident["policy_ack_timeout_ms"]

        # -- the levels it escalates by are its policy's, as the file says ---------------------------
        if policy_file is not None:
            # The one it names, else its severity's, else the default; a named one gone: the default.
            name = incident["policy"] or policy_file["severity_policies"].get(incident["severity"])
            name = name if name in policy_file["policies"] else policy_file["default"]
            expected = policy_file["policies"][name]
            stored = [{"delay_ms": lv.get("delay_ms"), "notify": lv.get("notify")} for lv in levels]
            if stored != expected:
                fig.violate(
                    f"[1] incident {iid}: stored levels {stored} but policy {name} in the file is {expected}"
                )
            wanted = (policy_file["repeats"][name], policy_file["ack_timeouts"][name])
            if (incident["policy_repeat"], ack_timeout_ms) != wanted:
                fig.violate(
                    f"[1] incident {iid}: stored repeat and ack timeout {incident['policy_repeat']}, "
                    f"{ack_timeout_ms} but policy {name} in the file has {wanted}"
                )
            said = escalated["data"] or {}
            if said.get("policy") != name or said.get("levels") != len(expected):
                fig.violate(f"[4] incident {iid}: escalated event says {said}, the file's policy is {name}")
            for esc in escs:
                index = esc["escalation_level"] - 1
                if 0 <= index < len(expected) and list(esc["notify"] or []) != expected[index]["notify"]:
                    fig.violate(
                        f"[1] escalation {esc['id']}: notify {esc['notify']} but level {index + 1} of "
                        f"policy {name} notifies {expected[index]['notify']}"
                    )

        # -- 1. exactly one execution per EXECUTED row; each row created by the step before it -------
        runs = Counter(e["data"].get("escalation_id") for e in executed_events)
        acks = [e for e in transitions if e["type"] == "acknowledged" and e["from_state"] == "ESCALATING"]
        repeats = 0
        previous = None  # the step before, in the order the chain ran: (round, level)
        for esc in escs:
            eid = str(esc["id"])
            status = esc["status"]
            step = (esc["round"], esc["escalation_level"])
            n_runs = runs.pop(eid, 0)
            fig.executed += status == "EXECUTED"
            fig.cancelled += status == "CANCELLED"
            fig.pending += status == "PENDING"
            if n_runs > 1:
                fig.duplicated += n_runs - 1
                fig.violate(f"[1] escalation {eid} (incident {iid}) executed {n_runs} times")
            if (status == "EXECUTED") != (n_runs >= 1):
                fig.violate(f"[1] escalation {eid} is {status} but has {n_runs} execution event(s)")
            expected_step, base, delay_ms = _origin(
                esc, previous, escalated, acks, escs, levels, ack_timeout_ms
            )
            if esc["kind"] == "level" and previous is not None and esc["round"] != previous["round"]:
                repeats += 1
                if repeats > incident["policy_repeat"]:
                    fig.violate(
                        f"[1] escalation {eid}: repeat {repeats} of a policy repeating "
                        f"{incident['policy_repeat']}"
                    )
            if expected_step is None or step != expected_step:
                fig.violate(f"[1] escalation {eid} (incident {iid}): step {step}, expected {expected_step}")
            elif base is not None and delay_ms is not None:
                expected_due = base + timedelta(milliseconds=delay_ms)
                if (
                    abs(esc["created_at"] - base) > EPSILON
                    or abs(esc["scheduled_at"] - expected_due) > EPSILON
                ):
                    fig.violate(
                        f"[1] escalation {eid}: created {esc['created_at']} due {esc['scheduled_at']}, "
                        f"expected created {base} due {expected_due}"
                    )
            if esc["kind"] == "ack_timeout" and status == "EXECUTED":
                # It fired while the acknowledgement that started it still stood: the next transition
                # after that acknowledgement is its own ack timeout, at its execution.
                after = [
                    t for t in transitions if t["at"] >= esc["created_at"] and t["type"] != "acknowledged"
                ]
                fired = after[0] if after else None
                if (
                    fired is None
                    or fired["type"] != ACK_TIMEOUT
                    or (fired["data"] or {}).get("escalation_id") != eid
                    or fired["at"] != esc["executed_at"]
                ):
                    fig.violate(f"[3] ack timeout {eid} fired without its acknowledgement standing: {fired}")
            previous = esc
            if status != "EXECUTED":
                continue
            # -- 3. nothing executed while the incident was not escalating --------------------------
            at = esc["executed_at"]
            if not any(a["at"] <= at and (b is None or at < b["at"]) for a, b in spans):
                fig.executed_after_leave += 1
                fig.violate(f"[3] escalation {eid} executed at {at}, while incident {iid} was not ESCALATING")
            if esc["manual"]:
                # Paged now by a responder: on no timer (neither late nor early), and announced by the
                # web that ran it, not a worker. Only when it ran, and that it ran once, is checked.
                continue
            executed_rows[eid] = {
                "incident": str(iid),
                "level": esc["escalation_level"],
                "task": esc["task_id"],
                # One transaction's executions share the clock it read: a batch.
                "transaction": esc["executed_at"],
            }
            lateness = esc["executed_at"] - esc["scheduled_at"]
            latenesses.append(lateness.total_seconds())
            latest = deadline(esc["scheduled_at"])
            after_recovery = esc["executed_at"] - (latest - bound)
            fig.worst_after_recovery_s = max(fig.worst_after_recovery_s, after_recovery.total_seconds())
            _check_handover(fig, eid, esc, handover_bound_s, outages)
            if lateness < timedelta(0):
                fig.violate(f"[2] escalation {eid} executed {-lateness} before it was due")
            elif esc["executed_at"] > latest:
                fig.violate(
                    f"[2] escalation {eid} executed {lateness} after due, "
                    f"{after_recovery.total_seconds():.1f} s after it fell due or the fault under way "
                    f"ended (bound {bound})"
                )
        for eid, n_runs in runs.items():
            fig.duplicated += n_runs
            fig.violate(f"[1] incident {iid}: {n_runs} execution event(s) of unknown escalation {eid}")

        # -- 2 and 3. nothing lost -----------------------------------------------------------------
        last = escs[-1] if escs else None
        if last is None:
            fig.lost += 1
            fig.violate(f"[2] incident {iid} escalated at {escalated['at']} but has no escalation at all")
            continue
        if last["status"] == "EXECUTED" and (
            last["escalation_level"] < len(levels) or repeats < incident["policy_repeat"]
        ):
            # The execution commits the next step in its own transaction: it cannot be missing.
            fig.lost += 1
            fig.violate(
                f"[1] incident {iid}: {(last['round'], last['escalation_level'])} EXECUTED, "
                "the next step missing"
            )
        if ack_timeout_ms:
            timers = {esc["created_at"] for esc in escs if esc["kind"] == "ack_timeout"}
            for ack in acks:
                if ack["at"] not in timers:
                    fig.lost += 1
                    fig.violate(f"[2] incident {iid}: acknowledged at {ack['at']} without a timer")
        for esc in escs:
            # Levels run while it escalates; a timer while it is acknowledged.
            runs_in = "ACKNOWLEDGED" if esc["kind"] == "ack_timeout" else "ESCALATING"
            if esc["status"] == "PENDING":
                if state.value != runs_in:
                    fig.violate(
                        f"[3] escalation {esc['id']} ({esc['kind']}) PENDING but incident {iid} is {state}"
                    )
                elif deadline(esc["scheduled_at"]) < now:
                    fig.lost += 1
                    fig.violate(
                        f"[2] escalation {esc['id']} (incident {iid}, step "
                        f"{(esc['round'], esc['escalation_level'])}"
                        f", {esc['kind']}) still PENDING {now - esc['scheduled_at']} after due"
                    )
            elif _skipped(esc):
                # Skipped by a responder's escalate now, as it paged a later level of the round.
                paged = [e for e in escs if e["manual"] and e["executed_at"] == esc["updated_at"]]
                if not paged or paged[0]["round"] != esc["round"]:
                    fig.violate(
                        f"[3] escalation {esc['id']} skipped at {esc['updated_at']} but no level was paged"
                    )
            elif esc["status"] == "CANCELLED":
                # Cancelled by the transition that left the state it runs in, and not overdue then.
                left_at = esc["updated_at"]
                if not any(t["from_state"] == runs_in and t["at"] == left_at for t in transitions):
                    fig.violate(
                        f"[3] escalation {esc['id']} CANCELLED at {left_at}, not by incident {iid} "
                        f"leaving {runs_in}"
                    )
                elif deadline(esc["scheduled_at"]) < left_at:
                    # It should have run before the incident left, and never ran: lost.
                    fig.lost += 1
                    fig.violate(
                        f"[2] escalation {esc['id']} due {esc['scheduled_at']} never ran; incident "
                        f"left {runs_in} at {left_at} (bound {bound})"
                    )

    if latenesses:
        latenesses.sort()
        fig.worst_lateness_s = latenesses[-1]
        fig.p99_lateness_s = latenesses[min(len(latenesses) - 1, int(len(latenesses) * 0.99))]

    # -- 1, seen from the side: the worker logs announce (notify) exactly what Postgres executed ------
    announced: Counter = Counter()
    for text in logs:
        for match in EXECUTING_LINE.finditer(text):
            level, incident_id, eid = int(match.group(1)), match.group(2), match.group(3)
            announced[eid] += 1
            row = executed_rows.get(eid)
            if row is None:
                fig.violate(f"[1] escalation {eid} announced EXECUTING but it is not EXECUTED in Postgres")
            elif (row["incident"], row["level"]) != (incident_id, level):
                fig.violate(
                    f"[1] escalation {eid} announced as level {level} of {incident_id}, "
                    f"Postgres has level {row['level']} of {row['incident']}"
                )
    fig.announced = sum(announced.values())
    for eid, count in announced.items():
        if count > 1:
            fig.duplicated += count - 1
            fig.violate(f"[1] escalation {eid} announced EXECUTING {count} times in the worker logs")
    missing = sorted(set(executed_rows) - set(announced))
    fig.unannounced = len(missing)
    missing = [eid for eid in missing if executed_rows[eid]["task"] not in terminated_tasks]
    # A kill between a commit and its log lines loses the lines of that one transaction, a batch of
    # levels: it is transactions that are counted, not levels.
    transactions = {executed_rows[eid]["transaction"] for eid in missing}
    if len(transactions) > unannounced_allowed:
        fig.violate(
            f"[1] {len(missing)} EXECUTED escalation(s) of {len(transactions)} transaction(s) never "
            f"announced in the worker logs (at most {unannounced_allowed} transaction(s) may be, for the "
            f"kills between a commit and its log lines, besides those of tasks Celery terminated), "
            f"e.g. {missing[:3]}"
        )

    # -- 5. every request got an answer in bounded time -------------------------------------------
    check_requests(fig, list(requests), response_bound_s, allowed_statuses)
    return fig


def check_requests(
    fig: Figures, records: list[RequestRecord], bound_s: float, allowed: frozenset[int]
) -> None:
    fig.requests += len(records)
    for rec in records:
        key = str(rec.status) if rec.status is not None else "no answer"
        fig.statuses[key] = fig.statuses.get(key, 0) + 1
        fig.worst_response_s = max(fig.worst_response_s, rec.elapsed_s)
        where = f"{rec.method} {rec.path}"
        if rec.status is None:
            fig.violate(f"[5] {where}: no answer after {rec.elapsed_s:.2f}s ({rec.error})")
            continue
        if rec.elapsed_s > bound_s:
            fig.violate(f"[5] {where}: {rec.status} after {rec.elapsed_s:.2f}s (bound {bound_s}s)")
        if rec.status not in allowed:
            fig.violate(f"[5] {where}: status {rec.status}: {rec.text[:200]!r}")
        if "Traceback" in rec.text:
            fig.violate(f"[5] {where}: traceback in the answer")
        if rec.status >= 400:
            body = rec.json_body
            if not (isinstance(body, dict) and body.get("code") == rec.status and body.get("message")):
                fig.violate(f"[5] {where}: {rec.status} without the JSON error shape: {rec.text[:200]!r}")
