"""Time, waiting, deadlines and cancellation, behind seams that tests replace.

All durations are seconds. Chain code never calls ``time.sleep``, ``time.time`` or
``time.monotonic`` itself: it asks a :class:`Clock`. Every wait wakes early when the job's
:class:`CancelToken` is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Clock(Protocol):
    """Where chain code gets the time and waits."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""

    def time(self) -> float:
        """Epoch seconds, for event timestamps and HTTP-dates."""

    def sleep(self, seconds: float, wake: threading.Event | None = None) -> bool:
        """Wait ``seconds``; return True when ``wake`` was set before they ran out."""


class SystemClock:
    """The real clock; waits are ``Event.wait`` so a cancellation cuts them short."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float, wake: threading.Event | None = None) -> bool:
        if wake is not None:
            return wake.wait(max(0.0, seconds))
        time.sleep(max(0.0, seconds))
        return False


@dataclass
class FakeClock:
    """A clock that jumps instead of waiting, and remembers every wait asked of it.

    ``sleep`` advances the clock at once (or not at all when ``wake`` is already set) and
    appends the requested duration to ``sleeps``. ``on_sleep`` runs before the jump, so a
    test can set a cancel token "during" a wait.
    """

    now: float = 1_000.0
    epoch_offset: float = 1_700_000_000.0
    sleeps: list[float] = field(default_factory=list)
    on_sleep: list[Callable[[float], None]] = field(default_factory=list)

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch_offset + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float, wake: threading.Event | None = None) -> bool:
        self.sleeps.append(seconds)
        for hook in self.on_sleep:
            hook(seconds)
        if wake is not None and wake.is_set():
            return True
        self.now += max(0.0, seconds)
        return False


class CancelToken:
    """Set once when the job is cancelled; every wait and stream watches it.

    Callbacks registered with :meth:`on_cancel` run in the cancelling thread (a stream's
    guard uses one to wake the thread blocked on its socket).
    """

    __slots__ = ("_callbacks", "_lock", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def cancel(self) -> None:
        with self._lock:
            self.event.set()
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` on cancellation (at once if already cancelled); returns an undo."""
        with self._lock:
            fire = self.event.is_set()
            if not fire:
                self._callbacks.append(callback)
        if fire:
            callback()

        def undo() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return undo


@dataclass(frozen=True, slots=True)
class Deadline:
    """One absolute monotonic instant covering every attempt, wait and model of a job."""

    clock: Clock
    at: float | None

    @classmethod
    def after(cls, clock: Clock, seconds: float | None) -> Deadline:
        return cls(clock, None if seconds is None else clock.monotonic() + seconds)

    def remaining_s(self) -> float | None:
        """Seconds left, never negative; None when the job has no deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - self.clock.monotonic())

    def expired(self) -> bool:
        return self.at is not None and self.clock.monotonic() >= self.at
