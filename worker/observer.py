"""Observing a job through its events: metrics, spans, log lines and Sentry, one seam.

:class:`ObservingSink` wraps a job's event sink. It forwards every event unchanged and reads
what the executor already says (``started``, ``attempt``, ``delta``, ``retry``,
``fallback``, ``completed``, ``failed``), so the executor knows nothing of telemetry. An
attempt ends at the next ``retry``, ``fallback`` or terminal event, with the error kind the
event carries; the terminal event's ``attempts`` give the exact outcome and usage of each.

From that it produces:

- **metrics** (``worker.metrics``): attempts by model and outcome, retries, fallbacks, pins
  set and honoured, jobs by terminal kind, time to first delta, job duration, active jobs;
- **spans** (OpenTelemetry): one ``reliever.job`` span per job with the chain's outcome
  (``success`` / ``failed`` / ``cancelled``), attempts and final model, the attributes the
  seed's ``runtime.fallback`` span records; a child ``chat {model}`` span per attempt with
  the GenAI semantic-convention attributes (``gen_ai.system``, ``gen_ai.request.model``,
  ``gen_ai.usage.*``);
- **log lines** (logger ``worker.observer``): one per attempt outcome and one per job end,
  with job_id, agent, model, attempt, kind and latency as structured fields;
- **Sentry**: a breadcrumb per attempt, tags on the task's scope (so a bug's event carries
  them), and exactly one event per failed job, tagged ``agent``, ``model``, ``provider``,
  ``error.kind`` and fingerprinted ``[kind, provider]``. No event for a ``cancelled`` job
  (the caller's choice, not a fault), nor for ``internal`` (the task's exception reaches
  Sentry through the Celery integration, with its traceback: one event, not two). Rejected
  jobs (``invalid_job``, ``unknown_agent``) never reach a model and are only counted and
  logged (:func:`observe_rejected`).

Nothing observed holds message content or keys: events' ``text`` and tool-call pieces are
never read, and neither are error messages (an upstream's message may quote the prompt):
log lines and Sentry get kinds and HTTP statuses; the job's own ``failed`` event keeps the
message.

Cooldown pins set are derived from the events with design rule 7: a job completed on a
fallback after the primary failed in a way that arms the cooldown, or after the pinned model
it started on failed. A failure to observe is logged and never fails the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import sentry_sdk
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from worker.agents import Agent, ModelRef
from worker.chain import arms_cooldown
from worker.clock import Clock
from worker.dead import DeadLetter
from worker.errors import JobError
from worker.events import Event, EventSink
from worker.metrics import Metrics
from worker.observability import FIELDS
from worker.redis_events import LeaseLost
from worker.tracing import tracer as process_tracer

log = logging.getLogger(__name__)

NO_SENTRY_KINDS = frozenset({"cancelled", "internal", "invalid_job", "unknown_agent"})
"""Failed kinds that do not produce this module's Sentry event (see the module docstring)."""
STOPPED_KINDS = frozenset({"cancelled", "deadline_exceeded"})
REJECTED_AGENT = "-"
"""The agent label of rejected jobs: the job's own agent may be any string."""
_GENAI_PROVIDER = {"gemini": "gcp.gemini"}


@dataclass(frozen=True, slots=True)
class Telemetry:
    """Where observations go: the metrics and the tracer."""

    metrics: Metrics
    tracer: trace.Tracer


@lru_cache(maxsize=1)
def process_telemetry() -> Telemetry:
    """The process's telemetry: Prometheus' default registry and the global tracer."""
    return Telemetry(metrics=Metrics(), tracer=process_tracer())


def observe(inner: EventSink, agent: Agent, clock: Clock) -> ObservingSink:
    """Wrap a job's sink so the process's telemetry observes it."""
    return ObservingSink(inner, agent, clock=clock, telemetry=process_telemetry())


def observe_rejected(job_id: str, error: JobError, telemetry: Telemetry | None = None) -> None:
    """Count and log a job that ended at once as invalid (it never reached a model)."""
    t = telemetry or process_telemetry()
    t.metrics.jobs.labels(agent=REJECTED_AGENT, status="failed", kind=error.kind).inc()
    fields: dict[str, Any] = {"job_id": job_id, "status": "failed", "kind": error.kind}
    field_name = getattr(error, "field", None)
    if field_name is not None:
        fields["field"] = field_name
    log.info("job rejected", extra={FIELDS: fields})


def observe_dead_letter(letter: DeadLetter, telemetry: Telemetry | None = None) -> None:
    """Count and log a broker message that went to the dead-letter list (never its body)."""
    t = telemetry or process_telemetry()
    t.metrics.dead_letters.labels(reason=letter.reason).inc()
    fields: dict[str, Any] = {
        "reason": letter.reason,
        "detail": letter.detail,
        "task_id": letter.task_id,
        "job_id": letter.job_id,
        "queue": letter.queue,
        "size": len(letter.raw) if letter.size is None else letter.size,
    }
    log.warning("broker message dead-lettered", extra={FIELDS: fields})


@dataclass(slots=True)
class _Attempt:
    n: int
    model: ModelRef
    number: int
    began: float
    span: Span
    kind: str | None = None
    status: int | None = None
    end_ns: int | None = None


@dataclass(slots=True)
class _Job:
    job_id: str
    began: float
    span: Span
    start_model: str | None = None
    in_cooldown: bool = False
    attempts: dict[int, _Attempt] = field(default_factory=dict)
    current: _Attempt | None = None
    last_kind: dict[str, str] = field(default_factory=dict)
    first_delta: float | None = None


class ObservingSink:
    """Forwards a job's events to ``inner`` and observes them (see the module docstring).

    Args:
        inner: the sink that delivers the events.
        agent: the job's agent (its chain names each model's provider).
        clock: the clock durations are measured with (the executor's).
        telemetry: where metrics and spans go.
    """

    def __init__(
        self, inner: EventSink, agent: Agent, *, clock: Clock, telemetry: Telemetry
    ) -> None:
        self._inner = inner
        self._agent = agent
        self._clock = clock
        self._metrics = telemetry.metrics
        self._tracer = telemetry.tracer
        self._models = {m.name: m for m in agent.chain}
        self._job: _Job | None = None
        self._ended = False
        self._sentry = sentry_sdk.get_client().is_active()

    def emit(self, body: Event) -> Event:
        try:
            event = self._inner.emit(body)
        except BaseException as exc:
            self._guarded(self._abandon, exc)
            raise
        if not self._ended:
            self._guarded(self._observe, event)
        return event

    def close(self) -> None:
        self._inner.close()

    def _guarded(self, fn: Any, arg: Any) -> None:
        try:
            fn(arg)
        except Exception:
            log.exception("observing job events failed (the job goes on)")

    # ------------------------------------------------------------ dispatch

    def _observe(self, event: Event) -> None:
        kind = event["type"]
        job = self._job or self._begin(event)
        if kind == "started":
            self._started(job, event)
        elif kind == "attempt":
            self._attempt(job, event)
        elif kind == "delta":
            if job.first_delta is None and job.current is not None:
                job.first_delta = self._clock.monotonic() - job.began
                self._metrics.first_delta.labels(
                    agent=self._agent.name, model=job.current.model.name
                ).observe(job.first_delta)
        elif kind == "retry":
            error = event.get("error") or {}
            self._close_attempt(job, error.get("kind", "unknown"), error.get("status"))
            self._metrics.retries.labels(
                agent=self._agent.name, model=event["model"], kind=error.get("kind", "unknown")
            ).inc()
        elif kind == "fallback":
            error = event.get("error") or {}
            self._close_attempt(job, error.get("kind", "unknown"), error.get("status"))
            self._metrics.fallbacks.labels(
                agent=self._agent.name,
                from_model=event["from"],
                to_model=event["to"],
                reason=event.get("reason", "unknown"),
            ).inc()
            self._crumb(f"fallback {event['from']} -> {event['to']}", {"reason": event["reason"]})
        elif kind in ("completed", "failed"):
            self._end(job, event)

    # ------------------------------------------------------------ job

    def _begin(self, event: Event) -> _Job:
        agent = self._agent
        span = self._tracer.start_span(
            "reliever.job",
            kind=SpanKind.INTERNAL,
            attributes={
                "reliever.job_id": event["job_id"],
                "reliever.agent": agent.name,
                "reliever.fallback.primary_model": agent.chain[0].name,
            },
        )
        job = _Job(job_id=event["job_id"], began=self._clock.monotonic(), span=span)
        self._job = job
        self._metrics.active.labels(agent=agent.name).inc()
        if self._sentry:
            scope = sentry_sdk.get_isolation_scope()
            scope.set_tag("agent", agent.name)
            scope.set_tag("job_id", job.job_id)
        return job

    def _started(self, job: _Job, event: Event) -> None:
        job.start_model = event["start_model"]
        job.in_cooldown = bool(event["in_cooldown"])
        job.span.set_attribute("reliever.fallback.in_cooldown", job.in_cooldown)
        job.span.set_attribute("reliever.fallback.start_model", event["start_model"])
        if job.in_cooldown:
            self._metrics.pins_honoured.labels(
                agent=self._agent.name, model=event["start_model"]
            ).inc()
        self._crumb(
            "job started",
            {"job_id": job.job_id, "start_model": job.start_model, "in_cooldown": job.in_cooldown},
        )

    def _end(self, job: _Job, event: Event) -> None:
        self._ended = True
        agent = self._agent
        records = {r["n"]: r for r in event.get("attempts") or [] if isinstance(r, Mapping)}
        completed = event["type"] == "completed"
        error = {} if completed else (event.get("error") or {})
        kind = "ok" if completed else str(error.get("kind", "unknown"))
        if job.current is not None:
            if completed:
                self._close_attempt(job, "ok", None)
            else:
                record = records.get(job.current.n) or {}
                self._close_attempt(job, str(record.get("outcome") or kind), _status(record))
        final = self._final_model(job, event)
        duration = self._clock.monotonic() - job.began
        status = str(event["type"])
        m = self._metrics
        m.jobs.labels(agent=agent.name, status=status, kind=kind).inc()
        m.job_duration.labels(agent=agent.name, model=final or "", status=status).observe(duration)
        m.active.labels(agent=agent.name).dec()
        if completed and self._pin_set(job, final):
            m.pins_set.labels(agent=agent.name, model=final).inc()
        self._end_spans(job, event, records, kind, final)
        fields = {
            "job_id": job.job_id,
            "agent": agent.name,
            "status": status,
            "kind": kind,
            "model": final,
            "attempts": len(job.attempts),
            "in_cooldown": job.in_cooldown,
            "duration_s": round(duration, 6),
        }
        if job.first_delta is not None:
            fields["first_delta_s"] = round(job.first_delta, 6)
        log.log(logging.INFO if completed else logging.WARNING, "job ended", extra={FIELDS: fields})
        if not completed:
            self._report_failure(job, error, kind, final, duration)

    def _final_model(self, job: _Job, event: Event) -> str | None:
        if event["type"] == "completed":
            return str(event["model"])
        if job.current is not None:
            return job.current.model.name
        if job.attempts:
            return job.attempts[max(job.attempts)].model.name
        return job.start_model

    def _pin_set(self, job: _Job, winner: str | None) -> bool:
        """Design rule 7, read back from the events: did this success pin the agent?"""
        agent = self._agent
        primary = agent.chain[0].name
        if winner is None or winner == primary:
            return False
        arms = agent.cooldown_on_exhausted
        primary_kind = job.last_kind.get(primary)
        if primary_kind is not None and arms_cooldown(primary_kind, cooldown_on_exhausted=arms):
            return True
        start = job.start_model
        start_kind = job.last_kind.get(start) if start is not None else None
        return (
            job.in_cooldown
            and start != winner
            and start_kind is not None
            and arms_cooldown(start_kind, cooldown_on_exhausted=arms)
        )

    def _abandon(self, exc: BaseException) -> None:
        """The run stopped without a terminal event (its lease was lost, or Redis failed)."""
        job = self._job
        if job is None or self._ended:
            return
        self._ended = True
        kind = "lease_lost" if isinstance(exc, LeaseLost) else "emit_failed"
        if job.current is not None:
            self._close_attempt(job, "abandoned", None)
        self._metrics.jobs.labels(agent=self._agent.name, status="abandoned", kind=kind).inc()
        self._metrics.active.labels(agent=self._agent.name).dec()
        for attempt in job.attempts.values():
            attempt.span.end(end_time=attempt.end_ns)
        job.span.set_attribute("reliever.fallback.outcome", "abandoned")
        job.span.set_status(Status(StatusCode.ERROR, kind))
        job.span.end()
        log.warning(
            "job abandoned",
            extra={FIELDS: {"job_id": job.job_id, "agent": self._agent.name, "kind": kind}},
        )

    # ------------------------------------------------------------ attempts

    def _attempt(self, job: _Job, event: Event) -> None:
        if job.current is not None:  # not expected: every attempt ends with an event
            self._close_attempt(job, "unknown", None)
        model = self._models.get(event["model"])
        if model is None:
            return
        provider = model.provider
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": provider,
            "gen_ai.provider.name": _GENAI_PROVIDER.get(provider, provider),
            "gen_ai.request.model": model.model,
            "reliever.model": model.name,
            "reliever.attempt.n": event["n"],
            "reliever.attempt.number": event["attempt"],
            "reliever.attempt.max": event["max_attempts"],
            "reliever.attempt.fallback": bool(event["fallback"]),
        }
        host = urlsplit(model.base_url).hostname
        if host:
            attributes["server.address"] = host
        span = self._tracer.start_span(
            f"chat {model.model}",
            context=trace.set_span_in_context(job.span),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        attempt = _Attempt(
            n=event["n"],
            model=model,
            number=event["attempt"],
            began=self._clock.monotonic(),
            span=span,
        )
        job.attempts[attempt.n] = attempt
        job.current = attempt
        if self._sentry:
            scope = sentry_sdk.get_isolation_scope()
            scope.set_tag("model", model.name)
            scope.set_tag("provider", provider)

    def _close_attempt(self, job: _Job, kind: str, status: Any) -> None:
        attempt = job.current
        if attempt is None:
            return
        job.current = None
        latency = self._clock.monotonic() - attempt.began
        attempt.kind = kind
        attempt.status = status if isinstance(status, int) else None
        attempt.end_ns = time.time_ns()
        model = attempt.model
        job.last_kind[model.name] = kind
        agent = self._agent.name
        self._metrics.attempts.labels(
            agent=agent, model=model.name, provider=model.provider, outcome=kind
        ).inc()
        self._metrics.attempt_duration.labels(agent=agent, model=model.name, outcome=kind).observe(
            latency
        )
        fields: dict[str, Any] = {
            "job_id": job.job_id,
            "agent": agent,
            "model": model.name,
            "provider": model.provider,
            "n": attempt.n,
            "attempt": attempt.number,
            "kind": kind,
            "latency_s": round(latency, 6),
        }
        if attempt.status is not None:
            fields["status"] = attempt.status
        log.info("attempt ended", extra={FIELDS: fields})
        crumb = {k: v for k, v in fields.items() if k not in ("job_id", "agent")}
        self._crumb(f"attempt {attempt.n} on {model.name}: {kind}", crumb)

    def _end_spans(
        self,
        job: _Job,
        event: Event,
        records: Mapping[int, Mapping[str, Any]],
        kind: str,
        final: str | None,
    ) -> None:
        totals = [0, 0]
        for n, attempt in sorted(job.attempts.items()):
            span = attempt.span
            outcome = attempt.kind or "unknown"
            span.set_attribute("reliever.attempt.outcome", outcome)
            if attempt.status is not None:
                span.set_attribute("http.response.status_code", attempt.status)
            usage = (records.get(n) or {}).get("usage") or {}
            tokens = (int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))
            span.set_attribute("gen_ai.usage.input_tokens", tokens[0])
            span.set_attribute("gen_ai.usage.output_tokens", tokens[1])
            totals = [totals[0] + tokens[0], totals[1] + tokens[1]]
            for name, count in zip(("input", "output"), tokens, strict=True):
                if count:
                    self._metrics.tokens.labels(
                        agent=self._agent.name, model=attempt.model.name, type=name
                    ).inc(count)
            if outcome == "ok":
                finish = event.get("finish_reason")
                if finish:
                    span.set_attribute("gen_ai.response.finish_reasons", [str(finish)])
            else:
                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR, outcome))
            span.end(end_time=attempt.end_ns)
        span = job.span
        completed = event["type"] == "completed"
        if completed:
            outcome = "success"
        elif kind in STOPPED_KINDS:
            outcome = "cancelled"
        else:
            outcome = "failed"
        span.set_attribute("reliever.fallback.outcome", outcome)
        span.set_attribute("reliever.fallback.attempts", len(job.attempts))
        span.set_attribute("gen_ai.usage.input_tokens", totals[0])
        span.set_attribute("gen_ai.usage.output_tokens", totals[1])
        if completed and final is not None:
            span.set_attribute("reliever.fallback.final_model", final)
        elif not completed:
            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
        span.end()

    # ------------------------------------------------------------ Sentry

    def _crumb(self, message: str, data: dict[str, Any]) -> None:
        if self._sentry:
            sentry_sdk.add_breadcrumb(category="reliever.job", message=message, data=data)

    def _report_failure(
        self, job: _Job, error: Mapping[str, Any], kind: str, final: str | None, duration: float
    ) -> None:
        if not self._sentry:
            return
        model = self._models.get(final or "")
        provider = model.provider if model is not None else "unknown"
        sentry_sdk.get_isolation_scope().set_tag("error.kind", kind)
        if kind in NO_SENTRY_KINDS:
            return
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("agent", self._agent.name)
            scope.set_tag("model", final or "none")
            scope.set_tag("provider", provider)
            scope.set_tag("error.kind", kind)
            scope.set_tag("job_id", job.job_id)
            scope.fingerprint = [kind, provider]
            scope.set_context(
                "job",
                {
                    "job_id": job.job_id,
                    "agent": self._agent.name,
                    "chain": list(self._agent.chain_names),
                    "start_model": job.start_model,
                    "in_cooldown": job.in_cooldown,
                    "duration_s": round(duration, 6),
                    "attempts": [
                        {
                            "n": a.n,
                            "model": a.model.name,
                            "attempt": a.number,
                            "outcome": a.kind,
                            "status": a.status,
                        }
                        for _, a in sorted(job.attempts.items())
                    ],
                },
            )
            # Not the error's message: it quotes the upstream, which may quote the prompt.
            # The job's failed event (found by the job_id tag) has it.
            scope.set_context(
                "error", {k: error[k] for k in ("kind", "status", "retry_after_s") if k in error}
            )
            sentry_sdk.capture_message(f"job failed: {kind}", level="error")


def _status(record: Mapping[str, Any]) -> int | None:
    error = record.get("error")
    status = error.get("status") if isinstance(error, Mapping) else None
    return status if isinstance(status, int) else None
