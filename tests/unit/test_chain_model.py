"""The chain executor against a reference model of the chain rules (docs/design.md, 1-8, 10).

The model below is plain Python written from the rules, not from worker/chain.py: for an
agent, the cooldown pin the job meets and a script of outcomes per model, it says which
events the job publishes (types, models, attempt numbers, waits, discard flags, the
terminal kind), how long the executor sleeps, and which pin the agent has afterwards. The
property runs the executor on the same inputs (a scripted provider, a FakeClock, a
MemoryCooldownStore) and asserts both agree, so a restructure of the executor cannot change
a decision unnoticed.

Not modelled here: cancellation and the deadline (rule 6; the deadline is a day, far past
every wait), classification (rule 9: the provider raises typed errors), jitter (0),
tool-call deltas, usage, the completion size limit and what a concurrent worker does to the
pin while a job runs (beyond a pin set after the job read none).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from hypothesis import example, given
from hypothesis import strategies as st

from worker.agents import ModelRef, parse_agents
from worker.chain import ChainExecutor
from worker.clock import FakeClock
from worker.cooldown import MemoryCooldownStore, Pin, PinAtStart
from worker.errors import (
    ContextOverflow,
    FatalError,
    ProviderError,
    ProviderTimeout,
    RateLimited,
    RetryableError,
)
from worker.events import Event, MemoryEventSink
from worker.jobs import parse_job
from worker.providers.base import Delta, ProviderRequest

AGENT = "support"
NAMES = ("m0", "m1", "m2")
RETIRED = "retired"
"""A model of an older chain only: pins recorded for that chain name it."""
WAIT_CAP_S = 60.0
"""Rules 2 and 3: the longest wait a Retry-After causes (the error keeps the full value)."""
OLD_PIN_TTL_S = 1_000_000.0
"""A pin the job meets outlives every wait of the job (at most 3 × 3 × 60 s)."""
DAY_S = 86_400.0

Kind = Literal["ok", "retryable", "timeout", "rate_limited", "fatal", "context_overflow"]
ERRORS: Mapping[str, type[ProviderError]] = {
    "retryable": RetryableError,
    "timeout": ProviderTimeout,
    "rate_limited": RateLimited,
    "fatal": FatalError,
    "context_overflow": ContextOverflow,
}
RETRYABLE_KINDS = frozenset({"retryable", "timeout"})


# --- the inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One attempt's outcome: the text deltas it publishes, then success or an error."""

    kind: Kind
    deltas: tuple[str, ...] = ()
    status: int | None = None
    retry_after_s: float | None = None


@dataclass(frozen=True)
class PinSpec:
    model: str
    chain: tuple[str, ...]
    reason: str = "fatal"
    status: int | None = 400


@dataclass(frozen=True)
class Case:
    """An agent, the pin the job meets and each model's script (its last step repeats).

    ``read``: how the job learns of ``pin``: ``store`` (the executor reads the store),
    ``caller`` (the caller read it: ``PinAtStart(pin)``) or ``meanwhile`` (the caller read
    no pin, another worker set ``pin`` since: ``PinAtStart(None)``).
    """

    chain: tuple[str, ...]
    retries: int
    cooldown_s: int
    cooldown_on_exhausted: bool
    retry_on_rate_limit: bool
    base_ms: int
    factor: float
    max_ms: int
    pin: PinSpec | None
    read: Literal["store", "caller", "meanwhile"]
    scripts: Mapping[str, tuple[Step, ...]]


texts = st.lists(st.sampled_from(["a", "b c", "é", "?"]), min_size=1, max_size=3).map(tuple)
partial = st.lists(st.sampled_from(["x", "y z"]), min_size=1, max_size=2).map(tuple)
retry_after = (
    st.none() | st.sampled_from([0.0, 1.5, 60.0, 61.0, 600.0, DAY_S]) | st.floats(0, DAY_S)
)

successes = st.builds(Step, st.just("ok"), texts)
# Retry-After only where the classifier keeps one: 429, 503, 529, and a rate-limit error
# event inside a stream (no status).
failures = st.one_of(
    st.builds(Step, st.just("retryable"), status=st.sampled_from([408, 500, 502, 504, 520])),
    st.builds(
        Step, st.just("retryable"), status=st.sampled_from([503, 529]), retry_after_s=retry_after
    ),
    st.builds(Step, st.just("retryable"), partial),  # a stream that broke after deltas
    st.builds(Step, st.just("timeout"), st.just(()) | partial),
    st.builds(Step, st.just("rate_limited"), status=st.just(429), retry_after_s=retry_after),
    st.builds(Step, st.just("rate_limited"), retry_after_s=retry_after),
    st.builds(Step, st.just("fatal"), status=st.sampled_from([400, 401, 403, 404, 422])),
    st.builds(Step, st.just("fatal"), partial),  # the completion grew over its limit
    st.builds(Step, st.just("context_overflow"), status=st.sampled_from([413, 400])),
)


def scripts(*, answers: bool | None = None) -> st.SearchStrategy[tuple[Step, ...]]:
    """Up to 3 failures, then an answer (``answers``: always, never, None: either).

    A model that never answers repeats its last failure; nothing follows a success (the job
    ends there).
    """
    either = st.booleans().flatmap(lambda ok: successes if ok else failures)  # 1:1, unflattened
    last = {True: successes, False: failures, None: either}[answers]
    return st.builds(lambda fails, end: (*fails, end), st.lists(failures, max_size=3), last)


Focus = Literal["any", "pinned", "primary_down"]


@st.composite
def cases(draw: st.DrawFn, focus: Focus = "any") -> Case:
    """A case; ``focus`` narrows it to jobs that start at a pinned fallback (``pinned``) or
    to unpinned jobs whose primary never answers (``primary_down``)."""
    chain = NAMES[: draw(st.integers(1 if focus == "any" else 2, 3))]
    pin_here = st.builds(PinSpec, st.sampled_from(chain[1:]), st.just(chain))
    # The agents file changed: a pin for the chain as it was (ignored, README).
    old_chain = (*chain, RETIRED)
    pin_old = st.builds(PinSpec, st.sampled_from(old_chain[1:]), st.just(old_chain))
    pins = {
        "any": st.none() | pin_old | pin_here if len(chain) > 1 else st.none() | pin_old,
        "pinned": pin_here,
        "primary_down": st.none() | pin_old,
    }[focus]
    reads = ["store", "caller"] if focus == "pinned" else ["store", "caller", "meanwhile"]
    return Case(
        chain=chain,
        retries=draw(st.integers(0, 3)),
        cooldown_s=draw(st.sampled_from([1, 60, 300])),
        cooldown_on_exhausted=draw(st.booleans()),
        retry_on_rate_limit=draw(st.booleans()),
        base_ms=draw(st.sampled_from([1, 200, 1500])),
        factor=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        max_ms=draw(st.sampled_from([100, 2000, 5000])),
        pin=draw(pins),
        read=draw(st.sampled_from(reads)),
        scripts={
            name: draw(scripts(answers=False if i == 0 and focus == "primary_down" else None))
            for i, name in enumerate(chain)
        },
    )


# --- the reference model -------------------------------------------------------------------


@dataclass
class Expected:
    events: list[tuple[Any, ...]]
    sleeps: list[float]
    pin: PinSpec | None
    """The agent's pin after the job."""
    pin_ttl_s: float | None
    """How long that pin lasts, when this job wrote it."""


def backoff_s(case: Case, k: int) -> float:
    """README: the delay before retry k is ``min(max, base · factor^(k-1))`` (jitter 0)."""
    return min(case.max_ms / 1000, case.base_ms / 1000 * case.factor ** (k - 1))


def arms(case: Case, kind: str) -> bool:
    """Rule 7: a model's final failure that pins away from it."""
    if kind in RETRYABLE_KINDS:  # it used up its retries
        return case.cooldown_on_exhausted
    return kind != "context_overflow"


def reference(case: Case) -> Expected:
    chain = case.chain
    attempts = 1 + case.retries  # rule 1
    seen = None if case.read == "meanwhile" else case.pin
    # Rule 7: a live pin for this chain starts the job at its model; others are ignored.
    start = chain.index(seen.model) if seen is not None and seen.chain == chain else 0
    order = [*chain[start:], *chain[:start]]  # the skipped models come last
    events: list[tuple[Any, ...]] = [("started", list(chain), chain[start], start > 0)]
    sleeps: list[float] = []
    n = 0
    final: list[Step] = []
    primary_cause: Step | None = None
    pinned_cause: Step | None = None
    for pos, model in enumerate(order):
        if pos > 0:  # rules 3-5 and the end of rule 2: next model at once
            last = final[-1]
            events.append(("fallback", order[pos - 1], model, last.kind, bool(last.deltas)))
        script = case.scripts[model]
        for k in range(1, attempts + 1):
            step = script[min(k, len(script)) - 1]
            n += 1
            events.append(("attempt", n, model, k, attempts, model != chain[0]))
            events.extend(("delta", n, text) for text in step.deltas)
            if step.kind == "ok":
                events.append(("completed", model, "".join(step.deltas), model != chain[0]))
                pin, ttl = pin_after_success(case, seen, model, primary_cause, pinned_cause)
                return Expected(events, sleeps, pin, ttl)
            if k == attempts:
                break  # no wait after the last attempt
            if step.kind in RETRYABLE_KINDS:  # rule 2
                delay = backoff_s(case, k)
                if step.status in (503, 529) and step.retry_after_s is not None:
                    delay = min(step.retry_after_s, WAIT_CAP_S)
            elif step.kind == "rate_limited" and pos == len(order) - 1 and case.retry_on_rate_limit:
                # rule 3: a 429 with no model left, retried on request
                delay = backoff_s(case, k)
                if step.retry_after_s is not None:
                    delay = min(step.retry_after_s, WAIT_CAP_S)
            else:
                break  # rules 3-5: a 429 with a model left, other 4xx, context overflow
            events.append(("retry", n, model, round(delay, 6), step.kind, bool(step.deltas)))
            sleeps.append(delay)
        final.append(step)
        if model == chain[0] and arms(case, step.kind):
            primary_cause = step
        if start > 0 and model == chain[start] and arms(case, step.kind):
            pinned_cause = step
    # Rules 5 and 8: the terminal kind, carrying the last error.
    if all(step.kind == "context_overflow" for step in final):
        kind = "context_overflow"
    elif len(chain) == 1:
        kind = "model_failed"
    else:
        kind = "all_models_failed"
    events.append(("failed", kind, final[-1].status))
    return Expected(events, sleeps, case.pin, None)


def pin_after_success(
    case: Case,
    seen: PinSpec | None,
    winner: str,
    primary_cause: Step | None,
    pinned_cause: Step | None,
) -> tuple[PinSpec | None, float | None]:
    """Rule 7: the agent's pin after ``winner`` answered, and its TTL when this job set it."""
    if winner == case.chain[0]:
        # A primary success clears the pin its job started with; one set meanwhile stays.
        # A pin for another chain counts as one the job started with: the docs say such a
        # pin is ignored, and leave open whether clearing it is; the code clears it.
        return (None, None) if seen is not None else (case.pin, None)
    if primary_cause is not None:
        # The primary failed for good and a fallback rescued: max(cooldown, Retry-After),
        # Retry-After kept up to a day (only waits are capped).
        ttl = max(float(case.cooldown_s), primary_cause.retry_after_s or 0.0)
        return PinSpec(winner, case.chain, primary_cause.kind, primary_cause.status), ttl
    if pinned_cause is not None:
        # The pinned model failed and a later one rescued: the pin moves, for the cooldown
        # (a fallback's Retry-After says nothing of the primary the pin returns to).
        return PinSpec(winner, case.chain, pinned_cause.kind, pinned_cause.status), float(
            case.cooldown_s
        )
    return case.pin, None


# --- the executor on the same inputs -------------------------------------------------------


class ScriptedProvider:
    """Plays each model's script, one step per call; the last step repeats."""

    def __init__(self, scripts: Mapping[str, Sequence[Step]]) -> None:
        self.scripts = scripts
        self.calls = dict.fromkeys(scripts, 0)

    def stream(self, model: ModelRef, request: ProviderRequest) -> Iterator[Delta]:
        script = self.scripts[model.name]
        step = script[min(self.calls[model.name], len(script) - 1)]
        self.calls[model.name] += 1
        for text in step.deltas:
            yield Delta(text=text)
        if step.kind == "ok":
            yield Delta(finish_reason="stop", done=True)
            return
        raise ERRORS[step.kind](
            f"{step.kind} {step.status}", status=step.status, retry_after_s=step.retry_after_s
        )


def shape(event: Event) -> tuple[Any, ...]:
    kind = event["type"]
    if kind == "started":
        return (kind, event["chain"], event["start_model"], event["in_cooldown"])
    if kind == "attempt":
        fields = ("n", "model", "attempt", "max_attempts", "fallback")
        return (kind, *(event[f] for f in fields))
    if kind == "delta":
        return (kind, event["n"], event["text"])
    if kind == "retry":
        head = (kind, event["n"], event["model"], event["delay_s"])
        return (*head, event["error"]["kind"], event["discard"])
    if kind == "fallback":
        return (kind, event["from"], event["to"], event["reason"], event["discard"])
    if kind == "completed":
        return (kind, event["model"], event["text"], event["fallback_used"])
    if kind == "failed":
        return (kind, event["error"]["kind"], event["error"].get("status"))
    raise AssertionError(f"unexpected event {event!r}")


def as_spec(pin: Pin | None) -> PinSpec | None:
    return None if pin is None else PinSpec(pin.model, pin.chain, pin.reason, pin.status)


def run_executor(case: Case) -> tuple[list[Event], FakeClock, MemoryCooldownStore]:
    doc = {
        "models": {
            name: {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": name}
            for name in case.chain
        },
        "agents": {
            AGENT: {
                "model": case.chain[0],
                "fallbacks": list(case.chain[1:]),
                "retries": case.retries,
                "cooldown": case.cooldown_s,
                "cooldown_on_exhausted": case.cooldown_on_exhausted,
                "retry_on_rate_limit": case.retry_on_rate_limit,
                "backoff": {
                    "base": f"{case.base_ms}ms",
                    "factor": case.factor,
                    "max": f"{case.max_ms}ms",
                    "jitter": 0,
                },
            }
        },
    }
    agent = parse_agents(doc, source="model.yaml").agents[AGENT]
    clock = FakeClock()
    store = MemoryCooldownStore(clock)
    pin = None
    if case.pin is not None:
        p = case.pin
        pin = Pin(model=p.model, chain=p.chain, reason=p.reason, status=p.status)
        store.pin(AGENT, pin, OLD_PIN_TTL_S)
    at_start = {"store": None, "caller": PinAtStart(pin), "meanwhile": PinAtStart(None)}
    executor = ChainExecutor(
        providers={"openai": ScriptedProvider(case.scripts)},
        cooldowns=store,
        clock=clock,
        rng=random.Random(0),
    )
    job = parse_job(
        {"agent": AGENT, "messages": [{"role": "user", "content": "hi"}], "deadline_s": DAY_S},
        max_bytes=10_000,
    )
    sink = MemoryEventSink(job.job_id, clock)
    executor.run(job, agent, sink, pin_at_start=at_start[case.read])
    return sink.events, clock, store


# --- the property --------------------------------------------------------------------------


def check(case: Case) -> None:
    want = reference(case)

    events, clock, store = run_executor(case)

    assert [shape(e) for e in events] == want.events
    assert clock.sleeps == want.sleeps
    assert as_spec(store.get(AGENT)) == want.pin
    if want.pin_ttl_s is not None:
        end = clock.now
        clock.now = end + want.pin_ttl_s - 0.001
        assert store.get(AGENT) is not None
        clock.now = end + want.pin_ttl_s
        assert store.get(AGENT) is None


def case_of(
    chain: tuple[str, ...],
    scripts: Sequence[Sequence[Step]],
    *,
    pin: PinSpec | None = None,
    read: Literal["store", "caller", "meanwhile"] = "store",
    retries: int = 2,
    cooldown_on_exhausted: bool = True,
    retry_on_rate_limit: bool = False,
) -> Case:
    """A hand-written case with the defaults of the agents file (backoff 200 ms × 2 ≤ 2 s)."""
    return Case(
        chain=chain,
        retries=retries,
        cooldown_s=60,
        cooldown_on_exhausted=cooldown_on_exhausted,
        retry_on_rate_limit=retry_on_rate_limit,
        base_ms=200,
        factor=2.0,
        max_ms=2000,
        pin=pin,
        read=read,
        scripts={name: tuple(s) for name, s in zip(chain, scripts, strict=True)},
    )


OK = Step("ok", ("hi",))
E400 = Step("fatal", status=400)
E429_600 = Step("rate_limited", status=429, retry_after_s=600.0)
E503 = Step("retryable", status=503)
BROKEN = Step("retryable", ("x",))
OVERFLOW = Step("context_overflow", status=413)
M2 = NAMES[:2]


# The rule-7 corners, run on every profile whatever the generator draws.
@example(case_of(M2, [[E429_600], [OK]]))  # pinned for the 600 s Retry-After
@example(case_of(M2, [[E503], [OK]], cooldown_on_exhausted=False))  # exhausted: no pin
@example(case_of(M2, [[OVERFLOW], [OK]]))  # an overflow never arms
@example(case_of(M2, [[OK], [OK]], pin=PinSpec("m1", M2), read="meanwhile"))  # newer news
@example(case_of(M2, [[OK], [E400]], pin=PinSpec("m1", M2)))  # primary success clears
@example(case_of(NAMES, [[OK], [E400], [BROKEN, OK]], pin=PinSpec("m1", NAMES)))  # moves
@example(case_of(NAMES, [[OK], [OVERFLOW], [OK]], pin=PinSpec("m1", NAMES)))  # stays
@example(case_of(NAMES, [[E429_600], [OK], [E400]], pin=PinSpec("m2", NAMES)))  # skipped rescue
@example(case_of(M2, [[OK], [OK]], pin=PinSpec("m1", (*M2, RETIRED)), read="caller"))  # stale
@example(case_of(M2, [[E429_600]] * 2, pin=PinSpec("m1", M2), retry_on_rate_limit=True))  # waits
@given(cases())
def test_executor_agrees_with_the_reference_model(case: Case) -> None:
    """Events, waits and the pin afterwards are those the chain rules give."""
    check(case)


@given(cases("pinned"))
def test_executor_agrees_with_the_reference_model_inside_a_cooldown(case: Case) -> None:
    """The same for jobs starting at a pinned fallback: rule 7's moves and wrap-round."""
    check(case)


@given(cases("primary_down"))
def test_executor_agrees_with_the_reference_model_when_the_primary_is_down(case: Case) -> None:
    """The same for jobs whose primary never answers: rule 7's pins and their TTLs."""
    check(case)
