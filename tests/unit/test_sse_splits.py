"""worker.sse against httpx-sse over any body and any split of it into reads (no sockets).

httpcore's ``MockBackend`` hands the client exactly the reads it is given, so a property
test can cut one chunked answer anywhere (in the headers, a chunk header, its data, a
footer, a UTF-8 character, a CR LF) and check that both readers give the same events.
"""

from __future__ import annotations

from typing import Any

import httpcore
import httpx
import pytest
from httpx_sse import EventSource
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.sse import chunked_connection, iter_sse

pytestmark = pytest.mark.unit

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"

lines = st.lists(
    st.tuples(
        st.sampled_from(["data: ", "data:", "event: ", "id: ", "retry: ", ": ", "", "data"]),
        st.text(alphabet="ab 1:é🙂\x00", max_size=8),
        st.sampled_from(["\n", "\r\n", "\r", "\n\n", "\r\n\r\n"]),
    ),
    max_size=12,
)


def body_of(parts: list[tuple[str, str, str]], tail: str, stray: int | None) -> bytes:
    body = "".join(f"{field}{value}{end}" for field, value, end in parts).encode() + tail.encode()
    if stray is not None:  # a byte that is not UTF-8 here, somewhere in the body
        at = stray % (len(body) + 1)
        body = body[:at] + b"\xc3" + body[at:]
    return body


def framed(body: bytes, sizes: list[int]) -> bytes:
    frames, at, k = [], 0, 0
    while at < len(body):
        size = sizes[k % len(sizes)]
        frames.append(b"%x\r\n%s\r\n" % (len(body[at : at + size]), body[at : at + size]))
        at, k = at + size, k + 1
    return b"".join(frames) + b"0\r\n\r\n"


def reads(data: bytes, cuts: list[int]) -> list[bytes]:
    out, at, k = [], 0, 0
    while at < len(data):
        out.append(data[at : at + cuts[k % len(cuts)]])
        at, k = at + cuts[k % len(cuts)], k + 1
    return out


def events(pieces: list[bytes], *, fast: bool) -> list[Any]:
    transport = httpx.HTTPTransport(verify=False)  # plain HTTP: no CA bundle to load
    transport._pool._network_backend = httpcore.MockBackend(pieces)
    with (
        httpx.Client(transport=transport) as client,
        client.stream("POST", "http://upstream.test/v1/stream", json={}) as response,
    ):
        source = EventSource(response)
        if not fast:
            return [(s.event, s.data, s.id, s.retry) for s in source.iter_sse()]
        assert chunked_connection(response) is not None
        return [(s.event, s.data, s.id, s.retry) for s in iter_sse(source)]


@settings(deadline=None)  # two clients per example, on a shared machine
@given(
    parts=lines,
    tail=st.sampled_from(["", "\r", "data: unterminated", "data: x\n"]),
    stray=st.none() | st.integers(min_value=0),
    sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=5),
)
def test_any_body_cut_anywhere_gives_httpx_sses_events(
    parts: list[tuple[str, str, str]],
    tail: str,
    stray: int | None,
    sizes: list[int],
    cuts: list[int],
) -> None:
    """Same events for every chunking and read split, including a body's unfinished end."""
    pieces = reads(HEAD + framed(body_of(parts, tail, stray), sizes), cuts)
    assert events(pieces, fast=True) == events(pieces, fast=False)


def test_a_lone_cr_at_the_end_and_a_byte_that_is_not_utf8() -> None:
    """The body's last CR ends a line and dispatches its event; a stray byte becomes U+FFFD."""
    for body, expected in (
        (b"data: last\n\r", [("message", "last", "", None)]),
        (b"data: caf\xc3\n\n", [("message", "caf\ufffd", "", None)]),
    ):
        pieces = [HEAD + framed(body, [3])]
        assert events(pieces, fast=True) == events(pieces, fast=False) == expected
