"""The Python client for web apps: submit a job, follow its events, wait, cancel.

::

    client = Client("redis://127.0.0.1:6379/0")
    job = client.submit("support", [{"role": "user", "content": "Hello"}])
    for event in job.events():          # replay log first, then live, to the terminal event
        ...
    text = job.text(timeout=60)
    client.cancel(job.job_id)

Events are read from the job's replay log (a Redis Stream) with blocking ``XREAD``: a
reader that starts late, even after the job ended, gets every event from seq 1, once,
in order. Web apps in other languages use the task name, the JSON job and the event
schema directly (docs/protocol.md).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import redis
import redis.asyncio as aredis

from settings import Settings
from worker.control import request_cancel
from worker.events import TERMINAL_TYPES, Event, result_of
from worker.jobs import parse_job
from worker.keys import Keys

_BLOCK_MS = 1000
_BATCH = 500


class JobFailed(Exception):
    """The job ended ``failed``; ``error`` is its ``{kind, message, …}`` object."""

    def __init__(self, job_id: str, error: Mapping[str, Any]) -> None:
        super().__init__(f"job {job_id} failed: {error.get('kind')}: {error.get('message')}")
        self.job_id = job_id
        self.error = dict(error)


class _Cursor:
    """Where a reader is in a job's replay log; turns XREAD replies into new events."""

    def __init__(self, stream: str, timeout: float | None) -> None:
        self._stream = stream
        self._last_id: Any = "0-0"
        self._last_seq = 0
        self._timeout = timeout
        self._ends = None if timeout is None else time.monotonic() + timeout
        self.done = False

    def streams(self) -> dict[bytes | str | memoryview, int | bytes | str | memoryview]:
        return {self._stream: self._last_id}

    def block_ms(self) -> int:
        if self._ends is None:
            return _BLOCK_MS
        return max(1, int(1000 * min(_BLOCK_MS / 1000, self._ends - time.monotonic())))

    def take(self, reply: Any) -> list[Event]:
        out: list[Event] = []
        for _name, entries in reply or []:
            for entry_id, fields in entries:
                self._last_id = entry_id
                event: Event = json.loads(fields[b"e"])
                if event["seq"] <= self._last_seq:
                    continue
                self._last_seq = event["seq"]
                out.append(event)
                if event["type"] in TERMINAL_TYPES:
                    self.done = True
                    return out
        if self._ends is not None and time.monotonic() >= self._ends:
            raise TimeoutError(f"{self._stream}: no terminal event within {self._timeout}s")
        return out


class Job:
    """A submitted job: its id, its events, its text and result."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._client = client
        self.job_id = job_id

    def __repr__(self) -> str:
        return f"Job({self.job_id!r})"

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every event from seq 1 to the terminal one, each exactly once.

        Raises:
            TimeoutError: ``timeout`` seconds passed before the terminal event.
        """
        cursor = _Cursor(self._client.keys.log(self.job_id), timeout)
        while not cursor.done:
            reply = self._client.redis.xread(
                cursor.streams(), count=_BATCH, block=cursor.block_ms()
            )
            yield from cursor.take(reply)

    async def aevents(self, timeout: float | None = None) -> AsyncIterator[Event]:
        """:meth:`events`, for asyncio (redis.asyncio)."""
        client = aredis.Redis.from_url(self._client.settings.redis_url)
        cursor = _Cursor(self._client.keys.log(self.job_id), timeout)
        try:
            while not cursor.done:
                reply = await client.xread(cursor.streams(), count=_BATCH, block=cursor.block_ms())
                for event in cursor.take(reply):
                    yield event
        finally:
            await client.aclose()

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The job's result (``status`` is ``completed`` or ``failed``)."""
        stored = self._client.redis.get(self._client.keys.result(self.job_id))
        if stored is not None:
            result: dict[str, Any] = json.loads(stored)
            return result
        for event in self.events(timeout=timeout):
            if event["type"] in TERMINAL_TYPES:
                return result_of(event)
        raise AssertionError("unreachable: events() ends at the terminal event")

    def text(self, timeout: float | None = None) -> str:
        """The final text.

        Raises:
            JobFailed: the job failed.
            TimeoutError: no terminal event within ``timeout``.
        """
        result = self.result(timeout=timeout)
        if result["status"] != "completed":
            raise JobFailed(self.job_id, result["error"])
        return str(result["text"])


class Client:
    """Submits jobs to reliever and follows them.

    Args:
        redis_url: where reliever's Redis is (broker and results default to it); None
            reads the ``RELIEVER_*`` settings.
        settings: explicit settings (overrides ``redis_url``).
    """

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        if settings is None:
            settings = Settings() if redis_url is None else Settings(redis_url=redis_url)
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self._app: Any = None
        self._app_lock = threading.Lock()

    def _celery(self) -> Any:
        with self._app_lock:
            if self._app is None:
                from worker.celery import create_app

                app = create_app(self.settings)
                # Results are read from reliever's keys (Job.result), never through
                # Celery's AsyncResult: without a result backend here, send_task does not
                # subscribe this process to each job's result channel (a SUBSCRIBE per
                # submit before the job is queued, an UNSUBSCRIBE when the AsyncResult
                # is collected, and a pub/sub connection held open).
                app.conf.update(result_backend=None)
                self._app = app
            return self._app

    def submit(
        self,
        agent: str,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        params: Mapping[str, Any] | None = None,
        deadline_s: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Validate and enqueue a job.

        Raises:
            InvalidJob: the job is malformed (checked here, before it is sent).
        """
        payload: dict[str, Any] = {
            "job_id": job_id or str(uuid.uuid4()),
            "agent": agent,
            "messages": [dict(m) for m in messages],
        }
        if tools is not None:
            payload["tools"] = [dict(t) for t in tools]
        if params is not None:
            payload["params"] = dict(params)
        if deadline_s is not None:
            payload["deadline_s"] = deadline_s
        if metadata is not None:
            payload["metadata"] = dict(metadata)
        parse_job(payload, max_bytes=self.settings.max_job_bytes)
        self._celery().send_task(
            "reliever.complete",
            args=(payload,),
            task_id=payload["job_id"],
            queue=self.settings.queue,
            argsrepr=f"(job_id={payload['job_id']!r}, agent={agent!r})",
            kwargsrepr="{}",
        )
        return Job(self, payload["job_id"])

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted earlier (by anyone)."""
        return Job(self, job_id)

    def cancel(self, job_id: str) -> None:
        """Cancel the job: a running one stops within 250 ms, a queued one never starts."""
        request_cancel(self.redis, self.keys, job_id)

    def close(self) -> None:
        self.redis.close()
        if self._app is not None:
            self._app.close()
