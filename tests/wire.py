"""Replaying recorded provider streams through the adapters, for the provider unit tests.

Golden transcripts live in ``tests/data/<provider>/<name>.sse`` with the deltas they must
parse to in ``<name>.json``. :func:`replay` serves bytes through ``httpx.MockTransport`` (in
whatever pieces the caller chose) to a real adapter and collects what it yields and raises.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from worker.agents import ModelRef, Timeouts
from worker.clock import FakeClock
from worker.errors import ProviderError
from worker.providers.base import Delta, Provider, ProviderRequest

DATA = Path(__file__).parent / "data"
BASE_URL = "http://127.0.0.1:9"

ProviderFactory = Callable[[httpx.Client, FakeClock], Provider]


def transcript(provider: str, name: str) -> bytes:
    return (DATA / provider / f"{name}.sse").read_bytes()


def expected(provider: str, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / provider / f"{name}.json").read_text("utf-8"))
    return data


def golden_names(provider: str) -> list[str]:
    return sorted(p.stem for p in (DATA / provider).glob("*.sse"))


def model_ref(
    provider: str,
    *,
    model: str = "test-model",
    base_url: str = BASE_URL,
    api_key_env: str | None = None,
    max_tokens: int | None = None,
) -> ModelRef:
    return ModelRef(
        name=f"{provider}-model",
        provider=provider,
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        timeouts=Timeouts(),
        max_tokens=max_tokens,
        source="test-agents.yaml",
    )


def delta_dict(delta: Delta) -> dict[str, Any]:
    """A delta in the golden files' form: only the field it carries."""
    if delta.text is not None:
        return {"text": delta.text}
    if delta.tool_call is not None:
        return {"tool_call": delta.tool_call.as_event()}
    if delta.finish_reason is not None:
        return {"finish_reason": delta.finish_reason}
    if delta.usage is not None:
        return {"usage": [delta.usage.input_tokens, delta.usage.output_tokens]}
    return {"done": delta.done}


@dataclass
class Replay:
    """What an adapter did with one response: its deltas, its error, the requests it sent."""

    deltas: list[Delta] = field(default_factory=list)
    error: ProviderError | None = None
    requests: list[httpx.Request] = field(default_factory=list)

    @property
    def dicts(self) -> list[dict[str, Any]]:
        return [delta_dict(d) for d in self.deltas]

    @property
    def body(self) -> dict[str, Any]:
        """The JSON body of the (only) request sent."""
        assert len(self.requests) == 1
        body: dict[str, Any] = json.loads(self.requests[0].content)
        return body

    def summary(self) -> dict[str, Any]:
        """Deltas and error in the golden files' form."""
        error = None
        if self.error is not None:
            error = {"kind": self.error.kind, "provider_code": self.error.provider_code}
        return {"deltas": self.dicts, "error": error}


def replay(
    factory: ProviderFactory,
    content: bytes | Iterable[bytes],
    *,
    model: ModelRef,
    request: ProviderRequest | None = None,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    content_type: str = "text/event-stream",
) -> Replay:
    """Run ``model``'s adapter against a response made of ``content``.

    Args:
        factory: the adapter class (called with a client and a clock).
        content: the body, whole or as the pieces the transport should deliver.
        model: the model to call.
        request: the neutral request (one user message by default).
        status: the HTTP status to answer with.
        headers: extra response headers.
        content_type: the response's content type.
    """
    out = Replay()
    pieces = [content] if isinstance(content, bytes) else list(content)

    def handler(req: httpx.Request) -> httpx.Response:
        req.read()
        out.requests.append(req)

        def body() -> Iterator[bytes]:
            yield from pieces

        return httpx.Response(
            status, headers={"content-type": content_type, **(headers or {})}, content=body()
        )

    request = request or ProviderRequest(messages=[{"role": "user", "content": "Hello"}])
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        adapter = factory(client, FakeClock())
        try:
            for delta in adapter.stream(model, request):
                out.deltas.append(delta)
        except ProviderError as exc:
            out.error = exc
    return out


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``data`` cut at the given offsets (any order, duplicates ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def sse_events(data: bytes) -> list[tuple[str, str]]:
    """``(event, data)`` pairs of an SSE byte stream (comments skipped, ``\\r\\n`` accepted)."""
    events: list[tuple[str, str]] = []
    name, lines = "", []
    for line in data.decode("utf-8").replace("\r\n", "\n").split("\n"):
        if not line:
            if lines:
                events.append((name or "message", "\n".join(lines)))
            name, lines = "", []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    if lines:
        events.append((name or "message", "\n".join(lines)))
    return events


def assert_subshape(mock: Any, golden: Any, path: str = "$") -> None:
    """Every field ``mock`` has, ``golden`` has too, with the same JSON type (recursively).

    The mock may leave optional fields out; it may not invent fields or change types.
    """
    if mock is None or golden is None:
        return
    if isinstance(mock, dict):
        assert isinstance(golden, dict), f"{path}: object in the mock, not in the golden"
        for key, value in mock.items():
            assert key in golden, f"{path}.{key}: the mock sends a field the golden lacks"
            assert_subshape(value, golden[key], f"{path}.{key}")
        return
    if isinstance(mock, list):
        assert isinstance(golden, list), f"{path}: list in the mock, not in the golden"
        for i, item in enumerate(mock):
            problems = []
            for candidate in golden:
                try:
                    assert_subshape(item, candidate, f"{path}[{i}]")
                    break
                except AssertionError as exc:
                    problems.append(str(exc))
            else:
                raise AssertionError(f"{path}[{i}]: matches no golden item: {problems}")
        return
    kinds = (bool, int, float, str)
    mock_kind = next(k for k in kinds if isinstance(mock, k))
    assert isinstance(golden, mock_kind), f"{path}: {type(mock).__name__} vs {golden!r}"
