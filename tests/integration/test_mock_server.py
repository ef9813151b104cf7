"""The mock upstream's HTTP server itself."""

from __future__ import annotations

import pytest

from worker.mockllm import MockLLM


def test_a_client_going_away_prints_no_traceback(
    mock_server: MockLLM, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reset or broken connection (a cancelled stream, a pooled connection closed) is
    normal traffic for an upstream; any other handler error is still printed."""
    server = mock_server._server
    for gone in (ConnectionResetError(104, "reset by peer"), BrokenPipeError(32, "pipe")):
        try:
            raise gone
        except OSError:
            server.handle_error(None, ("127.0.0.1", 1))
    assert capsys.readouterr().err == ""

    try:
        raise ValueError("a bug in a handler")
    except ValueError:
        server.handle_error(None, ("127.0.0.1", 1))
    assert "ValueError: a bug in a handler" in capsys.readouterr().err
