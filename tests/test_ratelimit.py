"""The per-source token buckets (component.ratelimit), driven by a hand-held clock."""

from __future__ import annotations

import pytest

from component.ratelimit import SourceBuckets
from component.settings import LimitSettings

# (rate, burst, [(source, now), ...], expected admitted flags)
CASES = {
    "burst then refused": (1.0, 3, [("a", 0.0)] * 4, [True, True, True, False]),
    "refill at the rate": (
        2.0,
        1,
        [("a", 0.0), ("a", 0.1), ("a", 0.5), ("a", 0.6), ("a", 1.0)],
        [True, False, True, False, True],
    ),
    "sources apart": (
        1.0,
        1,
        [("a", 0.0), ("b", 0.0), ("a", 0.0), ("b", 0.0)],
        [True, True, False, False],
    ),
    "refill capped at burst": (
        10.0,
        2,
        [("a", 0.0), ("a", 100.0), ("a", 100.0), ("a", 100.0)],
        [True, True, True, False],
    ),
    "clock going back takes nothing": (
        1.0,
        1,
        [("a", 5.0), ("a", 4.0), ("a", 6.0)],
        [True, False, True],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_table(name: str) -> None:
    rate, burst, calls, expected = CASES[name]
    buckets = SourceBuckets(rate, burst)
    assert [buckets.take(source, now).admitted for source, now in calls] == expected


def test_retry_after_is_the_wait_for_a_token_in_whole_seconds() -> None:
    slow = SourceBuckets(0.1, 1)
    slow.take("a", 0.0)
    assert slow.take("a", 0.0).retry_after == 10
    assert slow.take("a", 5.0).retry_after == 5
    fast = SourceBuckets(1000.0, 1)
    fast.take("a", 0.0)
    assert fast.take("a", 0.0).retry_after == 1  # never 0: Retry-After 0 invites a storm


def test_one_log_line_per_run_and_then_one_in_n() -> None:
    buckets = SourceBuckets(1.0, 1, log_every=10)
    buckets.take("a", 0.0)
    verdicts = [buckets.take("a", 0.0) for _ in range(25)]
    assert [v.refused for v in verdicts] == list(range(1, 26))
    assert [v.refused for v in verdicts if v.log] == [1, 11, 21]
    assert buckets.take("a", 1.0).admitted
    again = buckets.take("a", 1.0)
    assert (again.refused, again.log) == (1, True)  # a new run starts with a line


def test_table_stays_bounded() -> None:
    buckets = SourceBuckets(1.0, 2, max_sources=3)
    for i in range(3):
        buckets.take(f"s{i}", 0.0)
    # all three still refilling: the oldest goes
    buckets.take("s3", 0.5)
    assert len(buckets) == 3
    # at 10 s every bucket is full again: all are dropped to make room
    buckets.take("s4", 10.0)
    assert len(buckets) == 1
    for i in range(1000):
        buckets.take(f"x{i}", 20.0)
    assert len(buckets) <= 3


def test_forgotten_bucket_starts_full() -> None:
    buckets = SourceBuckets(1.0, 1, max_sources=1)
    assert buckets.take("a", 0.0).admitted
    assert buckets.take("b", 0.0).admitted  # evicts a, whose bucket was empty
    assert buckets.take("a", 0.0).admitted  # a forgets its debt: bounded memory wins


@pytest.mark.parametrize(
    ("rate", "burst", "max_sources", "log_every"),
    [(0.0, 1, 1, 1), (1.0, 0, 1, 1), (1.0, 1, 0, 1), (1.0, 1, 1, 0)],
)
def test_bad_parameters(rate: float, burst: int, max_sources: int, log_every: int) -> None:
    with pytest.raises(ValueError):
        SourceBuckets(rate, burst, max_sources=max_sources, log_every=log_every)


def test_default_xmpp_limit_takes_a_burst_of_200_and_refuses_a_flood() -> None:
    # The bar: a burst of 200 from one XMPP user is queued, never refused; a flood of
    # 2,000 at 20,000/s from one sender gets the burst and what refills in its 0.1 s.
    limits = LimitSettings()
    burst = SourceBuckets(limits.xmpp_rate, limits.xmpp_burst)
    assert all(burst.take("bob@xmpp.test", 0.0).admitted for _ in range(200))
    flood = SourceBuckets(limits.xmpp_rate, limits.xmpp_burst)
    admitted = sum(flood.take("mal@xmpp.test", n / 20000).admitted for n in range(2000))
    assert limits.xmpp_burst <= admitted <= limits.xmpp_burst + limits.xmpp_rate * 0.1 + 1
