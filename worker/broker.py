"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu builds a new ``redis.Redis`` for every command it sends outside its polling loop:
the unacked entry of each delivered task, each task event, each ack, and on the enqueuing
side the job's LPUSH and its ``task-sent`` event. With redis-py 8 a new client costs about
0.1 ms of CPU (it copies its table of response callbacks), four to six times a job, two of
them on the way to its first token. A ``redis.Redis`` is safe to share between threads
and greenlets (each command takes a connection from the pool), so a channel keeps one, on
the channel's own pool, and builds it again when kombu replaces that pool.

Chosen by ``celery_config`` (``broker_transport``) for ``redis://`` and ``rediss://``
brokers; the URL is parsed as kombu's own Redis transport parses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu.transport import redis as kombu_redis

TRANSPORT = "worker.broker:Transport"
"""The transport's name for Celery's ``broker_transport``."""
SCHEMES = frozenset({"redis", "rediss"})
"""The broker URL schemes it serves (others keep kombu's choice)."""


class Channel(kombu_redis.Channel):
    """kombu's Redis channel; commands outside the polling loop share one client."""

    _shared_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        shared = self._shared_client
        if shared is None or shared.connection_pool is not pool:
            # mypy does not see kombu's _create_client (kombu defines it, untyped).
            shared = self._shared_client = self._create_client()  # type: ignore[attr-defined]
        yield shared


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
