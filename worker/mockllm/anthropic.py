"""The Anthropic Messages dialect of the mock upstream (``POST /v1/messages``).

Frames follow the documented stream: ``message_start`` (input usage), a text block
(``content_block_start``, a ``ping``, one ``text_delta`` per chunk, ``content_block_stop``),
one ``tool_use`` block per scripted tool call (its arguments in two ``input_json_delta``
pieces), ``message_delta`` (stop reason, cumulative output usage) and ``message_stop``,
the end marker. Errors use Anthropic's body, ``{"type": "error", "error": {"type",
"message"}, "request_id"}``, and an in-stream error is an ``event: error`` frame.

A reply's ``finish`` may be neutral (``stop``, ``length``, ``tool_calls``,
``content_filter``) or Anthropic's own stop reason (``end_turn``, ``refusal`` …).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from worker.mockllm.dialect import Frame, sse
from worker.mockllm.scenarios import Reply

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low."),
    403: ("permission_error", "Your API key does not have permission to use the resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}
# The scenario language's defaults are OpenAI's codes; say them the Anthropic way.
_ERROR_TYPES = {
    "server_error": "api_error",
    "rate_limit_exceeded": "rate_limit_error",
    "overloaded": "overloaded_error",
}


def error_type(code: str) -> str:
    return _ERROR_TYPES.get(code, code)


def _arguments(call: Mapping[str, str]) -> str:
    return call.get("arguments", "{}") or "{}"


def _input(call: Mapping[str, str]) -> Any:
    try:
        return json.loads(_arguments(call))
    except ValueError:
        return {"arguments": _arguments(call)}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return ""


def read_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A request body read back into neutral messages (one per block, in order).

    A user turn's ``tool_result`` blocks become tool messages; an assistant turn's
    ``tool_use`` blocks become that message's ``tool_calls``. The mock uses it for the
    prompt text; tests use it to check that adapters' requests mean what they should.
    """
    out: list[dict[str, Any]] = []
    system = _text_of(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for turn in body.get("messages") or []:
        if not isinstance(turn, dict):
            continue
        role, content = turn.get("role"), turn.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        assistant: dict[str, Any] | None = None
        for block in blocks if isinstance(blocks, list) else []:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "tool_result":
                result = _text_of(block.get("content"))
                out.append(
                    {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result}
                )
            elif role == "assistant":
                if assistant is None:
                    assistant = {"role": "assistant"}
                    out.append(assistant)
                if kind == "text":
                    assistant["content"] = assistant.get("content", "") + block.get("text", "")
                elif kind == "tool_use":
                    call = {
                        "id": block.get("id"),
                        "name": block.get("name"),
                        "arguments": json.dumps(block.get("input", {})),
                    }
                    assistant.setdefault("tool_calls", []).append(call)
            elif kind == "text":
                out.append({"role": "user", "content": block.get("text", "")})
    return out


class AnthropicDialect:
    name = "anthropic"
    content_type = "text/event-stream"

    def matches(self, path: str) -> bool:
        return path.rstrip("/").endswith("/v1/messages")

    def model(self, path: str, body: Mapping[str, Any]) -> str:
        return str(body.get("model", ""))

    def wants_stream(self, path: str, body: Mapping[str, Any]) -> bool:
        return bool(body.get("stream"))

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        return "\n".join(m.get("content") or "" for m in read_messages(body))

    def stop_reason(self, reply: Reply) -> str:
        if reply.tool_calls and reply.finish == "stop":
            return "tool_use"
        if reply.finish.startswith("prompt_blocked"):
            # Gemini's blocked prompt (see the Gemini dialect) is a refusal here.
            return "refusal"
        return _STOP_REASONS.get(reply.finish, reply.finish)

    def frames(
        self,
        reply: Reply,
        chunks: list[str],
        model: str,
        prompt_tokens: int,
        body: Mapping[str, Any],
    ) -> list[Frame]:
        def event(name: str, payload: dict[str, Any]) -> bytes:
            return sse(json.dumps({"type": name, **payload}), event=name)

        message: dict[str, Any] = {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if reply.usage:
            message["usage"] = {"input_tokens": prompt_tokens, "output_tokens": 1}
        out = [Frame(event("message_start", {"message": message}))]
        index = 0
        if chunks:
            text_block = {"type": "text", "text": ""}
            start = {"index": 0, "content_block": text_block}
            out.append(Frame(event("content_block_start", start)))
            out.append(Frame(event("ping", {})))
            for chunk in chunks:
                delta = {"type": "text_delta", "text": chunk}
                payload = {"index": 0, "delta": delta}
                out.append(Frame(event("content_block_delta", payload), delta=True))
            out.append(Frame(event("content_block_stop", {"index": 0})))
            index = 1
        for i, call in enumerate(reply.tool_calls):
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": call.get("id", f"toolu_mock_{i}"),
                "name": call["name"],
                "input": {},
            }
            start = {"index": index, "content_block": block}
            out.append(Frame(event("content_block_start", start), delta=True))
            arguments = _arguments(call)
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                if piece:
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    payload = {"index": index, "delta": delta}
                    out.append(Frame(event("content_block_delta", payload), delta=True))
            out.append(Frame(event("content_block_stop", {"index": index})))
            index += 1
        stop: dict[str, Any] = {
            "delta": {"stop_reason": self.stop_reason(reply), "stop_sequence": None}
        }
        if reply.usage:
            stop["usage"] = {"output_tokens": len(chunks) + len(reply.tool_calls)}
        out.append(Frame(event("message_delta", stop)))
        out.append(Frame(event("message_stop", {}), end_marker=True))
        return out

    def whole(self, reply: Reply, text: str, model: str, prompt_tokens: int) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        content += [
            {
                "type": "tool_use",
                "id": call.get("id", f"toolu_mock_{i}"),
                "name": call["name"],
                "input": _input(call),
            }
            for i, call in enumerate(reply.tool_calls)
        ]
        return {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": self.stop_reason(reply),
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": len(text.split())},
        }

    def error_body(
        self, status: int, message: str | None, error_code: str | None
    ) -> dict[str, Any]:
        kind, default = _ERRORS.get(
            status, ("api_error" if status >= 500 else "invalid_request_error", f"HTTP {status}")
        )
        return {
            "type": "error",
            "error": {
                "type": error_type(error_code) if error_code else kind,
                "message": message or default,
            },
            "request_id": "req_mock",
        }

    def stream_error(self, error_code: str, message: str) -> bytes:
        payload = {"type": "error", "error": {"type": error_type(error_code), "message": message}}
        return sse(json.dumps(payload), event="error")

    def garbage(self) -> bytes:
        return sse(
            '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "te',
            event="content_block_delta",
        )
