"""What a worker process does once it is ready."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker.celery import GC_THRESHOLDS, _start_background


@pytest.fixture
def collector() -> Iterator[None]:
    """Python's default collector settings for the test, the process's own afterwards."""
    before = gc.get_threshold()
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_worker_ready_moves_the_startup_heap_out_of_the_collectors_sight(collector: None) -> None:
    """Objects that live as long as the process are frozen, so full collections (which
    paused every stream for 80-110 ms with 500 running) no longer walk them."""
    _start_background(sender=None)

    assert gc.get_freeze_count() > 0


def test_worker_ready_raises_the_collectors_first_threshold(collector: None) -> None:
    """A chunk's short-lived objects no longer trigger a young collection every 700
    allocations (and, through them, frequent full ones)."""
    _start_background(sender=None)

    assert gc.get_threshold() == GC_THRESHOLDS
