"""The task base class: a lazily built, per-process :class:`~worker.service.Service`."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Task
from celery.events.dispatcher import EventDispatcher

from settings import Settings, get_settings
from worker.runtime import build_runtime
from worker.service import Service


class RelieverTask(Task[Any, Any]):
    """Holds the process's service, built once per worker process.

    For the threads and gevent pools, where the worker is one process: the service starts
    at ``worker_ready`` (idle workers reap and listen for cancels too) or on first use.
    """

    # Flower shows a finished task's result repr: keep it to the outcome (job id, status,
    # model, finish, usage …); the answer text comes last in the result and is cut off.
    resultrepr_maxsize = 200
    _service: Service | None = None
    _reporter: ThreadPoolExecutor | None = None
    _dispatcher: EventDispatcher | None = None
    _service_lock = threading.Lock()

    @property
    def service(self) -> Service:
        if self._service is None:
            with self._service_lock:
                if self._service is None:
                    settings: Settings = getattr(self.app, "settings", None) or get_settings()
                    service = Service(build_runtime(settings), enqueue=self.requeue)
                    service.start()
                    self._service = service
        return self._service

    @property
    def progress_reporter(self) -> ThreadPoolExecutor:
        """One thread per process that writes the RUNNING states Flower shows, in order."""
        if self._reporter is None:
            with self._service_lock:
                if self._reporter is None:
                    self._reporter = ThreadPoolExecutor(1, thread_name_prefix="reliever-state")
        return self._reporter

    def running_events(self, hostname: str | None) -> EventDispatcher:
        """The reporter thread's event dispatcher: one connection, kept (call it only there)."""
        if self._dispatcher is None:
            self._dispatcher = self.app.events.Dispatcher(
                self.app.connection_for_write(), hostname=hostname, enabled=True
            )
        return self._dispatcher

    def requeue(self, message: dict[str, Any]) -> None:
        """Send a job message again, under its job id, to the job queue."""
        self.app.send_task(
            self.name,
            args=(message,),
            task_id=message["job_id"],
            argsrepr=argsrepr(message),
            kwargsrepr="{}",
        )

    def shutdown(self) -> None:
        if self._reporter is not None:
            self._reporter.shutdown(wait=True)
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


def argsrepr(message: Any) -> str:
    """What Flower and the logs show of a job: its id and agent, never its messages."""
    if isinstance(message, dict):
        return f"(job_id={message.get('job_id')!r}, agent={message.get('agent')!r})"
    return "(invalid job)"
