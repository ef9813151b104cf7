"""The request body: what cannot be encoded fails the attempt, and never carries the prompt."""

from __future__ import annotations

from typing import Any

import pytest

from tests.wire import model_ref, replay, transcript
from worker.errors import FatalError
from worker.providers.anthropic import AnthropicProvider
from worker.providers.base import ProviderRequest, request_content
from worker.providers.gemini import GeminiProvider
from worker.providers.openai import OpenAIProvider

pytestmark = pytest.mark.unit

CANARY = "canary-7f3a-prompt-text"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": [{"content": f"{CANARY} \ud800"}]}, id="surrogate"),
        pytest.param({"messages": [{"content": CANARY}], "x": float("nan")}, id="nan"),
        pytest.param({"messages": [{"content": CANARY}], "x": b"bytes"}, id="not-json"),
    ],
)
def test_a_body_that_cannot_be_encoded_is_fatal_and_names_only_the_class(
    body: dict[str, Any],
) -> None:
    """The encoder's own error (a UnicodeEncodeError holds the whole body) is not kept
    where a traceback or a log line would print it."""
    with pytest.raises(FatalError) as caught:
        request_content(body)

    error = caught.value
    assert error.message.startswith("the request cannot be encoded as JSON (")
    assert CANARY not in repr(error)
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_a_request_that_cannot_be_encoded_fails_the_attempt_without_sending() -> None:
    """A prompt with a lone surrogate: the attempt fails (fatal), nothing is sent, and the
    error holds nothing of the prompt."""
    request = ProviderRequest(messages=[{"role": "user", "content": f"{CANARY} \ud800"}])

    result = replay(OpenAIProvider, b"data: [DONE]\n\n", model=model_ref("openai"), request=request)

    assert isinstance(result.error, FatalError)
    assert CANARY not in repr(result.error)
    assert result.requests == []


@pytest.mark.parametrize(
    "provider", [AnthropicProvider, GeminiProvider], ids=["anthropic", "gemini"]
)
@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        pytest.param('{"a": NaN}', "not valid JSON", id="nan"),
        pytest.param('{"a": -Infinity}', "not valid JSON", id="infinity"),
        pytest.param('{"a": 1e999}', "not a finite number", id="overflow"),
        pytest.param('{"a": ' + "[" * 200 + "]" * 200 + "}", "deeper than", id="deep"),
        pytest.param('{"a": ' + "[" * 5_000 + "]" * 5_000 + "}", "not valid JSON", id="deeper"),
    ],
)
def test_tool_call_arguments_no_request_can_carry_fail_before_sending(
    provider: Any, arguments: str, says: str
) -> None:
    """Arguments parsed into the object Anthropic and Gemini want must be sendable JSON."""
    name = "anthropic" if provider is AnthropicProvider else "gemini"
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "name": "f", "arguments": arguments}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]

    result = replay(
        provider,
        transcript(name, "text"),
        model=model_ref(name),
        request=ProviderRequest(messages=messages),
    )

    assert isinstance(result.error, FatalError)
    assert result.error.message.startswith("messages[1]: tool call arguments")
    assert says in result.error.message
    assert result.requests == []
