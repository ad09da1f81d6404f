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
    # The service's own: an acknowledgement nobody followed with a resolve or cancel ran out (the
    # policy's ack_timeout), and the incident pages again.
    ACK_TIMEOUT = "ack_timeout"


# The state each action leads to.
TARGET: dict[Action, State] = {
    Action.ACKNOWLEDGE: State.ACKNOWLEDGED,
    Action.ESCALATE: State.ESCALATING,
    Action.RESOLVE: State.RESOLVED,
    Action.CANCEL: State.CANCELLED,
    Action.ACK_TIMEOUT: State.ESCALATING,
}

ALLOWED: dict[State, frozenset[State]] = {
    State.OPEN: frozenset({State.ACKNOWLEDGED, State.ESCALATING, State.RESOLVED, State.CANCELLED}),
    State.ACKNOWLEDGED: frozenset({State.RESOLVED, State.CANCELLED}),
    State.ESCALATING: frozenset({State.ACKNOWLEDGED, State.RESOLVED, State.CANCELLED}),
    State.RESOLVED: frozenset(),
    State.CANCELLED: frozenset(),
}

# Transitions only the service takes, never a client, and the one state each is taken from: POST
# .../escalate on an ACKNOWLEDGED incident stays a 409.
SYSTEM: dict[Action, State] = {Action.ACK_TIMEOUT: State.ACKNOWLEDGED}
# What a client may ask for (POST /incidents/{id}/<action>).
CLIENT_ACTIONS: tuple[Action, ...] = tuple(action for action in Action if action not in SYSTEM)

TERMINAL: frozenset[State] = frozenset(s for s, targets in ALLOWED.items() if not targets)

# The timestamp column each reached state sets on the incident.
STATE_TIMESTAMP: dict[State, str] = {
    State.ACKNOWLEDGED: "acknowledged_at",
    State.ESCALATING: "escalated_at",
    State.RESOLVED: "resolved_at",
    State.CANCELLED: "cancelled_at",
}


# The timeline entry each reached state records; a system transition records its action instead (and
# leaves the state's timestamp as the first time it was reached).
EVENT_TYPE: dict[State, str] = {
    State.ACKNOWLEDGED: "acknowledged",
    State.ESCALATING: "escalated",
    State.RESOLVED: "resolved",
    State.CANCELLED: "cancelled",
}
SYSTEM_EVENT_TYPE: dict[Action, str] = {action: action.value for action in SYSTEM}


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
    allowed = current is SYSTEM[action] if action in SYSTEM else target in ALLOWED[current]
    if not allowed:
        raise InvalidTransition(current, action)
    return target


def is_valid_path(states: list[State]) -> bool:
    """True when `states` starts at OPEN and every step is an allowed transition: a client's, or the
    ack timeout of an incident that was acknowledged while escalating (only those have the timer)."""
    if not states or states[0] is not State.OPEN:
        return False
    for index, (a, b) in enumerate(zip(states, states[1:], strict=False)):
        timed_out = (a, b) == (SYSTEM[Action.ACK_TIMEOUT], TARGET[Action.ACK_TIMEOUT])
        if not (b in ALLOWED[a] or (timed_out and index > 0 and states[index - 1] is State.ESCALATING)):
            return False
    return True
