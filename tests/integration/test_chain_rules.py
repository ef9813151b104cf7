"""The chain rules 1-10 (docs/design.md), one scenario each, over real HTTP to the mock.

Time is a FakeClock unless a scenario is about real sockets timing out or being cancelled
(then SystemClock with tiny budgets). Cooldowns live in MemoryCooldownStore, or in Redis
where the scenario is about another process's view or a TTL.
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.http_support import wait_for
from worker.clock import CancelToken, SystemClock
from worker.cooldown import MemoryCooldownStore, Pin, PinAtStart, RedisCooldownStore
from worker.events import TERMINAL_TYPES, MemoryEventSink
from worker.keys import Keys
from worker.mockllm import (
    Cut,
    ErrorBody200,
    Garbage,
    Idle,
    NoEndMarker,
    Reply,
    Stall,
    Status,
    StreamError,
    WrongContentType,
)
from worker.mockllm.server import default_answer, mask

DEFAULT = default_answer("Tell me about Celery.")
P = "hello from primary"
B = "hello from backup"
T = "hello from third"
NAMES = ("primary", "backup", "third")
FAST_BACKOFF = {"base": "200ms", "factor": 2, "max": "2s", "jitter": 0}
# Tight enough that a 5 s stall proves the timeout fired, loose enough that the attempt
# meant to succeed is not cut by a scheduling hiccup on a loaded 2-core machine.
TINY_TIMEOUTS = {"connect": "1s", "first_token": "300ms", "idle": "300ms", "total": "5s"}
TINY_BACKOFF = {"base": "1ms", "factor": 2, "max": "1ms", "jitter": 0}


# --- helpers -------------------------------------------------------------------------------


def said(n: int, text: str) -> list[tuple[Any, ...]]:
    """The delta events of attempt ``n`` when the mock streams ``text`` word by word."""
    words = text.split(" ")
    return [("delta", n, w if i == len(words) - 1 else w + " ") for i, w in enumerate(words)]


def shape(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each event's type and key fields, after checking seq, job_id and the one terminal."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["job_id"] for e in events}) == 1
    assert [e["type"] in TERMINAL_TYPES for e in events] == [False] * (len(events) - 1) + [True]
    out: list[tuple[Any, ...]] = []
    for e in events:
        kind = e["type"]
        if kind == "started":
            out.append(("started", e["start_model"], e["in_cooldown"]))
        elif kind == "attempt":
            fields = ("n", "model", "attempt", "max_attempts", "fallback")
            out.append(("attempt", *(e[f] for f in fields)))
        elif kind == "delta":
            out.append(("delta", e["n"], e["text"]))
        elif kind == "retry":
            out.append(
                ("retry", e["n"], e["model"], e["delay_s"], e["error"]["kind"], e["discard"])
            )
        elif kind == "fallback":
            out.append(("fallback", e["from"], e["to"], e["reason"], e["discard"]))
        elif kind == "completed":
            out.append(("completed", e["model"], e["text"], e["fallback_used"]))
        else:
            out.append(("failed", e["error"]["kind"]))
    return out


def agent_cfg(fallbacks: tuple[str, ...] = ("backup",), **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model": "primary",
        "fallbacks": list(fallbacks),
        "backoff": FAST_BACKOFF,
    }
    cfg.update(over)
    return cfg


def models_cfg(url: str, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The mock's three models, plus or overriding any given by name."""
    models = {n: {"provider": "openai", "base_url": f"{url}/v1", "model": n} for n in NAMES}
    for name, cfg in extra.items():
        models[name] = {"provider": "openai", "base_url": f"{url}/v1", "model": name, **cfg}
    return models


class SignallingSink(MemoryEventSink):
    """Keeps events and sets ``seen`` when the first event of type ``watch`` is delivered."""

    def __init__(self, job_id: str, clock: Any, watch: str = "delta") -> None:
        super().__init__(job_id, clock)
        self.watch = watch
        self.seen = threading.Event()

    def write(self, event: dict[str, Any]) -> None:
        super().write(event)
        if event["type"] == self.watch:
            self.seen.set()


def cancel_when_seen(sink: SignallingSink, token: CancelToken) -> tuple[threading.Thread, list]:
    """Cancel ``token`` from another thread as soon as ``sink`` sees its watched event."""
    cancelled_at: list[float] = []

    def cancel() -> None:
        if sink.seen.wait(5.0):
            cancelled_at.append(time.monotonic())
            token.cancel()

    thread = threading.Thread(target=cancel, name="canceller", daemon=True)
    thread.start()
    return thread, cancelled_at


@pytest.fixture
def agent(make_agents):
    """``agent(**over)``: the ``support`` agent (primary, then backup) with overrides."""

    def make(**over: Any):
        return make_agents(agents={"support": agent_cfg(**over)}).agents["support"]

    return make


@pytest.fixture
def redis_store(redis_client, keys) -> RedisCooldownStore:
    return RedisCooldownStore(redis_client, keys)


@pytest.fixture
def other_process_store(redis_url, key_prefix) -> Iterator[RedisCooldownStore]:
    """A cooldown store on its own Redis connection and Keys: another process's view."""
    client = redis.Redis.from_url(redis_url)
    yield RedisCooldownStore(client, Keys(key_prefix))
    client.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new connections hang in SYN_SENT."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for filler in fillers:
        filler.close()
    server.close()


# --- rule 2: retryable errors back off and retry the same model ----------------------------


def test_chain_retryable_twice_then_success_retries_same_model(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """Two 503s are retried on the primary after 0.2 s and 0.4 s, then it answers."""
    mock.script("primary", [Status(503), Status(503), Reply(text=P)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("retry", 1, "primary", 0.2, "retryable", False),
        ("attempt", 2, "primary", 2, 3, False),
        ("retry", 2, "primary", 0.4, "retryable", False),
        ("attempt", 3, "primary", 3, 3, False),
        *said(3, P),
        ("completed", "primary", P, False),
    ]
    assert clock.sleeps == [0.2, 0.4]
    assert sink.events[2]["error"]["status"] == 503
    records = outcome.terminal["attempts"]
    assert [(r["n"], r["model"], r["attempt"], r["outcome"]) for r in records] == [
        (1, "primary", 1, "retryable"),
        (2, "primary", 2, "retryable"),
        (3, "primary", 3, "ok"),
    ]
    assert records[0]["error"]["status"] == 503
    assert records[2]["error"] is None
    assert all(r["latency_s"] >= 0 for r in records)
    assert (mock.count("primary"), mock.count("backup")) == (3, 0)


def test_chain_retries_exhausted_then_fallback_without_waiting_between_models(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A primary failing 1 + retries times falls back at once: no wait after its last try."""
    mock.script("primary", [Status(500)])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("retry", 1, "primary", 0.2, "retryable", False),
        ("attempt", 2, "primary", 2, 3, False),
        ("retry", 2, "primary", 0.4, "retryable", False),
        ("attempt", 3, "primary", 3, 3, False),
        ("fallback", "primary", "backup", "retryable", False),
        ("attempt", 4, "backup", 1, 3, True),
        *said(4, B),
        ("completed", "backup", B, True),
    ]
    assert clock.sleeps == [0.2, 0.4]
    assert (mock.count("primary"), mock.count("backup")) == (3, 1)


def test_chain_retries_zero_gives_one_attempt_per_model(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """With ``retries: 0`` a retryable failure moves to the next model after one attempt."""
    mock.script("primary", [Status(503)])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(retries=0), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 1, False),
        ("fallback", "primary", "backup", "retryable", False),
        ("attempt", 2, "backup", 1, 1, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert clock.sleeps == []


def test_chain_503_retry_after_replaces_the_backoff_delay(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A 503's Retry-After is the one wait before the retry (capped at 60 s)."""
    mock.script("primary", [Status(503, retry_after="3"), Status(503, retry_after="600"), Reply()])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert outcome.status == "completed"
    retries = [e for e in sink.events if e["type"] == "retry"]
    assert [r["delay_s"] for r in retries] == [3.0, 60.0]
    assert [r["error"]["retry_after_s"] for r in retries] == [3.0, 600.0]
    assert clock.sleeps == [3.0, 60.0]


def test_chain_retry_after_http_date_is_read_on_the_injected_clock(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A Retry-After HTTP-date is turned into seconds from the executor's clock, not the host's."""
    when = email.utils.formatdate(clock.time() + 7, usegmt=True)
    mock.script("primary", [Status(503, retry_after=when), Reply(text=P)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(), sink)

    assert 6.0 < clock.sleeps[0] <= 7.0
    assert len(clock.sleeps) == 1


# --- rule 3: 429 ---------------------------------------------------------------------------


@pytest.mark.parametrize("retry_on_rate_limit", [False, True])
def test_chain_429_with_fallback_left_skips_at_once(
    agent, make_job, make_executor, sink_for, mock, clock, retry_on_rate_limit
):
    """A 429 with a later model moves on at once, whatever Retry-After or retry_on_rate_limit."""
    mock.script("primary", [Status(429, retry_after="30")])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(retry_on_rate_limit=retry_on_rate_limit), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "rate_limited", False),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert sink.events[2]["error"]["status"] == 429
    assert sink.events[2]["error"]["retry_after_s"] == 30.0
    assert clock.sleeps == []
    assert mock.count("primary") == 1


def test_chain_429_none_left_without_retry_on_rate_limit_fails_without_waiting(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A 429 on the last model fails the job at once when retry_on_rate_limit is off."""
    mock.script("primary", [Status(429, retry_after="5")])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(fallbacks=()), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("failed", "model_failed"),
    ]
    assert outcome.terminal["error"]["status"] == 429
    assert "HTTP 429" in outcome.terminal["error"]["message"]
    assert clock.sleeps == []
    assert mock.count("primary") == 1


@pytest.mark.parametrize(
    ("retry_after", "wait_s"),
    [("5", 5.0), ("120", 60.0), (None, 0.2)],
    ids=["retry-after", "retry-after-capped", "backoff-delay"],
)
def test_chain_429_none_left_with_retry_on_rate_limit_waits_once(
    agent, make_job, make_executor, sink_for, mock, clock, retry_after, wait_s
):
    """retry_on_rate_limit: a 429 on the last model waits once (Retry-After ≤ 60 s, or backoff)."""
    mock.script("primary", [Status(429, retry_after=retry_after), Reply(text=P)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(fallbacks=(), retry_on_rate_limit=True), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("retry", 1, "primary", wait_s, "rate_limited", False),
        ("attempt", 2, "primary", 2, 3, False),
        *said(2, P),
        ("completed", "primary", P, False),
    ]
    assert clock.sleeps == [wait_s]


def test_chain_429_retried_until_exhausted_has_no_wait_after_last_attempt(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A model that keeps answering 429 gets one wait per retry and none after its last attempt."""
    mock.script("primary", [Status(429, retry_after="3")])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(fallbacks=(), retry_on_rate_limit=True), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("retry", 1, "primary", 3.0, "rate_limited", False),
        ("attempt", 2, "primary", 2, 3, False),
        ("retry", 2, "primary", 3.0, "rate_limited", False),
        ("attempt", 3, "primary", 3, 3, False),
        ("failed", "model_failed"),
    ]
    assert clock.sleeps == [3.0, 3.0]
    assert outcome.terminal["error"]["status"] == 429


def test_chain_429_speaking_of_tokens_per_min_is_a_rate_limit(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A 429 whose message speaks of "tokens per min" is rate_limited, never context_overflow."""
    message = (
        "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
        "Limit 30000, Used 29500, Requested 2000. Please try again in 3s."
    )
    mock.script("primary", [Status(429, message=message, error_code="rate_limit_exceeded")])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)
    alone = make_job()
    alone_sink = sink_for(alone)

    make_executor().run(job, agent(), sink)
    failed = make_executor().run(alone, agent(fallbacks=()), alone_sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "rate_limited", False),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert shape(alone_sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("failed", "model_failed"),
    ]
    assert failed.terminal["attempts"][0]["outcome"] == "rate_limited"


# --- rule 4: other 4xx skip ----------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_chain_4xx_skips_to_next_model_at_once(
    agent, make_job, make_executor, sink_for, mock, clock, status
):
    """400, 401, 403, 404 and 422 are fatal for the model: next model at once, no retry."""
    mock.script("primary", [Status(status)])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "fatal", False),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert sink.events[2]["error"]["status"] == status
    assert clock.sleeps == []
    assert mock.count("primary") == 1


def test_chain_400_mentioning_500_is_fatal_not_retried(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A 400 whose message mentions "500 internal server error" is not retried."""
    message = "Your prompt quotes 'HTTP 500 Internal Server Error' which is not allowed"
    mock.script("primary", [Status(400, message=message)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(fallbacks=()), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("failed", "model_failed"),
    ]
    assert outcome.terminal["error"]["status"] == 400
    assert outcome.terminal["attempts"][0]["outcome"] == "fatal"
    assert mock.count("primary") == 1


# --- rule 5: context overflow --------------------------------------------------------------

OVERFLOW = Status(
    400,
    message="This model's maximum context length is 128000 tokens. However, you requested 130000.",
    error_code="context_length_exceeded",
)


def test_chain_context_overflow_with_fallback_moves_on(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """An OpenAI context_length_exceeded is not retried; the next model answers."""
    mock.script("primary", [OVERFLOW])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "context_overflow", False),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert clock.sleeps == []


def test_chain_context_overflow_on_the_primary_does_not_arm_the_cooldown(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A primary whose context overflowed is not pinned away from: the next job starts there."""
    mock.script("primary", [OVERFLOW, Reply(text=P)])
    mock.script("backup", [Reply(text=B)])
    store = MemoryCooldownStore(clock)
    executor = make_executor(store)
    first = make_job()

    executor.run(first, agent(), sink_for(first))
    second = make_job()
    sink = sink_for(second)
    executor.run(second, agent(), sink)

    assert store.get("support") is None
    assert shape(sink.events)[0] == ("started", "primary", False)
    assert sink.events[-1]["model"] == "primary"


def test_chain_context_overflow_without_fallback_fails_as_context_overflow(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A lone model whose context overflows ends the job with kind context_overflow."""
    mock.script("primary", [OVERFLOW])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(fallbacks=()), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("failed", "context_overflow"),
    ]
    assert outcome.terminal["error"]["status"] == 400
    assert mock.count("primary") == 1


def test_chain_context_overflow_on_every_model_fails_as_context_overflow(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """When every model of the chain overflows, the job's kind is context_overflow."""
    mock.script("primary", [OVERFLOW])
    mock.script("backup", [Status(413)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events)[-1] == ("failed", "context_overflow")
    assert [r["outcome"] for r in outcome.terminal["attempts"]] == ["context_overflow"] * 2


def test_chain_overflow_then_other_failure_is_all_models_failed(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """An overflow on one model and another failure on the next is all_models_failed."""
    mock.script("primary", [OVERFLOW])
    mock.script("backup", [Status(404)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events)[-1] == ("failed", "all_models_failed")
    assert outcome.terminal["error"]["status"] == 404
    assert outcome.terminal["error"]["message"].startswith("all 2 models failed; last error: ")


# --- rule 7: cooldowns ---------------------------------------------------------------------


def test_chain_cooldown_set_after_fatal_primary_and_honoured_by_another_process(
    agent,
    make_job,
    make_executor,
    sink_for,
    mock,
    redis_store,
    other_process_store,
    redis_client,
    keys,
):
    """A 4xx primary rescued by the backup pins the agent in Redis; another executor obeys it."""
    mock.script("primary", [Status(401)])
    mock.script("backup", [Reply(text=B)])
    support = agent()
    first, second = make_job(), make_job()
    first_sink, second_sink = sink_for(first), sink_for(second)

    make_executor(redis_store).run(first, support, first_sink)
    pttl = redis_client.pttl(keys.cooldown("support"))
    make_executor(other_process_store).run(second, support, second_sink)

    assert 0 < pttl <= 60_000
    assert other_process_store.get("support") == Pin(
        model="backup", chain=("primary", "backup"), reason="fatal", status=401
    )
    assert shape(second_sink.events) == [
        ("started", "backup", True),
        ("attempt", 1, "backup", 1, 3, True),
        *said(1, B),
        ("completed", "backup", B, True),
    ]
    assert (mock.count("primary"), mock.count("backup")) == (1, 2)


def test_chain_cooldown_lasts_for_a_longer_retry_after(
    agent, make_job, make_executor, sink_for, mock, redis_store, redis_client, keys
):
    """A skipped 429 whose Retry-After outlasts the cooldown pins for the Retry-After, even
    one longer than the 60 s cap on waits."""
    mock.script("primary", [Status(429, retry_after="600")])
    mock.script("backup", [Reply(text=B)])
    job = make_job()

    make_executor(redis_store).run(job, agent(cooldown="1s"), sink_for(job))

    pttl = redis_client.pttl(keys.cooldown("support"))
    assert 590_000 < pttl <= 600_000
    assert redis_store.get("support").reason == "rate_limited"


def test_chain_cooldown_expires_by_redis_ttl_then_primary_is_tried(
    agent,
    make_job,
    make_executor,
    sink_for,
    mock,
    redis_store,
    other_process_store,
    redis_client,
    keys,
):
    """A pin lives only for its TTL on Redis's clock; afterwards jobs start at the primary."""
    mock.script("primary", [Status(400), Reply(text=P)])
    mock.script("backup", [Reply(text=B)])
    support = agent(cooldown="100ms")
    first, later = make_job(), make_job()
    later_sink = sink_for(later)
    key = keys.cooldown("support")

    make_executor(redis_store).run(first, support, sink_for(first))
    pttl = redis_client.pttl(key)
    # TTLs run on Redis's clock: poll for its expiry (bounded).
    wait_for(
        lambda: None if redis_client.exists(key) else True,
        timeout_s=2.0,
        interval_s=0.005,
        what="the pin's expiry",
    )
    make_executor(other_process_store).run(later, support, later_sink)

    assert 0 < pttl <= 100
    assert not redis_client.exists(key)
    assert shape(later_sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        *said(1, P),
        ("completed", "primary", P, False),
    ]


def test_chain_cooldown_expires_on_the_clock_in_memory(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """In memory, the pin holds until the cooldown has passed on the clock, then it is gone."""
    mock.script("primary", [Status(400), Reply(text=P)])
    mock.script("backup", [Reply(text=B)])
    support = agent(cooldown="1m")
    executor = make_executor()
    jobs = [make_job() for _ in range(3)]
    sinks = [sink_for(j) for j in jobs]

    executor.run(jobs[0], support, sinks[0])
    clock.advance(59.9)
    executor.run(jobs[1], support, sinks[1])
    clock.advance(0.1)
    executor.run(jobs[2], support, sinks[2])

    assert shape(sinks[1].events)[0] == ("started", "backup", True)
    assert shape(sinks[2].events)[0] == ("started", "primary", False)
    assert sinks[2].events[-1]["model"] == "primary"


def test_chain_cooldown_cleared_by_primary_success(
    agent, make_job, make_executor, sink_for, mock, redis_store, redis_client, keys
):
    """Inside a cooldown, a failing pin falls back to the primary; its success clears the pin."""
    mock.script("primary", [Status(400), Reply(text=P)])
    mock.script("backup", [Reply(text=B), Status(400)])
    support = agent()
    executor = make_executor(redis_store)
    jobs = [make_job() for _ in range(3)]
    sinks = [sink_for(j) for j in jobs]

    executor.run(jobs[0], support, sinks[0])
    pinned = redis_client.exists(keys.cooldown("support"))
    executor.run(jobs[1], support, sinks[1])
    executor.run(jobs[2], support, sinks[2])

    assert pinned
    assert shape(sinks[1].events) == [
        ("started", "backup", True),
        ("attempt", 1, "backup", 1, 3, True),
        ("fallback", "backup", "primary", "fatal", False),
        ("attempt", 2, "primary", 1, 3, False),
        *said(2, P),
        ("completed", "primary", P, False),
    ]
    assert not redis_client.exists(keys.cooldown("support"))
    assert shape(sinks[2].events)[0] == ("started", "primary", False)


def test_chain_primary_success_keeps_a_pin_set_while_it_ran(
    agent, make_job, make_executor, sink_for, mock, redis_store, redis_client, keys
):
    """A job that started with no pin (read by its caller) and succeeded on the primary
    leaves alone the pin another worker set meanwhile: that failure is the newer news."""
    mock.script("primary", [Reply(text=P)])
    support = agent()
    redis_store.pin("support", Pin(model="backup", chain=support.chain_names, reason="fatal"), 60)
    job = make_job()
    sink = sink_for(job)

    make_executor(redis_store).run(job, support, sink, pin_at_start=PinAtStart(None))

    assert shape(sink.events)[0] == ("started", "primary", False)
    assert sink.events[-1]["model"] == "primary"
    assert redis_store.get("support") is not None
    assert redis_client.pttl(keys.cooldown("support")) > 0


def test_chain_cooldown_ignored_after_config_change(
    make_agents,
    make_job,
    make_executor,
    sink_for,
    mock,
    redis_store,
    other_process_store,
):
    """A pin written for another chain (the agents file changed) is ignored."""
    mock.script("primary", [Status(400), Reply(text=P)])
    mock.script("backup", [Reply(text=B)])
    old = make_agents(agents={"support": agent_cfg()}).agents["support"]
    new = make_agents(agents={"support": agent_cfg(fallbacks=("third", "backup"))}).agents[
        "support"
    ]
    first, later = make_job(), make_job()
    later_sink = sink_for(later)

    make_executor(redis_store).run(first, old, sink_for(first))
    pin = other_process_store.get("support")
    make_executor(other_process_store).run(later, new, later_sink)

    assert pin is not None
    assert pin.model == "backup"
    assert shape(later_sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        *said(1, P),
        ("completed", "primary", P, False),
    ]


@pytest.mark.parametrize("cooldown_on_exhausted", [True, False])
def test_chain_cooldown_on_exhausted_decides_whether_retries_used_up_pin(
    agent, make_job, make_executor, sink_for, mock, clock, cooldown_on_exhausted
):
    """A primary that used up its retries arms the cooldown only with cooldown_on_exhausted."""
    mock.script("primary", [Status(503)])
    mock.script("backup", [Reply(text=B)])
    store = MemoryCooldownStore(clock)
    support = agent(retries=1, cooldown_on_exhausted=cooldown_on_exhausted)
    first, later = make_job(), make_job()
    later_sink = sink_for(later)

    make_executor(store).run(first, support, sink_for(first))
    make_executor(store).run(later, support, later_sink)

    if cooldown_on_exhausted:
        assert store.get("support") == Pin(
            model="backup", chain=("primary", "backup"), reason="retryable", status=503
        )
        assert shape(later_sink.events)[0] == ("started", "backup", True)
        assert mock.count("primary") == 2
    else:
        assert store.get("support") is None
        assert shape(later_sink.events)[0] == ("started", "primary", False)
        assert mock.count("primary") == 4


def test_chain_retryable_primary_that_recovers_arms_no_cooldown(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A primary that fails once and then answers is healthy: no pin."""
    mock.script("primary", [Status(503), Reply(text=P)])
    store = MemoryCooldownStore(clock)
    job = make_job()

    make_executor(store).run(job, agent(), sink_for(job))

    assert store.get("support") is None


def test_chain_job_inside_cooldown_publishes_no_fallback_event(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A job starting at the pinned model says in_cooldown and publishes no fallback event."""
    mock.script("backup", [Reply(text=B)])
    store = MemoryCooldownStore(clock)
    store.pin("support", Pin("backup", ("primary", "backup"), "fatal", 400), 60)
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor(store).run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "backup", True),
        ("attempt", 1, "backup", 1, 3, True),
        *said(1, B),
        ("completed", "backup", B, True),
    ]
    assert sink.events[0]["chain"] == ["primary", "backup"]
    assert outcome.terminal["fallback_used"] is True
    assert mock.count("primary") == 0


def test_chain_pinned_fallback_failing_while_later_rescues_moves_the_pin(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """When the pinned model fails and a later one answers, the pin moves to the rescuer."""
    mock.script("backup", [Status(403)])
    mock.script("third", [Reply(text=T)])
    store = MemoryCooldownStore(clock)
    chain = ("primary", "backup", "third")
    store.pin("support", Pin("backup", chain, "fatal", 400), 60)
    support = agent(fallbacks=("backup", "third"))
    job, later = make_job(), make_job()
    sink, later_sink = sink_for(job), sink_for(later)

    make_executor(store).run(job, support, sink)
    make_executor(store).run(later, support, later_sink)

    assert shape(sink.events) == [
        ("started", "backup", True),
        ("attempt", 1, "backup", 1, 3, True),
        ("fallback", "backup", "third", "fatal", False),
        ("attempt", 2, "third", 1, 3, True),
        *said(2, T),
        ("completed", "third", T, True),
    ]
    assert store.get("support") == Pin("third", chain, "fatal", 403)
    assert shape(later_sink.events)[0] == ("started", "third", True)
    assert mock.count("primary") == 0


def test_chain_inside_cooldown_failing_rest_of_chain_tries_skipped_models(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A job pinned past the primary whose remaining models fail tries the skipped ones too."""
    for name in NAMES:
        mock.script(name, [Status(400)])
    store = MemoryCooldownStore(clock)
    store.pin("support", Pin("backup", NAMES, "fatal", 400), 60)
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor(store).run(job, agent(fallbacks=("backup", "third")), sink)

    assert shape(sink.events) == [
        ("started", "backup", True),
        ("attempt", 1, "backup", 1, 3, True),
        ("fallback", "backup", "third", "fatal", False),
        ("attempt", 2, "third", 1, 3, True),
        ("fallback", "third", "primary", "fatal", False),
        ("attempt", 3, "primary", 1, 3, False),
        ("failed", "all_models_failed"),
    ]
    assert [r["model"] for r in outcome.terminal["attempts"]] == ["backup", "third", "primary"]
    assert [mock.count(n) for n in NAMES] == [1, 1, 1]


def test_chain_inside_cooldown_skipped_fallback_can_rescue(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """Pinned at the last model, a job whose pin and primary fail is rescued by the skipped one."""
    mock.script("third", [Status(400)])
    mock.script("primary", [Status(404)])
    mock.script("backup", [Reply(text=B)])
    store = MemoryCooldownStore(clock)
    store.pin("support", Pin("third", NAMES, "fatal", 400), 60)
    job = make_job()
    sink = sink_for(job)

    make_executor(store).run(job, agent(fallbacks=("backup", "third")), sink)

    assert shape(sink.events) == [
        ("started", "third", True),
        ("attempt", 1, "third", 1, 3, True),
        ("fallback", "third", "primary", "fatal", False),
        ("attempt", 2, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "fatal", False),
        ("attempt", 3, "backup", 1, 3, True),
        *said(3, B),
        ("completed", "backup", B, True),
    ]
    assert store.get("support") == Pin("backup", NAMES, "fatal", 404)


# --- rule 6: cancellation and the deadline -------------------------------------------------


def test_chain_cancel_during_backoff_stops_at_once(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """Cancelling during a backoff wait ends the job cancelled, with no further attempt."""
    mock.script("primary", [Status(503)])
    token = CancelToken()
    clock.on_sleep.append(lambda _s: token.cancel())
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink, cancel=token)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("retry", 1, "primary", 0.2, "retryable", False),
        ("failed", "cancelled"),
    ]
    assert outcome.terminal["error"] == {"kind": "cancelled", "message": "the job was cancelled"}
    assert clock.sleeps == [0.2]
    assert (mock.count("primary"), mock.count("backup")) == (1, 0)


def test_chain_cancel_during_stream_ends_within_250ms_and_closes_upstream(
    agent, make_job, make_executor, mock
):
    """A cancel from another thread mid-stream ends the job within 250 ms and hangs up upstream."""
    words = " ".join(f"w{i}" for i in range(40))
    # A second between deltas: only waking the blocked read can meet the 250 ms budget.
    mock.script("primary", [Reply(text=words, delay_s=1.0)])
    system = SystemClock()
    token = CancelToken()
    job = make_job()
    sink = SignallingSink(job.job_id, system)
    canceller, cancelled_at = cancel_when_seen(sink, token)

    outcome = make_executor(clock_=system).run(job, agent(), sink, cancel=token)
    ended_at = time.monotonic()
    canceller.join(5.0)

    assert cancelled_at
    assert ended_at - cancelled_at[0] < 0.25
    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("delta", 1, "w0 "),
        ("failed", "cancelled"),
    ]
    assert outcome.terminal["attempts"][0]["outcome"] == "cancelled"
    assert mock.wait_for_hangups("primary", timeout_s=1.0)
    assert mock.count("backup") == 0


def test_chain_cancel_during_hanging_connect_ends_within_250ms(
    make_agents, make_job, make_executor, mock, unanswered_port
):
    """A cancel during a hanging TCP connect ends the job within 250 ms, not at its timeout."""
    agents = make_agents(
        models=models_cfg(
            mock.url,
            dead={
                "base_url": f"http://127.0.0.1:{unanswered_port}/v1",
                "timeouts": {"connect": "5s"},
            },
        ),
        agents={"support": agent_cfg() | {"model": "dead"}},
    )
    system = SystemClock()
    token = CancelToken()
    job = make_job()
    sink = SignallingSink(job.job_id, system, watch="attempt")
    canceller, cancelled_at = cancel_when_seen(sink, token)

    outcome = make_executor(clock_=system).run(job, agents.agents["support"], sink, cancel=token)
    ended_at = time.monotonic()
    canceller.join(5.0)

    assert cancelled_at
    assert ended_at - cancelled_at[0] < 0.25
    assert shape(sink.events) == [
        ("started", "dead", False),
        ("attempt", 1, "dead", 1, 3, False),
        ("failed", "cancelled"),
    ]
    assert outcome.terminal["attempts"][0]["outcome"] == "cancelled"
    assert mock.count("backup") == 0


def test_chain_deadline_cuts_a_backoff_wait_short(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """The job's deadline bounds every wait: the last wait is cut to what is left, then it fails."""
    mock.script("primary", [Status(503)])
    support = agent(backoff={"base": "1s", "factor": 2, "max": "10s", "jitter": 0})
    job = make_job(deadline_s=1.5)
    sink = sink_for(job)

    outcome = make_executor().run(job, support, sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("retry", 1, "primary", 1.0, "retryable", False),
        ("attempt", 2, "primary", 2, 3, False),
        ("retry", 2, "primary", 2.0, "retryable", False),
        ("failed", "deadline_exceeded"),
    ]
    assert clock.sleeps == [1.0, 0.5]
    assert outcome.terminal["error"]["kind"] == "deadline_exceeded"
    assert mock.count("backup") == 0


def test_chain_deadline_stops_a_slow_stream_and_closes_upstream(
    agent, make_job, make_executor, mock
):
    """A deadline passing mid-stream ends the job deadline_exceeded at once and hangs up."""
    words = " ".join(f"w{i}" for i in range(60))
    mock.script("primary", [Reply(text=words, delay_s=0.05)])
    system = SystemClock()
    job = make_job(deadline_s=0.3)
    sink = MemoryEventSink(job.job_id, system)
    began = time.monotonic()

    outcome = make_executor(clock_=system).run(job, agent(), sink)

    elapsed = time.monotonic() - began
    events = shape(sink.events)
    assert outcome.terminal["error"]["kind"] == "deadline_exceeded"
    assert 0.3 <= elapsed < 0.55
    assert events[:2] == [("started", "primary", False), ("attempt", 1, "primary", 1, 3, False)]
    assert 1 <= len(events[2:-1]) < 60
    assert events[2:-1] == said(1, words)[: len(events) - 3]
    assert events[-1] == ("failed", "deadline_exceeded")
    assert mock.wait_for_hangups("primary", timeout_s=1.0)
    assert mock.count("backup") == 0


# --- rule 10: broken streams, discard, timeouts --------------------------------------------


def test_chain_stream_cut_midway_retries_with_discard_and_keeps_only_winner_text(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A stream cut after two deltas is retried with discard: true; the result is the winner's."""
    mock.script("primary", [Cut(after_chunks=2), Reply(text=P)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("delta", 1, "Here "),
        ("delta", 1, "is "),
        ("retry", 1, "primary", 0.2, "retryable", True),
        ("attempt", 2, "primary", 2, 3, False),
        *said(2, P),
        ("completed", "primary", P, False),
    ]
    assert outcome.terminal["text"] == P
    assert sink.events[4]["error"]["message"].startswith("the stream broke")


def test_chain_connection_dropped_after_end_marker_still_completes(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A connection that drops after [DONE] loses nothing: the attempt completes, no retry."""
    mock.script("primary", [Cut(after_chunks=1000)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        *said(1, DEFAULT),
        ("completed", "primary", DEFAULT, False),
    ]
    assert outcome.terminal["finish_reason"] == "stop"
    assert outcome.terminal["usage"]["output_tokens"] == len(DEFAULT.split(" "))
    assert mock.count("primary") == 1


def test_chain_server_holding_the_body_after_end_marker_does_not_delay_completion(
    agent, make_job, make_executor, sink_for, mock
):
    """After [DONE] the rest of the body gets a short grace, not the idle timeout: the job ends."""
    mock.script("primary", [Reply(text=P, hold_after_end_s=20.0)])
    job = make_job()
    sink = MemoryEventSink(job.job_id, SystemClock())
    began = time.monotonic()

    outcome = make_executor(clock_=SystemClock()).run(job, agent(), sink)

    assert outcome.status == "completed"
    assert outcome.terminal["text"] == P
    assert time.monotonic() - began < 20.0
    assert mock.wait_for_hangups("primary", timeout_s=1.0)
    assert mock.count("primary") == 1


def test_chain_error_event_after_last_delta_fails_the_attempt(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """An in-stream error after every delta but before [DONE] still breaks the attempt."""
    mock.script("primary", [StreamError(after_chunks=1000), Reply(text=P)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        *said(1, DEFAULT),
        ("retry", 1, "primary", 0.2, "retryable", True),
        ("attempt", 2, "primary", 2, 3, False),
        *said(2, P),
        ("completed", "primary", P, False),
    ]
    assert outcome.terminal["text"] == P


def test_chain_stream_cut_on_last_attempt_falls_back_with_discard(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A cut on a model's last attempt falls back with discard: true."""
    mock.script("primary", [Cut(after_chunks=1)])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(retries=0), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 1, False),
        ("delta", 1, "Here "),
        ("fallback", "primary", "backup", "retryable", True),
        ("attempt", 2, "backup", 1, 1, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert outcome.terminal["text"] == B


@pytest.mark.parametrize("before", ["headers", "first_token"])
def test_chain_first_token_timeout_closes_request_and_retries(
    make_agents, make_job, make_executor, mock, before
):
    """A model silent past its first_token budget times out, is hung up on, and is retried."""
    mock.script("primary", [Stall(seconds=5.0, before=before), Reply(text=P)])
    agents = make_agents(
        models=models_cfg(mock.url, primary={"timeouts": TINY_TIMEOUTS}),
        agents={"support": agent_cfg(retries=1, backoff=TINY_BACKOFF)},
    )
    system = SystemClock()
    job = make_job()
    sink = MemoryEventSink(job.job_id, system)
    began = time.monotonic()

    make_executor(clock_=system).run(job, agents.agents["support"], sink)

    assert time.monotonic() - began < 2.5
    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 2, False),
        ("retry", 1, "primary", 0.001, "timeout", False),
        ("attempt", 2, "primary", 2, 2, False),
        *said(2, P),
        ("completed", "primary", P, False),
    ]
    assert "first_token" in sink.events[2]["error"]["message"]
    assert mock.wait_for_hangups("primary", timeout_s=1.0)


def test_chain_idle_timeout_closes_request_and_retries_with_discard(
    make_agents, make_job, make_executor, mock
):
    """A stream quiet for longer than its idle budget times out, is hung up on, and is retried."""
    mock.script("primary", [Idle(after_chunks=2, seconds=5.0), Reply(text=P)])
    agents = make_agents(
        models=models_cfg(mock.url, primary={"timeouts": TINY_TIMEOUTS}),
        agents={"support": agent_cfg(retries=1, backoff=TINY_BACKOFF)},
    )
    system = SystemClock()
    job = make_job()
    sink = MemoryEventSink(job.job_id, system)
    began = time.monotonic()

    outcome = make_executor(clock_=system).run(job, agents.agents["support"], sink)

    assert time.monotonic() - began < 2.5
    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 2, False),
        ("delta", 1, "Here "),
        ("delta", 1, "is "),
        ("retry", 1, "primary", 0.001, "timeout", True),
        ("attempt", 2, "primary", 2, 2, False),
        *said(2, P),
        ("completed", "primary", P, False),
    ]
    assert "idle" in sink.events[4]["error"]["message"]
    assert outcome.terminal["text"] == P
    assert mock.wait_for_hangups("primary", timeout_s=1.0)


def test_chain_total_timeout_closes_a_slow_but_steady_stream(
    make_agents, make_job, make_executor, mock
):
    """A stream still trickling when the model's total budget runs out times out and is hung up."""
    words = " ".join(f"w{i}" for i in range(40))
    mock.script("primary", [Reply(text=words, delay_s=0.05)])
    mock.script("backup", [Reply(text=B)])
    timeouts = {"first_token": "1s", "idle": "1s", "total": "200ms"}
    agents = make_agents(
        models=models_cfg(mock.url, primary={"timeouts": timeouts}),
        agents={"support": agent_cfg(retries=0)},
    )
    system = SystemClock()
    job = make_job()
    sink = MemoryEventSink(job.job_id, system)
    began = time.monotonic()

    outcome = make_executor(clock_=system).run(job, agents.agents["support"], sink)

    assert time.monotonic() - began < 1.8
    events = shape(sink.events)
    cut = next(i for i, e in enumerate(events) if e[0] == "fallback")
    assert events[:2] == [("started", "primary", False), ("attempt", 1, "primary", 1, 1, False)]
    assert 1 <= len(events[2:cut]) < 40
    assert events[2:cut] == said(1, words)[: cut - 2]
    assert events[cut:] == [
        ("fallback", "primary", "backup", "timeout", True),
        ("attempt", 2, "backup", 1, 1, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    fallback = sink.events[cut]
    assert "total timeout" in fallback["error"]["message"]
    assert outcome.terminal["text"] == B
    assert mock.wait_for_hangups("primary", timeout_s=1.0)


@pytest.mark.parametrize(
    ("step", "status", "message", "published"),
    [
        pytest.param(
            Status(
                502,
                body="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            ),
            502,
            "HTTP 502: an HTML page (50 bytes)",
            [],
            id="html-502",
        ),
        pytest.param(
            ErrorBody200(),
            200,
            "HTTP 200 [server_error]: The server had an error while processing your request.",
            [],
            id="200-error-body",
        ),
        pytest.param(
            StreamError(after_chunks=1, error_code="server_error", message="Overloaded"),
            None,
            "upstream error [server_error]: Overloaded",
            [("delta", 1, "Here ")],
            id="in-stream-error",
        ),
        pytest.param(
            NoEndMarker(after_chunks=2),
            None,
            "the stream ended without its end marker [DONE]",
            [("delta", 1, "Here "), ("delta", 1, "is ")],
            id="no-end-marker",
        ),
    ],
)
def test_chain_transient_upstream_faults_are_retried(
    agent, make_job, make_executor, sink_for, mock, clock, step, status, message, published
):
    """An HTML 502, a 200 with an error body, an in-stream error and no [DONE] are retried."""
    mock.script("primary", [step, Reply(text=P)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        *published,
        ("retry", 1, "primary", 0.2, "retryable", bool(published)),
        ("attempt", 2, "primary", 2, 3, False),
        *said(2, P),
        ("completed", "primary", P, False),
    ]
    retry = next(e for e in sink.events if e["type"] == "retry")
    assert retry["error"].get("status") == status
    assert retry["error"]["message"] == message
    assert outcome.terminal["text"] == P
    assert mock.count("primary") == 2


@pytest.mark.parametrize(
    ("step", "message"),
    [
        pytest.param(Garbage(after_chunks=0), "malformed JSON in the event stream", id="garbage"),
        pytest.param(
            WrongContentType(),
            "HTTP 200: expected an event stream, got 'text/plain'",
            id="wrong-content-type",
        ),
    ],
)
def test_chain_protocol_violations_are_fatal_and_skip(
    agent, make_job, make_executor, sink_for, mock, clock, step, message
):
    """Malformed SSE and a non-stream 200 are fatal for the model: no retry, next model."""
    mock.script("primary", [step])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "fatal", False),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert sink.events[2]["error"]["message"] == message
    assert clock.sleeps == []


def test_chain_malformed_sse_after_deltas_falls_back_with_discard(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """Garbage after a published delta is fatal and the fallback says discard: true."""
    mock.script("primary", [Garbage(after_chunks=1)])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("delta", 1, "Here "),
        ("fallback", "primary", "backup", "fatal", True),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert outcome.terminal["text"] == B


def test_chain_usage_of_failed_attempts_is_counted(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A stream that reported usage and then lost its [DONE] still counts toward the job's usage."""
    mock.script("primary", [NoEndMarker(), Reply(text=P)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    first, second = outcome.terminal["attempts"]
    prompt_tokens = 4  # "Tell me about Celery." as the mock counts words
    assert first["outcome"] == "retryable"
    assert first["usage"] == {
        "input_tokens": prompt_tokens,
        "output_tokens": len(DEFAULT.split(" ")),
        "total_tokens": 42,
    }
    assert second["usage"] == {"input_tokens": prompt_tokens, "output_tokens": 3, "total_tokens": 7}
    assert outcome.terminal["usage"] == {"input_tokens": 8, "output_tokens": 41, "total_tokens": 49}
    assert [e["discard"] for e in sink.events if e["type"] == "retry"] == [True]
    assert outcome.terminal["text"] == P


def test_chain_tool_calls_are_assembled_from_pieces(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """Streamed tool-call pieces become whole tool calls in the result."""
    call = {"id": "call_1", "name": "lookup", "arguments": '{"city": "Paris"}'}
    mock.script("primary", [Reply(text="", tool_calls=(call,))])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    pieces = [e["tool_call"] for e in sink.events if e["type"] == "delta"]
    assert pieces[0] == {"index": 0, "id": "call_1", "name": "lookup", "arguments": ""}
    assert "".join(p["arguments"] for p in pieces) == call["arguments"]
    assert outcome.terminal["tool_calls"] == [call]
    assert outcome.terminal["finish_reason"] == "tool_calls"


# --- limits on what an upstream sends ------------------------------------------------------


def test_chain_event_over_the_limit_is_fatal_and_falls_back(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """One 2 MB event (a single delta): the attempt fails as fatal once the event passes
    1 MB, before anything of it is published; the next model answers."""
    mock.script("primary", [Reply(text="x" * 2_000_000)])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agent(), sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "fatal", False),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert sink.events[2]["error"]["message"] == (
        "the event stream sent a line or an event over 1000000 bytes"
    )
    assert outcome.terminal["text"] == B
    assert clock.sleeps == []


def test_chain_completion_over_the_limit_is_fatal_and_falls_back_with_discard(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """Small deltas adding up past the completion limit: the delta that would pass it is
    not published, the attempt fails as fatal, and the fallback discards what was."""
    mock.script("primary", [Reply(text=" ".join(["word"] * 50))])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor(max_completion_bytes=100).run(job, agent(), sink)

    published = [e["text"] for e in sink.events if e["type"] == "delta" and e["n"] == 1]
    assert published == ["word "] * 20
    fallback = next(e for e in sink.events if e["type"] == "fallback")
    assert (fallback["reason"], fallback["discard"]) == ("fatal", True)
    assert fallback["error"]["message"] == "the completion is over 100 bytes"
    assert outcome.terminal["model"] == "backup"
    assert outcome.terminal["text"] == B


def test_chain_tool_call_arguments_count_toward_the_completion_limit(
    agent, make_job, make_executor, sink_for, mock, clock
):
    """A tool call's arguments are part of the completion: over the limit, fatal."""
    call = {"id": "call_1", "name": "lookup", "arguments": json.dumps({"q": "x" * 200})}
    mock.script("primary", [Reply(text="", tool_calls=(call,))])
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor(max_completion_bytes=100).run(job, agent(), sink)

    assert outcome.terminal["attempts"][0]["outcome"] == "fatal"
    assert outcome.terminal["model"] == "backup"
    assert outcome.terminal["tool_calls"] == []


# --- transport failures: connect errors and timeouts ---------------------------------------


def test_chain_connect_error_to_closed_port_is_retryable_without_status(
    make_agents, make_job, make_executor, sink_for, mock, clock, closed_port
):
    """A refused connection is a retryable connect error with no status, then the chain moves on."""
    agents = make_agents(
        models=models_cfg(mock.url, dead={"base_url": f"http://127.0.0.1:{closed_port}/v1"}),
        agents={"support": agent_cfg(retries=1) | {"model": "dead"}},
    )
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agents.agents["support"], sink)

    assert shape(sink.events) == [
        ("started", "dead", False),
        ("attempt", 1, "dead", 1, 2, False),
        ("retry", 1, "dead", 0.2, "retryable", False),
        ("attempt", 2, "dead", 2, 2, False),
        ("fallback", "dead", "backup", "retryable", False),
        ("attempt", 3, "backup", 1, 2, True),
        *said(3, B),
        ("completed", "backup", B, True),
    ]
    error = outcome.terminal["attempts"][0]["error"]
    assert "status" not in error
    assert error["message"].startswith("connect error: ")
    assert str(closed_port) not in json.dumps(sink.events).replace(mock.url, "")


def test_chain_connect_timeout_is_a_timeout_not_a_status(
    make_agents, make_job, make_executor, mock, unanswered_port
):
    """A connection that never completes is kind timeout with no status, never "status 443"."""
    agents = make_agents(
        models=models_cfg(
            mock.url,
            dead={
                "base_url": f"http://127.0.0.1:{unanswered_port}/v1",
                "timeouts": {"connect": "100ms"},
            },
        ),
        agents={"support": agent_cfg(retries=0) | {"model": "dead"}},
    )
    mock.script("backup", [Reply(text=B)])
    system = SystemClock()
    job = make_job()
    sink = MemoryEventSink(job.job_id, system)
    began = time.monotonic()

    outcome = make_executor(clock_=system).run(job, agents.agents["support"], sink)

    assert time.monotonic() - began < 2.5
    assert shape(sink.events) == [
        ("started", "dead", False),
        ("attempt", 1, "dead", 1, 1, False),
        ("fallback", "dead", "backup", "timeout", False),
        ("attempt", 2, "backup", 1, 1, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert outcome.terminal["attempts"][0]["error"] == {
        "kind": "timeout",
        "message": "connect timeout",
    }
    assert outcome.terminal["model"] == "backup"


# --- secrets -------------------------------------------------------------------------------


def test_chain_api_key_only_in_authorization_header(
    make_agents, make_job, make_executor, sink_for, mock, clock, monkeypatch, caplog
):
    """The key reaches the upstream's Authorization header and no event, error, repr or log."""
    # Not shaped like a known key ("sk-…"), so only the executor's own scrubbing can hide it.
    key = "mk-" + "Zq7" * 10 + "k3y9"
    monkeypatch.setenv("MOCK_UPSTREAM_KEY", key)
    caplog.set_level(logging.DEBUG)
    keyed = {"api_key_env": "MOCK_UPSTREAM_KEY"}
    agents = make_agents(
        models=models_cfg(mock.url, primary=keyed, backup=keyed),
        agents={"support": agent_cfg()},
    )
    mock.script("primary", [Status(401, message=f"Incorrect API key provided: {key}.")])
    mock.script(
        "backup",
        [StreamError(after_chunks=1, message=f"key {key} is throttled"), Reply(text=B)],
    )
    support = agents.agents["support"]
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, support, sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "fatal", False),
        ("attempt", 2, "backup", 1, 3, True),
        ("delta", 2, "Here "),
        ("retry", 2, "backup", 0.2, "retryable", True),
        ("attempt", 3, "backup", 2, 3, True),
        *said(3, B),
        ("completed", "backup", B, True),
    ]
    assert key not in json.dumps(sink.events)
    assert "[redacted]" in json.dumps(outcome.terminal["attempts"])
    assert key not in repr(outcome)
    assert key not in repr(support)
    assert key not in caplog.text
    assert caplog.records
    headers = [r.headers.get("authorization") for r in mock.requests]
    assert headers == [mask(f"Bearer {key}")] * 3
    assert headers[0] == f"[masked len={len(key) + 7} …k3y9]"


def test_chain_missing_key_variable_is_fatal_for_that_model_only(
    make_agents, make_job, make_executor, sink_for, mock, clock, monkeypatch
):
    """A model whose key variable is unset fails fatally without a request; the chain moves on."""
    monkeypatch.delenv("UNSET_UPSTREAM_KEY", raising=False)
    agents = make_agents(
        models=models_cfg(mock.url, primary={"api_key_env": "UNSET_UPSTREAM_KEY"}),
        agents={"support": agent_cfg()},
    )
    mock.script("backup", [Reply(text=B)])
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agents.agents["support"], sink)

    assert shape(sink.events) == [
        ("started", "primary", False),
        ("attempt", 1, "primary", 1, 3, False),
        ("fallback", "primary", "backup", "fatal", False),
        ("attempt", 2, "backup", 1, 3, True),
        *said(2, B),
        ("completed", "backup", B, True),
    ]
    assert outcome.terminal["attempts"][0]["error"]["message"] == (
        "test-agents.yaml: models.primary.api_key_env: "
        "environment variable UNSET_UPSTREAM_KEY is not set"
    )
    assert mock.count("primary") == 0
