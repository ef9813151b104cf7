"""The task ``reliever.complete``: one JSON job in, the job's result out."""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, wait
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore

from tasks.base import RelieverTask
from worker.events import Event

log = logging.getLogger(__name__)

PROGRESS_FLUSH_S = 5.0
RUNNING = "RUNNING"
"""The custom state Flower shows while a job runs; its meta names the model and attempt."""


@shared_task(bind=True, base=RelieverTask, name="reliever.complete")
def complete(self: RelieverTask, job: Any) -> dict[str, Any]:
    """Run ``job`` through its agent's chain; return its result (``status`` says how it ended)."""

    reported: list[Future[None]] = []
    # Captured here: Celery's request context belongs to this thread, not the reporter's.
    task_id, hostname = str(self.request.id), self.request.hostname

    def report(event: Event) -> None:
        meta = {
            "job_id": event["job_id"],
            "model": event["model"],
            "attempt": event["attempt"],
            "n": event["n"],
            "fallback": event["fallback"],
            "agent": job.get("agent") if isinstance(job, dict) else None,
        }
        try:
            self.update_state(task_id=task_id, state=RUNNING, meta=meta)
            # Flower knows tasks only from events, and update_state sends none: a custom
            # `task-running` event makes its state RUNNING. Flower's API and task page show
            # only the standard fields, so the meta rides in `result` (as JSON), which is
            # also what AsyncResult.info holds for a custom state.
            self.running_events(hostname).send(
                "task-running", uuid=task_id, result=json.dumps(meta)
            )
        except Exception:
            # A state Flower shows must never fail the job it describes.
            log.exception("job %s: could not record its RUNNING state", task_id)

    def progress(event: Event) -> None:
        # Off the job's path: the job sends its request while the state is written.
        reported.append(self.progress_reporter.submit(report, event))

    try:
        result = self.service.run(job, task_id=task_id, progress=progress)
    finally:
        # Celery writes the final state after we return: a RUNNING still in flight must
        # land first, or it would overwrite SUCCESS.
        wait(reported, timeout=PROGRESS_FLUSH_S)
    if result is None:
        # A duplicate delivery of a job that runs elsewhere: no result of ours to store.
        raise Ignore()
    return result
