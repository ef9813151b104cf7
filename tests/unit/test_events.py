"""Event encoding: the text-delta shortcut writes exactly what the JSON encoder writes."""

from __future__ import annotations

import json
import math

import pytest

from worker import events as events_module
from worker.events import Event, encode, stamp

pytestmark = pytest.mark.unit

JOB = "0b6f3c1e-7d8a-4f7e-9c2a-5d1e8f9a0b1c"
TEXTS = [
    "",
    "plain words ",
    'quotes " and \\ backslashes',
    "control \n \r \t \x00 \x1f characters",
    "non-ASCII: héllo, 日本語, emoji 🙂, line separator \u2028",
    "a lone surrogate \ud800 from a JSON escape",
    "</script> & <b>",
]
TIMES = [1795724088.683098, 0.1, 1e-7, 1e16, 1712345678.0, 1_700_001_000.5]


def reference(event: Event) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("ts", TIMES)
def test_encode_text_delta_matches_the_json_encoder(text: str, ts: float) -> None:
    """Escapes, non-ASCII, lone surrogates and float formats come out as json.dumps's."""
    event = stamp(JOB, 17, ts, {"type": "delta", "n": 3, "text": text})
    assert encode(event) == reference(event)


def test_encode_text_delta_does_not_use_the_json_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut is taken for a text delta as the executor and stamp() build it."""

    class Refuses:
        def encode(self, event: Event) -> str:
            raise AssertionError("the JSON encoder was used")

    monkeypatch.setattr(events_module, "_ENCODER", Refuses())
    event = stamp(JOB, 5, 1795724088.683098, {"type": "delta", "n": 1, "text": "hi"})
    assert json.loads(encode(event)) == event


@pytest.mark.parametrize(
    "event",
    [
        # A tool-call delta, an integer time, a time that is not finite, a bool for n, an
        # extra field, another field order: each goes through the encoder.
        stamp(JOB, 2, 1.5, {"type": "delta", "n": 1, "tool_call": {"index": 0, "id": "c"}}),
        {"job_id": JOB, "seq": 2, "type": "delta", "ts": 7, "n": 1, "text": "x"},
        {"job_id": JOB, "seq": 2, "type": "delta", "ts": math.inf, "n": 1, "text": "x"},
        {"job_id": JOB, "seq": 2, "type": "delta", "ts": 1.5, "n": True, "text": "x"},
        {"job_id": JOB, "seq": 2, "type": "delta", "ts": 1.5, "n": 1, "text": "x", "more": 1},
        {"job_id": JOB, "seq": 2, "type": "delta", "ts": 1.5, "text": "x", "n": 1},
        stamp(JOB, 9, 1.5, {"type": "completed", "text": "done", "usage": {"input_tokens": 1}}),
    ],
)
def test_encode_other_events_are_the_json_encoders(event: Event) -> None:
    """Any other shape, or the same fields in another order, is the encoder's output."""
    assert encode(event) == reference(event)
