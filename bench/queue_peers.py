"""Issue 5, through the queue: reliever's task against a plain hand-written Celery task.

Two worker processes run at once, started the same way (``--pool P --concurrency N
--prefetch-multiplier 1 -E``, acks_late, prefetch 1; run for the Procfile's pool and
concurrency, and for threads): reliever's (``celery -A worker``, the
Procfile's line, ``reliever.complete``) and the baseline's (``celery -A bench.plain_celery``,
``bench.plain_complete``: the ``openai`` SDK, ``autoretry_for`` + ``retry_backoff``, each chunk
PUBLISHed). Both stream the same fixed mockllm response (``scenarios.OVERHEAD``).

Jobs run one at a time (low load), interleaved round by round: a direct fetch of the stream
with a bare warm httpx client (the floor), a reliever job, a plain job. The subscriber is the
same for both: one Redis connection in this process SUBSCRIBEs to the job's channel
(reliever: ``{prefix}:events:{job_id}``; plain: ``{prefix}:plain:{job_id}``), waits for the
confirmation, then the job is enqueued (reliever: ``Client.submit``; plain:
``send_task``) and the clock runs from just before the enqueue call to the first delta
received and to the terminal message (``completed``/``failed``; ``done``). Overheads are per
pair: job minus the direct fetch of the same round.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.common import Namespace, Proc, start_mockllm, start_worker, summary, worker_command
from bench.inprocess import floor_once
from bench.scenarios import OVERHEAD, PROMPT, request_body, write_agents
from bench.service import _client

TERMINAL = {"completed", "failed", "done"}


def _follow(pubsub: Any, channel: str, enqueue: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    """Subscribe to ``channel``, call ``enqueue()``, read until a terminal message."""
    pubsub.subscribe(channel)
    ends = time.monotonic() + 5
    while time.monotonic() < ends:
        msg = pubsub.get_message(timeout=1.0)
        if msg is not None and msg["type"] == "subscribe":
            break
    else:
        raise RuntimeError(f"no subscribe confirmation for {channel}")
    wall0 = time.time()
    t0 = time.perf_counter()
    enqueue()
    out: dict[str, Any] = {"first": 0.0}
    stamps: dict[str, float] = {}
    ends = time.monotonic() + timeout_s
    try:
        while time.monotonic() < ends:
            msg = pubsub.get_message(timeout=1.0)
            if msg is None or msg["type"] != "message":
                continue
            now = time.perf_counter()
            received = time.time()
            event = json.loads(msg["data"])
            kind = event.get("type")
            if "ts" in event:
                stamps.setdefault(kind, event["ts"])
            if kind == "delta" and not out["first"]:
                out["first"] = now - t0
                stamps["received"] = received
            if kind in TERMINAL:
                out["terminal"] = now - t0
                out["kind"] = "completed" if kind == "done" else kind
                out["stages"] = _stages(wall0, stamps)
                return out
        raise RuntimeError(f"{channel}: no terminal message within {timeout_s}s")
    finally:
        pubsub.unsubscribe(channel)
        # Drain the unsubscribe confirmation so the next job starts clean.
        for _ in range(10):
            msg = pubsub.get_message(timeout=0.2)
            if msg is not None and msg["type"] == "unsubscribe":
                break


def _stages(wall0: float, stamps: dict[str, float]) -> dict[str, float]:
    """Where the time to first delta goes, from the messages' ``ts`` (epoch, one machine)."""
    if "delta" not in stamps or "received" not in stamps:
        return {}
    if "started" in stamps and "attempt" in stamps:
        return {
            "enqueue -> started stamped": stamps["started"] - wall0,
            "started -> attempt stamped": stamps["attempt"] - stamps["started"],
            "attempt -> first delta stamped": stamps["delta"] - stamps["attempt"],
            "first delta stamped -> received": stamps["received"] - stamps["delta"],
        }
    return {
        "enqueue -> first delta stamped": stamps["delta"] - wall0,
        "first delta stamped -> received": stamps["received"] - stamps["delta"],
    }


def run(
    *, jobs: int, warmup: int, pool: str, concurrency: int, log_dir: Path, cap_s: float
) -> dict[str, Any]:
    from bench.plain_celery import TASK, make_app

    ns = Namespace()
    scenario = OVERHEAD
    mock, base_url = start_mockllm(log_dir, {scenario.model: scenario.mock_steps()})
    agents_file = write_agents(log_dir / "agents-queue-peers.yaml", base_url, [scenario.model])
    env = ns.settings_env(agents_file)
    plain_queue = f"{ns.queue}-plain"
    plain_env = dict(env)
    plain_env.update(
        BENCH_PLAIN_REDIS=ns.redis_url,
        BENCH_PLAIN_QUEUE=plain_queue,
        BENCH_PLAIN_PREFIX=ns.prefix,
        BENCH_PLAIN_BASE_URL=f"{base_url}/v1",
    )
    plain_app = make_app(ns.redis_url, plain_queue)
    client = _client(ns)
    rc = redis.Redis.from_url(ns.redis_url)
    pubsub = rc.pubsub()
    bare = httpx.Client(timeout=30.0, limits=httpx.Limits(keepalive_expiry=60.0))
    url = f"{base_url}/v1/chat/completions"
    body = request_body(scenario.model)
    keys = ("direct_first", "direct_total")
    peers = ("reliever", "plain")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    for peer in peers:
        for k in ("first", "terminal", "d_first", "d_term"):
            rows[f"{peer}_{k}"] = []
    failed = {peer: 0 for peer in peers}
    stages: dict[str, dict[str, list[float]]] = {peer: {} for peer in peers}
    workers: list[Proc] = []
    started = time.monotonic()
    plain_ids: list[str] = []

    def reliever_job() -> dict[str, Any]:
        job_id = str(uuid.uuid4())
        ns.job_ids.append(job_id)
        return _follow(
            pubsub,
            client.keys.events(job_id),
            lambda: client.submit(scenario.model, PROMPT, job_id=job_id),
        )

    def plain_job() -> dict[str, Any]:
        job_id = str(uuid.uuid4())
        plain_ids.append(job_id)
        return _follow(
            pubsub,
            f"{ns.prefix}:plain:{job_id}",
            lambda: plain_app.send_task(
                TASK, args=[job_id, scenario.model, PROMPT], task_id=job_id, queue=plain_queue
            ),
        )

    done = 0
    try:
        workers.append(
            start_worker(log_dir, env, pool=pool, concurrency=concurrency, name=f"{ns.name}-rel")
        )
        plain = Proc(
            f"{ns.name}-plain",
            [
                *worker_command(pool, concurrency, f"{ns.name}-plain", app="bench.plain_celery"),
                "--queues",
                plain_queue,
            ],
            log_dir,
            plain_env,
        )
        workers.append(plain)
        plain.wait_for(" ready.", 60)
        for i in range(warmup + jobs):
            if time.monotonic() - started > cap_s:
                break
            direct_first, direct_total, _ = floor_once(bare, url, body)
            got = {"reliever": reliever_job(), "plain": plain_job()}
            if i < warmup:
                continue
            done += 1
            rows["direct_first"].append(direct_first)
            rows["direct_total"].append(direct_total)
            for peer, res in got.items():
                failed[peer] += res["kind"] != "completed"
                rows[f"{peer}_first"].append(res["first"])
                rows[f"{peer}_terminal"].append(res["terminal"])
                rows[f"{peer}_d_first"].append(res["first"] - direct_first)
                rows[f"{peer}_d_term"].append(res["terminal"] - direct_total)
                for stage, seconds in res.get("stages", {}).items():
                    stages[peer].setdefault(stage, []).append(seconds)
    finally:
        bare.close()
        pubsub.close()
        client.close()
        for w in workers:
            w.stop()
        mock.stop()
        ns.job_ids += plain_ids
        ns.cleanup()
        rc.close()
        plain_app.close()
    stats = {name: summary(values) for name, values in rows.items()}
    ratios = {}
    for key in ("first", "terminal", "d_first", "d_term"):
        r, p = stats[f"reliever_{key}"], stats[f"plain_{key}"]
        ratios[key] = {
            q: (r[q] / p[q] if r.get("n") and p[q] > 0 else float("nan")) for q in ("p50", "p99")
        }
    return {
        "scenario": {
            "chunks": scenario.chunks,
            "chunk_chars": scenario.chunk_chars,
            "jobs": done,
            "warmup_jobs": warmup,
            "pool": pool,
            "concurrency": concurrency,
            "prefetch": 1,
            "delta_flush_ms": "unset (the default)",
            "reliever": "celery -A worker (reliever.complete), replay log + seq + live channel",
            "plain": "celery -A bench.plain_celery (openai SDK, autoretry_for, PUBLISH per chunk)",
            "subscriber": "SUBSCRIBE to the job's channel before enqueue, one connection",
        },
        "failed": failed,
        "stats": stats,
        "ratio_reliever_to_plain": ratios,
        "stages": {
            peer: {name: summary(values) for name, values in per.items()}
            for peer, per in stages.items()
        },
        "python": sys.version.split()[0],
    }
