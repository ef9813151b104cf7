"""OpenAI-compatible chat completions, streamed (``POST {base_url}/chat/completions``).

Wire format: ``data: {chunk}`` events, no event names, ending with ``data: [DONE]``. Text
comes in ``choices[0].delta.content``, tool calls as pieces in ``delta.tool_calls`` keyed by
``index``, the finish reason on the last content chunk, and usage in one extra chunk with
``choices: []`` because we ask for ``stream_options.include_usage``. An error may arrive
inside the stream as ``data: {"error": {...}}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from worker.agents import ModelRef
from worker.classify import classify_stream_error
from worker.clock import Clock
from worker.errors import FatalError, RetryableError
from worker.providers.base import (
    Delta,
    ProviderRequest,
    ToolCallPiece,
    Usage,
    open_stream,
    translated,
)

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DESIGN's neutral messages in OpenAI's shape (tool calls nest under ``function``)."""
    out: list[dict[str, Any]] = []
    for msg in messages:
        item: dict[str, Any] = {"role": msg["role"], "content": msg.get("content")}
        if msg.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call.get("arguments", "")},
                }
                for call in msg["tool_calls"]
            ]
        if msg.get("tool_call_id"):
            item["tool_call_id"] = msg["tool_call_id"]
        out.append(item)
    return out


def to_openai_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool["name"],
                "description": tool.get("description", ""),
                "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
            },
        }
        for tool in tools
    ]


def build_body(model: ModelRef, request: ProviderRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model.model,
        "messages": to_openai_messages(request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if request.tools:
        body["tools"] = to_openai_tools(request.tools)
    body.update(request.params)
    if "max_tokens" not in body and model.max_tokens is not None:
        body["max_tokens"] = model.max_tokens
    return body


def parse_chunk(data: str, *, now_s: float, secrets: tuple[str, ...]) -> Iterator[Delta]:
    """The deltas of one ``data:`` payload.

    Raises:
        FatalError: the payload is not a chunk (malformed JSON or shape).
        ProviderError: the payload is an in-stream error object.
    """
    if data == "[DONE]":
        yield Delta(done=True)
        return
    try:
        chunk = json.loads(data)
    except ValueError:
        raise FatalError("malformed JSON in the event stream") from None
    if not isinstance(chunk, dict):
        raise FatalError("unexpected event in the stream: not a JSON object")
    if "error" in chunk:
        raise classify_stream_error(chunk, now_s=now_s, secrets=secrets)
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise FatalError("unexpected chunk shape: choices is not a list")
    for choice in choices:
        if not isinstance(choice, dict):
            raise FatalError("unexpected chunk shape: a choice is not an object")
        delta = choice.get("delta") or {}
        content = delta.get("content")
        if isinstance(content, str) and content:
            yield Delta(text=content)
        for piece in delta.get("tool_calls") or []:
            function = piece.get("function") or {}
            yield Delta(
                tool_call=ToolCallPiece(
                    index=int(piece.get("index", 0)),
                    id=piece.get("id"),
                    name=function.get("name"),
                    arguments=function.get("arguments") or "",
                )
            )
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            yield Delta(finish_reason=_FINISH.get(reason, reason))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        yield Delta(
            usage=Usage(
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
            )
        )


class OpenAIProvider:
    """Streams chat completions from any OpenAI-compatible API."""

    def __init__(self, client: httpx.Client, clock: Clock) -> None:
        self._client = client
        self._clock = clock

    def stream(self, model: ModelRef, request: ProviderRequest) -> Iterator[Delta]:
        key = model.api_key()
        secrets = (key,) if key else ()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = f"{model.base_url}/chat/completions"
        with open_stream(
            self._client,
            url,
            headers=headers,
            body=build_body(model, request),
            model=model,
            secrets=secrets,
            clock=self._clock,
        ) as source:
            done = False
            with translated(secrets):
                for sse in source.iter_sse():
                    if done:
                        # Read to the end of the body after the end marker, so the
                        # connection goes back to the pool instead of being closed.
                        continue
                    for delta in parse_chunk(sse.data, now_s=self._clock.time(), secrets=secrets):
                        done = done or delta.done
                        yield delta
        if not done:
            raise RetryableError("the stream ended without its end marker [DONE]")
