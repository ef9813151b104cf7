"""A Redis restart under running jobs: workers wait it out, every job ends exactly once.

A Redis of the test's own (AOF, every write fsynced), two real gevent workers, streams
in flight when Redis goes down gracefully (``SHUTDOWN``) or dies (SIGKILL) and comes
back on the same port.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.http_support import wait_for
from tests.service_support import Stack, redis_server
from worker.keys import Keys
from worker.mockllm import MockLLM, Reply

JOBS = 24
OUTAGE_S = 4.0
"""How long Redis stays down: the fault itself, longer than any client's quick retries."""
WORDS = [f"w{i}" for i in range(30)]


def _log(client: redis.Redis, keys: Keys, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"e"]) for _id, f in client.xrange(keys.log(job_id))]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["shutdown", "kill"])
def test_a_redis_restart_mid_run_loses_no_job_and_stops_no_worker(
    how: str, tmp_path: Path, key_prefix: str, mock: MockLLM
) -> None:
    mock.script("slow", [Reply(delay_s=0.1, text=" ".join(WORDS))])
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as server:
        stack = Stack(tmp_path, server.url, key_prefix, mock)
        keys = Keys(key_prefix)
        watcher = redis.Redis.from_url(server.url)
        try:
            with stack.worker("a", concurrency=16) as a, stack.worker("b", concurrency=16) as b:
                jobs = [
                    stack.client.submit("slow", [{"role": "user", "content": f"j{i}"}])
                    for i in range(JOBS)
                ]
                wait_for(
                    lambda: (
                        True
                        if all(
                            any(e["type"] == "delta" for e in _log(watcher, keys, j.job_id))
                            for j in jobs
                        )
                        else None
                    ),
                    timeout_s=30,
                    what="every job streaming",
                )
                server.shutdown() if how == "shutdown" else server.kill()
                time.sleep(OUTAGE_S)
                server.start()
                logs = {j.job_id: list(j.events(timeout=90)) for j in jobs}
                alive = [a.proc.poll() is None, b.proc.poll() is None]
        finally:
            watcher.close()
            stack.client.close()

    assert alive == [True, True], "a worker exited because Redis restarted"
    # Each run waited the outage out under its lease: none was rerun.
    assert mock.count("slow") == JOBS
    for job_id, events in logs.items():
        types = [e["type"] for e in events]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), job_id
        assert types.count("completed") + types.count("failed") == 1, (job_id, types)
        assert events[-1]["type"] == "completed", (job_id, events[-1])
        assert events[-1]["text"] == " ".join(WORDS)
        assert "restarted" not in types, job_id
