"""What a provider dialect of the mock upstream provides, and SSE framing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from worker.mockllm.scenarios import Reply


@dataclass(frozen=True, slots=True)
class Frame:
    """One SSE frame; ``delta`` frames are the ones faults count (``after_chunks``)."""

    data: bytes
    delta: bool = False
    end_marker: bool = False


def sse(data: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + f"data: {data}\n\n").encode()


class Dialect(Protocol):
    name: str
    content_type: str

    def matches(self, path: str) -> bool:
        """Whether this dialect serves ``path``."""

    def model(self, path: str, body: Mapping[str, Any]) -> str:
        """The model the request names (scenarios are chosen by it)."""

    def wants_stream(self, path: str, body: Mapping[str, Any]) -> bool: ...

    def prompt_text(self, body: Mapping[str, Any]) -> str: ...

    def frames(
        self,
        reply: Reply,
        chunks: list[str],
        model: str,
        prompt_tokens: int,
        body: Mapping[str, Any],
    ) -> list[Frame]:
        """The whole stream of a normal reply, end marker included."""

    def whole(self, reply: Reply, text: str, model: str, prompt_tokens: int) -> dict[str, Any]:
        """The non-streaming response body."""

    def error_body(self, status: int, message: str | None, error_code: str | None) -> Any:
        """The JSON error body this provider sends with ``status``."""

    def stream_error(self, error_code: str, message: str) -> bytes:
        """An error event inside a 200 stream."""

    def garbage(self) -> bytes:
        """A malformed frame."""
