"""What the mock upstream does for a request: scenarios are data.

A scenario is an ordered list of steps for one model name; each request for that model
takes the next step, and the last step repeats (unless ``repeat_last`` is off, when the
default reply follows). Steps are frozen values, so tests, the demo's scenario file and
the admin endpoint all speak the same language: ``step_from_dict`` reads
``{"type": "status", "code": 503, "retry_after": "2"}`` and friends.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Reply:
    """A normal stream. ``text`` None: a plausible answer made from the prompt."""

    text: str | None = None
    chunk_words: int = 1
    delay_s: float = 0.0
    finish: str = "stop"
    tool_calls: tuple[Mapping[str, str], ...] = ()
    usage: bool = True
    hold_after_end_s: float = 0.0
    """Keep the body open this long after the end marker before finishing it."""


@dataclass(frozen=True, slots=True)
class Status:
    """An error status with a dialect-correct body (or ``body``/``content_type`` as given)."""

    code: int
    retry_after: str | None = None
    message: str | None = None
    error_code: str | None = None
    body: str | None = None
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Stall:
    """Hang before the headers, or after the headers before the first token."""

    seconds: float
    before: Literal["headers", "first_token"] = "headers"


@dataclass(frozen=True, slots=True)
class Idle:
    """Send ``after_chunks`` deltas, then go quiet for ``seconds``, then finish."""

    after_chunks: int
    seconds: float


@dataclass(frozen=True, slots=True)
class Cut:
    """Drop the connection after ``after_chunks`` deltas (an incomplete chunked body)."""

    after_chunks: int


@dataclass(frozen=True, slots=True)
class NoEndMarker:
    """Send ``after_chunks`` deltas (all of them when None), then close cleanly."""

    after_chunks: int | None = None


@dataclass(frozen=True, slots=True)
class StreamError:
    """A 200 stream that carries an error event after ``after_chunks`` deltas."""

    after_chunks: int = 0
    error_code: str = "server_error"
    message: str = "The server had an error while processing your request."


@dataclass(frozen=True, slots=True)
class Garbage:
    """Malformed SSE data after ``after_chunks`` deltas."""

    after_chunks: int = 0


@dataclass(frozen=True, slots=True)
class WrongContentType:
    """A 200 that is not an event stream (``text/plain``)."""


@dataclass(frozen=True, slots=True)
class ErrorBody200:
    """A 200 whose JSON body is an error object."""

    error_code: str = "server_error"
    message: str = "The server had an error while processing your request."


Step = (
    Reply
    | Status
    | Stall
    | Idle
    | Cut
    | NoEndMarker
    | StreamError
    | Garbage
    | WrongContentType
    | ErrorBody200
)

_TYPES: dict[str, type[Any]] = {
    "reply": Reply,
    "status": Status,
    "stall": Stall,
    "idle": Idle,
    "cut": Cut,
    "no_end_marker": NoEndMarker,
    "stream_error": StreamError,
    "garbage": Garbage,
    "wrong_content_type": WrongContentType,
    "error_body_200": ErrorBody200,
}


@dataclass(frozen=True, slots=True)
class Scenario:
    steps: tuple[Step, ...]
    repeat_last: bool = True


def step_from_dict(data: Mapping[str, Any]) -> Step:
    """Read one step from its dict form.

    Raises:
        ValueError: unknown ``type`` or fields.
    """
    kind = data.get("type")
    cls = _TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown step type {kind!r} (known: {', '.join(_TYPES)})")
    allowed = {f.name for f in fields(cls)}
    args = {k: v for k, v in data.items() if k != "type"}
    unknown = set(args) - allowed
    if unknown:
        raise ValueError(f"step {kind!r} has no field(s) {', '.join(sorted(unknown))}")
    if "tool_calls" in args:
        args["tool_calls"] = tuple(args["tool_calls"])
    if "retry_after" in args and args["retry_after"] is not None:
        args["retry_after"] = str(args["retry_after"])
    step: Step = cls(**args)
    return step


def scenario_from_dict(data: Mapping[str, Any] | list[Any]) -> Scenario:
    """A scenario from ``[steps…]`` or ``{"steps": [...], "repeat_last": bool}``."""
    if isinstance(data, list):
        return Scenario(tuple(step_from_dict(s) for s in data))
    steps = data.get("steps", [])
    return Scenario(
        tuple(step_from_dict(s) for s in steps), repeat_last=bool(data.get("repeat_last", True))
    )
