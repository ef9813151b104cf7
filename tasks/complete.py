"""The task ``reliever.complete``: one JSON job in, the job's result out."""

from __future__ import annotations

import json
from typing import Any

from celery import shared_task
from celery.exceptions import Ignore

from tasks.base import RelieverTask
from worker.events import Event

RUNNING = "RUNNING"
"""The custom state Flower shows while a job runs; its meta names the model and attempt."""


@shared_task(bind=True, base=RelieverTask, name="reliever.complete")
def complete(self: RelieverTask, job: Any) -> dict[str, Any]:
    """Run ``job`` through its agent's chain; return its result (``status`` says how it ended)."""

    def progress(event: Event) -> None:
        meta = {
            "job_id": event["job_id"],
            "model": event["model"],
            "attempt": event["attempt"],
            "n": event["n"],
            "fallback": event["fallback"],
            "agent": job.get("agent") if isinstance(job, dict) else None,
        }
        self.update_state(state=RUNNING, meta=meta)
        # Flower knows tasks only from events, and update_state sends none: a custom
        # `task-running` event makes its state RUNNING. Flower's API and task page show
        # only the standard fields, so the meta rides in `result` (as JSON), which is
        # also what AsyncResult.info holds for a custom state.
        self.send_event("task-running", result=json.dumps(meta))

    result = self.service.run(job, task_id=str(self.request.id), progress=progress)
    if result is None:
        # A duplicate delivery of a job that runs elsewhere: no result of ours to store.
        raise Ignore()
    return result
