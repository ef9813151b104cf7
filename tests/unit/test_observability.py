"""Sentry scrubbing, the log formatters and Celery's content filter, on crafted inputs."""

from __future__ import annotations

import json
import logging
from typing import Any

from settings import Settings
from worker.observability import (
    FIELDS,
    CeleryContentFilter,
    JsonFormatter,
    Scrubber,
    TextFormatter,
    init_sentry,
    secret_values,
)

KEY = "sk-unit-test-key-0123456789abcdef"
GOOGLE_KEY = "AIzaSyUnitTestKey0123456789abcdefgh"
PROMPT = "the secret recipe for quince marmalade"


def _event() -> dict[str, Any]:
    return {
        "message": "job failed: fatal",
        "tags": {"agent": "support", "error.kind": "fatal"},
        "request": {
            "url": f"https://example.test/v1beta/models/g:stream?key={GOOGLE_KEY}&alt=sse",
            "headers": {
                "Authorization": f"Bearer {KEY}",
                "x-api-key": KEY,
                "X-Goog-Api-Key": GOOGLE_KEY,
                "Content-Type": "application/json",
            },
            "data": {"messages": [{"role": "user", "content": PROMPT}]},
        },
        "extra": {
            "job": {"job_id": "j1", "messages": [{"content": PROMPT}], "params": {"n": 1}},
            "note": f"called with api key {KEY}",
        },
        "exception": {
            "values": [
                {
                    "type": "RuntimeError",
                    "value": f"upstream said: Authorization: Bearer {KEY}",
                    "stacktrace": {
                        "frames": [{"function": "send", "vars": {"prompt": PROMPT, "api_key": KEY}}]
                    },
                }
            ]
        },
        "breadcrumbs": {
            "values": [{"category": "reliever.job", "data": {"text": PROMPT, "model": "fast"}}]
        },
    }


def test_scrubber_before_send_removes_content_keys_and_bodies() -> None:
    """No prompt and no key survive before_send, wherever they were in the event."""
    scrubber = Scrubber([KEY])

    out = scrubber.before_send(_event(), {})  # type: ignore[arg-type]

    raw = json.dumps(out)
    assert out is not None
    assert KEY not in raw
    assert GOOGLE_KEY not in raw
    assert "quince" not in raw
    assert "data" not in out["request"]
    assert out["request"]["headers"]["Authorization"] == "[Filtered]"
    assert out["request"]["headers"]["x-api-key"] == "[Filtered]"
    assert out["request"]["headers"]["X-Goog-Api-Key"] == "[Filtered]"
    assert out["request"]["headers"]["Content-Type"] == "application/json"
    assert "vars" not in out["exception"]["values"][0]["stacktrace"]["frames"][0]


def test_scrubber_before_send_keeps_what_operators_need() -> None:
    """Tags, the message, the exception type and ids stay readable."""
    out = Scrubber([KEY]).before_send(_event(), {})  # type: ignore[arg-type]

    assert out is not None
    assert out["tags"] == {"agent": "support", "error.kind": "fatal"}
    assert out["message"] == "job failed: fatal"
    assert out["exception"]["values"][0]["type"] == "RuntimeError"
    assert (
        out["exception"]["values"][0]["value"] == "upstream said: Authorization: Bearer [Filtered]"
    )
    assert out["extra"]["job"]["job_id"] == "j1"
    assert out["extra"]["job"]["params"] == {"n": 1}


def test_scrubber_scrubs_key_shapes_it_was_not_told_about() -> None:
    """Bearer tokens, sk- keys, Google keys and ?key= parameters go even when unknown."""
    scrubber = Scrubber()

    text = scrubber.scrub_text(
        f"Bearer abc.def-ghi sk-proj-{'x' * 20} {GOOGLE_KEY} https://h/p?alt=sse&key=zzz#f"
    )

    assert text == "Bearer [Filtered] [Filtered] [Filtered] https://h/p?alt=sse&key=[Filtered]#f"


def test_scrubber_before_breadcrumb_keeps_ours_and_http_drops_the_rest() -> None:
    """Only reliever.* crumbs, our loggers' and HTTP crumbs pass; Celery's and Redis's do not."""
    scrubber = Scrubber([KEY])
    http = {
        "category": "httpx",
        "data": {"url": f"https://h/v1?key={GOOGLE_KEY}", "http.query": f"key={GOOGLE_KEY}"},
    }

    kept_http = scrubber.before_breadcrumb(http, {})  # type: ignore[arg-type]
    kept_ours = scrubber.before_breadcrumb(
        {"category": "reliever.job", "data": {"model": "fast", "text": PROMPT}}, {}
    )
    dropped = [
        scrubber.before_breadcrumb({"category": c, "message": "x"}, {})
        for c in ("celery.app.trace", "redis", "kombu.mixins", "worker.observer", "")
    ]

    assert kept_http is not None
    assert GOOGLE_KEY not in json.dumps(kept_http)
    assert kept_ours == {
        "category": "reliever.job",
        "data": {"model": "fast", "text": "[Filtered]"},
    }
    assert dropped == [None] * 5


def test_secret_values_take_key_like_names_and_named_ones() -> None:
    """Values of *KEY*/*TOKEN*/*SECRET* variables and of the named ones; never short or the DSN."""
    env = {
        "OPENAI_API_KEY": "sk-aaaaaaaaaaaa",
        "MY_TOKEN": "tok-bbbbbbbbbbbb",
        "PROVIDER_CRED": "cred-cccccccccccc",
        "HOME": "/root",
        "RELIEVER_SENTRY_DSN": "http://public@host/1",
        "SHORT_KEY": "abc",
    }

    values = secret_values(env, names=["PROVIDER_CRED"])

    assert set(values) == {"sk-aaaaaaaaaaaa", "tok-bbbbbbbbbbbb", "cred-cccccccccccc", "abc"}
    scrubbed = Scrubber(values).scrub_text("sk-aaaaaaaaaaaa tok-bbbbbbbbbbbb abc")
    assert scrubbed == "[Filtered] [Filtered] abc"  # too short to scrub safely


def _record(name: str, msg: str, args: Any = None, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_formatter_puts_fields_at_the_top_level() -> None:
    """A line with structured fields becomes one JSON object with those keys."""
    fields = {"job_id": "j1", "agent": "support", "attempt": 2, "latency_s": 0.25}
    record = _record("worker.observer", "attempt ended", **{FIELDS: fields})

    out = json.loads(JsonFormatter().format(record))

    assert out["message"] == "attempt ended"
    assert out["logger"] == "worker.observer"
    assert out["level"] == "INFO"
    assert {k: out[k] for k in fields} == fields


def test_text_formatter_appends_key_value_pairs() -> None:
    """The text format shows the same fields as key=value after the message."""
    record = _record(
        "worker.observer", "job ended", **{FIELDS: {"job_id": "j1", "kind": "ok", "s": 1.5}}
    )

    line = TextFormatter().format(record)

    assert line.endswith("INFO worker.observer: job ended job_id=j1 kind=ok s=1.500")


def test_celery_content_filter_hides_arguments_and_results() -> None:
    """Celery's success line shows the task id, never the job's messages or result text."""
    context = {
        "id": "j1",
        "name": "reliever.complete",
        "return_value": f"{{'text': '{PROMPT}'}}",
        "runtime": 0.5,
        "args": f"({{'messages': [{{'content': '{PROMPT}'}}]}},)",
        "kwargs": "{}",
    }
    record = _record(
        "celery.app.trace",
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
        context,
        data=context,
    )

    assert CeleryContentFilter().filter(record)
    text = TextFormatter().format(record)
    as_json = JsonFormatter().format(record)

    assert "quince" not in text
    assert "quince" not in as_json
    assert "reliever.complete[j1] succeeded in 0.5s: (not logged)" in text


def test_celery_content_filter_hides_what_the_pool_applies_at_debug() -> None:
    """The pool's DEBUG line about running a task shows the function, not the message's
    headers (``argsrepr``, the decoded ``args``) nor its body."""
    headers = {"id": "j1", "argsrepr": f"[{{'content': '{PROMPT}'}}]"}
    body = f'[[{{"messages": [{{"content": "{PROMPT}"}}]}}], {{}}, {{}}]'.encode()
    record = _record(
        "celery.pool",
        "TaskPool: Apply %s (args:%s kwargs:%s)",
        ("<function fast_trace_task>", repr(("reliever.complete", "j1", headers, body)), "{}"),
    )

    assert CeleryContentFilter().filter(record)
    text = TextFormatter().format(record)

    assert "quince" not in text
    assert "TaskPool: Apply <function fast_trace_task> (args:(not logged)" in text


def test_init_sentry_is_off_without_a_dsn() -> None:
    """No SENTRY_DSN, no Sentry."""
    assert init_sentry(Settings(_env_file=None)) is False
