"""The hand-written baseline: a plain Celery task that streams with the ``openai`` SDK.

``celery -A bench.plain_celery worker --pool threads --concurrency N --prefetch-multiplier 1 -E``

What a team would write without reliever: one task that calls the upstream with the
``openai`` SDK (``stream=True``), publishes every chunk to Redis pub/sub as it arrives
(``{prefix}:plain:{job_id}``, ``{"type": "delta", "ts": …, "text": …}``, then
``{"type": "done", "text": …}``) and returns the text (stored by the Redis result backend).
Retries are Celery's: ``autoretry_for`` the SDK's transient errors with ``retry_backoff``
(the SDK's own retries are off, ``max_retries=0``, so one attempt is one request). It has no
fallback model, no cooldown, no replay log, no seq, no lease: it is the floor of what a
Celery task costs, not an equivalent of reliever.

Delivery settings are reliever's (``worker/celery.py``): JSON only, ``acks_late``,
``task_reject_on_worker_lost``, prefetch 1, task events on (``-E``) and task-sent events.

Configured from the environment (the benchmark sets it): ``BENCH_PLAIN_REDIS`` (broker,
results and pub/sub), ``BENCH_PLAIN_QUEUE``, ``BENCH_PLAIN_PREFIX``, ``BENCH_PLAIN_BASE_URL``
(the OpenAI-compatible upstream, e.g. ``http://127.0.0.1:8700/v1``). ``openai`` is in the
``bench`` extra only.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import openai
import redis
from celery import Celery

TASK = "bench.plain_complete"


def make_app(redis_url: str, queue: str) -> Celery:
    app = Celery("bench_plain")
    app.conf.update(
        broker_url=redis_url,
        result_backend=redis_url,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=queue,
        result_expires=3600,
        broker_transport_options={"visibility_timeout": 3600},
    )
    return app


app = make_app(
    os.environ.get("BENCH_PLAIN_REDIS", "redis://127.0.0.1:6379/14"),
    os.environ.get("BENCH_PLAIN_QUEUE", "bench-plain"),
)

_lock = threading.Lock()
_clients: dict[str, Any] = {}


def _shared(name: str) -> Any:
    """One OpenAI client and one Redis client per worker process, shared by its threads."""
    with _lock:
        if name not in _clients:
            if name == "openai":
                _clients[name] = openai_client(os.environ["BENCH_PLAIN_BASE_URL"])
            else:
                _clients[name] = redis.Redis.from_url(os.environ["BENCH_PLAIN_REDIS"])
        return _clients[name]


def openai_client(base_url: str) -> openai.OpenAI:
    """The SDK client the task uses: a dummy key, no SDK retries, a 30 s timeout."""
    return openai.OpenAI(base_url=base_url, api_key="sk-bench-dummy", max_retries=0, timeout=30)


def stream_text(client: openai.OpenAI, model: str, messages: list[dict[str, Any]]) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=messages,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )


@app.task(
    bind=True,
    name=TASK,
    autoretry_for=(
        openai.APIConnectionError,
        openai.APITimeoutError,
        openai.InternalServerError,
        openai.RateLimitError,
    ),
    retry_backoff=True,
    retry_backoff_max=2,
    retry_jitter=False,
    max_retries=2,
)
def plain_complete(self: Any, job_id: str, model: str, messages: list[dict[str, Any]]) -> str:
    client = _shared("openai")
    pub = _shared("redis")
    channel = f"{os.environ.get('BENCH_PLAIN_PREFIX', 'bench')}:plain:{job_id}"
    parts: list[str] = []
    for chunk in stream_text(client, model, messages):
        if chunk.choices and chunk.choices[0].delta.content:
            text = chunk.choices[0].delta.content
            parts.append(text)
            delta = {"type": "delta", "ts": time.time(), "text": text}
            pub.publish(channel, json.dumps(delta))
    text = "".join(parts)
    pub.publish(channel, json.dumps({"type": "done", "text": text}))
    return text
