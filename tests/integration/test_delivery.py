"""Delivery machinery against real Redis: the event writer, leases, the reaper, cancels,
and a service rerun — the parts a worker process shares between its jobs."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from settings import Settings
from tests.http_support import wait_for
from worker.clock import CancelToken, SystemClock
from worker.control import CancelListener
from worker.keys import Keys
from worker.lease import Leases
from worker.mockllm import MockLLM, Reply
from worker.redis_events import LeaseLost, RedisEventLog
from worker.runtime import build_runtime
from worker.service import Service


def log_of(client: redis.Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"e"]) for _id, f in client.xrange(keys.log(job_id))]


def sink(client: redis.Redis, keys: Keys, job_id: str, **kw: Any) -> RedisEventLog:
    return RedisEventLog(client, keys, job_id, SystemClock(), ttl_s=60, **kw)


def test_event_writer_keeps_each_jobs_events_gapless_and_exact_under_concurrency(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Twenty jobs emitting from their own threads each get seq 1..n and their exact text."""
    words = [f"w{i} " for i in range(200)]

    def run(job_id: str) -> None:
        s = sink(redis_client, keys, job_id)
        s.emit(
            {
                "type": "attempt",
                "n": 1,
                "model": "m",
                "attempt": 1,
                "max_attempts": 1,
                "fallback": False,
            }
        )
        for word in words:
            s.emit({"type": "delta", "n": 1, "text": word})
        s.emit({"type": "completed", "text": "".join(words)})
        s.close()

    threads = [threading.Thread(target=run, args=(f"job-{i}",)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    for i in range(20):
        events = log_of(redis_client, keys, f"job-{i}")
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[0]["type"] == "attempt"
        assert events[-1]["type"] == "completed"
        assert "".join(e["text"] for e in events if e["type"] == "delta") == "".join(words)
        assert int(redis_client.get(keys.seq(f"job-{i}"))) == len(events)


def test_event_writer_merges_queued_deltas_of_one_attempt_only(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """Deltas held by a window merge within an attempt (its first delta goes out alone, at
    once), never across attempts or other events."""
    s = sink(redis_client, keys, "merge", flush_window_s=0.2)
    for text in ("a", "b", "c"):
        s.emit({"type": "delta", "n": 1, "text": text})
    s.emit({"type": "delta", "n": 2, "text": "d"})
    s.emit({"type": "retry", "n": 2, "model": "m", "delay_s": 0.1, "error": {}, "discard": True})
    s.emit({"type": "delta", "n": 3, "text": "e"})
    s.close()

    events = log_of(redis_client, keys, "merge")
    assert [(e["seq"], e["type"], e.get("n"), e.get("text")) for e in events] == [
        (1, "delta", 1, "a"),
        (2, "delta", 1, "bc"),
        (3, "delta", 2, "d"),
        (4, "retry", 2, None),
        (5, "delta", 3, "e"),
    ]


def test_event_log_refuses_writes_once_the_lease_moved(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A run whose lease token is no longer the job's cannot write; it learns LeaseLost at
    its next waited event (an attempt's first delta, the terminal event)."""
    redis_client.set(keys.lease("fenced"), "someone-else")
    s = sink(redis_client, keys, "fenced", lease_token="mine")

    s.emit(
        {
            "type": "started",
            "agent": "a",
            "chain": ["m"],
            "start_model": "m",
            "in_cooldown": False,
        }
    )

    with pytest.raises(LeaseLost):
        s.emit({"type": "delta", "n": 1, "text": "first"})
    with pytest.raises(LeaseLost):
        s.emit({"type": "failed", "error": {"kind": "internal", "message": "x"}, "attempts": []})
    assert redis_client.xlen(keys.log("fenced")) == 0


def test_event_log_append_is_idempotent_and_a_rerun_continues_seq(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A batch written twice (a lost reply, then a retry) lands once; a new run goes on at n+1."""
    first = sink(redis_client, keys, "again")
    first.emit({"type": "restarted", "discard": True})
    first.close()
    event = log_of(redis_client, keys, "again")[0]
    pipe = redis_client.pipeline(transaction=False)
    first.queue_write(first._writer._script, pipe, [event])
    pipe.execute()

    second = sink(redis_client, keys, "again")
    second.emit({"type": "restarted", "discard": True})
    second.close()

    assert [e["seq"] for e in log_of(redis_client, keys, "again")] == [1, 2]
    assert second.last_seq == 1


@pytest.fixture
def leases(redis_client: redis.Redis, keys: Keys) -> Iterator[Leases]:
    lease = Leases(redis_client, keys, ttl_s=0.3)
    yield lease
    lease.stop()


def test_leases_keep_renewing_when_the_reaper_fails(
    leases: Leases, redis_client: redis.Redis, keys: Keys
) -> None:
    """An error in the reaper (a broker blip while re-enqueueing) does not stop renewals."""
    reaps = []

    def failing_reap() -> None:
        reaps.append(1)
        raise RuntimeError("broker unreachable")

    token = leases.acquire("kept", {"job_id": "kept"}, on_lost=lambda: None)
    leases.start(reap=failing_reap)

    assert token is not None
    wait_for(lambda: True if len(reaps) >= 5 else None, timeout_s=5, interval_s=0.01, what="reaps")
    assert redis_client.get(keys.lease("kept")) == token.encode()


def test_leases_claim_a_lapsed_job_once_and_put_it_back(
    leases: Leases, redis_client: redis.Redis, keys: Keys
) -> None:
    """A job whose lease lapsed is claimed by one reaper only; put_back lists it again."""
    other = Leases(redis_client, keys, ttl_s=0.3)
    leases.acquire("lost", {"job_id": "lost", "agent": "a"}, on_lost=lambda: None)
    redis_client.delete(keys.lease("lost"))

    claimed = leases.claim_lost() + other.claim_lost()
    leases.put_back(claimed[0])

    assert claimed == [{"job_id": "lost", "agent": "a"}]
    assert redis_client.hexists(keys.running(), "lost")


def test_cancel_listener_keeps_the_running_token_when_a_duplicate_comes_and_goes(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A dropped duplicate delivery of a running job does not unhook the job's cancel."""
    listener = CancelListener(redis_client, keys)
    running, duplicate = CancelToken(), CancelToken()
    listener.register("dup", running)
    listener.register("dup", duplicate)
    listener.unregister("dup", duplicate)
    listener.register("dup", running)
    listener.unregister("dup", duplicate)

    listener.deliver("dup")

    assert running.cancelled
    assert not duplicate.cancelled


@pytest.fixture
def service(redis_url: str, key_prefix: str, mock: MockLLM, tmp_path) -> Iterator[Service]:
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        "models:\n"
        f"  primary: {{provider: openai, base_url: '{mock.url}/v1', model: primary}}\n"
        "agents:\n  support: {model: primary}\n"
    )
    settings = Settings(
        _env_file=None,
        environment="test",
        redis_url=redis_url,
        key_prefix=key_prefix,
        agents_file=str(agents),
    )
    runtime = build_runtime(settings)
    yield Service(runtime, enqueue=lambda message: None)
    runtime.close()


def message(job_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "agent": "support",
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


def test_service_rerun_after_the_terminal_event_returns_it_without_a_model_call(
    service: Service, redis_client: redis.Redis, keys: Keys, mock: MockLLM
) -> None:
    """A worker that died between the terminal event and storing the result: no second run."""
    s = sink(redis_client, keys, "ended")
    s.emit({"type": "completed", "model": "primary", "text": "done before", "attempts": []})

    result = service.run(message("ended"), task_id="ended")

    assert result is not None
    assert result["status"] == "completed"
    assert result["text"] == "done before"
    assert mock.count("primary") == 0
    assert [e["type"] for e in log_of(redis_client, keys, "ended")] == ["completed"]


def test_service_rerun_continues_attempt_numbers_and_keeps_the_deadline(
    service: Service, redis_client: redis.Redis, keys: Keys, mock: MockLLM
) -> None:
    """A rerun after a lost run numbers its attempts after the lost ones, under one deadline."""
    mock.script("primary", [Reply(text="second run")])
    lost = sink(redis_client, keys, "rerun")
    lost.emit(
        {
            "type": "started",
            "agent": "support",
            "chain": ["primary"],
            "start_model": "primary",
            "in_cooldown": False,
        }
    )
    lost.emit(
        {
            "type": "attempt",
            "n": 1,
            "model": "primary",
            "attempt": 1,
            "max_attempts": 3,
            "fallback": False,
        }
    )
    job = message("rerun", deadline_s=30)
    first_deadline = service._deadline(service_job(job))

    result = service.run(job, task_id="rerun")

    events = log_of(redis_client, keys, "rerun")
    assert result is not None
    assert result["text"] == "second run"
    assert [e["type"] for e in events][:3] == ["started", "attempt", "restarted"]
    assert [e["n"] for e in events if e["type"] == "attempt"] == [1, 2]
    again = service._deadline(service_job(job))
    assert first_deadline is not None
    assert again is not None
    assert abs(again.at - first_deadline.at) < 0.5


def service_job(raw: dict[str, Any]):
    from worker.jobs import parse_job

    return parse_job(raw, max_bytes=1_000_000)
