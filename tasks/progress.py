"""The RUNNING states Flower shows, written a moment after the fact by one thread.

A job reports its state on each attempt. Writing it (a result-backend read and write,
and an event) right away would compete with the job's own request for the first token,
on the same core; so a report waits :data:`REPORT_DELAY_S` first, and is dropped when it
is no longer news: a newer report of the same task came, or the task finished. A job
shorter than the delay writes no RUNNING state at all, and a finished task's SUCCESS is
never overwritten by a RUNNING still in flight (:meth:`StateReporter.finish` waits for
it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REPORT_DELAY_S = 0.05
"""How long a report waits: longer than the first token of a healthy stream takes."""

Write = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class _Report:
    task_id: str
    meta: dict[str, Any]
    due: float


class StateReporter:
    """Writes each task's latest state, ``delay_s`` after it was reported, in order.

    Args:
        write: stores one task's state (called in the reporter's thread only).
        delay_s: how long a report waits before it is written.
    """

    def __init__(self, write: Write, *, delay_s: float = REPORT_DELAY_S) -> None:
        self._write = write
        self._delay_s = delay_s
        self._cond = threading.Condition()
        self._queue: deque[_Report] = deque()
        self._latest: dict[str, _Report] = {}
        self._writing: str | None = None
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="reliever-state", daemon=True)
        self._thread.start()

    def report(self, task_id: str, meta: dict[str, Any]) -> None:
        """Write ``meta`` as the task's state after the delay, unless news overtakes it."""
        item = _Report(task_id, meta, time.monotonic() + self._delay_s)
        with self._cond:
            self._latest[task_id] = item
            self._queue.append(item)
            self._cond.notify()

    def finish(self, task_id: str, timeout_s: float) -> None:
        """The task ended: drop its pending report, and wait for one being written."""
        ends = time.monotonic() + timeout_s
        with self._cond:
            self._latest.pop(task_id, None)
            while self._writing == task_id and (left := ends - time.monotonic()) > 0:
                self._cond.wait(left)

    def stop(self) -> None:
        """Write nothing more; the thread ends once it is idle."""
        with self._cond:
            self._stopped = True
            self._latest.clear()
            self._cond.notify()
        self._thread.join(timeout=5)

    def _next(self) -> _Report | None:
        """The next report that is still news, once it is due; None when stopped."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                left = head.due - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._queue.popleft()
                if self._latest.get(head.task_id) is head:
                    del self._latest[head.task_id]
                    self._writing = head.task_id
                    return head

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            try:
                self._write(item.task_id, item.meta)
            except Exception:
                # A state Flower shows must never fail the job it describes.
                log.exception("job %s: could not record its RUNNING state", item.task_id)
            finally:
                with self._cond:
                    self._writing = None
                    self._cond.notify_all()
