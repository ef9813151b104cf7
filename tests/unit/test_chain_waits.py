"""The executor's waits, with a fake provider and a fake clock: capped, within the deadline."""

from __future__ import annotations

import random
from collections.abc import Iterator

from hypothesis import given
from hypothesis import strategies as st

from worker.agents import ModelRef, parse_agents
from worker.chain import ChainExecutor
from worker.clock import FakeClock
from worker.cooldown import MemoryCooldownStore
from worker.errors import ProviderError, RateLimited, RetryableError
from worker.events import MemoryEventSink
from worker.jobs import parse_job
from worker.providers.base import Delta, ProviderRequest
from worker.retry import RETRY_AFTER_CAP_S, RETRY_AFTER_KEEP_S


class FailingProvider:
    """Fails every attempt with the next error of a fixed list (the last one repeats)."""

    def __init__(self, errors: list[ProviderError]) -> None:
        self.errors = errors
        self.calls = 0

    def stream(self, model: ModelRef, request: ProviderRequest) -> Iterator[Delta]:
        error = self.errors[min(self.calls, len(self.errors) - 1)]
        self.calls += 1
        raise type(error)(error.message, retry_after_s=error.retry_after_s)
        yield Delta()


errors = st.lists(
    st.one_of(
        st.builds(
            RetryableError,
            st.just("HTTP 503"),
            retry_after_s=st.none() | st.floats(min_value=0, max_value=RETRY_AFTER_KEEP_S),
        ),
        st.builds(
            RateLimited,
            st.just("HTTP 429"),
            retry_after_s=st.none() | st.floats(min_value=0, max_value=RETRY_AFTER_KEEP_S),
        ),
    ),
    min_size=1,
    max_size=5,
)


@given(
    errors=errors,
    retries=st.integers(min_value=0, max_value=4),
    fallbacks=st.integers(min_value=0, max_value=2),
    retry_on_rate_limit=st.booleans(),
    base_ms=st.integers(min_value=1, max_value=5000),
    factor=st.floats(min_value=1, max_value=4),
    jitter=st.floats(min_value=0, max_value=1),
    deadline_s=st.none() | st.floats(min_value=0.001, max_value=30),
)
def test_chain_waits_are_capped_within_deadline_and_only_separate_same_model_attempts(
    errors, retries, fallbacks, retry_on_rate_limit, base_ms, factor, jitter, deadline_s
):
    """Each wait is at most 60 s whatever Retry-After asked; waits fit the deadline and only
    separate tries of one model."""
    names = ["m0", "m1", "m2"][: 1 + fallbacks]
    doc = {
        "models": {
            n: {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": n}
            for n in names
        },
        "agents": {
            "a": {
                "model": names[0],
                "fallbacks": names[1:],
                "retries": retries,
                "retry_on_rate_limit": retry_on_rate_limit,
                "backoff": {
                    "base": f"{base_ms}ms",
                    "factor": factor,
                    "max": "20s",
                    "jitter": jitter,
                },
            }
        },
    }
    agent = parse_agents(doc, source="unit.yaml").agents["a"]
    clock = FakeClock()
    provider = FailingProvider(errors)
    executor = ChainExecutor(
        providers={"openai": provider},
        cooldowns=MemoryCooldownStore(clock),
        clock=clock,
        rng=random.Random(7),
    )
    raw = {"agent": "a", "messages": [{"role": "user", "content": "hi"}]}
    if deadline_s is not None:
        raw["deadline_s"] = deadline_s
    job = parse_job(raw, max_bytes=10_000)
    sink = MemoryEventSink(job.job_id, clock)

    outcome = executor.run(job, agent, sink)

    assert all(s <= RETRY_AFTER_CAP_S for s in clock.sleeps)
    if deadline_s is not None:
        assert sum(clock.sleeps) <= deadline_s + 1e-9
    assert outcome.status == "failed"
    assert provider.calls <= len(names) * (1 + retries)
    types = [e["type"] for e in sink.events]
    assert len(clock.sleeps) == types.count("retry")
    for i, event in enumerate(sink.events):
        if event["type"] == "retry":
            after = sink.events[i + 1]
            assert after["type"] == "failed" or after["model"] == event["model"]
        if event["type"] == "fallback":
            assert sink.events[i - 1]["type"] == "attempt"
