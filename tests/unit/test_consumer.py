"""The green pool's consumer: task events buffered, sent after a pause, and at shutdown."""

from __future__ import annotations

import threading
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest

from worker.consumer import EVENTS_DELAY_S, PromptConsumer

pytestmark = pytest.mark.unit


class FakeDispatcher:
    """Celery's event dispatcher as the consumer drives it: buffering knobs and flush()."""

    def __init__(self, log: list[str]) -> None:
        self.enabled = True
        self.buffer_group: Any = None
        self.on_send_buffered: Any = None
        self._log = log
        self.flushed = threading.Event()
        self.mutex = threading.Lock()
        self._group_buffer: defaultdict[str, list[Any]] = defaultdict(list)

    def flush(self) -> None:
        self._log.append("flush")
        self.flushed.set()


class Pause:
    """The flusher's pause, held until the test lets it go."""

    def __init__(self) -> None:
        self.asked: list[float] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)
        self.entered.set()
        assert self.release.wait(10)


def consumer_with(dispatcher: FakeDispatcher, pause: Pause | None = None) -> PromptConsumer:
    consumer = PromptConsumer.__new__(PromptConsumer)
    consumer.event_dispatcher = dispatcher
    if pause is not None:
        consumer.pause = pause
    return consumer


def test_task_events_are_buffered_and_sent_only_after_the_pause() -> None:
    """A buffered event wakes the flusher, which waits EVENTS_DELAY_S before it sends: the
    job that sent it gets its own round trips out first."""
    log: list[str] = []
    dispatcher = FakeDispatcher(log)
    pause = Pause()
    consumer = consumer_with(dispatcher, pause)

    consumer.buffer_task_events()
    assert dispatcher.buffer_group == frozenset({"task"})
    dispatcher.on_send_buffered()
    assert pause.entered.wait(10)

    assert log == []
    assert pause.asked == [EVENTS_DELAY_S]
    pause.release.set()
    assert dispatcher.flushed.wait(10)
    assert log == ["flush"]


def test_shutdown_sends_what_is_still_buffered_before_the_consumer_stops() -> None:
    """The last jobs' events leave before Celery's consumer closes its dispatcher."""
    log: list[str] = []
    dispatcher = FakeDispatcher(log)
    consumer = consumer_with(dispatcher, Pause())
    consumer.buffer_task_events()
    consumer.perform_pending_operations = lambda: None  # type: ignore[method-assign]
    consumer.blueprint = SimpleNamespace(shutdown=lambda _c: log.append("consumer stopped"))

    consumer.shutdown()

    assert log == ["flush", "consumer stopped"]


def test_a_failed_flush_is_logged_and_the_flusher_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker error loses that batch's events, never the flusher serving later ones."""
    log: list[str] = []
    dispatcher = FakeDispatcher(log)
    first = threading.Event()
    second = threading.Event()

    def flaky_flush() -> None:
        if not first.is_set():
            first.set()
            raise ConnectionError("broker went away")
        second.set()

    dispatcher.flush = flaky_flush  # type: ignore[method-assign]
    consumer = consumer_with(dispatcher)
    consumer.pause = lambda _s: None  # type: ignore[method-assign]
    consumer.buffer_task_events()

    dispatcher.on_send_buffered()
    assert first.wait(10)
    dispatcher.on_send_buffered()

    assert second.wait(10)
    assert "task events could not be sent" in caplog.text


def test_events_still_buffered_at_a_reconnect_go_out_on_the_new_connection() -> None:
    """Celery builds a new dispatcher after a broker reconnect and carries over only the
    events that failed to send: the task events still waiting for the flusher move to the
    front of the new one's buffer, and the flusher is woken for them."""
    log: list[str] = []
    old, new = FakeDispatcher(log), FakeDispatcher(log)
    pause = Pause()
    consumer = consumer_with(old, pause)
    consumer.buffer_task_events()
    old._group_buffer["task"] += [{"type": "task-received"}, {"type": "task-started"}]
    new._group_buffer["task"].append({"type": "task-succeeded"})

    consumer.event_dispatcher = new
    consumer.buffer_task_events()

    assert [e["type"] for e in new._group_buffer["task"]] == [
        "task-received",
        "task-started",
        "task-succeeded",
    ]
    assert not old._group_buffer["task"]
    assert new.buffer_group == frozenset({"task"})
    assert pause.entered.wait(10)
    pause.release.set()
    assert new.flushed.wait(10)
    assert log == ["flush"]
