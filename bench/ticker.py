"""A timestamping OpenAI-compatible upstream for the capacity runs.

``python -m bench.ticker --port N [--stats FILE]``

It answers ``POST …/chat/completions`` (streaming only) for a model named
``tick-{interval_ms}-{count}``: ``count`` content chunks, one every ``interval_ms`` on a
fixed schedule, each chunk's text being the epoch time it was sent (``"1712345678.123456 "``),
then the finish chunk, a usage chunk and ``data: [DONE]``, in the same frames as
``worker.mockllm``'s OpenAI dialect. A subscriber that parses those times measures each
token's latency from the upstream's send to its own receipt, however the worker merged them.

Why not ``worker.mockllm`` here: it serves each connection with a thread that polls the
client's socket every 10 ms while it waits, which at 500 slow streams costs a core of this
two-core machine, and its text cannot carry send times. This server is one asyncio loop in
its own process. On SIGTERM it writes its schedule lag (actual send minus planned send) and
counts to ``--stats``, so a run can show the upstream kept its schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

_MODEL = re.compile(r"tick-(\d+)-(\d+)")
_BASE = {"id": "chatcmpl-tick", "object": "chat.completion.chunk", "created": 0}


def _frame(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    body = f"data: {data}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(body), body)


def _chunk(model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _frame(
        {
            **_BASE,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            "usage": None,
        }
    )


class Ticker:
    def __init__(self) -> None:
        self.lag_s: list[float] = []
        self.streams = 0
        self.finished = 0
        self.hangups = 0
        self.active = 0
        self.peak_active = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = json.loads(await reader.readexactly(length)) if length else {}
                await self.respond(body, writer)
        except (
            asyncio.IncompleteReadError,
            ConnectionError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            pass
        finally:
            writer.close()

    async def respond(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        model = str(body.get("model", ""))
        match = _MODEL.fullmatch(model)
        if match is None:
            msg = json.dumps({"error": {"message": f"unknown model {model}", "code": None}})
            data = msg.encode()
            writer.write(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(data), data)
            )
            await writer.drain()
            return
        interval_s = int(match.group(1)) / 1000.0
        count = int(match.group(2))
        self.streams += 1
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        loop = asyncio.get_running_loop()
        try:
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
            )
            writer.write(_chunk(model, {"role": "assistant", "content": ""}))
            await writer.drain()
            start = loop.time()
            for i in range(count):
                planned = start + i * interval_s
                wait = planned - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.lag_s.append(max(0.0, loop.time() - planned))
                writer.write(_chunk(model, {"content": f"{time.time():.6f} "}))
                await writer.drain()
            writer.write(_chunk(model, {}, "stop"))
            usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
            writer.write(_frame({**_BASE, "model": model, "choices": [], "usage": usage}))
            writer.write(_frame("[DONE]"))
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            self.finished += 1
        except ConnectionError:
            self.hangups += 1
            raise
        finally:
            self.active -= 1

    def stats(self) -> dict[str, Any]:
        lag = sorted(self.lag_s)

        def pct(q: float) -> float:
            return lag[int((len(lag) - 1) * q / 100)] if lag else 0.0

        return {
            "streams": self.streams,
            "finished": self.finished,
            "hangups": self.hangups,
            "peak_active": self.peak_active,
            "chunks": len(lag),
            "lag_p50_s": pct(50),
            "lag_p99_s": pct(99),
            "lag_max_s": lag[-1] if lag else 0.0,
        }


async def serve(host: str, port: int, stats_path: Path | None) -> None:
    ticker = Ticker()
    server = await asyncio.start_server(ticker.handle, host, port, backlog=2048)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ticker listening on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()
    if stats_path is not None:
        stats_path.write_text(json.dumps(ticker.stats()), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ticker", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--stats", type=Path)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
