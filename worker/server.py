"""HTTP endpoints for operators: ``/metrics``, ``/healthz`` and ``/readyz``.

Served from a daemon thread so a slow scrape never blocks the loop.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["Probes", "serve"]

log = structlog.get_logger("worker.server")


class Probes:
    """What the probes report, as callables the server asks on each request."""

    def __init__(self, live: Callable[[], bool], ready: Callable[[], bool]) -> None:
        self.live = live
        self.ready = ready


def serve(host: str, port: int, registry: CollectorRegistry, probes: Probes) -> ThreadingHTTPServer:
    """Start serving in a daemon thread and return the server (``shutdown()`` stops it).

    Raises ``OSError`` when the address is taken. Port 0 picks a free port; the bound
    one is ``server.server_address[1]``.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok = probes.live() if path == "/healthz" else probes.ready()
                self._reply(200 if ok else 503, b"ok\n" if ok else b"not ok\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(
            self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scrapes every few seconds would drown the logs

    server = _Server((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-reply (a probe's timeout) is no news; anything
        else is one log line, not the standard library's traceback on stderr, which
        would break the JSON lines of the log."""
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):
            log.warning("http_request_failed", error=repr(error))
