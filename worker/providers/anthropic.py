"""Anthropic Messages, streamed (``POST {base_url}/v1/messages``).

Request: ``x-api-key`` and ``anthropic-version`` headers; the system prompt at the top
level; messages as content blocks, consecutive same-role messages merged (the API wants
user and assistant turns to alternate); a tool call is a ``tool_use`` block in an assistant
turn and its result a ``tool_result`` block in the next user turn; tools are
``{name, description, input_schema}``; ``max_tokens`` is required, so it comes from the
job, else the model's ``max_tokens``, else :data:`DEFAULT_MAX_TOKENS`.

Stream: named events. ``message_start`` (input usage), then per content block
``content_block_start`` (a text block, or a ``tool_use`` block with its id and name),
``content_block_delta`` (``text_delta``; ``input_json_delta`` carries a tool call's
arguments in pieces), ``content_block_stop``; ``message_delta`` (the stop reason and the
cumulative output usage); ``message_stop``, the end marker. ``ping`` and unknown events or
block types are ignored. An ``error`` event may arrive on the 200 stream, after deltas; it
is classified like an error body (``overloaded_error`` is retryable). A stream that ends
without ``message_stop`` is broken (retryable).
"""

from __future__ import annotations

import json
import re
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
from worker.providers.messages import compact_json, stop_list, tool_input

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
"""``max_tokens`` when neither the job nor the model's config sets one (the API requires it)."""

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Anthropic accepts tool_use ids matching this pattern only; ids minted by other providers
# ("functions.get_weather:0") are rewritten the same way wherever they appear.
_BAD_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def anthropic_id(call_id: str) -> str:
    """``call_id`` as Anthropic accepts it: characters outside ``[A-Za-z0-9_-]`` become ``_``."""
    return _BAD_ID_CHARS.sub("_", call_id)


def _blocks(msg: dict[str, Any], i: int) -> tuple[str, list[dict[str, Any]]]:
    role = msg["role"]
    content = msg.get("content")
    if role == "tool":
        block: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": anthropic_id(str(msg["tool_call_id"])),
        }
        if content:
            block["content"] = content
        return "user", [block]
    blocks: list[dict[str, Any]] = []
    if content:
        blocks.append({"type": "text", "text": content})
    for call in msg.get("tool_calls") or []:
        blocks.append(
            {
                "type": "tool_use",
                "id": anthropic_id(call["id"]),
                "name": call["name"],
                "input": tool_input(call.get("arguments", ""), f"messages[{i}]"),
            }
        )
    return ("assistant" if role == "assistant" else "user"), blocks


def to_anthropic_messages(
    messages: list[dict[str, Any]],
) -> tuple[str | None, list[dict[str, Any]]]:
    """Neutral messages as Anthropic's ``(system, messages)``.

    System messages are joined into the top-level system prompt (Anthropic has no system
    role in the conversation). A tool message becomes a ``tool_result`` block in a user
    turn; consecutive turns of the same role merge, with ``tool_result`` blocks first as
    the API requires. Empty text is dropped (the API rejects empty text blocks).

    Raises:
        FatalError: a tool call's arguments are not a JSON object.
    """
    system = [m["content"] for m in messages if m["role"] == "system" and m.get("content")]
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if msg["role"] == "system":
            continue
        role, blocks = _blocks(msg, i)
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for turn in out:
        if turn["role"] == "user":
            turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    return ("\n\n".join(system) or None), out


def to_anthropic_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        item: dict[str, Any] = {
            "name": tool["name"],
            "input_schema": tool.get("parameters") or {"type": "object", "properties": {}},
        }
        if tool.get("description"):
            item["description"] = tool["description"]
        out.append(item)
    return out


def build_body(model: ModelRef, request: ProviderRequest) -> dict[str, Any]:
    """The request body. ``seed`` has no Anthropic equivalent and is not sent.

    Raises:
        FatalError: the messages cannot be expressed (see :func:`to_anthropic_messages`).
    """
    system, messages = to_anthropic_messages(request.messages)
    params = request.params
    body: dict[str, Any] = {
        "model": model.model,
        "max_tokens": params.get("max_tokens") or model.max_tokens or DEFAULT_MAX_TOKENS,
        "messages": messages,
        "stream": True,
    }
    if system:
        body["system"] = system
    if request.tools:
        body["tools"] = to_anthropic_tools(request.tools)
    if params.get("temperature") is not None:
        body["temperature"] = params["temperature"]
    if params.get("top_p") is not None:
        body["top_p"] = params["top_p"]
    if stop_list(params):
        body["stop_sequences"] = stop_list(params)
    return body


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FatalError(f"unexpected event shape: {what} is not an object")
    return value


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


class AnthropicStream:
    """The parser for one attempt's event stream: feed it events, get deltas.

    Tool calls are numbered 0, 1, … in the order their blocks start (Anthropic's block
    index also counts text blocks), so the pieces join up as OpenAI's do.

    Args:
        secrets: strings to blank out of error messages.
    """

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.done = False
        self._secrets = secrets
        self._tools: dict[int, int] = {}
        self._has_arguments: set[int] = set()
        self._input_tokens = 0
        self._output_tokens = 0

    def feed(self, event: str, data: str, *, now_s: float) -> list[Delta]:
        """The deltas of one SSE event.

        Raises:
            FatalError: malformed JSON or an event of the wrong shape.
            ProviderError: an ``error`` event (classified by its type).
        """
        if event == "ping":
            return []
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            raise FatalError("malformed JSON in the event stream") from None
        payload = _obj(payload, "the event")
        # The event name is the SSE field; a stream without event lines names it in `type`.
        kind = event if event and event != "message" else str(payload.get("type"))
        if kind == "error":
            raise classify_stream_error(payload, now_s=now_s, secrets=self._secrets)
        handler = _HANDLERS.get(kind)
        return handler(self, payload) if handler is not None else []

    def _usage(self, usage: Any) -> list[Delta]:
        if not isinstance(usage, dict):
            return []
        # Cached prompt tokens are reported apart from input_tokens; all of them are input.
        parts = [
            _count(usage.get(k))
            for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        ]
        if any(p is not None for p in parts):
            self._input_tokens = sum(p or 0 for p in parts)
        output = _count(usage.get("output_tokens"))
        if output is not None:
            self._output_tokens = output
        return [Delta(usage=Usage(self._input_tokens, self._output_tokens))]

    def _message_start(self, payload: dict[str, Any]) -> list[Delta]:
        message = _obj(payload.get("message"), "message_start.message")
        return self._usage(message.get("usage"))

    def _index(self, payload: dict[str, Any]) -> int:
        index = payload.get("index")
        if type(index) is not int:
            raise FatalError("unexpected event shape: a content block without an index")
        return index

    def _block_start(self, payload: dict[str, Any]) -> list[Delta]:
        index = self._index(payload)
        block = _obj(payload.get("content_block"), "content_block_start.content_block")
        if block.get("type") == "text":
            text = block.get("text")
            return [Delta(text=text)] if isinstance(text, str) and text else []
        if block.get("type") != "tool_use":
            return []
        ordinal = len(self._tools)
        self._tools[index] = ordinal
        call_id, name = block.get("id"), block.get("name")
        out = [
            Delta(
                tool_call=ToolCallPiece(
                    index=ordinal,
                    id=call_id if isinstance(call_id, str) else None,
                    name=name if isinstance(name, str) else None,
                )
            )
        ]
        initial = block.get("input")
        if isinstance(initial, dict) and initial:
            self._has_arguments.add(index)
            piece = ToolCallPiece(index=ordinal, arguments=compact_json(initial))
            out.append(Delta(tool_call=piece))
        return out

    def _block_delta(self, payload: dict[str, Any]) -> list[Delta]:
        index = self._index(payload)
        delta = _obj(payload.get("delta"), "content_block_delta.delta")
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                raise FatalError("unexpected event shape: text_delta without text")
            return [Delta(text=text)] if text else []
        if kind == "input_json_delta" and index in self._tools:
            piece = delta.get("partial_json")
            if not isinstance(piece, str):
                raise FatalError("unexpected event shape: input_json_delta without partial_json")
            if not piece:
                return []
            self._has_arguments.add(index)
            return [Delta(tool_call=ToolCallPiece(index=self._tools[index], arguments=piece))]
        # thinking_delta, signature_delta, citations_delta, a server tool's input: not ours.
        return []

    def _block_stop(self, payload: dict[str, Any]) -> list[Delta]:
        index = self._index(payload)
        if index in self._tools and index not in self._has_arguments:
            # A call without arguments streams none; say "{}" as OpenAI does.
            self._has_arguments.add(index)
            return [Delta(tool_call=ToolCallPiece(index=self._tools[index], arguments="{}"))]
        return []

    def _message_delta(self, payload: dict[str, Any]) -> list[Delta]:
        out: list[Delta] = []
        delta = payload.get("delta")
        reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if isinstance(reason, str):
            out.append(Delta(finish_reason=_FINISH.get(reason, reason)))
        return out + self._usage(payload.get("usage"))

    def _message_stop(self, payload: dict[str, Any]) -> list[Delta]:
        self.done = True
        return [Delta(done=True)]


_HANDLERS = {
    "message_start": AnthropicStream._message_start,
    "content_block_start": AnthropicStream._block_start,
    "content_block_delta": AnthropicStream._block_delta,
    "content_block_stop": AnthropicStream._block_stop,
    "message_delta": AnthropicStream._message_delta,
    "message_stop": AnthropicStream._message_stop,
}


def endpoint(base_url: str) -> str:
    """The messages URL; a ``base_url`` that already ends in ``/v1`` is taken as is."""
    base = base_url.rstrip("/")
    return f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"


class AnthropicProvider(SSEProvider):
    """Streams messages from the Anthropic API (or anything speaking it)."""

    end_marker = "message_stop"

    def prepare(self, model: ModelRef, request: ProviderRequest, key: str | None) -> Call:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            headers["x-api-key"] = key
        parser = AnthropicStream((key,) if key else ())
        return Call(
            url=endpoint(model.base_url),
            headers=headers,
            body=build_body(model, request),
            feed=lambda sse: parser.feed(sse.event, sse.data, now_s=self._clock.time()),
        )
