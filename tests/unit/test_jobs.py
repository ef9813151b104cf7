"""The job payload: validation at the edge, the field named, content never echoed."""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire import model_ref
from worker.clock import FakeClock
from worker.errors import FatalError, InvalidJob
from worker.jobs import (
    MAX_DEADLINE_S,
    MAX_DEPTH,
    MAX_MESSAGES,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    Job,
    is_job_id,
    parse_job,
)
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import ProviderRequest, SSEProvider, request_content
from worker.providers.gemini import GeminiProvider
from worker.providers.openai import OpenAIProvider
from worker.service import job_id_of

LIMIT = 10_000
SECRET_PROMPT = "my private prompt text"


def _raw(**changes):
    raw = {"agent": "support", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    raw.update(changes)
    return raw


def test_parse_job_minimal_payload_gets_a_uuid4_job_id():
    """A job without job_id gets a fresh uuid4; the documented fields are kept."""
    job = parse_job(
        _raw(params={"max_tokens": 512, "temperature": 0.2}, deadline_s=120, metadata={"a": 1}),
        max_bytes=LIMIT,
    )

    assert uuid.UUID(job.job_id).version == 4
    assert job.params_dict() == {"max_tokens": 512, "temperature": 0.2}
    assert job.deadline_s == 120
    assert job.messages_list() == [{"role": "user", "content": SECRET_PROMPT, "tool_calls": []}]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param({"messages": [{"role": "user", "content": "x"}]}, "agent", id="no-agent"),
        pytest.param(_raw(agent=""), "agent", id="empty-agent"),
        pytest.param(_raw(messages=[]), "messages", id="no-messages"),
        pytest.param(
            _raw(messages=[{"role": "wizard", "content": SECRET_PROMPT}]),
            "messages[0].role",
            id="bad-role",
        ),
        pytest.param(_raw(messages=[{"role": "tool", "content": "r"}]), "messages[0]", id="tool"),
        pytest.param(_raw(job_id="has spaces"), "job_id", id="bad-job-id"),
        pytest.param(_raw(deadline_s=-1), "deadline_s", id="negative-deadline"),
        pytest.param(_raw(params={"temperature": 5}), "params.temperature", id="temperature"),
        pytest.param(_raw(params={"api_key": "sk-x"}), "params.api_key", id="unknown-param"),
        pytest.param(_raw(base_url="http://evil"), "base_url", id="url-in-job"),
        pytest.param(_raw(tools=[{"name": "bad name!"}]), "tools[0].name", id="tool-name"),
    ],
)
def test_parse_job_invalid_field_is_named(raw, field):
    """Each invalid payload gives one InvalidJob naming the field, without echoing content."""
    with pytest.raises(InvalidJob) as caught:
        parse_job(raw, max_bytes=LIMIT)

    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert SECRET_PROMPT not in caught.value.message
    assert caught.value.info()["kind"] == "invalid_job"
    assert caught.value.info()["field"] == field


@pytest.mark.parametrize("raw", [[], "job", None, 3])
def test_parse_job_non_object_is_invalid(raw):
    """A payload that is not a JSON object is an invalid job."""
    with pytest.raises(InvalidJob, match="must be a JSON object"):
        parse_job(raw, max_bytes=LIMIT)


def test_parse_job_oversize_is_invalid_with_its_size():
    """A payload over the byte limit is refused before validation, naming its size."""
    raw = _raw(messages=[{"role": "user", "content": "x" * LIMIT}])

    with pytest.raises(InvalidJob) as caught:
        parse_job(raw, max_bytes=LIMIT)

    assert caught.value.field == "(job)"
    assert f"over the limit of {LIMIT}" in caught.value.message


def test_parse_job_several_problems_reports_the_first_and_counts_the_rest():
    """With several bad fields, the first is named and the rest are counted."""
    with pytest.raises(InvalidJob) as caught:
        parse_job({"agent": "", "messages": []}, max_bytes=LIMIT)

    assert caught.value.message.endswith("(and 1 more problem)")


def _nested(depth: int, leaf: Any = 0) -> Any:
    """``leaf`` inside ``depth`` arrays, built without recursion."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


ASSISTANT_CALL = {
    "role": "assistant",
    "tool_calls": [{"id": "c1", "name": "lookup", "arguments": '{"q": 1}'}],
}


@pytest.mark.parametrize(
    ("raw", "field", "says"),
    [
        pytest.param(_raw(deadline_s=math.inf), "deadline_s", "finite", id="deadline-inf"),
        pytest.param(_raw(deadline_s=1e19), "deadline_s", "less than", id="deadline-1e19"),
        pytest.param(
            _raw(deadline_s=MAX_DEADLINE_S + 1), "deadline_s", "less than", id="deadline-a-day"
        ),
        pytest.param(_raw(deadline_s=math.nan), "deadline_s", "finite", id="deadline-nan"),
        pytest.param(
            _raw(messages=[{"role": "user", "content": f"{SECRET_PROMPT} \ud800"}]),
            "messages[0].content",
            "UTF-8",
            id="surrogate-content",
        ),
        pytest.param(_raw(params={"stop": "\udc00"}), "params.stop", "UTF-8", id="surrogate-stop"),
        pytest.param(
            _raw(params={"stop": ["END", "\udfff"]}),
            "params.stop[1]",
            "UTF-8",
            id="surrogate-stop-list",
        ),
        pytest.param(
            _raw(
                messages=[
                    {"role": "user", "content": "go"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c1", "name": "f", "arguments": '{"a": "\ud83d"}'}],
                    },
                ]
            ),
            "messages[1].tool_calls[0].arguments",
            "UTF-8",
            id="surrogate-arguments",
        ),
        pytest.param(
            _raw(metadata={f"{SECRET_PROMPT}\ud800": 1}), "metadata", "key", id="surrogate-key"
        ),
        pytest.param(
            _raw(tools=[{"name": "f", "parameters": {"properties": {"x": {"title": "\ud800"}}}}]),
            "tools[0].parameters",
            "UTF-8",
            id="surrogate-in-a-schema",
        ),
        pytest.param(
            _raw(metadata={"deep": _nested(5_000)}), "metadata", "deeper than 64", id="deep-5000"
        ),
        pytest.param(
            _raw(metadata={"deep": _nested(100_000)}),
            "metadata",
            "deeper than 64",
            id="deep-100000",
        ),
        pytest.param(
            _raw(tools=[{"name": "f", "parameters": {"items": _nested(70)}}]),
            "tools[0].parameters",
            "deeper than 64",
            id="deep-schema",
        ),
        pytest.param(
            _raw(tools=[{"name": "f", "parameters": {"maximum": math.nan}}]),
            "tools[0].parameters",
            "finite",
            id="nan-in-a-schema",
        ),
        pytest.param(
            _raw(tools=[{"name": "f", "parameters": {"maximum": -math.inf}}]),
            "tools[0].parameters",
            "finite",
            id="inf-in-a-schema",
        ),
        pytest.param(_raw(metadata={"n": 10**5000}), "metadata", "64 bits", id="huge-int"),
        pytest.param(_raw(params={"seed": 2**64}), "params.seed", "64 bits", id="seed-65-bits"),
        pytest.param(_raw(metadata={"b": b"bytes"}), "metadata", "not a JSON value", id="bytes"),
        pytest.param({**_raw(), 7: "x"}, "(job)", "not a string", id="int-key"),
        pytest.param(
            _raw(messages=[{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)),
            "messages",
            f"at most {MAX_MESSAGES}",
            id="too-many-messages",
        ),
        pytest.param(
            _raw(tools=[{"name": f"t{i}"} for i in range(MAX_TOOLS + 1)]),
            "tools",
            f"at most {MAX_TOOLS}",
            id="too-many-tools",
        ),
        pytest.param(
            _raw(
                messages=[
                    {"role": "user", "content": "go"},
                    {**ASSISTANT_CALL, "tool_calls": ASSISTANT_CALL["tool_calls"] * 513},
                ]
            ),
            "messages[1].tool_calls",
            f"at most {MAX_TOOL_CALLS}",
            id="too-many-tool-calls",
        ),
        pytest.param(_raw(job_id="job-1\n"), "job_id", "pattern", id="job-id-newline"),
        pytest.param({**_raw(), "A" * 100_000: 1}, "(key)", "Extra inputs", id="huge-unknown-key"),
    ],
)
def test_parse_job_hostile_values_are_invalid_naming_the_field(raw, field, says):
    """inf, nan, 1e19, surrogates, deep nesting, huge numbers, too many items: one
    InvalidJob naming the field, whose message echoes nothing of the payload."""
    with pytest.raises(InvalidJob) as caught:
        parse_job(raw, max_bytes=10_000_000)

    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert says in caught.value.message
    assert SECRET_PROMPT not in caught.value.message
    assert len(caught.value.message) < 200


def test_parse_job_keeps_a_deadline_of_a_day_and_control_characters():
    """The limits are inclusive, and control characters are valid text."""
    job = parse_job(
        _raw(
            deadline_s=MAX_DEADLINE_S,
            messages=[{"role": "user", "content": "tab\there\x00\x1b[0m"}],
            metadata={"deep": _nested(MAX_DEPTH - 3)},
        ),
        max_bytes=LIMIT,
    )

    assert job.deadline_s == MAX_DEADLINE_S
    assert job.messages[0].content == "tab\there\x00\x1b[0m"


def test_job_id_of_takes_a_job_id_only_when_it_matches_in_full():
    """A job id with a trailing newline is not the job's id: the task's is used instead."""
    assert job_id_of({"job_id": "job-1"}, task_id="task-1") == "job-1"
    assert job_id_of({"job_id": "job-1\n"}, task_id="task-1") == "task-1"
    assert not is_job_id("job-1\n")
    assert is_job_id("job-1")


# ---------------------------------------------------------------- the property

SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(max_codepoint=0x1F), max_size=12),
    st.builds(
        lambda char, n: char * n,
        st.sampled_from(["x", "\u00e9", "\U0001f642", "\x00"]),
        st.integers(min_value=0, max_value=40_000),
    ),
)
hostile_text = st.one_of(
    text,
    st.text(st.one_of(st.characters(), SURROGATE), min_size=1, max_size=12),
)
hostile_number = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.integers(min_value=4_000, max_value=5_000).map(lambda digits: 10**digits),
    st.sampled_from([1e19, 1e300, -0.0, 5e-324]),
    st.floats(),
)
deep = st.builds(
    _nested, st.integers(min_value=1, max_value=6_000), st.sampled_from([0, {}, "x", math.inf])
)


def _json(leaves: st.SearchStrategy[Any], keys: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    )


plain_json = _json(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text,
    st.text(max_size=8),
)
anything = st.one_of(
    _json(st.none() | st.booleans() | hostile_number | hostile_text, hostile_text),
    deep,
    st.binary(max_size=4),
    st.just(math.nan),
)


def _or_anything(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` most of the time, anything at all now and then."""
    return st.integers(min_value=0, max_value=7).flatmap(lambda n: anything if n == 0 else valid)


tool_calls = st.lists(
    st.fixed_dictionaries(
        {"id": _or_anything(st.text(min_size=1, max_size=8)), "name": _or_anything(st.just("f"))},
        optional={
            "arguments": _or_anything(
                st.sampled_from(["", "{}", '{"a": [1, 2]}', '{"a": NaN}', "[1]", "{"])
                | st.builds(lambda d: '{"a": ' + "[" * d + "]" * d + "}", st.integers(1, 2_000))
                | hostile_text
            )
        },
    ),
    max_size=2,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {
                "role": _or_anything(st.sampled_from(["system", "user"])),
                "content": _or_anything(hostile_text),
            }
        ),
        st.fixed_dictionaries(
            {"role": st.just("assistant"), "tool_calls": _or_anything(tool_calls)},
            optional={"content": _or_anything(text)},
        ),
        st.fixed_dictionaries(
            {
                "role": st.just("tool"),
                "tool_call_id": _or_anything(st.text(min_size=1, max_size=8)),
                "content": _or_anything(text),
            }
        ),
    ),
    min_size=1,
    max_size=4,
)
tools = st.lists(
    st.fixed_dictionaries(
        {"name": _or_anything(st.sampled_from(["f", "lookup_2"]))},
        optional={
            "description": _or_anything(text),
            "parameters": _or_anything(
                st.dictionaries(st.text(max_size=8), plain_json, max_size=3)
            ),
        },
    ),
    max_size=2,
)
params = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": _or_anything(st.integers(min_value=1, max_value=10_000)),
        "temperature": _or_anything(st.floats(min_value=0, max_value=2)),
        "top_p": _or_anything(st.floats(min_value=0.01, max_value=1)),
        "stop": _or_anything(hostile_text | st.lists(hostile_text, max_size=3)),
        "seed": _or_anything(st.integers(-(2**63), 2**63)),
    },
)
jobs = st.fixed_dictionaries(
    {"agent": _or_anything(st.just("support")), "messages": _or_anything(messages)},
    optional={
        "job_id": _or_anything(st.from_regex(r"\A[a-z0-9][a-z0-9:._-]{0,20}\n?\Z")),
        "tools": _or_anything(tools),
        "params": _or_anything(params),
        "deadline_s": _or_anything(
            st.floats(min_value=0.001, max_value=MAX_DEADLINE_S) | hostile_number
        ),
        "metadata": _or_anything(st.dictionaries(st.text(max_size=8), plain_json, max_size=3)),
    },
)
PROVIDERS: list[type[SSEProvider]] = [OpenAIProvider, AnthropicProvider, GeminiProvider]


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=jobs)
def test_parse_job_returns_a_job_every_provider_can_send_or_raises_invalid_job(raw):
    """Whatever the payload holds, parse_job returns a Job or raises InvalidJob naming a
    field; every provider's request for a Job it returns encodes as JSON, unless the
    adapter refuses the messages up front (FatalError: arguments Anthropic and Gemini
    cannot take as an object, a tool result Gemini cannot name)."""
    outcome: Job | InvalidJob
    try:
        outcome = parse_job(raw, max_bytes=100_000)
    except InvalidJob as exc:
        outcome = exc
    if isinstance(outcome, InvalidJob):
        assert outcome.field
        return
    job = outcome
    assert job.deadline_s is None or 0 < job.deadline_s <= MAX_DEADLINE_S
    request = ProviderRequest(
        messages=job.messages_list(), tools=job.tools_list(), params=job.params_dict()
    )
    with httpx.Client() as client:
        for provider in PROVIDERS:
            adapter = provider(client, FakeClock())
            name = provider.__name__.removesuffix("Provider").lower()
            try:
                call = adapter.prepare(model_ref(name), request, "key")
            except FatalError:
                assert provider is not OpenAIProvider
                continue
            assert json.loads(request_content(call.body)) == call.body
