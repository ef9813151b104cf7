"""The task ``reliever.complete``: one JSON job in, the job's result out."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.exceptions import Ignore

from tasks.base import RelieverTask
from worker.errors import ConfigError
from worker.events import Event

PROGRESS_FLUSH_S = 5.0
"""The longest a finished job waits for its RUNNING state being written to land."""


@shared_task(bind=True, base=RelieverTask, name="reliever.complete")
def complete(self: RelieverTask, job: Any) -> dict[str, Any]:
    """Run ``job`` through its agent's chain; return its result (``status`` says how it ended)."""
    # Captured here: Celery's request context belongs to this thread, not the reporter's.
    task_id = str(self.request.id)
    if self.node is None:
        self.node = self.request.hostname
    agent = job.get("agent") if isinstance(job, dict) else None

    def progress(event: Event) -> None:
        self.progress_reporter.report(
            task_id,
            {
                "job_id": event["job_id"],
                "model": event["model"],
                "attempt": event["attempt"],
                "n": event["n"],
                "fallback": event["fallback"],
                "agent": agent,
            },
        )

    try:
        service = self.service
    except ConfigError as exc:
        return self.fail_unconfigured(job, task_id, exc)
    try:
        result = service.run(job, task_id=task_id, progress=progress)
    finally:
        # Celery writes the final state after we return: a RUNNING being written must
        # land first, or it would overwrite SUCCESS; one not yet written is dropped.
        self.progress_reporter.finish(task_id, PROGRESS_FLUSH_S)
    if result is None:
        # A duplicate delivery of a job that runs elsewhere: no result of ours to store.
        raise Ignore()
    return result
