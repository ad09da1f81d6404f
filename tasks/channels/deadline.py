"""A whole-attempt deadline for blocking socket clients (smtplib, requests).

Their timeouts apply to each connect or read, so a peer that trickles a byte every few seconds
could hold an attempt open for ever. A Deadline shuts the attempt's sockets down when its time is
up: the blocked read returns at once and the client raises its usual connection error.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType


class Deadline:
    """`with Deadline(10) as deadline: deadline.watch(sock) ...`; `deadline.expired` tells why it failed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.ends_at = time.monotonic() + seconds
        self.expired = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def remaining(self) -> float:
        """Seconds left, never below a small positive floor (a zero timeout would mean non-blocking)."""
        return max(0.01, self.ends_at - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down at the deadline, even once TLS-wrapped; past it, close it, raise TimeoutError."""
        # A duplicate descriptor of the same connection: shutting it down wakes a read blocked on the
        # original, and TLS wrapping (which detaches the original object) does not affect it. Being
        # ours, it cannot have been closed and reused by someone else when the timer fires.
        with self._lock:
            if self.expired:
                sock.close()  # too late to use it: the caller only has to handle the error
                raise TimeoutError(f"no complete answer within {self.seconds:g} s")
            self._sockets.append(sock.dup())

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by the peer: nothing left to interrupt

    def __enter__(self) -> Deadline:
        self._timer.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._timer.cancel()
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
