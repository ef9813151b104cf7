"""What a worker process reports, and how: log lines, Sentry, and the start-up of each channel.

Owns the logging setup (plain text or one JSON object per line), Sentry's initialisation and
scrubbing, and :func:`start_observability`, which a worker calls once at start (Celery's
``celeryd_init`` signal) to switch on Sentry, traces (``worker.tracing``) and the metrics
endpoint (``worker.metrics``). What is observed about each job lives in ``worker.observer``.

Nothing here may carry message content or keys:

- Sentry runs without default PII (``send_default_pii`` left off) and without frame locals
  (``include_local_variables=False``); a ``before_send`` drops request bodies and any frame
  locals, filters every field whose name says content or credential (``messages``,
  ``content``, ``text``, ``authorization``, ``x-api-key``, ``x-goog-api-key`` …) anywhere in
  the event, and replaces inside every string the values of the process's key variables,
  bearer tokens and ``?key=`` parameters.
- ``before_breadcrumb`` keeps only our own and the HTTP crumbs, scrubbed the same way: Celery's
  log lines carry task return values (completion text) and Redis crumbs would flood.
- Only the integrations we chose run (Celery, httpx, and Sentry's defaults such as logging);
  the auto-enabled ones (Redis, the OpenAI and Anthropic SDKs …) stay off.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.httpx import HttpxIntegration
from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber
from sentry_sdk.transport import Transport

from settings import Settings

if TYPE_CHECKING:
    from sentry_sdk.types import Breadcrumb, BreadcrumbHint, Event, Hint

log = logging.getLogger(__name__)

FILTERED = "[Filtered]"
FIELDS = "fields"
"""The ``extra`` key under which a log call passes its structured fields."""

# Field names whose values are content or credentials, compared lower-case with "-" as "_".
SENSITIVE_FIELDS = frozenset(
    {
        "messages",
        "content",
        "prompt",
        "prompts",
        "text",
        "tools",
        "tool_calls",
        "arguments",
        "body",
        "args",
        "kwargs",
        "argsrepr",
        "kwargsrepr",
        "api_key",
        "apikey",
        "x_api_key",
        "x_goog_api_key",
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "password",
        "passwd",
        "secret",
        "token",
        "access_token",
        "credentials",
    }
)
# Environment variable names whose values are secrets (the agents file's api_key_env too).
_SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
_MIN_SECRET_LEN = 8
_SECRET_PATTERNS = (
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+"), r"\1 " + FILTERED),
    (re.compile(r"(?i)([?&](?:key|api_key|apikey|token|access_token)=)[^&#\s]+"), r"\1" + FILTERED),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), FILTERED),
    (re.compile(r"\bAIza[0-9A-Za-z_-]{20,}"), FILTERED),
)
# Breadcrumb categories we keep: our own, our loggers', and HTTP calls (URL scrubbed).
_KEPT_CRUMBS = re.compile(r"^(reliever(\.|$)|worker\.|tasks\.|httpx$|httplib$)")
# worker.observer's log lines repeat the reliever.* crumbs it adds itself.
_DUPLICATE_CRUMBS = frozenset({"worker.observer"})


# ---------------------------------------------------------------- logging


_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value …`` (the structured fields appended)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, Mapping) and fields:
            pairs = " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
            first, sep, rest = line.partition("\n")
            line = f"{first} {pairs}{sep}{rest}"
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the structured fields, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, Mapping):
            out.update(fields)
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key != FIELDS and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool) else repr(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class CeleryContentFilter(logging.Filter):
    """Hides what Celery's task log lines would show of a job: its arguments and its result.

    ``celery.app.trace`` and ``celery.worker.strategy`` log a context dict (also passed as
    ``extra["data"]``) holding the task's ``args`` (a job's messages, when the sender set no
    ``argsrepr``) and its ``return_value`` (the completion text), which the "succeeded" line
    prints. The job id and task name stay. At DEBUG, the pool's "TaskPool: Apply" line
    prints the arguments of the call that runs a task: the message's headers (its
    ``argsrepr`` and the decoded ``args``) and its body, up to 1 KB of each; only the
    function's name stays.
    """

    HIDDEN = "(not logged)"
    FIELDS = ("args", "kwargs", "return_value")
    POOL_APPLY = "TaskPool: Apply"

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name == "celery.pool"
            and isinstance(record.msg, str)
            and record.msg.startswith(self.POOL_APPLY)
            and isinstance(record.args, tuple)
            and record.args
        ):
            record.args = (record.args[0], *(self.HIDDEN for _ in record.args[1:]))
        elif record.name.startswith("celery.") and isinstance(record.args, Mapping):
            context = dict(record.args)
            if any(k in context for k in self.FIELDS):
                for key in self.FIELDS:
                    if key in context:
                        context[key] = self.HIDDEN
                record.args = context
                if isinstance(getattr(record, "data", None), Mapping):
                    record.data = context
        return True


def configure_logging(settings: Settings) -> None:
    """Root logging at ``LOG_LEVEL``, as text or (``LOG_FORMAT=json``) one JSON object a line."""
    formatter: logging.Formatter = (
        JsonFormatter() if settings.log_format == "json" else TextFormatter()
    )
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    handler.addFilter(CeleryContentFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # httpx logs every request at INFO; the per-attempt lines say more, once.
    logging.getLogger("httpx").setLevel(logging.WARNING)


# ---------------------------------------------------------------- Sentry scrubbing


class Scrubber:
    """Removes content and credentials from Sentry events and breadcrumbs.

    Args:
        secrets: values to cut out of every string (the process's API keys).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets = sorted(
            {s for s in secrets if len(s) >= _MIN_SECRET_LEN}, key=len, reverse=True
        )

    def scrub_text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, FILTERED)
        for pattern, replacement in _SECRET_PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def scrub(self, value: Any) -> Any:
        """A copy of ``value`` with sensitive fields filtered and strings scrubbed."""
        if isinstance(value, Mapping):
            return {k: FILTERED if _sensitive(k) else self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        if isinstance(value, str):
            return self.scrub_text(value)
        return value

    def before_send(self, event: Event, hint: Hint) -> Event | None:
        """Sentry's ``before_send``: drop bodies and locals, then scrub the whole event."""
        raw = cast(dict[str, Any], event)
        request = raw.get("request")
        if isinstance(request, dict):
            for key in ("data", "cookies", "query_string"):
                request.pop(key, None)
        for frame in _frames(raw):
            frame.pop("vars", None)
        return cast("Event", self.scrub(raw))

    def before_breadcrumb(self, crumb: Breadcrumb, hint: BreadcrumbHint) -> Breadcrumb | None:
        """Sentry's ``before_breadcrumb``: keep ours and HTTP crumbs only, scrubbed."""
        category = str(crumb.get("category") or "")
        if not _KEPT_CRUMBS.match(category) or category in _DUPLICATE_CRUMBS:
            return None
        return cast("Breadcrumb", self.scrub(crumb))


def _sensitive(key: Any) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in SENSITIVE_FIELDS


def _frames(event: Mapping[str, Any]) -> Iterable[dict[str, Any]]:
    exceptions = event.get("exception")
    values = exceptions.get("values", []) if isinstance(exceptions, Mapping) else []
    threads = event.get("threads")
    values = list(values) + (threads.get("values", []) if isinstance(threads, Mapping) else [])
    for value in values:
        stacktrace = value.get("stacktrace") if isinstance(value, Mapping) else None
        frames = stacktrace.get("frames", []) if isinstance(stacktrace, Mapping) else []
        yield from (f for f in frames if isinstance(f, dict))


def secret_values(environ: Mapping[str, str] | None = None, names: Iterable[str] = ()) -> list[str]:
    """The values of the variables that hold secrets: by their name, and ``names``."""
    env = os.environ if environ is None else environ
    wanted = set(names) | {n for n in env if _SECRET_ENV_NAME.search(n)}
    wanted.discard("RELIEVER_SENTRY_DSN")
    return [env[n] for n in sorted(wanted) if env.get(n)]


def _agents_key_names(settings: Settings) -> list[str]:
    """The ``api_key_env`` names of the agents file, when it loads (best effort)."""
    from worker.agents import load_agents
    from worker.errors import ConfigError

    try:
        agents = load_agents(settings.agents_file, loopback_only=settings.loopback_only)
    except (ConfigError, OSError):
        return []
    return [m.api_key_env for a in agents.agents.values() for m in a.chain if m.api_key_env]


def init_sentry(settings: Settings, *, transport: type[Transport] | None = None) -> bool:
    """Start Sentry when ``SENTRY_DSN`` is set; returns whether it did.

    One Sentry event per failed job is sent by ``worker.observer``; an unexpected exception
    in a task reaches Sentry through the Celery integration, with its traceback.
    """
    if settings.sentry_dsn is None or not settings.sentry_dsn.get_secret_value():
        return False
    scrubber = Scrubber(secret_values(names=_agents_key_names(settings)))
    options: dict[str, Any] = {}
    if transport is not None:
        options["transport"] = transport
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        environment=settings.environment,
        # send_default_pii stays unset, which is off: newer SDKs deprecate passing it at all
        # (a test asserts the client does not send PII).
        include_local_variables=False,
        max_request_body_size="never",
        auto_enabling_integrations=False,
        integrations=[CeleryIntegration(monitor_beat_tasks=False), HttpxIntegration()],
        # Sentry's trace headers are for our services, not for the LLM providers.
        trace_propagation_targets=[],
        event_scrubber=EventScrubber(
            denylist=[*DEFAULT_DENYLIST, *sorted(SENSITIVE_FIELDS)], recursive=True
        ),
        before_send=scrubber.before_send,
        before_breadcrumb=scrubber.before_breadcrumb,
        **options,
    )
    log.info("Sentry is on (environment %s)", settings.environment)
    return True


# ---------------------------------------------------------------- start-up


def start_observability(settings: Settings) -> None:
    """Switch on what ``settings`` asks for: Sentry, traces, the metrics endpoint."""
    from worker.metrics import start_metrics_server
    from worker.tracing import init_tracing

    init_sentry(settings)
    init_tracing(settings)
    start_metrics_server(settings)
