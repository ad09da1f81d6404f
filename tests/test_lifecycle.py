"""The state machine, exhaustively: every state x every action."""

import pytest

from models.lifecycle import (
    ALLOWED,
    CLIENT_ACTIONS,
    TARGET,
    TERMINAL,
    Action,
    InvalidTransition,
    State,
    is_valid_path,
    next_state,
)

EXPECTED = {
    (State.OPEN, Action.ACKNOWLEDGE): State.ACKNOWLEDGED,
    (State.OPEN, Action.ESCALATE): State.ESCALATING,
    (State.OPEN, Action.RESOLVE): State.RESOLVED,
    (State.OPEN, Action.CANCEL): State.CANCELLED,
    (State.ACKNOWLEDGED, Action.RESOLVE): State.RESOLVED,
    (State.ACKNOWLEDGED, Action.CANCEL): State.CANCELLED,
    (State.ESCALATING, Action.ACKNOWLEDGE): State.ACKNOWLEDGED,
    (State.ESCALATING, Action.RESOLVE): State.RESOLVED,
    (State.ESCALATING, Action.CANCEL): State.CANCELLED,
    (State.ACKNOWLEDGED, Action.ACK_TIMEOUT): State.ESCALATING,  # the service's own
}


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("action", list(Action))
def test_every_state_and_action(state, action):
    if (state, action) in EXPECTED:
        assert next_state(state, action) is EXPECTED[(state, action)]
    else:
        with pytest.raises(InvalidTransition) as info:
            next_state(state, action)
        assert info.value.current is state
        assert state.value in str(info.value) and TARGET[action].value in str(info.value)


def test_table_has_exactly_the_expected_transitions():
    pairs = {(s, t) for s, targets in ALLOWED.items() for t in targets}
    assert pairs == {(s, TARGET[a]) for (s, a) in EXPECTED if a in CLIENT_ACTIONS}
    assert set(CLIENT_ACTIONS) == set(Action) - {Action.ACK_TIMEOUT}
    assert TERMINAL == {State.RESOLVED, State.CANCELLED}


def test_acknowledged_cannot_escalate_and_terminal_states_are_final():
    with pytest.raises(InvalidTransition):
        next_state(State.ACKNOWLEDGED, Action.ESCALATE)
    for state in TERMINAL:
        for action in Action:
            with pytest.raises(InvalidTransition):
                next_state(state, action)


def test_valid_paths():
    assert is_valid_path([State.OPEN, State.ESCALATING, State.ACKNOWLEDGED, State.RESOLVED])
    assert not is_valid_path([State.OPEN, State.ACKNOWLEDGED, State.ESCALATING])  # no timer: never escalated
    assert is_valid_path([State.OPEN, State.ESCALATING, State.ACKNOWLEDGED, State.ESCALATING, State.RESOLVED])
    assert not is_valid_path([State.ESCALATING])
    assert not is_valid_path([])
