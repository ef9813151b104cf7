"""The example web app's stack for tests: a worker, the web app, their own prefix and queue.

Both are real subprocesses started as the Procfile starts them (``celery -A worker
worker``, ``python -m examples.web``); the upstream is the test session's mock. The
agent is ``demo`` with the demo's model names, scripted per test through the mock.
:func:`submit` and :func:`read_events` are the HTTP steps the web tests share.
"""

from __future__ import annotations

import json
import secrets
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from httpx_sse import connect_sse

from settings import Settings
from tests.http_support import free_port, running_service
from tests.service_support import running_worker, worker_env, write_agents
from worker.keys import Keys
from worker.mockllm import MockLLM

AGENT = "demo"
PRIMARY = "demo-primary"
BACKUP = "demo-backup"


@dataclass
class WebStack:
    url: str
    prefix: str
    redis: redis.Redis
    settings: Settings
    env: dict[str, str]

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def reset(self) -> None:
        """Tests share one agent and one client address: a cooldown pin or a rate count
        left by one test must not move or limit the next one."""
        self.redis.delete(self.keys.cooldown(AGENT))
        for key in self.redis.scan_iter(match=f"{self.prefix}:web:rate:*"):
            self.redis.delete(key)


def demo_agents(mock: MockLLM) -> dict[str, object]:
    def model(name: str) -> dict[str, object]:
        return {
            "provider": "openai",
            "base_url": f"{mock.url}/v1",
            "model": name,
            "timeouts": {"connect": "2s", "first_token": "10s", "idle": "5s", "total": "1m"},
        }

    return {
        "models": {PRIMARY: model(PRIMARY), BACKUP: model(BACKUP)},
        "agents": {
            AGENT: {
                "model": PRIMARY,
                "fallbacks": [BACKUP],
                "retries": 2,
                "cooldown": "5s",
                "backoff": {"base": "200ms", "factor": 2, "max": "1s", "jitter": 0},
            }
        },
    }


@contextmanager
def running_web_stack(workdir: Path, redis_url: str, mock: MockLLM) -> Iterator[WebStack]:
    """A worker and the web app on a fresh prefix and queue; keys are removed afterwards."""
    prefix = f"reliever-test-{uuid.uuid4().hex[:12]}"
    agents = write_agents(workdir / "agents.yaml", demo_agents(mock))
    env = worker_env(
        redis_url=redis_url,
        prefix=prefix,
        queue_name=f"{prefix}-q",
        agents_file=agents,
        RELIEVER_WEB_AGENT=AGENT,
        # Shared by every web app started on this stack, so a restarted one knows the sessions.
        RELIEVER_WEB_SESSION_SECRET=secrets.token_urlsafe(32),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings(
        _env_file=None,
        environment="test",
        redis_url=redis_url,
        key_prefix=prefix,
        queue=f"{prefix}-q",
    )
    client = redis.Redis.from_url(redis_url)
    web_cmd = [sys.executable, "-m", "examples.web", "--host", "127.0.0.1", "--port", str(port)]
    try:
        with ExitStack() as stack:
            stack.enter_context(running_worker(env, name=f"{prefix}-web"))
            stack.enter_context(
                running_service(web_cmd, env, ready_url=f"{url}/healthz", name="web app")
            )
            yield WebStack(url=url, prefix=prefix, redis=client, settings=settings, env=env)
    finally:
        for key in client.scan_iter(match=f"{prefix}:*"):
            client.delete(key)
        client.close()


def submit(http: httpx.Client, prompt: str = "Hello from the relay test") -> str:
    response = http.post("/chat", json={"prompt": prompt})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    assert response.json()["events"] == f"/chat/{job_id}/events"
    return job_id


def read_events(
    http: httpx.Client,
    job_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    stop_after: int = 0,
) -> list[tuple[str, dict[str, Any]]]:
    """(SSE id, event) pairs to the end of the stream, or the first ``stop_after`` of them."""
    out: list[tuple[str, dict[str, Any]]] = []
    with connect_sse(
        http, "GET", f"/chat/{job_id}/events", headers=headers or {}, params=params or {}
    ) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            if not sse.data:
                continue  # the `retry:` field alone: browsers dispatch no event for it
            out.append((sse.id, json.loads(sse.data)))
            if stop_after and len(out) == stop_after:
                break
    return out
