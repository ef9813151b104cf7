"""Issue 3, through the queue with a real worker process (the Procfile's command line).

* ``latency``: sequential jobs at low load. For each job, first the same stream is fetched
  directly from mockllm with a bare warm httpx client (time to its first content chunk and
  to its end), then the job is submitted with ``Client.submit`` and followed with
  ``Job.events()`` (XREAD on the replay log): enqueue -> first ``delta`` received, and
  enqueue -> terminal event. The overhead is the per-job difference, paired.
* ``throughput``: short jobs (``scenarios.SHORT``) submitted back to back from this process
  to one worker process; jobs per second from the first submit until every result is
  stored, and the worker's CPU per job.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import Namespace, Sampler, start_mockllm, start_worker, summary
from bench.inprocess import floor_once
from bench.scenarios import OVERHEAD, PROMPT, SHORT, request_body, write_agents
from worker.client import Client


def _client(ns: Namespace) -> Client:
    return Client(settings=ns.settings())


def _submit_and_wait(
    client: Client, rc: redis.Redis, model: str, ids: list[str], cap_s: float
) -> tuple[float, float, int]:
    """Submit ``ids`` back to back, then poll until every result is stored (or ``cap_s``).

    Returns (seconds to submit, seconds from the first submit to the last result, jobs
    still pending).
    """
    keys = [client.keys.result(job_id) for job_id in ids]
    t0 = time.perf_counter()
    for job_id in ids:
        client.submit(model, PROMPT, job_id=job_id)
    submitted = time.perf_counter() - t0
    pending = list(range(len(ids)))
    ends = time.monotonic() + cap_s
    while pending and time.monotonic() < ends:
        values = rc.mget([keys[i] for i in pending])
        pending = [i for i, v in zip(pending, values, strict=True) if v is None]
        if pending:
            time.sleep(0.01)
    return submitted, time.perf_counter() - t0, len(pending)


def _follow(client: Client, ns: Namespace, agent: str) -> dict[str, Any]:
    """Submit one job and follow it with ``events()``.

    Returns the times from the enqueue call to the first delta received and to the terminal
    event, the terminal type, and the worker-side stages from the events' ``ts`` (epoch,
    same machine): enqueue -> ``started`` stamped -> ``attempt`` -> first ``delta``
    stamped -> first delta received here.
    """
    job_id = str(uuid.uuid4())
    ns.job_ids.append(job_id)
    wall0 = time.time()
    t0 = time.perf_counter()
    job = client.submit(agent, PROMPT, job_id=job_id)
    out: dict[str, Any] = {"first": 0.0}
    stamps: dict[str, float] = {}
    for event in job.events(timeout=30):
        kind = event["type"]
        if kind not in stamps:
            stamps[kind] = event["ts"]
        if kind == "delta" and not out["first"]:
            out["first"] = time.perf_counter() - t0
            stamps["delta_received"] = time.time()
        if kind in ("completed", "failed"):
            out["terminal"] = time.perf_counter() - t0
            out["kind"] = kind
            if {"started", "attempt", "delta"} <= stamps.keys():
                out["stages"] = {
                    "enqueue -> started stamped": stamps["started"] - wall0,
                    "started -> attempt stamped": stamps["attempt"] - stamps["started"],
                    "attempt -> first delta stamped": stamps["delta"] - stamps["attempt"],
                    "first delta stamped -> received": stamps["delta_received"] - stamps["delta"],
                }
            return out
    raise RuntimeError("events() ended without a terminal event")


def latency(
    *,
    jobs: int,
    warmup: int,
    concurrency: int,
    flush_ms: int,
    log_dir: Path,
    cap_s: float,
    pool: str = "threads",
) -> dict[str, Any]:
    ns = Namespace()
    scenario = OVERHEAD
    mock, base_url = start_mockllm(log_dir, {scenario.model: scenario.mock_steps()})
    agents_file = write_agents(log_dir / "agents-latency.yaml", base_url, [scenario.model])
    env = ns.settings_env(agents_file, RELIEVER_DELTA_FLUSH_MS=str(flush_ms))
    worker = None
    client = _client(ns)
    bare = httpx.Client(timeout=30.0, limits=httpx.Limits(keepalive_expiry=60.0))
    url = f"{base_url}/v1/chat/completions"
    body = request_body(scenario.model)
    rows: dict[str, list[float]] = {
        k: [] for k in ("direct_first", "direct_total", "first", "terminal", "d_first", "d_term")
    }
    stages: dict[str, list[float]] = {}
    failed = 0
    started = time.monotonic()
    try:
        worker = start_worker(
            log_dir, env, pool=pool, concurrency=concurrency, name=f"{ns.name}-lat"
        )
        for i in range(warmup + jobs):
            if time.monotonic() - started > cap_s:
                break
            direct_first, direct_total, _ = floor_once(bare, url, body)
            got = _follow(client, ns, scenario.model)
            if i < warmup:
                continue
            failed += got["kind"] != "completed"
            rows["direct_first"].append(direct_first)
            rows["direct_total"].append(direct_total)
            rows["first"].append(got["first"])
            rows["terminal"].append(got["terminal"])
            rows["d_first"].append(got["first"] - direct_first)
            rows["d_term"].append(got["terminal"] - direct_total)
            for stage, seconds in got.get("stages", {}).items():
                stages.setdefault(stage, []).append(seconds)
    finally:
        bare.close()
        client.close()
        if worker is not None:
            worker.stop()
        mock.stop()
        ns.cleanup()
    return {
        "scenario": {
            "chunks": scenario.chunks,
            "chunk_chars": scenario.chunk_chars,
            "jobs": len(rows["first"]),
            "warmup_jobs": warmup,
            "pool": pool,
            "concurrency": concurrency,
            "delta_flush_ms": flush_ms,
            "reader": "Client.events() (XREAD on the replay log)",
        },
        "failed": failed,
        "stats": {name: summary(values) for name, values in rows.items()},
        "stages": {name: summary(values) for name, values in stages.items()},
    }


def throughput(
    *,
    jobs: int,
    concurrency: int,
    flush_ms: int,
    log_dir: Path,
    cap_s: float,
    pool: str = "threads",
) -> dict[str, Any]:
    ns = Namespace()
    scenario = SHORT
    mock, base_url = start_mockllm(log_dir, {scenario.model: scenario.mock_steps()})
    agents_file = write_agents(log_dir / "agents-throughput.yaml", base_url, [scenario.model])
    env = ns.settings_env(agents_file, RELIEVER_DELTA_FLUSH_MS=str(flush_ms))
    worker = None
    client = _client(ns)
    rc = redis.Redis.from_url(ns.redis_url)
    result: dict[str, Any] = {}
    try:
        worker = start_worker(
            log_dir, env, pool=pool, concurrency=concurrency, name=f"{ns.name}-tp"
        )
        for _ in range(5):  # warm the worker's connections
            _follow(client, ns, scenario.model)
        ids = [str(uuid.uuid4()) for _ in range(jobs)]
        ns.job_ids += ids
        keys = [client.keys.result(job_id) for job_id in ids]
        with Sampler({"worker": worker.pid, "mockllm": mock.pid}) as sampler:
            sampler.mark("t0")
            submitted, elapsed, pending = _submit_and_wait(client, rc, scenario.model, ids, cap_s)
            sampler.mark("t1")
        done = jobs - pending
        statuses = rc.mget(keys)
        completed = sum(
            1 for v in statuses if v is not None and json.loads(v).get("status") == "completed"
        )
        cpu = sampler.cpu_percent("t0", "t1")
        result = {
            "scenario": {
                "chunks": scenario.chunks,
                "jobs": jobs,
                "pool": pool,
                "concurrency": concurrency,
                "delta_flush_ms": flush_ms,
            },
            "done": done,
            "completed": completed,
            "elapsed_s": elapsed,
            "submit_s": submitted,
            "jobs_per_s": done / elapsed,
            "worker_cpu_pct": cpu["worker"],
            "worker_cpu_ms_per_job": 10 * cpu["worker"] * elapsed / max(done, 1),
            "worker_peak_rss_mb": sampler.peak_rss()["worker"],
            "timed_out": bool(pending),
        }
    finally:
        rc.close()
        client.close()
        if worker is not None:
            worker.stop()
        mock.stop()
        ns.cleanup()
    return result


def event_rate(
    *,
    jobs: int,
    concurrency: int,
    flush_ms: int,
    log_dir: Path,
    cap_s: float,
    pool: str = "threads",
) -> dict[str, Any]:
    """Delta events per second one worker process publishes, and tokens per second.

    ``jobs`` long fast streams (``scenarios.LONG``: 1000 chunks, no server delay) submitted
    at once to one worker with ``concurrency`` threads, so the worker streams and publishes
    as fast as it can. Delta events = each job's replay-log length minus its other events
    (``started``, ``attempt``, ``completed``); every event was also PUBLISHed. The clock runs
    from the first submit until every result is stored.
    """
    from bench.scenarios import LONG

    ns = Namespace()
    scenario = LONG
    mock, base_url = start_mockllm(log_dir, {scenario.model: scenario.mock_steps()})
    agents_file = write_agents(log_dir / "agents-events.yaml", base_url, [scenario.model])
    env = ns.settings_env(agents_file, RELIEVER_DELTA_FLUSH_MS=str(flush_ms))
    worker = None
    client = _client(ns)
    rc = redis.Redis.from_url(ns.redis_url)
    result: dict[str, Any] = {}
    try:
        worker = start_worker(
            log_dir, env, pool=pool, concurrency=concurrency, name=f"{ns.name}-ev"
        )
        _follow(client, ns, scenario.model)  # warm the worker's connections
        ids = [str(uuid.uuid4()) for _ in range(jobs)]
        ns.job_ids += ids
        keys = [client.keys.result(job_id) for job_id in ids]
        with Sampler({"worker": worker.pid, "mockllm": mock.pid}) as sampler:
            sampler.mark("t0")
            _, elapsed, pending = _submit_and_wait(client, rc, scenario.model, ids, cap_s)
            sampler.mark("t1")
        statuses = [json.loads(v) if v else {} for v in rc.mget(keys)]
        completed = sum(1 for s in statuses if s.get("status") == "completed")
        lengths = [int(rc.xlen(client.keys.log(job_id))) for job_id in ids]
        deltas = sum(max(0, n - 3) for n in lengths)
        tokens = completed * scenario.chunks
        cpu = sampler.cpu_percent("t0", "t1")
        worker_cpu_s = cpu["worker"] / 100 * elapsed
        result = {
            "scenario": {
                "chunks": scenario.chunks,
                "jobs": jobs,
                "pool": pool,
                "concurrency": concurrency,
                "delta_flush_ms": flush_ms,
            },
            "completed": completed,
            "elapsed_s": elapsed,
            "delta_events": deltas,
            "tokens": tokens,
            "delta_events_per_s": deltas / elapsed,
            "tokens_per_s": tokens / elapsed,
            "events_per_token": deltas / max(tokens, 1),
            "worker_cpu_pct": cpu["worker"],
            "mockllm_cpu_pct": cpu["mockllm"],
            "worker_cpu_us_per_token": 1e6 * worker_cpu_s / max(tokens, 1),
            "worker_peak_rss_mb": sampler.peak_rss()["worker"],
            "timed_out": bool(pending),
        }
    finally:
        rc.close()
        client.close()
        if worker is not None:
            worker.stop()
        mock.stop()
        ns.cleanup()
    return result
