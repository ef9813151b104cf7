"""The Redis event sink: every event to the replay log and the live channel, in order.

One Lua script delivers a batch of events in one round trip: for each event it appends
to the replay log (``XADD {p}:log:{job}``, field ``e``) and publishes on
``{p}:events:{job}``, then stores the last seq (``{p}:seq:{job}``) and refreshes both keys'
TTL (``EVENT_TTL``). The script first checks the job's lease token, so a worker that lost
its lease (it was presumed dead and the job re-enqueued) cannot write into the stream of
the run that replaced it.

seq lives in Redis: a sink starts from the stored seq, so a redelivered job continues the
numbering. Delta coalescing: with a flush window above zero, a text delta that comes a
whole window after the sink last delivered deltas goes out at once (so the first token
and the tokens of a slow stream never wait); the consecutive text deltas of one attempt
that follow within the window are merged into one event, delivered once the window since
that last delivery has passed (a process-wide flusher thread bounds the wait when the
stream goes quiet, ticking every half window). No delta waits much more than a window;
content and order stay exact.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import redis

from worker.clock import Clock
from worker.events import TERMINAL_TYPES, Event, encode, stamp
from worker.keys import Keys

_APPEND = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local ttl = tonumber(ARGV[2])
local first = tonumber(ARGV[4])
local n = #ARGV - 4
for i = 1, n do
  redis.call('XADD', KEYS[2], '*', 's', first + i - 1, 'e', ARGV[4 + i])
  redis.call('PUBLISH', ARGV[3], ARGV[4 + i])
end
redis.call('SET', KEYS[3], first + n - 1, 'EX', ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return n
"""


class LeaseLost(Exception):
    """Another worker owns this job now; this run must stop writing and give up."""


class RedisEventLog:
    """The event sink of one job run on a worker.

    Args:
        client: Redis.
        keys: the key space.
        job_id: the job.
        clock: the time source for ``ts`` and the flush window.
        ttl_s: how long the replay log lives after the last event.
        lease_token: the run's lease token; writes are refused when the lease moved on
            (empty: no lease check, for runs outside a worker).
        flush_window_s: delta coalescing window; 0 publishes each delta at once.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        job_id: str,
        clock: Clock,
        *,
        ttl_s: int,
        lease_token: str = "",
        flush_window_s: float = 0.0,
    ) -> None:
        self._redis = client
        self._keys = keys
        self.job_id = job_id
        self._clock = clock
        self._ttl_s = ttl_s
        self._token = lease_token
        self._window_s = flush_window_s
        self._script = client.register_script(_APPEND)
        self._lock = threading.Lock()
        self._pending: list[Event] = []
        # When deltas were last delivered (monotonic): the coalescing window counts from it.
        self._flushed_at = float("-inf")
        stored = client.get(keys.seq(job_id))
        self._next = int(stored) + 1 if stored is not None else 1
        if flush_window_s > 0:
            _flusher(flush_window_s).watch(self)

    @property
    def last_seq(self) -> int:
        """The seq of the last event stamped (0 before any)."""
        return self._next - 1

    def emit(self, body: Event) -> Event:
        with self._lock:
            coalesce = self._window_s > 0 and body["type"] == "delta" and "text" in body
            if coalesce:
                last = self._pending[-1] if self._pending else None
                if last is not None and last.get("text") is not None and last["n"] == body["n"]:
                    last["text"] += body["text"]
                    merged = last
                else:
                    merged = self._stamp(body)
                    self._pending.append(merged)
                self._flush_deltas_if_due()
                return merged
            event = self._stamp(body)
            self._pending.append(event)
            self._flush_locked()
            return event

    def _stamp(self, body: Event) -> Event:
        event = stamp(self.job_id, self._next, self._clock.time(), body)
        self._next += 1
        return event

    def flush_if_due(self) -> None:
        """Deliver buffered deltas whose window has passed (the flusher thread calls this)."""
        with self._lock:
            if self._pending:
                self._flush_deltas_if_due()

    def _flush_deltas_if_due(self) -> None:
        now = self._clock.monotonic()
        if now - self._flushed_at >= self._window_s:
            self._flush_locked()
            self._flushed_at = now

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
        if self._window_s > 0:
            _flusher(self._window_s).forget(self)

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        first = batch[0]["seq"]
        written = self._script(
            keys=[
                self._keys.lease(self.job_id),
                self._keys.log(self.job_id),
                self._keys.seq(self.job_id),
            ],
            args=[self._token, self._ttl_s, self._keys.events(self.job_id), first]
            + [encode(e) for e in batch],
        )
        if written == -1:
            raise LeaseLost(f"job {self.job_id}: the lease moved to another worker")


def terminal_in_log(client: redis.Redis, keys: Keys, job_id: str) -> Event | None:
    """The job's terminal event if its replay log holds one (read from the end)."""
    entries: Any = client.xrevrange(keys.log(job_id), count=1)
    for _entry_id, fields in entries:
        event: Event = json.loads(fields[b"e"])
        if event.get("type") in TERMINAL_TYPES:
            return event
    return None


class _Flusher:
    """One thread per process that flushes sinks whose coalescing window has passed."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._sinks: weakref.WeakSet[RedisEventLog] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="reliever-flusher", daemon=True)
        self._thread.start()

    def watch(self, sink: RedisEventLog) -> None:
        with self._lock:
            self._sinks.add(sink)

    def forget(self, sink: RedisEventLog) -> None:
        with self._lock:
            self._sinks.discard(sink)

    def _loop(self) -> None:
        stop = threading.Event()
        while not stop.wait(self._window_s / 2):
            with self._lock:
                sinks = list(self._sinks)
            for sink in sinks:
                try:
                    sink.flush_if_due()
                except (redis.RedisError, LeaseLost):
                    # The job's own thread meets the same error on its next emit and ends
                    # the run; the flusher must keep serving the other jobs.
                    continue


_flushers: dict[float, _Flusher] = {}
_flushers_lock = threading.Lock()


def _flusher(window_s: float) -> _Flusher:
    with _flushers_lock:
        flusher = _flushers.get(window_s)
        if flusher is None:
            flusher = _flushers[window_s] = _Flusher(window_s)
        return flusher
