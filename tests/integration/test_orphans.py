"""A worker that dies after taking a job's message but before leasing the job: another
worker restores the message within a lease TTL and a reap, and the job runs once."""

from __future__ import annotations

import time

import pytest

from tests.http_support import free_port, wait_for
from tests.service_support import Stack
from worker.mockllm import MockLLM

LEASE_TTL_S = 3.0


@pytest.mark.timeout(90)
def test_a_job_taken_by_a_worker_that_died_before_leasing_it_runs_elsewhere(
    stack: Stack, mock: MockLLM
) -> None:
    # Worker A takes messages from the real broker, but its state Redis never answers,
    # so it holds the message, unleased, until it is killed: the window in question.
    stuck = {
        "RELIEVER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "RELIEVER_BROKER_URL": stack.redis_url,
        "RELIEVER_RESULT_BACKEND": stack.redis_url,
    }
    job = None
    with stack.worker("a", concurrency=2, **stuck) as a:
        job = stack.client.submit("support", [{"role": "user", "content": "orphan"}])
        wait_for(
            lambda: True if f"job {job.job_id}: Redis does not answer" in a.output() else None,
            timeout_s=20,
            what="worker A holding the job's message",
        )
        a.kill()
    killed_at = time.time()

    with stack.worker("b", concurrency=2, RELIEVER_LEASE_TTL_S=str(LEASE_TTL_S)) as b:
        events = list(job.events(timeout=45))
        output = b.output()

    types = [e["type"] for e in events]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert types[0] == "started", events
    assert types.count("completed") == 1, events
    assert events[-1]["type"] == "completed", events
    assert "restarted" not in types  # the dead worker never published
    assert events[0]["ts"] - killed_at < 30
    assert f"job {job.job_id}: its worker died before starting it; restored" in output
    assert mock.count("primary") == 1
