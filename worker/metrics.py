"""The worker's Prometheus metrics, and the per-process ``/metrics`` endpoint.

Every name starts with ``reliever_``; labels hold agent and model names from the agents file
(never job ids, which would explode the series count). ``worker.observer`` updates them from
each job's events.

=========================================  =========  =======================================
metric                                     type       labels
=========================================  =========  =======================================
reliever_attempts_total                    counter    agent, model, provider, outcome
reliever_attempt_duration_seconds          histogram  agent, model, outcome
reliever_retries_total                     counter    agent, model, kind
reliever_fallbacks_total                   counter    agent, from_model, to_model, reason
reliever_cooldown_pins_set_total           counter    agent, model
reliever_cooldown_pins_honoured_total      counter    agent, model
reliever_jobs_total                        counter    agent, status, kind
reliever_time_to_first_delta_seconds       histogram  agent, model
reliever_job_duration_seconds              histogram  agent, model, status
reliever_active_jobs                       gauge      agent
reliever_tokens_total                      counter    agent, model, type
reliever_dead_letters_total                counter    reason
=========================================  =========  =======================================

``outcome`` is ``ok`` or the attempt's error kind; a job's ``status`` is ``completed``,
``failed`` or ``abandoned`` (its run stopped without a terminal event, e.g. its lease was
taken over) and ``kind`` is ``ok`` or the terminal error kind.

The endpoint: ``METRICS_PORT`` unset means none. Each worker *process* serves its own
registry; when the port is taken (another worker process on the same host) the next one is
tried, up to ``METRICS_PORT_TRIES`` ports, and the port chosen is logged.
"""

from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from settings import Settings

log = logging.getLogger(__name__)

FIRST_DELTA_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """The reliever metrics, registered on ``registry`` (Prometheus' default one in a worker)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        r = registry
        self.attempts = Counter(
            "reliever_attempts",
            "Attempts by model and outcome (ok or the error kind).",
            ["agent", "model", "provider", "outcome"],
            registry=r,
        )
        self.attempt_duration = Histogram(
            "reliever_attempt_duration_seconds",
            "One attempt, from its request to its outcome.",
            ["agent", "model", "outcome"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.retries = Counter(
            "reliever_retries",
            "Retries of the same model, by the error that caused them.",
            ["agent", "model", "kind"],
            registry=r,
        )
        self.fallbacks = Counter(
            "reliever_fallbacks",
            "Moves to the next model of a chain.",
            ["agent", "from_model", "to_model", "reason"],
            registry=r,
        )
        self.pins_set = Counter(
            "reliever_cooldown_pins_set",
            "Cooldown pins set (or moved): the agent starts at this model for a while.",
            ["agent", "model"],
            registry=r,
        )
        self.pins_honoured = Counter(
            "reliever_cooldown_pins_honoured",
            "Jobs that started at a pinned fallback because of a cooldown.",
            ["agent", "model"],
            registry=r,
        )
        self.jobs = Counter(
            "reliever_jobs",
            "Jobs by how they ended (status completed/failed/abandoned, kind ok or the error).",
            ["agent", "status", "kind"],
            registry=r,
        )
        self.first_delta = Histogram(
            "reliever_time_to_first_delta_seconds",
            "From a job's start to its first delta, by the model that sent it.",
            ["agent", "model"],
            buckets=FIRST_DELTA_BUCKETS_S,
            registry=r,
        )
        self.job_duration = Histogram(
            "reliever_job_duration_seconds",
            "From a job's start to its terminal event, by its final model.",
            ["agent", "model", "status"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.active = Gauge(
            "reliever_active_jobs",
            "Jobs running in this process now.",
            ["agent"],
            registry=r,
        )
        self.tokens = Counter(
            "reliever_tokens",
            "Tokens used, failed attempts included (type input or output).",
            ["agent", "model", "type"],
            registry=r,
        )
        self.dead_letters = Counter(
            "reliever_dead_letters",
            "Broker messages no worker can run, acknowledged into the dead-letter list.",
            ["reason"],
            registry=r,
        )


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint."""

    port: int
    server: WSGIServer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_server_lock = threading.Lock()
_server: MetricsServer | None = None


def start_metrics_server(
    settings: Settings, *, registry: CollectorRegistry = REGISTRY
) -> MetricsServer | None:
    """Serve ``/metrics`` on the first free port from ``METRICS_PORT``; None when off.

    Idempotent within a process: a second call returns the server already running.
    """
    global _server
    if settings.metrics_port is None:
        return None
    with _server_lock:
        if _server is None:
            _server = serve_metrics(
                settings.metrics_host,
                settings.metrics_port,
                tries=settings.metrics_port_tries,
                registry=registry,
            )
        return _server


def serve_metrics(
    host: str, first_port: int, *, tries: int, registry: CollectorRegistry
) -> MetricsServer:
    """Start a ``/metrics`` server on the first free port of ``first_port .. +tries-1``.

    Raises:
        OSError: every port in the range is taken (or another bind error).
    """
    last: OSError | None = None
    for port in range(first_port, min(first_port + tries, 65536)):
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            last = exc
            continue
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return MetricsServer(port=bound, server=server)
    raise OSError(
        errno.EADDRINUSE,
        f"no free metrics port in {first_port}..{first_port + tries - 1} on {host}",
    ) from last
