"""Issues 2 and 5: per call, in-process, side by side against a bare httpx + httpx-sse stream.

The variants stream the same fixed mockllm response (``scenarios.OVERHEAD``: 128 chunks,
no server delay) from a mockllm in its own process, over warm keep-alive connections,
interleaved round by round so that drift hits them alike:

* ``floor``: ``httpx.Client`` + ``httpx_sse.connect_sse``, each chunk ``json.loads``-ed and
  its content taken: the least any client does.
* ``openai SDK``: ``openai.OpenAI(...).chat.completions.create(stream=True)`` alone (what the
  plain Celery task of ``bench.plain_celery`` calls), for reference.
* ``executor+noop``: ``ChainExecutor.run`` from ``build_runtime`` (guarded transport, the
  OpenAI adapter, Redis cooldown store) with a sink that stamps events and drops them.
* ``executor+redis``: the same with ``RedisEventLog`` (the replay log and the live channel,
  ``flush_window_s=0``), and with a coalescing window when asked.
* ``LiteLLM Router``: ``Router.completion(stream=True)`` over the same two-model chain
  (``bench.litellm_router``), when litellm is installed (``bench`` extra).

reliever's agent is the two-model chain of ``scenarios.write_chain_agents`` (2 retries, a
fallback, a cooldown), like the Router's; on this healthy path both take the primary.

Time to first delta is from the call to the moment the first text delta left the sink; for
the variants that publish (the Redis sink, ``floor + PUBLISH``), to the moment
``bench.subscriber`` (its own process, pattern-subscribed to the live channels) received
it: the sink may hand deltas to a writer thread and return before they are published. For
the SDK and the Router: the first content chunk yielded. CPU per chunk is this process's
CPU time (every thread, so background work of a library or a writer thread counts) from the
call until the process has gone idle after it (``settle``), over the variant's rounds,
divided by the chunks streamed (the mock's CPU is not in it).

``floor + PUBLISH`` is the floor that also PUBLISHes each chunk (``{"job_id", "seq",
"type": "delta", "ts", "text"}``) on a live channel with one redis-py call per chunk, then a
terminal message: the least a streaming relay through Redis pub/sub costs, and the floor for
the Redis sink's time to first delta received.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import redis

from bench.common import Namespace, Proc, start_mockllm, summary
from bench.scenarios import (
    CHAIN_AGENT,
    OVERHEAD,
    OVERHEAD_FALLBACK,
    PROMPT,
    SHORT,
    Fixed,
    chunk_texts,
    request_body,
    write_chain_agents,
)
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
            for _ in chunk_texts(sse.data):
                chunks += 1
                if not first:
                    first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks


FLOOR = "floor (httpx + httpx-sse)"
FLOOR_PUBLISH = "floor + PUBLISH per chunk"
LITELLM = "LiteLLM Router"
RELIEVER_NOOP = "reliever executor + no-op sink"
RELIEVER_REDIS = "reliever executor + Redis sink (flush 0)"
# CPU of background threads (a library's logging, a writer thread) is charged to the call
# it follows: after each call, wait until the process has been idle for a tick.
SETTLE_TICK_S = 0.002
SETTLE_CAP_S = 0.5


def settle() -> None:
    """Return once this process used under 10 % of a core over one tick (at most 0.5 s)."""
    ends = time.monotonic() + SETTLE_CAP_S
    while time.monotonic() < ends:
        c0 = time.process_time()
        time.sleep(SETTLE_TICK_S)
        if time.process_time() - c0 < 0.1 * SETTLE_TICK_S:
            return


def sdk_once(client: Any, model: str) -> tuple[float, float, int]:
    """(time to first content chunk, total time, content chunks) with the openai SDK."""
    from bench.plain_celery import stream_text

    t0 = time.perf_counter()
    first = 0.0
    chunks = 0
    for chunk in stream_text(client, model, PROMPT):
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if not first:
                first = time.perf_counter() - t0
    return first, time.perf_counter() - t0, chunks


def floor_publish_once(
    client: httpx.Client, url: str, body: dict[str, Any], rc: Any, prefix: str
) -> tuple[float, float, int, str, float]:
    """The floor, publishing each content chunk; also (job id, epoch at the call)."""
    job_id = str(uuid.uuid4())
    channel = f"{prefix}:events:{job_id}"
    epoch0 = time.time()
    t0 = time.perf_counter()
    first = 0.0
    chunks = 0
    with httpx_sse.connect_sse(client, "POST", url, json=body) as source:
        for sse in source.iter_sse():
            for text in chunk_texts(sse.data):
                chunks += 1
                event = {
                    "job_id": job_id,
                    "seq": chunks,
                    "type": "delta",
                    "ts": time.time(),
                    "text": text,
                }
                rc.publish(channel, json.dumps(event))
                if not first:
                    first = time.perf_counter() - t0
    done = {"job_id": job_id, "seq": chunks + 1, "type": "completed"}
    rc.publish(channel, json.dumps(done))
    return first, time.perf_counter() - t0, chunks, job_id, epoch0


class Executor:
    """Runs the fixed job through a real runtime's executor with a chosen sink."""

    def __init__(self, rt: Runtime, ns: Namespace, agent_name: str) -> None:
        self.rt = rt
        self.ns = ns
        agent = rt.agents.get(agent_name)
        assert agent is not None
        self.agent = agent
        self.model = agent_name
        # The last Redis-sink job: its id and the epoch time of its call, so that its first
        # delta can be timed by the subscriber process.
        self.last: tuple[str, float] | None = None
        # Redis-sink jobs whose replay log is still to be checked (outside the CPU window).
        self.unchecked: list[tuple[str, Event]] = []

    def check(self) -> None:
        """Check and delete the replay logs of the Redis-sink jobs run since the last call."""
        rt = self.rt
        for job_id, terminal in self.unchecked:
            _check_log(rt, job_id, terminal)
            rt.redis.delete(rt.keys.log(job_id), rt.keys.seq(job_id))
        self.unchecked.clear()

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
        if sink_kind == "redis":
            self.last = (job_id, time.time())
        t0 = time.perf_counter()
        outcome = rt.executor.run(job, self.agent, sink)
        sink.close()
        total = time.perf_counter() - t0
        if outcome.status != "completed":
            raise RuntimeError(f"job ended {outcome.status}: {outcome.terminal}")
        if sink_kind == "redis":
            self.unchecked.append((job_id, outcome.terminal))
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
        log_dir,
        {
            scenario.model: scenario.mock_steps(),
            OVERHEAD_FALLBACK.model: OVERHEAD_FALLBACK.mock_steps(),
            SHORT.model: SHORT.mock_steps(),
        },
    )
    agents_file = write_chain_agents(
        log_dir / "agents-inprocess.yaml", base_url, scenario.model, OVERHEAD_FALLBACK.model
    )
    rt = build_runtime(ns.settings(agents_file))
    bare = httpx.Client(
        timeout=30.0,
        limits=httpx.Limits(max_keepalive_connections=10, keepalive_expiry=60.0),
    )
    url = f"{base_url}/v1/chat/completions"
    body = request_body(scenario.model)
    ex = Executor(rt, ns, CHAIN_AGENT)
    pub = redis.Redis.from_url(ns.redis_url)
    published: list[tuple[str, float]] = []

    def floor_publish() -> tuple[float, float, int]:
        first, total, chunks, job_id, epoch0 = floor_publish_once(bare, url, body, pub, ns.prefix)
        published.append((job_id, epoch0))
        return first, total, chunks

    variants: dict[str, Callable[[], tuple[float, float, int]]] = {
        FLOOR: lambda: floor_once(bare, url, body),
        FLOOR_PUBLISH: floor_publish,
        RELIEVER_NOOP: lambda: ex.once("noop"),
        RELIEVER_REDIS: lambda: ex.once("redis"),
    }
    for ms in windows_ms:
        variants[f"reliever executor + Redis sink (flush {ms} ms)"] = lambda ms=ms: ex.once(
            "redis", ms / 1000.0
        )
    peers: dict[str, Any] = {}
    sdk = None
    try:
        from bench.plain_celery import openai_client

        sdk = openai_client(f"{base_url}/v1")
        variants["openai SDK alone (no chain)"] = lambda: sdk_once(sdk, scenario.model)
    except ImportError as exc:
        peers["openai"] = f"not installed ({exc}); pip install -e '.[bench]'"
    try:
        from bench import litellm_router

        router = litellm_router.make_router(base_url, scenario.model, OVERHEAD_FALLBACK.model)
        variants[LITELLM] = lambda: litellm_router.stream_once(router, PROMPT)
        peers["litellm"] = litellm_router.settings()
    except ImportError as exc:
        peers["litellm"] = f"not installed ({exc}); pip install -e '.[bench]'"
    timings = {name: Timing() for name in variants}
    done_rounds = 0
    # (variant, index in its first_s, job id, epoch at the call) of every Redis-sink job.
    redis_jobs: list[tuple[str, int, str, float]] = []
    sub_out = log_dir / "subscriber-inprocess.json"
    subscriber = Proc(
        "subscriber-inprocess",
        [
            sys.executable, "-m", "bench.subscriber", "--redis", ns.redis_url,
            "--prefix", ns.prefix, "--jobs", "1000000", "--cap-s", str(cap_s + 120),
            "--out", str(sub_out),
        ],
        log_dir,
    )  # fmt: skip
    subscriber.wait_for("subscribed", 15)
    started = time.monotonic()
    try:
        for _ in range(warmup):
            for fn in variants.values():
                fn()
            ex.check()
        for _ in range(rounds):
            if time.monotonic() - started > cap_s:
                break
            for name, fn in variants.items():
                c0 = time.process_time()
                first, total, chunks = fn()
                settle()
                timings[name].cpu_s += time.process_time() - c0
                ex.check()
                if "Redis sink" in name and ex.last is not None:
                    redis_jobs.append((name, len(timings[name].first_s), *ex.last))
                elif name == FLOOR_PUBLISH:
                    redis_jobs.append((name, len(timings[name].first_s), *published[-1]))
                timings[name].first_s.append(first)
                timings[name].total_s.append(total)
                timings[name].chunks += chunks
            done_rounds += 1
        rt.redis.publish(f"{ns.prefix}:events:_stop", "{}")
        subscriber.popen.wait(timeout=60)
        received = json.loads(sub_out.read_text(encoding="utf-8"))["first_delta"]
        for name, index, job_id, epoch0 in redis_jobs:
            if job_id not in received:
                raise RuntimeError(f"the subscriber saw no delta of job {job_id}")
            timings[name].first_s[index] = received[job_id] - epoch0
    finally:
        subscriber.stop()
        pub.close()
        bare.close()
        if sdk is not None:
            sdk.close()
        rt.close()
        mock.stop()
        ns.cleanup()
    floor = timings[FLOOR]
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
    by_name = {row["variant"]: row for row in rows}
    vs_peer = []
    if LITELLM in by_name:
        peer = by_name[LITELLM]["overhead"]
        for name in (RELIEVER_NOOP, RELIEVER_REDIS, *(n for n in by_name if "flush" in n)):
            if name not in by_name or any(v["variant"] == name for v in vs_peer):
                continue
            own = by_name[name]["overhead"]
            vs_peer.append(
                {
                    "variant": name,
                    **{
                        key: _fraction(own[key], peer[key])
                        for key in (
                            "first_p50_ms",
                            "first_p99_ms",
                            "total_p50_ms",
                            "total_p99_ms",
                            "cpu_us_per_chunk",
                        )
                    },
                }
            )
    return {
        "peers": peers,
        "vs_litellm": vs_peer,
        "scenario": {
            "chunks": scenario.chunks,
            "chunk_chars": scenario.chunk_chars,
            "server_delay_s": 0,
            "rounds": done_rounds,
            "warmup_rounds": warmup,
            "cap_s": cap_s,
            "upstream": "python -m worker.mockllm (own process), HTTP/1.1 keep-alive",
            "reliever_agent": "two-model chain, 2 retries, cooldown 1m (write_chain_agents)",
            "cpu_window": "call + background threads until the process idles (cap 0.5 s)",
        },
        "rows": rows,
    }


def _fraction(own: float, peer: float) -> float:
    """reliever's overhead over the floor as a fraction of the peer's (nan if the peer's <= 0)."""
    return own / peer if peer > 0 else float("nan")
