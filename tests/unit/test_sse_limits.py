"""worker.sse's limit on a line and an event: over it fails, and is never held whole.

An upstream that never ends a line (or an event) is simulated by a network stream that
answers every read with more of it, forever: without the limit the reader would hold all
of it; with the limit it stops once the limit is passed, having read little more.
"""

from __future__ import annotations

from typing import Any

import httpcore
import httpx
import pytest
from httpx_sse import EventSource

from settings import Settings
from worker.chain import MAX_COMPLETION_BYTES
from worker.errors import FatalError
from worker.sse import MAX_EVENT_BYTES, chunked_connection, iter_sse

pytestmark = pytest.mark.unit

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
CHUNKED = HEAD + b"transfer-encoding: chunked\r\n\r\n"
SIZED = HEAD + b"content-length: 1000000000000\r\n\r\n"
LIMIT = 1_000_000
READ = 65_536


def framed(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class EndlessStream(httpcore.NetworkStream):
    """Answers the first read with ``head``, and every later one with ``piece``."""

    def __init__(self, head: bytes, piece: bytes) -> None:
        self._head = head
        self._piece = piece
        self.sent = 0

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data, self._head = (self._head or self._piece), b""
        self.sent += len(data)
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, info: str) -> Any:
        return None


class EndlessBackend(httpcore.NetworkBackend):
    def __init__(self, head: bytes, piece: bytes) -> None:
        self.stream = EndlessStream(head, piece)

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return self.stream


def read_events(
    backend: httpcore.NetworkBackend, *, fast: bool, limit: int = LIMIT, most: int = 10**9
) -> list[str]:
    """The data of up to ``most`` events, read by worker.sse with ``limit``."""
    transport = httpx.HTTPTransport()
    transport._pool._network_backend = backend
    got: list[str] = []
    with (
        httpx.Client(transport=transport) as client,
        client.stream("POST", "http://upstream.test/v1/stream", json={}) as response,
    ):
        assert (chunked_connection(response) is not None) is fast
        for sse in iter_sse(EventSource(response), max_event_bytes=limit):
            got.append(sse.data)
            if len(got) == most:
                break
    return got


ENDLESS = {
    "chunked-line": (True, CHUNKED + framed(b"data: "), framed(b"a" * READ)),
    "sized-line": (False, SIZED + b"data: ", b"a" * READ),
    "chunked-event": (True, CHUNKED, framed(b"data: " + b"b" * (READ - 7) + b"\n")),
    "sized-event": (False, SIZED, b"data: " + b"b" * (READ - 7) + b"\n"),
}


@pytest.mark.parametrize(("fast", "head", "piece"), ENDLESS.values(), ids=ENDLESS.keys())
def test_a_line_or_an_event_that_never_ends_fails_once_over_the_limit(
    fast: bool, head: bytes, piece: bytes
) -> None:
    """An endless line, or an endless event of many lines: FatalError, after reading the
    limit and a read or two, whichever way the body is read."""
    backend = EndlessBackend(head, piece)

    with pytest.raises(FatalError, match=f"a line or an event over {LIMIT} bytes"):
        read_events(backend, fast=fast)

    assert backend.stream.sent <= len(head) + LIMIT + 2 * len(piece)


@pytest.mark.parametrize("fast", [True, False], ids=["chunked", "sized"])
def test_events_under_the_limit_go_on_for_ever(fast: bool) -> None:
    """The count starts again at each event: many events, each under the limit, pass."""
    event = b"data: " + b"c" * 1_000 + b"\n\n"
    piece = event * 60
    backend = EndlessBackend(CHUNKED if fast else SIZED, framed(piece) if fast else piece)

    got = read_events(backend, fast=fast, limit=2_000, most=5_000)

    assert len(got) == 5_000
    assert backend.stream.sent > 2_000 * 1_000


def exactly(body: bytes, *, fast: bool) -> list[bytes]:
    head = CHUNKED if fast else HEAD + b"content-length: %d\r\n\r\n" % len(body)
    return [head + (framed(body) + b"0\r\n\r\n" if fast else body)]


@pytest.mark.parametrize("fast", [True, False], ids=["chunked", "sized"])
@pytest.mark.parametrize(
    ("body", "ok"),
    [
        pytest.param("data: " + "x" * 94 + "\n\n", True, id="line-at-the-limit"),
        pytest.param("data: " + "x" * 95 + "\n\n", False, id="line-over"),
        pytest.param("data: " + "\u00e9" * 47 + "\n\n", True, id="utf8-at-the-limit"),
        pytest.param("data: " + "\u00e9" * 48 + "\n\n", False, id="utf8-over"),
        pytest.param(("data: " + "x" * 44 + "\n") * 2 + "\n", True, id="event-at-the-limit"),
        pytest.param(("data: " + "x" * 45 + "\n") * 2 + "\n", False, id="event-over"),
        pytest.param(": " + "x" * 90 + "\ndata: " + "x" * 94 + "\n\n", True, id="comment"),
    ],
)
def test_the_limit_counts_utf8_bytes_of_a_line_and_of_an_event(
    fast: bool, body: str, ok: bool
) -> None:
    """A line of the limit's bytes passes, one byte more fails; an event's lines add up."""
    backend = httpcore.MockBackend(exactly(body.encode(), fast=fast))

    if ok:
        assert len(read_events(backend, fast=fast, limit=100)) == 1
    else:
        with pytest.raises(FatalError):
            read_events(backend, fast=fast, limit=100)


def test_the_settings_defaults_are_the_readers_defaults() -> None:
    """RELIEVER_MAX_SSE_EVENT_BYTES and RELIEVER_MAX_COMPLETION_BYTES default to the limits
    the reader and the executor use when built without settings (tests, benchmarks)."""
    settings = Settings(_env_file=None)

    assert settings.max_sse_event_bytes == MAX_EVENT_BYTES
    assert settings.max_completion_bytes == MAX_COMPLETION_BYTES
