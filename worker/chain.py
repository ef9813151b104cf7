"""The chain executor: the chain rules (docs/design.md) 1-10 for one job, with no Celery in sight.

1. The chain is ``[model] + fallbacks``; each model gets ``1 + retries`` attempts, and no
   attempt hides retries of its own (httpx runs with ``retries=0``).
2. Retryable errors back off and retry the same model; the delay comes from `backoff`
   (``retry.BackoffPolicy``); a Retry-After on 429/503/529 replaces it (≤ 60 s). No wait
   between models, none after the last attempt.
3. 429 with a later model: next model at once. With none left: fail, unless
   ``retry_on_rate_limit``: one wait (Retry-After ≤ 60 s, else the backoff delay) per retry.
4. Other 4xx: next model at once.
5. Context overflow: next model; if every model overflowed the job's kind is
   ``context_overflow``.
6. Cancellation and the job's deadline stop everything, mid-stream or mid-wait.
7. Cooldown: a non-retryable primary failure other than a context overflow (or, with
   ``cooldown_on_exhausted``, the primary using up its retries) rescued by a fallback
   pins the agent to that fallback for
   ``max(cooldown, Retry-After)``; a primary success clears the pin the job started
   with (a pin set by another worker while it ran stays); a failing pin rescued
   by a later model moves the pin; a job that starts inside a cooldown and fails on the rest
   of the chain tries the skipped models before giving up. No ``fallback`` event when a
   job merely starts inside a cooldown.
8. Every model failed: ``all_models_failed`` (``model_failed`` without fallbacks).
9. Classification is ``classify.py``'s, by status and type first.
10. A stream that broke after deltas were published is retried or falls back with
    ``discard: true``; the final text is only the winning attempt's; failed attempts'
    usage is counted.

An attempt whose completion (its text, and its tool calls' ids, names and arguments)
grows over ``max_completion_bytes`` of UTF-8 fails as a :class:`FatalError` before the
delta that would pass the limit is published: like any fatal error, the chain moves on
to the next model.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.agents import Agent, ModelRef
from worker.clock import CancelToken, Clock, Deadline
from worker.cooldown import CooldownStore, Pin, PinAtStart
from worker.errors import (
    Cancelled,
    ChainFailed,
    ConfigError,
    ContextOverflow,
    DeadlineExceeded,
    FatalError,
    InternalError,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RetryableError,
    Stopped,
)
from worker.events import Event, EventSink, result_of
from worker.guard import StreamGuard, guarding
from worker.jobs import Job
from worker.providers.base import Provider, ProviderRequest, Usage
from worker.retry import RETRY_AFTER_CAP_S
from worker.sse import utf8_size

MAX_COMPLETION_BYTES = 1_000_000
"""The default limit on one attempt's completion (``RELIEVER_MAX_COMPLETION_BYTES``)."""


class _Next(enum.Enum):
    RETRY = "retry"
    MOVE_ON = "move_on"


@dataclass(slots=True)
class _AttemptState:
    """What one attempt produced so far (kept when it fails half-way)."""

    text: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    published: bool = False
    size: int = 0
    """UTF-8 bytes of the text and tool calls so far."""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One try on one model: the ``attempts`` entries of terminal events."""

    n: int
    model: str
    attempt: int
    outcome: str
    error: dict[str, Any] | None
    latency_s: float
    usage: Usage

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "model": self.model,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "error": self.error,
            "latency_s": round(self.latency_s, 6),
            "usage": self.usage.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job ended: its terminal event as delivered."""

    terminal: Event

    @property
    def status(self) -> str:
        return str(self.terminal["type"])

    def result(self) -> dict[str, Any]:
        """The job's result: the terminal event's fields plus ``job_id`` and ``status``."""
        return result_of(self.terminal)


def arms_cooldown(kind: str, *, cooldown_on_exhausted: bool) -> bool:
    """Whether a model's final failure of this ``kind`` may pin its agent (rule 7).

    A transient failure only when the model used up its retries and the agent says so; a
    context overflow never (the prompt was too long, the model is healthy); any other
    non-retryable failure (429, other 4xx) always.
    """
    if kind in (RetryableError.kind, ProviderTimeout.kind):
        return cooldown_on_exhausted
    return kind != ContextOverflow.kind


def _assemble_tool_calls(state: _AttemptState, n: int) -> list[dict[str, Any]]:
    calls = []
    for index in sorted(state.tool_calls):
        call = state.tool_calls[index]
        calls.append(
            {
                "id": call["id"] or f"call_{n}_{index}",
                "name": call["name"] or "",
                "arguments": "".join(call["arguments"]),
            }
        )
    return calls


class ChainExecutor:
    """Runs jobs through their agent's chain; one instance serves every thread.

    Args:
        providers: adapters by provider name.
        cooldowns: where pins live (Redis in production).
        clock: the time source and sleeper.
        rng: the source of jitter.
        max_completion_bytes: the most an attempt's completion may hold (see the module
            docstring).
    """

    def __init__(
        self,
        *,
        providers: Mapping[str, Provider],
        cooldowns: CooldownStore,
        clock: Clock,
        rng: random.Random,
        max_completion_bytes: int = MAX_COMPLETION_BYTES,
    ) -> None:
        self._providers = providers
        self._cooldowns = cooldowns
        self._clock = clock
        self._rng = rng
        self._max_completion_bytes = max_completion_bytes

    def run(
        self,
        job: Job,
        agent: Agent,
        sink: EventSink,
        *,
        cancel: CancelToken | None = None,
        deadline: Deadline | None = None,
        first_n: int = 0,
        pin_at_start: PinAtStart | None = None,
    ) -> Outcome:
        """Run ``job`` to its terminal event, which this method always emits.

        Args:
            job: the validated job.
            agent: its agent.
            sink: where the events go.
            cancel: set to stop the job.
            deadline: the job's deadline (default: ``job.deadline_s`` from now).
            first_n: attempts a lost earlier run of this job already published; this
                run's attempt numbers ``n`` continue after them.
            pin_at_start: the agent's pin, when the caller read it as the job started
                (default: read it from the cooldown store now).

        Raises:
            Exception: only a bug; ``failed`` (kind ``internal``) was emitted first.
        """
        run = _JobRun(
            executor=self,
            job=job,
            agent=agent,
            sink=sink,
            cancel=cancel or CancelToken(),
            deadline=deadline or Deadline.after(self._clock, job.deadline_s),
            pin_at_start=pin_at_start,
        )
        run.n = first_n
        return run.execute()


class _JobRun:
    """The state of one job's run through the chain."""

    def __init__(
        self,
        *,
        executor: ChainExecutor,
        job: Job,
        agent: Agent,
        sink: EventSink,
        cancel: CancelToken,
        deadline: Deadline,
        pin_at_start: PinAtStart | None,
    ) -> None:
        self.x = executor
        self.clock = executor._clock
        self.job = job
        self.agent = agent
        self.sink = sink
        self.cancel = cancel
        self.deadline = deadline
        self.pin_at_start = pin_at_start
        self.started_pinned = False
        self.records: list[AttemptRecord] = []
        self.usage = Usage()
        self.n = 0
        self.started_at = self.clock.monotonic()
        self.request = ProviderRequest(
            messages=job.messages_list(), tools=job.tools_list(), params=job.params_dict()
        )

    def execute(self) -> Outcome:
        try:
            body = self._chain()
        except (ChainFailed, Stopped) as exc:
            body = {"type": "failed", "error": exc.info(), "attempts": self._attempts()}
        except Exception:
            failed = {
                "type": "failed",
                "error": InternalError("internal error in the worker").info(),
                "attempts": self._attempts(),
            }
            self.sink.emit(failed)
            raise
        return Outcome(self.sink.emit(body))

    def _attempts(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]

    def _check_stop(self) -> None:
        if self.cancel.cancelled:
            raise Cancelled("the job was cancelled")
        if self.deadline.expired():
            raise DeadlineExceeded("the job's deadline passed")

    def _order(self) -> tuple[list[int], bool]:
        """Chain positions in the order this job tries them, and whether it is pinned."""
        names = self.agent.chain_names
        if self.pin_at_start is None:
            pin = self.x._cooldowns.get(self.agent.name)
        else:
            pin = self.pin_at_start.pin
        self.started_pinned = pin is not None
        start = 0
        if pin is not None and pin.chain == names and pin.model in names[1:]:
            start = names.index(pin.model)
        order = list(range(start, len(names))) + list(range(start))
        return order, start > 0

    def _chain(self) -> Event:
        agent = self.agent
        order, in_cooldown = self._order()
        start = order[0]
        self.sink.emit(
            {
                "type": "started",
                "agent": agent.name,
                "chain": list(agent.chain_names),
                "start_model": agent.chain[start].name,
                "in_cooldown": in_cooldown,
            }
        )
        last_error: ProviderError | None = None
        final_errors: list[ProviderError] = []
        primary_failure: ProviderError | None = None
        pin_failure: ProviderError | None = None
        discard = False
        for pos, idx in enumerate(order):
            model = agent.chain[idx]
            if pos > 0:
                assert last_error is not None
                self.sink.emit(
                    {
                        "type": "fallback",
                        "from": agent.chain[order[pos - 1]].name,
                        "to": model.name,
                        "reason": last_error.kind,
                        "error": last_error.info(),
                        "discard": discard,
                    }
                )
                discard = False
            has_later = pos < len(order) - 1
            delays = agent.backoff.delays(self.x._rng)
            for attempt in range(1, agent.max_attempts + 1):
                self._check_stop()
                state, error = self._attempt(model, idx, attempt)
                if error is None:
                    return self._succeed(model, idx, start, state, primary_failure, pin_failure)
                last_error = error
                discard = state.published
                planned = next(delays)
                if self._decide(error, attempt, has_later) is _Next.MOVE_ON:
                    break
                delay = self._delay(error, planned)
                self.sink.emit(
                    {
                        "type": "retry",
                        "n": self.n,
                        "model": model.name,
                        "delay_s": round(delay, 6),
                        "error": error.info(),
                        "discard": discard,
                    }
                )
                discard = False
                self._wait(delay)
            assert last_error is not None
            final_errors.append(last_error)
            arms = arms_cooldown(last_error.kind, cooldown_on_exhausted=agent.cooldown_on_exhausted)
            if idx == 0 and arms:
                primary_failure = last_error
            if in_cooldown and idx == start and arms:
                pin_failure = last_error
        assert last_error is not None
        raise self._chain_failed(final_errors, last_error)

    def _attempt(
        self, model: ModelRef, idx: int, attempt: int
    ) -> tuple[_AttemptState, ProviderError | None]:
        self.n += 1
        n = self.n
        self.sink.emit(
            {
                "type": "attempt",
                "n": n,
                "model": model.name,
                "attempt": attempt,
                "max_attempts": self.agent.max_attempts,
                "fallback": idx != 0,
            }
        )
        state = _AttemptState()
        began = self.clock.monotonic()
        error: ProviderError | None = None
        try:
            self._stream(model, n, state)
        except ProviderError as exc:
            error = exc
        except Stopped as exc:
            self._record(n, model, attempt, exc, began, state)
            raise
        self._record(n, model, attempt, error, began, state)
        return state, error

    def _record(
        self,
        n: int,
        model: ModelRef,
        attempt: int,
        error: ProviderError | Stopped | None,
        began: float,
        state: _AttemptState,
    ) -> None:
        latency = self.clock.monotonic() - began
        self.usage = self.usage + state.usage
        self.records.append(
            AttemptRecord(
                n=n,
                model=model.name,
                attempt=attempt,
                outcome="ok" if error is None else error.kind,
                error=None if error is None else error.info(),
                latency_s=latency,
                usage=state.usage,
            )
        )

    def _stream(self, model: ModelRef, n: int, state: _AttemptState) -> None:
        provider = self.x._providers.get(model.provider)
        if provider is None:
            raise FatalError(f"no adapter for provider {model.provider!r}")
        timeouts = model.timeouts
        guard = StreamGuard(
            clock=self.clock,
            cancel=self.cancel,
            first_token_s=timeouts.first_token,
            idle_s=timeouts.idle,
            total_s=timeouts.total,
            deadline_at=self.deadline.at,
        )
        undo = self.cancel.on_cancel(guard.interrupt)
        emit = self.sink.emit
        try:
            with guarding(guard):
                for delta in self._deltas(provider, model):
                    guard.check()
                    if delta.text is not None:
                        self._grow(state, utf8_size(delta.text))
                        if not state.published:
                            guard.first_delta()
                            state.published = True
                        state.text.append(delta.text)
                        emit({"type": "delta", "n": n, "text": delta.text})
                    elif delta.tool_call is not None:
                        piece = delta.tool_call
                        self._grow(
                            state,
                            utf8_size(piece.arguments)
                            + utf8_size(piece.id or "")
                            + utf8_size(piece.name or ""),
                        )
                        if not state.published:
                            guard.first_delta()
                            state.published = True
                        call = state.tool_calls.setdefault(
                            piece.index, {"id": None, "name": None, "arguments": []}
                        )
                        call["id"] = call["id"] or piece.id
                        call["name"] = call["name"] or piece.name
                        call["arguments"].append(piece.arguments)
                        emit({"type": "delta", "n": n, "tool_call": piece.as_event()})
                    if delta.finish_reason is not None:
                        state.finish_reason = delta.finish_reason
                    if delta.usage is not None:
                        state.usage = delta.usage
        finally:
            undo()

    def _grow(self, state: _AttemptState, size: int) -> None:
        """Count ``size`` more bytes of completion; over the limit, the attempt fails."""
        state.size += size
        limit = self.x._max_completion_bytes
        if state.size > limit:
            raise FatalError(f"the completion is over {limit} bytes")

    def _deltas(self, provider: Provider, model: ModelRef) -> Iterator[Any]:
        try:
            yield from provider.stream(model, self.request)
        except ConfigError as exc:
            # A missing key is this model's failure, not the job's: the chain moves on.
            raise FatalError(exc.message) from None

    def _decide(self, error: ProviderError, attempt: int, has_later: bool) -> _Next:
        last_attempt = attempt >= self.agent.max_attempts
        if isinstance(error, RetryableError):
            return _Next.MOVE_ON if last_attempt else _Next.RETRY
        if isinstance(error, RateLimited):
            if has_later or not self.agent.retry_on_rate_limit or last_attempt:
                return _Next.MOVE_ON
            return _Next.RETRY
        return _Next.MOVE_ON

    def _delay(self, error: ProviderError, planned_s: float) -> float:
        # The one place the 60 s cap applies: the error keeps the server's longer
        # Retry-After, which the cooldown pin lasts for.
        if error.retry_after_s is not None:
            return min(error.retry_after_s, RETRY_AFTER_CAP_S)
        return planned_s

    def _wait(self, delay_s: float) -> None:
        remaining = self.deadline.remaining_s()
        wait_s = delay_s if remaining is None else min(delay_s, remaining)
        self.clock.sleep(wait_s, wake=self.cancel.event)
        self._check_stop()

    def _succeed(
        self,
        model: ModelRef,
        idx: int,
        start: int,
        state: _AttemptState,
        primary_failure: ProviderError | None,
        pin_failure: ProviderError | None,
    ) -> Event:
        agent = self.agent
        store = self.x._cooldowns
        if idx == 0:
            if self.started_pinned:
                store.clear(agent.name)
        elif primary_failure is not None or (pin_failure is not None and idx != start):
            cause = primary_failure or pin_failure
            assert cause is not None
            ttl = agent.cooldown_s
            if primary_failure is not None and primary_failure.retry_after_s:
                ttl = max(ttl, primary_failure.retry_after_s)
            store.pin(
                agent.name,
                Pin(
                    model=model.name,
                    chain=agent.chain_names,
                    reason=cause.kind,
                    status=cause.status,
                ),
                ttl,
            )
        return {
            "type": "completed",
            "model": model.name,
            "text": "".join(state.text),
            "tool_calls": _assemble_tool_calls(state, self.n),
            "finish_reason": state.finish_reason or "stop",
            "usage": self.usage.as_dict(),
            "attempts": self._attempts(),
            "fallback_used": idx != 0,
            "duration_s": round(self.clock.monotonic() - self.started_at, 6),
        }

    def _chain_failed(self, errors: list[ProviderError], last: ProviderError) -> ChainFailed:
        if all(isinstance(e, ContextOverflow) for e in errors):
            kind = "context_overflow"
            what = "the prompt is too long for every model"
        elif len(self.agent.chain) == 1:
            kind = "model_failed"
            what = f"model {self.agent.chain[0].name} failed"
        else:
            kind = "all_models_failed"
            what = f"all {len(self.agent.chain)} models failed"
        return ChainFailed(f"{what}; last error: {last.message}", kind=kind, last=last)
