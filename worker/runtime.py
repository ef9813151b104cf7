"""The per-process object graph, and the one place where real or fake parts are chosen.

A worker process (or ``python -m worker run``) builds one :class:`Runtime`: one
``httpx.Client`` shared by every thread, one Redis connection pool, the agents, the
cooldown store and the executor. Tests pass a transport, a clock or an RNG instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx
import redis

from settings import Settings
from worker.agents import Agents, load_agents
from worker.chain import ChainExecutor
from worker.clock import Clock, SystemClock
from worker.cooldown import CooldownStore, RedisCooldownStore
from worker.errors import ConfigError
from worker.guard import guarded_transport
from worker.keys import Keys
from worker.providers import build_providers


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    agents: Agents
    http: httpx.Client
    redis: redis.Redis
    keys: Keys
    cooldowns: CooldownStore
    executor: ChainExecutor
    clock: Clock

    def close(self) -> None:
        self.http.close()
        self.redis.close()


def build_runtime(
    settings: Settings,
    *,
    agents: Agents | None = None,
    transport: httpx.BaseTransport | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
    cooldowns: CooldownStore | None = None,
) -> Runtime:
    """Build the process's runtime from ``settings``.

    Raises:
        ConfigError: the agents file is bad, or names a provider with no adapter.
    """
    if agents is None:
        agents = load_agents(settings.agents_file, loopback_only=settings.loopback_only)
    clock = clock or SystemClock()
    http = httpx.Client(transport=transport or guarded_transport(), follow_redirects=False)
    providers = build_providers(http, clock, max_event_bytes=settings.max_sse_event_bytes)
    for agent in agents.agents.values():
        for model in agent.chain:
            if model.provider not in providers:
                raise ConfigError(
                    f"{agents.source}: models.{model.name}.provider: "
                    f"no adapter for {model.provider!r} yet"
                )
    # A blocking pool: when every connection is in use a thread waits for one (bounded)
    # instead of failing its job, as redis-py's default pool of 100 does under load.
    pool = redis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=10,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )
    client = redis.Redis(connection_pool=pool)
    keys = Keys(settings.key_prefix)
    store = cooldowns or RedisCooldownStore(client, keys)
    executor = ChainExecutor(
        providers=providers,
        cooldowns=store,
        clock=clock,
        rng=rng or random.Random(),
        max_completion_bytes=settings.max_completion_bytes,
    )
    return Runtime(
        settings=settings,
        agents=agents,
        http=http,
        redis=client,
        keys=keys,
        cooldowns=store,
        executor=executor,
        clock=clock,
    )
