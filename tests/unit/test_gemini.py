"""The Gemini adapter: request translation, the stream parser, and error mapping."""

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
from worker.mockllm.gemini import read_messages
from worker.providers.base import ProviderRequest
from worker.providers.gemini import (
    SKIP_SIGNATURE,
    GeminiProvider,
    GeminiStream,
    build_body,
    call_id_seed,
    to_gemini_contents,
    to_gemini_schema,
)

KEY = "AIzaSyTestKey-0123456789abcdefghijklmn"
MODEL = model_ref("gemini", model="gemini-2.5-flash")
REQUEST = ProviderRequest(messages=[{"role": "user", "content": "Hello"}])
TOOL_TURN = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {"id": "toolu_01A", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "toolu_01B", "name": "get_time", "arguments": ""},
        ],
    },
    {"role": "tool", "tool_call_id": "toolu_01A", "content": '{"temp_c": 21}'},
    {"role": "tool", "tool_call_id": "toolu_01B", "content": "14:05"},
    {"role": "user", "content": "Thanks! And tomorrow?"},
]


def _expected(name: str) -> dict[str, Any]:
    seed = call_id_seed(build_body(MODEL, REQUEST))
    return json.loads(json.dumps(expected("gemini", name)).replace("{seed}", seed))


def _data(payload: Any) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


@pytest.mark.parametrize("name", golden_names("gemini"))
def test_golden_transcript_parses_to_expected_deltas(name: str) -> None:
    """Each recorded Gemini stream yields exactly the deltas (and error) written beside it."""
    result = replay(GeminiProvider, transcript("gemini", name), model=MODEL, request=REQUEST)

    assert result.summary() == _expected(name)


@pytest.mark.parametrize("name", golden_names("gemini"))
@given(cuts=st.lists(st.integers(min_value=0, max_value=2500), max_size=40))
def test_golden_transcript_any_split_same_deltas(name: str, cuts: list[int]) -> None:
    """However the bytes of a stream are cut into reads, the deltas and the error are the same."""
    data = transcript("gemini", name)

    result = replay(GeminiProvider, split_at(data, cuts), model=MODEL, request=REQUEST)

    assert result.summary() == _expected(name)


_FIELDS = st.sampled_from(
    [
        *("candidates", "content", "parts", "text", "functionCall", "name", "args", "id"),
        *("finishReason", "promptFeedback", "blockReason", "usageMetadata", "error", "code"),
        *("promptTokenCount", "candidatesTokenCount", "thought", "status", "message"),
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 600) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_FIELDS, inner, max_size=4),
    max_leaves=14,
)
# Data lines: JSON of odd shapes, or any bytes at all (invalid UTF-8 included).
_DATA = st.one_of(
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
)


@given(frames=st.lists(_DATA, max_size=8))
def test_arbitrary_events_are_classified_never_crash(frames: list[bytes]) -> None:
    """Malformed JSON, odd shapes and unknown fields end in deltas or a ProviderError only."""
    body = b"".join(b"data: " + d + b"\n\n" for d in frames)

    result = replay(GeminiProvider, body, model=MODEL)

    done = any(d.done for d in result.deltas)
    assert done or isinstance(result.error, ProviderError)


def test_parser_malformed_json_is_fatal() -> None:
    """A data line that is not JSON is a protocol violation: fatal."""
    with pytest.raises(FatalError):
        GeminiStream("seed").feed('{"candidates": [{"content": {"parts": [{"te', now_s=0)


def test_events_after_finish_are_drained_not_parsed() -> None:
    """Whatever follows the finishReason event (even an error object) is read and ignored."""
    body = transcript("gemini", "max_tokens") + _data({"error": {"code": 500}})

    result = replay(GeminiProvider, body, model=MODEL)

    assert result.error is None
    assert result.deltas[-1].done


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "other"),
        ("MALFORMED_FUNCTION_CALL", "malformed_function_call"),
    ],
)
def test_finish_reason_maps_to_neutral(reason: str, finish: str) -> None:
    """Gemini's finish reasons become the neutral ones; unknown ones pass through lower-cased."""
    parser = GeminiStream("seed")

    deltas = parser.feed(json.dumps({"candidates": [{"finishReason": reason}]}), now_s=0)

    assert [d.finish_reason for d in deltas if d.finish_reason] == [finish]
    assert parser.done


def test_call_ids_are_stable_per_request_and_differ_between_turns() -> None:
    """A retry of the same request gets the same call ids; the next turn gets new ones."""
    turn1 = ProviderRequest(messages=[{"role": "user", "content": "Weather?"}])
    turn2 = ProviderRequest(
        messages=[
            *turn1.messages,
            {
                "role": "assistant",
                "tool_calls": [{"id": "call_x", "name": "get_weather", "arguments": "{}"}],
            },
            {"role": "tool", "tool_call_id": "call_x", "content": "sunny"},
        ]
    )
    stream = transcript("gemini", "function_call")

    first = replay(GeminiProvider, stream, model=MODEL, request=turn1)
    again = replay(GeminiProvider, stream, model=MODEL, request=turn1)
    later = replay(GeminiProvider, stream, model=MODEL, request=turn2)

    def ids(result: Any) -> list[str]:
        return [d.tool_call.id for d in result.deltas if d.tool_call]

    assert ids(first) == ids(again)
    assert len(set(ids(first))) == 2
    assert not set(ids(first)) & set(ids(later))
    assert all(i.startswith("call_") and i.endswith(("_0", "_1")) for i in ids(first))


def test_call_id_given_by_gemini_is_kept() -> None:
    """When a functionCall carries an id, that id is used."""
    parser = GeminiStream("seed")
    chunk = {"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "id": "x1"}}]}}]}

    deltas = parser.feed(json.dumps(chunk), now_s=0)

    assert deltas[0].tool_call is not None
    assert deltas[0].tool_call.id == "x1"
    assert deltas[0].tool_call.arguments == "{}"


@pytest.mark.parametrize(
    ("status", "body", "kind", "retry_after_s"),
    [
        (
            429,
            {"error": {"code": 429, "message": "Quota", "status": "RESOURCE_EXHAUSTED"}},
            RateLimited,
            None,
        ),
        (
            503,
            {
                "error": {
                    "code": 503,
                    "message": "The model is overloaded.",
                    "status": "UNAVAILABLE",
                }
            },
            RetryableError,
            None,
        ),
        (
            500,
            {"error": {"code": 500, "message": "An internal error", "status": "INTERNAL"}},
            RetryableError,
            None,
        ),
        (
            504,
            {"error": {"code": 504, "message": "Deadline", "status": "DEADLINE_EXCEEDED"}},
            RetryableError,
            None,
        ),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "The input token count (1210112) exceeds the maximum number "
                    "of tokens allowed (1048576).",
                    "status": "INVALID_ARGUMENT",
                }
            },
            ContextOverflow,
            None,
        ),
        (
            400,
            {
                "error": {
                    "code": 400,
                    "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                }
            },
            FatalError,
            None,
        ),
        (
            403,
            {"error": {"code": 403, "message": "Denied", "status": "PERMISSION_DENIED"}},
            FatalError,
            None,
        ),
        (
            404,
            {"error": {"code": 404, "message": "models/x is not found", "status": "NOT_FOUND"}},
            FatalError,
            None,
        ),
        (
            429,
            [{"error": {"code": 429, "message": "Quota", "status": "RESOURCE_EXHAUSTED"}}],
            RateLimited,
            None,
        ),
    ],
)
def test_http_error_maps_to_kind(
    status: int, body: Any, kind: type[ProviderError], retry_after_s: float | None
) -> None:
    """Gemini's error responses (objects or a JSON array) land in the taxonomy."""
    result = replay(
        GeminiProvider,
        json.dumps(body).encode(),
        model=MODEL,
        status=status,
        content_type="application/json; charset=UTF-8",
    )

    assert type(result.error) is kind
    assert result.error.status == status
    assert result.error.retry_after_s == retry_after_s


@pytest.mark.parametrize(
    ("name", "status", "kind", "retry_after_s"),
    [("error_429", 429, RateLimited, 34.4), ("error_400_token_limit", 400, ContextOverflow, None)],
)
def test_golden_error_bodies_map_to_kind(
    name: str, status: int, kind: type[ProviderError], retry_after_s: float | None
) -> None:
    """The documented 429 (RetryInfo in the body) and array-shaped 400 bodies are understood."""
    body = (DATA / "gemini" / f"{name}.json").read_bytes()

    result = replay(
        GeminiProvider, body, model=MODEL, status=status, content_type="application/json"
    )

    assert type(result.error) is kind
    assert result.error.retry_after_s == retry_after_s


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (503, "UNAVAILABLE", RetryableError),
        (500, "INTERNAL", RetryableError),
        (429, "RESOURCE_EXHAUSTED", RateLimited),
        (400, "INVALID_ARGUMENT", FatalError),
    ],
)
def test_in_stream_error_object_maps_by_its_code(code: int, status: str, kind: type) -> None:
    """An error object in a data event is classified by the status code it carries."""
    body = transcript("gemini", "no_finish_reason") + _data(
        {"error": {"code": code, "message": "Something went wrong.", "status": status}}
    )

    result = replay(GeminiProvider, body, model=MODEL)

    assert type(result.error) is kind
    assert [d.text for d in result.deltas if d.text] == ["Half an ans"]


def test_key_only_in_header_never_in_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key goes in ``x-goog-api-key``; the URL has the model and ``alt=sse`` only."""
    monkeypatch.setenv("GEMINI_TEST_KEY", KEY)
    model = model_ref("gemini", model="gemini-2.5-flash", api_key_env="GEMINI_TEST_KEY")

    result = replay(GeminiProvider, transcript("gemini", "text"), model=model)

    sent = result.requests[0]
    assert str(sent.url) == (
        "http://127.0.0.1:9/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    )
    assert sent.headers["x-goog-api-key"] == KEY
    assert KEY not in str(sent.url)
    assert "key=" not in str(sent.url)


@pytest.mark.parametrize(
    ("base_url", "model"),
    [
        ("http://127.0.0.1:9/v1beta", "gemini-2.5-flash"),
        ("http://127.0.0.1:9/", "models/gemini-2.5-flash"),
    ],
)
def test_url_tolerates_v1beta_base_and_models_prefix(base_url: str, model: str) -> None:
    """A base URL ending in /v1beta and a model named ``models/…`` give the same URL."""
    ref = model_ref("gemini", base_url=base_url, model=model)

    result = replay(GeminiProvider, transcript("gemini", "text"), model=ref)

    assert str(result.requests[0].url) == (
        "http://127.0.0.1:9/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    )


def test_error_echoing_the_key_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream message that quotes the key never carries it into our error."""
    monkeypatch.setenv("GEMINI_TEST_KEY", KEY)
    model = model_ref("gemini", api_key_env="GEMINI_TEST_KEY")
    body = {
        "error": {"code": 400, "message": f"API key {KEY} not valid", "status": "INVALID_ARGUMENT"}
    }

    result = replay(
        GeminiProvider,
        json.dumps(body).encode(),
        model=model,
        status=400,
        content_type="application/json",
    )

    assert isinstance(result.error, FatalError)
    assert KEY not in json.dumps(result.error.info())
    assert KEY not in repr(result.error)


def test_body_contents_system_tools_and_generation_config() -> None:
    """Roles become user/model, system becomes systemInstruction, params generationConfig."""
    request = ProviderRequest(
        messages=TOOL_TURN,
        tools=[
            {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {
                    "$schema": "https://json-schema.org/draft/2020-12/schema",
                    "type": "object",
                    "properties": {
                        "city": {"type": "string"},
                        "unit": {"type": ["string", "null"], "enum": ["c", "f", None]},
                        "kind": {"const": "current"},
                    },
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            {"name": "get_time", "description": "", "parameters": {}},
        ],
        params={"max_tokens": 300, "temperature": 0.2, "top_p": 0.9, "stop": ["END"], "seed": 7},
    )

    body = build_body(MODEL, request)

    assert body["systemInstruction"] == {"parts": [{"text": "You answer weather questions."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["generationConfig"] == {
        "maxOutputTokens": 300,
        "temperature": 0.2,
        "topP": 0.9,
        "stopSequences": ["END"],
        "seed": 7,
    }
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather",
                    "parameters": {
                        "type": "object",
                        "properties": {
                            "city": {"type": "string"},
                            "unit": {"type": "string", "nullable": True, "enum": ["c", "f", None]},
                            "kind": {"enum": ["current"]},
                        },
                        "required": ["city"],
                    },
                },
                {"name": "get_time"},
            ]
        }
    ]


def test_tool_results_name_the_function_of_the_matching_call() -> None:
    """functionResponse carries the name of the call whose id the tool message answers."""
    _, contents = to_gemini_contents(TOOL_TURN)

    assert contents[1]["parts"] == [
        {"text": "Let me look."},
        {
            "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
            "thoughtSignature": SKIP_SIGNATURE,
        },
        {"functionCall": {"name": "get_time", "args": {}}},
    ]
    assert contents[2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"output": '{"temp_c": 21}'}}},
        {"functionResponse": {"name": "get_time", "response": {"output": "14:05"}}},
        {"text": "Thanks! And tomorrow?"},
    ]


def test_tool_result_without_its_call_fails_before_any_request() -> None:
    """A tool message whose id matches no earlier call cannot name its function: fatal, unsent."""
    messages = [
        {"role": "user", "content": "go"},
        {"role": "tool", "tool_call_id": "call_missing", "content": "ok"},
    ]

    result = replay(
        GeminiProvider,
        transcript("gemini", "text"),
        model=MODEL,
        request=ProviderRequest(messages=messages),
    )

    assert isinstance(result.error, FatalError)
    assert "messages[1].tool_call_id" in result.error.message
    assert result.requests == []


def test_model_max_tokens_used_when_job_gives_none() -> None:
    """``maxOutputTokens`` comes from the model's config when the job sets no max_tokens."""
    model = model_ref("gemini", max_tokens=777)

    body = build_body(model, REQUEST)

    assert body["generationConfig"] == {"maxOutputTokens": 777}


def test_schema_cut_down_at_every_depth() -> None:
    """Nested items and anyOf are cut down too; unknown keywords go at every depth."""
    schema = {
        "type": "array",
        "items": {"type": "object", "properties": {"a": {"type": "integer", "$id": "x"}}},
        "anyOf": [{"type": "string", "format": "date-time", "examples": ["x"]}],
    }

    assert to_gemini_schema(schema) == {
        "type": "array",
        "items": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "anyOf": [{"type": "string", "format": "date-time"}],
    }


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
            [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
            id="consecutive-users",
        ),
    ],
)
def test_translation_round_trips_through_the_mock_reader(messages: list[dict[str, Any]]) -> None:
    """What the adapter sends reads back as the same conversation, ids replaced by names."""
    body = build_body(MODEL, ProviderRequest(messages=messages))

    back = read_messages(body)

    names = {c["id"]: c["name"] for m in messages for c in m.get("tool_calls", [])}

    def norm(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in msgs:
            item = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id", "name")}
            if m.get("tool_calls"):
                item["tool_calls"] = [
                    (c["name"], json.loads(c["arguments"] or "{}")) for c in m["tool_calls"]
                ]
            if m["role"] == "tool":
                item["name"] = m.get("name") or names[m["tool_call_id"]]
            out.append(item)
        return out

    assert norm(back) == norm(messages)
