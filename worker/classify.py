"""Turn an upstream failure into one typed :class:`~worker.errors.ProviderError`.

Design rule 9 (docs/design.md), in this order and no other:

1. the HTTP status code (429 is a rate limit whatever its text says; 408/5xx are
   transient; 413 is a context overflow; other 4xx are fatal unless steps 2-3 say overflow);
2. the provider's error code or type in the body (OpenAI ``context_length_exceeded``,
   Anthropic ``overloaded_error``, Gemini ``RESOURCE_EXHAUSTED`` …);
3. the message text, last, with word boundaries only ("prompt is too long", "maximum
   context length", "request too large", "payload too large", "maximum number of
   tokens" …).

No number is ever read out of text: a status comes from the status line alone, so a "500"
in a prompt or ":443" in an address never becomes one. Everything here is pure: no I/O,
no state, total over any input (Hypothesis checks that it never raises).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.errors import (
    ContextOverflow,
    FatalError,
    ProviderError,
    RateLimited,
    RetryableError,
)
from worker.retry import parse_retry_after

MESSAGE_MAX_CHARS = 300

# Transient statuses: the design's list, plus the other 5xx a proxy or CDN sends for a
# struggling origin (520-524 …). 501 and 505 say the request can never work there.
_FATAL_5XX = frozenset({501, 505})
_RETRY_AFTER_STATUSES = frozenset({429, 503, 529})

_RETRYABLE_CODES = frozenset(
    {
        "server_error",
        "api_error",
        "overloaded_error",
        "overloaded",
        "internal_error",
        "internal",
        "unavailable",
        "service_unavailable",
        "timeout",
        "deadline_exceeded",
    }
)
_RATE_LIMIT_CODES = frozenset(
    {"rate_limit_exceeded", "rate_limit_error", "resource_exhausted", "insufficient_quota"}
)
_OVERFLOW_CODES = frozenset(
    {"context_length_exceeded", "request_too_large", "string_above_max_length"}
)

# An oversized request ("Request too large", "Payload Too Large" …) is an overflow too: a
# model with a larger window or size limit may take it. On a 429 the status decides first,
# so OpenAI's "Request too large … on tokens per min" stays a rate limit.
_OVERFLOW_TEXT = re.compile(
    r"\b(prompt is too long|maximum context length|context length exceeded|"
    r"context window|too many tokens|input is too long|exceeds the model's max|"
    r"token limit|reduce the length|reduce your prompt|input token count|"
    r"maximum number of tokens|request (?:body |entity )?too large|payload too large|"
    r"payload size exceeds|content length exceeds)\b",
    re.IGNORECASE,
)
_RATE_LIMIT_TEXT = re.compile(r"\b(rate limit(ed)?|too many requests)\b", re.IGNORECASE)
_RETRYABLE_TEXT = re.compile(
    r"\b(overloaded|internal server error|service unavailable|bad gateway|"
    r"gateway timeout|temporarily unavailable)\b",
    re.IGNORECASE,
)
_KEYLIKE = re.compile(
    r"(?i)\b(sk-[A-Za-z0-9_\-]{8,}|AIza[0-9A-Za-z_\-]{20,}|bearer\s+[A-Za-z0-9._\-]{8,})"
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Cut ``text`` short and blank out the given secrets and anything shaped like a key."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    text = _KEYLIKE.sub("[redacted]", text)
    text = " ".join(text.split())
    if len(text) > MESSAGE_MAX_CHARS:
        text = text[: MESSAGE_MAX_CHARS - 1] + "…"
    return text


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What a provider's error body says, in any of the three dialects."""

    code: str | None = None
    message: str | None = None
    retry_after_s: float | None = None


def _parse_gemini_delay(details: Any) -> float | None:
    if not isinstance(details, list):
        return None
    for item in details:
        if isinstance(item, dict) and isinstance(item.get("retryDelay"), str):
            text = item["retryDelay"].strip()
            if text.endswith("s"):
                try:
                    value = float(text[:-1])
                except ValueError:
                    return None
                return value if value >= 0 else None
    return None


def parse_error_body(payload: Any) -> ErrorBody:
    """Read the code and message from an OpenAI, Anthropic or Gemini error object.

    Shapes: ``{"error": {"message", "type", "code"}}`` (OpenAI),
    ``{"type": "error", "error": {"type", "message"}}`` (Anthropic),
    ``{"error": {"code": 429, "message", "status", "details"}}`` (Gemini), and a list
    holding one of these (Gemini streams). Anything else gives an empty :class:`ErrorBody`.
    """
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if not isinstance(payload, dict):
        return ErrorBody()
    err = payload.get("error")
    if isinstance(err, str):
        return ErrorBody(message=err)
    if not isinstance(err, dict):
        if isinstance(payload.get("message"), str):
            return ErrorBody(message=payload["message"])
        return ErrorBody()
    code: str | None = None
    # The most specific field wins: OpenAI's `code` says more than its `type`
    # ("context_length_exceeded" vs "invalid_request_error"); Gemini's `status` is its code.
    for field in ("code", "status", "type"):
        value = err.get(field)
        if isinstance(value, str) and value:
            code = value
            break
    message = err.get("message")
    return ErrorBody(
        code=code,
        message=message if isinstance(message, str) else None,
        retry_after_s=_parse_gemini_delay(err.get("details")),
    )


def decode_body(body: bytes | str) -> Any:
    """The body as JSON when it is JSON, else None."""
    try:
        return json.loads(body)
    except (ValueError, TypeError, RecursionError):
        return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _retry_after(headers: Mapping[str, str], body: ErrorBody, now_s: float) -> float | None:
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0:
            return parse_retry_after(str(value), now_s=now_s)
    parsed = parse_retry_after(_header(headers, "retry-after"), now_s=now_s)
    if parsed is None and body.retry_after_s is not None:
        parsed = parse_retry_after(str(body.retry_after_s), now_s=now_s)
    return parsed


def _from_code_or_text(body: ErrorBody) -> type[ProviderError] | None:
    code = (body.code or "").lower()
    if code in _OVERFLOW_CODES:
        return ContextOverflow
    if code in _RATE_LIMIT_CODES:
        return RateLimited
    if code in _RETRYABLE_CODES:
        return RetryableError
    text = body.message or ""
    if _OVERFLOW_TEXT.search(text):
        return ContextOverflow
    if _RATE_LIMIT_TEXT.search(text):
        return RateLimited
    if _RETRYABLE_TEXT.search(text):
        return RetryableError
    return None


def _describe(status: int | None, body: ErrorBody, fallback: str) -> str:
    head = f"HTTP {status}" if status is not None else "upstream error"
    detail = body.message or fallback
    code = f" [{body.code}]" if body.code else ""
    return f"{head}{code}: {detail}"


def classify_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes | str,
    *,
    now_s: float,
    secrets: Iterable[str] = (),
) -> ProviderError:
    """Classify a finished HTTP response that did not carry a stream.

    Args:
        status: the HTTP status (a 2xx here means "a 200 whose body is an error").
        headers: the response headers.
        body: the (already bounded) response body.
        now_s: epoch seconds, for Retry-After HTTP-dates.
        secrets: strings to blank out of the message (the API key in use).
    """
    payload = decode_body(body)
    parsed = parse_error_body(payload)
    if payload is None:
        content_type = (_header(headers, "content-type") or "").lower()
        kind = "an HTML page" if "html" in content_type else "a non-JSON body"
        fallback = f"{kind} ({len(body)} bytes)"
    else:
        fallback = "no message"
    message = scrub(_describe(status, parsed, fallback), secrets)
    retry_after = _retry_after(headers, parsed, now_s) if status in _RETRY_AFTER_STATUSES else None

    cls: type[ProviderError]
    if status == 429:
        cls = RateLimited
    elif status == 408 or (500 <= status <= 599 and status not in _FATAL_5XX):
        cls = RetryableError
    elif status == 413:
        cls = ContextOverflow
    elif 400 <= status <= 499:
        cls = ContextOverflow if _from_code_or_text(parsed) is ContextOverflow else FatalError
    elif 200 <= status <= 299:
        # A 200 whose body is an error: only the body can say what happened. An error
        # nobody recognises is treated as transient, like a broken stream.
        cls = _from_code_or_text(parsed) or RetryableError
    else:
        cls = FatalError
    return cls(message, status=status, retry_after_s=retry_after, provider_code=parsed.code)


def classify_stream_error(
    payload: Any, *, now_s: float, secrets: Iterable[str] = ()
) -> ProviderError:
    """Classify an error object that arrived inside a 200 stream (no status to go by).

    Anthropic's ``event: error`` and OpenAI's ``data: {"error": …}`` land here. An HTTP
    status inside the object (Gemini's ``error.code``) is used as a status would be.
    """
    parsed = parse_error_body(payload)
    err = payload.get("error") if isinstance(payload, dict) else None
    inner_status = err.get("code") if isinstance(err, dict) else None
    if type(inner_status) is int and 400 <= inner_status <= 599:
        text = json.dumps(payload)
        return classify_response(inner_status, {}, text, now_s=now_s, secrets=secrets)
    cls = _from_code_or_text(parsed) or RetryableError
    message = scrub(_describe(None, parsed, "error event in the stream"), secrets)
    retry_after = None
    if cls is RateLimited and parsed.retry_after_s is not None:
        retry_after = parse_retry_after(str(parsed.retry_after_s), now_s=now_s)
    return cls(message, retry_after_s=retry_after, provider_code=parsed.code)
