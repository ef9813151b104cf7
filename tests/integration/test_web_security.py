"""The example web app's protections over HTTP: security headers on every response.

The browser's side of the same protections (the page under its CSP) is in
tests/browser/test_web_app.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.web_support import PRIMARY, WebStack, running_web_stack
from worker.mockllm import MockLLM, Reply


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mock_server: MockLLM
) -> Iterator[WebStack]:
    with running_web_stack(tmp_path_factory.mktemp("web"), redis_url, mock_server) as stack:
        yield stack


@pytest.fixture
def http(web: WebStack, mock: MockLLM) -> Iterator[httpx.Client]:
    web.reset_cooldown()
    with httpx.Client(base_url=web.url, timeout=httpx.Timeout(10, read=30)) as client:
        yield client


def assert_security_headers(response: httpx.Response, what: str) -> None:
    csp = {
        directive.strip()
        for directive in response.headers.get("content-security-policy", "").split(";")
    }
    assert "default-src 'self'" in csp, what
    assert "frame-ancestors 'none'" in csp, what
    assert not any("unsafe" in directive for directive in csp), what
    assert response.headers.get("x-frame-options") == "DENY", what
    assert response.headers.get("x-content-type-options") == "nosniff", what
    assert response.headers.get("referrer-policy") == "no-referrer", what


def test_web_sends_security_headers_on_every_response(http: httpx.Client, mock: MockLLM) -> None:
    """The page, its script, JSON answers and errors, and the event stream all carry a CSP
    that allows the app's own origin only, no framing, nosniff and no referrer."""
    mock.script(PRIMARY, [Reply(text="a short answer")])
    submitted = http.post("/chat", json={"prompt": "headers, please"})
    job_id = submitted.json()["job_id"]
    responses = {
        "page": http.get("/"),
        "script": http.get("/static/app.js"),
        "style": http.get("/static/app.css"),
        "health": http.get("/healthz"),
        "JSON error": http.get("/chat/not an id/events"),
        "unknown route": http.get("/nowhere"),
        "submit": submitted,
    }
    with http.stream("GET", f"/chat/{job_id}/events") as stream:
        responses["event stream"] = stream

    assert submitted.status_code == 202
    assert stream.headers["content-type"].startswith("text/event-stream")
    for what, response in responses.items():
        assert_security_headers(response, what)
