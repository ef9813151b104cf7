"""Real ``celery worker`` subprocesses for service tests, started as the Procfile does."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.http_support import ServiceProcess

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
WORKER_POOL = os.environ.get("RELIEVER_TEST_POOL", "gevent")
"""The pool of the workers tests start: the Procfile's (RELIEVER_TEST_POOL=threads: the other)."""


class WorkerProcess(ServiceProcess):
    """A running worker; ``ready`` is set once it logs that it consumes."""

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
    try:
        if not worker.ready.wait(READY_TIMEOUT_S):
            raise RuntimeError(f"worker {name} did not become ready:\n{worker.output()}")
        yield worker
    finally:
        worker.stop()
