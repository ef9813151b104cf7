"""mockllm's Anthropic and Gemini writers checked against the same golden transcripts.

The fake must not drift from the real formats: every event the mock writes must be an
event kind the goldens show, with no field and no JSON type the goldens lack, and what the
mock streams for a scripted reply must parse (through the real adapter) to that reply.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pytest

from tests.wire import (
    DATA,
    assert_subshape,
    golden_names,
    model_ref,
    replay,
    sse_events,
    transcript,
)
from worker.errors import FatalError, RateLimited, RetryableError
from worker.mockllm.anthropic import AnthropicDialect
from worker.mockllm.dialect import Frame
from worker.mockllm.gemini import GeminiDialect
from worker.mockllm.scenarios import Reply
from worker.mockllm.server import split_chunks
from worker.providers.anthropic import AnthropicProvider
from worker.providers.gemini import GeminiProvider

BODY = {"messages": [{"role": "user", "content": "Hello"}], "stream": True}
CALLS = (
    {
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    },
    {"id": "toolu_01CLZ3mUmR5tsdqbHkSf1XKq", "name": "get_time", "arguments": "{}"},
)
REPLIES = {
    "text": Reply(text="Bonjour — it is 21°C in Paris.", chunk_words=2),
    "tools": Reply(text="Checking both for you.", tool_calls=CALLS),
    "length": Reply(text="Once upon a", finish="length"),
    "filtered": Reply(text="Here is how you", finish="content_filter"),
    "no-usage": Reply(text="Hi there.", usage=False),
}


def _anthropic_key(event: str, payload: dict[str, Any]) -> str:
    inner = payload.get("delta") or payload.get("content_block") or {}
    kind = inner.get("type") if isinstance(inner, dict) else None
    return f"{event}/{kind}" if kind else event


def _gemini_key(payload: dict[str, Any]) -> str:
    if "error" in payload:
        return "error"
    if "promptFeedback" in payload:
        return "blocked"
    candidate = payload["candidates"][0]
    if "finishReason" in candidate:
        return "finish"
    parts = candidate["content"]["parts"]
    return "function_call" if any("functionCall" in p for p in parts) else "text"


def _golden_index(provider: str) -> dict[str, list[Any]]:
    index: dict[str, list[Any]] = defaultdict(list)
    for name in golden_names(provider):
        for event, data in sse_events(transcript(provider, name)):
            payload = json.loads(data)
            key = (
                _anthropic_key(event, payload) if provider == "anthropic" else _gemini_key(payload)
            )
            index[key].append(payload)
    return index


def _assert_like_goldens(provider: str, frames: list[Frame]) -> None:
    index = _golden_index(provider)
    for event, data in sse_events(b"".join(f.data for f in frames)):
        payload = json.loads(data)
        key = _anthropic_key(event, payload) if provider == "anthropic" else _gemini_key(payload)
        assert key in index, f"the mock sends {key!r}, which no golden transcript shows"
        problems = []
        for golden in index[key]:
            try:
                assert_subshape(payload, golden)
                break
            except AssertionError as exc:
                problems.append(str(exc))
        else:
            pytest.fail(f"{key}: the mock's event differs from every golden one: {problems}")


DIALECTS = {
    "anthropic": (AnthropicDialect(), AnthropicProvider),
    "gemini": (GeminiDialect(), GeminiProvider),
}


def _frames(provider: str, reply: Reply) -> list[Frame]:
    dialect, _ = DIALECTS[provider]
    chunks = split_chunks(reply.text or "", reply.chunk_words) if reply.text else []
    return dialect.frames(reply, chunks, "mock-model", 3, BODY)


def _result(provider: str, data: bytes) -> dict[str, Any]:
    """A replayed stream coalesced: the text, the assembled calls, the finish, the error."""
    _, factory = DIALECTS[provider]
    out = replay(factory, data, model=model_ref(provider))
    calls: dict[int, dict[str, Any]] = {}
    for d in out.deltas:
        if d.tool_call is not None:
            call = calls.setdefault(d.tool_call.index, {"name": None, "arguments": ""})
            call["name"] = call["name"] or d.tool_call.name
            call["arguments"] += d.tool_call.arguments
    finishes = [d.finish_reason for d in out.deltas if d.finish_reason]
    return {
        "text": "".join(d.text for d in out.deltas if d.text),
        "calls": [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())],
        "finish": finishes[-1] if finishes else None,
        "done": any(d.done for d in out.deltas),
        "usage": any(d.usage for d in out.deltas),
        "error": type(out.error).__name__ if out.error else None,
    }


@pytest.mark.parametrize("provider", DIALECTS)
@pytest.mark.parametrize("reply", REPLIES)
def test_mock_stream_events_match_golden_shapes(provider: str, reply: str) -> None:
    """Every event the mock streams is a kind the goldens show, with no invented fields."""
    frames = _frames(provider, REPLIES[reply])

    _assert_like_goldens(provider, frames)


@pytest.mark.parametrize("provider", DIALECTS)
@pytest.mark.parametrize("reply", REPLIES)
def test_mock_stream_parses_to_the_scripted_reply(provider: str, reply: str) -> None:
    """The adapter reads from the mock's stream exactly the text, calls and finish scripted."""
    scripted = REPLIES[reply]
    finish = "tool_calls" if scripted.tool_calls else scripted.finish

    result = _result(provider, b"".join(f.data for f in _frames(provider, scripted)))

    assert result == {
        "text": scripted.text,
        "calls": [(c["name"], json.loads(c["arguments"])) for c in scripted.tool_calls],
        "finish": finish,
        "done": True,
        "usage": scripted.usage,
        "error": None,
    }


@pytest.mark.parametrize(
    ("provider", "golden", "reply"),
    [
        ("anthropic", "text", REPLIES["text"]),
        ("anthropic", "max_tokens", REPLIES["length"]),
        ("anthropic", "refusal", Reply(text="I can't help with that.", finish="content_filter")),
        ("gemini", "max_tokens", Reply(text="Once upon a time", finish="length")),
        ("gemini", "safety", REPLIES["filtered"]),
    ],
)
def test_mock_means_what_the_golden_means(provider: str, golden: str, reply: Reply) -> None:
    """The mock scripted like a golden transcript parses to the same text and finish."""
    from_golden = _result(provider, transcript(provider, golden))

    from_mock = _result(provider, b"".join(f.data for f in _frames(provider, reply)))

    assert from_mock == from_golden


def test_mock_anthropic_tool_stream_means_what_the_golden_means() -> None:
    """Scripted with the golden's text and calls, the mock's tool-use stream parses the same."""
    reply = Reply(text="Let me check the weather and the time.", chunk_words=100, tool_calls=CALLS)
    golden = _result("anthropic", transcript("anthropic", "tool_use"))

    mock = _result("anthropic", b"".join(f.data for f in _frames("anthropic", reply)))

    assert {**mock, "calls": [c[0] for c in mock["calls"]]} == {
        **golden,
        "calls": [c[0] for c in golden["calls"]],
    }


def test_mock_gemini_prompt_block_matches_golden() -> None:
    """``finish="prompt_blocked"`` streams Gemini's blocked-prompt event, as the golden does."""
    reply = Reply(finish="prompt_blocked:PROHIBITED_CONTENT")
    frames = _frames("gemini", reply)

    _assert_like_goldens("gemini", frames)
    assert [f.end_marker for f in frames] == [True]
    assert _result("gemini", b"".join(f.data for f in frames)) == _result(
        "gemini", transcript("gemini", "prompt_blocked")
    )


@pytest.mark.parametrize(
    ("provider", "code", "kind"),
    [
        ("anthropic", "overloaded_error", RetryableError),
        ("anthropic", "server_error", RetryableError),
        ("anthropic", "rate_limit_error", RateLimited),
        ("gemini", "overloaded_error", RetryableError),
        ("gemini", "server_error", RetryableError),
        ("gemini", "RESOURCE_EXHAUSTED", RateLimited),
    ],
)
def test_mock_stream_error_matches_golden_and_classifies(
    provider: str, code: str, kind: type
) -> None:
    """The mock's in-stream error has the golden error event's shape and its classification."""
    dialect, _ = DIALECTS[provider]
    frames = _frames(provider, Reply(text="Half an ans"))
    cut = [f for f in frames if not f.end_marker][:-1]
    error = Frame(dialect.stream_error(code, "Something went wrong."))

    _assert_like_goldens(provider, [error])
    result = _result(provider, b"".join(f.data for f in [*cut, error]))

    assert result["error"] == kind.__name__


@pytest.mark.parametrize("provider", DIALECTS)
def test_mock_garbage_is_malformed_for_the_adapter(provider: str) -> None:
    """The mock's garbage frame is a protocol violation to the adapter (fatal)."""
    dialect, _ = DIALECTS[provider]

    result = _result(provider, dialect.garbage())

    assert result["error"] == FatalError.__name__


@pytest.mark.parametrize(
    ("provider", "golden"),
    [("anthropic", "error_429.json"), ("gemini", "error_429.json")],
)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 429, 500, 503, 529])
def test_mock_error_bodies_have_the_documented_shape(
    provider: str, golden: str, status: int
) -> None:
    """The mock's error bodies carry only fields the documented error body has."""
    dialect, _ = DIALECTS[provider]
    documented = json.loads((DATA / provider / golden).read_text("utf-8"))

    body = dialect.error_body(status, None, None)

    assert_subshape(body, documented)
