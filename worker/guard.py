"""Budgets for one streaming attempt, enforced on the socket itself.

httpx's read timeout measures inactivity only, and nothing in httpx wakes a thread blocked
on a socket when a job is cancelled. So every connection the shared ``httpx.Client`` opens
goes through :class:`GuardedBackend`, whose streams consult the calling thread's
:class:`StreamGuard` on every read:

* each read waits at most until the nearest budget runs out (first token, idle gap,
  the attempt's total, the job's deadline), then raises that budget's error. The socket
  itself blocks with no timeout: one watchdog per process (:class:`Watchdog`, a thread, or
  a greenlet under gevent) shuts down the sockets of reads that outlast their wait. A
  socket timeout per read would cost a timer started and stopped on every read (under
  gevent, a ``Timeout`` object too), the largest cost of a read after the read itself;
* :meth:`StreamGuard.interrupt` (called when the job is cancelled, from any thread) shuts
  the socket down, which wakes the blocked read at once;
* a TCP connect, which nothing can wake, is made non-blocking and polled: a cancellation
  or the deadline stops it within ``CONNECT_POLL_S`` instead of after the connect timeout.

Either way the exception unwinds through httpcore, which closes the connection instead of
returning it to the pool: a timed-out or cancelled request is really closed upstream.
Durations are seconds.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx
from httpcore._backends.sync import SyncStream

from worker.clock import CancelToken, Clock
from worker.errors import Cancelled, DeadlineExceeded, ProviderTimeout, RelieverError

log = logging.getLogger(__name__)
_local = threading.local()

CONNECT_POLL_S = 0.05
"""How often a connect in progress looks at the job's cancel token and deadline."""


class StreamGuard:
    """The budgets of one attempt, and the socket it is reading from.

    Args:
        clock: the time source.
        cancel: the job's cancel token; setting it interrupts the read.
        first_token_s: budget from the attempt's start to its first delta.
        idle_s: longest gap between two reads once the first delta arrived.
        total_s: budget for the whole attempt.
        deadline_at: the job's deadline (monotonic), or None.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        cancel: CancelToken,
        first_token_s: float,
        idle_s: float,
        total_s: float,
        deadline_at: float | None,
    ) -> None:
        self._clock = clock
        self._cancel = cancel
        self._started = clock.monotonic()
        self._first_token_at = self._started + first_token_s
        self._idle_s = idle_s
        self._total_at = self._started + total_s
        self._deadline_at = deadline_at
        self._last_read = self._started
        self._first_delta = False
        self._sock: socket.socket | None = None
        # Kept by the reading thread and the watchdog (monotonic real seconds): when the
        # read in progress must end, when the watchdog looks at this guard next, and the
        # due of the read it ended.
        self._read_due = math.inf
        self._watched_at = math.inf
        self._expired_due = math.nan

    def drain(self, grace_s: float) -> None:
        """The answer is whole: allow only ``grace_s`` more to read the rest of the body."""
        self._total_at = min(self._total_at, self._clock.monotonic() + grace_s)

    def first_delta(self) -> None:
        """The attempt produced its first delta: the idle budget takes over."""
        self._first_delta = True

    def saw_bytes(self) -> None:
        self._last_read = self._clock.monotonic()

    def _next_trip(self) -> tuple[float, str]:
        """When the nearest budget runs out, and which (checked on every read: no allocation)."""
        at, which = self._total_at, "total"
        if self._first_delta:
            idle_at = self._last_read + self._idle_s
            if idle_at < at:
                at, which = idle_at, "idle"
        elif self._first_token_at < at:
            at, which = self._first_token_at, "first_token"
        if self._deadline_at is not None and self._deadline_at < at:
            at, which = self._deadline_at, "deadline"
        return at, which

    def _error(self, which: str) -> RelieverError:
        if which == "deadline":
            return DeadlineExceeded("the job's deadline passed")
        if which == "idle":
            return ProviderTimeout(f"the stream went quiet for {self._idle_s:g}s (idle timeout)")
        if which == "first_token":
            return ProviderTimeout("no first token within the first_token timeout")
        return ProviderTimeout("no complete answer within the total timeout")

    def check(self) -> float:
        """Raise the error of a budget that ran out, or :class:`Cancelled`.

        Returns:
            The seconds until the nearest budget runs out (more than 0).
        """
        if self._cancel.cancelled:
            raise Cancelled("the job was cancelled")
        at, which = self._next_trip()
        left = at - self._clock.monotonic()
        if left <= 0:
            raise self._error(which)
        return left

    def arm(self, sock: socket.socket, timeout: float | None) -> None:
        """Begin a read on ``sock``, to be ended by the watchdog when it outlasts its wait.

        Raises the error of a budget that ran out. The wait runs to the nearest budget
        (or ``timeout``, httpx's read timeout), counted in the guard's clock as a socket
        timeout would be, and waited in real seconds. Most reads end later than the
        previous one: the watchdog already looks at this guard no later than needed, and
        nothing is scheduled.
        """
        left = self.check()
        due = time.monotonic() + (left if timeout is None else min(timeout, left))
        self._read_due = due
        self.attach(sock)
        # Only now: the watchdog clears _watched_at before it looks at the socket, so it
        # sees this read, or this check sees the clearing and asks it again.
        if due < self._watched_at:
            watchdog().watch(self, due)

    def expired(self) -> bool:
        """Whether the watchdog ended the current read."""
        return self._expired_due == self._read_due

    def look(self, now: float) -> float | None:
        """The watchdog's look at this guard: when to look again, or None.

        A read due later is looked at again then; a read past its due is ended; a guard
        between reads past its last due is left until its next read asks again.
        """
        # The socket before the due: a read that ends now leaves a past due, and a new
        # read sets its due before it attaches its socket.
        reading = self._sock is not None
        due = self._read_due
        if due > now:
            return due
        if reading:
            self._expired_due = due
            self.interrupt()
        return None

    def attach(self, sock: socket.socket | None) -> None:
        """Remember the socket the current read uses, so that a cancel can shut it.

        No lock (this runs twice per read): a cancel sets its flag before it calls
        :meth:`interrupt`, so either that call sees the socket stored here, or the flag
        check below sees the cancel and interrupts itself.
        """
        self._sock = sock
        if self._cancel.cancelled:
            self.interrupt()

    def detach(self) -> None:
        """The read is over: a cancel from now on has no socket to shut."""
        self._sock = None

    def interrupt(self) -> None:
        """Wake the thread blocked on this attempt's socket (any thread may call this)."""
        sock = self._sock
        if sock is None:
            return
        # The plain socket's shutdown, even for an SSLSocket: SSLSocket.shutdown would
        # tear down its SSL object under the reading thread's feet.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Watchdog:
    """Ends the guarded reads that outlast their wait, for every job of the process.

    Guards ask to be looked at (:meth:`watch`) when a read must end earlier than the time
    the watchdog already looks at them; :meth:`StreamGuard.look` says what a look finds.
    No lock on the reading side (see :meth:`StreamGuard.arm`). Its thread is started by
    the first read that needs it, and again by the next one if it ever died.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, StreamGuard]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, guard: StreamGuard, at: float) -> None:
        """Look at ``guard`` at ``at`` (monotonic seconds), or earlier."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._loop, name="reliever-watchdog", daemon=True)
                thread.start()
                self._thread = thread
            guard._watched_at = at
            heapq.heappush(self._heap, (at, next(self._order), guard))
            if self._heap[0][2] is guard:
                self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    at, _, guard = heapq.heappop(self._heap)
                    if guard._watched_at != at:
                        continue  # a later call to watch() replaced this entry
                    guard._watched_at = math.inf
                    try:
                        again = guard.look(now)
                    except Exception:
                        # One guard's failure must not leave every other read unwatched.
                        log.exception("the stream watchdog could not end a read")
                        continue
                    if again is not None:
                        guard._watched_at = again
                        heapq.heappush(self._heap, (again, next(self._order), guard))
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


_watchdog: Watchdog | None = None
_watchdog_lock = threading.Lock()


def watchdog() -> Watchdog:
    """The process's watchdog (a forked child makes its own: threads do not cross a fork)."""
    global _watchdog
    global _fork_hook_registered
    with _watchdog_lock:
        if _watchdog is None:
            if not _fork_hook_registered:
                os.register_at_fork(after_in_child=_forget_watchdog)
                _fork_hook_registered = True
            _watchdog = Watchdog()
        return _watchdog


_fork_hook_registered = False


def _forget_watchdog() -> None:
    """In a forked child: no watchdog yet, and a lock no thread of the parent holds."""
    global _watchdog, _watchdog_lock
    _watchdog = None
    _watchdog_lock = threading.Lock()


def current_guard() -> StreamGuard | None:
    guard: StreamGuard | None = getattr(_local, "guard", None)
    return guard


@contextmanager
def guarding(guard: StreamGuard) -> Iterator[StreamGuard]:
    """Make ``guard`` the calling thread's guard while the attempt runs."""
    previous = current_guard()
    _local.guard = guard
    try:
        yield guard
    finally:
        _local.guard = previous


class GuardedStream(httpcore.NetworkStream):
    """A network stream whose reads obey the calling thread's :class:`StreamGuard`.

    Over httpcore's own sync stream (a socket, plain or TLS) a guarded read calls the
    socket itself, blocking with no timeout while the watchdog keeps the time, and maps
    its errors as that stream does. Other streams get the wait as their read timeout.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner
        self._sock: socket.socket | None = inner.get_extra_info("socket")
        self._own: socket.socket | None = self._sock if type(inner) is SyncStream else None
        # The inner stream sets the socket's timeout on each of its own reads and writes.
        self._blocking = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        guard = current_guard()
        if guard is None:
            self._blocking = False
            return self._inner.read(max_bytes, timeout)
        sock = self._own
        if sock is None:
            return self._read_inner(guard, max_bytes, timeout)
        guard.arm(sock, timeout)
        try:
            try:
                if not self._blocking:
                    sock.settimeout(None)
                    self._blocking = True
                data = sock.recv(max_bytes)
            except OSError as exc:
                # A read cut short by interrupt() may fail rather than read as the end of
                # the stream (gevent's sockets do): the guard's reason comes first. The
                # rest is mapped as httpcore's own sync stream maps it.
                guard.check()
                if guard.expired() or isinstance(exc, TimeoutError):
                    raise httpcore.ReadTimeout(exc) from exc
                raise httpcore.ReadError(exc) from exc
            if not data:
                # A shutdown by interrupt() reads as end-of-stream: say why instead.
                guard.check()
                if guard.expired():
                    raise httpcore.ReadTimeout("timed out")
            guard.saw_bytes()
            return data
        finally:
            guard.detach()

    def _read_inner(self, guard: StreamGuard, max_bytes: int, timeout: float | None) -> bytes:
        guard.attach(self._sock)
        try:
            left = guard.check()
            wait = left if timeout is None else min(timeout, left)
            try:
                data = self._inner.read(max_bytes, wait)
            except Exception:
                guard.check()
                raise
            guard.check()
            guard.saw_bytes()
            return data
        finally:
            guard.detach()

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._blocking = False
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return GuardedStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


def _connect_watching(
    guard: StreamGuard,
    host: str,
    port: int,
    timeout: float | None,
    local_address: str | None,
    socket_options: Iterable[Any],
) -> socket.socket:
    """``socket.create_connection``, polled so that :meth:`StreamGuard.check` can stop it.

    Raises:
        httpcore.ConnectTimeout: no connection within ``timeout`` (wall-clock seconds,
            as a socket timeout is).
        httpcore.ConnectError: every address refused or failed.
        RelieverError: the guard's cancellation or deadline, raised by ``guard.check``.
    """
    ends_at = None if timeout is None else time.monotonic() + timeout
    last: OSError | None = None
    with httpcore._exceptions.map_exceptions(
        {TimeoutError: httpcore.ConnectTimeout, OSError: httpcore.ConnectError}
    ):
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                if local_address is not None:
                    sock.bind((local_address, 0))
                sock.setblocking(False)
                code = sock.connect_ex(address)
                # A selector, not select.select: that fails for descriptors above 1023,
                # which a worker holding hundreds of streams has.
                with selectors.DefaultSelector() as selector:
                    selector.register(sock, selectors.EVENT_WRITE)
                    while code in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                        guard.check()
                        left = CONNECT_POLL_S if ends_at is None else ends_at - time.monotonic()
                        if left <= 0:
                            raise TimeoutError("timed out")
                        if selector.select(min(left, CONNECT_POLL_S)):
                            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                sock.settimeout(None)
                for option in socket_options:
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except OSError as exc:
                sock.close()
                if isinstance(exc, TimeoutError):
                    raise
                last = exc
            except BaseException:
                sock.close()
                raise
        raise last or OSError(f"no address for {host}")


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend, handing out :class:`GuardedStream` connections."""

    def __init__(self, inner: httpcore.NetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        guard = current_guard()
        if guard is None or not isinstance(self._inner, httpcore.SyncBackend):
            return GuardedStream(
                self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
            )
        left = guard.check()
        timeout = left if timeout is None else min(timeout, left)
        # A blocking connect cannot be woken by a cancellation, so connect ourselves and
        # poll; the socket then goes into httpcore's own sync stream, as its backend does.
        sock = _connect_watching(guard, host, port, timeout, local_address, socket_options or ())
        return GuardedStream(SyncStream(sock))

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return GuardedStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def guarded_transport(*, max_connections: int = 1000) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` (no retries of its own) whose connections are guarded."""
    transport = httpx.HTTPTransport(
        retries=0,
        # Requests go out as headers then body: two small writes, which Nagle's algorithm
        # would hold back for the server's delayed ACK.
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        limits=httpx.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=60.0,
        ),
    )
    # httpx builds its httpcore pool itself and takes no network backend; the pool's
    # backend is the one seam httpcore offers for wrapping every socket it opens.
    pool = transport._pool
    pool._network_backend = GuardedBackend(pool._network_backend)
    return transport
