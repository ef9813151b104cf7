"""The example web app's protections over HTTP: JSON-only POSTs from the page's own origin,
a job's events and cancel for the session that submitted it only, jobs limited per
session and per client address, security headers on every response.

The browser's side of the same protections (the page working under its CSP, a page on
another origin refused) is in tests/browser/test_web_app.py.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator

import httpx
import pytest
from pydantic import ValidationError

from examples.web.app import WebSettings
from tests.http_support import free_port, running_service
from tests.web_support import PRIMARY, WebStack, read_events, running_web_stack, submit
from worker.mockllm import MockLLM, Reply

OWN = "the web app's own origin"


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


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None],
    ids=["text", "form", "multipart", "none"],
)
def test_web_refuses_posts_that_are_not_json(
    http: httpx.Client, web: WebStack, content_type: str | None
) -> None:
    """Any page can make a browser POST text, form or multipart bodies to another origin with
    no preflight: submit and cancel answer them 415, whatever the body says."""
    job_id = str(uuid.uuid4())
    body = json.dumps({"prompt": "submitted as a simple request"})
    headers = {} if content_type is None else {"Content-Type": content_type}

    chat = http.post("/chat", content=body, headers=headers)
    cancel = http.post(f"/chat/{job_id}/cancel", content=body, headers=headers)

    assert (chat.status_code, cancel.status_code) == (415, 415)
    assert "error" in chat.json()
    assert not web.redis.exists(web.keys.cancel(job_id))


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://attacker.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost:1"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": OWN, "Sec-Fetch-Site": "cross-site"},
    ],
    ids=["other-site", "opaque", "other-port", "fetch-cross-site", "fetch-same-site", "mixed"],
)
def test_web_refuses_posts_from_other_origins(
    http: httpx.Client, web: WebStack, headers: dict[str, str]
) -> None:
    """A JSON POST whose Origin is not the app's, or whose Sec-Fetch-Site says another page
    sent it, is refused with 403: submit and cancel alike."""
    sent = {name: web.url if value == OWN else value for name, value in headers.items()}
    job_id = str(uuid.uuid4())

    chat = http.post("/chat", json={"prompt": "from another origin"}, headers=sent)
    cancel = http.post(f"/chat/{job_id}/cancel", json={}, headers=sent)

    assert (chat.status_code, cancel.status_code) == (403, 403)
    assert "error" in chat.json()
    assert not web.redis.exists(web.keys.cancel(job_id))


def test_web_accepts_json_from_its_own_origin(http: httpx.Client, mock: MockLLM) -> None:
    """What the page sends (JSON, its own Origin, Sec-Fetch-Site: same-origin) and what a
    program sends (JSON, neither header) are accepted. The first submit starts a session:
    an HttpOnly, SameSite=Strict cookie that the later requests carry."""
    mock.script(PRIMARY, [Reply(text="accepted")])
    page_headers = {"Origin": str(http.base_url).rstrip("/"), "Sec-Fetch-Site": "same-origin"}

    from_page = http.post("/chat", json={"prompt": "from the page"}, headers=page_headers)
    job_id = from_page.json()["job_id"]
    cancel = http.post(f"/chat/{job_id}/cancel", json={}, headers=page_headers)
    from_program = http.post(
        "/chat",
        content=json.dumps({"prompt": "from a program"}),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )

    assert from_page.status_code == 202
    cookie = from_page.headers["set-cookie"]
    assert cookie.startswith("reliever_session=")
    assert "httponly" in cookie.lower()
    assert "samesite=strict" in cookie.lower()
    assert "path=/" in cookie.lower()
    assert cancel.status_code == 202
    assert from_program.status_code == 202
    assert "set-cookie" not in from_program.headers


def test_web_allowed_origins_replace_the_one_the_host_names(web: WebStack) -> None:
    """RELIEVER_WEB_ALLOWED_ORIGINS lists the origins the page is served from (a proxy's
    public origin, say): those are accepted, and the origin the Host header names is not."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **web.env,
        "RELIEVER_WEB_ALLOWED_ORIGINS": "https://chat.example.org, http://localhost:8000/",
    }
    cmd = [sys.executable, "-m", "examples.web", "--host", "127.0.0.1", "--port", str(port)]
    prompt = {"prompt": "through the proxy"}
    with (
        running_service(cmd, env, ready_url=f"{url}/healthz", name="web app behind a proxy"),
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        public = http.post("/chat", json=prompt, headers={"Origin": "https://chat.example.org"})
        listed = http.post("/chat", json=prompt, headers={"Origin": "http://localhost:8000"})
        by_host = http.post("/chat", json=prompt, headers={"Origin": url})

    assert (public.status_code, listed.status_code, by_host.status_code) == (202, 202, 403)


def test_web_allowed_origins_setting_is_a_list_of_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Comma- or space-separated origins, kept lowercase without a trailing slash; a URL
    with a path is not an origin and is refused."""
    monkeypatch.setenv(
        "RELIEVER_WEB_ALLOWED_ORIGINS", "https://Chat.Example.org/, http://localhost:8000"
    )
    parsed = WebSettings(_env_file=None).allowed_origins
    monkeypatch.setenv("RELIEVER_WEB_ALLOWED_ORIGINS", "https://chat.example.org/app")

    assert parsed == ["https://chat.example.org", "http://localhost:8000"]
    with pytest.raises(ValidationError, match="expected an origin"):
        WebSettings(_env_file=None)


def test_web_events_and_cancel_answer_only_the_submitting_session(
    http: httpx.Client, web: WebStack, mock: MockLLM
) -> None:
    """Another session, no session, or the owner's session id with a made-up signature get
    404 for a job's events and cancel, exactly as for a job that does not exist, and their
    cancel does nothing; the session that submitted the job reads its events and cancels it."""
    mock.script(PRIMARY, [Reply(text=" ".join(["word"] * 200), delay_s=0.05), Reply(text="ok")])
    job_id = submit(http, "my job")
    first = read_events(http, job_id, stop_after=3)
    session_id = http.cookies["reliever_session"].partition(".")[0]
    unknown = str(uuid.uuid4())
    answers: dict[str, list[tuple[int, object]]] = {}
    with (
        httpx.Client(base_url=web.url, timeout=10) as other_session,
        httpx.Client(base_url=web.url, timeout=10) as no_session,
        httpx.Client(
            base_url=web.url, timeout=10, cookies={"reliever_session": f"{session_id}.forged"}
        ) as forged,
    ):
        submit(other_session, "someone else's job")
        for name, client in [("other", other_session), ("none", no_session), ("forged", forged)]:
            events = client.get(f"/chat/{job_id}/events")
            cancel = client.post(f"/chat/{job_id}/cancel", json={})
            answers[name] = [(r.status_code, r.json()) for r in (events, cancel)]
    never_was = http.get(f"/chat/{unknown}/events")
    stranger_cancelled = web.redis.exists(web.keys.cancel(job_id))

    cancelled = http.post(f"/chat/{job_id}/cancel", json={})
    rest = [event for _id, event in read_events(http, job_id, headers={"Last-Event-ID": "3"})]

    not_found = {"error": "unknown job id"}
    assert (never_was.status_code, never_was.json()) == (404, not_found)
    assert answers == {name: [(404, not_found)] * 2 for name in ("other", "none", "forged")}
    assert not stranger_cancelled
    assert first[-1][1]["type"] == "delta"
    assert cancelled.status_code == 202
    assert rest[-1]["type"] == "failed"
    assert rest[-1]["error"]["kind"] == "cancelled"


def test_web_limits_jobs_per_session_and_per_address(web: WebStack, mock: MockLLM) -> None:
    """Over RELIEVER_WEB_JOBS_PER_SESSION (2 here) a session's next submit gets 429 with
    Retry-After; a new session gets its own count, until the address has used up
    RELIEVER_WEB_JOBS_PER_IP (4 here): then a session that has used none gets 429 too."""
    web.reset()
    mock.script(PRIMARY, [Reply(text="ok")])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**web.env, "RELIEVER_WEB_JOBS_PER_SESSION": "2", "RELIEVER_WEB_JOBS_PER_IP": "4"}
    cmd = [sys.executable, "-m", "examples.web", "--host", "127.0.0.1", "--port", str(port)]
    prompt = {"prompt": "one more"}
    with (
        running_service(cmd, env, ready_url=f"{url}/healthz", name="web app with low limits"),
        httpx.Client(base_url=url, timeout=10) as first,
        httpx.Client(base_url=url, timeout=10) as second,
        httpx.Client(base_url=url, timeout=10) as third,
    ):
        by_first = [first.post("/chat", json=prompt) for _ in range(3)]
        by_second = [second.post("/chat", json=prompt) for _ in range(2)]
        by_third = third.post("/chat", json=prompt)

    over = [by_first[2], by_second[1], by_third]
    assert [r.status_code for r in by_first] == [202, 202, 429]
    assert [r.status_code for r in by_second] == [202, 429]
    assert by_third.status_code == 429
    for response in over:
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert "error" in response.json()
