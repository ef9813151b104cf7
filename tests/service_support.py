"""Real ``celery worker`` subprocesses for service tests, started as the Procfile does."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import yaml

from settings import Settings
from tests.http_support import ServiceProcess, free_port, wait_for
from worker.celery import create_app
from worker.client import Client
from worker.mockllm import MockLLM

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
WORKER_POOL = os.environ.get("RELIEVER_TEST_POOL", "gevent")
"""The pool of the workers tests start: the Procfile's (RELIEVER_TEST_POOL=threads: the other)."""


class WorkerProcess(ServiceProcess):
    """A running worker; ``ready`` is set once it logs that it consumes."""

    hostname = ""
    """The worker's node name (``--hostname``), as remote control addresses it."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.ready = threading.Event()
        super().__init__(proc)

    def on_line(self, line: str) -> None:
        if " ready." in line:
            self.ready.set()


def write_agents(path: Path, doc: Mapping[str, object]) -> Path:
    path.write_text(yaml.safe_dump(dict(doc)), encoding="utf-8")
    return path


def worker_env(
    *, redis_url: str, prefix: str, queue_name: str, agents_file: Path, **extra: str
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELIEVER_")}
    env.update(
        RELIEVER_ENVIRONMENT="test",
        RELIEVER_REDIS_URL=redis_url,
        RELIEVER_KEY_PREFIX=prefix,
        RELIEVER_QUEUE=queue_name,
        RELIEVER_AGENTS_FILE=str(agents_file),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@contextmanager
def running_worker(
    env: Mapping[str, str], *, name: str, concurrency: int = 4
) -> Iterator[WorkerProcess]:
    """A ``celery -A worker worker`` (threads pool, task events on), ready to consume."""
    cmd = [
        sys.executable, "-m", "celery", "-A", "worker", "worker",
        "--pool", WORKER_POOL, "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1", "-E", "--loglevel", "INFO",
        "--hostname", f"{name}@%h", "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = WorkerProcess(proc)
    worker.hostname = f"{name}@{socket.gethostname()}"
    try:
        if not worker.ready.wait(READY_TIMEOUT_S):
            raise RuntimeError(f"worker {name} did not become ready:\n{worker.output()}")
        yield worker
    finally:
        worker.stop()


API_KEY = "sk-service-test-key-0123456789"


def _agents(base_url: str) -> dict[str, Any]:
    def model(name: str, **extra: Any) -> dict[str, Any]:
        return {"provider": "openai", "base_url": f"{base_url}/v1", "model": name, **extra}

    fast_backoff = {"base": "50ms", "factor": 2, "max": "200ms", "jitter": 0}
    return {
        "models": {
            "primary": model("primary", api_key_env="SERVICE_TEST_KEY"),
            "backup": model("backup"),
            "slow": model("slow"),
            "flaky": model("flaky"),
        },
        "agents": {
            "support": {"model": "primary", "fallbacks": ["backup"], "backoff": fast_backoff},
            "slow": {"model": "slow", "retries": 0},
            "patient": {
                "model": "flaky",
                "retries": 2,
                "backoff": {"base": "30s", "factor": 2, "max": "30s", "jitter": 0},
            },
        },
    }


class Stack:
    """One test's worker environment: agents file, env, a client on the same prefix."""

    def __init__(self, tmp_path: Path, redis_url: str, prefix: str, mock: MockLLM) -> None:
        self.prefix = prefix
        self.queue = f"{prefix}-q"
        self.agents_file = write_agents(tmp_path / "agents.yaml", _agents(mock.url))
        self.redis_url = redis_url
        self.env = worker_env(
            redis_url=redis_url,
            prefix=prefix,
            queue_name=self.queue,
            agents_file=self.agents_file,
            SERVICE_TEST_KEY=API_KEY,
        )
        self.settings = Settings(
            _env_file=None,
            environment="test",
            redis_url=redis_url,
            key_prefix=prefix,
            queue=self.queue,
        )
        self.client = Client(settings=self.settings)

    def worker(self, name: str, *, concurrency: int = 4, queue: str | None = None, **env: str):
        extra = dict(self.env, **env)
        if queue is not None:
            extra["RELIEVER_QUEUE"] = queue
        return running_worker(extra, name=f"{self.prefix}-{name}", concurrency=concurrency)

    def send_raw(self, payload: Any, task_id: str) -> None:
        """Enqueue a message the way a web app in another language would."""
        app = create_app(self.settings)
        app.send_task("reliever.complete", args=[payload], task_id=task_id, queue=self.queue)
        app.close()

    def push_json(self, job_json: str, task_id: str) -> None:
        """LPUSH a message whose job is ``job_json`` as given, built as docs/protocol.md
        says: for bodies no JSON encoder would write (nesting deeper than Python's
        recursion limit, text that is not JSON)."""
        embed = '{"callbacks": null, "errbacks": null, "chain": null, "chord": null}'
        body = f"[[{job_json}], {{}}, {embed}]"
        message = {
            "body": base64.b64encode(body.encode()).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py", "task": "reliever.complete", "id": task_id, "root_id": task_id,
                "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                "timelimit": [None, None], "shadow": None, "ignore_result": False,
                "argsrepr": f"(job_id={task_id!r})", "kwargsrepr": "{}", "origin": "test",
            },
            "properties": {
                "correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": self.queue},
                "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
            },
        }  # fmt: skip
        client = redis.Redis.from_url(self.redis_url)
        client.lpush(self.queue, json.dumps(message))
        client.close()


class RedisServer:
    """A ``redis-server`` of a test's own, on a free port, with AOF (every write fsynced)
    so that a restart keeps what was written: for outages and restarts."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            wait_for(self._answers(client), timeout_s=10, interval_s=0.05, what="redis-server")
        finally:
            client.close()

    @staticmethod
    def _answers(client: redis.Redis) -> Callable[[], bool | None]:
        def probe() -> bool | None:
            try:
                return True if client.ping() else None
            except redis.RedisError:
                return None

        return probe

    def shutdown(self) -> None:
        """A graceful ``SHUTDOWN`` (the AOF is complete), waited for."""
        client = redis.Redis(port=self.port)
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown()
        client.close()
        self._reap()

    def kill(self) -> None:
        """SIGKILL: Redis dies mid-command, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=10)
            self.proc = None


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()
