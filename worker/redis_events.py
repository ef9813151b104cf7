"""The Redis event sink: every event to the replay log and the live channel, in order.

Each job's events are appended to its replay log (``XADD {p}:log:{job}``, fields ``s`` =
seq and ``e`` = the event JSON) and published on ``{p}:events:{job}`` by one Lua script,
which also stores the last seq (``{p}:seq:{job}``) and refreshes both keys' TTL
(``EVENT_TTL``). The script first checks the job's lease token, so a worker that lost its
lease (it was presumed dead and the job re-enqueued) cannot write into the stream of the
run that replaced it.

One :class:`EventWriter` thread per process delivers the events of every job running
there, group-commit style: whatever accumulated while its previous write was in flight
goes out in one script call, one round trip for all the jobs in the batch; when many jobs
stream at once it lets events gather for :data:`BUSY_LINGER_S` first. A job thread waits
only for the first delta of each attempt and for the terminal event to be stored (so a
result is never returned before its stream); the other events go out while the job goes
on, in order. Under load, consecutive text deltas of one attempt that queued up together
are merged into one event (content and order exact); an optional window
(``DELTA_FLUSH_MS``) holds deltas a little longer to merge more. seq is assigned at write
time and lives in Redis, so a redelivered job continues the numbering and merging leaves
no gaps.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis

from worker.clock import Clock
from worker.events import TERMINAL_TYPES, Event, encode, stamp
from worker.keys import Keys
from worker.retry import OUTAGE_WARN_S, retry_redis_blips, through_outage

log = logging.getLogger(__name__)

# One call writes a whole batch: for each job, KEYS holds its lease, log and seq keys and
# ARGV its lease token, channel, TTL, first seq, event count and events.
# Idempotent: an event whose seq is already stored is skipped, so a batch retried after a
# lost reply (the script ran, the answer did not arrive) is not appended twice. Each job's
# reply is the number of events written, -1 when its lease moved on, or an error message:
# one job's bad key cannot fail the others.
_APPEND = """
local replies = {}
local a = 1
for k = 1, #KEYS, 3 do
  local token, channel, ttl = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local first, n = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local events = a + 5
  local ok, reply = pcall(function()
    if token ~= '' and redis.call('GET', KEYS[k]) ~= token then
      return -1
    end
    local stored = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
    local wrote = 0
    for i = 0, n - 1 do
      if first + i > stored then
        redis.call('XADD', KEYS[k + 1], '*', 's', first + i, 'e', ARGV[events + i])
        redis.call('PUBLISH', channel, ARGV[events + i])
        wrote = wrote + 1
      end
    end
    if first + n - 1 > stored then
      stored = first + n - 1
    end
    redis.call('SET', KEYS[k + 2], stored, 'EX', ttl)
    redis.call('EXPIRE', KEYS[k + 1], ttl)
    return wrote
  end)
  if ok then
    replies[#replies + 1] = reply
  else
    replies[#replies + 1] = tostring(type(reply) == 'table' and reply.err or reply)
  end
  a = events + n
end
return replies
"""

BUSY_LINGER_S = 0.005
"""With no window set, how long a busy writer lets events gather before its next write.

Busy means the last write carried more than one job's events: many jobs are streaming,
and each write's fixed cost (a wake-up, a round trip) is worth sharing among more of them.
Waited events (an attempt's first delta, the terminal event) never linger.
"""

ACK_WARN_S = OUTAGE_WARN_S
"""How often a job thread waiting for its event to be stored says it still waits."""


def _warn_outage(exc: BaseException) -> None:
    log.warning("writing events: Redis does not answer (%s); retrying", type(exc).__name__)


class LeaseLost(Exception):
    """Another worker owns this job now; this run must stop writing and give up."""


@dataclass(slots=True)
class _Item:
    sink: RedisEventLog
    body: Event | None
    ts: float
    at: float
    done: threading.Event | None = None
    event: Event | None = None


@dataclass(slots=True)
class _Batch:
    sink: RedisEventLog
    events: list[Event] = field(default_factory=list)


class EventWriter:
    """Delivers the events of every job in this process, in order, in batched script calls.

    Args:
        client: Redis.
        window_s: hold deltas up to this long (from the oldest queued) to merge more;
            0 writes as soon as the previous write is done.
    """

    def __init__(self, client: redis.Redis, *, window_s: float = 0.0) -> None:
        self._redis = client
        self._window_s = window_s
        self._script = client.register_script(_APPEND)
        # The writer's own connection: no pool checkout (and its readiness poll) per batch.
        self._conn = client.connection_pool.get_connection()
        self._queue: deque[_Item] = deque()
        self._wake = threading.Event()
        self._idle = False  # the writer is about to wait for the queue to fill
        self._urgent = False  # a waited item is queued: no lingering
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name="reliever-events", daemon=True)
        self._thread.start()

    def submit(self, item: _Item) -> None:
        # No lock: appending to a deque is atomic, and the writer says it is idle before
        # it looks at the queue one last time (_take), so either it sees this item or this
        # check sees it idle (both rely on the GIL ordering these steps, as CPython's
        # default build does). A Condition would take a lock on every event; under gevent,
        # its notify also checks ownership with a failing acquire, which yields to the hub.
        self._queue.append(item)
        if item.done is not None:
            self._urgent = True
            self._wake.set()
        elif self._idle:
            self._wake.set()

    def _take(self) -> list[_Item]:
        queue, wake = self._queue, self._wake
        while not queue:
            wake.clear()
            self._idle = True
            if not queue:
                wake.wait()
            self._idle = False
        window_s = self._window_s or (BUSY_LINGER_S if self._busy else 0.0)
        if window_s > 0:
            until = queue[0].at + window_s
            while True:
                wake.clear()
                if self._urgent or (left := until - time.monotonic()) <= 0:
                    break
                wake.wait(left)
        # Cleared before the queue is read: a waited item queued after this sets it again
        # (if this batch takes it too, the next batch merely skips its window once).
        self._urgent = False
        return [queue.popleft() for _ in range(len(queue))]

    def _loop(self) -> None:
        while True:
            items = self._take()
            try:
                self._write(items)
            except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the writer
                # The jobs of this batch learn it on their next event; the writer goes on
                # serving every other job.
                log.warning("writing events failed: %s", type(exc).__name__)
                for item in items:
                    item.sink.fail(exc)
            finally:
                for item in items:
                    if item.done is not None:
                        item.done.set()

    def _write(self, items: list[_Item]) -> None:
        batches: dict[int, _Batch] = {}
        for item in items:
            batch = batches.get(id(item.sink))
            if batch is None:
                batch = batches[id(item.sink)] = _Batch(item.sink)
            if item.body is None:
                continue
            body = item.body
            last = batch.events[-1] if batch.events else None
            if (
                body["type"] == "delta"
                and "text" in body
                and last is not None
                and last["type"] == "delta"
                and "text" in last
                and last["n"] == body["n"]
            ):
                last["text"] += body["text"]
                item.event = last
                continue
            event = batch.sink.stamp_next(body, item.ts)
            batch.events.append(event)
            item.event = event
        self._busy = len(batches) > 1
        live = [b for b in batches.values() if b.events and b.sink.failure is None]
        if not live:
            return
        for batch, reply in zip(live, self._send_through_outage(live), strict=True):
            if reply == -1:
                batch.sink.fail(LeaseLost(f"job {batch.sink.job_id}: the lease moved elsewhere"))
            elif isinstance(reply, bytes):
                batch.sink.fail(redis.ResponseError(reply.decode(errors="replace")))

    def _send_through_outage(self, live: list[_Batch]) -> list[Any]:
        """Send the batch until Redis takes it: an outage is waited out, never a loss.

        The batch keeps its seqs, and the script skips what is stored already, so a try
        whose reply was lost is not appended twice. A run whose lease lapsed meanwhile
        learns it from the reply (LeaseLost); its job is another worker's by then.
        """
        return through_outage(lambda: self._send(live), _warn_outage)

    @retry_redis_blips
    def _send(self, live: list[_Batch]) -> list[Any]:
        """One script call for the whole batch (one command, one reply)."""
        keys: list[str] = []
        args: list[Any] = []
        for batch in live:
            batch.sink.add_write(keys, args, batch.events)
        try:
            return self._evalsha(keys, args)
        except redis.exceptions.NoScriptError:
            # Redis restarted (or its scripts were flushed) since the last load.
            self._redis.script_load(_APPEND)
            return self._evalsha(keys, args)

    def _evalsha(self, keys: list[str], args: list[Any]) -> list[Any]:
        conn = self._conn
        # Packed by hiredis directly, as redis-py's hiredis packer would (the arguments
        # are str, int and bytes), without its copy of every argument through a Python
        # generator first: about 0.4 µs each, and a batch has nine per job.
        command = hiredis.pack_command(("EVALSHA", self._script.sha, len(keys), *keys, *args))
        try:
            conn.send_packed_command([command])  # type: ignore[no-untyped-call]
            replies: list[Any] = conn.read_response()
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()  # type: ignore[no-untyped-call]  # the next call reconnects
            raise
        return replies


_writers: weakref.WeakKeyDictionary[redis.Redis, dict[float, EventWriter]] = (
    weakref.WeakKeyDictionary()
)
_writers_lock = threading.Lock()


def shared_writer(client: redis.Redis, window_s: float = 0.0) -> EventWriter:
    """The process's writer for ``client`` (one per client and window)."""
    with _writers_lock:
        per_client = _writers.setdefault(client, {})
        writer = per_client.get(window_s)
        if writer is None:
            writer = per_client[window_s] = EventWriter(client, window_s=window_s)
        return writer


class RedisEventLog:
    """The event sink of one job run.

    Args:
        client: Redis.
        keys: the key space.
        job_id: the job.
        clock: the time source for ``ts``.
        ttl_s: how long the replay log lives after the last event.
        lease_token: the run's lease token; writes are refused when the lease moved on
            (empty: no lease check, for runs outside a worker).
        flush_window_s: how long deltas may wait to be merged (0: only what queues up
            while a write is in flight).
        last_seq: the job's last stored seq, when the caller read it already (None: read
            it here).
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
        last_seq: int | None = None,
    ) -> None:
        self.job_id = job_id
        self._write_keys = (keys.lease(job_id), keys.log(job_id), keys.seq(job_id))
        self._channel = keys.events(job_id)
        self._clock = clock
        self._ttl_s = ttl_s
        self._token = lease_token
        self._writer = shared_writer(client, flush_window_s)
        self.failure: BaseException | None = None
        self._streaming_n: int | None = None
        if last_seq is None:
            stored = client.get(keys.seq(job_id))
            last_seq = int(stored) if stored is not None else 0
        self._next = last_seq + 1
        self.last_seq = last_seq
        """The seq stored before this run began (0 for a job that never published)."""

    def emit(self, body: Event) -> Event:
        self._raise_failure()
        ts = self._clock.time()
        kind = body["type"]
        first_delta = kind == "delta" and body["n"] != self._streaming_n
        if kind not in TERMINAL_TYPES and not first_delta:
            self._writer.submit(_Item(self, body, ts, time.monotonic()))
            return {"job_id": self.job_id, "type": kind, "ts": ts, **body}
        if first_delta:
            # Waited for, so the writer sends it now: a thread reading a burst of tokens
            # would otherwise hold the GIL for a switch interval (5 ms) before the writer
            # runs. The events before it are stored by then too (the writer keeps order).
            self._streaming_n = body["n"]
        item = self._wait(_Item(self, body, ts, time.monotonic(), threading.Event()))
        assert item.event is not None
        return item.event

    def close(self) -> None:
        """Wait until every event emitted so far is stored."""
        self._wait(_Item(self, None, 0.0, time.monotonic(), threading.Event()))

    def _wait(self, item: _Item) -> _Item:
        assert item.done is not None
        self._writer.submit(item)
        waited = 0.0
        while not item.done.wait(ACK_WARN_S):
            # The writer tries until Redis takes the events (or refuses them: LeaseLost).
            waited += ACK_WARN_S
            log.warning("job %s: events not stored after %.0fs; still trying", self.job_id, waited)
        self._raise_failure()
        return item

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def fail(self, error: BaseException) -> None:
        """Called by the writer: this run's events can no longer be written."""
        if self.failure is None:
            self.failure = error

    def stamp_next(self, body: Event, ts: float) -> Event:
        """Give ``body`` the next seq (called by the writer, in delivery order)."""
        event = stamp(self.job_id, self._next, ts, body)
        self._next += 1
        return event

    def add_write(self, keys: list[str], args: list[Any], events: list[Event]) -> None:
        """Add this job's part of a batch write: its keys, then its header and events."""
        keys += self._write_keys
        args += (self._token, self._channel, self._ttl_s, events[0]["seq"], len(events))
        args += map(encode, events)
