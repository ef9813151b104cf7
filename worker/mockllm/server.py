"""The fault-injecting upstream: a real HTTP server speaking the providers' wire formats.

Built on the standard library's threading HTTP server, so that a fault is exactly what the
wire shows: a cut is a socket shut mid-body, a stall is a server that says nothing. Tests
and the demo script it per model name (:meth:`MockLLM.script`, or over HTTP with
``PUT /_mock/scenarios/{model}``); ``GET /_mock/requests`` returns per-model request counts
and the recorded requests, API keys masked. By default it streams a plausible answer.

While it waits (a stall, an idle gap, a slow stream) the server watches the client's socket,
so a client that gives up is seen at once: :meth:`MockLLM.hangups` counts, per model, the
responses the client closed before their end, which is how tests prove that a timeout or
a cancellation really closed the upstream request.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from worker.mockllm.anthropic import AnthropicDialect
from worker.mockllm.dialect import Dialect, Frame
from worker.mockllm.gemini import GeminiDialect
from worker.mockllm.openai import OpenAIDialect
from worker.mockllm.scenarios import (
    Cut,
    ErrorBody200,
    Garbage,
    Idle,
    NoEndMarker,
    Reply,
    Scenario,
    Stall,
    Status,
    Step,
    StreamError,
    WrongContentType,
    scenario_from_dict,
)

SECRET_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key"})
_WATCH_INTERVAL_S = 0.01


class _ClientGone(Exception):
    """The client closed its connection before the response ended."""


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    path: str
    model: str
    dialect: str
    headers: Mapping[str, str]
    body: Any


def mask(value: str) -> str:
    """A recorded secret: only its length and last four characters."""
    return f"[masked len={len(value)} …{value[-4:]}]"


def default_answer(prompt: str) -> str:
    """A plausible, deterministic answer to ``prompt``."""
    last = prompt.strip().splitlines()[-1] if prompt.strip() else "your question"
    topic = " ".join(last.split()[:8])
    return (
        f'Here is a short answer about "{topic}". The mock upstream streams this reply '
        "word by word, so you can watch tokens arrive, retries happen and fallbacks take "
        "over, with no API key and no internet."
    )


def split_chunks(text: str, words_per_chunk: int) -> list[str]:
    words = text.split(" ")
    size = max(1, words_per_chunk)
    chunks = []
    for i in range(0, len(words), size):
        piece = " ".join(words[i : i + size])
        chunks.append(piece if i + size >= len(words) else piece + " ")
    return [c for c in chunks if c]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    mock: MockLLM

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away (a cancelled or timed-out stream shuts its socket, a
        # pooled connection is reset) is part of what the mock serves: no traceback.
        if isinstance(sys.exc_info()[1], ConnectionResetError | BrokenPipeError):
            return
        super().handle_error(request, client_address)


class MockLLM:
    """The mock upstream. ``with MockLLM() as mock:`` serves on a free loopback port."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, dialects: Sequence[Dialect] | None = None
    ) -> None:
        self.dialects: list[Dialect] = list(
            dialects or [OpenAIDialect(), AnthropicDialect(), GeminiDialect()]
        )
        self._lock = threading.Lock()
        self._scenarios: dict[str, Scenario] = {}
        self._cursor: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._hangups: Counter[str] = Counter()
        self._hangup = threading.Condition(self._lock)
        self.requests: list[RecordedRequest] = []
        self.stopping = threading.Event()
        self._server = _Server((host, port), _Handler)
        self._server.mock = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        assert isinstance(host, str)
        return f"http://{host}:{self.port}"

    def start(self) -> MockLLM:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="mockllm", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MockLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, model: str, steps: Sequence[Step], *, repeat_last: bool = True) -> None:
        """Answer the next requests for ``model`` with ``steps``, in order."""
        with self._lock:
            self._scenarios[model] = Scenario(tuple(steps), repeat_last=repeat_last)
            self._cursor[model] = 0

    def reset(self) -> None:
        """Forget every scenario, count and recorded request."""
        with self._lock:
            self._scenarios.clear()
            self._cursor.clear()
            self._counts.clear()
            self._hangups.clear()
            self.requests.clear()

    def count(self, model: str) -> int:
        """How many requests named ``model``."""
        with self._lock:
            return self._counts[model]

    def hangups(self, model: str) -> int:
        """How many responses for ``model`` the client closed before their end."""
        with self._lock:
            return self._hangups[model]

    def wait_for_hangups(self, model: str, count: int = 1, *, timeout_s: float = 2.0) -> bool:
        """Block until the client closed ``count`` responses for ``model``; False on timeout."""
        with self._hangup:
            return self._hangup.wait_for(lambda: self._hangups[model] >= count, timeout_s)

    def _hung_up(self, model: str) -> None:
        with self._hangup:
            self._hangups[model] += 1
            self._hangup.notify_all()

    def _take(self, model: str, record: RecordedRequest) -> Step:
        with self._lock:
            self._counts[model] += 1
            self.requests.append(record)
            scenario = self._scenarios.get(model)
            if scenario is None or not scenario.steps:
                return Reply()
            i = self._cursor[model]
            self._cursor[model] = i + 1
            if i < len(scenario.steps):
                return scenario.steps[i]
            return scenario.steps[-1] if scenario.repeat_last else Reply()

    def _admin(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        if method == "GET" and parts == ["_mock", "requests"]:
            with self._lock:
                return 200, {
                    "counts": dict(self._counts),
                    "requests": [
                        {
                            "path": r.path,
                            "model": r.model,
                            "dialect": r.dialect,
                            "headers": dict(r.headers),
                            "body": r.body,
                        }
                        for r in self.requests
                    ],
                }
        if method == "PUT" and len(parts) == 3 and parts[:2] == ["_mock", "scenarios"]:
            try:
                scenario = scenario_from_dict(body)
            except (ValueError, TypeError, AttributeError) as exc:
                return 400, {"error": str(exc)}
            self.script(parts[2], scenario.steps, repeat_last=scenario.repeat_last)
            return 200, {"ok": True}
        if method == "DELETE" and parts == ["_mock", "scenarios"]:
            self.reset()
            return 200, {"ok": True}
        return 404, {"error": f"no admin route {method} {path}"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Each SSE frame is its own small write: without TCP_NODELAY, Nagle's algorithm holds
    # it back until the client's delayed ACK (about 40 ms), which is no upstream's behaviour.
    disable_nagle_algorithm = True
    server: _Server
    # The model whose response is being served, for hang-up counts.
    _model: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests and the demo read the recorded requests instead."""

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        try:
            self._handle(method)
        except (TimeoutError, BrokenPipeError, ConnectionResetError, _ClientGone):
            self.close_connection = True
            if self._model is not None:
                self.server.mock._hung_up(self._model)

    def _read_body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return ...

    def _handle(self, method: str) -> None:
        self._model = None
        mock = self.server.mock
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if path.startswith("/_mock/"):
            status, payload = mock._admin(method, path, body)
            self._json(status, payload)
            return
        dialect = next((d for d in mock.dialects if d.matches(path)), None)
        if method != "POST" or dialect is None:
            self._json(
                404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}
            )
            return
        if not isinstance(body, dict):
            self._json(400, dialect.error_body(400, "the body is not a JSON object", None))
            return
        model = dialect.model(self.path, body)
        headers = {
            k.lower(): (mask(v) if k.lower() in SECRET_HEADERS else v)
            for k, v in self.headers.items()
        }
        step = mock._take(model, RecordedRequest(path, model, dialect.name, headers, body))
        self._model = model
        self._serve(dialect, step, model, body)

    def _json(self, status: int, payload: Any, headers: Mapping[str, str] | None = None) -> None:
        self._raw(status, json.dumps(payload).encode(), "application/json", headers)

    def _raw(
        self, status: int, data: bytes, content_type: str, headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _wait(self, seconds: float) -> bool:
        """Wait ``seconds`` watching the client; False when the server is stopping.

        Raises:
            _ClientGone: the client closed the connection meanwhile.
        """
        stopping = self.server.mock.stopping
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if stopping.is_set():
                return False
            step_s = min(left, _WATCH_INTERVAL_S)
            readable, _, _ = select.select([self.connection], [], [], step_s)
            if readable and self._peer_closed():
                raise _ClientGone
            if readable:
                # Bytes from a client mid-response (it should send none): don't spin on them.
                stopping.wait(step_s)
        return not stopping.is_set()

    def _peer_closed(self) -> bool:
        try:
            peeked: bytes = self.connection.recv(1, socket.MSG_PEEK)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except BlockingIOError:
            return False
        return not peeked

    def _serve(self, dialect: Dialect, step: Step, model: str, body: dict[str, Any]) -> None:
        if isinstance(step, Status):
            headers = dict(step.headers)
            if step.retry_after is not None:
                headers["retry-after"] = step.retry_after
            if step.body is not None:
                self._raw(step.code, step.body.encode(), step.content_type, headers)
            else:
                payload = dialect.error_body(step.code, step.message, step.error_code)
                self._json(step.code, payload, headers)
            return
        if isinstance(step, ErrorBody200):
            self._json(200, dialect.error_body(500, step.message, step.error_code))
            return
        if isinstance(step, WrongContentType):
            self._raw(200, b"this is not an event stream", "text/plain")
            return
        if isinstance(step, Stall) and step.before == "headers":
            if not self._wait(step.seconds):
                return
            step = Reply()
        reply = step if isinstance(step, Reply) else Reply()
        prompt = dialect.prompt_text(body)
        prompt_tokens = len(prompt.split())
        text = reply.text if reply.text is not None else default_answer(prompt)
        chunks = split_chunks(text, reply.chunk_words) if text else []
        if not dialect.wants_stream(self.path, body):
            if isinstance(step, Reply):
                self._json(200, dialect.whole(reply, text, model, prompt_tokens))
            else:
                self.close_connection = True
            return
        frames = dialect.frames(reply, chunks, model, prompt_tokens, body)
        self._stream(dialect, step, reply, frames)

    def _stream(self, dialect: Dialect, step: Step, reply: Reply, frames: list[Frame]) -> None:
        self.send_response(200)
        self.send_header("content-type", dialect.content_type)
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        after = getattr(step, "after_chunks", None)
        sent_deltas = 0
        stalled = False
        for frame in frames:
            if frame.delta and after is not None and sent_deltas == after:
                if isinstance(step, Cut):
                    self._cut()
                    return
                if isinstance(step, StreamError):
                    self._chunk(dialect.stream_error(step.error_code, step.message))
                    self._end()
                    return
                if isinstance(step, Garbage):
                    self._chunk(dialect.garbage())
                    self._end()
                    return
                if isinstance(step, NoEndMarker):
                    self._end()
                    return
                if isinstance(step, Idle) and not self._wait(step.seconds):
                    return
            if frame.delta and isinstance(step, Stall) and not stalled:
                stalled = True
                if not self._wait(step.seconds):
                    return
            if frame.end_marker and isinstance(step, NoEndMarker | StreamError | Garbage):
                # A StreamError or Garbage asked for after more deltas than the reply has
                # still comes, before the end marker (after it, a client rightly ignores it).
                break
            if frame.delta and reply.delay_s and sent_deltas and not self._wait(reply.delay_s):
                return
            self._chunk(frame.data)
            sent_deltas += frame.delta
        if isinstance(step, StreamError | Garbage) and after is not None and sent_deltas <= after:
            self._chunk(
                dialect.stream_error(step.error_code, step.message)
                if isinstance(step, StreamError)
                else dialect.garbage()
            )
        if isinstance(step, Cut):
            self._cut()
            return
        if reply.hold_after_end_s and not self._wait(reply.hold_after_end_s):
            return
        self._end()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _cut(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
