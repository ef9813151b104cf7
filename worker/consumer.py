"""The worker's Celery consumer: Celery's own, taking queued jobs promptly on a green pool.

Named in the Celery configuration (``worker_consumer``), never imported by the app module:
Celery's consumer modules bind its tracer when they load, and they must load after Sentry
patched it (at ``celeryd_init``).
"""

from __future__ import annotations

from typing import Any

from celery.worker import loops
from celery.worker.consumer import Consumer

DRAIN_WAIT_S = 0.05
"""The longest a green pool's consumer waits on the broker before it looks again."""


class _PromptDrain:
    """The broker connection as Celery's blocking loop sees it: no wait longer than
    :data:`DRAIN_WAIT_S`."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def drain_events(self, timeout: float | None = None, **kwargs: Any) -> Any:
        if timeout is not None:
            timeout = min(timeout, DRAIN_WAIT_S)
        return self._connection.drain_events(timeout=timeout, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


class PromptConsumer(Consumer):
    """Celery's consumer, taking the next job within 50 ms of a slot freeing up.

    With the gevent pool Celery runs its blocking loop, which waits on the broker for up
    to 2 s at a time. At the prefetch limit (every slot busy) it does not ask Redis for
    more, and a job that ends does not wake it: the freed slot stayed empty for up to 2 s
    while jobs queued. Here that wait is cut to :data:`DRAIN_WAIT_S`. The threads pool's
    event loop wakes on its own and is left as it is.
    """

    @staticmethod
    def loop(obj: Any, connection: Any, consumer: Any, blueprint: Any, hub: Any, *rest: Any) -> Any:
        if hub is not None:
            return loops.asynloop(obj, connection, consumer, blueprint, hub, *rest)
        return loops.synloop(obj, _PromptDrain(connection), consumer, blueprint, hub, *rest)
