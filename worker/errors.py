"""Every error reliever raises on purpose, and the `kind` each one reports.

The tree::

    RelieverError                 root of everything raised on purpose
    ├── ConfigError               kind=config: bad settings or agents file; the worker
    │                             refuses to start (a job meeting one later ends with it)
    ├── JobError                  the job itself is unusable; never retried
    │   ├── InvalidJob            kind=invalid_job (names the field)
    │   ├── UnknownAgent          kind=unknown_agent
    │   └── InvalidMessage        kind=invalid_message: a broker message no worker can run
    ├── ProviderError             one failed attempt on one model
    │   ├── RetryableError        kind=retryable: 408/500/502/503/504/529, connect errors,
    │   │   │                     a stream that broke or ended without its end marker
    │   │   └── ProviderTimeout   kind=timeout: connect, first token, idle, total
    │   ├── RateLimited           kind=rate_limited: 429 (own branch: design rule 3 differs)
    │   └── FatalError            kind=fatal: other 4xx, protocol violations, a missing key
    │       └── ContextOverflow   kind=context_overflow
    ├── ChainFailed               terminal: all_models_failed, model_failed or context_overflow
    ├── Stopped                   terminal, not a model's fault
    │   ├── Cancelled             kind=cancelled
    │   └── DeadlineExceeded      kind=deadline_exceeded
    └── InternalError             kind=internal: a bug; the job ends and Sentry gets the traceback

An event's ``error.kind`` always comes from the class (``kind``), never from a string typed
elsewhere. Exceptions are immutable after construction and their messages never hold a
prompt or a secret: provider messages are cut short and scrubbed before they get here.
"""

from __future__ import annotations

from typing import Any, ClassVar

EXIT_CONFIG = 2
"""The exit status of every command stopped by a broken configuration (settings or agents
file): a worker at start, ``python -m worker check`` and ``python -m worker run``."""


class RelieverError(Exception):
    """Root of every error reliever raises on purpose."""

    kind: ClassVar[str] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def info(self) -> dict[str, Any]:
        """The ``error`` object of the events: ``{kind, message, status?, retry_after_s?}``."""
        return {"kind": self.kind, "message": self.message}


class ConfigError(RelieverError):
    """The settings or the agents file are wrong; names the file, key path and problem."""

    kind = "config"


class JobError(RelieverError):
    """The job cannot run at all; it ends at once and is never retried."""


class InvalidJob(JobError):
    """The job payload is malformed; the message names the field."""

    kind = "invalid_job"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self.field is not None:
            out["field"] = self.field
        return out


class UnknownAgent(JobError):
    """The job names an agent the agents file does not define."""

    kind = "unknown_agent"


class InvalidMessage(JobError):
    """The broker message carrying the job cannot be run (undecodable, wrong shape, unknown
    task): it went to the dead-letter list, and its job, if an id could be read, ends."""

    kind = "invalid_message"


class ProviderError(RelieverError):
    """One failed attempt on one model.

    Attributes:
        status: the HTTP status, when the upstream answered with one.
        retry_after_s: the server's Retry-After in seconds, kept up to a day (it sets the
            pin); the chain caps its wait at 60 s.
        provider_code: the provider's own error type or code (``rate_limit_exceeded`` …).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        provider_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.provider_code = provider_code

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self.status is not None:
            out["status"] = self.status
        if self.retry_after_s is not None:
            out["retry_after_s"] = self.retry_after_s
        return out


class RetryableError(ProviderError):
    """A transient failure: retry the same model after a backoff."""

    kind = "retryable"


class ProviderTimeout(RetryableError):
    """Connect, first-token, idle or total timeout; the HTTP request was closed."""

    kind = "timeout"


class RateLimited(ProviderError):
    """HTTP 429: skip to the next model at once (design rule 3)."""

    kind = "rate_limited"


class FatalError(ProviderError):
    """A failure retrying cannot fix: other 4xx, a protocol violation, a missing key."""

    kind = "fatal"


class ContextOverflow(FatalError):
    """The provider says the prompt is too long for the model."""

    kind = "context_overflow"


class ChainFailed(RelieverError):
    """Every model of the chain failed; terminal.

    Attributes:
        kind: ``all_models_failed``, ``model_failed`` (no fallbacks) or ``context_overflow``.
        last: the last attempt's error.
    """

    def __init__(self, message: str, *, kind: str, last: ProviderError) -> None:
        super().__init__(message)
        self._kind = kind
        self.last = last

    def info(self) -> dict[str, Any]:
        out = self.last.info()
        out["kind"] = self._kind
        out["message"] = self.message
        return out


class Stopped(RelieverError):
    """The job was stopped from outside the chain: not any model's fault."""


class Cancelled(Stopped):
    """``cancel(job_id)`` was called."""

    kind = "cancelled"


class DeadlineExceeded(Stopped):
    """The job's deadline passed."""

    kind = "deadline_exceeded"


class InternalError(RelieverError):
    """A bug: the job ends ``failed`` and Sentry gets the traceback."""

    kind = "internal"
