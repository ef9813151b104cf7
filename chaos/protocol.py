"""reliever's wire protocol, spoken as a web app in any language speaks it (docs/protocol.md).

A job is enqueued as a Celery message (protocol 2, JSON) pushed straight onto the queue
the way kombu's Redis transport stores it: ``LPUSH {queue} <envelope>``, the envelope a
JSON object whose ``body`` is the base64 of ``[args, kwargs, embed]``. The malformed
catalogue builds broken envelopes with the same functions. Events are read back from the
replay log ``{p}:log:{job}`` (entries with ``s`` = seq and ``e`` = the event JSON).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import uuid
from collections.abc import Mapping
from typing import Any

import redis

from worker.jobs import JOB_ID_PATTERN

TASK = "reliever.complete"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
ORIGIN = f"chaos@{socket.gethostname()}"
_JOB_ID = re.compile(JOB_ID_PATTERN)


def body_json(args: Any, kwargs: Any = None, embed: Any = EMBED) -> bytes:
    """A protocol-2 body: ``[args, kwargs, embed]`` as JSON (NaN and Infinity allowed)."""
    return json.dumps([args, {} if kwargs is None else kwargs, embed]).encode()


def argsrepr(job: Any) -> str:
    """What the protocol asks a sender to show of a job: its id and agent only (each cut
    to 100 characters: a fuzzed agent can be a megabyte)."""
    if isinstance(job, dict):
        job_id, agent = (repr(job.get(k))[:100] for k in ("job_id", "agent"))
        return f"(job_id={job_id}, agent={agent})"
    return "(invalid job)"


def envelope(
    body: bytes,
    *,
    task_id: str | None,
    queue: str,
    task: str = TASK,
    content_type: str = "application/json",
    content_encoding: str = "utf-8",
    shown: str | None = "(chaos)",
    headers: Mapping[str, Any] | None = None,
    properties: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The message kombu's Redis transport stores, as docs/protocol.md spells it.

    ``task_id`` None leaves the id out (of the headers and the correlation id); ``shown``
    None leaves ``argsrepr`` out. ``headers`` and ``properties`` are merged over the
    documented ones.
    """
    head: dict[str, Any] = {
        "lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
        "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
        "shadow": None, "ignore_result": False, "kwargsrepr": "{}", "origin": ORIGIN,
    }  # fmt: skip
    if shown is not None:
        head["argsrepr"] = shown
    props: dict[str, Any] = {
        "correlation_id": task_id,
        "reply_to": "",
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": queue},
        "priority": 0,
        "body_encoding": "base64",
        "delivery_tag": str(uuid.uuid4()),
    }
    if task_id is None:
        del head["id"], head["root_id"], props["correlation_id"]
    head.update(headers or {})
    props.update(properties or {})
    return {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": head,
        "properties": props,
    }


def job_message(job: Any, *, task_id: str, queue: str) -> dict[str, Any]:
    """The documented message of one job (any JSON value), under ``task_id``."""
    return envelope(body_json([job]), task_id=task_id, queue=queue, shown=argsrepr(job))


def push(client: redis.Redis, queue: str, message: Mapping[str, Any] | bytes) -> None:
    """``LPUSH`` a message (an envelope, or raw bytes for a broken one) onto the queue."""
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    client.lpush(queue, raw)


def submit(client: redis.Redis, queue: str, job: Any, task_id: str) -> str:
    """Enqueue ``job`` under ``task_id``; the id its events will carry."""
    push(client, queue, job_message(job, task_id=task_id, queue=queue))
    return expected_job_id(job, task_id)


def expected_job_id(job: Any, task_id: str) -> str:
    """The job's id by the protocol: its ``job_id`` when that is a valid id, else the task's."""
    if isinstance(job, dict):
        candidate = job.get("job_id")
        if isinstance(candidate, str) and _JOB_ID.match(candidate):
            return candidate
    return task_id


def log_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:log:{job_id}"
