"""Sentry, for real: a fake ingest on loopback (the DSN points at it) captures every envelope.

Real ``celery worker`` subprocesses report a failed job once and a recovered or cancelled
one never; an unexpected exception in a job (a bug, raised from the HTTP transport seam) is
reported once, with its traceback, by an embedded worker in this process. No prompt text
and no API key may appear in any byte the ingest received.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sentry_sdk
from celery.contrib.testing.worker import start_worker

import tasks.complete  # noqa: F401 - registers reliever.complete on every app
from settings import Settings
from tests.fake_ingest import FakeSentry
from tests.service_support import running_worker, worker_env, write_agents
from worker.agents import Agent
from worker.celery import create_app
from worker.chain import ChainExecutor
from worker.clock import CancelToken, FakeClock
from worker.cooldown import MemoryCooldownStore
from worker.events import MemoryEventSink
from worker.jobs import Job
from worker.mockllm import MockLLM, Status
from worker.observability import init_sentry
from worker.observer import ObservingSink, process_telemetry
from worker.providers import build_providers
from worker.runtime import build_runtime
from worker.service import Service

API_KEY = "sk-sentry-test-key-5f0c1d2e3b4a"
PROMPT = "Summarise the zebra-crossing manuscript verbatim"
PROMPT_WORDS = ("zebra-crossing", "manuscript")


def _leaks(sentry: FakeSentry, *extra: str) -> list[str]:
    """Which forbidden strings appear anywhere in the bytes the ingest received."""
    raw = b"\n".join(sentry.bodies())
    needles = [API_KEY, *PROMPT_WORDS, *extra]
    return [n for n in needles if n and n.encode() in raw]


@pytest.fixture
def fake_sentry() -> Iterator[FakeSentry]:
    with FakeSentry() as server:
        yield server


@pytest.fixture
def sentry_in_process(
    fake_sentry: FakeSentry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeSentry]:
    """Sentry initialised in this process by init_sentry, reset afterwards."""
    monkeypatch.setenv("SENTRY_TEST_KEY", API_KEY)
    settings = Settings(
        _env_file=None,
        environment="test",
        sentry_dsn=fake_sentry.dsn,
        agents_file=str(tmp_path / "none.yaml"),
    )
    assert init_sentry(settings)
    yield fake_sentry
    sentry_sdk.get_client().close(timeout=2)
    sentry_sdk.get_global_scope().set_client(None)


def _models(base_url: str) -> dict[str, Any]:
    def model(name: str) -> dict[str, Any]:
        return {
            "provider": "openai",
            "base_url": f"{base_url}/v1",
            "model": name,
            "api_key_env": "SENTRY_TEST_KEY",
        }

    return {n: model(n) for n in ("s-primary", "s-backup", "s-flaky", "s-patient")}


def _agents(base_url: str) -> dict[str, Any]:
    fast = {"base": "20ms", "factor": 2, "max": "50ms", "jitter": 0}
    return {
        "models": _models(base_url),
        "agents": {
            "doomed": {"model": "s-primary", "fallbacks": ["s-backup"], "backoff": fast},
            "flaky": {"model": "s-flaky", "retries": 2, "backoff": fast},
            "patient": {
                "model": "s-patient",
                "retries": 2,
                "backoff": {"base": "30s", "factor": 2, "max": "30s", "jitter": 0},
            },
        },
    }


def _script_faults(mock: MockLLM) -> None:
    # Upstream errors that quote the key and the prompt, as some providers do.
    mock.script("s-primary", [Status(401, message=f"Incorrect API key provided: {API_KEY}")])
    mock.script("s-backup", [Status(400, message=f"Invalid request for: {PROMPT}")])
    mock.script("s-flaky", [Status(503), Status(503)], repeat_last=False)
    mock.script("s-patient", [Status(503)])


def _assert_failed_job_event(event: dict[str, Any], job_id: str) -> None:
    tags = event["tags"]
    assert tags["agent"] == "doomed"
    assert tags["model"] == "s-backup"
    assert tags["provider"] == "openai"
    assert tags["error.kind"] == "all_models_failed"
    assert tags["job_id"] == job_id
    assert event["fingerprint"] == ["all_models_failed", "openai"]
    assert event["level"] == "error"
    crumbs = [c for c in event["breadcrumbs"]["values"] if c.get("category") == "reliever.job"]
    outcomes = [
        (c["data"].get("model"), c["data"].get("kind")) for c in crumbs if "kind" in c["data"]
    ]
    assert outcomes == [("s-primary", "fatal"), ("s-backup", "fatal")]
    attempts = event["contexts"]["job"]["attempts"]
    assert [(a["model"], a["status"]) for a in attempts] == [("s-primary", 401), ("s-backup", 400)]


def test_sentry_worker_reports_a_failed_job_once_and_recovered_or_cancelled_never(
    tmp_path: Path, redis_url: str, key_prefix: str, redis_client, mock: MockLLM, fake_sentry
) -> None:
    """One event (tags, fingerprint, attempt crumbs) for the failed job; none for the others."""
    _script_faults(mock)
    agents_file = write_agents(tmp_path / "agents.yaml", _agents(mock.url))
    queue = f"{key_prefix}-q"
    env = worker_env(
        redis_url=redis_url,
        prefix=key_prefix,
        queue_name=queue,
        agents_file=agents_file,
        SENTRY_TEST_KEY=API_KEY,
        RELIEVER_SENTRY_DSN=fake_sentry.dsn,
    )
    settings = Settings(
        _env_file=None, environment="test", redis_url=redis_url, key_prefix=key_prefix, queue=queue
    )
    from worker.client import Client

    client = Client(settings=settings)
    messages = [{"role": "user", "content": PROMPT}]
    try:
        with running_worker(env, name=f"{key_prefix}-sentry"):
            patient = client.submit("patient", messages)
            stream = patient.events(timeout=20)
            for event in stream:
                if event["type"] == "retry":
                    break
            client.cancel(patient.job_id)
            cancelled = list(stream)[-1]
            doomed = list(client.submit("doomed", messages).events(timeout=20))[-1]
            flaky_job = client.submit("flaky", messages)
            flaky = list(flaky_job.events(timeout=20))[-1]
            assert fake_sentry.wait_for(lambda s: len(s.events()) >= 1)
    finally:
        client.close()

    events = fake_sentry.events()
    assert cancelled["error"]["kind"] == "cancelled"
    assert doomed["error"]["kind"] == "all_models_failed"
    assert flaky["type"] == "completed"
    assert len(events) == 1, [e.get("tags") for e in events]
    _assert_failed_job_event(events[0], doomed["job_id"])
    # Celery's integration wrapped the task (its scope adds these), so a task's exception
    # would reach Sentry from this worker too.
    assert events[0]["tags"]["celery_task_id"] == doomed["job_id"]
    assert events[0]["extra"]["celery-job"]["args"] == "[Filtered]"
    assert _leaks(fake_sentry, flaky["text"]) == []


def _executor(transport: httpx.BaseTransport | None, http: httpx.Client, clock) -> ChainExecutor:
    client = http if transport is None else httpx.Client(transport=transport)
    return ChainExecutor(
        providers=build_providers(client, clock),
        cooldowns=MemoryCooldownStore(clock),
        clock=clock,
        rng=random.Random(7),
    )


@pytest.fixture
def run_with_sentry(
    sentry_in_process: FakeSentry, http_client: httpx.Client, clock: FakeClock
) -> Callable[..., Any]:
    """Run a job through the executor and ObservingSink, as a task does, in its own scope."""

    def run(job: Job, agent: Agent, *, cancel: CancelToken | None = None) -> Any:
        sink = MemoryEventSink(job.job_id, clock)
        watching = ObservingSink(sink, agent, clock=clock, telemetry=process_telemetry())
        with sentry_sdk.isolation_scope():
            outcome = _executor(None, http_client, clock).run(job, agent, watching, cancel=cancel)
        sentry_sdk.flush(timeout=5)
        return outcome

    return run


def test_sentry_observer_failed_job_one_event_recovered_none(
    run_with_sentry, make_agents, make_job, mock: MockLLM, sentry_in_process: FakeSentry
) -> None:
    """In process: the failed job's event is the only one, and carries no prompt or key."""
    _script_faults(mock)
    agents = make_agents(models=_models(mock.url), agents=_agents(mock.url)["agents"])
    job = make_job(agent="doomed", messages=[{"role": "user", "content": PROMPT}])

    recovered = run_with_sentry(make_job(agent="flaky"), agents.agents["flaky"])
    failed = run_with_sentry(job, agents.agents["doomed"])

    events = sentry_in_process.events()
    client = sentry_sdk.get_client()
    assert client.should_send_default_pii() is False
    assert client.options["include_local_variables"] is False
    assert recovered.status == "completed"
    assert failed.status == "failed"
    assert len(events) == 1
    _assert_failed_job_event(events[0], job.job_id)
    assert _leaks(sentry_in_process) == []


# Celery's Redis result backend calls redis-py's deprecated setex; in this process warnings
# are errors, and the embedded worker would die storing the task state.
@pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
def test_sentry_bug_in_a_job_reaches_sentry_once_with_its_traceback(
    sentry_in_process: FakeSentry,
    redis_url: str,
    key_prefix: str,
    redis_client,
    make_agents,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unexpected exception ends the job failed/internal; Celery's integration reports it."""
    import celery.app.trace
    import celery.worker.consumer.consumer

    # Sentry wraps tasks by patching celery.app.trace.build_tracer. A `celery worker` process
    # imports its consumer after celeryd_init (where Sentry starts) and so gets the patched
    # function; this process imported the consumer (with start_worker) before the patch.
    monkeypatch.setattr(
        celery.worker.consumer.consumer, "build_tracer", celery.app.trace.build_tracer
    )

    def bug(request: httpx.Request) -> httpx.Response:
        raise ZeroDivisionError("a bug while building the request")

    settings = Settings(
        _env_file=None,
        environment="test",
        redis_url=redis_url,
        key_prefix=key_prefix,
        queue=f"{key_prefix}-q",
    )
    app = create_app(settings)
    task = app.tasks["reliever.complete"]
    service = Service(
        build_runtime(settings, agents=make_agents(), transport=httpx.MockTransport(bug)),
        enqueue=task.requeue,
    )
    task._service = service  # type: ignore[attr-defined]
    service.start()
    from worker.client import Client

    client = Client(settings=settings)
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            job = client.submit("support", [{"role": "user", "content": PROMPT}])
            terminal = list(job.events(timeout=20))[-1]
            assert sentry_in_process.wait_for(lambda s: len(s.events()) >= 1)
    finally:
        task.shutdown()  # type: ignore[attr-defined]
        client.close()
        app.close()
    sentry_sdk.flush(timeout=5)

    events = sentry_in_process.events()
    assert terminal["error"]["kind"] == "internal"
    assert len(events) == 1
    event = events[0]
    (exc,) = event["exception"]["values"]
    assert exc["type"] == "ZeroDivisionError"
    assert exc["mechanism"]["type"] == "celery"
    frames = exc["stacktrace"]["frames"]
    assert any(f.get("module") == "worker.chain" for f in frames)
    assert all("vars" not in f for f in frames)
    tags = event["tags"]
    assert tags["error.kind"] == "internal"
    assert tags["agent"] == "support"
    assert tags["model"] == "primary"
    assert tags["provider"] == "openai"
    assert tags["job_id"] == job.job_id
    assert event["extra"]["celery-job"]["args"] == "[Filtered]"
    assert _leaks(sentry_in_process) == []
