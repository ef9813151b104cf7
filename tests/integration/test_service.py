"""The Celery service end to end: real worker processes, real Redis, the mock upstream."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest
from celery.result import AsyncResult

from tests.http_support import wait_for
from tests.service_support import API_KEY, Stack
from worker.celery import create_app
from worker.client import JobFailed
from worker.mockllm import MockLLM, Reply, Status


def _seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def test_service_submit_streams_events_and_stores_result(stack: Stack, mock: MockLLM) -> None:
    """A submitted job streams gapless events to a reader, and its result is stored."""
    with stack.worker("a"):
        job = stack.client.submit("support", [{"role": "user", "content": "Say hi"}])

        events = list(job.events(timeout=20))

    assert events[0]["type"] == "started"
    assert events[-1]["type"] == "completed"
    assert _seqs(events) == list(range(1, len(events) + 1))
    result = job.result(timeout=5)
    assert result["status"] == "completed"
    assert result["job_id"] == job.job_id
    assert result["text"] == "".join(e["text"] for e in events if e["type"] == "delta")
    assert job.text(timeout=5) == result["text"]
    assert mock.count("primary") == 1


def test_service_full_worker_takes_the_next_queued_job_as_a_slot_frees(stack: Stack) -> None:
    """With every slot busy, a queued job starts as soon as one frees up, not after the
    broker wait of Celery's blocking loop (up to 2 s on the gevent pool)."""
    with stack.worker("a", concurrency=1):
        jobs = [
            stack.client.submit("support", [{"role": "user", "content": f"Job {i}"}])
            for i in range(3)
        ]
        runs = [list(job.events(timeout=20)) for job in jobs]

    assert [run[-1]["type"] for run in runs] == ["completed"] * 3
    gaps = [later[0]["ts"] - earlier[-1]["ts"] for earlier, later in itertools.pairwise(runs)]
    assert all(0 <= gap < 1.0 for gap in gaps), gaps


def test_service_reader_after_the_end_gets_every_event(stack: Stack) -> None:
    """Iteration that starts after the job ended still yields every event once, in order."""
    with stack.worker("a"):
        job = stack.client.submit("support", [{"role": "user", "content": "Late reader"}])
        first = list(job.events(timeout=20))

    late = list(stack.client.job(job.job_id).events(timeout=5))

    assert late == first


def test_service_async_reader_sees_the_same_events(stack: Stack) -> None:
    """The asyncio iterator yields the same events as the sync one."""
    import asyncio

    async def collect(job_id: str) -> list[dict[str, Any]]:
        return [e async for e in stack.client.job(job_id).aevents(timeout=20)]

    with stack.worker("a"):
        job = stack.client.submit("support", [{"role": "user", "content": "Async reader"}])
        async_events = asyncio.run(collect(job.job_id))

    assert async_events == list(job.events(timeout=5))
    assert async_events[-1]["type"] == "completed"


def test_service_fifty_concurrent_jobs_complete_with_gapless_seq(stack: Stack) -> None:
    """Fifty jobs submitted at once all complete, each with seq 1..n and one terminal event."""
    with stack.worker("a", concurrency=16):
        jobs = [
            stack.client.submit("support", [{"role": "user", "content": f"Job {i}"}])
            for i in range(50)
        ]
        streams = [list(job.events(timeout=60)) for job in jobs]

    for events in streams:
        assert _seqs(events) == list(range(1, len(events) + 1))
        assert [e["type"] for e in events].count("completed") == 1
        assert events[-1]["type"] == "completed"


@pytest.mark.parametrize(
    ("payload", "kind", "field", "says"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "invalid_job", "agent", "agent"),
        (
            {"agent": "nobody", "messages": [{"role": "user", "content": "hi"}]},
            "unknown_agent",
            None,
            "nobody",
        ),
        ({"agent": "support", "messages": "hello"}, "invalid_job", "messages", "messages"),
        (
            {"agent": "support", "messages": [{"role": "user", "content": "x" * 2_000_000}]},
            "invalid_job",
            "(job)",
            "over the limit",
        ),
    ],
    ids=["no-agent", "unknown-agent", "messages-wrong-type", "too-large"],
)
def test_service_invalid_job_fails_at_once_naming_the_field(
    stack: Stack, mock: MockLLM, payload: dict[str, Any], kind: str, field: str | None, says: str
) -> None:
    """A bad job ends with one failed event of the right kind, names the field, calls no model."""
    job_id = f"bad-{kind}-{field}".replace("(", "").replace(")", "")
    with stack.worker("a"):
        stack.send_raw({**payload, "job_id": job_id}, task_id=job_id)
        events = list(stack.client.job(job_id).events(timeout=20))

    assert [e["type"] for e in events] == ["failed"]
    error = events[0]["error"]
    assert error["kind"] == kind
    assert error.get("field") == field
    assert says in error["message"]
    assert "x" * 50 not in json.dumps(events)
    assert mock.count("primary") == 0


def test_service_cancel_during_stream_stops_within_250ms(stack: Stack, mock: MockLLM) -> None:
    """Cancelling a streaming job ends it failed/cancelled within 250 ms, closing the upstream."""
    mock.script("slow", [Reply(delay_s=0.2, text=" ".join(["word"] * 200))])
    with stack.worker("a"):
        job = stack.client.submit("slow", [{"role": "user", "content": "long answer"}])
        events = job.events(timeout=30)
        for event in events:
            if event["type"] == "delta":
                break
        cancelled_at = time.time()
        stack.client.cancel(job.job_id)
        rest = list(events)

    terminal = rest[-1]
    assert terminal["type"] == "failed"
    assert terminal["error"]["kind"] == "cancelled"
    assert terminal["ts"] - cancelled_at < 0.25
    assert sum(1 for e in rest if e["type"] == "delta") < 5


def test_service_cancel_during_backoff_wakes_the_wait(stack: Stack, mock: MockLLM) -> None:
    """A job waiting 30 s to retry ends cancelled within 250 ms of the cancel."""
    mock.script("flaky", [Status(503)])
    with stack.worker("a"):
        job = stack.client.submit("patient", [{"role": "user", "content": "retry me"}])
        events = job.events(timeout=30)
        for event in events:
            if event["type"] == "retry":
                assert event["delay_s"] == 30
                break
        cancelled_at = time.time()
        stack.client.cancel(job.job_id)
        terminal = list(events)[-1]

    assert terminal["type"] == "failed"
    assert terminal["error"]["kind"] == "cancelled"
    assert terminal["ts"] - cancelled_at < 0.25
    assert mock.count("flaky") == 1


def test_service_cancel_while_queued_ends_cancelled_without_a_model_call(
    stack: Stack, mock: MockLLM
) -> None:
    """A job cancelled before any worker took it ends cancelled and calls no model."""
    job = stack.client.submit("support", [{"role": "user", "content": "never run"}])
    stack.client.cancel(job.job_id)

    with stack.worker("a"):
        events = list(job.events(timeout=20))

    assert events[-1]["type"] == "failed"
    assert events[-1]["error"]["kind"] == "cancelled"
    assert "attempt" not in [e["type"] for e in events]
    assert mock.count("primary") == 0


def test_service_deadline_ends_a_slow_job(stack: Stack, mock: MockLLM) -> None:
    """deadline_s ends a job that streams too long with deadline_exceeded."""
    mock.script("slow", [Reply(delay_s=0.2, text=" ".join(["word"] * 100))])
    with stack.worker("a"):
        job = stack.client.submit("slow", [{"role": "user", "content": "slow"}], deadline_s=0.6)
        events = list(job.events(timeout=20))

    assert events[-1]["type"] == "failed"
    assert events[-1]["error"]["kind"] == "deadline_exceeded"
    with pytest.raises(JobFailed):
        job.text(timeout=1)


def test_service_cooldown_is_shared_between_worker_processes(stack: Stack, mock: MockLLM) -> None:
    """After a 429 on one worker, the next job on another worker starts at the fallback."""
    mock.script("primary", [Status(429, retry_after="1")])
    q1, q2 = f"{stack.queue}-1", f"{stack.queue}-2"
    app = create_app(stack.settings)
    with stack.worker("one", queue=q1), stack.worker("two", queue=q2):
        app.send_task(
            "reliever.complete",
            args=[
                {
                    "job_id": "cd-1",
                    "agent": "support",
                    "messages": [{"role": "user", "content": "a"}],
                }
            ],
            task_id="cd-1",
            queue=q1,
        )
        first = list(stack.client.job("cd-1").events(timeout=20))
        app.send_task(
            "reliever.complete",
            args=[
                {
                    "job_id": "cd-2",
                    "agent": "support",
                    "messages": [{"role": "user", "content": "b"}],
                }
            ],
            task_id="cd-2",
            queue=q2,
        )
        second = list(stack.client.job("cd-2").events(timeout=20))
    app.close()

    assert [e["type"] for e in first if e["type"] in ("fallback", "completed")] == [
        "fallback",
        "completed",
    ]
    assert second[0]["in_cooldown"] is True
    assert second[0]["start_model"] == "backup"
    assert "fallback" not in [e["type"] for e in second]
    assert second[-1]["model"] == "backup"
    assert mock.count("primary") == 1


def test_service_flower_state_names_the_model_and_attempt(stack: Stack, mock: MockLLM) -> None:
    """While a job streams, its task state is RUNNING with the model and attempt in its meta;
    the final state is the result."""
    mock.script("slow", [Reply(delay_s=0.1, text=" ".join(["word"] * 30))])
    app = create_app(stack.settings)
    with stack.worker("a"):
        job = stack.client.submit("slow", [{"role": "user", "content": "state"}])
        events = job.events(timeout=20)
        for event in events:
            if event["type"] == "delta":
                break

        # The state is written beside the stream, not before it: look until it shows,
        # while the job still streams (3 s of tokens).
        def running_state() -> AsyncResult | None:
            result = AsyncResult(job.job_id, app=app)
            return result if result.state == "RUNNING" else None

        state = wait_for(
            running_state,
            timeout_s=2.0,
            interval_s=0.02,
            what="the RUNNING state",
        )
        running = (state.state, state.info)
        list(events)
        final = AsyncResult(job.job_id, app=app).get(timeout=10)
    app.close()

    assert running[0] == "RUNNING"
    assert running[1]["model"] == "slow"
    assert running[1]["attempt"] == 1
    assert final["status"] == "completed"


def test_service_no_key_or_result_holds_the_api_key(stack: Stack, redis_client) -> None:
    """After jobs ran, no Redis value under the prefix and no Celery result holds the API key."""
    with stack.worker("a"):
        job = stack.client.submit("support", [{"role": "user", "content": "secret check"}])
        job.text(timeout=20)

    found = []
    for key in redis_client.scan_iter(match=f"{stack.prefix}:*"):
        kind = redis_client.type(key)
        if kind == b"string":
            values = [redis_client.get(key)]
        elif kind == b"stream":
            values = [
                json.dumps({k.decode(): v.decode() for k, v in f.items()}).encode()
                for _, f in redis_client.xrange(key)
            ]
        elif kind == b"hash":
            values = list(redis_client.hgetall(key).values())
        else:
            values = []
        found += [key for v in values if v and API_KEY.encode() in v]
    meta = redis_client.get(f"celery-task-meta-{job.job_id}")
    assert meta is not None
    assert API_KEY.encode() not in meta
    assert found == []


def test_service_sigkilled_worker_job_resumes_on_another_within_30s(
    stack: Stack, mock: MockLLM
) -> None:
    """A job whose worker is SIGKILLed mid-stream completes on another worker, seq continuing."""
    mock.script("slow", [Reply(delay_s=0.1, text=" ".join(f"w{i}" for i in range(40)))])
    with stack.worker("survivor", concurrency=2):
        with stack.worker(
            "victim", concurrency=2, RELIEVER_QUEUE=f"{stack.queue}-victim"
        ) as victim:
            app = create_app(stack.settings)
            app.send_task(
                "reliever.complete",
                args=[
                    {
                        "job_id": "kill-1",
                        "agent": "slow",
                        "messages": [{"role": "user", "content": "k"}],
                    }
                ],
                task_id="kill-1",
                queue=f"{stack.queue}-victim",
            )
            app.close()
            events = stack.client.job("kill-1").events(timeout=60)
            seen = []
            for event in events:
                seen.append(event)
                if event["type"] == "delta" and len([e for e in seen if e["type"] == "delta"]) >= 5:
                    break
            killed_at = time.time()
            victim.kill()
        rest = list(events)

    everything = seen + rest
    assert _seqs(everything) == list(range(1, len(everything) + 1))
    types = [e["type"] for e in everything]
    assert "restarted" in types
    restarted = everything[types.index("restarted")]
    assert restarted["discard"] is True
    assert restarted["ts"] - killed_at < 30
    terminal = everything[-1]
    assert terminal["type"] == "completed"
    assert terminal["text"] == " ".join(f"w{i}" for i in range(40))
    assert types.count("completed") == 1


def test_service_stream_outliving_the_visibility_timeout_runs_once(
    stack: Stack, mock: MockLLM
) -> None:
    """A stream longer than a (test-shortened) visibility timeout is not run a second time.

    Whether kombu's restore sweep redelivers within the stream depends on the pool (the
    threads pool's consumer sweeps on its event loop, gevent's may not), so the test also
    delivers the copy itself, exactly as a restored message arrives: same task id, same job.
    """
    mock.script("slow", [Reply(delay_s=0.25, text=" ".join(["tick"] * 24))])
    env = {"RELIEVER_VISIBILITY_TIMEOUT_S": "2", "RELIEVER_UNACKED_RESTORE_INTERVAL_S": "1"}
    with stack.worker("a", concurrency=4, **env) as worker:
        job = stack.client.submit("slow", [{"role": "user", "content": "long"}])
        stream = job.events(timeout=30)
        events = []
        for event in stream:
            events.append(event)
            if event["type"] == "delta":
                break
        stack.send_raw(
            {
                "job_id": job.job_id,
                "agent": "slow",
                "messages": [{"role": "user", "content": "long"}],
            },
            task_id=job.job_id,
        )
        events += list(stream)

    assert events[-1]["type"] == "completed"
    assert [e["type"] for e in events].count("attempt") == 1
    assert "restarted" not in [e["type"] for e in events]
    assert mock.count("slow") == 1
    assert "running elsewhere; dropping this delivery" in worker.output()


def test_service_worker_refuses_bad_settings_with_one_clear_line(stack: Stack) -> None:
    """A worker started with default Flower credentials in production exits 2, saying why."""
    import subprocess
    import sys

    env = dict(stack.env, RELIEVER_ENVIRONMENT="production")
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool", "solo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 2
    assert "reliever: bad settings: RELIEVER_FLOWER_BASIC_AUTH must be set" in done.stderr
    assert "Traceback" not in done.stderr
