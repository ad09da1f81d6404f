"""Local receivers for the notification benchmarks, each in a process of its own, so that neither a
bench's bare loop nor the notifier shares an interpreter (or its GIL) with the server it talks to.

`python -m bench.sinks KIND PORT`; on SIGTERM it prints one line, `SINK_JSON {"messages": n, "distinct":
m}` (distinct Message-IDs or webhook-ids: a second copy of a message shows as messages > distinct),
and exits. Kinds:

- smtp: aiosmtpd, as tests/support/receivers.SmtpSink, with a handler that only counts (it reads the
  Message-ID with a regular expression instead of parsing every message).
- http: a minimal HTTP/1.1 server on asyncio streams (keep-alive, Content-Length bodies) answering
  every request 200 "ok": a receiver that costs little per request.
- http-stdlib: tests/support/receivers.HttpReceiver (ThreadingHTTPServer, a thread per connection),
  measured beside `http` to show whether it would be the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import Process
from tests.support.servers import free_port

KINDS = ("smtp", "http", "http-stdlib")
MESSAGE_ID = re.compile(rb"^Message-ID:\s*(\S+)", re.I | re.M)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class Tally:
    def __init__(self) -> None:
        self.messages = 0
        self.ids: set[bytes] = set()

    def add(self, ident: bytes | None) -> None:
        self.messages += 1
        if ident:
            self.ids.add(ident)

    def summary(self) -> dict:
        return {"messages": self.messages, "distinct": len(self.ids)}


class _CountingHandler:
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def handle_DATA(self, server, session, envelope):
        match = MESSAGE_ID.search(envelope.content)
        self.tally.add(match.group(1) if match else None)
        return "250 Message accepted for delivery"


async def _serve_http(port: int, tally: Tally) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length, ident, close = 0, None, False
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    name, value = name.strip().lower(), value.strip()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"webhook-id":
                        ident = value
                    elif name == b"connection":
                        close = value.lower() == b"close"
                if length:
                    await reader.readexactly(length)
                tally.add(ident)
                writer.write(OK)
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the client closed the connection: one per message for requests.post
        finally:
            writer.close()

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"listening on {port}", flush=True)
    await stop.wait()
    server.close()


def _serve_threaded(kind: str, port: int, tally: Tally) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if kind == "smtp":
        from aiosmtpd.controller import Controller

        server = Controller(_CountingHandler(tally), hostname="127.0.0.1", port=port)
    else:
        from tests.support.receivers import HttpReceiver

        server = HttpReceiver(port)
    server.start()
    print(f"listening on {port}", flush=True)
    while not stop.wait(0.2):
        pass
    server.stop()
    if kind == "http-stdlib":
        for request in server.requests:
            tally.add(request.headers.get("webhook-id", "").encode() or None)


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    tally = Tally()
    if kind == "http":
        asyncio.run(_serve_http(port, tally))
    else:
        _serve_threaded(kind, port, tally)
    print("SINK_JSON " + json.dumps(tally.summary()), flush=True)


# -- for the benchmarks ------------------------------------------------------------------------------
@dataclass
class Sink(Process):
    """A receiver process (start it with Bench.start); `received()` stops it and says what it got."""

    kind: str = "smtp"

    @classmethod
    def of(cls, kind: str, env: dict[str, str], log_dir: Path, name: str) -> Sink:
        """A receiver of `kind` on a free port."""
        if kind not in KINDS:
            raise ValueError(kind)
        port = free_port()
        cmd = [sys.executable, "-m", "bench.sinks", kind, str(port)]
        log = log_dir / f"{name}.log"
        return cls(name, cmd, env, log, ready_text=f"listening on {port}", port=port, kind=kind)

    @property
    def url(self) -> str:
        return f"{'smtp' if self.kind == 'smtp' else 'http'}://127.0.0.1:{self.port}"

    def received(self) -> dict:
        """Stop the receiver: what it received since it was last started."""
        self.stop(timeout=15)
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            text = fh.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line.startswith("SINK_JSON ")]
        if not lines:
            raise RuntimeError(f"{self.name} printed no summary:\n{self.log_tail()}")
        return json.loads(lines[-1].split(" ", 1)[1])


if __name__ == "__main__":
    main(sys.argv[1:])
