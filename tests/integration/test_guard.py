"""Guarded reads: a blocking socket, and one watchdog that ends the reads that outlast a budget.

Real sockets (a connected pair) under httpcore's sync stream, as the guarded transport
builds them; the guards run on the real clock with budgets of a fraction of a second.
"""

from __future__ import annotations

import math
import multiprocessing
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpcore
import pytest
from httpcore._backends.sync import SyncStream

from worker import guard as guard_module
from worker.clock import CancelToken, SystemClock
from worker.errors import Cancelled, ProviderTimeout
from worker.guard import GuardedStream, StreamGuard, guarding

pytestmark = pytest.mark.integration


@pytest.fixture
def pair() -> Iterator[tuple[GuardedStream, socket.socket]]:
    """A guarded stream over one end of a socket pair, and the other end (the server)."""
    ours, theirs = socket.socketpair()
    # As httpcore leaves a socket after its own reads: with a timeout.
    ours.settimeout(5.0)
    yield GuardedStream(SyncStream(ours)), theirs
    ours.close()
    theirs.close()


@pytest.fixture(autouse=True)
def fresh_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets a watchdog of its own, with no entries left by another test."""
    monkeypatch.setattr(guard_module, "_watchdog", None)


@contextmanager
def socket_pairs(count: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """``count`` connected socket pairs, closed afterwards."""
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        yield pairs
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def make_guard(
    *, first_token_s: float = 30.0, idle_s: float = 30.0, cancel: CancelToken | None = None
) -> StreamGuard:
    return StreamGuard(
        clock=SystemClock(),
        cancel=cancel or CancelToken(),
        first_token_s=first_token_s,
        idle_s=idle_s,
        total_s=60.0,
        deadline_at=None,
    )


def wait_until(ok: Callable[[], bool], within_s: float = 5.0) -> None:
    """Poll ``ok`` (the watchdog offers no event to wait on) until it holds."""
    ends = time.monotonic() + within_s
    while not ok():
        assert time.monotonic() < ends, "condition not reached"
        time.sleep(0.001)


def test_guard_read_blocks_without_a_socket_timeout_and_ends_at_the_idle_budget(
    pair: tuple[GuardedStream, socket.socket],
) -> None:
    """The socket's timeout is cleared; the watchdog ends the read at the idle budget."""
    stream, server = pair
    guard = make_guard(idle_s=0.2)
    server.sendall(b"data: a\n\n")
    with guarding(guard):
        assert stream.read(1024) == b"data: a\n\n"
        assert stream.get_extra_info("socket").gettimeout() is None
        guard.first_delta()
        started = time.monotonic()
        with pytest.raises(ProviderTimeout, match="idle timeout"):
            stream.read(1024)
    # Ended by its own budget: the first read had the watchdog look only after 30 s.
    assert 0.2 <= time.monotonic() - started < 5.0


def test_guard_httpx_read_timeout_shorter_than_the_budgets_is_a_read_timeout(
    pair: tuple[GuardedStream, socket.socket],
) -> None:
    """httpx's own read timeout still applies when it is the nearest limit."""
    stream, _ = pair
    with guarding(make_guard()), pytest.raises(httpcore.ReadTimeout):
        stream.read(1024, timeout=0.1)


def test_guard_end_of_stream_reads_as_empty(pair: tuple[GuardedStream, socket.socket]) -> None:
    """A server that closes its end is an end of stream, not a timeout or an error."""
    stream, server = pair
    server.close()
    with guarding(make_guard()):
        assert stream.read(1024) == b""


def test_guard_connection_reset_is_a_read_error() -> None:
    """A reset connection reads as httpcore's ReadError, as its own sync stream maps it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    try:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()
        with guarding(make_guard()), pytest.raises(httpcore.ReadError):
            GuardedStream(SyncStream(ours)).read(1024)
    finally:
        ours.close()


def test_guard_watchdog_leaves_a_read_alone_whose_due_moved_past_the_look(
    pair: tuple[GuardedStream, socket.socket],
) -> None:
    """The first read asks to be looked at after the first-token budget; the next read,
    under the longer idle budget, is still in progress then and must not be cut."""
    stream, server = pair
    guard = make_guard(first_token_s=0.1, idle_s=30.0)
    server.sendall(b"one")
    got: list[bytes] = []

    def read() -> None:
        with guarding(guard):
            got.append(stream.read(1024))

    with guarding(guard):
        assert stream.read(1024) == b"one"
    first_look = guard._watched_at
    guard.first_delta()
    reader = threading.Thread(target=read)
    reader.start()
    # The watchdog looks at the guard when the first budget would have run out, sees a
    # read due later and looks again then (dropping the guard would leave it at inf).
    wait_until(lambda: first_look < guard._watched_at < math.inf)
    server.sendall(b"two")
    reader.join(timeout=5)
    assert got == [b"two"]


def test_guard_watchdog_wakes_for_a_read_due_earlier_than_its_next_look() -> None:
    """A long wait is watched first; a short one begun later still ends on time."""
    with socket_pairs(3) as pairs:
        first, long_stream, short_stream = (GuardedStream(SyncStream(ours)) for ours, _ in pairs)
        ended: dict[str, float] = {}

        def read(name: str, stream: GuardedStream, guard: StreamGuard) -> None:
            with guarding(guard):
                try:
                    stream.read(1024)
                except ProviderTimeout:
                    ended[name] = time.monotonic()

        # A read ended by the watchdog: from here on its thread is running, and waits for
        # work only inside its loop.
        with guarding(make_guard()), pytest.raises(httpcore.ReadTimeout):
            first.read(1024, timeout=0.05)
        started = time.monotonic()
        long_guard = make_guard(first_token_s=3.0)
        slow = threading.Thread(target=read, args=("long", long_stream, long_guard))
        slow.start()
        # The watchdog is waiting for the long read's due when the short one begins.
        wait_until(lambda: long_guard._sock is not None)
        read("short", short_stream, make_guard(first_token_s=0.1))
        slow.join(timeout=10)
        assert ended["short"] - started < 2.0
        assert ended["long"] - started >= 3.0


def test_guard_watchdog_goes_on_after_a_guard_fails_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A look that raises is logged; the other reads are still ended on time."""
    with socket_pairs(2) as pairs:
        (ours_a, theirs_a), (ours_b, _) = pairs
        broken = make_guard(first_token_s=0.05)

        def fail(now: float) -> float | None:
            raise RuntimeError("look failed")

        broken.look = fail  # type: ignore[method-assign]
        stuck: list[bytes] = []

        def read_broken() -> None:
            with guarding(broken):
                stuck.append(GuardedStream(SyncStream(ours_a)).read(1024))

        reader = threading.Thread(target=read_broken)
        reader.start()
        wait_until(lambda: "the stream watchdog could not end a read" in caplog.text)
        with guarding(make_guard(first_token_s=0.1)), pytest.raises(ProviderTimeout):
            GuardedStream(SyncStream(ours_b)).read(1024)
        # The broken guard's read was never ended: data lets it go.
        theirs_a.sendall(b"late")
        reader.join(timeout=5)
        assert stuck == [b"late"]


def test_guard_cancel_wakes_a_blocked_read_at_once(
    pair: tuple[GuardedStream, socket.socket],
) -> None:
    """A cancel shuts the socket: the blocked read ends with Cancelled."""
    stream, _ = pair
    cancel = CancelToken()
    guard = make_guard(cancel=cancel)
    cancel.on_cancel(guard.interrupt)
    outcome: list[BaseException] = []

    def read() -> None:
        with guarding(guard):
            try:
                stream.read(1024)
            except BaseException as exc:
                outcome.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: guard._sock is not None)
    cancel.cancel()
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert isinstance(outcome[0], Cancelled)


def _child_read(result: multiprocessing.Queue[str]) -> None:
    ours, theirs = socket.socketpair()
    try:
        with guarding(make_guard(first_token_s=0.1)):
            GuardedStream(SyncStream(ours)).read(1024)
        result.put("read returned")
    except ProviderTimeout as exc:
        result.put(str(exc))
    finally:
        ours.close()
        theirs.close()


# Python 3.12+ warns when a process with threads forks: exactly the case under test.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_guard_a_forked_child_has_its_own_watchdog(
    pair: tuple[GuardedStream, socket.socket],
) -> None:
    """The parent's watchdog thread does not survive a fork (Celery's prefork pool)."""
    stream, _ = pair
    with guarding(make_guard()), pytest.raises(httpcore.ReadTimeout):
        stream.read(1024, timeout=0.05)
    context = multiprocessing.get_context("fork")
    result: multiprocessing.Queue[str] = context.Queue()
    child = context.Process(target=_child_read, args=(result,))
    child.start()
    try:
        assert "first token" in result.get(timeout=10)
    finally:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
