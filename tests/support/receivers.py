"""Real local receivers for notification tests: an SMTP sink, a scriptable HTTP listener (webhook, Slack
and Twilio-compatible), and a listener that accepts connections and never answers.

All listen on 127.0.0.1 on a free port, record what reached them, and can be stopped and started
again on the same port, so a test can take a provider down and bring it back.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller

from tests.support.servers import free_port


@dataclass
class ReceivedMail:
    """One message the SMTP sink accepted."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    at: float


class SmtpSink:
    """aiosmtpd in a thread; `rcpt_reply` / `data_reply` (e.g. "550 5.1.1 no such user") refuse mail."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.messages: list[ReceivedMail] = []
        self.rcpt_reply: str | None = None
        self.data_reply: str | None = None
        self._controller: Controller | None = None

    def start(self) -> SmtpSink:
        """Listen (again) on the sink's port."""
        self._controller = Controller(_SmtpHandler(self), hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Stop listening; connections are then refused."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def restart(self) -> None:
        """Stop and listen again on the same port."""
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        """The SMTP_URL that reaches this sink."""
        return f"smtp://127.0.0.1:{self.port}"

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _SmtpHandler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.sink.rcpt_reply:
            return self.sink.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.sink.data_reply:
            return self.sink.data_reply
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.sink.messages.append(
            ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), message, time.time())
        )
        return "250 Message accepted for delivery"


@dataclass
class ReceivedRequest:
    """One HTTP request the listener answered (headers with lower-case names)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> object:
        """The body as JSON."""
        return json.loads(self.body)


@dataclass
class Reply:
    """How the listener answers one request."""

    status: int = 200
    body: bytes | Callable[[], bytes] = b"ok"  # a callable makes a fresh body per request
    headers: dict[str, str] = field(default_factory=dict)


class HttpReceiver:
    """ThreadingHTTPServer that records every request and answers with the scripted replies in order,
    then with `default` (200 "ok"; `HttpReceiver.twilio()` answers 201 with a message sid)."""

    def __init__(self, port: int | None = None, default: Reply | None = None, ssl_context=None) -> None:
        self.port = port or free_port()
        self.default = default or Reply()
        self.requests: list[ReceivedRequest] = []
        self.ssl_context = ssl_context
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def twilio(cls, port: int | None = None) -> HttpReceiver:
        """A Twilio-compatible Messages endpoint: 201 with {"sid": "SM...", "status": "queued"}."""

        def created() -> bytes:
            return json.dumps({"sid": "SM" + uuid.uuid4().hex, "status": "queued"}).encode()

        return cls(port, default=Reply(201, created, {"Content-Type": "application/json"}))

    def script(self, *replies: int | Reply, retry_after: str | None = None) -> HttpReceiver:
        """Answer the next requests with these statuses (or Replies), e.g. script(503, 503, 200)."""
        with self._lock:
            for reply in replies:
                if isinstance(reply, int):
                    headers = {"Retry-After": retry_after} if retry_after is not None else {}
                    reply = Reply(reply, b"scripted", headers)
                self._replies.append(reply)
        return self

    def unscript(self) -> HttpReceiver:
        """Forget the scripted replies not yet used: answer with `default` from now on."""
        with self._lock:
            self._replies.clear()
        return self

    def _next_reply(self, request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(request)
            reply = self._replies.popleft() if self._replies else self.default
        body = reply.body() if callable(reply.body) else reply.body
        return reply.status, reply.headers, body

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:PORT."""
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def start(self) -> HttpReceiver:
        """Listen (again) on the receiver's port."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = ReceivedRequest(
                    "POST",
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                    time.time(),
                )
                status, headers, body = receiver._next_reply(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST

            def log_message(self, format: str, *args: object) -> None:
                pass  # a test's output is not the place for an access log

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; connections are then refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> HttpReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HangListener:
    """Accepts TCP connections and never answers (with `drip_every`, trickles one byte that often,
    so that a per-read timeout never fires and only a whole-attempt deadline ends the attempt)."""

    def __init__(self, port: int | None = None, drip_every: float | None = None) -> None:
        self.port = port or free_port()
        self.drip_every = drip_every
        self.accepted = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        """http://127.0.0.1:PORT."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HangListener:
        """Listen on the port."""
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._sock.settimeout(0.1)
        self._stop.clear()
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._spawn(self._hold, conn)

    def _hold(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop.wait(self.drip_every or 0.1):
                if self.drip_every:
                    try:
                        conn.sendall(b"2")
                    except OSError:
                        return  # the client gave up: the point of the exercise

    def stop(self) -> None:
        """Close the listener and every held connection."""
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> HangListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PrintingReceiver(HttpReceiver):
    def _next_reply(self, request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        signed = {k: v for k, v in request.headers.items() if k.startswith("webhook-")}
        body = request.body.decode(errors="replace")
        print(f"{request.method} {request.path} {json.dumps(signed)}\n{body}\n", flush=True)
        return super()._next_reply(request)


def main(argv: list[str]) -> None:
    """`python -m tests.support.receivers PORT`: a webhook receiver that prints what it gets (README)."""
    port = int(argv[0]) if argv else 8099
    _PrintingReceiver(port).start()
    print(f"listening on http://127.0.0.1:{port}, printing every request (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
