"""Issue 2: the chain executor's overhead over a bare httpx + httpx-sse stream, in-process.

Three variants stream the same fixed mockllm response (``scenarios.OVERHEAD``: 128 chunks,
no server delay) from a mockllm in its own process, over warm keep-alive connections,
interleaved round by round so that drift hits them alike:

* ``floor``: ``httpx.Client`` + ``httpx_sse.connect_sse``, each chunk ``json.loads``-ed and
  its content taken: the least any client does.
* ``executor+noop``: ``ChainExecutor.run`` from ``build_runtime`` (guarded transport, the
  OpenAI adapter, Redis cooldown store) with a sink that stamps events and drops them.
* ``executor+redis``: the same with ``RedisEventLog`` (one Lua XADD+PUBLISH per event,
  ``flush_window_s=0``), and with a coalescing window when asked.

Time to first delta is from the call to the moment the first text delta left the sink
(for the Redis sink: its round trip done). CPU per chunk is this process's CPU time over
the variant's rounds divided by the chunks streamed (the mock's CPU is not in it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx_sse

from bench.common import Namespace, start_mockllm, summary
from bench.scenarios import OVERHEAD, PROMPT, SHORT, Fixed, request_body, write_agents
from settings import Settings
from worker.events import CountingEventSink, Event, EventSink
from worker.jobs import parse_job
from worker.redis_events import RedisEventLog
from worker.runtime import Runtime, build_runtime


@dataclass
class Timing:
    first_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    chunks: int = 0


class _FirstDelta:
    """Forwards to a sink; notes when the first text delta has been delivered."""

    def __init__(self, inner: EventSink) -> None:
        self.inner = inner
        self.first_at: float | None = None
        self.deltas = 0

    def emit(self, body: Event) -> Event:
        event = self.inner.emit(body)
        if body["type"] == "delta":
            self.deltas += 1
            if self.first_at is None:
                self.first_at = time.perf_counter()
        return event

    def close(self) -> None:
        self.inner.close()


def floor_once(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """(time to first content chunk, total time, content chunks) of one bare stream."""
    t0 = time.perf_counter()
    first = 0.0
    chunks = 0
    with httpx_sse.connect_sse(client, "POST", url, json=body) as source:
        for sse in source.iter_sse():
            if sse.data == "[DONE]":
                continue
            chunk = json.loads(sse.data)
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if not first:
                        first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks


class Executor:
    """Runs the fixed job through a real runtime's executor with a chosen sink."""

    def __init__(self, rt: Runtime, ns: Namespace, model: str) -> None:
        self.rt = rt
        self.ns = ns
        agent = rt.agents.get(model)
        assert agent is not None
        self.agent = agent
        self.model = model

    def once(self, sink_kind: str, window_s: float = 0.0) -> tuple[float, float, int]:
        rt = self.rt
        job_id = str(uuid.uuid4())
        job = parse_job(
            {"job_id": job_id, "agent": self.model, "messages": PROMPT},
            max_bytes=rt.settings.max_job_bytes,
        )
        inner: EventSink
        if sink_kind == "redis":
            inner = RedisEventLog(
                rt.redis, rt.keys, job_id, rt.clock, ttl_s=600, flush_window_s=window_s
            )
        else:
            inner = CountingEventSink(job_id, rt.clock)
        sink = _FirstDelta(inner)
        t0 = time.perf_counter()
        outcome = rt.executor.run(job, self.agent, sink)
        sink.close()
        total = time.perf_counter() - t0
        if outcome.status != "completed":
            raise RuntimeError(f"job ended {outcome.status}: {outcome.terminal}")
        if sink_kind == "redis":
            _check_log(rt, job_id, outcome.terminal)
            rt.redis.delete(rt.keys.log(job_id), rt.keys.seq(job_id))
        first = (sink.first_at or t0) - t0
        return first, total, len(outcome.terminal["text"].split())


def _check_log(rt: Runtime, job_id: str, terminal: Event) -> None:
    """The replay log holds seq 1..n and deltas whose text adds up to the final text."""
    entries = rt.redis.xrange(rt.keys.log(job_id))
    events = [json.loads(fields[b"e"]) for _id, fields in entries]
    seqs = [e["seq"] for e in events]
    text = "".join(e.get("text", "") for e in events if e["type"] == "delta")
    if seqs != list(range(1, len(seqs) + 1)) or text != terminal["text"]:
        raise RuntimeError(f"job {job_id}: replay log does not match the result")


def run(
    *, rounds: int, warmup: int, windows_ms: tuple[int, ...], log_dir: Path, cap_s: float
) -> dict[str, Any]:
    """Interleave the variants for ``rounds`` rounds (after ``warmup``), within ``cap_s``."""
    ns = Namespace()
    scenario: Fixed = OVERHEAD
    mock, base_url = start_mockllm(
        log_dir, {scenario.model: scenario.mock_steps(), SHORT.model: SHORT.mock_steps()}
    )
    agents_file = write_agents(log_dir / "agents-inprocess.yaml", base_url, [scenario.model])
    settings = Settings(
        _env_file=None,
        environment="test",
        redis_url=ns.redis_url,
        key_prefix=ns.prefix,
        agents_file=str(agents_file),
    )
    rt = build_runtime(settings)
    bare = httpx.Client(
        timeout=30.0,
        limits=httpx.Limits(max_keepalive_connections=10, keepalive_expiry=60.0),
    )
    url = f"{base_url}/v1/chat/completions"
    body = request_body(scenario.model)
    ex = Executor(rt, ns, scenario.model)
    variants: dict[str, Callable[[], tuple[float, float, int]]] = {
        "floor (httpx + httpx-sse)": lambda: floor_once(bare, url, body),
        "executor + no-op sink": lambda: ex.once("noop"),
        "executor + Redis sink (flush 0)": lambda: ex.once("redis"),
    }
    for ms in windows_ms:
        variants[f"executor + Redis sink (flush {ms} ms)"] = lambda ms=ms: ex.once(
            "redis", ms / 1000.0
        )
    timings = {name: Timing() for name in variants}
    done_rounds = 0
    started = time.monotonic()
    try:
        for _ in range(warmup):
            for fn in variants.values():
                fn()
        for _ in range(rounds):
            if time.monotonic() - started > cap_s:
                break
            for name, fn in variants.items():
                c0 = time.process_time()
                first, total, chunks = fn()
                timings[name].cpu_s += time.process_time() - c0
                timings[name].first_s.append(first)
                timings[name].total_s.append(total)
                timings[name].chunks += chunks
            done_rounds += 1
    finally:
        bare.close()
        rt.close()
        mock.stop()
        ns.cleanup()
    floor = timings["floor (httpx + httpx-sse)"]
    floor_first = summary(floor.first_s)
    floor_total = summary(floor.total_s)
    floor_cpu_us = 1e6 * floor.cpu_s / max(floor.chunks, 1)
    rows = []
    for name, t in timings.items():
        first = summary(t.first_s)
        total = summary(t.total_s)
        cpu_us = 1e6 * t.cpu_s / max(t.chunks, 1)
        rows.append(
            {
                "variant": name,
                "first": first,
                "total": total,
                "cpu_us_per_chunk": cpu_us,
                "chunks": t.chunks,
                "overhead": {
                    "first_p50_ms": 1000 * (first["p50"] - floor_first["p50"]),
                    "first_p99_ms": 1000 * (first["p99"] - floor_first["p99"]),
                    "total_p50_ms": 1000 * (total["p50"] - floor_total["p50"]),
                    "total_p99_ms": 1000 * (total["p99"] - floor_total["p99"]),
                    "cpu_us_per_chunk": cpu_us - floor_cpu_us,
                    "cpu_ratio": cpu_us / floor_cpu_us if floor_cpu_us else float("nan"),
                },
            }
        )
    return {
        "scenario": {
            "chunks": scenario.chunks,
            "chunk_chars": scenario.chunk_chars,
            "server_delay_s": 0,
            "rounds": done_rounds,
            "warmup_rounds": warmup,
            "cap_s": cap_s,
            "upstream": "python -m worker.mockllm (own process), HTTP/1.1 keep-alive",
        },
        "rows": rows,
    }
