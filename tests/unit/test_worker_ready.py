"""What a worker process does once it is ready."""

from __future__ import annotations

import gc
import sys

from worker.celery import GIL_SWITCH_S, _start_background


def test_worker_ready_freezes_the_startup_heap_and_shortens_the_gil_switch() -> None:
    """Objects that live as long as the process are frozen, so full collections (which
    paused every stream for 80-110 ms with 500 running) no longer walk them; a woken
    thread waits at most 1 ms for the GIL."""
    default = sys.getswitchinterval()
    gc.unfreeze()
    try:
        _start_background(sender=None)

        assert gc.get_freeze_count() > 0
        assert sys.getswitchinterval() == GIL_SWITCH_S < default
    finally:
        gc.unfreeze()
        sys.setswitchinterval(default)
