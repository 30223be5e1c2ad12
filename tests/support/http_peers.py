"""Local HTTP peers for tests: a real HTTP server on a free port of 127.0.0.1, in a thread.

A test gives the peer a handler (request -> response); the peer records every request it got.
Handlers that must hang wait on :attr:`HttpPeer.released`, which is set when the peer stops.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class PeerRequest:
    """One request as the peer received it; header names are lower-cased."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class PeerResponse:
    """What the peer answers."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, value: Any, status: int = 200) -> PeerResponse:
        """A JSON response."""
        return cls(status, json.dumps(value).encode(), {"Content-Type": "application/json"})

    @classmethod
    def of_text(cls, text: str, status: int = 200) -> PeerResponse:
        """A plain text response."""
        return cls(status, text.encode(), {"Content-Type": "text/plain; charset=utf-8"})


PeerHandler = Callable[[PeerRequest], PeerResponse]


class QuietHTTPServer(ThreadingHTTPServer):
    """A threaded test server that does not print a traceback when a client hangs up (an
    agent whose timeout ran out, a service process killed mid-export): tests expect that."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server(QuietHTTPServer):
    block_on_close = False

    def __init__(self, peer: HttpPeer) -> None:
        super().__init__(("127.0.0.1", 0), _RequestHandler)
        self.peer = peer


class _RequestHandler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("Content-Length") or 0)
        request = PeerRequest(
            method=self.command,
            path=path,
            query=query,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
        )
        peer = self.server.peer
        with peer.lock:
            peer.requests.append(request)
        response = peer.handler(request)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: requests are recorded in :attr:`HttpPeer.requests` instead."""


class HttpPeer:
    """A threaded HTTP server answering every request with ``handler``; use as a context
    manager. ``url`` is its base URL, ``requests`` what it received, in order."""

    def __init__(self, handler: PeerHandler) -> None:
        self.handler = handler
        self.requests: list[PeerRequest] = []
        self.lock = threading.Lock()
        self.released = threading.Event()
        self._server = _Server(self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def __enter__(self) -> HttpPeer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
