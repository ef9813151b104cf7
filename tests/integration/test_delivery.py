"""Delivery machinery against real Redis: the event writer, leases, the reaper, cancels,
and a service rerun — the parts a worker process shares between its jobs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from settings import Settings
from tests.http_support import free_port, wait_for
from worker.clock import CancelToken, SystemClock
from worker.control import CancelListener
from worker.dead import DeadLetter
from worker.keys import Keys
from worker.lease import Leases
from worker.mockllm import MockLLM, Reply
from worker.redis_events import LeaseLost, RedisEventLog
from worker.runtime import build_runtime
from worker.service import ReapIncomplete, Service


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


def test_event_writer_wakes_for_an_event_nobody_waits_for(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """An idle writer stores each unwaited delta by itself: no later event or close() needed."""
    s = sink(redis_client, keys, "idle-wake")
    s.emit({"type": "delta", "n": 1, "text": "first"})  # waited for: the writer is idle after
    for i in range(2, 12):
        s.emit({"type": "delta", "n": 1, "text": f"t{i}"})
        wait_for(
            lambda i=i: True if len(log_of(redis_client, keys, "idle-wake")) == i else None,
            timeout_s=5,
            interval_s=0.005,
            what=f"delta {i} stored",
        )
    assert [e["text"] for e in log_of(redis_client, keys, "idle-wake")][-1] == "t11"
    s.close()


def test_a_waited_event_ends_the_writers_window(redis_client: redis.Redis, keys: Keys) -> None:
    """An attempt's first delta is stored at once though deltas before it wait out a
    60 s window."""
    s = sink(redis_client, keys, "urgent", flush_window_s=60.0)
    s.emit({"type": "delta", "n": 1, "text": "a"})
    s.emit({"type": "delta", "n": 1, "text": "b"})  # queued: the window holds it
    waited = threading.Thread(
        target=s.emit, args=({"type": "delta", "n": 2, "text": "c"},), daemon=True
    )
    waited.start()  # waited for: ends the window
    waited.join(5)
    assert not waited.is_alive(), "the waited delta stayed in the window"
    assert [e["text"] for e in log_of(redis_client, keys, "urgent")] == ["a", "b", "c"]
    s.close()


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
    keys_, args = [], []
    first.add_write(keys_, args, [event])
    assert first._writer._script(keys=keys_, args=args) == [0]

    second = sink(redis_client, keys, "again")
    second.emit({"type": "restarted", "discard": True})
    second.close()

    assert [e["seq"] for e in log_of(redis_client, keys, "again")] == [1, 2]
    assert second.last_seq == 1


def test_event_log_batch_isolates_a_job_whose_key_is_broken(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """One script call writes many jobs; a job whose replay log has the wrong type fails
    alone, with Redis's error, and the other jobs of the same call are written."""
    redis_client.hset(keys.log("broken"), "x", "1")
    broken, healthy = sink(redis_client, keys, "broken"), sink(redis_client, keys, "healthy")
    event = {"job_id": "x", "seq": 1, "type": "restarted", "ts": 0.0, "discard": True}
    keys_: list[str] = []
    args: list[Any] = []
    broken.add_write(keys_, args, [event])
    healthy.add_write(keys_, args, [event])

    replies = healthy._writer._script(keys=keys_, args=args)

    assert b"WRONGTYPE" in replies[0]
    assert replies[1] == 1
    assert len(log_of(redis_client, keys, "healthy")) == 1
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        broken.emit({"type": "delta", "n": 1, "text": "a"})


@contextlib.contextmanager
def private_redis(port: int, workdir: Path) -> Iterator[redis.Redis]:
    """A redis-server of this test's own on ``port`` (nothing on disk), stopped on exit."""
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(client), timeout_s=10, what=f"redis-server on port {port}")
        yield client
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool | None:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return None


def test_event_writer_survives_a_redis_restart(tmp_path: Path) -> None:
    """The writer's own connection reconnects and its script is loaded again after Redis
    restarts (empty: the server keeps nothing); the job's next events are stored."""
    port = free_port()
    keys = Keys("restart")
    with private_redis(port, tmp_path) as client:
        s = sink(redis.Redis(port=port), keys, "job")
        s.emit({"type": "delta", "n": 1, "text": "before "})
        assert len(log_of(client, keys, "job")) == 1
    with private_redis(port, tmp_path) as client:
        assert client.script_exists(s._writer._script.sha) == [False]
        s.emit({"type": "delta", "n": 2, "text": "after"})
        assert [(e["seq"], e["text"]) for e in log_of(client, keys, "job")] == [(2, "after")]


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

    lease = leases.acquire("kept", {"job_id": "kept"}, on_lost=lambda: None)
    leases.start(reap=failing_reap)

    assert lease is not None
    wait_for(lambda: True if len(reaps) >= 5 else None, timeout_s=5, interval_s=0.01, what="reaps")
    assert redis_client.get(keys.lease("kept")) == lease.token.encode()


def test_leases_claim_a_lapsed_job_once_and_keep_it_listed_until_requeued(
    leases: Leases, redis_client: redis.Redis, keys: Keys
) -> None:
    """A job whose lease lapsed is claimed by one reaper only, never by the process that
    holds it (its own renewals find the loss). It stays listed while claimed: a claim
    given back (the re-enqueue failed) is claimed again; once requeued, it is unlisted."""
    other, third = Leases(redis_client, keys, ttl_s=0.3), Leases(redis_client, keys, ttl_s=0.3)
    leases.acquire("lost", {"job_id": "lost", "agent": "a"}, on_lost=lambda: None)
    redis_client.delete(keys.lease("lost"))

    by_holder = leases.claim_lost()
    claimed = other.claim_lost() + third.claim_lost()
    listed_while_claimed = redis_client.hexists(keys.running(), "lost")
    other.unclaim("lost")
    again = third.claim_lost()
    third.requeued("lost")

    assert by_holder == []
    assert claimed == [{"job_id": "lost", "agent": "a"}]
    assert listed_while_claimed
    assert again == claimed
    assert not redis_client.hexists(keys.running(), "lost")
    assert not redis_client.exists(keys.reaping("lost"))


def test_a_requeued_job_that_a_new_run_leased_meanwhile_stays_listed(
    leases: Leases, redis_client: redis.Redis, keys: Keys
) -> None:
    """The re-enqueued copy can start before the reaper unlists the job: the new run's
    listing stays (its worker could die too)."""
    reaper = Leases(redis_client, keys, ttl_s=5)
    leases.acquire("fast", {"job_id": "fast"}, on_lost=lambda: None)
    redis_client.delete(keys.lease("fast"))
    assert reaper.claim_lost() == [{"job_id": "fast"}]
    rerun = Leases(redis_client, keys, ttl_s=5).acquire(
        "fast", {"job_id": "fast"}, on_lost=lambda: None
    )

    reaper.requeued("fast")

    assert rerun is not None
    assert redis_client.hexists(keys.running(), "fast")


def test_lease_comes_with_the_jobs_state_and_is_refused_while_held(
    leases: Leases, redis_client: redis.Redis, keys: Keys
) -> None:
    """One round trip takes the lease and reads the stored result, the log's last event,
    the cancel key, the last seq and the caller's key; a second taker gets None and
    changes nothing."""
    fresh = leases.acquire("fresh", {"job_id": "fresh"}, on_lost=lambda: None)
    s = sink(redis_client, keys, "used")
    s.emit({"type": "restarted", "discard": True})
    s.emit({"type": "failed", "error": {"kind": "internal", "message": "x"}, "attempts": []})
    redis_client.set(keys.result("used"), '{"status": "failed"}')
    redis_client.set(keys.cancel("used"), "1")
    redis_client.set(keys.cooldown("agent"), "pin")

    used = leases.acquire(
        "used", {"job_id": "used"}, on_lost=lambda: None, read_key=keys.cooldown("agent")
    )
    again = leases.acquire("used", {"job_id": "used", "other": 1}, on_lost=lambda: None)

    assert fresh is not None
    assert used is not None
    assert (fresh.result, fresh.last_event, fresh.cancelled, fresh.last_seq) == (
        None, None, False, 0
    )  # fmt: skip
    assert used.result == b'{"status": "failed"}'
    assert used.last_event is not None
    assert json.loads(used.last_event)["type"] == "failed"
    assert (used.cancelled, used.last_seq, used.read_value) == (True, 2, b"pin")
    assert again is None
    assert redis_client.get(keys.lease("used")) == used.token.encode()
    assert json.loads(redis_client.hget(keys.running(), "used")) == {"job_id": "used"}


def test_cancel_listener_reaches_every_token_of_a_job_and_unregisters_one(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """A duplicate delivery registers beside the running run; dropping it leaves the
    running run's token hooked, and a cancel while both are there reaches both."""
    listener = CancelListener(redis_client, keys)
    running, duplicate, later = CancelToken(), CancelToken(), CancelToken()
    listener.register("dup", running)
    listener.register("dup", duplicate)
    listener.unregister("dup", duplicate)

    listener.deliver("dup")

    assert running.cancelled
    assert not duplicate.cancelled
    listener.register("both", duplicate)
    listener.register("both", later)
    listener.deliver("both")
    assert duplicate.cancelled
    assert later.cancelled
    listener.unregister("both", duplicate)
    listener.unregister("both", later)
    assert listener._tokens == {"dup": [running]}


def write_agents_for(tmp_path: Path, mock: MockLLM) -> Path:
    agents = tmp_path / "agents.yaml"
    agents.write_text(
        "models:\n"
        f"  primary: {{provider: openai, base_url: '{mock.url}/v1', model: primary}}\n"
        "agents:\n  support: {model: primary}\n"
    )
    return agents


@pytest.fixture
def service(redis_url: str, key_prefix: str, mock: MockLLM, tmp_path: Path) -> Iterator[Service]:
    settings = Settings(
        _env_file=None,
        environment="test",
        redis_url=redis_url,
        key_prefix=key_prefix,
        agents_file=str(write_agents_for(tmp_path, mock)),
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
    lost.close()  # stored before the rerun starts, as a lost run's events are
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


def test_service_bug_before_the_chain_starts_still_ends_the_job_once(
    service: Service, redis_client: redis.Redis, keys: Keys, mock: MockLLM
) -> None:
    """An unexpected error after validation, before the chain (here: a lost run's log
    holds an `attempt` event without its number) ends the job with one `failed`
    (`internal`), written under the lease, which is then released."""
    lost = sink(redis_client, keys, "broken-log")
    lost.emit({"type": "attempt", "model": "primary"})
    lost.close()

    with pytest.raises(KeyError):
        service.run(message("broken-log"), task_id="broken-log")

    events = log_of(redis_client, keys, "broken-log")
    assert [e["type"] for e in events] == ["attempt", "failed"]
    assert events[-1]["error"]["kind"] == "internal"
    assert [e["seq"] for e in events] == [1, 2]
    assert json.loads(redis_client.get(keys.result("broken-log")))["status"] == "failed"
    assert not redis_client.exists(keys.lease("broken-log"))
    assert not redis_client.hexists(keys.running(), "broken-log")
    assert mock.count("primary") == 0


def test_a_broken_copy_of_a_job_waiting_for_the_reaper_leaves_it_listed(
    service: Service, redis_client: redis.Redis, keys: Keys
) -> None:
    """A job handed off (listed, no lease) whose message arrives broken: the dead letter
    writes nothing for it and it stays listed, so a reaper still re-enqueues it."""
    service.leases.acquire("waiting", message("waiting"), on_lost=lambda: None)
    service.leases.hand_off("waiting")

    service.dead_letter(DeadLetter("bad_body", "test", b"[1]", task_id="waiting"))

    assert redis_client.hexists(keys.running(), "waiting")
    assert log_of(redis_client, keys, "waiting") == []
    assert [m["job_id"] for m in Leases(redis_client, keys, ttl_s=5).claim_lost()] == ["waiting"]


def test_a_failed_re_enqueue_leaves_only_that_job_listed(
    redis_url: str, key_prefix: str, tmp_path: Path, mock: MockLLM, redis_client: redis.Redis
) -> None:
    """Three lost jobs, the broker refusing one: the other two are re-enqueued and
    unlisted, the third stays listed for the next reap, which takes it."""
    sent: list[str] = []
    refuse = {"b"}

    def enqueue(message: dict[str, Any]) -> None:
        if message["job_id"] in refuse:
            raise ConnectionError("broker down")
        sent.append(message["job_id"])

    settings = Settings(
        _env_file=None, environment="test", redis_url=redis_url, key_prefix=key_prefix,
        agents_file=str(write_agents_for(tmp_path, mock)),
    )  # fmt: skip
    runtime = build_runtime(settings)
    keys = Keys(key_prefix)
    try:
        reaper = Service(runtime, enqueue=enqueue)
        dead = Leases(redis_client, keys, ttl_s=5)
        for job_id in ("a", "b", "c"):
            dead.acquire(job_id, message(job_id), on_lost=lambda: None)
            redis_client.delete(keys.lease(job_id))

        with pytest.raises(ReapIncomplete):
            reaper.reap()
        listed = sorted(k.decode() for k in redis_client.hkeys(keys.running()))
        refuse.clear()
        reaper.reap()
    finally:
        runtime.close()

    assert listed == ["b"]
    assert sorted(sent) == ["a", "b", "c"]
    assert redis_client.hlen(keys.running()) == 0
