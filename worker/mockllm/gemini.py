"""The Gemini dialect of the mock upstream (``POST /v1beta/models/{model}:…GenerateContent``).

The model is named in the path. ``:streamGenerateContent`` streams over SSE (the mock
always answers in the ``alt=sse`` form the adapter asks for): one ``data:`` event per text
chunk or function call, each a whole ``GenerateContentResponse`` with cumulative
``usageMetadata``, then a last event carrying ``finishReason`` (the end marker), with an
empty text part as Gemini sends it. Function calls have no ids, as in Gemini.
``:generateContent`` answers with one response object.

A reply's ``finish`` may be neutral (``stop``, ``length``, ``content_filter``) or a Gemini
finish reason (``SAFETY``, ``RECITATION`` …): a safety finish ends the stream with that
reason after whatever text came before. ``finish="prompt_blocked"`` (or
``"prompt_blocked:PROHIBITED_CONTENT"``) answers as Gemini does for a blocked prompt: a
single event with ``promptFeedback.blockReason`` and no candidates.

Errors use Google's body, ``{"error": {"code", "message", "status"}}``; an in-stream error
is that object in a ``data:`` event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from worker.mockllm.dialect import Frame, sse
from worker.mockllm.scenarios import Reply

PROMPT_BLOCKED = "prompt_blocked"
_FINISH = {"stop": "STOP", "tool_calls": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
_STATUSES: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "models/unknown is not found for API version v1beta."),
    408: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
    409: ("ABORTED", "The operation was aborted."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "An internal error has occurred. Please retry or report the problem."),
    501: ("UNIMPLEMENTED", "Operation is not implemented."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}
# In-stream errors are scripted by code; these are the HTTP statuses Google pairs them with.
_STREAM_ERRORS = {
    "server_error": 500,
    "api_error": 500,
    "internal": 500,
    "overloaded": 503,
    "overloaded_error": 503,
    "unavailable": 503,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "resource_exhausted": 429,
    "deadline_exceeded": 504,
    "invalid_argument": 400,
}
_SAFETY_RATINGS = [
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
]


def _args(call: Mapping[str, str]) -> Any:
    try:
        value = json.loads(call.get("arguments", "{}") or "{}")
    except ValueError:
        return {"arguments": call.get("arguments")}
    return value if isinstance(value, dict) else {"value": value}


def read_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A request body read back into neutral messages (one per part, in order).

    Gemini has no call ids: a ``functionCall`` reads back as ``{name, arguments}`` and a
    ``functionResponse`` as a tool message with the function's ``name``. The mock uses it
    for the prompt text; tests use it to check that adapters' requests mean what they should.
    """
    out: list[dict[str, Any]] = []
    instruction = body.get("systemInstruction")
    if isinstance(instruction, dict):
        texts = [p.get("text", "") for p in instruction.get("parts") or [] if isinstance(p, dict)]
        if any(texts):
            out.append({"role": "system", "content": "".join(texts)})
    for content in body.get("contents") or []:
        if not isinstance(content, dict):
            continue
        role = "assistant" if content.get("role") == "model" else "user"
        model_msg: dict[str, Any] | None = None
        for part in content.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("functionResponse"), dict):
                response = part["functionResponse"]
                result = response.get("response")
                output = result.get("output") if isinstance(result, dict) else None
                out.append(
                    {
                        "role": "tool",
                        "name": response.get("name"),
                        "content": output if isinstance(output, str) else json.dumps(result),
                    }
                )
            elif role == "assistant":
                if model_msg is None:
                    model_msg = {"role": "assistant"}
                    out.append(model_msg)
                if isinstance(part.get("text"), str):
                    model_msg["content"] = model_msg.get("content", "") + part["text"]
                elif isinstance(part.get("functionCall"), dict):
                    call = part["functionCall"]
                    model_msg.setdefault("tool_calls", []).append(
                        {"name": call.get("name"), "arguments": json.dumps(call.get("args", {}))}
                    )
            elif isinstance(part.get("text"), str):
                out.append({"role": "user", "content": part["text"]})
    return out


class GeminiDialect:
    name = "gemini"
    content_type = "text/event-stream"

    def matches(self, path: str) -> bool:
        path = path.split("?", 1)[0]
        return "/models/" in path and path.endswith((":streamGenerateContent", ":generateContent"))

    def model(self, path: str, body: Mapping[str, Any]) -> str:
        name = path.split("?", 1)[0].rsplit("/models/", 1)[-1]
        return name.split(":", 1)[0]

    def wants_stream(self, path: str, body: Mapping[str, Any]) -> bool:
        return ":streamGenerateContent" in path

    def prompt_text(self, body: Mapping[str, Any]) -> str:
        return "\n".join(m.get("content") or "" for m in read_messages(body))

    def finish_reason(self, reply: Reply) -> str:
        return _FINISH.get(reply.finish, reply.finish)

    def frames(
        self,
        reply: Reply,
        chunks: list[str],
        model: str,
        prompt_tokens: int,
        body: Mapping[str, Any],
    ) -> list[Frame]:
        def response(
            parts: list[dict[str, Any]] | None, output_tokens: int, finish: str | None = None
        ) -> bytes:
            candidate: dict[str, Any] = {}
            if parts is not None:
                candidate["content"] = {"parts": parts, "role": "model"}
            if finish is not None:
                candidate["finishReason"] = finish
                if finish != "STOP" and finish != "MAX_TOKENS":
                    candidate["safetyRatings"] = _SAFETY_RATINGS
            candidate["index"] = 0
            payload: dict[str, Any] = {"candidates": [candidate]}
            if reply.usage:
                payload["usageMetadata"] = {
                    "promptTokenCount": prompt_tokens,
                    "candidatesTokenCount": output_tokens,
                    "totalTokenCount": prompt_tokens + output_tokens,
                }
            payload["modelVersion"] = model
            payload["responseId"] = "mock-response"
            return sse(json.dumps(payload))

        if reply.finish.startswith(PROMPT_BLOCKED):
            reason = reply.finish.partition(":")[2] or "SAFETY"
            blocked = {
                "promptFeedback": {"blockReason": reason},
                "usageMetadata": {
                    "promptTokenCount": prompt_tokens,
                    "totalTokenCount": prompt_tokens,
                },
                "modelVersion": model,
                "responseId": "mock-response",
            }
            return [Frame(sse(json.dumps(blocked)), end_marker=True)]
        out = []
        produced = 0
        for chunk in chunks:
            produced += 1
            out.append(Frame(response([{"text": chunk}], produced), delta=True))
        for call in reply.tool_calls:
            produced += 1
            part = {"functionCall": {"name": call["name"], "args": _args(call)}}
            out.append(Frame(response([part], produced), delta=True))
        finish = self.finish_reason(reply)
        # A safety stop ends the candidate without content; a normal one with an empty part.
        parts = [{"text": ""}] if finish in ("STOP", "MAX_TOKENS") else None
        out.append(Frame(response(parts, produced, finish), end_marker=True))
        return out

    def whole(self, reply: Reply, text: str, model: str, prompt_tokens: int) -> dict[str, Any]:
        parts: list[dict[str, Any]] = [{"text": text}] if text else []
        parts += [{"functionCall": {"name": c["name"], "args": _args(c)}} for c in reply.tool_calls]
        output_tokens = len(text.split())
        return {
            "candidates": [
                {
                    "content": {"parts": parts, "role": "model"},
                    "finishReason": self.finish_reason(reply),
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": prompt_tokens + output_tokens,
            },
            "modelVersion": model,
        }

    def error_body(
        self, status: int, message: str | None, error_code: str | None
    ) -> dict[str, Any]:
        name, default = _STATUSES.get(
            status, ("INTERNAL" if status >= 500 else "FAILED_PRECONDITION", f"HTTP {status}")
        )
        return {
            "error": {
                "code": status,
                "message": message or default,
                "status": self._status_name(error_code) if error_code else name,
            }
        }

    def _status_name(self, error_code: str) -> str:
        status = _STREAM_ERRORS.get(error_code.lower())
        return _STATUSES[status][0] if status is not None else error_code.upper()

    def stream_error(self, error_code: str, message: str) -> bytes:
        status = _STREAM_ERRORS.get(error_code.lower(), 500)
        return sse(json.dumps(self.error_body(status, message, None)))

    def garbage(self) -> bytes:
        return sse('{"candidates": [{"content": {"parts": [{"text": "tru')
