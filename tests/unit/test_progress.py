"""The RUNNING-state reporter: delayed, latest-only, dropped once the task finished."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tasks.progress import StateReporter

DELAY_S = 0.05


class Recorder:
    """A write function that records what it wrote and signals each write."""

    def __init__(self) -> None:
        self.writes: list[tuple[str, dict[str, Any], float]] = []
        self.wrote = threading.Condition()

    def __call__(self, task_id: str, meta: dict[str, Any]) -> None:
        with self.wrote:
            self.writes.append((task_id, meta, time.monotonic()))
            self.wrote.notify_all()

    def wait_for(self, task_id: str) -> None:
        with self.wrote:
            assert self.wrote.wait_for(lambda: any(w[0] == task_id for w in self.writes), 5)

    def written(self) -> list[tuple[str, dict[str, Any]]]:
        return [(task_id, meta) for task_id, meta, _ in self.writes]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def reporter(recorder: Recorder) -> Iterator[StateReporter]:
    r = StateReporter(recorder, delay_s=DELAY_S)
    yield r
    r.stop()


def test_a_report_is_written_after_the_delay(reporter: StateReporter, recorder: Recorder) -> None:
    reported_at = time.monotonic()
    reporter.report("t", {"attempt": 1})

    recorder.wait_for("t")

    assert recorder.written() == [("t", {"attempt": 1})]
    assert recorder.writes[0][2] - reported_at >= DELAY_S


def test_only_the_latest_report_of_a_task_is_written(
    reporter: StateReporter, recorder: Recorder
) -> None:
    reporter.report("t", {"attempt": 1})
    reporter.report("t", {"attempt": 2})
    reporter.report("other", {"attempt": 1})

    recorder.wait_for("other")

    assert recorder.written() == [("t", {"attempt": 2}), ("other", {"attempt": 1})]


def test_a_finished_task_writes_nothing_more(reporter: StateReporter, recorder: Recorder) -> None:
    reporter.report("short", {"attempt": 1})
    reporter.finish("short", timeout_s=1)
    reporter.report("later", {"attempt": 1})

    recorder.wait_for("later")

    assert recorder.written() == [("later", {"attempt": 1})]


def test_finish_waits_for_the_write_in_flight() -> None:
    """SUCCESS must never be overwritten: finish returns only after the RUNNING write."""
    order: list[str] = []
    writing, release = threading.Event(), threading.Event()

    def slow_write(task_id: str, meta: dict[str, Any]) -> None:
        writing.set()
        release.wait(5)
        order.append("write done")

    reporter = StateReporter(slow_write, delay_s=0)
    try:
        reporter.report("t", {"attempt": 1})
        assert writing.wait(5)
        finisher = threading.Thread(
            target=lambda: (reporter.finish("t", timeout_s=5), order.append("finish returned"))
        )
        finisher.start()
        finisher.join(0.05)
        assert finisher.is_alive()
        release.set()
        finisher.join(5)
    finally:
        reporter.stop()

    assert order == ["write done", "finish returned"]


def test_a_failing_write_does_not_stop_the_reporter(recorder: Recorder) -> None:
    def write(task_id: str, meta: dict[str, Any]) -> None:
        if task_id == "bad":
            raise ConnectionError("result backend down")
        recorder(task_id, meta)

    reporter = StateReporter(write, delay_s=0)
    try:
        reporter.report("bad", {"attempt": 1})
        reporter.report("good", {"attempt": 1})
        recorder.wait_for("good")
    finally:
        reporter.stop()

    assert recorder.written() == [("good", {"attempt": 1})]
