"""No broker message can stop a worker: each malformed one is dead-lettered, a readable id
gets its job a ``failed`` event, and the next valid job still runs.

Messages are pushed onto the queue list as a web app (or a broken one) in any language
would, in kombu's envelope or not at all; one real gevent worker consumes them.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest
import redis

from tests.http_support import wait_for
from tests.service_support import Stack
from worker.celery import create_app
from worker.keys import Keys
from worker.mockllm import MockLLM

CANARY = "CANARY-BODY-7f3a"


def envelope(
    body: bytes | None,
    *,
    queue: str,
    task: str | None = "reliever.complete",
    task_id: str | None = None,
    content_type: str = "application/json",
    properties: bool = True,
) -> bytes:
    headers: dict[str, Any] = {"lang": "py"}
    if task is not None:
        headers["task"] = task
    if task_id is not None:
        headers["id"] = task_id
    doc: dict[str, Any] = {
        "body": None if body is None else base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": headers,
    }
    if properties:
        doc["properties"] = {
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        }
    return json.dumps(doc).encode()


def job_body(job: Any, *extra_args: Any, kwargs: Any = None) -> bytes:
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([[job, *extra_args], kwargs or {}, embed]).encode()


def catalogue(queue: str) -> list[tuple[bytes, str, str | None]]:
    """(raw item, expected reason, id whose job must end ``failed``)."""
    job = {"agent": "support", "messages": [{"role": "user", "content": CANARY}]}
    return [
        (
            envelope(json.dumps({"a": CANARY}).encode(), queue=queue, task_id="bad-shape"),
            "bad_body",
            "bad-shape",
        ),
        (b"", "undecodable", None),
        (b"\x00\xff\x81\x80binary" + CANARY.encode(), "undecodable", None),
        (CANARY.encode() * (5 * 1024 * 1024 // len(CANARY)), "undecodable", None),
        (
            envelope(job_body({**job, "pad": "x" * 5 * 1024 * 1024}), queue=queue, task_id="huge"),
            "too_large",
            "huge",
        ),
        (b"[" * 100_000, "undecodable", None),
        (
            envelope(
                b"\x80\x04" + CANARY.encode(),
                queue=queue,
                task_id="pickled",
                content_type="application/x-python-serialize",
            ),
            "content_disallowed",
            "pickled",
        ),
        (
            envelope(job_body(job), queue=queue, task="no.such.task", task_id="unknown"),
            "unknown_task",
            "unknown",
        ),
        (
            envelope(json.dumps([[], {}, {}]).encode(), queue=queue, task_id="no-args"),
            "bad_arguments",
            "no-args",
        ),
        (
            envelope(job_body({**job, "job_id": "two-args"}, "extra"), queue=queue, task_id="t-2"),
            "bad_arguments",
            "two-args",
        ),
        (
            envelope(job_body(job), queue=queue, task_id="no-props", properties=False),
            "bad_envelope",
            "no-props",
        ),
        (
            envelope(b"{not json" + CANARY.encode(), queue=queue, task_id="bad-json"),
            "undecodable",
            "bad-json",
        ),
        (
            envelope(job_body(job), queue=queue, task=None, task_id="no-task"),
            "bad_envelope",
            "no-task",
        ),
        (
            b"\xef\xbb\xbf" + envelope(job_body(job), queue=queue, task_id="bom"),
            "undecodable",
            None,
        ),
        (envelope(job_body(job), queue=queue).decode().encode("utf-16"), "undecodable", None),
        (b'{"__type__": "bytes", "__value__": "' + CANARY.encode() + b'"}', "bad_envelope", None),
        (
            reshaped(envelope(job_body(job), queue=queue, task_id="rot13"), body_encoding="rot13"),
            "bad_envelope",
            "rot13",
        ),
        (
            reshaped(envelope(job_body(job), queue=queue, task_id="bool-tag"), delivery_tag=True),
            "bad_envelope",
            "bool-tag",
        ),
        (nulled_headers(envelope(job_body(job), queue=queue)), "bad_envelope", None),
        (envelope(job_body(job), queue=queue), "bad_envelope", None),
    ]


def reshaped(raw: bytes, **properties: Any) -> bytes:
    doc = json.loads(raw)
    doc["properties"].update(properties)
    return json.dumps(doc).encode()


def nulled_headers(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["headers"] = None
    return json.dumps(doc).encode()


def _log(client: redis.Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"e"]) for _id, f in client.xrange(keys.log(job_id))]


@pytest.mark.timeout(120)
def test_no_malformed_message_stops_the_worker(
    stack: Stack, mock: MockLLM, redis_client: redis.Redis
) -> None:
    keys = Keys(stack.prefix)
    items = catalogue(stack.queue)
    with stack.worker("a", concurrency=2) as worker:
        for raw, _reason, _id in items:
            redis_client.lpush(stack.queue, raw)
        valid = stack.client.submit("support", [{"role": "user", "content": "after"}])
        events = list(valid.events(timeout=60))
        wait_for(
            lambda: True if redis_client.llen(keys.dead()) == len(items) else None,
            timeout_s=30,
            what="every malformed message dead-lettered",
        )
        alive = worker.proc.poll() is None
        output = worker.output()

    assert alive, output
    assert events[-1]["type"] == "completed"

    entries = [json.loads(e) for e in redis_client.lrange(keys.dead(), 0, -1)]
    assert sorted(e["reason"] for e in entries) == sorted(r for _raw, r, _id in items)
    assert redis_client.ttl(keys.dead()) > 0
    for entry in entries:
        assert len(base64.b64decode(entry["copy_b64"])) <= 8192
    too_large = next(e for e in entries if e["reason"] == "too_large")
    assert too_large["size"] > 5 * 1024 * 1024

    for _raw, _reason, job_id in items:
        if job_id is None:
            continue
        log = _log(redis_client, keys, job_id)
        assert [e["type"] for e in log] == ["failed"], job_id
        assert log[0]["error"]["kind"] == "invalid_message"
        assert CANARY not in log[0]["error"]["message"]

    assert "broker message dead-lettered" in output
    assert CANARY not in output
    assert "Unrecoverable error" not in output


def test_a_broken_copy_of_a_running_or_finished_jobs_message_leaves_the_job_alone(
    stack: Stack, mock: MockLLM, redis_client: redis.Redis
) -> None:
    """A malformed message reusing the id of a job that ran ends nothing: one terminal."""
    keys = Keys(stack.prefix)
    with stack.worker("a", concurrency=2):
        done = stack.client.submit("support", [{"role": "user", "content": "first"}])
        first = list(done.events(timeout=30))
        redis_client.lpush(stack.queue, envelope(b"[1, 2]", queue=stack.queue, task_id=done.job_id))
        wait_for(
            lambda: True if redis_client.llen(keys.dead()) == 1 else None,
            timeout_s=30,
            what="the broken copy dead-lettered",
        )
    assert _log(redis_client, keys, done.job_id) == first


def test_a_malformed_broadcast_leaves_remote_control_working(
    stack: Stack, mock: MockLLM, redis_client: redis.Redis
) -> None:
    """Broadcast (remote control) messages kombu cannot take are dropped: the worker
    still answers a ping and runs jobs."""
    db = redis_client.connection_pool.connection_kwargs.get("db", 0)
    with stack.worker("a", concurrency=2) as worker:
        for raw in (b'{"a": 1}', b"[]", b'{"__type__": "bytes", "__value__": "x"}'):
            redis_client.publish(f"/{db}.celery.pidbox", raw)
        app = create_app(stack.settings)
        try:
            replies = wait_for(
                lambda: app.control.ping(destination=[worker.hostname], timeout=2) or None,
                timeout_s=30,
                interval_s=0.5,
                what="the worker answering a ping",
            )
        finally:
            app.close()
        job = stack.client.submit("support", [{"role": "user", "content": "after"}])
        events = list(job.events(timeout=30))
        alive = worker.proc.poll() is None
    assert alive
    assert replies
    assert events[-1]["type"] == "completed"
