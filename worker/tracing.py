"""OpenTelemetry traces: off by default; ``TRACES_EXPORTER`` picks where spans go.

``none`` (default) leaves OpenTelemetry's no-op provider in place, so the spans
``worker.observer`` starts cost next to nothing. ``console`` prints each span as JSON to
stdout. ``otlp`` sends them over OTLP/HTTP (protobuf) to ``OTLP_ENDPOINT``, or to where the
standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` variables
say (default ``http://localhost:4318/v1/traces``); it needs the ``otlp`` extra
(``pip install 'reliever[otlp]'``). The service name is ``OTEL_SERVICE_NAME``, else
``reliever-worker``; ``OTEL_RESOURCE_ATTRIBUTES`` and the ``OTEL_BSP_*`` batching variables
work as usual.
"""

from __future__ import annotations

import logging

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from settings import Settings
from worker.errors import ConfigError

log = logging.getLogger(__name__)

TRACER_NAME = "reliever"
DEFAULT_SERVICE_NAME = "reliever-worker"


def tracer() -> trace.Tracer:
    """The tracer jobs are traced with (a no-op one until :func:`init_tracing` installs one)."""
    return trace.get_tracer(TRACER_NAME)


def _exporter(settings: Settings) -> SpanExporter:
    if settings.traces_exporter == "console":
        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "RELIEVER_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install 'reliever[otlp]'"
        ) from None
    return OTLPSpanExporter(endpoint=settings.otlp_endpoint)


def build_tracer_provider(settings: Settings) -> TracerProvider | None:
    """A provider exporting as ``settings`` say, not installed; None when traces are off.

    Raises:
        ConfigError: ``otlp`` was asked for but its exporter is not installed.
    """
    if settings.traces_exporter == "none":
        return None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
    return provider


def init_tracing(settings: Settings) -> TracerProvider | None:
    """Install the process's tracer provider when traces are on (once per process).

    The provider flushes and shuts down at process exit (OpenTelemetry's own atexit hook).
    """
    provider = build_tracer_provider(settings)
    if provider is not None:
        trace.set_tracer_provider(provider)
        log.info("traces on, exported to %s", settings.traces_exporter)
    return provider
