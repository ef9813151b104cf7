"""The example web app in headless Chromium: a real worker, real Redis, the mock upstream.

Each test drives the page as a person would (type, send, reload, cancel) and waits on the
page's own state with Playwright's ``wait_for_*`` (bounded), never on a sleep. The page
records the seqs it received off the wire in ``window.relieverPage.receivedSeqs``, which
is how the tests tell a resumed stream from a replayed one.

``UPDATE_SCREENSHOTS=1`` also writes the finished fallback page to docs/web-app.png.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.http_support import ROOT, free_port, running_service
from tests.web_support import BACKUP, PRIMARY, WebStack, running_web_stack
from worker.mockllm import Cut, MockLLM, Reply, Status

pytestmark = pytest.mark.browser

WAIT_MS = 20_000
ANSWER = " ".join(
    "Celery hands each job to a worker, and reliever streams its tokens back through Redis."
    for _ in range(2)
)
BACKUP_ANSWER = (
    "The fallback model answered: the primary was retried after a 503, its cut stream was "
    "discarded, and a 429 moved the job to the next model at once."
)


@pytest.fixture(scope="module")
def web(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, mock_server: MockLLM
) -> Iterator[WebStack]:
    with running_web_stack(tmp_path_factory.mktemp("web"), redis_url, mock_server) as stack:
        yield stack


@pytest.fixture
def page(browser: Any, web: WebStack, mock: MockLLM) -> Iterator[Any]:
    web.reset()
    context = browser.new_context(viewport={"width": 960, "height": 600})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.goto(web.url)
    yield tab
    context.close()


# Records every Content-Security-Policy violation in the page, from before its own script runs.
CSP_RECORDER = """
window.cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.cspViolations.push(e.effectiveDirective + " " + e.blockedURI);
});
"""
INLINE_SCRIPT = """() => {
  const script = document.createElement("script");
  script.textContent = "window.inlineRan = true";
  document.body.append(script);
}"""


# What a page on another origin can send without a CORS preflight: a "simple request".
FORGED_POST = """url => fetch(url, {
  method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
  body: JSON.stringify({prompt: "sent by another site"}),
}).then(() => "sent")"""


class _OtherSite(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another site</title><p>Nothing to see here."
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads what the browser did, not this server's log."""


@pytest.fixture(scope="module")
def other_origin() -> Iterator[str]:
    """A page served from another port of this machine: another origin, open in the same
    browser as the chat page."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OtherSite)
    thread = threading.Thread(target=server.serve_forever, name="other-site", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def ask(page: Any, prompt: str) -> None:
    page.fill("#prompt", prompt)
    page.click("#send")


def wait_state(page: Any, state: str) -> None:
    page.wait_for_function("s => document.body.dataset.state === s", arg=state)


def wait_words(page: Any, count: int) -> str:
    """Wait until the answer shows at least ``count`` words while still streaming."""
    page.wait_for_function(
        "n => document.querySelector('#answer').textContent.trim().split(/\\s+/).length >= n",
        arg=count,
    )
    answer: str = page.text_content("#answer")
    return answer


def timeline(page: Any, kind: str) -> list[str]:
    texts: list[str] = page.locator(f'#timeline li[data-type="{kind}"]').all_text_contents()
    return texts


def received(page: Any) -> dict[str, Any]:
    seen: dict[str, Any] = page.evaluate("() => window.relieverPage")
    return seen


def test_page_streams_tokens_and_names_the_model(page: Any, mock: MockLLM) -> None:
    """Typing a prompt streams the answer token by token and names the model that answered."""
    mock.script(PRIMARY, [Reply(text=ANSWER, delay_s=0.08)])

    ask(page, "How does reliever stream tokens?")
    partial = wait_words(page, 3)
    state_mid_stream = page.evaluate("() => document.body.dataset.state")
    wait_state(page, "completed")

    assert state_mid_stream == "streaming"
    assert partial
    assert ANSWER.startswith(partial)
    assert len(partial) < len(ANSWER)
    assert page.text_content("#answer") == ANSWER
    assert page.text_content("#model") == f"answered by {PRIMARY}"
    assert timeline(page, "attempt") == [f"#2attempt 1/3 on {PRIMARY}"]
    assert len(timeline(page, "completed")) == 1
    assert page.locator("li.corrected").count() == 0
    assert page.is_disabled("#cancel")


def test_page_works_under_its_content_security_policy(
    page: Any, web: WebStack, mock: MockLLM
) -> None:
    """The page submits, streams and finishes under its CSP without a single violation;
    an inline script, which the policy forbids, is refused and recorded as one."""
    mock.script(PRIMARY, [Reply(text=ANSWER, delay_s=0.02)])
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.context.add_init_script(CSP_RECORDER)
    response = page.goto(web.url)
    assert "default-src 'self'" in response.headers["content-security-policy"]

    ask(page, "Does the page keep to its policy?")
    wait_state(page, "completed")
    violations = page.evaluate("() => window.cspViolations")
    console_while_working = list(console)
    page.evaluate(INLINE_SCRIPT)
    page.wait_for_function("() => window.cspViolations.length > 0")

    assert violations == []
    assert not [text for text in console_while_working if "Content Security Policy" in text]
    assert page.text_content("#answer") == ANSWER
    assert page.evaluate("() => window.inlineRan") is None
    assert page.evaluate("() => window.cspViolations") == ["script-src-elem inline"]


def test_page_shows_retries_and_fallback_and_drops_discarded_text(
    page: Any, mock: MockLLM, tmp_path: Path
) -> None:
    """A 503, a cut stream and a 429 show as retries and a fallback; the cut attempt's text
    is dropped, and the answer is only the fallback's, named as the model that answered."""
    mock.script(PRIMARY, [Status(503), Cut(after_chunks=3), Status(429, retry_after="3")])
    mock.script(BACKUP, [Reply(text=BACKUP_ANSWER, delay_s=0.02)])

    ask(page, "What happens when the primary model fails?")
    wait_state(page, "completed")

    retries = timeline(page, "retry")
    fallbacks = timeline(page, "fallback")
    assert len(retries) == 2
    assert "retryable 503" in retries[0]
    assert "discarded" not in retries[0]
    assert "discarded 10 characters" in retries[1]  # "Here is a " from the cut stream
    assert len(fallbacks) == 1
    assert f"fallback {PRIMARY} → {BACKUP} after rate_limited 429" in fallbacks[0]
    assert page.text_content("#answer") == BACKUP_ANSWER
    assert "Here is" not in page.text_content("#answer")
    assert page.text_content("#model") == f"answered by {BACKUP}"
    assert page.text_content("#attempt") == "4 attempts · fallback used"
    assert page.locator("li.corrected").count() == 0

    shot = tmp_path / "web-app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("UPDATE_SCREENSHOTS"):
        shutil.copyfile(shot, ROOT / "docs" / "web-app.png")


def test_page_reload_mid_stream_resumes_without_duplicates(page: Any, mock: MockLLM) -> None:
    """Reloading mid-stream restores the page and resumes after its last seq, not from 1."""
    mock.script(PRIMARY, [Reply(text=ANSWER, delay_s=0.1)])
    ask(page, "Reload me halfway")
    wait_words(page, 5)

    page.reload()
    page.wait_for_function("() => window.relieverPage.resumedAfter !== null")
    resumed_after = received(page)["resumedAfter"]
    wait_state(page, "completed")

    after = received(page)
    seqs = [int(s) for s in page.locator("#timeline li[data-seq]").evaluate_all(
        "items => items.map(li => li.dataset.seq)"
    )]  # fmt: skip
    assert resumed_after >= 7  # started, attempt and at least five deltas came before
    assert after["receivedSeqs"] == list(
        range(resumed_after + 1, resumed_after + 1 + len(after["receivedSeqs"]))
    )
    assert after["duplicates"] == 0
    assert seqs == sorted(set(seqs))
    assert page.text_content("#answer") == ANSWER
    assert page.locator("li.resumed").count() == 1
    assert page.locator("li.corrected").count() == 0


def test_page_reconnects_with_last_event_id_when_the_server_restarts(
    browser: Any, web: WebStack, mock: MockLLM
) -> None:
    """When the web app dies mid-stream, EventSource reconnects by itself and the server
    resumes after its Last-Event-ID: no event is shown twice or lost."""
    web.reset()
    mock.script(PRIMARY, [Reply(text=ANSWER, delay_s=0.1)])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "examples.web", "--host", "127.0.0.1", "--port", str(port)]
    context = browser.new_context()
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    try:
        with running_service(cmd, web.env, ready_url=f"{url}/healthz", name="web app") as first:
            tab.goto(url)
            ask(tab, "Survive a restart")
            wait_words(tab, 5)
            first.kill()
            wait_state(tab, "reconnecting")
            with running_service(cmd, web.env, ready_url=f"{url}/healthz", name="web app again"):
                wait_state(tab, "completed")
                after = received(tab)
                answer = tab.text_content("#answer")
    finally:
        context.close()

    seqs = after["receivedSeqs"]
    assert seqs == list(range(1, len(seqs) + 1))
    assert after["duplicates"] == 0
    assert after["resumedAfter"] is None
    assert answer == ANSWER


def test_page_cancel_ends_the_job_cancelled(page: Any, mock: MockLLM) -> None:
    """The cancel button stops a streaming job; the page shows it ended cancelled."""
    mock.script(PRIMARY, [Reply(text=" ".join(["word"] * 300), delay_s=0.05)])
    ask(page, "A long answer, please")
    wait_words(page, 3)

    page.click("#cancel")
    wait_state(page, "cancelled")

    failed = timeline(page, "failed")
    assert len(failed) == 1
    assert "cancelled" in failed[0]
    assert page.text_content("#status") == "cancelled"
    assert 3 <= len(page.text_content("#answer").split()) < 300
    assert page.is_disabled("#cancel")
    assert page.is_enabled("#send")


def test_page_on_another_origin_cannot_submit_or_cancel(
    page: Any, web: WebStack, mock: MockLLM, other_origin: str
) -> None:
    """While the visitor's job streams, a page on another origin in the same browser posts
    what it can post without a preflight (text/plain, no-cors) to submit a job and to
    cancel the visitor's: the app answers both 403 (its Origin is not the app's), and the
    visitor's job completes. The other page is on the same site as the app (127.0.0.1,
    another port), which SameSite alone does not tell apart."""
    mock.script(PRIMARY, [Reply(text=ANSWER, delay_s=0.1)])
    ask(page, "Only I may cancel this")
    wait_words(page, 3)
    job_id = page.evaluate("() => location.hash.slice('#job='.length)")
    other = page.context.new_page()
    other.goto(other_origin)

    statuses = {}
    for path in ("/chat", f"/chat/{job_id}/cancel"):
        with other.expect_response(f"{web.url}{path}") as response:
            other.evaluate(FORGED_POST, f"{web.url}{path}")
        statuses[path] = response.value.status
    assert statuses == {"/chat": 403, f"/chat/{job_id}/cancel": 403}
    wait_state(page, "completed")

    assert page.text_content("#answer") == ANSWER
    assert timeline(page, "failed") == []
