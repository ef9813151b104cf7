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
httpcore's HTTP/1.1 connection) is read as ``iter_sse()`` reads it: the same decoders over
``response.iter_text()``. It reads private attributes of httpx, httpcore and h11:
``pyproject.toml`` pins the releases it was written for.

Both paths bound what an upstream can make the worker hold, which ``iter_sse()`` does
not: a line, or an event (its lines up to the blank line that ends it, comments aside),
over ``max_event_bytes`` of UTF-8 fails with :class:`~worker.errors.FatalError` as soon
as it is over, so no more of it is held than the limit and one read (for a compressed
body, one read decompressed).

Other errors are httpx's, as from ``iter_sse()`` (type, message, request): a broken
stream or a malformed chunk is ``httpx.RemoteProtocolError``, a read timeout
``httpx.ReadTimeout``; the guard's own errors (cancel, deadline, budgets) pass through.
Unlike ``iter_raw()`` it does not count ``response.num_bytes_downloaded``.
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

from worker.errors import FatalError

MAX_EVENT_BYTES = 1_000_000
"""The default limit on a line or an event (``RELIEVER_MAX_SSE_EVENT_BYTES``)."""

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


def utf8_size(text: str) -> int:
    """The length of ``text`` in UTF-8 (no copy for ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def iter_sse(
    source: EventSource, *, max_event_bytes: int = MAX_EVENT_BYTES
) -> Iterator[ServerSentEvent]:
    """The events of ``source``'s response, as ``source.iter_sse()`` yields them.

    The caller checks the content type first.

    Raises:
        FatalError: a line or an event is over ``max_event_bytes``.
    """
    response = source.response
    decoder = _Decoder(max_event_bytes)
    connection = chunked_connection(response)
    if connection is None:
        yield from _text_events(response, decoder)
        return
    response.is_stream_consumed = True
    with request_context(request=response.request), map_httpcore_exceptions():
        yield from _ChunkedEvents(response, connection, decoder)
    response.close()


class _Decoder:
    """httpx-sse's line and event decoders, with a limit on a line and on an event.

    The line decoder holds an unfinished line as the pieces it came in; their size is
    added up as they come, so a line fails once it is over the limit, never held whole.
    An event's lines (comments aside, which are not kept) add up until the blank line
    that ends it.
    """

    def __init__(self, max_bytes: int) -> None:
        self._lines = SSELineDecoder()
        self._events = SSEDecoder()
        self._max = max_bytes
        self._held = 0  # UTF-8 bytes of the unfinished line the line decoder holds
        self._event = 0  # UTF-8 bytes of the current event's lines

    def _too_large(self) -> FatalError:
        return FatalError(f"the event stream sent a line or an event over {self._max} bytes")

    def lines(self, text: str) -> list[str]:
        decoder = self._lines
        pieces = len(decoder.buffer)
        lines = decoder.decode(text)
        if lines:
            self._held = sum(map(utf8_size, decoder.buffer))
        elif len(decoder.buffer) > pieces:
            self._held += utf8_size(decoder.buffer[-1])
        if self._held > self._max:
            raise self._too_large()
        return lines

    def flush(self) -> list[str]:
        return self._lines.flush()

    def event(self, line: str) -> ServerSentEvent | None:
        """The event ``line`` (without its line end) completes, if any."""
        if not line:
            self._event = 0
        elif line[0] != ":":
            # utf8_size inlined: this runs for every line of every stream.
            self._event += len(line) if line.isascii() else len(line.encode())
            if self._event > self._max:
                raise self._too_large()
        return self._events.decode(line)


def _text_events(response: httpx.Response, decoder: _Decoder) -> Iterator[ServerSentEvent]:
    """httpx-sse's ``iter_sse()`` over httpx's text iterator, with ``decoder``'s limits."""
    for text in response.iter_text():
        for line in decoder.lines(text):
            if (sse := decoder.event(line.rstrip("\n"))) is not None:
                yield sse
    for line in decoder.flush():
        if (sse := decoder.event(line.rstrip("\n"))) is not None:
            yield sse


class _ChunkedEvents:
    """One chunked body's events, read from its connection's network stream."""

    def __init__(
        self, response: httpx.Response, connection: HTTP11Connection, decoder: _Decoder
    ) -> None:
        self._connection = connection
        self._state: h11.Connection = connection._h11_state
        timeouts: dict[str, Any] = response.request.extensions.get("timeout", {})
        self._timeout: float | None = timeouts.get("read")
        self._text = codecs.getincrementaldecoder(response.encoding or "utf-8")(errors="replace")
        self._decoder = decoder

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
        text, lines, event_of = self._text.decode, self._decoder.lines, self._decoder.event
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
            sse = self._decoder.event(line.rstrip("\n"))
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
        yield from self._sse(self._decoder.flush())
