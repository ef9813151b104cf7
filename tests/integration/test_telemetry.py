"""Metrics, spans and log lines of jobs run through the executor, observed by ObservingSink.

The executor talks real HTTP to the mock upstream with a fake clock and memory cooldowns;
each test has its own Prometheus registry and an in-memory span exporter.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from settings import Settings
from worker.agents import Agent
from worker.chain import ChainExecutor
from worker.clock import CancelToken, FakeClock
from worker.cooldown import MemoryCooldownStore
from worker.events import Event, MemoryEventSink
from worker.jobs import Job
from worker.metrics import Metrics, serve_metrics
from worker.mockllm import MockLLM, Reply, Status
from worker.observability import JsonFormatter
from worker.observer import ObservingSink, Telemetry
from worker.redis_events import LeaseLost
from worker.tracing import build_tracer_provider

PROMPT = "Describe the purple walrus protocol in detail"


def _scraped(text: str, name: str, **labels: str) -> float | None:
    """A sample's value in a /metrics page, or None."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


class Observed:
    """One test's telemetry: a fresh registry, an in-memory span exporter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.telemetry = Telemetry(
            metrics=Metrics(self.registry), tracer=self.provider.get_tracer("test")
        )

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def jobs(self, status: str, kind: str) -> float:
        return self.value("reliever_jobs_total", agent="support", status=status, kind=kind)

    def attempts(self, model: str, outcome: str) -> float:
        labels = {"agent": "support", "model": model, "provider": "openai", "outcome": outcome}
        return self.value("reliever_attempts_total", **labels)

    def fallbacks(self, from_model: str, to_model: str, reason: str) -> float:
        labels = {"from_model": from_model, "to_model": to_model, "reason": reason}
        return self.value("reliever_fallbacks_total", agent="support", **labels)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def job_span(self) -> ReadableSpan:
        (span,) = [s for s in self.spans() if s.name == "reliever.job"]
        return span

    def attempt_spans(self) -> list[ReadableSpan]:
        spans = [s for s in self.spans() if s.name.startswith("chat ")]
        return sorted(spans, key=lambda s: s.attributes["reliever.attempt.n"])  # type: ignore[index]


@pytest.fixture
def observed() -> Iterator[Observed]:
    o = Observed()
    yield o
    o.provider.shutdown()


@pytest.fixture
def run_observed(
    make_executor: Callable[..., ChainExecutor], observed: Observed, clock: FakeClock
) -> Callable[..., tuple[Any, MemoryEventSink]]:
    """Run a job through an executor with the ObservingSink around a memory sink."""

    def run(
        job: Job,
        agent: Agent,
        *,
        executor: ChainExecutor | None = None,
        cancel: CancelToken | None = None,
    ) -> tuple[Any, MemoryEventSink]:
        sink = MemoryEventSink(job.job_id, clock)
        watching = ObservingSink(sink, agent, clock=clock, telemetry=observed.telemetry)
        outcome = (executor or make_executor()).run(job, agent, watching, cancel=cancel)
        return outcome, sink

    return run


def test_telemetry_retries_then_success_counts_attempts_and_spans(
    make_agents, make_job, run_observed, observed: Observed, mock: MockLLM
) -> None:
    """Two 503s then a success: three attempts by outcome, two retries, one completed job."""
    mock.script("primary", [Status(503), Status(503)], repeat_last=False)
    agent = make_agents().agents["support"]

    outcome, _ = run_observed(make_job(), agent)

    v = observed.value
    assert outcome.status == "completed"
    labels = {"agent": "support", "model": "primary", "provider": "openai"}
    assert v("reliever_attempts_total", **labels, outcome="retryable") == 2
    assert v("reliever_attempts_total", **labels, outcome="ok") == 1
    assert v("reliever_retries_total", agent="support", model="primary", kind="retryable") == 2
    assert v("reliever_jobs_total", agent="support", status="completed", kind="ok") == 1
    assert v("reliever_active_jobs", agent="support") == 0
    assert v("reliever_time_to_first_delta_seconds_count", agent="support", model="primary") == 1
    # The fake clock moved only by the two backoff waits (0.2 s, 0.4 s).
    assert v("reliever_time_to_first_delta_seconds_sum", agent="support", model="primary") == (
        pytest.approx(0.6)
    )
    duration = {"agent": "support", "model": "primary", "status": "completed"}
    assert v("reliever_job_duration_seconds_count", **duration) == 1
    assert v("reliever_job_duration_seconds_sum", **duration) == pytest.approx(0.6)
    usage = outcome.terminal["usage"]
    assert usage["output_tokens"] > 0
    assert (
        v("reliever_tokens_total", agent="support", model="primary", type="output")
        == usage["output_tokens"]
    )
    assert observed.fallbacks("primary", "backup", "fatal") == 0


def test_telemetry_spans_carry_genai_attributes_and_the_chain_outcome(
    make_agents, make_job, run_observed, observed: Observed, mock: MockLLM
) -> None:
    """A job span with the chain's outcome, and one child CLIENT span per attempt."""
    mock.script("primary", [Status(401)])
    agent = make_agents().agents["support"]

    outcome, _ = run_observed(make_job(), agent)

    job = observed.job_span()
    attempts = observed.attempt_spans()
    assert outcome.status == "completed"
    assert job.kind is SpanKind.INTERNAL
    assert job.attributes is not None
    assert job.attributes["reliever.fallback.outcome"] == "success"
    assert job.attributes["reliever.fallback.attempts"] == 2
    assert job.attributes["reliever.fallback.final_model"] == "backup"
    assert job.attributes["reliever.fallback.primary_model"] == "primary"
    assert job.attributes["reliever.fallback.in_cooldown"] is False
    assert job.attributes["reliever.agent"] == "support"
    assert (
        job.attributes["gen_ai.usage.output_tokens"] == outcome.terminal["usage"]["output_tokens"]
    )
    assert [s.name for s in attempts] == ["chat primary", "chat backup"]
    for span in attempts:
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None
        assert span.parent.span_id == job.context.span_id
        assert span.context.trace_id == job.context.trace_id
        assert span.attributes is not None
        assert span.attributes["gen_ai.system"] == "openai"
        assert span.attributes["gen_ai.operation.name"] == "chat"
        assert span.attributes["server.address"] == "127.0.0.1"
    failed, won = attempts
    assert failed.attributes is not None
    assert won.attributes is not None
    assert failed.attributes["gen_ai.request.model"] == "primary"
    assert failed.attributes["error.type"] == "fatal"
    assert failed.attributes["http.response.status_code"] == 401
    assert failed.status.status_code is StatusCode.ERROR
    assert won.attributes["reliever.attempt.outcome"] == "ok"
    assert won.attributes["reliever.attempt.fallback"] is True
    assert won.attributes["gen_ai.usage.input_tokens"] > 0
    assert won.attributes["gen_ai.usage.output_tokens"] > 0
    assert won.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert won.status.status_code is StatusCode.UNSET
    assert won.end_time is not None
    assert job.end_time is not None
    assert won.end_time <= job.end_time


def test_telemetry_failed_job_is_counted_by_kind_and_marks_the_span(
    make_agents, make_job, run_observed, observed: Observed, mock: MockLLM
) -> None:
    """Every model failing ends the job span failed with error.type, counted by kind."""
    mock.script("primary", [Status(400)])
    mock.script("backup", [Status(403)])
    agent = make_agents().agents["support"]

    outcome, _ = run_observed(make_job(), agent)

    job = observed.job_span()
    assert outcome.terminal["error"]["kind"] == "all_models_failed"
    assert (
        observed.value(
            "reliever_jobs_total", agent="support", status="failed", kind="all_models_failed"
        )
        == 1
    )
    duration = {"agent": "support", "model": "backup", "status": "failed"}
    assert observed.value("reliever_job_duration_seconds_count", **duration) == 1
    assert observed.value("reliever_active_jobs", agent="support") == 0
    assert job.attributes is not None
    assert job.attributes["reliever.fallback.outcome"] == "failed"
    assert job.attributes["error.type"] == "all_models_failed"
    assert "reliever.fallback.final_model" not in job.attributes
    assert job.status.status_code is StatusCode.ERROR


def test_telemetry_cancel_during_backoff_is_outcome_cancelled(
    make_agents, make_job, run_observed, observed: Observed, mock: MockLLM, clock: FakeClock
) -> None:
    """A job cancelled while it waits to retry ends with the chain outcome cancelled."""
    mock.script("primary", [Status(503)])
    agent = make_agents().agents["support"]
    cancel = CancelToken()
    clock.on_sleep.append(lambda _s: cancel.cancel())

    outcome, _ = run_observed(make_job(), agent, cancel=cancel)

    job = observed.job_span()
    assert outcome.terminal["error"]["kind"] == "cancelled"
    assert job.attributes is not None
    assert job.attributes["reliever.fallback.outcome"] == "cancelled"
    assert observed.jobs("failed", "cancelled") == 1
    assert observed.attempts("primary", "retryable") == 1


@pytest.mark.parametrize(
    ("primary", "cooldown_on_exhausted", "pinned"),
    [
        ([Status(401)], True, True),
        ([Status(429)], True, True),
        ([Status(503)], True, True),
        ([Status(503)], False, False),
        ([Reply()], True, False),
    ],
    ids=["fatal", "rate-limited", "exhausted", "exhausted-no-arm", "primary-ok"],
)
def test_telemetry_pins_set_match_the_cooldown_store(
    make_agents,
    make_job,
    make_executor,
    run_observed,
    observed: Observed,
    mock: MockLLM,
    clock: FakeClock,
    primary: list[Any],
    cooldown_on_exhausted: bool,
    pinned: bool,
) -> None:
    """The pins-set counter agrees with what the executor wrote to the cooldown store."""
    mock.script("primary", primary)
    agents = make_agents(
        agents={
            "support": {
                "model": "primary",
                "fallbacks": ["backup"],
                "cooldown_on_exhausted": cooldown_on_exhausted,
                "backoff": {"base": "10ms", "factor": 2, "max": "20ms", "jitter": 0},
            }
        }
    )
    agent = agents.agents["support"]
    store = MemoryCooldownStore(clock)

    run_observed(make_job(), agent, executor=make_executor(store))

    assert (store.get("support") is not None) is pinned
    assert observed.value("reliever_cooldown_pins_set_total", agent="support", model="backup") == (
        1 if pinned else 0
    )


def test_telemetry_job_inside_a_cooldown_counts_a_pin_honoured(
    make_agents, make_job, make_executor, run_observed, observed: Observed, mock: MockLLM, clock
) -> None:
    """A job that starts at the pinned fallback counts as a pin honoured, not a pin set."""
    mock.script("primary", [Status(401)])
    agent = make_agents().agents["support"]
    executor = make_executor(MemoryCooldownStore(clock))

    run_observed(make_job(), agent, executor=executor)
    _, sink = run_observed(make_job(), agent, executor=executor)

    started = sink.events[0]
    assert started["in_cooldown"] is True
    v = observed.value
    assert v("reliever_cooldown_pins_honoured_total", agent="support", model="backup") == 1
    assert v("reliever_cooldown_pins_set_total", agent="support", model="backup") == 1
    assert observed.fallbacks("primary", "backup", "fatal") == 1
    assert mock.count("primary") == 1


def test_telemetry_bug_ends_the_job_internal_and_the_span_in_error(
    make_agents, make_job, observed: Observed, clock: FakeClock
) -> None:
    """An unexpected exception in an attempt counts a failed/internal job and re-raises."""

    def bug(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in the worker")

    from worker.providers import build_providers

    client = httpx.Client(transport=httpx.MockTransport(bug))
    executor = ChainExecutor(
        providers=build_providers(client, clock),
        cooldowns=MemoryCooldownStore(clock),
        clock=clock,
        rng=__import__("random").Random(1),
    )
    agent = make_agents().agents["support"]
    job = make_job()
    sink = MemoryEventSink(job.job_id, clock)

    with pytest.raises(RuntimeError, match="a bug"):
        executor.run(
            job, agent, ObservingSink(sink, agent, clock=clock, telemetry=observed.telemetry)
        )
    client.close()

    assert sink.events[-1]["error"]["kind"] == "internal"
    assert observed.jobs("failed", "internal") == 1
    assert observed.attempts("primary", "internal") == 1
    assert observed.value("reliever_active_jobs", agent="support") == 0
    assert observed.job_span().status.status_code is StatusCode.ERROR


class _LosingSink(MemoryEventSink):
    """Loses its lease after ``keep`` events, as a worker presumed dead does."""

    def __init__(self, job_id: str, clock: FakeClock, keep: int) -> None:
        super().__init__(job_id, clock)
        self.keep = keep

    def emit(self, body: Event) -> Event:
        if len(self.events) >= self.keep:
            raise LeaseLost(self.job_id)
        return super().emit(body)


def test_telemetry_lost_lease_ends_the_job_abandoned(
    make_agents, make_job, make_executor, observed: Observed, clock: FakeClock
) -> None:
    """A run whose sink loses the lease counts as abandoned and leaves no active job behind."""
    agent = make_agents().agents["support"]
    job = make_job()
    sink = _LosingSink(job.job_id, clock, keep=3)

    with pytest.raises(LeaseLost):
        make_executor().run(
            job, agent, ObservingSink(sink, agent, clock=clock, telemetry=observed.telemetry)
        )

    assert observed.jobs("abandoned", "lease_lost") == 1
    assert observed.value("reliever_active_jobs", agent="support") == 0
    assert observed.jobs("failed", "internal") == 0
    assert observed.job_span().attributes["reliever.fallback.outcome"] == "abandoned"  # type: ignore[index]


def test_telemetry_log_lines_carry_fields_and_never_the_prompt_or_key(
    make_agents,
    make_job,
    run_observed,
    mock: MockLLM,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One JSON line per attempt outcome and per job end, with ids and kinds, no content."""
    key = "sk-telemetry-test-key-42424242"
    monkeypatch.setenv("TELEMETRY_TEST_KEY", key)
    mock.script("primary", [Status(503, message=f"overloaded for: {PROMPT}")], repeat_last=False)
    models = {
        "primary": {
            "provider": "openai",
            "base_url": f"{mock.url}/v1",
            "model": "primary",
            "api_key_env": "TELEMETRY_TEST_KEY",
        },
        "backup": {"provider": "openai", "base_url": f"{mock.url}/v1", "model": "backup"},
    }
    agent = make_agents(models=models).agents["support"]
    job = make_job(messages=[{"role": "user", "content": PROMPT}])

    with caplog.at_level(logging.INFO):
        outcome, _ = run_observed(job, agent)

    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records]
    ours = [json.loads(line) for line in lines if '"logger": "worker.observer"' in line]
    assert outcome.status == "completed"
    assert [(o["message"], o["kind"]) for o in ours] == [
        ("attempt ended", "retryable"),
        ("attempt ended", "ok"),
        ("job ended", "ok"),
    ]
    first = ours[0]
    assert first["job_id"] == job.job_id
    assert first["agent"] == "support"
    assert first["model"] == "primary"
    assert first["attempt"] == 1
    assert first["status"] == 503
    assert first["latency_s"] >= 0
    assert ours[1]["attempt"] == 2
    assert ours[2]["model"] == "primary"
    assert ours[2]["attempts"] == 2
    everything = "\n".join(lines)
    assert "walrus" not in everything
    assert key not in everything
    assert outcome.terminal["text"] not in everything


def test_telemetry_metrics_endpoint_takes_the_next_free_port() -> None:
    """A second process-like server on a taken port serves on the next port instead."""
    registry = CollectorRegistry()
    Metrics(registry).jobs.labels(agent="support", status="completed", kind="ok").inc()
    first = serve_metrics("127.0.0.1", 19464, tries=50, registry=registry)
    try:
        second = serve_metrics("127.0.0.1", first.port, tries=50, registry=registry)
        try:
            body = httpx.get(f"http://127.0.0.1:{second.port}/metrics", timeout=5).text
        finally:
            second.close()
    finally:
        first.close()

    assert second.port > first.port
    assert (
        _scraped(body, "reliever_jobs_total", agent="support", status="completed", kind="ok") == 1
    )


def test_telemetry_tracer_provider_is_built_only_when_asked() -> None:
    """Traces are off by default; console builds a provider; none is installed globally."""
    off = build_tracer_provider(Settings(_env_file=None))
    console = build_tracer_provider(Settings(_env_file=None, traces_exporter="console"))

    assert off is None
    assert console is not None
    assert console.resource.attributes["service.name"] == "reliever-worker"
    console.shutdown()


def test_telemetry_worker_serves_metrics_exports_otlp_traces_and_logs_json(
    tmp_path, redis_url: str, key_prefix: str, redis_client, mock: MockLLM
) -> None:
    """A real worker: /metrics on its port, spans to an OTLP collector, JSON log lines."""
    import re

    from tests.fake_ingest import RecordingServer, otlp_attributes, otlp_spans
    from tests.service_support import running_worker, worker_env, write_agents
    from worker.client import Client

    mock.script("t-flaky", [Status(503)], repeat_last=False)
    model = {"provider": "openai", "base_url": f"{mock.url}/v1", "model": "t-flaky"}
    fast = {"base": "20ms", "factor": 2, "max": "50ms", "jitter": 0}
    doc = {
        "models": {"t-flaky": model},
        "agents": {"steady": {"model": "t-flaky", "backoff": fast}},
    }
    queue = f"{key_prefix}-q"
    settings = Settings(
        _env_file=None, environment="test", redis_url=redis_url, key_prefix=key_prefix, queue=queue
    )
    client = Client(settings=settings)
    with RecordingServer() as collector:
        env = worker_env(
            redis_url=redis_url,
            prefix=key_prefix,
            queue_name=queue,
            agents_file=write_agents(tmp_path / "agents.yaml", doc),
            RELIEVER_METRICS_PORT="19564",
            RELIEVER_METRICS_PORT_TRIES="100",
            RELIEVER_TRACES_EXPORTER="otlp",
            RELIEVER_OTLP_ENDPOINT=f"{collector.url}/v1/traces",
            RELIEVER_LOG_FORMAT="json",
            OTEL_BSP_SCHEDULE_DELAY="50",
        )
        try:
            with running_worker(env, name=f"{key_prefix}-obs") as worker:
                job = client.submit("steady", [{"role": "user", "content": PROMPT}])
                events = list(job.events(timeout=20))
                found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", worker.output())
                assert found is not None, worker.output()
                metrics = httpx.get(f"http://127.0.0.1:{found[1]}/metrics", timeout=5).text
                assert collector.wait_for(
                    lambda c: any(s.name == "reliever.job" for s in otlp_spans(c))
                )
        finally:
            client.close()
        spans = otlp_spans(collector)

    assert events[-1]["type"] == "completed"
    labels = {"agent": "steady", "model": "t-flaky", "provider": "openai"}
    assert _scraped(metrics, "reliever_attempts_total", **labels, outcome="retryable") == 1
    assert _scraped(metrics, "reliever_attempts_total", **labels, outcome="ok") == 1
    assert (
        _scraped(metrics, "reliever_jobs_total", agent="steady", status="completed", kind="ok") == 1
    )
    assert _scraped(metrics, "reliever_active_jobs", agent="steady") == 0
    (job_span,) = [s for s in spans if s.name == "reliever.job"]
    attempts = [s for s in spans if s.name == "chat t-flaky"]
    assert otlp_attributes(job_span)["reliever.fallback.outcome"] == "success"
    assert otlp_attributes(job_span)["reliever.fallback.attempts"] == 2
    assert len(attempts) == 2
    assert all(s.parent_span_id == job_span.span_id for s in attempts)
    assert {otlp_attributes(s)["gen_ai.request.model"] for s in attempts} == {"t-flaky"}
    lines = [json.loads(line) for line in worker.lines if line.startswith("{")]
    ours = [o for o in lines if o.get("logger") == "worker.observer"]
    assert [(o["message"], o["kind"]) for o in ours] == [
        ("attempt ended", "retryable"),
        ("attempt ended", "ok"),
        ("job ended", "ok"),
    ]
    assert all(o["job_id"] == job.job_id for o in ours)
    assert "walrus" not in worker.output()
