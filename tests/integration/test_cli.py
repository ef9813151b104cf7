"""``python -m worker run`` as operators use it: a real subprocess, the mock upstream, Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.mockllm import MockLLM, Reply, Status

ANSWER = "hello from the cli"


@pytest.fixture
def upstream() -> Iterator[MockLLM]:
    """A mock upstream of this test's own, on a free loopback port."""
    with MockLLM() as mock:
        yield mock


@pytest.fixture
def cli_env(redis_url: str, key_prefix: str) -> dict[str, str]:
    """The child's environment: the test Redis and prefix, loopback-only, no RELIEVER_* leaks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELIEVER_")}
    env.update(
        RELIEVER_REDIS_URL=redis_url,
        RELIEVER_KEY_PREFIX=key_prefix,
        RELIEVER_ENVIRONMENT="test",
    )
    return env


def write_agents(path: Path, url: str, fallbacks: list[str] | None = None) -> Path:
    doc = {
        "models": {
            name: {"provider": "openai", "base_url": f"{url}/v1", "model": name}
            for name in ("primary", "backup")
        },
        "agents": {
            "support": {
                "model": "primary",
                "fallbacks": ["backup"] if fallbacks is None else fallbacks,
                "backoff": {"base": "1ms", "max": "1ms", "jitter": 0},
            }
        },
    }
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def job_doc(**over: Any) -> dict[str, Any]:
    return {"agent": "support", "messages": [{"role": "user", "content": "Hi"}], **over}


def run_cli(
    tmp_path: Path, env: dict[str, str], agents: Path, job: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "run", "--agents", str(agents), "--job", job],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=30,
        check=False,
    )


def events_of(stdout: str) -> list[dict[str, Any]]:
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    return events


def test_cli_run_completed_job_prints_json_lines_and_exits_0(
    tmp_path, cli_env, upstream, redis_client, keys
):
    """A job that completes prints one JSON event per line, ending in completed, and exits 0."""
    upstream.script("primary", [Status(400)])
    upstream.script("backup", [Reply(text=ANSWER)])
    agents = write_agents(tmp_path / "agents.yaml", upstream.url)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job_doc(job_id="cli-job-1")), encoding="utf-8")

    result = run_cli(tmp_path, cli_env, agents, str(job_file))

    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert [e["type"] for e in events[:4]] == ["started", "attempt", "fallback", "attempt"]
    assert events[-1]["type"] == "completed"
    assert events[-1]["text"] == ANSWER
    assert {e["job_id"] for e in events} == {"cli-job-1"}
    assert redis_client.exists(keys.cooldown("support"))
    assert (upstream.count("primary"), upstream.count("backup")) == (1, 1)


def test_cli_run_failed_chain_exits_1(tmp_path, cli_env, upstream):
    """A job whose chain fails prints its events, ending in failed, and exits 1."""
    upstream.script("primary", [Status(404)])
    agents = write_agents(tmp_path / "agents.yaml", upstream.url, fallbacks=[])
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job_doc()), encoding="utf-8")

    result = run_cli(tmp_path, cli_env, agents, str(job_file))

    assert result.returncode == 1, result.stderr
    events = events_of(result.stdout)
    assert [e["type"] for e in events] == ["started", "attempt", "failed"]
    assert events[-1]["error"]["kind"] == "model_failed"
    assert events[-1]["error"]["status"] == 404


def test_cli_run_job_from_stdin_completes(tmp_path, cli_env, upstream):
    """``--job -`` reads the job from standard input."""
    upstream.script("primary", [Reply(text=ANSWER)])
    agents = write_agents(tmp_path / "agents.yaml", upstream.url)

    result = run_cli(tmp_path, cli_env, agents, "-", stdin=json.dumps(job_doc()))

    assert result.returncode == 0, result.stderr
    events = events_of(result.stdout)
    assert events[0]["type"] == "started"
    assert events[-1]["type"] == "completed"
    assert events[-1]["text"] == ANSWER


def test_cli_run_bad_agents_file_exits_2_naming_file_and_key(tmp_path, cli_env, upstream):
    """A bad agents file stops the run with exit 2 and one message naming file, key and problem."""
    agents = write_agents(tmp_path / "agents.yaml", upstream.url, fallbacks=["nope"])
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job_doc()), encoding="utf-8")

    result = run_cli(tmp_path, cli_env, agents, str(job_file))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"{agents}: agents.support.fallbacks[0]: unknown model 'nope' (known: backup, primary)"
    )
    assert upstream.count("primary") == 0


def test_cli_run_non_loopback_model_refused_in_test_environment(tmp_path, cli_env):
    """With RELIEVER_ENVIRONMENT=test, a real provider URL in the agents file is refused."""
    agents = write_agents(tmp_path / "agents.yaml", "https://api.openai.com")
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job_doc()), encoding="utf-8")

    result = run_cli(tmp_path, cli_env, agents, str(job_file))

    assert result.returncode == 2
    assert "models.primary.base_url: only loopback URLs are allowed here" in result.stderr


@pytest.mark.parametrize(
    ("job", "message"),
    [
        pytest.param(
            json.dumps(job_doc(messages=[])),
            "messages: List should have at least 1 item",
            id="invalid-field",
        ),
        pytest.param(
            json.dumps(job_doc(agent="nobody")), "agent 'nobody' is not in", id="unknown-agent"
        ),
        pytest.param("{not json", "cannot read the job as JSON", id="not-json"),
    ],
)
def test_cli_run_bad_job_exits_2_with_clear_message(tmp_path, cli_env, upstream, job, message):
    """A bad job stops the run with exit 2 and a message naming what is wrong."""
    agents = write_agents(tmp_path / "agents.yaml", upstream.url)
    job_file = tmp_path / "job.json"
    job_file.write_text(job, encoding="utf-8")

    result = run_cli(tmp_path, cli_env, agents, str(job_file))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"{job_file}: ")
    assert message in result.stderr
    assert upstream.count("primary") == 0
