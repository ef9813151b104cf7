"""worker.sse: an event stream's chunked body read off the connection, event for event as httpx-sse.

A raw HTTP/1.1 server on loopback answers each request with exactly the bytes a test
gives it, so every framing a provider could send (chunk sizes, extensions, trailers, line
endings, split characters, broken bodies) is read both ways, by :func:`worker.sse.iter_sse`
and by httpx-sse's own ``EventSource.iter_sse()``, and must come out the same.
"""

from __future__ import annotations

import gzip
import queue
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx
import pytest
from httpx_sse import EventSource

from worker.guard import guarded_transport
from worker.sse import chunked_connection, iter_sse

pytestmark = pytest.mark.integration

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
CHUNKED = HEAD + b"transfer-encoding: chunked\r\n\r\n"

BODY = (
    "data: plain\n\n"
    ": a comment\n"
    "event: named\ndata: first line\ndata: second line\nid: 7\nretry: 1500\n\n"
    'data: {"text": "h\u00e9llo \U0001f642 \u4e16\u754c"}\n\n'
    "data: crlf\r\n\r\n"
    "data: cr only\r\rdata:no space\n\n"
    "id\ndata\n\n"
    "data: [DONE]\n\n"
).encode()


def chunked(body: bytes, size: int, ext: bytes = b"", trailer: bytes = b"") -> bytes:
    """``body`` framed as chunks of ``size`` bytes, then the last chunk and ``trailer``."""
    frames = [
        b"%x%s\r\n%s\r\n" % (len(body[i : i + size]), ext, body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(frames) + b"0\r\n" + trailer + b"\r\n"


@dataclass
class Answer:
    """One response: its bytes, then hang up or hold the connection until released."""

    data: bytes
    close: bool = False
    hold: threading.Event | None = None


@dataclass
class RawServer:
    """Answers each request on loopback with the next :class:`Answer`, keeping connections."""

    answers: queue.Queue[Answer] = field(default_factory=queue.Queue)
    connections: int = 0
    sock: socket.socket = field(default_factory=socket.socket)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/stream"

    def start(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        with conn, reader:
            while True:
                length = 0
                line = reader.readline()
                if not line:
                    return
                while line not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                    line = reader.readline()
                reader.read(length)
                answer = self.answers.get(timeout=10)
                conn.sendall(answer.data)
                if answer.hold is not None:
                    answer.hold.wait(10)
                    return
                if answer.close:
                    conn.shutdown(socket.SHUT_RDWR)
                    return


@pytest.fixture
def server() -> Iterator[RawServer]:
    srv = RawServer()
    srv.start()
    yield srv
    srv.sock.close()


class SmallReads(httpcore.NetworkBackend):
    """httpcore's sync backend with reads of at most ``size`` bytes: every split a read can make."""

    def __init__(self, size: int) -> None:
        self._inner = httpcore.SyncBackend()
        self._size = size

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        return _SmallStream(self._inner.connect_tcp(*args, **kwargs), self._size)


class _SmallStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream, size: int) -> None:
        self._inner = inner
        self._size = size

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(min(max_bytes, self._size), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def small_reads_client(size: int) -> httpx.Client:
    transport = httpx.HTTPTransport(retries=0)
    transport._pool._network_backend = SmallReads(size)
    return httpx.Client(transport=transport)


def events(
    client: httpx.Client, server: RawServer, data: bytes, *, fast: bool, close: bool = False
) -> list[Any]:
    """The events of one answer, read by worker.sse or by httpx-sse, then its error if any
    (type, message, whether it names the request)."""
    server.answers.put(Answer(data, close=close))
    got: list[Any] = []
    with client.stream("POST", server.url, json={}, timeout=5) as response:
        source = EventSource(response)
        if fast:
            assert chunked_connection(response) is not None
        try:
            for sse in iter_sse(source) if fast else source.iter_sse():
                got.append((sse.event, sse.data, sse.id, sse.retry))
        except httpx.RequestError as exc:
            got.append((type(exc), str(exc), exc.request is response.request))
        else:
            assert response.is_closed, "a body read to its end closes the response"
    return got


def both(client: httpx.Client, server: RawServer, data: bytes) -> list[Any]:
    ours = events(client, server, data, fast=True)
    assert ours == events(client, server, data, fast=False)
    return ours


@pytest.mark.parametrize("size", [1, 2, 3, 5, 13, 64, 100_000])
def test_events_match_httpx_sse_for_any_chunk_size(server: RawServer, size: int) -> None:
    """Every field, comment, line ending and split character, in chunks of any size."""
    with httpx.Client() as client:
        got = both(client, server, CHUNKED + chunked(BODY, size))
    assert ("message", "plain", "", None) in got
    assert ("named", "first line\nsecond line", "7", 1500) in got
    assert ("message", '{"text": "h\u00e9llo \U0001f642 \u4e16\u754c"}', "7", None) in got
    assert ("message", "cr only", "7", None) in got
    assert ("message", "", "", None) in got
    assert got[-1] == ("message", "[DONE]", "", None)
    assert len(got) == 8


@pytest.mark.parametrize("read_size", [1, 2, 7])
def test_events_match_when_reads_split_every_header_footer_and_character(
    server: RawServer, read_size: int
) -> None:
    """Reads of a few bytes: chunk headers, CRLFs and UTF-8 characters cut at every place."""
    with small_reads_client(read_size) as client:
        got = both(client, server, CHUNKED + chunked(BODY, 5, ext=b";name=value  "))
    assert len(got) == 8


def test_trailer_is_read_and_the_connection_is_reused(server: RawServer) -> None:
    """h11 reads the trailer, and the next request goes out on the same connection."""
    answer = CHUNKED + chunked(BODY, 40, trailer=b"x-checksum: 1\r\nx-more: 2\r\n")
    with httpx.Client(transport=guarded_transport()) as client:
        for _ in range(3):
            assert len(events(client, server, answer, fast=True)) == 8
    assert server.connections == 1


BREAKS = {
    "cut in a chunk's data": (b"b\r\ndata: o", True),
    "cut before a footer": (b"b\r\ndata: one\n\n", True),
    "cut inside a footer": (b"b\r\ndata: one\n\n\r", True),
    "cut inside a chunk header": (b"b\r\ndata: one\n\n\r\n1", True),
    "cut halfway": (chunked(BODY, 16)[: len(chunked(BODY, 16)) // 2], True),
    "bad chunk header": (b"b\r\ndata: one\n\n\r\nzz\r\nxx\r\n0\r\n\r\n", False),
    "bad footer": (b"b\r\ndata: one\n\nXX0\r\n\r\n", False),
}


@pytest.mark.parametrize(("body", "close"), BREAKS.values(), ids=BREAKS.keys())
def test_every_event_before_a_break_then_the_same_error(
    server: RawServer, body: bytes, close: bool
) -> None:
    """A body cut short or malformed: the events before it, then httpx's error, same words."""
    with httpx.Client() as client:
        ours = events(client, server, CHUNKED + body, fast=True, close=close)
        theirs = events(client, server, CHUNKED + body, fast=False, close=close)
    assert ours == theirs
    assert ours[-1][0] is httpx.RemoteProtocolError
    assert ours[-1][2], "the error names its request"


def test_a_stalled_body_ends_in_httpx_read_timeout(server: RawServer) -> None:
    """The read timeout of the request holds, and ends in httpx's own ReadTimeout."""
    release = threading.Event()
    server.answers.put(Answer(CHUNKED + b"b\r\ndata: one\n\n\r\n", hold=release))
    got: list[Any] = []
    try:
        with (
            httpx.Client(transport=guarded_transport()) as client,
            client.stream("POST", server.url, json={}, timeout=0.2) as response,
        ):
            assert chunked_connection(response) is not None
            with pytest.raises(httpx.ReadTimeout):
                got.extend(sse.data for sse in iter_sse(EventSource(response)))
    finally:
        release.set()
    assert got == ["one"]


@pytest.mark.parametrize(
    ("head", "body"),
    [
        (HEAD + b"content-length: %d\r\n\r\n" % len(BODY), BODY),
        (
            HEAD + b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n",
            chunked(gzip.compress(BODY), 50),
        ),
    ],
    ids=["content-length", "gzip"],
)
def test_other_bodies_are_read_by_httpx_sse(server: RawServer, head: bytes, body: bytes) -> None:
    """A body with a length, or gzipped, is not taken: httpx-sse reads it, whole."""
    server.answers.put(Answer(head + body))
    with (
        httpx.Client() as client,
        client.stream("POST", server.url, json={}, timeout=5) as response,
    ):
        assert chunked_connection(response) is None
        got = [sse.data for sse in iter_sse(EventSource(response))]
    assert len(got) == 8
    assert got[-1] == "[DONE]"


def test_a_body_already_being_read_is_left_to_httpx_sse(server: RawServer) -> None:
    """Once httpx's iterators hold part of the body, the rest is theirs to read."""
    server.answers.put(Answer(CHUNKED + chunked(BODY, 30)))
    with (
        httpx.Client() as client,
        client.stream("POST", server.url, json={}, timeout=5) as response,
    ):
        source = EventSource(response)
        first = next(source.iter_sse())
        assert chunked_connection(response) is None
    assert first.data == "plain"


def test_a_declared_charset_and_bytes_after_the_last_chunk(server: RawServer) -> None:
    """A Latin-1 stream decodes as httpx decodes it; stray bytes after the end change nothing."""
    latin = HEAD + b"content-type: text/event-stream; charset=iso-8859-1\r\n"
    latin = latin.replace(b"content-type: text/event-stream\r\n", b"", 1)
    with httpx.Client() as client:
        got = both(
            client,
            server,
            latin + b"transfer-encoding: chunked\r\n\r\n" + chunked(b"data: caf\xe9\n\n", 4),
        )
        assert got == [("message", "caf\u00e9", "", None)]
    stray = CHUNKED + chunked(b"data: one\n\n", 100) + b"HTTP/1.1 200 OK\r\n"
    for fast in (True, False):
        with httpx.Client() as client:
            assert events(client, server, stray, fast=fast) == [("message", "one", "", None)]


def test_leaving_a_stream_early_closes_its_connection(server: RawServer) -> None:
    """A body left unread is not reused: the next request opens a new connection and works."""
    release = threading.Event()
    server.answers.put(Answer(CHUNKED + chunked(BODY, 20), hold=release))
    try:
        with httpx.Client(transport=guarded_transport()) as client:
            with client.stream("POST", server.url, json={}, timeout=5) as response:
                first = next(iter(iter_sse(EventSource(response))))
            assert first.data == "plain"
            assert len(events(client, server, CHUNKED + chunked(BODY, 20), fast=True)) == 8
    finally:
        release.set()
    assert server.connections == 2


def test_the_mock_upstreams_streams_take_the_fast_path(mock: Any) -> None:
    """The worker's own client and the mock's chunked answers: the path every test runs."""
    with (
        httpx.Client(transport=guarded_transport()) as client,
        client.stream(
            "POST",
            f"{mock.url}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as response,
    ):
        assert chunked_connection(response) is not None
        data = [sse.data for sse in iter_sse(EventSource(response))]
    assert data[-1] == "[DONE]"
