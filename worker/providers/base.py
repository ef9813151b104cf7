"""What every provider adapter takes and yields, and the one seam for transport errors.

An adapter turns a :class:`ProviderRequest` into the provider's HTTP request, streams the
answer, and yields provider-neutral :class:`Delta` values. It never lets an ``httpx``
exception escape: :func:`translated` turns them into :class:`~worker.errors.ProviderError`
subclasses, most specific first, and :func:`open_stream` classifies a response that is
not a stream (an error status, a 200 whose body is an error, a wrong content type).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import httpx
from httpx_sse import EventSource, ServerSentEvent

from worker.agents import ModelRef
from worker.classify import ErrorBody, classify_response, decode_body, parse_error_body, scrub
from worker.clock import Clock
from worker.errors import FatalError, ProviderError, ProviderTimeout, RetryableError
from worker.guard import current_guard
from worker.sse import MAX_EVENT_BYTES, iter_sse

ERROR_BODY_MAX_BYTES = 64 * 1024
DRAIN_GRACE_S = 1.0
"""How long the rest of a body may take after its end marker before the connection is dropped."""


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """The provider-neutral request: the design's job fields an adapter translates."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolCallPiece:
    """A piece of a streamed tool call; pieces with the same ``index`` join up."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_event(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "name": self.name, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }


@dataclass(frozen=True, slots=True)
class Delta:
    """One thing an adapter yields: text, a tool-call piece, the finish reason or usage.

    The stream is complete only after a delta with ``done=True`` (the provider's end
    marker); a stream that stops without one is broken.
    """

    text: str | None = None
    tool_call: ToolCallPiece | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    done: bool = False


class Provider(Protocol):
    """A provider adapter: one instance per process, shared by every thread."""

    def stream(self, model: ModelRef, request: ProviderRequest) -> Iterator[Delta]:
        """Call ``model`` and yield its answer as deltas.

        Raises:
            ProviderError: the attempt failed; the subclass says how.
            ConfigError: the model's API key variable is not set.
        """


@contextmanager
def translated(secrets: tuple[str, ...] = ()) -> Iterator[None]:
    """Turn ``httpx`` exceptions into :class:`ProviderError` subclasses.

    The mapping, most specific first: connect and read timeouts are
    :class:`ProviderTimeout`; connect errors and a stream cut short (``ReadError``,
    ``RemoteProtocolError``, a malformed chunk) are :class:`RetryableError`. (A response
    that is not an event stream never gets this far: :func:`open_stream` classifies it.)
    Messages come from the exception type, never from its text, so no address, port or
    URL is read as a status.
    """
    try:
        yield
    except httpx.ConnectTimeout:
        raise ProviderTimeout("connect timeout") from None
    except httpx.ReadTimeout:
        raise ProviderTimeout("read timeout") from None
    except httpx.WriteTimeout:
        raise ProviderTimeout("write timeout") from None
    except httpx.ConnectError as exc:
        raise RetryableError(f"connect error: {scrub(str(exc), secrets)}") from None
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        raise RetryableError(f"the stream broke: {scrub(str(exc), secrets)}") from None


def request_content(body: Mapping[str, Any]) -> bytes:
    """``body`` as the bytes ``httpx`` sends for ``json=body`` (compact UTF-8 JSON).

    Raises:
        FatalError: the body cannot be encoded. Its message names the exception's class
            only: a ``UnicodeEncodeError`` carries the whole text it failed on, which is
            the request, prompt included, and would print it wherever it was logged.
    """
    try:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return text.encode("utf-8")
    except (ValueError, TypeError, RecursionError) as exc:
        raise FatalError(f"the request cannot be encoded as JSON ({type(exc).__name__})") from None


@contextmanager
def open_stream(
    client: httpx.Client,
    url: str,
    *,
    headers: Mapping[str, str],
    body: Mapping[str, Any],
    model: ModelRef,
    secrets: tuple[str, ...],
    clock: Clock,
) -> Iterator[EventSource]:
    """POST ``body`` and yield the response as an SSE source once it is known to be one.

    A non-2xx status, or a 2xx that is not ``text/event-stream`` (such as a 200 whose
    JSON body is an error), is read (bounded) and classified; the response is closed on
    every path.

    Raises:
        FatalError: the body cannot be encoded (:func:`request_content`).
        ProviderError: the answer is an error (classified).
    """
    content = request_content(body)
    timeouts = model.timeouts
    timeout = httpx.Timeout(
        connect=timeouts.connect,
        read=max(timeouts.first_token, timeouts.idle),
        write=timeouts.connect,
        pool=timeouts.connect,
    )
    with (
        translated(secrets),
        client.stream(
            "POST",
            url,
            headers={
                "accept": "text/event-stream",
                "content-type": "application/json",
                **headers,
            },
            content=content,
            timeout=timeout,
        ) as response,
    ):
        media_type = response.headers.get("content-type", "").partition(";")[0]
        if not (200 <= response.status_code < 300) or "text/event-stream" not in media_type:
            raise _error_from(response, secrets, clock.time())
        yield EventSource(response)


def _error_from(response: httpx.Response, secrets: tuple[str, ...], now_s: float) -> ProviderError:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= ERROR_BODY_MAX_BYTES:
            break
    body = b"".join(chunks)[:ERROR_BODY_MAX_BYTES]
    status = response.status_code
    if 200 <= status < 300 and parse_error_body(decode_body(body)) == ErrorBody():
        content_type = response.headers.get("content-type", "no content type")
        return FatalError(
            f"HTTP {status}: expected an event stream, got {scrub(content_type)!r}", status=status
        )
    return classify_response(status, response.headers, body, now_s=now_s, secrets=secrets)


def until_end_marker(
    source: EventSource,
    feed: Callable[[ServerSentEvent], Iterable[Delta]],
    *,
    secrets: tuple[str, ...],
    end_marker: str,
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> Iterator[Delta]:
    """Yield the deltas ``feed`` makes of each event, up to the provider's end marker.

    After the end marker (a delta with ``done``) the answer is whole: the rest of the body
    is read, for at most :data:`DRAIN_GRACE_S`, so the connection can go back to the
    pool; a break or a stall in that time only costs the connection, never the attempt.

    Raises:
        RetryableError: the stream ended without its end marker.
        FatalError: a line or an event is over ``max_event_bytes`` (before the end marker).
    """
    done = False
    with translated(secrets):
        try:
            for sse in iter_sse(source, max_event_bytes=max_event_bytes):
                if done:
                    continue
                for delta in feed(sse):
                    if delta.done and not done:
                        done = True
                        guard = current_guard()
                        if guard is not None:
                            guard.drain(DRAIN_GRACE_S)
                    yield delta
        except (httpx.TransportError, ProviderError):
            if not done:
                raise
    if not done:
        raise RetryableError(f"the stream ended without its end marker {end_marker}")


Feed = Callable[[ServerSentEvent], Iterable[Delta]]


@dataclass(frozen=True, slots=True)
class Call:
    """One provider request: where it goes, what it sends, and how to read its events."""

    url: str
    headers: Mapping[str, str]
    body: Mapping[str, Any]
    feed: Feed


class SSEProvider:
    """The shape every adapter shares: POST JSON, read the SSE answer to its end marker.

    A subclass says how to build the request and read its events (:meth:`prepare`) and
    names its end marker; the key handling, the error seam, the limit on an event
    (``max_event_bytes``) and the end of the stream are the same for all.
    """

    end_marker: ClassVar[str]

    def __init__(
        self, client: httpx.Client, clock: Clock, *, max_event_bytes: int = MAX_EVENT_BYTES
    ) -> None:
        self._client = client
        self._clock = clock
        self._max_event_bytes = max_event_bytes

    def prepare(self, model: ModelRef, request: ProviderRequest, key: str | None) -> Call:
        """The request for ``model`` (``key`` goes into a header, never into the URL)."""
        raise NotImplementedError

    def stream(self, model: ModelRef, request: ProviderRequest) -> Iterator[Delta]:
        key = model.api_key()
        secrets = (key,) if key else ()
        call = self.prepare(model, request, key)
        with open_stream(
            self._client,
            call.url,
            headers=call.headers,
            body=call.body,
            model=model,
            secrets=secrets,
            clock=self._clock,
        ) as source:
            yield from until_end_marker(
                source,
                call.feed,
                secrets=secrets,
                end_marker=self.end_marker,
                max_event_bytes=self._max_event_bytes,
            )
