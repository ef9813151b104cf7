"""The job payload: validation at the edge, the field named, content never echoed."""

from __future__ import annotations

import uuid

import pytest

from worker.errors import InvalidJob
from worker.jobs import parse_job

LIMIT = 10_000
SECRET_PROMPT = "my private prompt text"


def _raw(**changes):
    raw = {"agent": "support", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    raw.update(changes)
    return raw


def test_parse_job_minimal_payload_gets_a_uuid4_job_id():
    """A job without job_id gets a fresh uuid4; the documented fields are kept."""
    job = parse_job(
        _raw(params={"max_tokens": 512, "temperature": 0.2}, deadline_s=120, metadata={"a": 1}),
        max_bytes=LIMIT,
    )

    assert uuid.UUID(job.job_id).version == 4
    assert job.params_dict() == {"max_tokens": 512, "temperature": 0.2}
    assert job.deadline_s == 120
    assert job.messages_list() == [{"role": "user", "content": SECRET_PROMPT, "tool_calls": []}]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        pytest.param({"messages": [{"role": "user", "content": "x"}]}, "agent", id="no-agent"),
        pytest.param(_raw(agent=""), "agent", id="empty-agent"),
        pytest.param(_raw(messages=[]), "messages", id="no-messages"),
        pytest.param(
            _raw(messages=[{"role": "wizard", "content": SECRET_PROMPT}]),
            "messages[0].role",
            id="bad-role",
        ),
        pytest.param(_raw(messages=[{"role": "tool", "content": "r"}]), "messages[0]", id="tool"),
        pytest.param(_raw(job_id="has spaces"), "job_id", id="bad-job-id"),
        pytest.param(_raw(deadline_s=-1), "deadline_s", id="negative-deadline"),
        pytest.param(_raw(params={"temperature": 5}), "params.temperature", id="temperature"),
        pytest.param(_raw(params={"api_key": "sk-x"}), "params.api_key", id="unknown-param"),
        pytest.param(_raw(base_url="http://evil"), "base_url", id="url-in-job"),
        pytest.param(_raw(tools=[{"name": "bad name!"}]), "tools[0].name", id="tool-name"),
    ],
)
def test_parse_job_invalid_field_is_named(raw, field):
    """Each invalid payload gives one InvalidJob naming the field, without echoing content."""
    with pytest.raises(InvalidJob) as caught:
        parse_job(raw, max_bytes=LIMIT)

    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert SECRET_PROMPT not in caught.value.message
    assert caught.value.info()["kind"] == "invalid_job"
    assert caught.value.info()["field"] == field


@pytest.mark.parametrize("raw", [[], "job", None, 3])
def test_parse_job_non_object_is_invalid(raw):
    """A payload that is not a JSON object is an invalid job."""
    with pytest.raises(InvalidJob, match="must be a JSON object"):
        parse_job(raw, max_bytes=LIMIT)


def test_parse_job_oversize_is_invalid_with_its_size():
    """A payload over the byte limit is refused before validation, naming its size."""
    raw = _raw(messages=[{"role": "user", "content": "x" * LIMIT}])

    with pytest.raises(InvalidJob) as caught:
        parse_job(raw, max_bytes=LIMIT)

    assert caught.value.field == "(job)"
    assert f"over the limit of {LIMIT}" in caught.value.message


def test_parse_job_several_problems_reports_the_first_and_counts_the_rest():
    """With several bad fields, the first is named and the rest are counted."""
    with pytest.raises(InvalidJob) as caught:
        parse_job({"agent": "", "messages": []}, max_bytes=LIMIT)

    assert caught.value.message.endswith("(and 1 more problem)")
