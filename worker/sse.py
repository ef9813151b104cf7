"""An event stream's events, read with less work per chunk than httpx's response iterators.

Reading a streamed answer the usual way (``EventSource.iter_sse()``), every chunk the
provider sends passes through seven nested generators (httpx's text, bytes and raw
iterators, its transport's, httpcore's pool and connection streams), h11's state machine
(two ``next_event`` calls, an event object) and httpx-sse's line generator. With hundreds
of streams in one process that costs more CPU than all reliever does with the chunk:
the bare httpx + httpx-sse reader of the capacity benchmark needs about 77 % of a core
for 500 streams of a delta every 100 ms; reading the same bodies as below, about 44 %
(docs/benchmarks.md).

:func:`iter_sse` takes the common case itself: an HTTP/1.1 response on httpcore's
connection, ``Transfer-Encoding: chunked``, no content encoding, nothing read yet. It
reads the connection's network stream as httpcore would (same read size and timeout, so
the job's budgets still hold), takes the chunk framing off, decodes the text as httpx
does (the response's encoding, errors replaced) and splits lines and events with
httpx-sse's own decoders, so its events are exactly ``iter_sse()``'s. At the last chunk
h11 gets the bytes from there on and parses the trailer itself, and the response is
closed, so the connection goes back to the pool as after ``iter_raw()``. Everything else
(HTTP/2, gzip, a body with a length or up to the close, a response whose stream is not
httpcore's HTTP/1.1 connection) is read by ``iter_sse()``. It reads private attributes of
httpx, httpcore and h11: ``pyproject.toml`` pins the releases it was written for.

Errors are httpx's, as from ``iter_sse()`` (type, message, request): a broken stream or a
malformed chunk is ``httpx.RemoteProtocolError``, a read timeout ``httpx.ReadTimeout``;
the guard's own errors (cancel, deadline, budgets) pass through. Unlike ``iter_raw()`` it
does not count ``response.num_bytes_downloaded``.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterator
from typing import Any

import h11
import httpx
from h11._readers import ChunkedReader
from httpcore._sync.connection_pool import PoolByteStream
from httpcore._sync.http11 import HTTP11Connection, HTTP11ConnectionByteStream
from httpx._client import BoundSyncStream
from httpx._exceptions import request_context
from httpx._transports.default import ResponseStream, map_httpcore_exceptions
from httpx_sse import EventSource, ServerSentEvent
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")
"""h11's chunk header: the size in hex, extensions (ignored), trailing blanks, CRLF."""


_LAYERS: tuple[tuple[str, type], ...] = (
    ("_stream", ResponseStream),  # inside httpx's BoundSyncStream
    ("_httpcore_stream", PoolByteStream),
    ("_stream", HTTP11ConnectionByteStream),
    ("_connection", HTTP11Connection),
)
"""From a response's stream down to its connection: each layer's attribute and type."""


def chunked_connection(response: httpx.Response) -> HTTP11Connection | None:
    """The HTTP/1.1 connection whose chunked body :func:`iter_sse` can read, or None.

    None unless the response is chunked without a content encoding, no byte of its body
    has been read, and its stream is the layering of the pinned httpx and httpcore.
    """
    headers = response.headers
    if headers.get("transfer-encoding", "").strip().lower() != "chunked":
        return None
    if headers.get("content-encoding", "identity").strip().lower() != "identity":
        return None
    if response.is_stream_consumed or response.is_closed:
        return None
    layer: Any = response.stream
    if type(layer) is not BoundSyncStream:
        return None
    for attribute, kind in _LAYERS:
        layer = getattr(layer, attribute, None)
        if type(layer) is not kind:
            return None
    connection: HTTP11Connection = layer
    state = getattr(connection, "_h11_state", None)
    reader = getattr(state, "_reader", None)
    if (
        type(state) is not h11.Connection
        or state.their_state is not h11.SEND_BODY
        or type(reader) is not ChunkedReader
        or reader._bytes_in_chunk
        or reader._bytes_to_discard
        or reader._reading_trailer
    ):
        return None
    return connection


def iter_sse(source: EventSource) -> Iterator[ServerSentEvent]:
    """The events of ``source``'s response, as ``source.iter_sse()`` yields them.

    The caller checks the content type first (``iter_sse()`` does it here).
    """
    response = source.response
    connection = chunked_connection(response)
    if connection is None:
        yield from source.iter_sse()
        return
    response.is_stream_consumed = True
    with request_context(request=response.request), map_httpcore_exceptions():
        yield from _ChunkedEvents(response, connection)
    response.close()


class _ChunkedEvents:
    """One chunked body's events, read from its connection's network stream."""

    def __init__(self, response: httpx.Response, connection: HTTP11Connection) -> None:
        self._connection = connection
        self._state: h11.Connection = connection._h11_state
        timeouts: dict[str, Any] = response.request.extensions.get("timeout", {})
        self._timeout: float | None = timeouts.get("read")
        self._text = codecs.getincrementaldecoder(response.encoding or "utf-8")(errors="replace")
        self._lines = SSELineDecoder()
        self._events = SSEDecoder()

    def _read(self) -> bytes:
        return self._connection._network_stream.read(
            HTTP11Connection.READ_NUM_BYTES, timeout=self._timeout
        )

    def __iter__(self) -> Iterator[ServerSentEvent]:
        # What h11 read past the headers is the start of the body: it is read from here on.
        buf, _ = self._state.trailing_data
        self._state._receive_buffer._extract(len(buf))
        pos = 0  # where the unread part of buf starts
        left = 0  # data bytes of the current chunk still to come
        footer = b""  # what is still to come of the current chunk's CRLF
        text, lines, event_of = self._text.decode, self._lines.decode, self._events.decode
        while True:
            if left:
                if pos < len(buf):
                    data = buf[pos : pos + left]
                    pos += len(data)
                    left -= len(data)
                    if not left:
                        footer = b"\r\n"
                    # _sse() inlined: one generator less per chunk.
                    if chars := text(data):
                        for line in lines(chars):
                            if (sse := event_of(line.rstrip("\n"))) is not None:
                                yield sse
                    continue
            elif footer:
                if pos < len(buf):
                    # Matched as it comes, as h11 does: a wrong byte fails at once.
                    got = buf[pos : pos + len(footer)]
                    if got != footer[: len(got)]:
                        raise httpx.RemoteProtocolError(
                            f"malformed chunk footer: {bytearray(got)!r} (expected {footer!r})"
                        )
                    pos += len(got)
                    footer = footer[len(got) :]
                    continue
            else:
                end = buf.find(b"\r\n", pos)
                if end >= 0:
                    match = _CHUNK_HEADER.fullmatch(buf, pos, end + 2)
                    if match is None:
                        raise httpx.RemoteProtocolError(
                            f"illegal chunk header: {bytearray(buf[pos : end + 2])!r}"
                        )
                    left = int(match[1], 16)
                    if not left:
                        yield from self._finish(buf[pos:])
                        return
                    pos = end + 2
                    continue
                if len(buf) - pos > HTTP11Connection.MAX_INCOMPLETE_EVENT_SIZE:
                    raise httpx.RemoteProtocolError("Receive buffer too long")
            data = self._read()
            if not data:
                # h11's two messages: nothing of the next part had come, or some of it.
                if pos < len(buf):
                    raise httpx.RemoteProtocolError("peer unexpectedly closed connection")
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    "(incomplete chunked read)"
                )
            buf = buf[pos:] + data if pos < len(buf) else data
            pos = 0

    def _sse(self, lines: list[str]) -> Iterator[ServerSentEvent]:
        for line in lines:
            sse = self._events.decode(line.rstrip("\n"))
            if sse is not None:
                yield sse

    def _finish(self, rest: bytes) -> Iterator[ServerSentEvent]:
        """The last chunk: h11 reads the trailer, then the last line, if unfinished."""
        state = self._state
        state.receive_data(rest)
        try:
            while (event := state.next_event()) is h11.NEED_DATA:
                state.receive_data(self._read())
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        if type(event) is not h11.EndOfMessage:
            raise httpx.RemoteProtocolError(f"unexpected event after the last chunk: {event!r}")
        # The text decoder is not flushed: what it holds is an unfinished character, which
        # could only end a line that no blank line follows, and such a line dispatches nothing.
        yield from self._sse(self._lines.flush())
