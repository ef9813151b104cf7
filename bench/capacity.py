"""Issue 3: how many concurrent slow streams one worker process holds, and at what cost.

One run = one worker process (``--pool P --concurrency N``, the Procfile's other flags),
``N`` jobs submitted at once, each a slow stream from ``bench.ticker`` (a delta every
``interval_ms`` for ``stream_s``), and ``bench.subscriber`` pattern-subscribed to the live
channel. Per token the subscriber measures receive time minus the upstream's send time
(the whole path, coalescing wait included). Reported:

* delta latency p50/p99/max over every token, and over the steady part (tokens sent after
  the ramp, i.e. ``ramp_s`` after the last submit, until a second before the schedule
  ends);
* the worker's peak RSS (``/proc/<pid>/status`` VmRSS, sampled every 0.5 s) and threads;
* CPU of the worker, Redis, the ticker and the subscriber in the steady window (percent
  of one core; the machine has two), and of everything else on the machine (other load);
* jobs completed/failed, seq gaps seen on the channel, the ticker's schedule lag.

:func:`run_floor` puts the same load on ``bench.floor_load`` (bare httpx + httpx-sse in
one gevent process, nothing published) and reports the same figures, so that a run shows
what the stack alone costs per streamed token on this machine next to the worker.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    POOL_HEADROOM,
    Namespace,
    Proc,
    Sampler,
    free_port,
    redis_server_pid,
    start_worker,
    summary,
)
from bench.scenarios import PROMPT
from bench.service import _client

TARGET_P99_S = 0.100
TARGET_RSS_MB = 500.0


def _busy_jiffies() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def wait_quiet(max_wait_s: float, threshold_pct: float = 40.0) -> float:
    """Wait (at most ``max_wait_s``) until the machine is nearly idle; its busy % then.

    Other sessions may be running tests on this machine; a run that starts during such a
    burst measures the burst. The busy share is in percent of one core, over 1 s.
    """
    ends = time.monotonic() + max_wait_s
    while True:
        b0 = _busy_jiffies()
        time.sleep(1.0)
        b1 = _busy_jiffies()
        busy = 100.0 * (os.cpu_count() or 1) * (b1[0] - b0[0]) / max(b1[1] - b0[1], 1.0)
        if busy < threshold_pct or time.monotonic() >= ends:
            return busy


def _write_agents(path: Path, base_url: str, model: str) -> Path:
    from bench.scenarios import write_agents

    return write_agents(path, base_url, [model])


def run_one(
    *,
    streams: int,
    pool: str,
    flush_ms: int,
    stream_s: float,
    interval_ms: int,
    ramp_s: float,
    log_dir: Path,
    default_pool: bool = False,
    quiet_wait_s: float = 0.0,
) -> dict[str, Any]:
    other_before = wait_quiet(quiet_wait_s)
    ns = Namespace()
    tag = f"{pool}-{streams}-f{flush_ms}"
    sub_out = log_dir / f"subscriber-{tag}.json"
    ticker, port, model, ticker_stats = _start_ticker(tag, stream_s, interval_ms, log_dir)
    worker = subscriber = None
    client = _client(ns)
    cap_s = stream_s + 60 + streams / 20
    result: dict[str, Any] = {
        "streams": streams,
        "pool": pool,
        "flush_ms": flush_ms,
        "stream_s": stream_s,
        "interval_ms": interval_ms,
        "redis_max_connections": None if default_pool else streams + POOL_HEADROOM,
        "other_cpu_before_pct": other_before,
    }
    try:
        ticker.wait_for("listening", 15)
        agents = _write_agents(log_dir / f"agents-{tag}.yaml", f"http://127.0.0.1:{port}", model)
        env = ns.settings_env(
            agents,
            max_connections=None if default_pool else streams + POOL_HEADROOM,
            RELIEVER_DELTA_FLUSH_MS=str(flush_ms),
        )
        worker = start_worker(log_dir, env, pool=pool, concurrency=streams, name=f"{ns.name}-cap")
        subscriber = Proc(
            f"subscriber-{tag}",
            [
                sys.executable, "-m", "bench.subscriber", "--redis", ns.redis_url,
                "--prefix", ns.prefix, "--jobs", str(streams), "--cap-s", str(cap_s),
                "--out", str(sub_out),
            ],
            log_dir,
        )  # fmt: skip
        subscriber.wait_for("subscribed", 15)
        pids = {"worker": worker.pid, "ticker": ticker.pid, "subscriber": subscriber.pid}
        redis_pid = redis_server_pid()
        if redis_pid is not None:
            pids["redis"] = redis_pid
        ids = [str(uuid.uuid4()) for _ in range(streams)]
        ns.job_ids += ids
        with Sampler(pids) as sampler:
            t0 = time.monotonic()
            epoch0 = time.time()
            for job_id in ids:
                client.submit(model, PROMPT, job_id=job_id)
            submit_s = time.monotonic() - t0
            window = _Window(t0, epoch0, submit_s + ramp_s, stream_s)
            machine_pct = window.measure(sampler)
            subscriber.popen.wait(timeout=cap_s + 30)
            sampler.mark("done")
        data = json.loads(sub_out.read_text(encoding="utf-8"))
        cpu = sampler.cpu_percent("steady0", "steady1")
        ours = sum(cpu.values())
        steady = window.latencies(data)
        result.update(
            {
                "submit_s": submit_s,
                "steady_window_s": [window.start_s, window.end_s],
                "completed": data["terminals"]["completed"],
                "failed": data["terminals"]["failed"],
                "failures": data["failures"],
                "seq_gaps": data["seq_gaps"],
                "timed_out": data["timed_out"],
                "tokens": len(data["e2e"]),
                "delta_events": data["delta_events"],
                "e2e_all": summary(data["e2e"]),
                "e2e_steady": summary(steady),
                "to_ts": summary(data["to_ts"]),
                "from_ts": summary(data["from_ts"]),
                "cpu_steady_pct": cpu,
                "other_cpu_pct": max(0.0, machine_pct - ours),
                "worker_peak_rss_mb": sampler.peak_rss()["worker"],
                "worker_peak_threads": sampler.peak_threads()["worker"],
                "redis_peak_rss_mb": sampler.peak_rss().get("redis", 0.0),
            }
        )
    finally:
        client.close()
        if subscriber is not None:
            subscriber.stop()
        if worker is not None:
            worker.stop(timeout_s=30)
        ticker.stop()
        ns.cleanup()
    if ticker_stats.exists():
        result["ticker"] = json.loads(ticker_stats.read_text(encoding="utf-8"))
    if "cpu_steady_pct" in result:
        tokens_per_s = streams * 1000 / interval_ms
        result["cpu_us_per_token"] = 1e4 * result["cpu_steady_pct"]["worker"] / tokens_per_s
    result["holds"] = _holds(result, streams)
    return result


def _start_ticker(
    tag: str, stream_s: float, interval_ms: int, log_dir: Path
) -> tuple[Proc, int, str, Path]:
    """A ticker for one run: its process, port, the model naming its schedule, stats file."""
    count = int(stream_s * 1000 / interval_ms)
    port = free_port()
    stats = log_dir / f"ticker-{tag}.json"
    ticker = Proc(
        f"ticker-{tag}",
        [sys.executable, "-m", "bench.ticker", "--port", str(port), "--stats", str(stats)],
        log_dir,
    )
    return ticker, port, f"tick-{interval_ms}-{count}", stats


class _Window:
    """A run's steady window: from ``start_s`` after ``t0`` until a second before the
    schedule ends (at least a second long)."""

    def __init__(self, t0: float, epoch0: float, start_s: float, stream_s: float) -> None:
        self.t0 = t0
        self.epoch0 = epoch0
        self.start_s = start_s
        self.end_s = max(start_s + 1.0, stream_s - 1.0)

    def measure(self, sampler: Sampler) -> float:
        """Wait through the window, marking ``steady0``/``steady1`` in ``sampler``.

        Returns:
            The whole machine's busy CPU over the window, in % of one core.
        """
        time.sleep(max(0.0, self.t0 + self.start_s - time.monotonic()))
        sampler.mark("steady0")
        busy0 = _busy_jiffies()
        time.sleep(max(0.0, self.t0 + self.end_s - time.monotonic()))
        sampler.mark("steady1")
        busy1 = _busy_jiffies()
        cores = os.cpu_count() or 1
        return 100.0 * cores * (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1.0)

    def latencies(self, data: dict[str, Any]) -> list[float]:
        """The latencies of the tokens sent inside the window."""
        lo, hi = self.epoch0 + self.start_s, self.epoch0 + self.end_s
        return [
            lat for sent, lat in zip(data["send"], data["e2e"], strict=True) if lo <= sent <= hi
        ]


def _holds(result: dict[str, Any], streams: int) -> bool:
    """Every stream completed, delta p99 (steady and over all) under 100 ms, RSS under 500 MB."""
    return bool(
        result.get("completed") == streams
        and not result.get("failed")
        and result.get("e2e_steady", {}).get("p99", float("inf")) < TARGET_P99_S
        and result.get("e2e_all", {}).get("p99", float("inf")) < TARGET_P99_S
        and result.get("worker_peak_rss_mb", 0.0) < TARGET_RSS_MB
    )


FLOOR_POOL = "floor: httpx + httpx-sse (gevent)"


def run_floor(
    *,
    streams: int,
    stream_s: float,
    interval_ms: int,
    ramp_s: float,
    log_dir: Path,
    spread_s: float,
    quiet_wait_s: float = 0.0,
) -> dict[str, Any]:
    """The capacity run's load read by ``bench.floor_load`` instead of a worker.

    ``spread_s``: how long the streams take to start (the worker run's ``submit_s``).
    """
    other_before = wait_quiet(quiet_wait_s)
    tag = f"floor-{streams}"
    out = log_dir / f"floor-{tag}.json"
    ticker, port, model, ticker_stats = _start_ticker(tag, stream_s, interval_ms, log_dir)
    reader = None
    result: dict[str, Any] = {
        "streams": streams,
        "pool": FLOOR_POOL,
        "flush_ms": None,
        "stream_s": stream_s,
        "interval_ms": interval_ms,
        "other_cpu_before_pct": other_before,
    }
    try:
        ticker.wait_for("listening", 15)
        reader = Proc(
            tag,
            [
                sys.executable, "-m", "bench.floor_load", "--url", f"http://127.0.0.1:{port}/v1",
                "--model", model, "--streams", str(streams), "--spread-s", f"{spread_s:.3f}",
                "--out", str(out),
            ],
            log_dir,
        )  # fmt: skip
        reader.wait_for("ready", 30)
        with Sampler({"worker": reader.pid, "ticker": ticker.pid}) as sampler:
            window = _Window(time.monotonic(), time.time(), spread_s + ramp_s, stream_s)
            machine_pct = window.measure(sampler)
            reader.popen.wait(timeout=stream_s + 60)
        data = json.loads(out.read_text(encoding="utf-8"))
        cpu = sampler.cpu_percent("steady0", "steady1")
        steady = window.latencies(data)
        tokens_per_s = streams * 1000 / interval_ms
        result.update(
            {
                "submit_s": spread_s,
                "steady_window_s": [window.start_s, window.end_s],
                "completed": streams - len(data["errors"]),
                "failed": len(data["errors"]),
                "failures": sorted(set(data["errors"])),
                "tokens": len(data["e2e"]),
                "e2e_all": summary(data["e2e"]),
                "e2e_steady": summary(steady),
                "cpu_steady_pct": cpu,
                "cpu_us_per_token": 1e4 * cpu["worker"] / tokens_per_s,
                "other_cpu_pct": max(0.0, machine_pct - sum(cpu.values())),
                "worker_peak_rss_mb": sampler.peak_rss()["worker"],
            }
        )
    finally:
        if reader is not None:
            reader.stop()
        ticker.stop()
    if ticker_stats.exists():
        result["ticker"] = json.loads(ticker_stats.read_text(encoding="utf-8"))
    result["holds"] = _holds(result, streams)
    return result
