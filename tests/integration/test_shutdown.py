"""A worker's SIGTERM with real worker processes: drain, then hand-off to another worker."""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

import pytest

from tests.http_support import wait_for
from tests.service_support import Stack
from worker.celery import create_app
from worker.mockllm import MockLLM, Reply

DRAIN_S = 8.0
SHORT_WORDS = [f"s{i}" for i in range(25)]
LONG_WORDS = [f"l{i}" for i in range(120)]


def _first_delta(stream: Any) -> list[dict[str, Any]]:
    """Read a job's events up to its first delta (the job is streaming then)."""
    seen = []
    for event in stream:
        seen.append(event)
        if event["type"] == "delta":
            return seen
    raise AssertionError(f"the job ended before streaming: {seen}")


def _gapless(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events].count("completed") == 1
    assert events[-1]["type"] == "completed"


@pytest.mark.timeout(120)
def test_sigterm_drains_short_jobs_in_place_and_hands_long_ones_to_another_worker(
    stack: Stack, mock: MockLLM
) -> None:
    """On SIGTERM worker A takes no new job, finishes a job that ends within the drain,
    hands a longer one off (worker B continues it: ``restarted``, seq gapless, one
    terminal event) and exits 0 soon after the drain."""
    # The first request of each model streams slowly on A; B's rerun gets a quick answer.
    mock.script("flaky", [Reply(delay_s=0.2, text=" ".join(SHORT_WORDS))])
    mock.script(
        "slow",
        [Reply(delay_s=0.25, text=" ".join(LONG_WORDS)), Reply(text=" ".join(LONG_WORDS))],
    )
    b_name = f"{stack.prefix}-b@{socket.gethostname()}"
    # B consumes a queue of its own until A holds both jobs, then A's queue as well.
    with (
        stack.worker("a", concurrency=4, RELIEVER_DRAIN_S=str(DRAIN_S)) as a,
        stack.worker("b", concurrency=4, queue=f"{stack.queue}-b"),
    ):
        short = stack.client.submit("patient", [{"role": "user", "content": "short"}])
        long = stack.client.submit("slow", [{"role": "user", "content": "long"}])
        short_stream = short.events(timeout=60)
        long_stream = long.events(timeout=60)
        short_seen = _first_delta(short_stream)
        long_seen = _first_delta(long_stream)

        app = create_app(stack.settings)
        try:
            replies = app.control.add_consumer(stack.queue, destination=[b_name], reply=True)
        finally:
            app.close()
        assert replies, "worker B did not answer add_consumer"

        a.proc.send_signal(signal.SIGTERM)
        termed_at = time.time()
        wait_for(
            lambda: True if "Warm shutdown" in a.output() else None,
            timeout_s=10,
            what="worker A's shutdown",
        )
        later = stack.client.submit("support", [{"role": "user", "content": "after"}])
        later_events = list(later.events(timeout=30))
        short_events = short_seen + list(short_stream)
        long_events = long_seen + list(long_stream)
        a.proc.wait(timeout=DRAIN_S + 15)
        exited_after = time.time() - termed_at

    assert a.proc.returncode == 0, a.output()
    assert exited_after < DRAIN_S + 10

    _gapless(short_events)
    assert "restarted" not in [e["type"] for e in short_events]
    assert short_events[-1]["text"] == " ".join(SHORT_WORDS)
    assert short_events[-1]["ts"] > termed_at, "the short job ended before the SIGTERM"

    _gapless(long_events)
    types = [e["type"] for e in long_events]
    assert types.count("restarted") == 1
    restarted = long_events[types.index("restarted")]
    assert restarted["discard"] is True
    assert DRAIN_S - 1 < restarted["ts"] - termed_at < DRAIN_S + 5
    assert long_events[-1]["text"] == " ".join(LONG_WORDS)
    assert mock.count("slow") == 2

    # A never started it: a run of A's would have published `started`, and B's rerun
    # would then say `restarted`. (A message already in flight to A when it got the
    # signal may reach A, which hands it back unrun.)
    _gapless(later_events)
    assert [e["type"] for e in later_events].count("started") == 1
    assert "restarted" not in [e["type"] for e in later_events]
    assert "handing the job off" in a.output()
