"""The Celery app (``celery -A worker worker`` finds ``app`` here).

Configured from :class:`~settings.Settings`: Redis broker and result backend, JSON only,
late acks with ``task_reject_on_worker_lost``, prefetch 1, a long visibility timeout (the
last resort; lost workers are detected by job leases, see ``worker.lease``), task events
on for Flower, result expiry, and broker retries at start-up.
"""

from __future__ import annotations

import gc
import logging
import sys
from typing import Any, NoReturn

from celery import Celery, current_app, signals
from pydantic import ValidationError

from settings import Settings, describe_errors, get_settings
from worker import broker
from worker.agents import Agents, load_agents
from worker.errors import EXIT_CONFIG, ConfigError
from worker.observability import configure_logging, start_observability

TASK_NAME = "reliever.complete"

log = logging.getLogger(__name__)


class RelieverCelery(Celery):
    """A Celery app that remembers the settings it was built from."""

    settings: Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery's configuration (lowercase names) for ``settings``."""
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    broker_options = {
        **visibility,
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        # Well above a job at its size limit (base64 in kombu's envelope, with Celery's
        # headers), so that such a job still ends with `invalid_job` naming its size.
        broker.MAX_MESSAGE_BYTES: 4 * settings.max_job_bytes + 64 * 1024,
    }
    return {
        "broker_url": settings.broker_url,
        "result_backend": settings.result_backend,
        # One backend (one Redis pool) for the process: redis-py is thread-safe, and a
        # backend per thread means one per task under gevent, each with a new connection.
        "result_backend_thread_safe": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": broker_options,
        "result_backend_transport_options": visibility,
        "visibility_timeout": settings.visibility_timeout_s,
        "broker_connection_retry_on_startup": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # task_track_started stays off: it would store STARTED in the result backend (a
        # GET and a SET) before every job's first line runs. Flower takes STARTED from the
        # task-started event, and the backend's state goes PENDING -> RUNNING (stored at
        # the first attempt, off the job's path) -> SUCCESS.
        "result_expires": settings.result_expires_s,
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}},
        "worker_hijack_root_logger": False,
        # Named, not imported: Celery's consumer modules must load after Sentry patched
        # Celery's tracer (at celeryd_init), or tasks lose Sentry's scope.
        "worker_consumer": "worker.consumer:PromptConsumer",
    }


def create_app(settings: Settings) -> RelieverCelery:
    # kombu's Redis transport without a new Redis client per command (worker.broker).
    broker.install()
    app = RelieverCelery("reliever", include=["tasks.complete"])
    app.settings = settings
    app.conf.update(celery_config(settings))
    return app


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(get_settings())


@signals.celeryd_init.connect
def _start_worker(**_: Any) -> None:
    """Refuse a broken agents file, then start Sentry, traces and the metrics endpoint.

    Runs before the worker connects to the broker, so a worker whose agents file is
    broken exits (status 2, one line naming the file, key path and problem) without
    taking a job. It also runs before the worker imports its consumer (Sentry must patch
    Celery's tracer first) and before ``setup_logging``, so logging is configured here.
    """
    settings = get_settings()
    agents_or_exit(settings)
    configure_logging(settings)
    try:
        start_observability(settings)
    except ConfigError as exc:
        _exit_config(exc.message)


GC_THRESHOLDS = (7000, 10, 10)
"""The collector's thresholds in a worker (Python's default first one is 700).

A streaming worker allocates in short bursts (a chunk's objects, freed as the chunk is
done), which kept the youngest generation's count crossing 700 and its survivors being
promoted: with 500 streams, ten full collections in 79 s, up to 90 ms each, a pause in
every stream. At 7000: one young collection every few seconds, one full collection in
those 79 s (56 ms), the collector's CPU 2.3 % -> 0.2 %, and as little unreachable
garbage found at the end (measured in a gevent process running reliever's executor and
Redis sink, docs/benchmarks.md).
"""


@signals.worker_ready.connect
def _start_background(sender: Any = None, **_: Any) -> None:
    """Idle workers reap lost jobs and listen for cancels too, not only busy ones."""
    consumer_app = getattr(sender, "app", None)
    if consumer_app is not None and TASK_NAME in consumer_app.tasks:
        try:
            consumer_app.tasks[TASK_NAME].service  # noqa: B018 - builds and starts it
        except ConfigError as exc:
            # Checked at start already; broken since (the file changed): each job now
            # ends `failed` with kind `config` until the worker is fixed and restarted.
            log.error("the worker's configuration is broken: %s", exc)
    # Everything built so far (modules, the app, the service) lives as long as the
    # process: moved out of the collector's sight, a full collection no longer walks it
    # (one took 80-110 ms with 500 streams running, a pause in every stream).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@signals.worker_shutting_down.connect
def _drain(how: str = "", **_: Any) -> None:
    """On a warm shutdown (SIGTERM, a first Ctrl-C) hand unfinished jobs off after the grace.

    Celery stops consuming and waits for running tasks; the service gives them
    ``RELIEVER_DRAIN_S`` to finish, then hands the rest to other workers, and the tasks
    it stopped return at once, so the process exits within the grace plus a moment.
    """
    start_drain = getattr(current_app.tasks.get(TASK_NAME), "start_drain", None)
    if how == "Warm" and start_drain is not None:
        start_drain()


@signals.worker_shutdown.connect
def _stop_background(sender: Any = None, **_: Any) -> None:
    consumer_app = getattr(sender, "app", None)
    if consumer_app is not None and TASK_NAME in consumer_app.tasks:
        consumer_app.tasks[TASK_NAME].shutdown()


def _exit_config(message: str) -> NoReturn:
    print(f"reliever: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_CONFIG)


def settings_or_exit() -> Settings:
    """The process's settings; a bad environment stops the process with one clear line."""
    try:
        return get_settings()
    except ValidationError as exc:
        _exit_config(f"bad settings: {describe_errors(exc)}")


def agents_or_exit(settings: Settings) -> Agents:
    """The agents file, validated; a broken one stops the process with one clear line."""
    try:
        return load_agents(settings.agents_file, loopback_only=settings.loopback_only)
    except ConfigError as exc:
        _exit_config(f"bad agents file: {exc.message}")


app = create_app(settings_or_exit())
