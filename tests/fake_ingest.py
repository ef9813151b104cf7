"""Loopback HTTP servers that record what is POSTed to them: a Sentry ingest, an OTLP collector.

``RecordingServer`` keeps every request body, decompressed, in arrival order. ``FakeSentry``
adds the DSN that points at it and parses Sentry envelopes; ``otlp_spans`` decodes OTLP/HTTP
protobuf trace exports.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]
    body: bytes


class RecordingServer:
    """An HTTP server on 127.0.0.1 that answers every POST with 200 and records it."""

    def __init__(self, reply: bytes = b"{}") -> None:
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding:
                    raise AssertionError(f"unexpected Content-Encoding {encoding}")
                with recorder._lock:
                    recorder.requests.append(
                        Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def bodies(self) -> list[bytes]:
        with self._lock:
            return [r.body for r in self.requests]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Poll (bounded) until ``predicate(self)`` holds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(0.05)
        return bool(predicate(self))


def parse_envelope(raw: bytes) -> list[tuple[dict[str, Any], bytes]]:
    """A Sentry envelope's items: (item header, payload) pairs."""
    lines = raw.split(b"\n", 1)
    rest = lines[1] if len(lines) > 1 else b""
    items: list[tuple[dict[str, Any], bytes]] = []
    while rest.strip():
        header_line, _, rest = rest.partition(b"\n")
        header = json.loads(header_line)
        length = header.get("length")
        if length is None:
            payload, _, rest = rest.partition(b"\n")
        else:
            payload, rest = rest[:length], rest[length:]
            rest = rest.removeprefix(b"\n")
        items.append((header, payload))
    return items


class FakeSentry(RecordingServer):
    """A Sentry ingest: ``dsn`` points here; ``events()`` are the error events received."""

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def events(self) -> list[dict[str, Any]]:
        out = []
        for body in self.bodies():
            for header, payload in parse_envelope(body):
                if header.get("type") == "event":
                    out.append(json.loads(payload))
        return out


def otlp_spans(server: RecordingServer) -> list[Any]:
    """Every span the server received as OTLP/HTTP protobuf exports."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    spans = []
    for request in list(server.requests):
        if not request.path.endswith("/v1/traces"):
            continue
        export = ExportTraceServiceRequest()
        export.ParseFromString(request.body)
        for resource_spans in export.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                spans.extend(scope_spans.spans)
    return spans


def otlp_attributes(span: Any) -> dict[str, Any]:
    """A protobuf span's attributes as a plain dict."""
    out: dict[str, Any] = {}
    for kv in span.attributes:
        value = kv.value
        which = value.WhichOneof("value")
        out[kv.key] = getattr(value, which) if which else None
    return out
