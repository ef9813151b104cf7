"""The retry schedule: exponential delays from `backoff`, our jitter, and Retry-After.

All durations are seconds. The chain executor owns its retry loop (its waits must wake on
cancellation and on the deadline, which `backoff`'s decorator cannot do); this module only
says how long each wait is. ``backoff.expo`` computes the exponential part.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import backoff
import redis

RETRY_AFTER_CAP_S = 60.0
"""The longest server-requested wait we honour (design rules 2 and 3).

The chain applies it when it waits; errors keep the server's value (up to
:data:`RETRY_AFTER_KEEP_S`), because a pin lasts for the whole of it.
"""

RETRY_AFTER_KEEP_S = 86_400.0
"""The longest Retry-After an error keeps: a pin lasts that long at most (rule 7)."""

Jitter = Callable[[float], float]
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

OUTAGE_PAUSE_S = (0.05, 1.0)
"""The first and the longest pause between two tries while Redis does not answer."""
OUTAGE_WARN_S = 30.0
"""How often a call waiting out an outage says so."""


def retry_redis_blips(fn: F) -> F:
    """Retry ``fn`` through a Redis connection blip: 3 tries within 2 s, then raise.

    For short infrastructure calls only (writing events), never for model attempts, whose
    waits must wake on cancellation: the chain owns that loop.
    """
    retried: F = backoff.on_exception(
        backoff.expo,
        (redis.ConnectionError, redis.TimeoutError),
        max_tries=3,
        max_time=2.0,
        factor=0.05,
        jitter=backoff.full_jitter,
        logger=None,
    )(fn)
    return retried


def through_outage(call: Callable[[], T], warn: Callable[[BaseException], None]) -> T:
    """``call()`` until Redis answers it: an outage is waited out, never turned into loss.

    Connection errors and timeouts are retried with pauses doubling from 50 ms to 1 s;
    ``warn`` hears of the first and then of one every :data:`OUTAGE_WARN_S`. Any other
    error (a refusal by a Redis that answers) is raised.
    """
    pause, longest = OUTAGE_PAUSE_S
    next_warning = 0.0
    while True:
        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() >= next_warning:
                warn(exc)
                next_warning = time.monotonic() + OUTAGE_WARN_S
            time.sleep(pause)
            pause = min(pause * 2, longest)


def proportional_jitter(fraction: float, rng: random.Random) -> Jitter:
    """Jitter of ±``fraction`` of the delay, uniform: ``0.1`` gives ``d·[0.9, 1.1]``.

    This is the design's ``jitter: 0.1``; it is not ``backoff.full_jitter`` (uniform in ``[0, d]``).
    """

    def jitter(delay_s: float) -> float:
        if fraction <= 0:
            return delay_s
        return delay_s * (1.0 + fraction * (2.0 * rng.random() - 1.0))

    return jitter


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """``delay(k) = min(max_s, base_s · factor^k)`` with ±``jitter`` (a fraction)."""

    base_s: float = 0.2
    factor: float = 2.0
    max_s: float = 2.0
    jitter: float = 0.1

    def delays(self, rng: random.Random) -> Iterator[float]:
        """The jittered waits before retry 1, 2, 3 … of one model."""
        # backoff.expo(base, factor) yields factor * base**n: its `base` is our growth factor
        # and its `factor` our first delay, so the names look swapped on purpose.
        gen = backoff.expo(base=self.factor, factor=self.base_s, max_value=self.max_s)
        # Like the library's own retry loop, prime the generator once: its first next()
        # yields nothing useful (it runs the code up to the first yield).
        next(gen)
        jitter = proportional_jitter(self.jitter, rng)
        for delay_s in gen:
            yield jitter(float(delay_s))


def parse_retry_after(value: str | None, *, now_s: float) -> float | None:
    """Seconds the server asks us to wait, from a ``Retry-After`` (delta-seconds or an HTTP-date).

    This is what an error keeps, not how long the chain waits: the chain caps its wait at
    :data:`RETRY_AFTER_CAP_S`.

    Args:
        value: the raw header, or None when absent.
        now_s: the current epoch time, for HTTP-dates.

    Returns:
        The seconds in ``[0, RETRY_AFTER_KEEP_S]``, or None when the header is absent or
        unusable.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    seconds: float | None
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            parsed = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if parsed is None or parsed.tzinfo is None:
            return None
        try:
            seconds = parsed.timestamp() - now_s
        except (OverflowError, OSError, ValueError):
            return None
    if math.isnan(seconds) or seconds < 0:
        return None if math.isnan(seconds) else 0.0
    return min(seconds, RETRY_AFTER_KEEP_S)
