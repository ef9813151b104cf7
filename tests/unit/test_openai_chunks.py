"""OpenAI stream parsing: chunks to deltas, malformed input to typed errors only."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.agents import parse_agents
from worker.clock import FakeClock
from worker.errors import FatalError, ProviderError, RetryableError
from worker.providers.base import Delta, ProviderRequest, ToolCallPiece, Usage
from worker.providers.openai import OpenAIProvider, parse_chunk

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
any_of_json = json_values | st.text(max_size=5)
chunk_like = st.fixed_dictionaries(
    {},
    optional={
        "choices": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "delta": st.fixed_dictionaries(
                        {},
                        optional={
                            "content": any_of_json,
                            "tool_calls": st.lists(
                                st.fixed_dictionaries(
                                    {},
                                    optional={
                                        "index": any_of_json,
                                        "id": any_of_json,
                                        "function": st.fixed_dictionaries(
                                            {},
                                            optional={
                                                "name": any_of_json,
                                                "arguments": any_of_json,
                                            },
                                        )
                                        | any_of_json,
                                    },
                                )
                                | any_of_json,
                                max_size=2,
                            )
                            | any_of_json,
                        },
                    )
                    | any_of_json,
                    "finish_reason": any_of_json,
                },
            )
            | any_of_json,
            max_size=2,
        )
        | any_of_json,
        "usage": st.fixed_dictionaries(
            {}, optional={"prompt_tokens": any_of_json, "completion_tokens": any_of_json}
        )
        | any_of_json,
        "error": json_values,
    },
)
payloads = st.one_of(
    st.text(),
    json_values.map(json.dumps),
    chunk_like.map(json.dumps),
    st.integers(min_value=1, max_value=5000).map(lambda n: "[" * n),
)


@given(payloads)
def test_parse_chunk_malformed_input_raises_only_provider_errors(data):
    """Any payload yields well-typed deltas or raises a ProviderError subclass, nothing else."""
    try:
        deltas = list(parse_chunk(data, now_s=0.0, secrets=()))
    except ProviderError:
        return

    for delta in deltas:
        assert isinstance(delta, Delta)
        assert delta.text is None or isinstance(delta.text, str)
        if delta.tool_call is not None:
            assert isinstance(delta.tool_call.index, int)
            assert isinstance(delta.tool_call.arguments, str)
            assert delta.tool_call.id is None or isinstance(delta.tool_call.id, str)
            assert delta.tool_call.name is None or isinstance(delta.tool_call.name, str)
        if delta.usage is not None:
            assert isinstance(delta.usage.input_tokens, int)
            assert isinstance(delta.usage.output_tokens, int)


@pytest.mark.parametrize(
    "data",
    [
        '{"choices": [{"delta": "text"}]}',
        '{"choices": [{"delta": {"tool_calls": 5}}]}',
        '{"choices": [{"delta": {"tool_calls": [{"index": "x"}]}}]}',
        '{"choices": [{"delta": {"tool_calls": [{"function": "f"}]}}]}',
        '{"choices": [{"delta": {"tool_calls": [{"function": {"arguments": 5}}]}}]}',
        '{"choices": [{"delta": {"content": 7}}]}',
        '{"usage": {"prompt_tokens": "many"}}',
        '{"usage": {"prompt_tokens": 1e999}}',
        "[" * 100_000,
        '{"id": "chatcmpl-mock", "choices": [{"delta": {"content": "tru',
    ],
    ids=[
        "delta-str",
        "tool-calls-int",
        "index-str",
        "function-str",
        "arguments-int",
        "content-int",
        "usage-str",
        "usage-inf",
        "deep-nesting",
        "truncated",
    ],
)
def test_parse_chunk_bad_shape_is_fatal(data):
    """Wrongly typed fields, deep nesting and truncated JSON are fatal protocol errors."""
    with pytest.raises(FatalError):
        list(parse_chunk(data, now_s=0.0, secrets=()))


def test_parse_chunk_documented_shapes_give_deltas():
    """Content, tool-call pieces, finish reason, usage and [DONE] each become their delta."""
    content = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    tool = {
        "choices": [
            {
                "delta": {
                    "tool_calls": [
                        {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{"}}
                    ]
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2.0}}

    def parse(obj):
        return list(parse_chunk(json.dumps(obj), now_s=0.0, secrets=()))

    assert parse(content) == [Delta(text="Hi")]
    assert parse(tool) == [
        Delta(tool_call=ToolCallPiece(index=0, id="c1", name="f", arguments="{")),
        Delta(finish_reason="tool_calls"),
    ]
    assert parse(usage) == [Delta(usage=Usage(3, 2))]
    assert list(parse_chunk("[DONE]", now_s=0.0, secrets=())) == [Delta(done=True)]


def test_parse_chunk_in_stream_error_is_classified():
    """An error object inside the stream raises the classified error, not a parse error."""
    data = json.dumps({"error": {"message": "Overloaded", "type": "server_error"}})

    with pytest.raises(RetryableError):
        list(parse_chunk(data, now_s=0.0, secrets=()))


def _stream_bytes() -> bytes:
    frames = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Hello "}}]},
        {"choices": [{"delta": {"content": "wörld"}}]},
        {"choices": [{"delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
    ]
    out = b"".join(b"data: " + json.dumps(f, ensure_ascii=False).encode() + b"\n\n" for f in frames)
    return out + b"data: [DONE]\n\n"


def _model():
    doc = {
        "models": {"m": {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}},
        "agents": {"a": {"model": "m"}},
    }
    return parse_agents(doc, source="unit.yaml").agents["a"].chain[0]


@given(st.lists(st.integers(min_value=1, max_value=len(_stream_bytes()) - 1), max_size=12))
def test_openai_stream_any_split_of_the_bytes_gives_the_same_deltas(cuts):
    """However the wire splits the SSE bytes (even inside a UTF-8 character), deltas match."""
    raw = _stream_bytes()
    points = [0, *sorted(set(cuts)), len(raw)]
    pieces = [raw[a:b] for a, b in itertools.pairwise(points)]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=iter(pieces)
        )

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        provider = OpenAIProvider(client, FakeClock())
        deltas = list(provider.stream(_model(), ProviderRequest(messages=[])))

    assert deltas == [
        Delta(text="Hello "),
        Delta(text="wörld"),
        Delta(finish_reason="stop"),
        Delta(usage=Usage(4, 2)),
        Delta(done=True),
    ]
