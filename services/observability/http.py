"""The HTTP endpoints of every service: ``/healthz``, ``/readyz`` and ``/metrics``.

- ``/healthz``: 200 while the process is alive (the server thread answers);
- ``/readyz``: 200 when the service says it is ready, else 503 with the reason as JSON;
- ``/metrics``: the Prometheus text exposition of the service's registry.

Served by the stdlib ``wsgiref`` server, one thread per request, on a daemon thread of its own,
so a scrape never waits for the service's event loop. The host defaults to loopback
(``127.0.0.1``): exposing the endpoints on other interfaces is an explicit choice
(``FLOWLOG_HTTP_HOST=0.0.0.0`` in containers).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import msgspec
from prometheus_client import CollectorRegistry, make_wsgi_app

from eventstore.errors import FlowlogError

_log = logging.getLogger(__name__)


class EndpointBindError(FlowlogError):
    """The HTTP endpoints could not listen on the configured host and port."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServerV6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _RequestHandler(WSGIRequestHandler):
    """Logs requests at debug level through :mod:`logging` instead of printing them."""

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("http %s", format % args)


class HealthServer:
    """Serves the health, readiness and metrics endpoints of one service.

    Not ready until :meth:`set_ready` says otherwise. :meth:`start` and :meth:`stop` block
    briefly (bind; wait for the serving thread): call them from a worker thread in async code.
    """

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        self._host = host
        self._port = port
        self._metrics = make_wsgi_app(registry)
        self._readiness: tuple[bool, str] = (False, "starting")
        self._server: _ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve on a background thread; return the bound port (port 0 picks a
        free one). Raises :class:`EndpointBindError` if the address cannot be bound."""
        if self._server is not None:
            return int(self._server.server_port)
        server_class = _ThreadingWSGIServerV6 if ":" in self._host else _ThreadingWSGIServer
        try:
            server = make_server(self._host, self._port, self._app, server_class, _RequestHandler)
        except OSError as exc:
            raise EndpointBindError(
                f"cannot serve HTTP endpoints on {self._host}:{self._port}: {exc}"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="flowlog-http",
            daemon=True,
        )
        self._thread.start()
        return int(server.server_port)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        """Say whether the service is ready; ``reason`` is shown by ``/readyz`` when not."""
        self._readiness = (ready, reason)

    def stop(self) -> None:
        """Stop serving and close the socket (a no-op if not started)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics(environ, start_response)
            return body
        if path == "/healthz":
            return _json(start_response, "200 OK", {"status": "alive"})
        if path == "/readyz":
            ready, reason = self._readiness
            if ready:
                return _json(start_response, "200 OK", {"ready": True})
            return _json(
                start_response, "503 Service Unavailable", {"ready": False, "reason": reason}
            )
        return _json(start_response, "404 Not Found", {"error": f"no endpoint {path}"})


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    start_response(status, [("Content-Type", "application/json")])
    return [msgspec.json.encode(body)]
