"""Polling helpers for end-to-end tests: wait for the database to reach a state, with a deadline."""

from __future__ import annotations

import time


def eventually(check, timeout: float = 10.0, interval: float = 0.1):
    """Call check() until it returns a truthy value or the deadline passes (then raise with the last
    value). Returns that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"not reached within {timeout}s; last value: {last!r}")
