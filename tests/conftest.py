"""Shared fixtures: real Redis, the mock upstream over loopback, factories, fake time.

Redis: ``RELIEVER_TEST_REDIS_URL`` (default database 15 on 127.0.0.1:6379). Each test
gets its own key prefix, which also isolates pub/sub channels (they ignore database
numbers). Unreachable Redis skips on a laptop and fails under CI.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from hypothesis import settings as hsettings

from worker.agents import Agents, parse_agents
from worker.chain import MAX_COMPLETION_BYTES, ChainExecutor
from worker.clock import FakeClock
from worker.cooldown import CooldownStore, MemoryCooldownStore
from worker.events import MemoryEventSink
from worker.guard import guarded_transport
from worker.jobs import Job, parse_job
from worker.keys import Keys
from worker.mockllm import MockLLM
from worker.providers import build_providers
from worker.sse import MAX_EVENT_BYTES

hsettings.register_profile("dev", max_examples=100)
hsettings.register_profile("ci", max_examples=200, derandomize=True, deadline=None, print_blob=True)
hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

TEST_REDIS_URL = os.environ.get("RELIEVER_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RELIEVER_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("RELIEVER_") and name != "RELIEVER_TEST_REDIS_URL":
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def redis_url() -> str:
    client = redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at {TEST_REDIS_URL} is required in CI: {exc}")
        pytest.skip(f"Redis at {TEST_REDIS_URL} is not reachable")
    finally:
        client.close()
    return TEST_REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    return f"reliever-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
def redis_client(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(match=f"{key_prefix}:*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="session")
def mock_server() -> Iterator[MockLLM]:
    with MockLLM() as mock:
        yield mock


@pytest.fixture
def mock(mock_server: MockLLM) -> Iterator[MockLLM]:
    mock_server.reset()
    yield mock_server
    mock_server.reset()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def agents_doc(
    base_url: str,
    *,
    models: dict[str, dict[str, Any]] | None = None,
    agents: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An agents document: models named after the mock's model names by default."""
    default_models = {
        name: {"provider": "openai", "base_url": f"{base_url}/v1", "model": name}
        for name in ("primary", "backup", "third")
    }
    return {
        "models": models if models is not None else default_models,
        "agents": agents
        if agents is not None
        else {
            "support": {
                "model": "primary",
                "fallbacks": ["backup"],
                "backoff": {"base": "200ms", "factor": 2, "max": "2s", "jitter": 0},
            }
        },
    }


@pytest.fixture
def make_agents(mock_server: MockLLM) -> Callable[..., Agents]:
    """Build agents against the mock: ``make_agents(agents={...}, models={...})``."""

    def make(**kwargs: Any) -> Agents:
        return parse_agents(
            agents_doc(mock_server.url, **kwargs), source="test-agents.yaml", loopback_only=True
        )

    return make


@pytest.fixture
def make_job() -> Callable[..., Job]:
    def make(agent: str = "support", **fields: Any) -> Job:
        raw: dict[str, Any] = {
            "agent": agent,
            "messages": [{"role": "user", "content": "Tell me about Celery."}],
            **fields,
        }
        return parse_job(raw, max_bytes=1_000_000)

    return make


@pytest.fixture(scope="session")
def http_client() -> Iterator[httpx.Client]:
    client = httpx.Client(transport=guarded_transport())
    yield client
    client.close()


@pytest.fixture
def make_executor(http_client: httpx.Client, clock: FakeClock) -> Callable[..., ChainExecutor]:
    """An executor over real HTTP to the mock, a fake clock, and memory cooldowns by default
    (the limits on an event and a completion are the settings' defaults unless given)."""

    def make(
        cooldowns: CooldownStore | None = None,
        *,
        clock_: Any = None,
        seed: int = 1234,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_completion_bytes: int = MAX_COMPLETION_BYTES,
    ) -> ChainExecutor:
        use_clock = clock_ or clock
        return ChainExecutor(
            providers=build_providers(http_client, use_clock, max_event_bytes=max_event_bytes),
            cooldowns=cooldowns or MemoryCooldownStore(use_clock),
            clock=use_clock,
            rng=random.Random(seed),
            max_completion_bytes=max_completion_bytes,
        )

    return make


@pytest.fixture
def sink_for(clock: FakeClock) -> Callable[[Job], MemoryEventSink]:
    return lambda job: MemoryEventSink(job.job_id, clock)
