"""Hostile jobs and hostile upstreams against a real worker process: every job ends with
one terminal event, and no prompt reaches the worker's output, at DEBUG either."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from tests.service_support import Stack
from worker.mockllm import MockLLM, Reply, Status, StreamError

CANARY = "canary-4b1e-quince-marmalade"


def _message(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _job(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"agent": "support", "messages": [_message(content)], **fields}


def _job_json(nested: int, content: str = "hi") -> str:
    deep = "[" * nested + "]" * nested
    return json.dumps(_job(content))[:-1] + f', "metadata": {{"deep": {deep}}}}}'


def _events(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    return list(stack.client.job(job_id).events(timeout=20))


def test_hostile_jobs_each_end_with_one_failed_event(stack: Stack, mock: MockLLM) -> None:
    """inf and 1e19 deadlines, lone surrogates and JSON nested 500 deep are invalid jobs
    (naming the field); a body nested 5,000 deep or not JSON cannot be decoded at all
    (an invalid message, dead-lettered). Each job ends at once with one failed event and
    calls no model."""
    sent = {
        "deadline-inf": ("invalid_job", "deadline_s", "finite"),
        "deadline-1e19": ("invalid_job", "deadline_s", "less than or equal to 86400"),
        "surrogate-content": ("invalid_job", "messages[0].content", "UTF-8"),
        "surrogate-stop": ("invalid_job", "params.stop", "UTF-8"),
        "nested-500": ("invalid_job", "metadata", "nested deeper than 64 levels"),
        "nested-5000": ("invalid_message", None, "nested too deeply to decode"),
        "not-json": ("invalid_message", None, "the message body is not JSON"),
    }
    with stack.worker("a", concurrency=2):
        stack.send_raw(_job(deadline_s=math.inf), task_id="deadline-inf")
        stack.send_raw(_job(deadline_s=1e19), task_id="deadline-1e19")
        stack.send_raw(_job("hi \ud800"), task_id="surrogate-content")
        stack.send_raw(_job(params={"stop": "\udc00"}), task_id="surrogate-stop")
        stack.push_json(_job_json(500), task_id="nested-500")
        stack.push_json(_job_json(5_000), task_id="nested-5000")
        stack.push_json('{"agent": "support", "messages": [', task_id="not-json")
        ended = {job_id: _events(stack, job_id) for job_id in sent}

    for job_id, (kind, field, says) in sent.items():
        events = ended[job_id]
        assert [e["type"] for e in events] == ["failed"], job_id
        error = events[0]["error"]
        assert (error["kind"], error.get("field")) == (kind, field), job_id
        assert says in error["message"], job_id
    assert mock.count("primary") == 0


def test_a_job_id_ending_in_a_newline_is_not_used(stack: Stack, mock: MockLLM) -> None:
    """``job_id`` must match in full: with a trailing newline the task id is the job's."""
    with stack.worker("a", concurrency=1):
        stack.send_raw(_job(job_id="job-7\n"), task_id="task-7")
        events = _events(stack, "task-7")

    assert events[-1]["type"] == "completed"
    assert {e["job_id"] for e in events} == {"task-7"}
    assert stack.client.redis.exists(stack.client.keys.log("job-7\n")) == 0


def test_upstream_limits_come_from_the_settings(stack: Stack, mock: MockLLM) -> None:
    """RELIEVER_MAX_SSE_EVENT_BYTES and RELIEVER_MAX_COMPLETION_BYTES reach the worker's
    providers and executor: over either, the attempt is fatal and the chain moves on."""
    mock.script("primary", [Reply(text="x" * 3_000)])
    mock.script("backup", [Reply(text="from backup")])
    mock.script("slow", [Reply(text=" ".join(["word"] * 1_000))])  # 5 KB in 5-byte deltas
    with stack.worker(
        "a",
        concurrency=1,
        RELIEVER_MAX_SSE_EVENT_BYTES="2000",
        RELIEVER_MAX_COMPLETION_BYTES="4000",
    ):
        big_event = _events(stack, stack.client.submit("support", [_message("one")]).job_id)
        long_answer = _events(stack, stack.client.submit("slow", [_message("two")]).job_id)

    fallback = next(e for e in big_event if e["type"] == "fallback")
    assert (fallback["reason"], fallback["error"]["message"]) == (
        "fatal",
        "the event stream sent a line or an event over 2000 bytes",
    )
    assert big_event[-1]["text"] == "from backup"
    assert long_answer[-1]["type"] == "failed"
    assert long_answer[-1]["attempts"][0]["error"] == {
        "kind": "fatal",
        "message": "the completion is over 4000 bytes",
    }
    delivered = "".join(e["text"] for e in long_answer if e["type"] == "delta")
    assert len(delivered) == 4_000


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_prompt_reaches_the_worker_output_at_debug(
    stack: Stack, mock: MockLLM, log_format: str
) -> None:
    """A prompt holding a canary, made to fail every way there is (a lone surrogate in it
    or beside it, nesting too deep to validate or to decode, a body that is not JSON,
    upstream errors quoting it) and to succeed (the mock's answer quotes it): the canary
    is in the jobs' own events, and nowhere in the worker's output, DEBUG included, in
    either log format (the JSON one adds the records' extra fields)."""
    mock.script("primary", [Status(400, message=f"bad request near {CANARY!r}"), Reply()])
    mock.script("backup", [StreamError(message=f"oops: {CANARY}")])
    with stack.worker(
        "a", concurrency=1, RELIEVER_LOG_LEVEL="DEBUG", RELIEVER_LOG_FORMAT=log_format
    ) as worker:
        stack.send_raw(_job(f"{CANARY} \ud800"), task_id="surrogate")
        stack.send_raw(_job(CANARY, params={"stop": "\udfff"}), task_id="surrogate-stop")
        stack.push_json(_job_json(500, CANARY), task_id="nested-500")
        stack.push_json(_job_json(5_000, CANARY), task_id="nested-5000")
        stack.push_json(json.dumps(_job(CANARY))[:-2], task_id="not-json")
        stack.send_raw(_job(CANARY), task_id="upstream-errors")
        failed = [
            _events(stack, job_id)
            for job_id in ("surrogate", "surrogate-stop", "nested-500", "nested-5000", "not-json")
        ]
        quoted = _events(stack, "upstream-errors")
        stack.send_raw(_job(f"Tell me about {CANARY}"), task_id="answered")
        answered = _events(stack, "answered")

    output = worker.output()
    assert all([e["type"] for e in events] == ["failed"] for events in failed)
    assert quoted[-1]["error"]["kind"] == "all_models_failed"
    assert CANARY in json.dumps(quoted)
    assert answered[-1]["type"] == "completed"
    assert CANARY in answered[-1]["text"]
    assert "DEBUG" in output
    assert "TaskPool: Apply" in output
    assert CANARY not in output
