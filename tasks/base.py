"""The task base class: a lazily built, per-process :class:`~worker.service.Service`."""

from __future__ import annotations

import _thread
import json
import logging
import threading
from typing import Any

import redis
from celery import Task
from celery.events.dispatcher import EventDispatcher
from kombu import Connection

from settings import Settings, get_settings
from tasks.progress import StateReporter
from worker.clock import SystemClock
from worker.errors import ConfigError
from worker.keys import Keys
from worker.orphans import OrphanSweep
from worker.runtime import build_runtime
from worker.service import Service, fail_job, job_id_of

log = logging.getLogger(__name__)


class RelieverTask(Task[Any, Any]):
    """Holds the process's service, built once per worker process.

    For the threads and gevent pools, where the worker is one process: the service starts
    at ``worker_ready`` (idle workers reap and listen for cancels too) or on first use.
    """

    # Flower shows a finished task's result repr: keep it to the outcome (job id, status,
    # model, finish, usage …); the answer text comes last in the result and is cut off.
    resultrepr_maxsize = 200
    _service: Service | None = None
    _reporter: StateReporter | None = None
    _dispatcher: EventDispatcher | None = None
    _fallback_redis: redis.Redis | None = None
    _orphans: OrphanSweep | None = None
    _orphan_connection: Connection | None = None
    _orphans_lock = threading.Lock()
    _drained: threading.Event | None = None
    _service_lock = threading.Lock()
    node: str | None = None
    """The worker's node name (for the events the reporter sends), from its first job."""

    @property
    def service(self) -> Service:
        if self._service is None:
            with self._service_lock:
                if self._service is None:
                    settings: Settings = getattr(self.app, "settings", None) or get_settings()
                    service = Service(
                        build_runtime(settings),
                        enqueue=self.requeue,
                        restore_orphans=self.restore_orphans,
                    )
                    service.start()
                    self._service = service
        return self._service

    def fail_unconfigured(self, job: Any, task_id: str, error: ConfigError) -> dict[str, Any]:
        """The service cannot be built (the configuration broke after the worker started):
        end the job with its one terminal event, ``failed`` with kind ``config``."""
        settings: Settings = getattr(self.app, "settings", None) or get_settings()
        job_id = job_id_of(job, task_id)
        log.error("job %s failed: the worker's configuration is broken: %s", job_id, error)
        with self._service_lock:
            if self._fallback_redis is None:
                self._fallback_redis = redis.Redis.from_url(
                    settings.redis_url, socket_timeout=5.0, socket_connect_timeout=5.0
                )
        keys = Keys(settings.key_prefix)
        return fail_job(self._fallback_redis, keys, SystemClock(), settings, job_id, error)

    @property
    def progress_reporter(self) -> StateReporter:
        """The process's writer of the RUNNING states Flower shows."""
        if self._reporter is None:
            with self._service_lock:
                if self._reporter is None:
                    self._reporter = StateReporter(self.write_running)
        return self._reporter

    def write_running(self, task_id: str, meta: dict[str, Any]) -> None:
        """Store the RUNNING state and tell Flower (in the reporter's thread)."""
        self.update_state(task_id=task_id, state=RUNNING, meta=meta)
        # Flower knows tasks only from events, and update_state sends none: a custom
        # `task-running` event makes its state RUNNING. Flower's API and task page show
        # only the standard fields, so the meta rides in `result` (as JSON), which is
        # also what AsyncResult.info holds for a custom state.
        self._running_events().send("task-running", uuid=task_id, result=json.dumps(meta))

    def _running_events(self) -> EventDispatcher:
        """The reporter thread's event dispatcher: one connection, kept (call it only there)."""
        if self._dispatcher is None:
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=self.node, enabled=True
            )
        return self._dispatcher

    def restore_orphans(self) -> list[str]:
        """Put back the messages of workers that died before leasing their job (in the
        reaper's thread, on a broker connection of its own)."""
        service = self._service
        if service is None:
            return []
        with self._orphans_lock:
            if self._orphans is None:
                self._orphan_connection = self.app.connection_for_write()
                self._orphans = OrphanSweep(
                    self._orphan_connection.default_channel,
                    service.claimed,
                    older_than_s=service.runtime.settings.lease_ttl_s,
                )
            try:
                return self._orphans.sweep()
            except Exception:
                # A fresh connection at the next reap (the broker may have restarted).
                self._close_orphan_connection()
                raise

    def _close_orphan_connection(self) -> None:
        if self._orphan_connection is not None:
            self._orphan_connection.close()
        self._orphan_connection = None
        self._orphans = None

    def requeue(self, message: dict[str, Any]) -> None:
        """Send a job message again, under its job id, to the job queue."""
        self.app.send_task(
            self.name,
            args=(message,),
            task_id=message["job_id"],
            argsrepr=argsrepr(message),
            kwargsrepr="{}",
        )

    def start_drain(self) -> None:
        """The worker is shutting down: :meth:`drain` in a thread of its own, which
        :meth:`shutdown` waits for (bounded) before the process goes.

        Called in a signal handler: not ``threading.Thread(...).start()``, which waits for
        the thread to start, and a handler on gevent's hub must not block
        (BlockingSwitchOutError).
        """
        if self._drained is None:
            self._drained = threading.Event()
            _thread.start_new_thread(self.drain, ())

    def drain(self) -> None:
        """Let jobs finish for ``drain_s``, hand off the rest, re-enqueue them."""
        try:
            service = self._service
            if service is None:
                return
            grace_s = service.runtime.settings.drain_s
            log.info("shutting down: running jobs have %ss to finish, then move on", grace_s)
            handed = service.drain(grace_s)
            if handed:
                log.warning("handed %d job(s) off to other workers: %s", len(handed), handed)
        except Exception:
            # Whatever was not re-enqueued is still listed as running: once this process
            # is gone its leases lapse and another worker's reaper re-enqueues those jobs.
            log.exception("could not hand every job off; other workers will reap them")
        finally:
            if self._drained is not None:
                self._drained.set()

    def shutdown(self) -> None:
        if self._drained is not None:
            # The drain re-enqueues what it handed off: the process waits for it.
            self._drained.wait(DRAIN_FINISH_S)
        if self._reporter is not None:
            self._reporter.stop()
            self._reporter = None
        if self._dispatcher is not None:
            # The reporter thread is gone: nothing else uses its dispatcher.
            connection = self._dispatcher.connection
            self._dispatcher.close()
            if connection is not None:
                connection.close()
            self._dispatcher = None
        if self._service is not None:
            self._service.stop()
            self._service.runtime.close()
            self._service = None
        with self._orphans_lock:
            self._close_orphan_connection()
        if self._fallback_redis is not None:
            self._fallback_redis.close()
            self._fallback_redis = None


DRAIN_FINISH_S = 30.0
"""The longest a stopping worker waits for its drain to re-enqueue what it handed off."""

RUNNING = "RUNNING"
"""The custom state Flower shows while a job runs; its meta names the model and attempt."""


def argsrepr(message: Any) -> str:
    """What Flower and the logs show of a job: its id and agent, never its messages."""
    if isinstance(message, dict):
        return f"(job_id={message.get('job_id')!r}, agent={message.get('agent')!r})"
    return "(invalid job)"
