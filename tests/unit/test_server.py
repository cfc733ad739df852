"""The operators' HTTP endpoints (worker.server)."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry

from worker.server import Probes, serve


def test_a_failed_request_is_a_log_line_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """A client gone mid-reply (a probe that timed out) writes nothing; another failure
    writes one log line, never the standard library's traceback."""
    server = serve("127.0.0.1", 0, CollectorRegistry(), Probes(lambda: True, lambda: True))
    request = socket.socket()
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ValueError("boom")):
            try:
                raise error
            except Exception:
                server.handle_error(request, ("127.0.0.1", 1))
    finally:
        server.shutdown()
        server.server_close()
        request.close()
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "Broken pipe" not in out + err
    assert "http_request_failed" in out + err
    assert "boom" in out + err
