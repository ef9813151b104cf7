"""The job's event stream: the design's event table, and the sinks events go to.

Every event is one JSON object with ``job_id``, ``seq`` (1, 2, 3 … per job, no gaps, no
repeats), ``type`` and ``ts`` (epoch seconds), plus the fields of its type:

=============  ==============================================================================
type           fields
=============  ==============================================================================
started        agent, chain, start_model, in_cooldown
attempt        n, model, attempt, max_attempts, fallback
delta          n, text; or n, tool_call {index, id, name, arguments}
retry          n, model, delay_s, error, discard
fallback       from, to, reason, error, discard
restarted      discard
completed      model, text, tool_calls, finish_reason, usage, attempts, fallback_used, duration_s
failed         error, attempts
=============  ==============================================================================

The executor builds the type-specific part; a sink stamps ``job_id``, ``seq`` and ``ts``
and delivers. ``completed`` and ``failed`` are terminal: exactly one ends every job.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol, TextIO

from worker.clock import Clock

Event = dict[str, Any]
TERMINAL_TYPES = frozenset({"completed", "failed"})


def stamp(job_id: str, seq: int, ts: float, body: Event) -> Event:
    """The full event: the common fields first, then the type's own."""
    return {"job_id": job_id, "seq": seq, "type": body["type"], "ts": round(ts, 6), **body}


_RESULT_LAST = ("text", "tool_calls", "attempts")


def result_of(terminal: Event) -> Event:
    """A job's result from its terminal event: ``job_id``, ``status``, then its fields.

    The long fields come last, so a shortened repr (Flower's) shows the outcome first.
    """
    skip = ("job_id", "seq", "ts", "type", *_RESULT_LAST)
    body: Event = {"job_id": terminal["job_id"], "status": terminal["type"]}
    body.update((k, v) for k, v in terminal.items() if k not in skip)
    body.update((k, terminal[k]) for k in _RESULT_LAST if k in terminal)
    return body


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_string = json.encoder.encode_basestring
"""The string encoder ``_ENCODER`` uses for every string (``ensure_ascii=False``)."""
_DELTA_FIELDS = ("job_id", "seq", "type", "ts", "n", "text")


def encode(event: Event) -> str:
    """The event as compact JSON (one encoder for the process: no set-up per event).

    A text delta, most of every stream, is formatted directly (a third of the encoder's
    time) when its fields are those :func:`stamp` gives it, in that order, with the
    encoder's own string escaping and number formats: the same text the encoder writes.
    """
    if event["type"] == "delta" and tuple(event) == _DELTA_FIELDS:
        job_id, seq, ts = event["job_id"], event["seq"], event["ts"]
        n, text = event["n"], event["text"]
        if (
            type(job_id) is str
            and type(seq) is int
            and type(ts) is float
            and math.isfinite(ts)
            and type(n) is int
            and type(text) is str
        ):
            return (
                f'{{"job_id":{_string(job_id)},"seq":{seq},"type":"delta",'
                f'"ts":{ts!r},"n":{n},"text":{_string(text)}}}'
            )
    return _ENCODER.encode(event)


class EventSink(Protocol):
    """Where one job's events go, in order."""

    def emit(self, body: Event) -> Event:
        """Stamp and deliver one event; returns it as delivered."""

    def close(self) -> None:
        """Deliver anything still buffered."""


class CountingEventSink:
    """A sink that numbers events itself (one process owns the job's whole stream).

    Subclasses deliver in :meth:`write`; this base delivers nowhere (a no-op sink).
    """

    def __init__(self, job_id: str, clock: Clock, *, first_seq: int = 1) -> None:
        self.job_id = job_id
        self._clock = clock
        self._next = first_seq

    def emit(self, body: Event) -> Event:
        event = stamp(self.job_id, self._next, self._clock.time(), body)
        self._next += 1
        self.write(event)
        return event

    def write(self, event: Event) -> None:
        """Deliver one stamped event."""

    def close(self) -> None:
        """Nothing is buffered."""


class MemoryEventSink(CountingEventSink):
    """Keeps every event in ``events``."""

    def __init__(self, job_id: str, clock: Clock) -> None:
        super().__init__(job_id, clock)
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)


class JsonLinesEventSink(CountingEventSink):
    """Writes each event as one JSON line (``python -m worker run``)."""

    def __init__(self, job_id: str, clock: Clock, out: TextIO) -> None:
        super().__init__(job_id, clock)
        self._out = out

    def write(self, event: Event) -> None:
        self._out.write(encode(event) + "\n")
        self._out.flush()
