"""The Anthropic adapter: request translation, the stream parser, and error mapping."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.wire import (
    DATA,
    expected,
    golden_names,
    model_ref,
    replay,
    split_at,
    transcript,
)
from worker.errors import (
    ContextOverflow,
    FatalError,
    ProviderError,
    RateLimited,
    RetryableError,
)
from worker.mockllm.anthropic import read_messages
from worker.providers.anthropic import (
    DEFAULT_MAX_TOKENS,
    AnthropicProvider,
    AnthropicStream,
    build_body,
    to_anthropic_messages,
)
from worker.providers.base import ProviderRequest

KEY = "sk-ant-api03-test-key-0123456789abcdef"
MODEL = model_ref("anthropic", model="claude-sonnet-4-5")
TOOL_TURN = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {"id": "call_abc123", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "call_def456", "name": "get_time", "arguments": ""},
        ],
    },
    {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c": 21}'},
    {"role": "tool", "tool_call_id": "call_def456", "content": "14:05"},
    {"role": "user", "content": "Thanks! And tomorrow?"},
]


def _sse(event: str, payload: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


def _with_key(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", KEY)
    return model_ref("anthropic", model="claude-sonnet-4-5", api_key_env="ANTHROPIC_TEST_KEY")


@pytest.mark.parametrize("name", golden_names("anthropic"))
def test_golden_transcript_parses_to_expected_deltas(name: str) -> None:
    """Each recorded Anthropic stream yields exactly the deltas (and error) written beside it."""
    result = replay(AnthropicProvider, transcript("anthropic", name), model=MODEL)

    assert result.summary() == expected("anthropic", name)


@pytest.mark.parametrize("name", golden_names("anthropic"))
@given(cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_golden_transcript_any_split_same_deltas(name: str, cuts: list[int]) -> None:
    """However the bytes of a stream are cut into reads, the deltas and the error are the same."""
    data = transcript("anthropic", name)

    result = replay(AnthropicProvider, split_at(data, cuts), model=MODEL)

    assert result.summary() == expected("anthropic", name)


_KNOWN_EVENTS = [
    "message_start",
    "content_block_start",
    "content_block_delta",
    "content_block_stop",
    "message_delta",
    "message_stop",
    "ping",
    "error",
]
_FIELDS = st.sampled_from(
    [
        *("type", "index", "delta", "content_block", "usage", "message", "error", "text"),
        *("partial_json", "stop_reason", "id", "name", "input", "output_tokens", "input_tokens"),
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_FIELDS, inner, max_size=4),
    max_leaves=12,
)
# Data lines: JSON of odd shapes, or any bytes at all (invalid UTF-8 included).
_DATA = st.one_of(
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)


@given(
    frames=st.lists(
        st.tuples(st.sampled_from(_KNOWN_EVENTS) | st.text("abc_", max_size=8), _DATA),
        max_size=8,
    )
)
def test_arbitrary_events_are_classified_never_crash(frames: list[tuple[str, bytes]]) -> None:
    """Malformed JSON, odd shapes and unknown events end in deltas or a ProviderError only."""
    body = b"".join(b"event: " + e.encode() + b"\ndata: " + d + b"\n\n" for e, d in frames)

    result = replay(AnthropicProvider, body, model=MODEL)

    done = any(d.done for d in result.deltas)
    assert done or isinstance(result.error, ProviderError)


def test_parser_malformed_json_is_fatal() -> None:
    """A data line that is not JSON is a protocol violation: fatal."""
    with pytest.raises(FatalError):
        AnthropicStream().feed(
            "content_block_delta", '{"type": "content_block_delta", "in', now_s=0
        )


def test_parser_events_named_only_in_type_field_are_understood() -> None:
    """A stream without ``event:`` lines is read from each payload's ``type``."""
    parser = AnthropicStream()

    deltas = parser.feed("message", '{"type": "message_stop"}', now_s=0)

    assert parser.done
    assert deltas[-1].done


def test_events_after_message_stop_are_drained_not_parsed() -> None:
    """Whatever follows message_stop (even an error event) is read and ignored."""
    body = (
        _sse("message_start", {"type": "message_start", "message": {"usage": {}}})
        + _sse("message_stop", {"type": "message_stop"})
        + _sse("error", {"type": "error", "error": {"type": "overloaded_error"}})
    )

    result = replay(AnthropicProvider, body, model=MODEL)

    assert result.error is None
    assert result.deltas[-1].done


@pytest.mark.parametrize(
    ("error_type", "message", "kind"),
    [
        ("overloaded_error", "Overloaded", RetryableError),
        ("api_error", "Internal server error", RetryableError),
        ("rate_limit_error", "Rate limited", RateLimited),
        (
            "invalid_request_error",
            "prompt is too long: 210012 tokens > 200000 maximum",
            ContextOverflow,
        ),
        ("a_new_error_type", "Something odd", RetryableError),
    ],
)
def test_in_stream_error_event_maps_to_kind(
    error_type: str, message: str, kind: type[ProviderError]
) -> None:
    """An ``event: error`` after deltas is classified by its error type, then its message."""
    body = transcript("anthropic", "no_message_stop") + _sse(
        "error", {"type": "error", "error": {"type": error_type, "message": message}}
    )

    result = replay(AnthropicProvider, body, model=MODEL)

    assert type(result.error) is kind
    assert result.error.status is None
    assert [d.text for d in result.deltas if d.text] == ["Half an ans"]


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "retry_after_s"),
    [
        (529, {"type": "overloaded_error", "message": "Overloaded"}, {}, RetryableError, None),
        (
            529,
            {"type": "overloaded_error", "message": "Overloaded"},
            {"retry-after": "3"},
            RetryableError,
            3.0,
        ),
        (
            429,
            {"type": "rate_limit_error", "message": "Number of request tokens has exceeded"},
            {"retry-after": "7"},
            RateLimited,
            7.0,
        ),
        (500, {"type": "api_error", "message": "Internal server error"}, {}, RetryableError, None),
        (
            400,
            {
                "type": "invalid_request_error",
                "message": "prompt is too long: 205000 tokens > 200000 maximum",
            },
            {},
            ContextOverflow,
            None,
        ),
        (
            400,
            {"type": "invalid_request_error", "message": "messages: roles must alternate"},
            {},
            FatalError,
            None,
        ),
        (
            401,
            {"type": "authentication_error", "message": "invalid x-api-key"},
            {},
            FatalError,
            None,
        ),
        (403, {"type": "permission_error", "message": "no access"}, {}, FatalError, None),
        (404, {"type": "not_found_error", "message": "model: claude-x"}, {}, FatalError, None),
        (
            413,
            {"type": "request_too_large", "message": "Request too large"},
            {},
            ContextOverflow,
            None,
        ),
    ],
)
def test_http_error_maps_to_kind(
    status: int,
    body: dict[str, str],
    headers: dict[str, str],
    kind: type[ProviderError],
    retry_after_s: float | None,
) -> None:
    """Anthropic's error responses land in the taxonomy by status, then error type, then text."""
    payload = {"type": "error", "error": body, "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy"}

    result = replay(
        AnthropicProvider,
        json.dumps(payload).encode(),
        model=MODEL,
        status=status,
        headers=headers,
        content_type="application/json",
    )

    assert type(result.error) is kind
    assert result.error.status == status
    assert result.error.retry_after_s == retry_after_s
    assert result.deltas == []


def test_golden_429_body_is_rate_limited() -> None:
    """The documented 429 body is a rate limit carrying its Retry-After."""
    body = (DATA / "anthropic" / "error_429.json").read_bytes()

    result = replay(
        AnthropicProvider,
        body,
        model=MODEL,
        status=429,
        headers={"retry-after": "12"},
        content_type="application/json",
    )

    assert isinstance(result.error, RateLimited)
    assert result.error.retry_after_s == 12.0
    assert result.error.provider_code == "rate_limit_error"


def test_request_url_and_headers_carry_key_in_header_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key goes in ``x-api-key`` with ``anthropic-version``; never in the URL."""
    model = _with_key(monkeypatch)

    result = replay(AnthropicProvider, transcript("anthropic", "text"), model=model)

    sent = result.requests[0]
    assert str(sent.url) == "http://127.0.0.1:9/v1/messages"
    assert sent.headers["x-api-key"] == KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert KEY not in str(sent.url)


def test_base_url_ending_in_v1_is_not_doubled() -> None:
    """``base_url: …/v1`` and ``base_url: …`` both reach ``/v1/messages``."""
    model = model_ref("anthropic", base_url="http://127.0.0.1:9/v1")

    result = replay(AnthropicProvider, transcript("anthropic", "text"), model=model)

    assert str(result.requests[0].url) == "http://127.0.0.1:9/v1/messages"


def test_error_echoing_the_key_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream message that quotes the key never carries it into our error."""
    model = _with_key(monkeypatch)
    payload = {
        "type": "error",
        "error": {"type": "authentication_error", "message": f"invalid x-api-key {KEY}"},
    }

    result = replay(
        AnthropicProvider,
        json.dumps(payload).encode(),
        model=model,
        status=401,
        content_type="application/json",
    )

    assert isinstance(result.error, FatalError)
    assert KEY not in result.error.message
    assert KEY not in json.dumps(result.error.info())
    assert KEY not in repr(result.error)


def test_body_system_top_level_tools_and_params() -> None:
    """System goes top level, tools become input_schema, params are renamed, seed is dropped."""
    request = ProviderRequest(
        messages=TOOL_TURN,
        tools=[
            {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
            {"name": "get_time", "description": "", "parameters": {}},
        ],
        params={"max_tokens": 300, "temperature": 0.2, "top_p": 0.9, "stop": "END", "seed": 7},
    )

    body = build_body(MODEL, request)

    assert body["model"] == "claude-sonnet-4-5"
    assert body["stream"] is True
    assert body["system"] == "You answer weather questions."
    assert body["max_tokens"] == 300
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.9
    assert body["stop_sequences"] == ["END"]
    assert "seed" not in body
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]


def test_body_tool_calls_and_results_become_blocks_merged_by_role() -> None:
    """Tool calls are tool_use blocks; results are tool_result blocks first in one user turn."""
    _, messages = to_anthropic_messages(TOOL_TURN)

    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [
        {"type": "text", "text": "Let me look."},
        {
            "type": "tool_use",
            "id": "call_abc123",
            "name": "get_weather",
            "input": {"city": "Paris"},
        },
        {"type": "tool_use", "id": "call_def456", "name": "get_time", "input": {}},
    ]
    assert messages[2]["content"] == [
        {"type": "tool_result", "tool_use_id": "call_abc123", "content": '{"temp_c": 21}'},
        {"type": "tool_result", "tool_use_id": "call_def456", "content": "14:05"},
        {"type": "text", "text": "Thanks! And tomorrow?"},
    ]


@pytest.mark.parametrize(
    ("job_max", "model_max", "sent"),
    [(128, 1000, 128), (None, 1000, 1000), (None, None, DEFAULT_MAX_TOKENS)],
)
def test_max_tokens_from_job_then_model_then_default(
    job_max: int | None, model_max: int | None, sent: int
) -> None:
    """``max_tokens`` is always sent: the job's, else the model's, else the default."""
    model = model_ref("anthropic", max_tokens=model_max)
    params = {} if job_max is None else {"max_tokens": job_max}

    body = build_body(model, ProviderRequest(messages=TOOL_TURN[:2], params=params))

    assert body["max_tokens"] == sent


def test_ids_from_other_providers_are_made_acceptable_consistently() -> None:
    """An id with characters Anthropic refuses is rewritten the same way in call and result."""
    messages = [
        {"role": "user", "content": "go"},
        {
            "role": "assistant",
            "tool_calls": [{"id": "functions.lookup:0", "name": "lookup", "arguments": "{}"}],
        },
        {"role": "tool", "tool_call_id": "functions.lookup:0", "content": "found"},
    ]

    _, out = to_anthropic_messages(messages)

    assert out[1]["content"][0]["id"] == "functions_lookup_0"
    assert out[2]["content"][0]["tool_use_id"] == "functions_lookup_0"


def test_arguments_not_a_json_object_fail_before_any_request() -> None:
    """Tool-call arguments Anthropic cannot take are a fatal error, and nothing is sent."""
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "name": "f", "arguments": "[1, 2]"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]

    result = replay(
        AnthropicProvider,
        transcript("anthropic", "text"),
        model=MODEL,
        request=ProviderRequest(messages=messages),
    )

    assert isinstance(result.error, FatalError)
    assert "messages[1]" in result.error.message
    assert result.requests == []


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param([{"role": "user", "content": "Hi"}], id="user"),
        pytest.param(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            id="system",
        ),
        pytest.param(
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
            ],
            id="assistant-text",
        ),
        pytest.param(TOOL_TURN, id="tool-calls-and-results"),
        pytest.param(
            [
                {"role": "user", "content": "one"},
                {"role": "user", "content": "two"},
            ],
            id="consecutive-users",
        ),
    ],
)
def test_translation_round_trips_through_the_mock_reader(messages: list[dict[str, Any]]) -> None:
    """What the adapter sends reads back (through mockllm's reader) as the same conversation."""
    body = build_body(MODEL, ProviderRequest(messages=messages))

    back = read_messages(body)

    def norm(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in msgs:
            item = {k: v for k, v in m.items() if k != "tool_calls"}
            if m.get("tool_calls"):
                item["tool_calls"] = [
                    (c["id"], c["name"], json.loads(c["arguments"] or "{}"))
                    for c in m["tool_calls"]
                ]
            out.append(item)
        return out

    assert norm(back) == norm(messages)


def test_consecutive_assistant_messages_merge_into_one_turn() -> None:
    """Two assistant messages in a row become one assistant turn with both blocks."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Part one."},
        {"role": "assistant", "content": "Part two."},
    ]

    _, out = to_anthropic_messages(messages)

    assert out[1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}],
    }
