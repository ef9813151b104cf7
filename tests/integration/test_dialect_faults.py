"""Every mockllm fault step, in every dialect, seen through the real adapter and executor.

One model per agent and no retries, so the first attempt's outcome is the fault's
classification. Real HTTP to the session mock; the timeout faults run on the system clock
with budgets of a fraction of a second.
"""

from __future__ import annotations

from typing import Any

import pytest

from worker.clock import SystemClock
from worker.mockllm import (
    Cut,
    ErrorBody200,
    Garbage,
    Idle,
    NoEndMarker,
    Reply,
    Stall,
    Status,
    StreamError,
    WrongContentType,
)
from worker.mockllm.scenarios import Step

PROVIDERS = ["openai", "anthropic", "gemini"]
TOO_LONG = "The input token count (2000000) exceeds the maximum number of tokens allowed (1048576)."
FAULTS: list[tuple[str, Step, str]] = [
    ("503", Status(503), "retryable"),
    ("529", Status(529), "retryable"),
    ("429", Status(429, retry_after="2"), "rate_limited"),
    ("403", Status(403), "fatal"),
    ("400-too-long", Status(400, message=TOO_LONG), "context_overflow"),
    ("cut", Cut(after_chunks=2), "retryable"),
    ("no-end-marker", NoEndMarker(after_chunks=2), "retryable"),
    ("no-end-marker-at-end", NoEndMarker(), "retryable"),
    ("stream-error", StreamError(after_chunks=1, error_code="overloaded_error"), "retryable"),
    (
        "stream-rate-limit",
        StreamError(after_chunks=1, error_code="rate_limit_error"),
        "rate_limited",
    ),
    ("garbage", Garbage(after_chunks=1), "fatal"),
    ("wrong-content-type", WrongContentType(), "fatal"),
    ("error-body-200", ErrorBody200(), "retryable"),
]
TIMEOUTS: list[tuple[str, Step]] = [
    ("stall-headers", Stall(seconds=3, before="headers")),
    ("stall-first-token", Stall(seconds=3, before="first_token")),
    ("idle", Idle(after_chunks=1, seconds=3)),
]


def _model(url: str, provider: str) -> dict[str, Any]:
    base = f"{url}/v1" if provider == "openai" else url
    return {
        "provider": provider,
        "base_url": base,
        "model": f"{provider}-faulty",
        "timeouts": {"first_token": "200ms", "idle": "200ms", "total": "5s"},
    }


def _run(make_agents, make_job, make_executor, sink_for, mock, provider: str, **kw: Any):
    agents = make_agents(
        models={"only": _model(mock.url, provider)},
        agents={"solo": {"model": "only", "retries": 0}},
    )
    job = make_job(agent="solo")
    sink = sink_for(job)
    outcome = make_executor(**kw).run(job, agents.agents["solo"], sink)
    return outcome, sink


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("fault", "step", "kind"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_step_classified_alike_in_every_dialect(
    make_agents, make_job, make_executor, sink_for, mock, provider, fault, step, kind
):
    """A scripted fault fails the attempt with the same error kind whatever the dialect."""
    mock.script(f"{provider}-faulty", [step])

    outcome, _ = _run(make_agents, make_job, make_executor, sink_for, mock, provider)

    assert outcome.status == "failed"
    assert [a["outcome"] for a in outcome.terminal["attempts"]] == [kind]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("fault", "step"), TIMEOUTS, ids=[t[0] for t in TIMEOUTS])
def test_timeout_fault_times_out_in_every_dialect(
    make_agents, make_job, make_executor, sink_for, mock, provider, fault, step
):
    """Stalls and idle gaps trip the model's budgets in every dialect."""
    mock.script(f"{provider}-faulty", [step])

    outcome, _ = _run(
        make_agents, make_job, make_executor, sink_for, mock, provider, clock_=SystemClock()
    )

    assert [a["outcome"] for a in outcome.terminal["attempts"]] == ["timeout"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_scripted_reply_completes_in_every_dialect(
    make_agents, make_job, make_executor, sink_for, mock, provider
):
    """A scripted reply streams as deltas and completes with its text, finish and usage."""
    mock.script(f"{provider}-faulty", [Reply(text="Three little words", finish="length")])

    outcome, sink = _run(make_agents, make_job, make_executor, sink_for, mock, provider)

    deltas = [e["text"] for e in sink.events if e["type"] == "delta"]
    assert outcome.status == "completed"
    assert deltas == ["Three ", "little ", "words"]
    assert outcome.terminal["text"] == "Three little words"
    assert outcome.terminal["finish_reason"] == "length"
    assert outcome.terminal["usage"]["output_tokens"] == 3
    assert outcome.terminal["usage"]["input_tokens"] > 0
