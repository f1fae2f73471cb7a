"""Per-source rate limits (DESIGN 8, overload): token buckets, sans-IO, for both edges.

Each source (a SIP address or sender, an XMPP sender's bare JID) gets a bucket of ``burst``
tokens that refills at ``rate`` tokens a second; a request or stanza takes one token, and one
that finds the bucket empty is refused (SIP 503 with Retry-After, XMPP ``resource-constraint``)
before any work is done for it, so one flooding source cannot take the time the others' need.
The clock is passed in (``now``, seconds); nothing here reads it.

The table is bounded: a bucket that has refilled to ``burst`` is the same as no bucket, so
those are dropped when the table is full; if every bucket is still in use the oldest goes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float  # when ``tokens`` was last brought up to date


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :meth:`SourceBuckets.take`.

    ``admitted``: the request may proceed. For a refused one, ``retry_after`` is the whole
    seconds until the source has a token again (at least 1), ``refused`` how many requests of
    this source were refused since it was last admitted, and ``log`` whether this refusal is
    one to log (the first of a run, then one in ``log_every``), so a flood writes few lines.
    """

    admitted: bool
    retry_after: int = 0
    refused: int = 0
    log: bool = False


ADMITTED = Verdict(True)


class SourceBuckets:
    """Token buckets keyed by source (an address, or a sender behind a proxy)."""

    def __init__(
        self, rate: float, burst: int, *, max_sources: int = 10000, log_every: int = 100
    ) -> None:
        if rate <= 0 or burst < 1 or max_sources < 1 or log_every < 1:
            raise ValueError("rate > 0, burst >= 1, max_sources >= 1 and log_every >= 1")
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self.log_every = log_every
        self._buckets: dict[str, _Bucket] = {}
        self._refused: dict[str, int] = {}  # refusals since the source was last admitted

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str, now: float) -> Verdict:
        """Take a token for one request from ``source`` at ``now``."""
        bucket = self._buckets.get(source)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[source] = _Bucket(float(self.burst), now)
        elif now > bucket.stamp:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            if self._refused:
                self._refused.pop(source, None)
            return ADMITTED
        refused = self._refused.get(source, 0) + 1
        self._refused[source] = refused
        wait = math.ceil((1.0 - bucket.tokens) / self.rate)
        return Verdict(False, max(1, wait), refused, (refused - 1) % self.log_every == 0)

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_sources:
            return
        burst, rate = self.burst, self.rate
        idle = [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * rate >= burst]
        for key in idle:
            del self._buckets[key]
            self._refused.pop(key, None)
        if len(self._buckets) >= self.max_sources:
            oldest = next(iter(self._buckets))
            del self._buckets[oldest]
            self._refused.pop(oldest, None)


__all__ = ["ADMITTED", "SourceBuckets", "Verdict"]
