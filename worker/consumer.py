"""The worker's Celery consumer: Celery's own, made prompt on a green pool.

Named in the Celery configuration (``worker_consumer``), never imported by the app module:
Celery's consumer modules bind its tracer when they load, and they must load after Sentry
patched it (at ``celeryd_init``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.worker import loops
from celery.worker import state as worker_state
from celery.worker.consumer import Consumer

from worker.broker import DEFAULT_MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES
from worker.dead import TASK_NAME, DeadLetter, letter_for, lost_connection_errors, vet

logger = logging.getLogger(__name__)

DRAIN_WAIT_S = 0.05
"""The longest a green pool's consumer waits on the broker before it looks again."""

EVENTS_DELAY_S = 0.02
"""How long buffered task events wait before they are sent: longer than a job takes to
get its request upstream (its lease, its request), whose round trips they would delay.

Sent the moment the job first waited, they delayed a job on gevent by about 0.8 ms
(measured side by side, 150 jobs each: enqueue -> ``started`` 5.56 -> 4.79 ms p50 with
the delay, first delta 10.93 -> 9.59 ms); Flower sees them at most this much later."""


class _PromptDrain:
    """The broker connection as Celery's blocking loop sees it: no wait longer than
    :data:`DRAIN_WAIT_S`, and no message taken once the worker is shutting down."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    def drain_events(self, timeout: float | None = None, **kwargs: Any) -> Any:
        if worker_state.should_stop is not None or worker_state.should_terminate is not None:
            # Celery's blocking loop drains once more after its shutdown check fires; a
            # job taken then would only be handed off again (worker.service).
            raise TimeoutError("the worker is shutting down")
        if timeout is not None:
            timeout = min(timeout, DRAIN_WAIT_S)
        return self._connection.drain_events(timeout=timeout, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def _carry_over(old: Any, new: Any) -> bool:
    """Move the task events ``old`` still buffers to the front of ``new``'s buffer.

    After a broker reconnect Celery builds a new dispatcher and carries over the events the
    old one failed to send, but not its group buffer: the events of the last
    :data:`EVENTS_DELAY_S` would be lost. Returns whether any were moved.
    """
    with old.mutex:
        events: list[Any] = old._group_buffer.pop("task", [])
    if events:
        with new.mutex:
            new._group_buffer["task"][:0] = events
    return bool(events)


class PromptConsumer(Consumer):
    """Celery's consumer, taking the next job within 50 ms of a slot freeing up, and
    sending task events beside the jobs instead of before them.

    With the gevent pool Celery runs its blocking loop, which waits on the broker for up
    to 2 s at a time. At the prefetch limit (every slot busy) it does not ask Redis for
    more, and a job that ends does not wake it: the freed slot stayed empty for up to 2 s
    while jobs queued. Here that wait is cut to :data:`DRAIN_WAIT_S`.

    Without an event loop Celery also publishes each task event (``task-received``,
    ``task-started`` …) at once, a round trip on the way to every job; with one it
    buffers them and flushes on the loop's next turn. Here the green pool buffers them
    too, and a flusher thread sends them :data:`EVENTS_DELAY_S` after the first of them
    was buffered, all in one message; the consumer sends what is left when it shuts down.

    The threads pool's event loop does both on its own and is left as it is.
    """

    @staticmethod
    def loop(obj: Any, connection: Any, consumer: Any, blueprint: Any, hub: Any, *rest: Any) -> Any:
        if hub is not None:
            return loops.asynloop(obj, connection, consumer, blueprint, hub, *rest)
        obj.buffer_task_events()
        return loops.synloop(obj, _PromptDrain(connection), consumer, blueprint, hub, *rest)

    def buffer_task_events(self) -> None:
        """Buffer the task events of this connection's dispatcher; a thread flushes them."""
        dispatcher = getattr(self, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled:
            return
        flush = getattr(self, "_events_due", None)
        if flush is None:
            flush = self._events_due = threading.Event()
            threading.Thread(
                target=self._flush_events_when_due, name="reliever-task-events", daemon=True
            ).start()
        previous = getattr(self, "_buffering", None)
        self._buffering = dispatcher
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.on_send_buffered = flush.set
        if (
            previous is not None
            and previous is not dispatcher
            and _carry_over(previous, dispatcher)
        ):
            flush.set()

    pause: Callable[[float], None] = staticmethod(time.sleep)
    """How the flusher waits :data:`EVENTS_DELAY_S` (a green sleep under gevent)."""

    def shutdown(self) -> None:
        if getattr(self, "_events_due", None) is not None:
            # The last jobs' events (their task-succeeded) go before the dispatcher closes.
            self._flush_events()
        super().shutdown()

    def _flush_events_when_due(self) -> None:
        due = self._events_due
        while True:
            due.wait()
            self.pause(EVENTS_DELAY_S)
            due.clear()
            self._flush_events()

    def _flush_events(self) -> None:
        dispatcher = getattr(self, "event_dispatcher", None)
        if dispatcher is None:
            return
        try:
            dispatcher.flush()
        except Exception:
            # The flusher serves every later event too: log, and go on.
            logger.exception("task events could not be sent")

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        """Celery's handler of a received message, behind :func:`worker.dead.vet`.

        A message that cannot run is dead-lettered and acknowledged instead of reaching
        Celery, and nothing a message holds can raise out of the consumer's loop: an
        unexpected error building Celery's request dead-letters the message too.
        """
        handle = super().create_task_handler(*args, **kwargs)
        connection_errors = lost_connection_errors(tuple(getattr(self, "connection_errors", ())))
        max_bytes = int(
            self.app.conf.broker_transport_options.get(MAX_MESSAGE_BYTES, DEFAULT_MAX_MESSAGE_BYTES)
        )

        def on_task_received(message: Any) -> Any:
            letter = vet(message, max_bytes)
            if letter is None:
                try:
                    return handle(message)
                except connection_errors:
                    raise
                except Exception as exc:  # noqa: BLE001 - the loop serves every later message
                    detail = f"Celery could not take the message ({type(exc).__name__})"
                    letter = letter_for(message, "unrunnable", detail)
            self.dead_letter(message, letter)
            return None

        return on_task_received

    def dead_letter(self, message: Any, letter: DeadLetter) -> None:
        """Record ``letter`` (through the task's service) and acknowledge its message."""
        try:
            task: Any = self.app.tasks[TASK_NAME]
            task.service.dead_letter(letter)
        except (redis.ConnectionError, redis.TimeoutError):
            # Reliever's Redis is away: not acknowledged, the message comes back with the
            # broker connection Celery now re-establishes, to be recorded then.
            raise
        except Exception:
            logger.exception(
                "a broker message could not be dead-lettered (reason %s); dropping it",
                letter.reason,
            )
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.dead_letter(message, letter_for(message, "bad_envelope", "the message names no task"))

    def on_unknown_task(self, body: Any, message: Any, exc: Any) -> None:
        self.dead_letter(message, letter_for(message, "unknown_task", "the task is not known"))

    def on_invalid_task(self, body: Any, message: Any, exc: Any) -> None:
        detail = f"Celery refused the message ({type(exc).__name__})"
        self.dead_letter(message, letter_for(message, "content_disallowed", detail))

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        detail = f"the message cannot be decoded ({type(exc).__name__})"
        self.dead_letter(message, letter_for(message, "undecodable", detail))
