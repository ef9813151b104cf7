"""A broken configuration stops a worker before it takes a job; ``worker check`` says why.

Real ``celery worker`` and ``python -m worker check`` subprocesses, real Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from settings import Settings
from tests.http_support import free_port
from tests.service_support import ROOT, Stack, write_agents
from worker.celery import TASK_NAME, create_app
from worker.keys import Keys

BROKEN = {
    "models": {"fast": {"provider": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "f"}},
    "agents": {"support": {"model": "fast", "fallbacks": ["stedy"]}},
}
BROKEN_MESSAGE = "agents.support.fallbacks[0]: unknown model 'stedy' (known: fast)"


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "worker", "check", *args], env)


def test_worker_with_a_broken_agents_file_exits_2_naming_the_problem_and_takes_no_job(
    stack: Stack, tmp_path: Path, redis_client: redis.Redis
) -> None:
    """The Procfile's worker command with a fallback naming no model: one line on stderr
    naming the file, key path and problem, no traceback, exit 2, and the job queued
    before it started is still in the queue."""
    bad = write_agents(tmp_path / "broken.yaml", BROKEN)
    stack.send_raw({"agent": "support", "messages": [{"role": "user", "content": "hi"}]}, "j1")
    assert redis_client.llen(stack.queue) == 1

    done = _run(
        [
            sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "gevent",
            "--concurrency", "2", "--prefetch-multiplier", "1", "-E", "--loglevel", "INFO",
        ],
        dict(stack.env, RELIEVER_AGENTS_FILE=str(bad)),
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.strip() == f"reliever: bad agents file: {bad}: {BROKEN_MESSAGE}"
    assert "Traceback" not in done.stdout + done.stderr
    assert " ready." not in done.stdout
    assert redis_client.llen(stack.queue) == 1


def test_check_passes_a_good_configuration_and_prints_the_chains(stack: Stack) -> None:
    done = _check(dict(stack.env))

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert f"agents file: {stack.agents_file}: 3 agent(s)" in lines
    assert "  support: primary -> backup (retries 2, cooldown 1m)" in lines
    assert "redis, broker, result backend: redis://127.0.0.1:6379/15 answers" in lines
    assert lines[-1] == "ok"


def test_check_exits_2_on_a_broken_agents_file_given_on_the_command_line(
    stack: Stack, tmp_path: Path
) -> None:
    bad = write_agents(tmp_path / "broken.yaml", BROKEN)

    done = _check(dict(stack.env), "--agents", str(bad))

    assert done.returncode == 2
    assert done.stdout.splitlines()[-1] == f"agents file: broken: {bad}: {BROKEN_MESSAGE}"


def test_check_exits_2_on_bad_settings_naming_the_variable(stack: Stack) -> None:
    done = _check(dict(stack.env, RELIEVER_LEASE_TTL_S="-5"))

    assert done.returncode == 2
    assert "settings: broken: RELIEVER_LEASE_TTL_S: Input should be greater than 0" in (done.stdout)


def test_check_exits_1_naming_unset_keys_and_a_silent_redis_without_its_password(
    stack: Stack,
) -> None:
    """The key variable by name (the test's worker env sets it: removed here), and the
    Redis URL with its password masked."""
    env = dict(stack.env, RELIEVER_REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    del env["SERVICE_TEST_KEY"]

    done = _check(env)

    assert done.returncode == 1
    out = done.stdout
    assert "problem: SERVICE_TEST_KEY is not set: every attempt on primary fails" in out
    assert "does not answer" in out
    assert "redis://:***@127.0.0.1:" in out
    assert "hunter2" not in out + done.stderr
    assert out.splitlines()[-1] == "not ready: 2 problem(s)"


@pytest.fixture
def broken_app(stack: Stack, tmp_path: Path) -> Celery:
    """The worker's app whose agents file broke after the worker started."""
    settings = Settings(
        _env_file=None,
        environment="test",
        redis_url=stack.redis_url,
        key_prefix=stack.prefix,
        queue=stack.queue,
        agents_file=str(write_agents(tmp_path / "broken.yaml", BROKEN)),
    )
    app = create_app(settings)
    app.loader.import_default_modules()  # the task module, as a worker imports it
    return app


def test_a_job_meeting_a_broken_configuration_at_run_time_ends_failed_config(
    broken_app: Celery, stack: Stack, redis_client: redis.Redis
) -> None:
    """No job is left without a terminal event: the task ends it ``failed`` (``config``)."""
    task: Any = broken_app.tasks[TASK_NAME]
    job = {"job_id": "cfg-1", "agent": "support", "messages": [{"role": "user", "content": "x"}]}
    try:
        result = task.apply(args=[job], task_id="cfg-1").get()
    finally:
        task.shutdown()
        broken_app.close()

    keys = Keys(stack.prefix)
    log = [json.loads(f[b"e"]) for _id, f in redis_client.xrange(keys.log("cfg-1"))]
    assert [e["type"] for e in log] == ["failed"]
    assert log[0]["error"]["kind"] == "config"
    assert BROKEN_MESSAGE in log[0]["error"]["message"]
    assert result["status"] == "failed"
    assert json.loads(redis_client.get(keys.result("cfg-1")))["error"]["kind"] == "config"
