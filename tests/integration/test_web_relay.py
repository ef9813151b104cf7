"""The example web app over HTTP: submit, the SSE relay and Last-Event-ID, cancel, errors.

The browser-level behaviour (the page) is in tests/browser; this module checks the wire:
what the relay sends, and from where it resumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.web_support import (
    AGENT,
    BACKUP,
    PRIMARY,
    WebStack,
    read_events,
    running_web_stack,
    submit,
)
from worker.mockllm import MockLLM, Reply, Status

ANSWER = " ".join(f"tok{i}" for i in range(12))


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mock_server: MockLLM
) -> Iterator[WebStack]:
    with running_web_stack(tmp_path_factory.mktemp("web"), redis_url, mock_server) as stack:
        yield stack


@pytest.fixture
def http(web: WebStack, mock: MockLLM) -> Iterator[httpx.Client]:
    web.reset()
    with httpx.Client(base_url=web.url, timeout=httpx.Timeout(10, read=30)) as client:
        yield client


def test_web_chat_relays_every_event_with_seq_as_id_until_the_terminal_one(
    http: httpx.Client, web: WebStack, mock: MockLLM
) -> None:
    """POST /chat submits to the demo agent; the SSE relay sends events 1..N, id = seq."""
    mock.script(PRIMARY, [Reply(text=ANSWER)])

    job_id = submit(http)
    pairs = read_events(http, job_id)

    events = [event for _id, event in pairs]
    assert [sse_id for sse_id, _e in pairs] == [str(e["seq"]) for e in events]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "started"
    assert events[0]["agent"] == AGENT
    assert events[-1]["type"] == "completed"
    assert events[-1]["text"] == ANSWER
    assert "".join(e["text"] for e in events if e["type"] == "delta") == ANSWER
    assert all(e["job_id"] == job_id for e in events)


def test_web_last_event_id_resumes_after_it_and_204_after_the_end(
    http: httpx.Client, mock: MockLLM
) -> None:
    """Last-Event-ID (header, or ?last_event_id= for a reloaded page) skips what the reader
    has; a reader that has the terminal event gets 204, so EventSource stops reconnecting."""
    mock.script(PRIMARY, [Reply(text=ANSWER)])
    job_id = submit(http)
    everything = [e for _id, e in read_events(http, job_id)]
    last = everything[-1]["seq"]
    seen = str(everything[1]["seq"])

    after_header = read_events(http, job_id, headers={"Last-Event-ID": seen})
    after_query = read_events(http, job_id, params={"last_event_id": seen})
    header_wins = http.get(
        f"/chat/{job_id}/events?last_event_id=1", headers={"Last-Event-ID": str(last)}
    )
    at_end = http.get(f"/chat/{job_id}/events", headers={"Last-Event-ID": str(last)})
    bad = http.get(f"/chat/{job_id}/events", headers={"Last-Event-ID": "seven"})

    assert [e for _i, e in after_header] == everything[2:]
    assert [e for _i, e in after_query] == everything[2:]
    assert header_wins.status_code == 204
    assert at_end.status_code == 204
    assert bad.status_code == 400


def test_web_reconnect_mid_stream_continues_without_gaps_or_repeats(
    http: httpx.Client, mock: MockLLM
) -> None:
    """A reader that drops mid-stream and comes back with Last-Event-ID gets the rest, once."""
    words = " ".join(f"slow{i}" for i in range(30))
    mock.script(PRIMARY, [Reply(text=words, delay_s=0.05)])
    job_id = submit(http)

    first = [e for _i, e in read_events(http, job_id, stop_after=6)]
    rest = [e for _i, e in read_events(http, job_id, headers={"Last-Event-ID": "6"})]

    assert first[-1]["type"] == "delta"
    assert rest[0]["type"] == "delta"
    assert [e["seq"] for e in first + rest] == list(range(1, len(first) + len(rest) + 1))
    assert rest[-1]["type"] == "completed"
    deltas = "".join(e["text"] for e in first + rest if e["type"] == "delta")
    assert deltas == rest[-1]["text"] == words


def test_web_cancel_ends_the_stream_failed_cancelled(http: httpx.Client, mock: MockLLM) -> None:
    """POST /chat/{id}/cancel mid-stream ends the job: the relay's last event is failed."""
    mock.script(PRIMARY, [Reply(text=" ".join(["word"] * 200), delay_s=0.05)])
    job_id = submit(http)
    started = read_events(http, job_id, stop_after=4)

    cancelled = http.post(f"/chat/{job_id}/cancel", json={})
    rest = [e for _i, e in read_events(http, job_id, headers={"Last-Event-ID": "4"})]

    assert started[-1][1]["type"] == "delta"
    assert cancelled.status_code == 202
    assert rest[-1]["type"] == "failed"
    assert rest[-1]["error"]["kind"] == "cancelled"


def test_web_retry_and_fallback_events_reach_the_browser_stream(
    http: httpx.Client, mock: MockLLM
) -> None:
    """A failing primary shows up in the relay as retry (with discard) and fallback events."""
    mock.script(PRIMARY, [Status(503), Status(429)])
    mock.script(BACKUP, [Reply(text=ANSWER)])

    events = [e for _i, e in read_events(http, submit(http))]

    types = [e["type"] for e in events]
    assert types.count("retry") == 1
    assert types.count("fallback") == 1
    fallback = events[types.index("fallback")]
    assert (fallback["from"], fallback["to"]) == (PRIMARY, BACKUP)
    assert events[-1]["model"] == BACKUP


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/chat", {"prompt": "   "}, 400),
        ("POST", "/chat", {"text": "wrong field"}, 400),
        ("POST", "/chat", {"prompt": "x" * 20_001}, 413),
        ("GET", "/chat/bad id!/events", None, 404),
        ("POST", "/chat/bad id!/cancel", {}, 404),
    ],
    ids=["blank-prompt", "no-prompt", "too-long", "bad-id-events", "bad-id-cancel"],
)
def test_web_rejects_bad_requests(
    http: httpx.Client, method: str, path: str, body: Any, status: int
) -> None:
    """Bad prompts and malformed job ids are refused with a status and a JSON error."""
    response = http.request(method, path, json=body)

    assert response.status_code == status
    assert "error" in response.json()


def test_web_page_names_the_agent(http: httpx.Client) -> None:
    """GET / serves the chat page for the configured agent; its script is a static file."""
    page = http.get("/")
    script = http.get("/static/app.js")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert f'<b id="agent">{AGENT}</b>' in page.text
    assert '<script src="/static/app.js"></script>' in page.text
    assert script.status_code == 200
    assert script.headers["content-type"].startswith("text/javascript")
    assert "new EventSource(" in script.text
