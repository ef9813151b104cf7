"""The per-agent pin of design rule 7: "start this agent's jobs at model X until T".

One key per agent, ``keys.cooldown(agent)``, holds a small JSON :class:`Pin` and is written
with ``SET … PX``: Redis's clock is the only clock, so every worker agrees on when a pin
expires. A pin records the chain it was set for; the executor ignores a pin whose chain no
longer matches the agent's (the agents file changed).

A cooldown is an optimisation, not correctness: if Redis cannot be read, the job starts
at the primary (fail open); if it cannot be written, the pin is skipped. Both are logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Protocol

import redis

from worker.clock import Clock
from worker.keys import Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Pin:
    """Where an agent's jobs start while the cooldown lasts, and why."""

    model: str
    chain: tuple[str, ...]
    reason: str
    status: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> Pin | None:
        try:
            data = json.loads(raw)
            return cls(
                model=str(data["model"]),
                chain=tuple(str(m) for m in data["chain"]),
                reason=str(data["reason"]),
                status=data.get("status"),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class PinAtStart:
    """The agent's pin as the caller read it when the job started (``pin`` None: no pin)."""

    pin: Pin | None


class CooldownStore(Protocol):
    def get(self, agent: str) -> Pin | None:
        """The agent's live pin, or None."""

    def pin(self, agent: str, pin: Pin, ttl_s: float) -> None:
        """Pin the agent for ``ttl_s`` seconds, replacing any pin it had."""

    def clear(self, agent: str) -> None:
        """Remove the agent's pin."""


class RedisCooldownStore:
    """Pins shared by every worker on the same Redis."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self._redis = client
        self._keys = keys

    def get(self, agent: str) -> Pin | None:
        try:
            raw = self._redis.get(self._keys.cooldown(agent))
        except redis.RedisError as exc:
            log.warning(
                "cooldown read failed for agent %s; starting at the primary: %s",
                agent,
                type(exc).__name__,
            )
            return None
        if raw is None:
            return None
        return Pin.from_json(raw)

    def pin(self, agent: str, pin: Pin, ttl_s: float) -> None:
        try:
            self._redis.set(
                self._keys.cooldown(agent), pin.to_json(), px=max(1, round(ttl_s * 1000))
            )
        except redis.RedisError as exc:
            log.warning("cooldown write failed for agent %s: %s", agent, type(exc).__name__)

    def clear(self, agent: str) -> None:
        try:
            self._redis.delete(self._keys.cooldown(agent))
        except redis.RedisError as exc:
            log.warning("cooldown clear failed for agent %s: %s", agent, type(exc).__name__)


class MemoryCooldownStore:
    """Pins in this process only, on an injected clock (tests, and runs without Redis)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._pins: dict[str, tuple[Pin, float]] = {}

    def get(self, agent: str) -> Pin | None:
        entry = self._pins.get(agent)
        if entry is None:
            return None
        pin, until = entry
        if self._clock.monotonic() >= until:
            # Threads share this store: another reader may have dropped this entry, or a
            # writer replaced it, since we read it. Remove only the entry we saw expire.
            if self._pins.get(agent) is entry:
                self._pins.pop(agent, None)
            return None
        return pin

    def pin(self, agent: str, pin: Pin, ttl_s: float) -> None:
        self._pins[agent] = (pin, self._clock.monotonic() + ttl_s)

    def clear(self, agent: str) -> None:
        self._pins.pop(agent, None)
