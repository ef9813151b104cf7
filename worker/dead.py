"""Broker messages no worker can run, vetted before Celery sees them and dead-lettered.

A message is vetted twice. The broker transport (``worker.broker``) checks the envelope it
pops from the queue list (JSON, the fields kombu needs, a size bound) and replaces one it
cannot use by a stand-in envelope that carries the reason and a copy of the raw bytes
(:func:`stand_in`); the consumer (``worker.consumer``) then checks every message
(:func:`vet`): the stand-in's reason, the task name, the content type, and the body's
shape (``[args, kwargs, embed]``, one job argument). A message that fails is acknowledged
off the queue, never retried, and recorded in ``{p}:dead`` (a list, newest first, at most
:data:`DEAD_MAX` entries): the reason, the ids that could be read, the size, and the
first :data:`COPY_BYTES` of the message, base64. Neither the copy nor any part of the body
is ever logged. When a job id (or a task id usable as one) can be read, the job ends
with one ``failed`` event of kind ``invalid_message``, so its reader does not wait
forever.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from worker.jobs import is_job_id
from worker.keys import Keys

DEAD_MAX = 1000
"""The dead-letter list keeps this many messages, newest first."""
COPY_BYTES = 8192
"""How much of a dead message is kept (base64 in the entry)."""
DEAD_TTL_S = 7 * 86_400
"""The list's lifetime after its last entry."""
TASK_NAME = "reliever.complete"
INVALID_HEADER = "x-reliever-invalid"
"""The header of a stand-in envelope: why the transport could not use the message."""
INVALID_CONTENT_TYPE = "application/x-reliever-invalid"
MAX_ID_LEN = 200


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Why a message cannot run, and what could be read of it."""

    reason: str
    """A short code: ``undecodable``, ``bad_envelope``, ``too_large``, ``unknown_task``,
    ``content_disallowed``, ``bad_body``, ``bad_arguments`` or ``unrunnable``."""
    detail: str
    """What is wrong, in words that quote nothing of the message."""
    raw: bytes
    task_id: str | None = None
    job_id: str | None = None
    queue: str | None = None
    size: int | None = None
    """The message's size, when ``raw`` holds only the start of it."""

    @property
    def fail_id(self) -> str | None:
        """The id of the job to end: the job's own, else the task's when usable as one."""
        for candidate in (self.job_id, self.task_id):
            if is_job_id(candidate):
                return candidate
        return None

    def entry(self, at: float) -> str:
        return json.dumps(
            {
                "reason": self.reason,
                "detail": self.detail,
                "task_id": self.task_id,
                "job_id": self.job_id,
                "queue": self.queue,
                "at": at,
                "size": len(self.raw) if self.size is None else self.size,
                "copy_b64": base64.b64encode(self.raw[:COPY_BYTES]).decode("ascii"),
            }
        )


def record(client: redis.Redis, keys: Keys, letter: DeadLetter, at: float) -> None:
    """Add ``letter`` to the dead-letter list, keeping it bounded."""
    pipe = client.pipeline(transaction=True)
    pipe.lpush(keys.dead(), letter.entry(at))
    pipe.ltrim(keys.dead(), 0, DEAD_MAX - 1)
    pipe.expire(keys.dead(), DEAD_TTL_S)
    pipe.execute()


def _short_id(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LEN and value.isprintable():
        return value
    return None


# --- the transport's check of the envelope it popped -------------------------------------


def _envelope_problem(envelope: Any) -> str | None:
    """What keeps kombu or Celery from taking ``envelope``; None when nothing."""
    if not isinstance(envelope, dict):
        return "the envelope is not a JSON object"
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no properties"
    tag = properties.get("delivery_tag")
    if isinstance(tag, bool) or not isinstance(tag, str | int):
        return "the envelope has no delivery tag"
    info = properties.get("delivery_info")
    if not (
        isinstance(info, dict)
        and isinstance(info.get("exchange"), str)
        and isinstance(info.get("routing_key"), str)
    ):
        return "the envelope has no delivery info"
    if properties.get("body_encoding", "base64") != "base64":
        return "the envelope's body encoding is not base64"
    if not isinstance(envelope.get("headers"), dict):
        return "the envelope's headers are not an object"
    for name in ("content-type", "content-encoding"):
        if not isinstance(envelope.get(name), str | None):
            return f"the envelope's {name} is not a string"
    body = envelope.get("body")
    if body is None or body == "":
        return None
    if not isinstance(body, str):
        return "the envelope's body is not a string"
    try:
        base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return "the envelope's body is not valid base64"
    return None


def vet_envelope(
    item: bytes,
    queue: str,
    max_bytes: int,
    *,
    decode: Callable[[bytes], Any],
    build: Callable[[Any], object],
) -> bytes:
    """``item`` when kombu can take it, else a stand-in that can.

    ``decode`` and ``build`` are what the transport does next with the item (kombu's
    JSON decoder, its message class): the item is tried with them, so that nothing it
    holds can raise later, where it would end the consumer and lose the message.
    """
    try:
        envelope = decode(item)
    except Exception:  # noqa: BLE001 - whatever kombu's decoder raises on hostile bytes
        return stand_in(item, queue, "undecodable", "the message is not JSON")
    task_id = None
    if isinstance(envelope, dict) and isinstance(envelope.get("headers"), dict):
        task_id = _short_id(envelope["headers"].get("id"))
    if len(item) > max_bytes:
        detail = f"the message is over {max_bytes} bytes"
        return stand_in(item, queue, "too_large", detail, task_id=task_id)
    problem = _envelope_problem(envelope)
    if problem is None:
        try:
            build(envelope)
        except Exception as exc:  # noqa: BLE001 - the trial is there to catch anything
            problem = f"kombu cannot take the envelope ({type(exc).__name__})"
    if problem is None:
        return item
    return stand_in(item, queue, "bad_envelope", problem, task_id=task_id)


def stand_in(
    raw: bytes, queue: str, reason: str, detail: str, *, task_id: str | None = None
) -> bytes:
    """An envelope kombu and Celery accept, saying why ``raw`` could not be used."""
    return json.dumps(
        {
            "body": base64.b64encode(raw[:COPY_BYTES]).decode("ascii"),
            "content-encoding": "binary",
            "content-type": INVALID_CONTENT_TYPE,
            "headers": {
                "id": task_id,
                INVALID_HEADER: reason,
                "x-reliever-detail": detail,
                "x-reliever-size": len(raw),
            },
            "properties": {
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
            },
        }
    ).encode()


# --- the consumer's check of every message ----------------------------------------------


def _raw_of(message: Any) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8", "surrogatepass")
    return b""


def job_id_in_body(body: Any, task_id: str | None) -> str | None:
    """The job id a message body (``[args, kwargs, embed]``) names when usable, else the
    task's; None when neither is."""
    job = None
    if isinstance(body, list | tuple) and body and isinstance(body[0], list | tuple) and body[0]:
        job = body[0][0]
    own = job.get("job_id") if isinstance(job, Mapping) else None
    for candidate in (own, task_id):
        if is_job_id(candidate):
            return candidate
    return None


def letter_for(message: Any, reason: str, detail: str, job_id: str | None = None) -> DeadLetter:
    """The dead letter of ``message`` (a kombu message): its bytes and readable ids."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    return DeadLetter(
        reason,
        detail,
        _raw_of(message),
        _short_id(headers.get("id")),
        job_id,
        _short_id(info.get("routing_key")),
    )


def vet(message: Any, max_bytes: int) -> DeadLetter | None:
    """Why Celery must not get ``message`` (a kombu message); None when it may."""
    headers = message.headers if isinstance(message.headers, dict) else {}

    def dead(reason: str, detail: str, job_id: str | None = None) -> DeadLetter:
        return letter_for(message, reason, detail, job_id)

    invalid = headers.get(INVALID_HEADER)
    if invalid is not None:
        # A stand-in: its body is the copy, its size header the original's size.
        size = headers.get("x-reliever-size")
        letter = dead(str(invalid), str(headers.get("x-reliever-detail", "")))
        return dataclasses.replace(letter, size=size if isinstance(size, int) else None)
    if not isinstance(message.headers, dict) or "task" not in headers:
        return dead("bad_envelope", "the message names no task (Celery protocol 2 headers)")
    if not isinstance(headers.get("id"), str):
        return dead("bad_envelope", "the message has no task id (Celery protocol 2 headers)")
    if headers["task"] != TASK_NAME:
        return dead("unknown_task", f"this worker runs only {TASK_NAME}")
    if message.content_type != "application/json":
        return dead("content_disallowed", "the message's content type is not application/json")
    if len(_raw_of(message)) > max_bytes:
        return dead("too_large", f"the message body is over {max_bytes} bytes")
    try:
        payload = message.payload
    except Exception as exc:  # noqa: BLE001 - kombu wraps decoding errors, but bodies are hostile
        # kombu raises the decoder's error again as a DecodeError, in its except block.
        if isinstance(exc.__context__ or exc, RecursionError):
            return dead("undecodable", "the message body is nested too deeply to decode")
        return dead("undecodable", "the message body is not JSON")
    if not (
        isinstance(payload, list | tuple)
        and len(payload) == 3
        and isinstance(payload[0], list | tuple)
        and isinstance(payload[1], dict)
        and isinstance(payload[2], dict | None)
    ):
        return dead("bad_body", "the message body is not [args, kwargs, embed]")
    args, kwargs, _embed = payload
    if len(args) != 1 or kwargs:
        return dead(
            "bad_arguments",
            f"{TASK_NAME} takes one argument, the job",
            job_id_in_body(payload, None),
        )
    return None


def lost_connection_errors(
    errors: tuple[type[BaseException], ...],
) -> tuple[type[BaseException], ...]:
    """The errors of ``errors`` (a transport's ``connection_errors``) that mean the
    connection is gone. kombu's Redis transport counts ``KeyError`` among them, which a
    malformed message raises too: that one is the message's fault, not the connection's."""
    return tuple(error for error in errors if not issubclass(error, LookupError))
