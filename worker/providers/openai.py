"""OpenAI-compatible chat completions, streamed (``POST {base_url}/chat/completions``).

Wire format: ``data: {chunk}`` events, no event names, ending with ``data: [DONE]``. Text
comes in ``choices[0].delta.content``, tool calls as pieces in ``delta.tool_calls`` keyed by
``index``, the finish reason on the last content chunk, and usage in one extra chunk with
``choices: []`` because we ask for ``stream_options.include_usage``. An error may arrive
inside the stream as ``data: {"error": {...}}``.
"""

from __future__ import annotations

import json
from typing import Any

from worker.agents import ModelRef
from worker.classify import classify_stream_error
from worker.errors import FatalError
from worker.providers.base import (
    Call,
    Delta,
    ProviderRequest,
    SSEProvider,
    ToolCallPiece,
    Usage,
)

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The design's neutral messages in OpenAI's shape (tool calls nest under ``function``)."""
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


def _shape_error(what: str) -> FatalError:
    return FatalError(f"unexpected chunk shape: {what}")


def _object(value: Any, what: str) -> dict[str, Any]:
    """``value`` as a JSON object; None counts as empty (OpenAI sends ``"delta": null``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _shape_error(f"{what} is not an object")
    return value


def _optional_str(value: Any, what: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _shape_error(f"{what} is not a string")


def _count(value: Any, what: str) -> int:
    """A token count or an index: a non-negative integer (None counts as 0)."""
    if value is None:
        return 0
    # Some OpenAI-compatible servers send counts as floats (12.0): whole ones are fine.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _shape_error(f"{what} is not a non-negative integer")
    return value


def _tool_call_piece(piece: Any) -> ToolCallPiece:
    piece = _object(piece, "a tool call")
    function = _object(piece.get("function"), "a tool call's function")
    return ToolCallPiece(
        index=_count(piece.get("index"), "a tool call's index"),
        id=_optional_str(piece.get("id"), "a tool call's id"),
        name=_optional_str(function.get("name"), "a tool call's name"),
        arguments=_optional_str(function.get("arguments"), "a tool call's arguments") or "",
    )


def parse_chunk(data: str, *, now_s: float, secrets: tuple[str, ...]) -> list[Delta]:
    """The deltas of one ``data:`` payload.

    The payload is checked whole before its deltas are returned, so a malformed chunk
    gives none. Called for every chunk of every stream: a list (no generator), and no
    work for the fields a chunk does not have.

    Raises:
        FatalError: the payload is not a chunk (malformed JSON or shape).
        ProviderError: the payload is an in-stream error object.
    """
    if data == "[DONE]":
        return [Delta(done=True)]
    try:
        chunk = json.loads(data)
    except (ValueError, RecursionError):
        raise FatalError("malformed JSON in the event stream") from None
    if not isinstance(chunk, dict):
        raise FatalError("unexpected event in the stream: not a JSON object")
    if "error" in chunk:
        raise classify_stream_error(chunk, now_s=now_s, secrets=secrets)
    choices = chunk.get("choices") or []
    if not isinstance(choices, list):
        raise _shape_error("choices is not a list")
    deltas: list[Delta] = []
    for choice in choices:
        choice = _object(choice, "a choice")
        delta = _object(choice.get("delta"), "a choice's delta")
        content = _optional_str(delta.get("content"), "a delta's content")
        if content:
            deltas.append(Delta(text=content))
        pieces = delta.get("tool_calls")
        if pieces:
            if not isinstance(pieces, list):
                raise _shape_error("tool_calls is not a list")
            deltas += [Delta(tool_call=_tool_call_piece(piece)) for piece in pieces]
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            deltas.append(Delta(finish_reason=_FINISH.get(reason, reason)))
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        deltas.append(
            Delta(
                usage=Usage(
                    input_tokens=_count(usage.get("prompt_tokens"), "usage.prompt_tokens"),
                    output_tokens=_count(usage.get("completion_tokens"), "usage.completion_tokens"),
                )
            )
        )
    return deltas


class OpenAIProvider(SSEProvider):
    """Streams chat completions from any OpenAI-compatible API."""

    end_marker = "[DONE]"

    def prepare(self, model: ModelRef, request: ProviderRequest, key: str | None) -> Call:
        secrets = (key,) if key else ()
        return Call(
            url=f"{model.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            body=build_body(model, request),
            feed=lambda sse: parse_chunk(sse.data, now_s=self._clock.time(), secrets=secrets),
        )
