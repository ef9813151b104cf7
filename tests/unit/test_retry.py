"""Retry-After parsing and the backoff schedule (design rules 2 and 3)."""

from __future__ import annotations

import email.utils
import math
import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.retry import RETRY_AFTER_KEEP_S, BackoffPolicy, parse_retry_after

NOW_S = 1_700_000_000.0


@given(st.integers(min_value=0, max_value=10**9))
def test_retry_after_delta_seconds_parsed_and_capped(seconds):
    """A delta-seconds Retry-After is that many seconds, capped at a day."""
    assert parse_retry_after(str(seconds), now_s=NOW_S) == min(float(seconds), RETRY_AFTER_KEEP_S)


@given(
    st.datetimes(
        min_value=datetime(1990, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.just(UTC),
    ).map(lambda d: d.replace(microsecond=0)),
    st.floats(min_value=1_000_000_000, max_value=2_000_000_000),
)
def test_retry_after_http_date_is_seconds_from_now_capped(when, now_s):
    """An HTTP-date Retry-After is the seconds until that date, clamped to [0, a day]."""
    header = email.utils.format_datetime(when, usegmt=True)

    parsed = parse_retry_after(header, now_s=now_s)

    expected = min(max(when.timestamp() - now_s, 0.0), RETRY_AFTER_KEEP_S)
    assert parsed == pytest.approx(expected, abs=1e-6)


@given(st.one_of(st.none(), st.text(), st.from_regex(r"\s*-?[0-9.eE+]{1,12}\s*")), st.floats())
def test_retry_after_any_header_never_raises_and_stays_in_range(value, now_s):
    """Any header value, against any clock, parses to None or seconds within [0, a day]."""
    parsed = parse_retry_after(value, now_s=now_s)

    assert parsed is None or 0.0 <= parsed <= RETRY_AFTER_KEEP_S


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("-5", 0.0),
        ("2.5", 2.5),
        ("120", 120.0),
        ("9999999", 86_400.0),
        ("inf", 86_400.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_examples_parse_as_documented(value, expected):
    """Absent or unusable headers give None; past dates give 0; over a day is capped."""
    assert parse_retry_after(value, now_s=NOW_S) == expected


@given(
    base_s=st.floats(min_value=0.001, max_value=10.0),
    factor=st.floats(min_value=1.0, max_value=4.0),
    max_s=st.floats(min_value=0.001, max_value=60.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**32),
    count=st.integers(min_value=1, max_value=30),
)
def test_backoff_delays_within_jitter_band_of_capped_exponential(
    base_s, factor, max_s, jitter, seed, count
):
    """Delay k lies in [d(1-j), d(1+j)] with d = min(max, base·factor^k)."""
    policy = BackoffPolicy(base_s=base_s, factor=factor, max_s=max_s, jitter=jitter)
    gen = policy.delays(random.Random(seed))

    delays = [next(gen) for _ in range(count)]

    for k, delay in enumerate(delays):
        d = min(max_s, base_s * factor**k)
        assert d * (1 - jitter) - 1e-9 <= delay <= d * (1 + jitter) + 1e-9


@given(
    base_s=st.floats(min_value=0.001, max_value=10.0),
    factor=st.floats(min_value=1.0, max_value=4.0),
)
def test_backoff_first_delay_is_base_without_jitter(base_s, factor):
    """Without jitter the first wait is exactly ``base`` and the second ``base·factor``."""
    policy = BackoffPolicy(base_s=base_s, factor=factor, max_s=math.inf, jitter=0.0)
    gen = policy.delays(random.Random(0))

    assert next(gen) == base_s
    assert next(gen) == pytest.approx(base_s * factor)


def test_backoff_documented_defaults_double_up_to_max():
    """The design's example policy (200ms, ×2, max 2s, no jitter) waits 0.2, 0.4, 0.8, 1.6, 2, 2."""
    gen = BackoffPolicy(base_s=0.2, factor=2, max_s=2.0, jitter=0).delays(random.Random(0))

    assert [round(next(gen), 9) for _ in range(6)] == [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
