"""Issue 5, failover: the primary always answers 503, the fallback is healthy.

In-process, against a mockllm in its own process (``fo-primary``: 503 on every request;
``fo-fallback``: 8 short chunks). Both peers get the same policy: 2 retries per model,
then the fallback, and a 60 s cooldown once the primary used up its retries. Backoffs
differ: reliever's is the agents-file default with jitter off (0.2 s + 0.4 s planned);
LiteLLM's is its own (0.5 s · 2^k + jitter, not configurable), so each peer's planned waits
are subtracted from its own time:

* reliever: ``ChainExecutor.run`` (``build_runtime``: guarded transport, Redis cooldown
  store) on agent ``bench-chain`` (``scenarios.write_chain_agents``,
  ``cooldown_on_exhausted: true``), events to an in-memory sink; planned waits = the
  ``delay_s`` of its ``retry`` events.
* LiteLLM: ``Router.completion(stream=True)`` with ``num_retries=2``, ``allowed_fails=2``,
  ``cooldown_time=60`` (``bench.litellm_router``); planned waits = what it asked its host
  to sleep.

Each round, interleaved: a direct fetch of the fallback's stream with bare httpx (the
floor), reliever's first job (pin cleared before it), reliever's next job (inside the
cooldown the first one armed), LiteLLM's first job (its cooldown and failure counts
cleared before it), LiteLLM's next job. Per job: total time, planned waits, the *added
latency* = total − planned waits − the floor's total of the same round (what the failover
costs beyond its waits and beyond streaming the answer), *added net* = that minus the bare
cost of the failed requests it made (three bare POSTs to the primary, timed each round after
the same pauses as reliever's attempts: the upstream's own 503 round trips), and the
upstream requests per model (``GET /_mock/requests`` counts before and after, outside the
timed window). reliever's jobs also get a stage breakdown from their events' ``ts``.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import Namespace, _git, start_mockllm, summary
from bench.inprocess import floor_once
from bench.scenarios import (
    CHAIN_AGENT,
    FAILING,
    PROMPT,
    RESCUE,
    request_body,
    write_chain_agents,
)
from worker.events import MemoryEventSink
from worker.jobs import parse_job
from worker.runtime import build_runtime

PLANNED_WAITS_S = (0.0, 0.2, 0.4)
"""reliever's pauses before its three attempts on the primary (backoff 0.2 s · 2^k, no jitter)."""


def _counts(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base_url}/_mock/requests", timeout=10) as resp:
        counts: dict[str, int] = json.load(resp)["counts"]
    return counts


def _stages(epoch0: float, total: float, events: list[dict[str, Any]]) -> dict[str, float]:
    """Where a reliever job's time goes, from its events' ``ts`` (one machine's epoch time).

    ``stage: failed attempts``: each failed attempt's ``attempt`` -> ``retry``/``fallback``
    stamp (request, 503, classification); ``stage: waits beyond delay_s``: each ``retry`` ->
    next ``attempt`` stamp minus its ``delay_s`` (sleep overshoot); ``stage: before started``:
    the call -> ``started`` (cooldown read); ``stage: answering attempt``: its ``attempt`` ->
    ``completed`` (the fallback's stream, the pin written).
    """
    out = {"stage: before started": events[0]["ts"] - epoch0}
    failed = overshoot = 0.0
    for prev, nxt in itertools.pairwise(events):
        if prev["type"] == "attempt" and nxt["type"] in ("retry", "fallback"):
            failed += nxt["ts"] - prev["ts"]
        if prev["type"] == "retry" and nxt["type"] == "attempt":
            overshoot += nxt["ts"] - prev["ts"] - prev["delay_s"]
    attempts = [e for e in events if e["type"] == "attempt"]
    out["stage: failed attempts"] = failed
    out["stage: waits beyond delay_s"] = overshoot
    out["stage: answering attempt"] = events[-1]["ts"] - attempts[-1]["ts"]
    out["stage: after completed"] = epoch0 + total - events[-1]["ts"]
    return out


def run(*, rounds: int, warmup: int, log_dir: Path, cap_s: float) -> dict[str, Any]:
    ns = Namespace()
    mock, base_url = start_mockllm(
        log_dir,
        {FAILING: [{"type": "status", "code": 503}], RESCUE.model: RESCUE.mock_steps()},
    )
    agents_file = write_chain_agents(
        log_dir / "agents-failover.yaml", base_url, FAILING, RESCUE.model
    )
    rt = build_runtime(ns.settings(agents_file))
    agent = rt.agents.get(CHAIN_AGENT)
    assert agent is not None
    bare = httpx.Client(timeout=30.0, limits=httpx.Limits(keepalive_expiry=60.0))
    url = f"{base_url}/v1/chat/completions"
    body = request_body(RESCUE.model)

    failing_url = f"{base_url}/v1/chat/completions"
    failing_body = request_body(FAILING)

    def failed_requests_floor() -> float:
        """Three bare POSTs to the failing primary (each a 503): the requests' own cost.

        Each is made after the same pause as reliever's attempt (its planned backoff): a
        request after 200 ms of quiet costs the upstream about 2 ms on this machine, one
        right after another about 0.6 ms, and reliever's attempts come after such pauses.
        """
        spent = 0.0
        for pause_s in PLANNED_WAITS_S:
            time.sleep(pause_s)
            t0 = time.perf_counter()
            resp = bare.post(failing_url, json=failing_body)
            spent += time.perf_counter() - t0
            if resp.status_code != 503:
                raise RuntimeError(f"the failing primary answered {resp.status_code}")
        return spent

    def reliever_job() -> dict[str, Any]:
        job_id = str(uuid.uuid4())
        job = parse_job(
            {"job_id": job_id, "agent": CHAIN_AGENT, "messages": PROMPT},
            max_bytes=rt.settings.max_job_bytes,
        )
        sink = MemoryEventSink(job_id, rt.clock)
        epoch0 = time.time()
        t0 = time.perf_counter()
        outcome = rt.executor.run(job, agent, sink)
        total = time.perf_counter() - t0
        if outcome.status != "completed" or outcome.terminal["model"] != RESCUE.model:
            raise RuntimeError(f"reliever failover job ended {outcome.terminal}")
        waits = sum(e["delay_s"] for e in sink.events if e["type"] == "retry")
        started = next(e for e in sink.events if e["type"] == "started")
        return {
            "total": total,
            "waits": waits,
            "in_cooldown": started["in_cooldown"],
            "stages": _stages(epoch0, total, sink.events),
        }

    peers: dict[str, Any] = {}
    litellm_job: Callable[[], dict[str, Any]] | None = None
    reset_litellm: Callable[[], None] | None = None
    try:
        from bench import litellm_router

        router = litellm_router.make_router(base_url, FAILING, RESCUE.model)
        peers["litellm"] = litellm_router.settings()

        def _litellm_job() -> dict[str, Any]:
            litellm_router.SLEEPS.clear()
            _first, total, chunks = litellm_router.stream_once(router, PROMPT)
            if chunks != RESCUE.chunks:
                raise RuntimeError(f"LiteLLM failover job streamed {chunks} chunks")
            return {"total": total, "waits": sum(litellm_router.SLEEPS)}

        litellm_job = _litellm_job

        def _reset() -> None:
            litellm_router.reset_cooldowns(router)

        reset_litellm = _reset
    except ImportError as exc:
        peers["litellm"] = f"not installed ({exc}); pip install -e '.[bench]'"

    samples: dict[str, dict[str, list[float]]] = {}

    def record(
        name: str, got: dict[str, Any], floor_total: float, floor_503: float, counts: dict[str, int]
    ) -> None:
        fields = ("total", "waits", "added", "added_net", "primary_requests", "fallback_requests")
        s = samples.setdefault(name, {k: [] for k in fields})
        s["total"].append(got["total"])
        s["waits"].append(got["waits"])
        s["added"].append(got["total"] - got["waits"] - floor_total)
        # Net of the bare cost of the failed requests this job had to make (3 per first job).
        failed = counts.get(FAILING, 0)
        s["added_net"].append(got["total"] - got["waits"] - floor_total - floor_503 * failed / 3)
        for stage, seconds in got.get("stages", {}).items():
            s.setdefault(stage, []).append(seconds)
        s["primary_requests"].append(counts.get(FAILING, 0))
        s["fallback_requests"].append(counts.get(RESCUE.model, 0))

    def measured(fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, int]]:
        before = _counts(base_url)
        got = fn()
        after = _counts(base_url)
        return got, {k: after.get(k, 0) - before.get(k, 0) for k in after}

    done = 0
    floors: list[float] = []
    floors_503: list[float] = []
    started = time.monotonic()
    try:
        for i in range(warmup + rounds):
            if time.monotonic() - started > cap_s:
                break
            _, floor_total, _ = floor_once(bare, url, body)
            floor_503 = failed_requests_floor()
            rt.cooldowns.clear(CHAIN_AGENT)
            first = measured(reliever_job)
            inside = measured(reliever_job)
            if not inside[0]["in_cooldown"]:
                raise RuntimeError("reliever's second job did not start inside the cooldown")
            peer_first = peer_inside = None
            if litellm_job is not None and reset_litellm is not None:
                reset_litellm()
                peer_first = measured(litellm_job)
                peer_inside = measured(litellm_job)
            if i < warmup:
                continue
            done += 1
            floors.append(floor_total)
            floors_503.append(floor_503)
            record("reliever, first job", first[0], floor_total, floor_503, first[1])
            record("reliever, inside the cooldown", inside[0], floor_total, floor_503, inside[1])
            if peer_first is not None and peer_inside is not None:
                record("LiteLLM Router, first job", peer_first[0], floor_total, floor_503,
                       peer_first[1])  # fmt: skip
                record("LiteLLM Router, inside the cooldown", peer_inside[0], floor_total,
                       floor_503, peer_inside[1])  # fmt: skip
    finally:
        bare.close()
        rt.cooldowns.clear(CHAIN_AGENT)
        rt.close()
        mock.stop()
        ns.cleanup()
    rows = []
    for name, s in samples.items():
        rows.append({"variant": name, **{key: summary(values) for key, values in s.items()}})
    return {
        "scenario": {
            "primary": f"{FAILING}: 503 on every request",
            "fallback": f"{RESCUE.model}: {RESCUE.chunks} chunks, no delay",
            "policy": "2 retries per model, then the fallback; cooldown 60 s",
            "reliever_backoff": "0.2 s * 2^k, no jitter (planned 0.6 s per first job)",
            "litellm_backoff": "its own, 0.5 s * 2^k + jitter <= 0.75 s",
            "rounds": done,
            "warmup_rounds": warmup,
            "cap_s": cap_s,
            "reliever_sink": "in-memory (MemoryEventSink); cooldowns in Redis",
        },
        "peers": peers,
        "floor_total": summary(floors),
        "floor_three_503": summary(floors_503),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "rows": rows,
    }
