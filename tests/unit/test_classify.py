"""The classifier (design rule 9): status first, then the body's code, text last."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.classify import classify_response, classify_stream_error, scrub
from worker.errors import (
    ContextOverflow,
    FatalError,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RetryableError,
)
from worker.providers.base import translated
from worker.retry import RETRY_AFTER_KEEP_S

NOW_S = 1_700_000_000.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
codes = st.sampled_from(
    [
        "context_length_exceeded",
        "rate_limit_exceeded",
        "insufficient_quota",
        "server_error",
        "overloaded_error",
        "invalid_api_key",
        "RESOURCE_EXHAUSTED",
    ]
)
noisy_text = st.one_of(
    st.text(),
    st.sampled_from(
        [
            "HTTP 500 internal server error",
            "connect to api.openai.com:443 timed out",
            "service unavailable, bad gateway",
            "rate limited: too many requests",
            "maximum context length is 8192 tokens",
            "status 503 overloaded",
        ]
    ),
)
error_objects = st.fixed_dictionaries(
    {
        "error": st.fixed_dictionaries(
            {},
            optional={
                "message": noisy_text | json_values,
                "type": codes | json_values,
                "code": codes | st.integers(min_value=0, max_value=999) | json_values,
                "status": codes | json_values,
                "details": json_values,
            },
        )
    }
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    error_objects.map(json.dumps),
    json_values.map(json.dumps),
    st.just("<html><body><h1>502 Bad Gateway</h1></body></html>"),
)
headers = st.dictionaries(
    st.sampled_from(["retry-after", "Retry-After", "retry-after-ms", "content-type", "x-any"]),
    st.text(max_size=40) | st.integers(-10, 10**6).map(str),
    max_size=4,
)


@given(st.integers(min_value=-1000, max_value=10_000), headers, bodies)
def test_classify_response_any_input_is_typed_and_keeps_the_status(status, hdrs, body):
    """Any status, headers and body classify to a ProviderError carrying that status."""
    error = classify_response(status, hdrs, body, now_s=NOW_S)

    assert isinstance(error, ProviderError)
    assert error.status == status
    assert error.retry_after_s is None or 0 <= error.retry_after_s <= RETRY_AFTER_KEEP_S
    assert len(error.message) <= 300


@given(
    st.sampled_from([429, 503, 529]),
    st.sampled_from(["retry-after", "Retry-After"]),
    st.integers(min_value=0, max_value=10**7),
)
def test_classify_response_keeps_retry_after_up_to_a_day(status, name, seconds):
    """A throttling status keeps the server's Retry-After, capped at a day, not at the wait cap."""
    error = classify_response(status, {name: str(seconds)}, "", now_s=NOW_S)

    assert error.retry_after_s == min(float(seconds), RETRY_AFTER_KEEP_S)


@given(headers, bodies)
def test_classify_response_429_is_always_rate_limited(hdrs, body):
    """A 429 is a rate limit whatever its body says (tokens, context, server error …)."""
    assert type(classify_response(429, hdrs, body, now_s=NOW_S)) is RateLimited


@given(
    st.integers(min_value=400, max_value=499).filter(lambda s: s not in (408, 429)),
    headers,
    bodies,
)
def test_classify_response_4xx_never_retryable_from_text(status, hdrs, body):
    """A 4xx other than 408 and 429 is fatal (or an overflow) whatever its text or code says."""
    error = classify_response(status, hdrs, body, now_s=NOW_S)

    assert isinstance(error, FatalError)
    assert not isinstance(error, RetryableError)


@given(st.sampled_from([408, 500, 502, 503, 504, 520, 529]), headers, bodies)
def test_classify_response_transient_status_always_retryable(status, hdrs, body):
    """408 and the transient 5xx retry whatever the body says (even "context length")."""
    assert type(classify_response(status, hdrs, body, now_s=NOW_S)) is RetryableError


@given(json_values | error_objects)
def test_classify_stream_error_any_payload_is_typed(payload):
    """Any in-stream error payload classifies to a ProviderError without raising."""
    error = classify_stream_error(payload, now_s=NOW_S)

    assert isinstance(error, ProviderError)
    assert error.status is None or 400 <= error.status <= 599


@given(noisy_text, codes | st.none())
def test_classify_stream_error_numbers_in_text_never_become_a_status(message, code):
    """A message full of numbers ("500", ":443") in a stream gives an error with no status."""
    payload = {"error": {"message": message, "type": code, "code": code}}

    error = classify_stream_error(payload, now_s=NOW_S)

    assert error.status is None


def _openai_error(message, code=None, type_="invalid_request_error"):
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


@pytest.mark.parametrize(
    ("status", "hdrs", "body", "cls"),
    [
        pytest.param(400, {}, _openai_error("Invalid value"), FatalError, id="400-fatal"),
        pytest.param(401, {}, _openai_error("bad key", "invalid_api_key"), FatalError, id="401"),
        pytest.param(403, {}, _openai_error("Forbidden"), FatalError, id="403"),
        pytest.param(404, {}, _openai_error("no model", "model_not_found"), FatalError, id="404"),
        pytest.param(422, {}, _openai_error("Unprocessable"), FatalError, id="422"),
        pytest.param(
            400,
            {},
            _openai_error("The prompt mentions HTTP 500 internal server error twice"),
            FatalError,
            id="400-mentioning-500-is-fatal",
        ),
        pytest.param(
            400,
            {},
            _openai_error("This model's context is full.", "context_length_exceeded"),
            ContextOverflow,
            id="400-openai-overflow-code",
        ),
        pytest.param(
            400,
            {},
            _openai_error("This model's maximum context length is 8192 tokens."),
            ContextOverflow,
            id="400-overflow-text",
        ),
        pytest.param(413, {}, "", ContextOverflow, id="413"),
        pytest.param(
            429,
            {},
            _openai_error(
                "Rate limit reached for gpt-4o on tokens per min (TPM): Limit 30000",
                "rate_limit_exceeded",
                "tokens",
            ),
            RateLimited,
            id="429-tokens-per-min",
        ),
        pytest.param(
            429,
            {},
            _openai_error("maximum context length exceeded", "context_length_exceeded"),
            RateLimited,
            id="429-beats-overflow-code",
        ),
        pytest.param(408, {}, "", RetryableError, id="408"),
        pytest.param(
            500, {}, _openai_error("oops", None, "server_error"), RetryableError, id="500"
        ),
        pytest.param(
            502,
            {"content-type": "text/html"},
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
            RetryableError,
            id="502-html",
        ),
        pytest.param(503, {"retry-after": "7"}, "", RetryableError, id="503"),
        pytest.param(504, {}, "", RetryableError, id="504"),
        pytest.param(529, {}, "", RetryableError, id="529"),
        pytest.param(501, {}, "", FatalError, id="501-not-implemented"),
        pytest.param(
            200, {}, _openai_error("boom", "server_error", "server_error"), RetryableError, id="200"
        ),
        pytest.param(
            200,
            {},
            _openai_error("slow down", "rate_limit_exceeded"),
            RateLimited,
            id="200-with-rate-limit-code",
        ),
    ],
)
def test_classify_response_table_follows_rule_9(status, hdrs, body, cls):
    """Each documented example classifies to its design rule 9 type, keeping its status."""
    error = classify_response(status, hdrs, body, now_s=NOW_S)

    assert type(error) is cls
    assert error.status == status


def _anthropic_error(type_, message):
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}})


def _gemini_error(message, code=400, status="INVALID_ARGUMENT"):
    return json.dumps({"error": {"code": code, "message": message, "status": status}})


# OpenAI's and Groq's bodies when one request alone is over the tokens-per-minute limit.
OPENAI_TPM_TOO_LARGE = _openai_error(
    "Request too large for gpt-4o in organization org-abc on tokens per min (TPM): Limit "
    "30000, Requested 39448. The input or output tokens must be reduced in order to run "
    "successfully. Visit https://platform.openai.com/account/rate-limits to learn more.",
    "rate_limit_exceeded",
    "tokens",
)
GROQ_TPM_TOO_LARGE = _openai_error(
    "Request too large for model `llama-3.3-70b-versatile` in organization `org_01abc` "
    "service tier `on_demand` on tokens per minute (TPM): Limit 6000, Requested 14810, please "
    "reduce your message size and try again. Visit https://console.groq.com/docs/rate-limits "
    "for more information.",
    "rate_limit_exceeded",
    "tokens",
)


@pytest.mark.parametrize(
    "body",
    [
        # GitHub Models (OpenAI-compatible), seen with a 413.
        pytest.param(
            json.dumps(
                {
                    "error": {
                        "code": "tokens_limit_reached",
                        "message": "Request body too large for gpt-4o model. Max size: 8000 "
                        "tokens.",
                    }
                }
            ),
            id="openai-compatible-request-body-too-large",
        ),
        # Express body-parser's message, in an OpenAI-compatible proxy's error object.
        pytest.param(
            _openai_error("request entity too large", None, "entity.too.large"),
            id="openai-compatible-request-entity-too-large",
        ),
        # The bare wordings, in each dialect's error object.
        pytest.param(
            _openai_error("content length exceeds the maximum"),
            id="openai-compatible-content-length-exceeds",
        ),
        pytest.param(_openai_error("Payload Too Large"), id="openai-compatible-payload-too-large"),
        pytest.param(
            _anthropic_error("invalid_request_error", "Request too large for model"),
            id="anthropic-request-too-large",
        ),
        # Gemini's answer to a request over its size limit.
        pytest.param(
            _gemini_error("Request payload size exceeds the limit: 314572800 bytes."),
            id="gemini-payload-size-exceeds",
        ),
        # Vertex's wording without "input token count".
        pytest.param(
            _gemini_error("The input exceeds the maximum number of tokens allowed"),
            id="gemini-exceeds-maximum-number-of-tokens",
        ),
    ],
)
@pytest.mark.parametrize("status", [400, 413])
def test_classify_response_oversized_request_is_overflow(status, body):
    """A 400 or 413 saying the request is too large is an overflow: a bigger model may take it."""
    error = classify_response(status, {}, body, now_s=NOW_S)

    assert type(error) is ContextOverflow
    assert error.status == status


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        pytest.param(429, OPENAI_TPM_TOO_LARGE, RateLimited, id="openai-429-tpm"),
        pytest.param(413, GROQ_TPM_TOO_LARGE, ContextOverflow, id="groq-413-tpm"),
        pytest.param(
            400,
            _anthropic_error(
                "invalid_request_error",
                "max_tokens: 10000 > 4096, which is the maximum allowed number of output "
                "tokens for claude-3-5-sonnet-20240620",
            ),
            FatalError,
            id="anthropic-400-max-tokens-setting",
        ),
        pytest.param(
            413,
            "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
            "<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx"
            "</center>\r\n</body>\r\n</html>\r\n",
            ContextOverflow,
            id="nginx-413-html",
        ),
    ],
)
def test_classify_response_size_wording_does_not_overreach(status, body, cls):
    """Size wording never overrides the status or a code ("Request too large" over a
    tokens-per-minute limit stays a rate limit on a 429), and an output-token setting is
    no overflow."""
    assert type(classify_response(status, {}, body, now_s=NOW_S)) is cls


def test_classify_stream_error_tpm_request_too_large_is_rate_limited():
    """In a stream (no status), the rate-limit code wins over the "Request too large" text."""
    error = classify_stream_error(json.loads(OPENAI_TPM_TOO_LARGE), now_s=NOW_S)

    assert type(error) is RateLimited


def test_classify_response_html_page_is_described_not_dumped():
    """An HTML error page's message says what it was, without the markup."""
    page = "<html><body><h1>502 Bad Gateway</h1>" + "x" * 500 + "</body></html>"

    error = classify_response(502, {"Content-Type": "text/html"}, page, now_s=NOW_S)

    assert error.message == f"HTTP 502: an HTML page ({len(page)} bytes)"


def test_classify_response_retry_after_only_on_throttling_statuses():
    """Retry-After is read on 429/503/529 (kept up to a day: it sets the pin), else ignored."""
    assert classify_response(503, {"Retry-After": "7"}, "", now_s=NOW_S).retry_after_s == 7.0
    assert classify_response(429, {"retry-after": "600"}, "", now_s=NOW_S).retry_after_s == 600.0
    assert classify_response(429, {"retry-after": "9999999"}, "", now_s=NOW_S).retry_after_s == (
        86_400.0
    )
    assert classify_response(429, {"retry-after-ms": "1500"}, "", now_s=NOW_S).retry_after_s == 1.5
    assert classify_response(529, {"retry-after": "2"}, "", now_s=NOW_S).retry_after_s == 2.0
    assert classify_response(500, {"retry-after": "7"}, "", now_s=NOW_S).retry_after_s is None


def test_classify_stream_error_gemini_code_is_a_status():
    """An in-stream error carrying an HTTP code (Gemini) is classified by that code."""
    payload = {"error": {"code": 429, "message": "quota", "status": "RESOURCE_EXHAUSTED"}}

    error = classify_stream_error(payload, now_s=NOW_S)

    assert type(error) is RateLimited
    assert error.status == 429


def test_classify_stream_error_overloaded_is_retryable():
    """An in-stream "overloaded" error with no status is retryable."""
    payload = {"error": {"type": "overloaded_error", "message": "Overloaded"}}

    assert type(classify_stream_error(payload, now_s=NOW_S)) is RetryableError


def test_classify_response_secret_is_scrubbed_from_message():
    """A key echoed back in an error body is blanked out of the message."""
    key = "sk-proj-abcdefghijklmnop1234"
    body = _openai_error(f"Incorrect API key provided: {key}", "invalid_api_key")

    error = classify_response(401, {}, body, now_s=NOW_S, secrets=(key,))

    assert key not in error.message
    assert key not in repr(error)
    assert "[redacted]" in error.message


def test_scrub_blanks_keylike_strings_and_cuts_long_text():
    """Key-shaped strings are blanked even when not listed, and messages stay short."""
    text = scrub("token sk-ABCDEFGHIJKLMNOP and Bearer abc.def.ghijkl " + "y" * 1000)

    assert "sk-ABCDEFGHIJKLMNOP" not in text
    assert "abc.def.ghijkl" not in text
    assert len(text) == 300


@pytest.mark.parametrize(
    ("exc", "cls", "message"),
    [
        pytest.param(
            httpx.ConnectTimeout("timed out connecting to api.openai.com:443"),
            ProviderTimeout,
            "connect timeout",
            id="connect-timeout-port-443",
        ),
        pytest.param(
            httpx.ReadTimeout("read timed out (host api.openai.com, port 443)"),
            ProviderTimeout,
            "read timeout",
            id="read-timeout",
        ),
        pytest.param(
            httpx.ConnectError("[Errno 111] Connection refused"),
            RetryableError,
            "connect error: [Errno 111] Connection refused",
            id="connect-error",
        ),
        pytest.param(
            httpx.RemoteProtocolError("peer closed connection: incomplete chunked read"),
            RetryableError,
            "the stream broke: peer closed connection: incomplete chunked read",
            id="cut",
        ),
    ],
)
def test_translated_transport_errors_are_typed_without_a_status(exc, cls, message):
    """httpx exceptions become typed errors by their type; ":443" never becomes a status."""
    with pytest.raises(ProviderError) as caught, translated():
        raise exc

    assert type(caught.value) is cls
    assert caught.value.status is None
    assert caught.value.message == message
    assert caught.value.info() == {"kind": cls.kind, "message": message}
