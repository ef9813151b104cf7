"""Flower, checked through its HTTP API: a real Flower, a real worker, real Redis, the mock.

Flower builds its view from task events only, so it starts before anything is enqueued,
and the test waits until it has seen the worker's own events (``/api/workers?status=true``
is built from them) before it submits the job.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from settings import Settings
from tests.http_support import ROOT, free_port, running_service, wait_for
from tests.service_support import running_worker, worker_env, write_agents
from worker.client import Client
from worker.mockllm import MockLLM, Reply, Status

AUTH = ("flower-user", "flower-pass-9f8e7d")
PROMPT = "PROMPT-NEVER-IN-FLOWER: my account number is 4242-4242"
ANSWER = " ".join(f"word{i}" for i in range(30))


@dataclass
class FlowerStack:
    url: str
    client: Client
    worker_name: str
    responses: list[str]

    def get(self, path: str, **params: Any) -> httpx.Response:
        """GET with credentials; every body is kept for the no-prompt check."""
        response = httpx.get(f"{self.url}{path}", params=params, auth=AUTH, timeout=5)
        self.responses.append(response.text)
        return response


def flower_cmd(port: int) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker", "flower",
        "--conf=worker/flowerconfig.py", "--address=127.0.0.1", f"--port={port}",
    ]  # fmt: skip


@pytest.fixture
def flower(
    tmp_path: Path, redis_url: str, key_prefix: str, mock: MockLLM, redis_client: Any
) -> Iterator[FlowerStack]:
    base = f"{mock.url}/v1"
    agents = write_agents(
        tmp_path / "agents.yaml",
        {
            "models": {
                name: {"provider": "openai", "base_url": base, "model": name}
                for name in ("primary", "backup")
            },
            "agents": {"support": {"model": "primary", "fallbacks": ["backup"]}},
        },
    )
    queue = f"{key_prefix}-q"
    env = worker_env(
        redis_url=redis_url,
        prefix=key_prefix,
        queue_name=queue,
        agents_file=agents,
        RELIEVER_FLOWER_BASIC_AUTH=":".join(AUTH),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = Settings(
        _env_file=None, environment="test", redis_url=redis_url, key_prefix=key_prefix, queue=queue
    )
    client = Client(settings=settings)
    worker_name = f"{key_prefix}-flower"
    try:
        with (
            running_service(flower_cmd(port), env, ready_url=f"{url}/healthcheck", name="flower"),
            running_worker(env, name=worker_name),
        ):
            yield FlowerStack(url, client, worker_name, [])
    finally:
        client.close()


def worker_seen_by_events(stack: FlowerStack) -> bool | None:
    """Flower has received this worker's events (so it will see the job's too)."""
    statuses = stack.get("/api/workers", status="true").json()
    seen = any(name.startswith(stack.worker_name) and alive for name, alive in statuses.items())
    return True if seen else None


def task_info(stack: FlowerStack, job_id: str) -> dict[str, Any] | None:
    response = stack.get(f"/api/task/info/{job_id}")
    return response.json() if response.status_code == 200 else None


def task_in_state(stack: FlowerStack, job_id: str, state: str) -> dict[str, Any] | None:
    info = task_info(stack, job_id)
    return info if info is not None and info["state"] == state else None


def test_flower_shows_running_model_and_final_state_never_the_messages(
    flower: FlowerStack, mock: MockLLM
) -> None:
    """Flower's API lists the worker and the job: RUNNING naming the model, then SUCCESS;
    its args are the job id and agent, and no response carries the prompt."""
    mock.script("primary", [Status(429)])
    mock.script("backup", [Reply(text=ANSWER, delay_s=0.1)])
    wait_for(lambda: worker_seen_by_events(flower), timeout_s=30, what="worker in Flower")

    job = flower.client.submit("support", [{"role": "user", "content": PROMPT}])

    def running_on_backup() -> dict[str, Any] | None:
        info = task_info(flower, job.job_id)
        if info is None or info["state"] != "RUNNING":
            return None
        meta = json.loads(info["result"])
        return info if meta["model"] == "backup" else None

    running = wait_for(running_on_backup, timeout_s=30, what="RUNNING on backup")
    assert json.loads(running["result"]) == {
        "job_id": job.job_id,
        "agent": "support",
        "model": "backup",
        "attempt": 1,
        "n": 2,
        "fallback": True,
    }
    assert running["worker"].startswith(flower.worker_name)
    assert job.job_id in flower.get("/api/tasks", state="RUNNING").json()
    assert flower.get(f"/api/task/result/{job.job_id}").json()["state"] == "RUNNING"
    done = wait_for(lambda: task_in_state(flower, job.job_id, "SUCCESS"), timeout_s=30, what="done")
    assert done["name"] == "reliever.complete"
    assert done["args"] == f"(job_id={job.job_id!r}, agent='support')"
    assert done["kwargs"] == "{}"
    assert "'status': 'completed'" in done["result"]
    assert job.result(timeout=5)["model"] == "backup"

    tasks = flower.get("/api/tasks", limit=1000).json()
    assert tasks[job.job_id]["state"] == "SUCCESS"
    assert tasks[job.job_id]["args"] == done["args"]
    listed = flower.get("/api/tasks", state="SUCCESS", taskname="reliever.complete").json()
    assert job.job_id in listed
    workers = flower.get("/api/workers", refresh="1").json()
    assert any(name.startswith(flower.worker_name) for name in workers)
    assert not any(PROMPT in body or "4242-4242" in body for body in flower.responses)


def test_flower_refuses_requests_without_credentials(flower: FlowerStack) -> None:
    """The API and the pages need basic auth; health and Prometheus metrics stay open."""
    for path in ("/api/workers", "/api/tasks", "/api/task/info/nothing", "/", "/tasks"):
        assert httpx.get(f"{flower.url}{path}", timeout=5).status_code == 401, path
        wrong = httpx.get(f"{flower.url}{path}", auth=(AUTH[0], "wrong"), timeout=5)
        assert wrong.status_code == 401, path

    assert flower.get("/api/tasks").status_code == 200
    health = httpx.get(f"{flower.url}/healthcheck", timeout=5)
    metrics = httpx.get(f"{flower.url}/metrics", timeout=5)

    assert health.text == "OK"
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "flower_events_total" in metrics.text


@pytest.mark.parametrize(
    ("environment", "credentials", "says"),
    [
        ("production", None, "RELIEVER_FLOWER_BASIC_AUTH must be set to user:password"),
        ("production", "", "RELIEVER_FLOWER_BASIC_AUTH must be set to user:password"),
        ("test", None, "is the default 'admin:admin' in the 'test' environment"),
        ("development", "admin:", "must be user:password, both non-empty"),
        ("development", "nocolon", "must be user:password, both non-empty"),
    ],
    ids=["production-default", "production-empty", "test-default", "no-password", "no-colon"],
)
def test_flower_refuses_to_start_with_weak_credentials(
    tmp_path: Path, environment: str, credentials: str | None, says: str
) -> None:
    """`celery flower` exits non-zero, saying why, with default, empty or malformed auth."""
    env = worker_env(
        redis_url="redis://127.0.0.1:6379/15",
        prefix="reliever-test-flower-refusal",
        queue_name="reliever-test-flower-refusal",
        agents_file=tmp_path / "agents.yaml",
        RELIEVER_ENVIRONMENT=environment,
    )
    if credentials is not None:
        env["RELIEVER_FLOWER_BASIC_AUTH"] = credentials

    done = subprocess.run(
        flower_cmd(free_port()),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )

    assert done.returncode != 0
    assert says in done.stderr
    assert "Visit me at" not in done.stdout + done.stderr
