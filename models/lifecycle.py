"""The incident state machine: the one place that decides which transitions are allowed.

Pure: no Flask, no SQL. Views, tasks and tests all ask this module.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    OPEN = "OPEN"
    ACKNOWLEDGED = "ACKNOWLEDGED"
    ESCALATING = "ESCALATING"
    RESOLVED = "RESOLVED"
    CANCELLED = "CANCELLED"


class Action(enum.StrEnum):
    ACKNOWLEDGE = "acknowledge"
    ESCALATE = "escalate"
    RESOLVE = "resolve"
    CANCEL = "cancel"


# The state each action leads to.
TARGET: dict[Action, State] = {
    Action.ACKNOWLEDGE: State.ACKNOWLEDGED,
    Action.ESCALATE: State.ESCALATING,
    Action.RESOLVE: State.RESOLVED,
    Action.CANCEL: State.CANCELLED,
}

ALLOWED: dict[State, frozenset[State]] = {
    State.OPEN: frozenset({State.ACKNOWLEDGED, State.ESCALATING, State.RESOLVED, State.CANCELLED}),
    State.ACKNOWLEDGED: frozenset({State.RESOLVED, State.CANCELLED}),
    State.ESCALATING: frozenset({State.ACKNOWLEDGED, State.RESOLVED, State.CANCELLED}),
    State.RESOLVED: frozenset(),
    State.CANCELLED: frozenset(),
}

TERMINAL: frozenset[State] = frozenset(s for s, targets in ALLOWED.items() if not targets)

# The timestamp column each reached state sets on the incident.
STATE_TIMESTAMP: dict[State, str] = {
    State.ACKNOWLEDGED: "acknowledged_at",
    State.ESCALATING: "escalated_at",
    State.RESOLVED: "resolved_at",
    State.CANCELLED: "cancelled_at",
}


# The timeline entry each reached state records.
EVENT_TYPE: dict[State, str] = {
    State.ACKNOWLEDGED: "acknowledged",
    State.ESCALATING: "escalated",
    State.RESOLVED: "resolved",
    State.CANCELLED: "cancelled",
}


class InvalidTransition(Exception):
    """The action is not allowed from the incident's current state."""

    def __init__(self, current: State, action: Action):
        self.current = current
        self.action = action
        self.target = TARGET[action]
        super().__init__(
            f"cannot {action.value} an incident that is {current.value} "
            f"({current.value} -> {self.target.value} is not allowed)"
        )


def next_state(current: State, action: Action) -> State:
    """Return the state `action` leads to from `current`, or raise InvalidTransition."""
    target = TARGET[action]
    if target not in ALLOWED[current]:
        raise InvalidTransition(current, action)
    return target


def is_valid_path(states: list[State]) -> bool:
    """True when `states` starts at OPEN and every step is an allowed transition."""
    if not states or states[0] is not State.OPEN:
        return False
    return all(b in ALLOWED[a] for a, b in zip(states, states[1:], strict=False))
