"""Leases: which worker runs a job right now, and finding jobs whose worker died.

A job runs under ``{p}:lease:{job}``, a random token set with ``NX`` and a short TTL that a
per-process keeper thread renews (compare-and-``PEXPIRE``). While the lease lives, a
redelivered copy of the job's message is dropped: a job never runs twice at once. The
job is also listed in the ``{p}:running`` hash (job id -> its message) until it ends.

Every worker process runs a reaper: a job listed as running whose lease has lapsed lost
its worker (SIGKILL, OOM, a lost machine). The first reaper to remove it from the hash
(atomically, in Lua) re-enqueues it, so it restarts within about ``ttl + interval``
seconds instead of waiting out the broker's visibility timeout.

A worker that shuts down hands its unfinished jobs off the same way, at once: it deletes
their leases but keeps them listed (:meth:`Leases.hand_off`), and its own reaper (or any
other worker's) claims and re-enqueues them.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from worker.keys import Keys

log = logging.getLogger(__name__)

# Takes the lease and lists the job as running; then reads what the run must know at its
# start: the stored result, the replay log's last entry, the cancel key, the last seq and
# one more key of the caller's (KEYS[7], when given).
_ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return false
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)[1]
return {
  redis.call('GET', KEYS[3]),
  last and last[2] or false,
  redis.call('EXISTS', KEYS[5]),
  redis.call('GET', KEYS[6]),
  KEYS[7] and redis.call('GET', KEYS[7]) or false,
}
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('HDEL', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
_HAND_OFF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# A job whose lease lapsed while listed: the first reaper to mark it claims it, and keeps
# it listed until its message is back on the queue (KEYS: lease, running, reaping).
_CLAIM_LOST = """
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[2]) then
  local message = redis.call('HGET', KEYS[2], ARGV[1])
  if message then
    return message
  end
  redis.call('DEL', KEYS[3])
end
return false
"""
# Its message is back on the queue: unlist it, unless a new run leased it meanwhile (whose
# listing this is now).
_REQUEUED = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('DEL', KEYS[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """A run's lease on its job, and the job's state read in the same round trip."""

    token: str
    result: bytes | None
    """The job's stored result: it already ended."""
    last_event: bytes | None
    """The replay log's last event (JSON), if the job published any."""
    cancelled: bool
    """The job's cancel key is set."""
    last_seq: int
    """The seq of the job's last stored event (0: none)."""
    read_value: bytes | None = None
    """The value of the ``read_key`` given to :meth:`Leases.acquire`."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Leases:
    """Acquire, renew and release job leases; one instance per worker process.

    Args:
        client: Redis.
        keys: the key space.
        ttl_s: the lease's lifetime; renewed every ``ttl_s / 3``.
    """

    def __init__(self, client: redis.Redis, keys: Keys, *, ttl_s: float) -> None:
        self._redis = client
        self._keys = keys
        self.ttl_s = ttl_s
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM_LOST)
        self._requeued = client.register_script(_REQUEUED)
        self._hand_off = client.register_script(_HAND_OFF)
        self._held: dict[str, tuple[str, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def acquire(
        self,
        job_id: str,
        message: dict[str, Any],
        on_lost: Callable[[], None],
        *,
        read_key: str | None = None,
    ) -> Lease | None:
        """Take the job's lease and list it as running; None when a live run holds it.

        The job's state comes back with the lease (one script, one round trip): read
        under the lease, it cannot change before the run starts but by a cancel, and a
        cancel token registered before this call misses none. ``read_key`` is one more
        key to read in the same trip (the service reads the agent's cooldown pin).
        ``on_lost`` runs (in the keeper thread) if the lease is ever found taken over.
        """
        token = uuid.uuid4().hex
        keys = self._keys
        # One script, so that no crash can leave a lease without its running entry
        # (such a job would wait out the broker's visibility timeout).
        reply: Any = self._acquire(
            keys=[
                keys.lease(job_id),
                keys.running(),
                keys.result(job_id),
                keys.log(job_id),
                keys.cancel(job_id),
                keys.seq(job_id),
                *([read_key] if read_key is not None else []),
            ],
            args=[token, round(self.ttl_s * 1000), job_id, json.dumps(message)],
        )
        if reply is None:
            return None
        result, fields, cancelled, seq, read_value = reply
        with self._lock:
            self._held[job_id] = (token, on_lost)
        return Lease(
            token=token,
            result=result,
            last_event=dict(zip(fields[::2], fields[1::2], strict=True)).get(b"e")
            if fields
            else None,
            cancelled=bool(cancelled),
            last_seq=int(seq or 0),
            read_value=read_value,
        )

    def _forget(self, job_id: str, token: str) -> bool:
        """Stop renewing this run's lease (not another run's of the same job)."""
        with self._lock:
            held = self._held.get(job_id)
            if held is None or held[0] != token:
                return False
            del self._held[job_id]
            return True

    def release(self, job_id: str, token: str) -> None:
        """The run ended: delete its lease and unlist the job (if the lease is still its)."""
        self._forget(job_id, token)
        self._release(keys=[self._keys.lease(job_id), self._keys.running()], args=[token, job_id])

    def hand_off(self, job_id: str) -> bool:
        """Give up the job's lease but leave it listed as running, then stop its run.

        The job is then exactly what a reaper looks for (listed, no lease): the first to
        claim it re-enqueues it, and the run's own writes, fenced by the deleted lease,
        fail from here on, so it ends without a terminal event. False when this process
        no longer held the lease.
        """
        with self._lock:
            held = self._held.pop(job_id, None)
        if held is None:
            return False
        token, on_lost = held
        try:
            deleted = self._hand_off(keys=[self._keys.lease(job_id)], args=[token])
        except Exception:
            # The lease may still stand: the run goes on under it (a cancel now would end
            # the job for good), renewed as before, until a hand-off gets through.
            with self._lock:
                self._held.setdefault(job_id, held)
            raise
        on_lost()
        return bool(deleted)

    def lock(self, job_id: str) -> str | None:
        """Take the job's lease briefly, without listing it as running (nobody renews it):
        for ending a job that never ran. None when a run holds it."""
        token = uuid.uuid4().hex
        taken = self._redis.set(
            self._keys.lease(job_id), token, nx=True, px=round(self.ttl_s * 1000)
        )
        return token if taken else None

    def unlock(self, job_id: str, token: str) -> None:
        """Give back a lease taken with :meth:`lock` (the job's listing is not touched)."""
        self._hand_off(keys=[self._keys.lease(job_id)], args=[token])

    def abandon(self, job_id: str, token: str) -> None:
        """Stop renewing this run's lease but leave it, and the job listed, to lapse.

        For a run that cannot go on (Redis failed under it): once the lease lapses, the
        reaper re-enqueues the job, as for a worker that died.
        """
        self._forget(job_id, token)

    def holds(self, job_id: str, token: str) -> bool:
        """Whether this process still holds (and renews) this run's lease."""
        with self._lock:
            held = self._held.get(job_id)
            return held is not None and held[0] == token

    def held(self) -> list[str]:
        """The jobs whose leases this process holds."""
        with self._lock:
            return list(self._held)

    def renew_all(self) -> None:
        """Renew every lease this process holds; call ``on_lost`` for those taken over."""
        with self._lock:
            held = list(self._held.items())
        if not held:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job_id, (token, _) in held:
            self._renew(
                keys=[self._keys.lease(job_id)],
                args=[token, round(self.ttl_s * 1000)],
                client=pipe,
            )
        for (job_id, (token, on_lost)), renewed in zip(held, pipe.execute(), strict=True):
            if not renewed and self._forget(job_id, token):
                log.warning("job %s: lease lost to another worker; stopping this run", job_id)
                on_lost()

    def claim_lost(self) -> list[dict[str, Any]]:
        """Claim and return the messages of listed jobs whose lease lapsed.

        A claimed job stays listed until :meth:`requeued` says its message is back on the
        queue, so a reaper that dies in between loses nothing: the claim lapses after a
        lease TTL and the next reaper claims the job again. Of all the workers reaping at
        once, exactly one claims each lost job (one round trip per page of the listing).
        """
        lost: list[dict[str, Any]] = []
        cursor = 0
        claim_ms = round(self.ttl_s * 1000)
        while True:
            reply: Any = self._redis.hscan(self._keys.running(), cursor, count=200)
            cursor, page = reply
            with self._lock:
                # This process's own jobs are alive: no need to ask Redis about them.
                names = [_text(job_id) for job_id in page if _text(job_id) not in self._held]
            if names:
                pipe = self._redis.pipeline(transaction=False)
                for name in names:
                    self._claim(keys=self._reap_keys(name), args=[name, claim_ms], client=pipe)
                lost += [json.loads(message) for message in pipe.execute() if message]
            if cursor == 0:
                return lost

    def requeued(self, job_id: str) -> None:
        """A claimed job's message is back on the queue: unlist it (unless a new run has
        leased it already) and drop the claim."""
        self._requeued(keys=self._reap_keys(job_id), args=[job_id])

    def unclaim(self, job_id: str) -> None:
        """A claimed job could not be re-enqueued: the next reap tries it again."""
        self._redis.delete(self._keys.reaping(job_id))

    def _reap_keys(self, job_id: str) -> list[str]:
        return [self._keys.lease(job_id), self._keys.running(), self._keys.reaping(job_id)]

    def start(self, *, reap: Callable[[], None] | None = None) -> None:
        """Start the renewer thread and, with ``reap``, the reaper; both every ``ttl/3``."""
        if self._threads:
            return
        jobs = [("reliever-leases", self.renew_all)]
        if reap is not None:
            jobs.append(("reliever-reaper", reap))
        for name, job in jobs:
            thread = threading.Thread(target=self._every, args=(job,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _every(self, job: Callable[[], None]) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                job()
            except Exception:
                # Renewing leases and reaping are this process's duty to every job: no
                # error may end them. The next tick tries again.
                log.exception("lease upkeep failed; retrying at the next tick")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
