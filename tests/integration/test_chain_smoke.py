"""The executor over real HTTP against the mock upstream: the plain paths."""

from __future__ import annotations

from worker.mockllm import Status


def test_chain_primary_healthy_completes_on_primary(
    make_agents, make_job, make_executor, sink_for, mock
):
    """A healthy primary answers the job, and the stream is started, attempt, deltas, completed."""
    agents = make_agents()
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agents.agents["support"], sink)

    types = [e["type"] for e in sink.events]
    assert outcome.status == "completed"
    assert types[:2] == ["started", "attempt"]
    assert types[-1] == "completed"
    assert set(types[2:-1]) == {"delta"}
    assert [e["seq"] for e in sink.events] == list(range(1, len(sink.events) + 1))
    text = "".join(e["text"] for e in sink.events if e["type"] == "delta")
    assert outcome.terminal["text"] == text
    assert "Celery" in text
    assert mock.count("primary") == 1
    assert mock.count("backup") == 0


def test_chain_retryable_twice_then_success(
    make_agents, make_job, make_executor, sink_for, mock, clock
):
    """Two 503s are retried on the same model with the backoff's delays, then it succeeds."""
    mock.script("primary", [Status(503), Status(503)], repeat_last=False)
    agents = make_agents()
    job = make_job()
    sink = sink_for(job)

    outcome = make_executor().run(job, agents.agents["support"], sink)

    retries = [e for e in sink.events if e["type"] == "retry"]
    assert outcome.status == "completed"
    assert outcome.terminal["model"] == "primary"
    assert [r["delay_s"] for r in retries] == [0.2, 0.4]
    assert clock.sleeps == [0.2, 0.4]
    assert mock.count("primary") == 3
