"""Running one job on a worker: everything around the executor, nothing Celery-specific.

For each delivered job message :meth:`Service.run`:

1. takes the job id (the message's, else the task id);
2. validates the job and its agent; a bad one ends at once with ``failed``
   (``invalid_job`` / ``unknown_agent``) and is never retried;
3. takes the job's lease; if a live run holds it, the message is a duplicate and is
   dropped (returns None); under the lease, a job that already ended (its result is
   stored, or its log ends with a terminal event) returns that result and calls no model;
4. publishes ``restarted`` (``discard: true``) when the job had published before (it is
   a rerun after a lost worker), runs the executor with the Redis event sink, stores the
   result and releases the lease.

The per-process background work lives here too: renewing leases, re-enqueueing jobs
whose worker died (the reaper), and the cancel listener.

Shutting down (:meth:`Service.drain`, on the worker's SIGTERM): running jobs get a grace
period to finish; every job still running after it, and any job that starts during the
drain, is handed off: its lease is given up (it stays listed as running), its run stops
without a terminal event, and the reaper re-enqueues it for another worker, whose rerun
publishes ``restarted`` and continues the seq.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from settings import Settings
from worker.agents import Agent
from worker.clock import CancelToken, Clock, Deadline
from worker.control import CancelListener
from worker.cooldown import Pin, PinAtStart
from worker.dead import DeadLetter, record
from worker.errors import (
    InternalError,
    InvalidJob,
    InvalidMessage,
    JobError,
    RelieverError,
    UnknownAgent,
)
from worker.events import TERMINAL_TYPES, Event, EventSink, result_of
from worker.jobs import Job, is_job_id, parse_job
from worker.keys import Keys
from worker.lease import Lease, Leases
from worker.observer import observe, observe_dead_letter, observe_rejected
from worker.redis_events import LeaseLost, RedisEventLog
from worker.retry import through_outage
from worker.runtime import Runtime

log = logging.getLogger(__name__)


class ReapIncomplete(Exception):
    """Some lost jobs could not be re-enqueued this time (they stay listed)."""


Progress = Callable[[Event], None]
Enqueue = Callable[[dict[str, Any]], None]


class ProgressSink:
    """Forwards events, and reports each ``attempt`` (model, attempt number) to ``progress``."""

    def __init__(self, inner: EventSink, progress: Progress) -> None:
        self._inner = inner
        self._progress = progress

    def emit(self, body: Event) -> Event:
        event = self._inner.emit(body)
        if body["type"] == "attempt":
            self._progress(event)
        return event

    def close(self) -> None:
        self._inner.close()


def job_id_of(raw: Any, task_id: str) -> str:
    """The job's id: the one in the message when it is usable, else the task's."""
    if isinstance(raw, dict):
        candidate = raw.get("job_id")
        if is_job_id(candidate):
            return candidate
    return task_id


class Service:
    """A worker process's job runner and background duties.

    Args:
        runtime: the process's runtime.
        enqueue: sends a job message to the queue again (used by the reaper).
    """

    def __init__(
        self,
        runtime: Runtime,
        enqueue: Enqueue,
        *,
        restore_orphans: Callable[[], list[str]] | None = None,
    ) -> None:
        self.runtime = runtime
        settings = runtime.settings
        self.leases = Leases(runtime.redis, runtime.keys, ttl_s=settings.lease_ttl_s)
        self.cancels = CancelListener(runtime.redis, runtime.keys)
        self._enqueue = enqueue
        self._restore_orphans = restore_orphans
        self._draining = threading.Event()
        self._released = threading.Condition()
        self._reaping = threading.Lock()

    def start(self) -> None:
        """Start the cancel listener and the lease keeper (which also reaps)."""
        self.cancels.start()
        self.leases.start(reap=self.reap)

    def stop(self) -> None:
        self.leases.stop()
        self.cancels.stop()

    def drain(self, grace_s: float) -> list[str]:
        """Let running jobs finish for up to ``grace_s``, then hand off the rest.

        From the call on, a job that takes its lease is handed off at once. Returns the ids
        of the jobs handed off; each is re-enqueued before this returns (or, if that
        failed, left listed for any worker's reaper within a lease TTL).
        """
        self._draining.set()
        ends = time.monotonic() + grace_s
        with self._released:
            while self.leases.held() and (left := ends - time.monotonic()) > 0:
                self._released.wait(left)
        handed = [job_id for job_id in self.leases.held() if self._hand_off(job_id)]
        self.reap()
        return handed

    def _hand_off(self, job_id: str) -> bool:
        try:
            if not self.leases.hand_off(job_id):
                return False
        except redis.RedisError as exc:
            # Its lease stands and is renewed: the run goes on here until the process
            # ends, and then its lease lapses and any worker's reaper takes the job.
            log.warning("job %s: could not be handed off (%s)", job_id, type(exc).__name__)
            return False
        log.warning("job %s: this worker is shutting down; handing the job off", job_id)
        return True

    def reap(self) -> None:
        """Re-enqueue the jobs whose worker died: leased ones whose lease lapsed before
        they ended, and messages taken by a worker that died before leasing their job.

        One reap at a time in a process (the reaper thread, the drain, a job handed off as
        it starts). A job is unlisted only once its message is back on the queue.
        """
        with self._reaping:
            failures = 0
            for message in self.leases.claim_lost():
                job_id = str(message.get("job_id"))
                log.warning("job %s lost its worker; re-enqueueing it", job_id)
                try:
                    self._enqueue(message)
                except Exception:
                    failures += 1
                    log.exception("job %s: re-enqueueing failed; the next reap retries", job_id)
                    self.leases.unclaim(job_id)
                    continue
                self.leases.requeued(job_id)
            if self._restore_orphans is not None:
                for job_id in self._restore_orphans():
                    log.warning("job %s: its worker died before starting it; restored", job_id)
            if failures:
                raise ReapIncomplete(f"{failures} lost job(s) could not be re-enqueued")

    def claimed(self, job_ids: list[str]) -> list[bool]:
        """For each job, whether a run leases it, it is listed as running, or it ended."""
        rt = self.runtime
        pipe = rt.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(rt.keys.lease(job_id), rt.keys.result(job_id))
            pipe.hexists(rt.keys.running(), job_id)
        replies = pipe.execute()
        return [bool(a) or bool(b) for a, b in zip(replies[::2], replies[1::2], strict=True)]

    def run(
        self, raw: Any, *, task_id: str, progress: Progress | None = None
    ) -> dict[str, Any] | None:
        """Run one delivered job message; None when it was a duplicate and was dropped."""
        rt = self.runtime
        job_id = job_id_of(raw, task_id)
        message = {**raw, "job_id": job_id} if isinstance(raw, dict) else raw
        try:
            job = parse_job(message, max_bytes=rt.settings.max_job_bytes)
            agent = rt.agents.get(job.agent)
            if agent is None:
                raise UnknownAgent(f"agent {job.agent!r} is not defined in the agents file")
        except (InvalidJob, UnknownAgent) as exc:
            return self._reject(job_id, exc)

        cancel = CancelToken()
        # Registered before the lease is taken, which reads the cancel key: a cancel
        # published from here on reaches the token, and one published before is in the key.
        self.cancels.register(job_id, cancel)
        try:
            lease = self._acquire(job_id, message, cancel, rt.keys.cooldown(agent.name))
            if lease is None:
                log.info("job %s is running elsewhere; dropping this delivery", job_id)
                return None
            if self._draining.is_set() and self._hand_off(job_id):
                try:
                    self.reap()
                except Exception:
                    # The job stays listed: any worker's reaper re-enqueues it.
                    log.exception("job %s: handed off, not yet re-enqueued", job_id)
                return None
            if lease.cancelled:
                cancel.cancel()
            return self._run_leased(job, agent, lease, cancel, progress)
        finally:
            self.cancels.unregister(job_id, cancel)

    def _acquire(
        self, job_id: str, message: dict[str, Any], cancel: CancelToken, read_key: str
    ) -> Lease | None:
        """Take the job's lease, waiting out a Redis outage.

        The job's message stays unacknowledged meanwhile, so nothing is lost whatever
        happens to this process. A try whose reply was lost may have taken the lease: the
        next try then finds it held and drops this delivery, and that lease, renewed by
        nobody, lapses, so the reaper re-enqueues the job.
        """

        def warn(exc: BaseException) -> None:
            log.warning(
                "job %s: Redis does not answer (%s); waiting to start it",
                job_id,
                type(exc).__name__,
            )

        return through_outage(
            lambda: self.leases.acquire(job_id, message, on_lost=cancel.cancel, read_key=read_key),
            warn,
        )

    def _run_leased(
        self,
        job: Job,
        agent: Agent,
        lease: Lease,
        cancel: CancelToken,
        progress: Progress | None,
    ) -> dict[str, Any] | None:
        """Run the job under its lease; release the lease once the job ended or moved on.

        Redis failing under the run (an outage, or a refused write) leaves the job to the
        reaper: the lease is no longer
        renewed, but not released, so it lapses with the job still listed as running, and
        the job is re-enqueued within a lease TTL plus a reap interval. A job is never
        let go without a terminal event in its log.
        """
        job_id = job.job_id
        try:
            result = self._run(job, agent, lease, cancel, progress)
        except redis.RedisError as exc:
            # Not answering, or refusing writes (out of memory, read-only): the run may
            # have no terminal event, so it must not let the job go.
            self.leases.abandon(job_id, lease.token)
            log.warning(
                "job %s: Redis failed under the run (%s); it will be re-enqueued once its "
                "lease lapses",
                job_id,
                type(exc).__name__,
            )
            return None
        finally:
            if self.leases.holds(job_id, lease.token):
                self.leases.release(job_id, lease.token)
            with self._released:
                self._released.notify_all()
        return result

    def _run(
        self,
        job: Job,
        agent: Agent,
        lease: Lease,
        cancel: CancelToken,
        progress: Progress | None,
    ) -> dict[str, Any] | None:
        """Run the job under its lease: its stored result if it ended, else the chain."""
        rt = self.runtime
        job_id = job.job_id
        try:
            ended = self._ended(job_id, lease)
            if ended is not None:
                return ended
            try:
                sink, first_n, deadline = self._start(job, lease)
            except redis.RedisError:
                raise  # Redis's fault, not a bug: the caller leaves the job to the reaper
            except Exception:
                # A bug before the chain began: the job still ends, once, fenced by the
                # lease; the traceback goes on to the logs and Sentry.
                self._fail_internal(job_id, lease)
                raise
            events: EventSink = sink if progress is None else ProgressSink(sink, progress)
            events = observe(events, agent, rt.clock)
            outcome = rt.executor.run(
                job,
                agent,
                events,
                cancel=cancel,
                deadline=deadline,
                first_n=first_n,
                pin_at_start=PinAtStart(
                    None if lease.read_value is None else Pin.from_json(lease.read_value)
                ),
            )
            sink.close()
            result = outcome.result()
            self._store(job_id, result)
            return result
        except LeaseLost:
            log.warning("job %s: another worker took it over; this run stops", job_id)
            return None

    def _start(self, job: Job, lease: Lease) -> tuple[RedisEventLog, int, Deadline | None]:
        """The run's event sink, the attempts a lost run published, and the deadline.

        A job that published before (a rerun) says ``restarted`` first.
        """
        rt = self.runtime
        sink = RedisEventLog(
            rt.redis,
            rt.keys,
            job.job_id,
            rt.clock,
            ttl_s=rt.settings.event_ttl,
            lease_token=lease.token,
            flush_window_s=rt.settings.delta_flush_ms / 1000.0,
            last_seq=lease.last_seq,
        )
        first_n = 0
        if sink.last_seq > 0:
            first_n = self._attempts_so_far(job.job_id)
            sink.emit({"type": "restarted", "discard": True})
        return sink, first_n, self._deadline(job)

    def _fail_internal(self, job_id: str, lease: Lease) -> None:
        rt = self.runtime
        sink = RedisEventLog(
            rt.redis,
            rt.keys,
            job_id,
            rt.clock,
            ttl_s=rt.settings.event_ttl,
            lease_token=lease.token,
        )
        error = InternalError("internal error in the worker")
        event = sink.emit({"type": "failed", "error": error.info(), "attempts": []})
        self._store(job_id, result_of(event))

    def _ended(self, job_id: str, lease: Lease) -> dict[str, Any] | None:
        """The result of a job that already ended (read with the lease).

        A worker can die between publishing the terminal event and storing the result; the
        rerun then finds the terminal event in the log and must not run the job again.
        """
        if lease.result is not None:
            log.info("job %s already ended; returning its stored result", job_id)
            stored: dict[str, Any] = json.loads(lease.result)
            return stored
        if lease.last_event is not None:
            last: Event = json.loads(lease.last_event)
            if last.get("type") in TERMINAL_TYPES:
                result = result_of(last)
                self._store(job_id, result)
                return result
        return None

    def _attempts_so_far(self, job_id: str) -> int:
        """The highest attempt number a lost run published, so a rerun's ``n`` goes on."""
        rt = self.runtime
        highest = 0
        entries: Any = rt.redis.xrange(rt.keys.log(job_id))
        for _entry_id, fields in entries:
            event = json.loads(fields[b"e"])
            if event.get("type") == "attempt":
                highest = max(highest, int(event["n"]))
        return highest

    def _deadline(self, job: Job) -> Deadline | None:
        """The job's one deadline, fixed when its first run started (a rerun keeps it)."""
        if job.deadline_s is None:
            return None
        rt = self.runtime
        key = rt.keys.deadline(job.job_id)
        mine = rt.clock.time() + job.deadline_s
        earlier: Any = rt.redis.set(
            key, repr(mine), nx=True, get=True, ex=int(job.deadline_s) + rt.settings.event_ttl
        )
        at_epoch = mine if earlier is None else float(earlier)
        return Deadline(rt.clock, rt.clock.monotonic() + (at_epoch - rt.clock.time()))

    def dead_letter(self, letter: DeadLetter) -> None:
        """Record a broker message no worker can run; end its job if an id was readable."""
        rt = self.runtime
        observe_dead_letter(letter)
        record(rt.redis, rt.keys, letter, rt.clock.time())
        job_id = letter.fail_id
        if job_id is not None:
            self._fail_unstarted(job_id, InvalidMessage(f"the broker message: {letter.detail}"))

    def _fail_unstarted(self, job_id: str, error: JobError) -> dict[str, Any] | None:
        """End a job that never ran with ``failed``; its result. None, and nothing
        written, for a job that ran or runs: a broken copy of its message, or one met by
        a worker whose agents file differs, changes nothing of it."""
        rt = self.runtime
        token = self.leases.lock(job_id)
        if token is None:
            return None
        try:
            if rt.redis.exists(rt.keys.seq(job_id), rt.keys.result(job_id)) or rt.redis.hexists(
                rt.keys.running(), job_id
            ):
                # It published, ended, or waits (listed) for a reaper to re-enqueue it.
                return None
            ttl_s = rt.settings.event_ttl
            sink = RedisEventLog(
                rt.redis, rt.keys, job_id, rt.clock, ttl_s=ttl_s, lease_token=token
            )
            result = result_of(sink.emit({"type": "failed", "error": error.info(), "attempts": []}))
            self._store(job_id, result)
            return result
        finally:
            self.leases.unlock(job_id, token)

    def _reject(self, job_id: str, error: JobError) -> dict[str, Any] | None:
        observe_rejected(job_id, error)
        return self._fail_unstarted(job_id, error)

    def _store(self, job_id: str, result: dict[str, Any]) -> None:
        store_result(self.runtime.redis, self.runtime.keys, self.runtime.settings, job_id, result)


def fail_job(
    client: redis.Redis,
    keys: Keys,
    clock: Clock,
    settings: Settings,
    job_id: str,
    error: RelieverError,
) -> dict[str, Any]:
    """End a job that cannot run with its one terminal event, ``failed``; its result."""
    sink = RedisEventLog(client, keys, job_id, clock, ttl_s=settings.event_ttl)
    event = sink.emit({"type": "failed", "error": error.info(), "attempts": []})
    result = result_of(event)
    store_result(client, keys, settings, job_id, result)
    return result


def store_result(
    client: redis.Redis, keys: Keys, settings: Settings, job_id: str, result: dict[str, Any]
) -> None:
    client.set(keys.result(job_id), json.dumps(result), ex=settings.result_expires_s)
