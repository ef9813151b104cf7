"""Google Gemini, streamed: ``POST {base}/v1beta/models/{model}:streamGenerateContent?alt=sse``.

Request: the key in the ``x-goog-api-key`` header only (a ``?key=`` in the URL would end up
in access logs and error messages); ``contents`` of ``parts`` with roles ``user`` and
``model`` (consecutive same-role turns merged); the system prompt as
``systemInstruction``; tools as one ``functionDeclarations`` list, their JSON Schema cut
down to the OpenAPI subset Gemini accepts; a tool call is a ``functionCall`` part, its
result a ``functionResponse`` part. Gemini matches results to calls by function *name*,
so a neutral ``tool_call_id`` is mapped back to the name of the assistant tool call that
carried that id. ``generationConfig`` carries ``maxOutputTokens``, ``temperature``,
``topP``, ``stopSequences`` and ``seed``.

Stream: ``data:`` events with no names and no ``[DONE]``; each is a whole
``GenerateContentResponse``. Text and ``functionCall`` parts come in
``candidates[0].content.parts``; ``usageMetadata`` is cumulative on every event. The end
marker is the event that carries ``candidates[0].finishReason`` or
``promptFeedback.blockReason`` (a blocked prompt: no candidates at all). A stream that ends
without one is broken (retryable). An ``{"error": …}`` object in a data event is classified
by the HTTP status inside it.

Gemini gives function calls no ids. Each call gets ``call_<digest>_<index>``: the index
counts calls in the attempt, and the digest comes from the request's contents, so a retry
of the same request yields the same ids, while a later turn of the conversation (whose
history differs) never reuses an earlier turn's ids, which Anthropic would reject.

A safety block (a ``SAFETY``/``RECITATION``/… finish, or a blocked prompt) is a completed
answer with ``finish_reason: content_filter``, not an error: the chain does not fall back,
just as it does not for OpenAI's ``content_filter`` or Anthropic's ``refusal``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

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

CONTENT_FILTER = "content_filter"
_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": CONTENT_FILTER,
    "RECITATION": CONTENT_FILTER,
    "BLOCKLIST": CONTENT_FILTER,
    "PROHIBITED_CONTENT": CONTENT_FILTER,
    "SPII": CONTENT_FILTER,
    "IMAGE_SAFETY": CONTENT_FILTER,
    "IMAGE_PROHIBITED_CONTENT": CONTENT_FILTER,
}
# Gemini 3 rejects a history whose function calls carry no thought signature. Calls made
# by another provider have none; Google documents this value for exactly that case.
SKIP_SIGNATURE = "skip_thought_signature_validator"
# The OpenAPI subset of JSON Schema that `functionDeclarations[].parameters` accepts.
_SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "items",
        "minItems",
        "maxItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "anyOf",
        "default",
        "propertyOrdering",
    }
)


def to_gemini_schema(schema: Any) -> Any:
    """A JSON Schema cut down to what Gemini's ``parameters`` accepts.

    Unknown keywords (``$schema``, ``additionalProperties``, ``$ref`` …) are dropped;
    ``const`` becomes a one-value ``enum``; a type list with ``"null"`` becomes
    ``nullable``.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: to_gemini_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = to_gemini_schema(value)
        elif key == "anyOf" and isinstance(value, list):
            out[key] = [to_gemini_schema(sub) for sub in value]
        elif key == "const":
            out["enum"] = [value]
        elif key == "type" and isinstance(value, list):
            kinds = [t for t in value if t != "null"]
            if len(kinds) < len(value):
                out["nullable"] = True
            if kinds:
                out["type"] = kinds[0]
        elif key in _SCHEMA_KEYS:
            out[key] = value
    return out


def _parts(msg: dict[str, Any], i: int, names: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    role = msg["role"]
    content = msg.get("content")
    if role == "tool":
        call_id = str(msg["tool_call_id"])
        name = names.get(call_id)
        if name is None:
            raise FatalError(
                f"messages[{i}].tool_call_id: no earlier assistant tool call has this id"
            )
        response = {"name": name, "response": {"output": content or ""}}
        return "user", [{"functionResponse": response}]
    parts: list[dict[str, Any]] = [{"text": content}] if content else []
    for n, call in enumerate(msg.get("tool_calls") or []):
        names[call["id"]] = call["name"]
        args = tool_input(call.get("arguments", ""), f"messages[{i}]")
        part: dict[str, Any] = {"functionCall": {"name": call["name"], "args": args}}
        if n == 0:
            part["thoughtSignature"] = SKIP_SIGNATURE
        parts.append(part)
    return ("model" if role == "assistant" else "user"), parts


def to_gemini_contents(
    messages: list[dict[str, Any]],
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Neutral messages as Gemini's ``(systemInstruction, contents)``.

    Raises:
        FatalError: a tool message answers no earlier tool call (Gemini needs the
            function's name), or a tool call's arguments are not a JSON object.
    """
    system = [m["content"] for m in messages if m["role"] == "system" and m.get("content")]
    names: dict[str, str] = {}
    contents: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if msg["role"] == "system":
            continue
        role, parts = _parts(msg, i, names)
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    instruction = {"parts": [{"text": "\n\n".join(system)}]} if system else None
    return instruction, contents


def to_gemini_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    declarations = []
    for tool in tools:
        item: dict[str, Any] = {"name": tool["name"]}
        if tool.get("description"):
            item["description"] = tool["description"]
        params = tool.get("parameters") or {}
        # Gemini rejects an object schema without properties; a call without arguments
        # is declared without parameters instead.
        if params.get("properties"):
            item["parameters"] = to_gemini_schema(params)
        declarations.append(item)
    return [{"functionDeclarations": declarations}]


def generation_config(model: ModelRef, params: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    max_tokens = params.get("max_tokens") or model.max_tokens
    if max_tokens:
        config["maxOutputTokens"] = max_tokens
    if params.get("temperature") is not None:
        config["temperature"] = params["temperature"]
    if params.get("top_p") is not None:
        config["topP"] = params["top_p"]
    if stop_list(params):
        config["stopSequences"] = stop_list(params)
    if params.get("seed") is not None:
        config["seed"] = params["seed"]
    return config


def build_body(model: ModelRef, request: ProviderRequest) -> dict[str, Any]:
    """The request body (the model is in the URL, not here).

    Raises:
        FatalError: the messages cannot be expressed (see :func:`to_gemini_contents`).
    """
    instruction, contents = to_gemini_contents(request.messages)
    body: dict[str, Any] = {"contents": contents}
    if instruction:
        body["systemInstruction"] = instruction
    if request.tools:
        body["tools"] = to_gemini_tools(request.tools)
    config = generation_config(model, request.params)
    if config:
        body["generationConfig"] = config
    return body


def call_id_seed(body: Mapping[str, Any]) -> str:
    """The digest in this request's tool-call ids (stable for the same request)."""
    text = json.dumps(body.get("contents"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FatalError(f"unexpected event shape: {what} is not an object")
    return value


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


class GeminiStream:
    """The parser for one attempt's event stream: feed it ``data:`` payloads, get deltas.

    Args:
        id_seed: the request's digest for tool-call ids (:func:`call_id_seed`).
        secrets: strings to blank out of error messages.
    """

    def __init__(self, id_seed: str, secrets: tuple[str, ...] = ()) -> None:
        self.done = False
        self._seed = id_seed
        self._secrets = secrets
        self._calls = 0
        self._usage: Usage | None = None

    def feed(self, data: str, *, now_s: float) -> list[Delta]:
        """The deltas of one ``data:`` payload.

        Raises:
            FatalError: malformed JSON or a payload of the wrong shape.
            ProviderError: an error object in the stream (classified by its status).
        """
        try:
            payload = json.loads(data)
        except (ValueError, RecursionError):
            raise FatalError("malformed JSON in the event stream") from None
        # One event is one object; tolerate a list of them (the non-SSE stream's shape).
        chunks = payload if isinstance(payload, list) else [payload]
        out: list[Delta] = []
        for chunk in chunks:
            out += self._chunk(_obj(chunk, "the event"), now_s)
        return out

    def _chunk(self, chunk: dict[str, Any], now_s: float) -> list[Delta]:
        if "error" in chunk:
            raise classify_stream_error(chunk, now_s=now_s, secrets=self._secrets)
        out: list[Delta] = []
        candidates = chunk.get("candidates") or []
        if not isinstance(candidates, list):
            raise FatalError("unexpected event shape: candidates is not a list")
        # We never ask for more than one candidate.
        candidate = _obj(candidates[0], "a candidate") if candidates else {}
        content = candidate.get("content") or {}
        parts = _obj(content, "candidate content").get("parts") or []
        if not isinstance(parts, list):
            raise FatalError("unexpected event shape: parts is not a list")
        for part in parts:
            out += self._part(_obj(part, "a part"))
        out += self._usage_delta(chunk.get("usageMetadata"))
        reason = candidate.get("finishReason")
        feedback = chunk.get("promptFeedback")
        blocked = feedback.get("blockReason") if isinstance(feedback, dict) else None
        if isinstance(reason, str):
            finish = _FINISH.get(reason, reason.lower())
            if finish == "stop" and self._calls:
                finish = "tool_calls"
            out += [Delta(finish_reason=finish), Delta(done=True)]
            self.done = True
        elif isinstance(blocked, str):
            out += [Delta(finish_reason=CONTENT_FILTER), Delta(done=True)]
            self.done = True
        return out

    def _part(self, part: dict[str, Any]) -> list[Delta]:
        if part.get("thought") is True:
            return []  # a thought summary, not the answer
        text = part.get("text")
        if isinstance(text, str) and text:
            return [Delta(text=text)]
        call = part.get("functionCall")
        if call is None:
            return []
        call = _obj(call, "functionCall")
        name, args, given_id = call.get("name"), call.get("args"), call.get("id")
        if not isinstance(name, str) or not name:
            raise FatalError("unexpected event shape: a functionCall without a name")
        index = self._calls
        self._calls += 1
        piece = ToolCallPiece(
            index=index,
            id=given_id if isinstance(given_id, str) and given_id else self.call_id(index),
            name=name,
            arguments=compact_json(args if isinstance(args, dict) else {}),
        )
        return [Delta(tool_call=piece)]

    def call_id(self, index: int) -> str:
        return f"call_{self._seed}_{index}"

    def _usage_delta(self, meta: Any) -> list[Delta]:
        if not isinstance(meta, dict):
            return []
        # Thinking tokens are billed as output but reported apart from the candidates.
        output = _count(meta.get("candidatesTokenCount")) + _count(meta.get("thoughtsTokenCount"))
        usage = Usage(_count(meta.get("promptTokenCount")), output)
        if usage == self._usage:
            return []
        self._usage = usage
        return [Delta(usage=usage)]


def endpoint(base_url: str, model: str) -> str:
    """The streaming URL; a ``base_url`` that already ends in ``/v1beta`` is taken as is.

    The URL carries no key: that goes in the ``x-goog-api-key`` header.
    """
    base = base_url.rstrip("/")
    if not base.endswith("/v1beta"):
        base += "/v1beta"
    name = quote(model.removeprefix("models/"), safe="")
    return f"{base}/models/{name}:streamGenerateContent?alt=sse"


class GeminiProvider(SSEProvider):
    """Streams content from the Gemini API."""

    end_marker = "(a chunk with finishReason)"

    def prepare(self, model: ModelRef, request: ProviderRequest, key: str | None) -> Call:
        body = build_body(model, request)
        parser = GeminiStream(call_id_seed(body), (key,) if key else ())
        return Call(
            url=endpoint(model.base_url, model.model),
            headers={"x-goog-api-key": key} if key else {},
            body=body,
            feed=lambda sse: parser.feed(sse.data, now_s=self._clock.time()),
        )
