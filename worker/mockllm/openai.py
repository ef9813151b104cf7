"""The OpenAI chat-completions dialect of the mock upstream.

Frames follow the documented stream: a first chunk with ``role: assistant`` and empty
content, content (or tool-call) chunks, a chunk carrying ``finish_reason``, a usage chunk
with ``choices: []`` when the request asked for it, then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from worker.mockllm.dialect import Frame, sse
from worker.mockllm.scenarios import Reply

_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout", None, "Request timed out."),
    413: ("invalid_request_error", "request_too_large", "Request too large."),
    422: ("invalid_request_error", None, "Unprocessable request."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}


class OpenAIDialect:
    name = "openai"
    content_type = "text/event-stream"

    def matches(self, path: str) -> bool:
        return path.rstrip("/").endswith("/chat/completions")

    def model(self, path: str, body: Mapping[str, Any]) -> str:
        return str(body.get("model", ""))

    def wants_stream(self, path: str, body: Mapping[str, Any]) -> bool:
        return bool(body.get("stream"))

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        parts = []
        for msg in body.get("messages") or []:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, str):
                parts.append(content)
        return "\n".join(parts)

    def frames(
        self,
        reply: Reply,
        chunks: list[str],
        model: str,
        prompt_tokens: int,
        body: Mapping[str, Any],
    ) -> list[Frame]:
        base = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                **base,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "usage": None,
            }
            return sse(json.dumps(payload))

        out = [Frame(chunk({"role": "assistant", "content": ""}))]
        out += [Frame(chunk({"content": c}), delta=True) for c in chunks]
        for i, call in enumerate(reply.tool_calls):
            head = {
                "index": i,
                "id": call.get("id", f"call_mock_{i}"),
                "type": "function",
                "function": {"name": call["name"], "arguments": ""},
            }
            out.append(Frame(chunk({"tool_calls": [head]}), delta=True))
            arguments = call.get("arguments", "{}")
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                if piece:
                    part = {"index": i, "function": {"arguments": piece}}
                    out.append(Frame(chunk({"tool_calls": [part]}), delta=True))
        finish = "tool_calls" if reply.tool_calls and reply.finish == "stop" else reply.finish
        out.append(Frame(chunk({}, finish)))
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if reply.usage and wants_usage:
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(chunks),
                "total_tokens": prompt_tokens + len(chunks),
            }
            out.append(Frame(sse(json.dumps({**base, "choices": [], "usage": usage}))))
        out.append(Frame(sse("[DONE]"), end_marker=True))
        return out

    def whole(self, reply: Reply, text: str, model: str, prompt_tokens: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reply.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.get("id", f"call_mock_{i}"),
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c.get("arguments", "{}")},
                }
                for i, c in enumerate(reply.tool_calls)
            ]
        completion_tokens = len(text.split())
        return {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def error_body(
        self, status: int, message: str | None, error_code: str | None
    ) -> dict[str, Any]:
        kind, code, default = _ERRORS.get(
            status,
            ("server_error" if status >= 500 else "invalid_request_error", None, f"HTTP {status}"),
        )
        return {
            "error": {
                "message": message or default,
                "type": kind,
                "param": None,
                "code": error_code or code,
            }
        }

    def stream_error(self, error_code: str, message: str) -> bytes:
        return sse(
            json.dumps({"error": {"message": message, "type": error_code, "code": error_code}})
        )

    def garbage(self) -> bytes:
        return sse('{"id": "chatcmpl-mock", "choices": [{"delta": {"content": "tru')
