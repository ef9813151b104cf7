"""The CooldownStore contract, run against MemoryCooldownStore and RedisCooldownStore."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.http_support import wait_for
from worker.clock import FakeClock
from worker.cooldown import CooldownStore, MemoryCooldownStore, Pin, RedisCooldownStore
from worker.keys import Keys

PIN = Pin(model="backup", chain=("primary", "backup", "third"), reason="fatal", status=400)
MOVED = Pin(model="third", chain=("primary", "backup", "third"), reason="rate_limited", status=429)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> CooldownStore:
    if request.param == "memory":
        return MemoryCooldownStore(FakeClock())
    client = request.getfixturevalue("redis_client")
    return RedisCooldownStore(client, request.getfixturevalue("keys"))


def test_cooldown_store_without_pin_gives_none(store):
    """An agent never pinned has no pin."""
    assert store.get("support") is None


def test_cooldown_store_pin_is_read_back(store):
    """A pin reads back equal, per agent."""
    store.pin("support", PIN, 60)

    assert store.get("support") == PIN
    assert store.get("sales") is None


def test_cooldown_store_latest_pin_wins(store):
    """Pinning again replaces the pin (the pin moves)."""
    store.pin("support", PIN, 60)
    store.pin("support", MOVED, 60)

    assert store.get("support") == MOVED


def test_cooldown_store_clear_removes_pin(store):
    """Clearing removes the pin; clearing twice is harmless."""
    store.pin("support", PIN, 60)

    store.clear("support")
    store.clear("support")

    assert store.get("support") is None


def test_memory_cooldown_expires_on_its_clock():
    """A memory pin lives until its TTL has passed on the injected clock."""
    clock = FakeClock()
    store = MemoryCooldownStore(clock)
    store.pin("support", PIN, 60)

    clock.advance(59.999)
    alive = store.get("support")
    clock.advance(0.001)

    assert alive == PIN
    assert store.get("support") is None


class ReentrantClock(FakeClock):
    """A FakeClock that runs ``during`` inside its next monotonic() call: a thread switch."""

    during: Callable[[], Any] | None = None

    def monotonic(self) -> float:
        hook, self.during = self.during, None
        if hook is not None:
            hook()
        return super().monotonic()


def test_memory_cooldown_expiry_seen_by_two_readers_at_once_is_safe():
    """Two threads noticing the same expired pin together both get None, no KeyError."""
    clock = ReentrantClock()
    store = MemoryCooldownStore(clock)
    store.pin("support", PIN, 1)
    clock.advance(2)
    other: list[Pin | None] = []
    clock.during = lambda: other.append(store.get("support"))

    assert store.get("support") is None
    assert other == [None]


def test_memory_cooldown_expiry_keeps_a_pin_written_meanwhile():
    """A reader dropping an expired pin never drops a fresh pin another thread just wrote."""
    clock = ReentrantClock()
    store = MemoryCooldownStore(clock)
    store.pin("support", PIN, 1)
    clock.advance(2)
    clock.during = lambda: store.pin("support", MOVED, 60)

    assert store.get("support") is None
    assert store.get("support") == MOVED


def test_redis_cooldown_ttl_on_redis_clock(redis_client, keys):
    """A Redis pin carries its TTL in milliseconds and is gone once Redis expires it."""
    store = RedisCooldownStore(redis_client, keys)

    store.pin("support", PIN, 0.05)
    pttl = redis_client.pttl(keys.cooldown("support"))
    # TTLs run on Redis's clock: poll for its expiry (bounded).
    wait_for(
        lambda: True if store.get("support") is None else None,
        timeout_s=1.0,
        interval_s=0.005,
        what="the pin's expiry",
    )

    assert 0 < pttl <= 50
    assert store.get("support") is None


def test_redis_cooldown_unreadable_value_is_no_pin(redis_client, keys):
    """A value that is not a pin (an older format, a hand edit) reads as no pin."""
    redis_client.set(keys.cooldown("support"), b"\xff not json")

    assert RedisCooldownStore(redis_client, keys).get("support") is None


def test_redis_cooldown_down_fails_open_and_quietly(caplog):
    """With Redis unreachable, reads give no pin and writes are skipped, each logged."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = redis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    store = RedisCooldownStore(client, Keys("reliever-test-down"))
    caplog.set_level(logging.WARNING, logger="worker.cooldown")

    got = store.get("support")
    store.pin("support", PIN, 60)
    store.clear("support")
    client.close()

    assert got is None
    messages = [r.getMessage() for r in caplog.records]
    assert (
        messages[0]
        == "cooldown read failed for agent support; starting at the primary: ConnectionError"
    )
    assert messages[1:] == [
        "cooldown write failed for agent support: ConnectionError",
        "cooldown clear failed for agent support: ConnectionError",
    ]
