"""The acknowledgement barrier of the component link (DESIGN 8, "Written is not delivered").

XEP-0114 has no acknowledgements: a stanza written to the socket may die in a kernel buffer or in
a server that is killed before it reads it. A server processes a component stream in order
(RFC 6120 10.1), so an answer to a XEP-0199 ping proves that every stanza written before the
ping was processed. The barrier keeps what is written and not yet proven, decides when a ping is
due, and gives the unproven stanzas back when the link is lost.

It is sans-IO: every call takes ``now``; :meth:`AckBarrier.next_deadline` says when
:meth:`AckBarrier.handle_timer` wants to run; the adapter writes the pings the effects ask for.
One ping covers a whole batch: it is due ``batch_delay`` seconds after the first unproven write,
or at once when ``batch_size`` stanzas wait for one, so the cost per message stays a fraction
of a ping. When the batch's deadline will pass before the next write is likely (writes come at
a steady rate, each ``gap`` apart on a moving average), the ping goes with the write now, in the
same stream write, rather than from a timer of its own: at an ordinary rate the process is then
not woken a second time for each batch. The timer stays as the safety net.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["AckBarrier", "Effect", "PingOverdue", "SendPing", "Unconfirmed"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SendPing:
    """Write a ping with this id now; its answer confirms everything written before it."""

    ping_id: str


@dataclass(frozen=True, slots=True)
class PingOverdue:
    """A ping went unanswered for ``ping_timeout``: the server is gone; treat the link as lost."""

    ping_id: str
    sent_at: float


Effect = SendPing | PingOverdue


class Unconfirmed(Generic[T]):
    """A stanza written to a link that was lost before the server proved it processed it."""

    # Written out, not a dataclass: compiled, a generic dataclass cannot be built.
    __slots__ = ("item", "written_at")

    def __init__(self, item: T, written_at: float) -> None:
        self.item = item
        self.written_at = written_at

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Unconfirmed):
            return NotImplemented
        return bool(self.item == other.item and self.written_at == other.written_at)

    def __hash__(self) -> int:
        return hash((self.item, self.written_at))

    def __repr__(self) -> str:
        return f"Unconfirmed(item={self.item!r}, written_at={self.written_at!r})"


@dataclass(frozen=True, slots=True)
class _Ping:
    ping_id: str
    covers: int  # the sequence number of the last stanza written before it
    sent_at: float


class AckBarrier(Generic[T]):
    """Stanzas written but not yet proven processed, and the pings that will prove them."""

    def __init__(
        self,
        *,
        id_prefix: str,
        batch_size: int = 256,
        batch_delay: float = 0.05,
        ping_timeout: float = 15.0,
    ) -> None:
        if batch_size < 1 or batch_delay < 0 or ping_timeout <= 0:
            raise ValueError("batch_size >= 1, batch_delay >= 0 and ping_timeout > 0")
        self.id_prefix = id_prefix
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self.ping_timeout = ping_timeout
        self._seq = 0  # sequence number of the last stanza written
        self._pinged = 0  # sequence number covered by the last ping sent
        self._first_unpinged_at: float | None = None
        self._written: deque[tuple[int, float, T]] = deque()
        self._pings: deque[_Ping] = deque()
        self._ping_ids = 0
        self._last_write: float | None = None
        self._gap = batch_delay  # moving average of the time between writes
        self._lead = batch_delay / 2  # a ping goes early with a write by at most this much
        self.confirmed = 0  # stanzas proven processed, over the barrier's life
        self.pings_sent = 0
        self.pings_answered = 0

    @property
    def unconfirmed(self) -> int:
        """How many stanzas are written and not yet proven processed."""
        return len(self._written)

    def is_ping(self, iq_id: str) -> bool:
        """True if ``iq_id`` is one of this barrier's pings (cheap: a prefix check)."""
        return iq_id.startswith(self.id_prefix)

    def written(self, item: T, now: float) -> list[Effect]:
        """``item`` was written to the stream; a ping is due with it if the batch is full, or if
        the batch's deadline is near and will likely pass before the next write.

        Near means less than one and a half times the expected gap to the next write away, and
        at most half the batch delay: at a low rate a batch still covers about two writes. A
        deadline already passed is left to the timer, which is due in this same loop pass."""
        last = self._last_write
        self._last_write = now
        if last is not None:
            self._gap += (now - last - self._gap) * 0.125
        self._seq += 1
        self._written.append((self._seq, now, item))
        first = self._first_unpinged_at
        if first is None:
            self._first_unpinged_at = first = now
        if self._seq - self._pinged >= self.batch_size:
            return [self._ping(now)]
        deadline = first + self.batch_delay
        # One and a half gaps: the next write may come a little late, or at the deadline itself.
        if now < deadline <= now + min(self._gap * 1.5, self._lead):
            return [self._ping(now)]
        return []

    def ping_now(self, now: float) -> list[Effect]:
        """A ping for whatever is unpinged, without waiting for the batch (a flush)."""
        return [self._ping(now)] if self._seq > self._pinged else []

    def answered(self, ping_id: str, now: float) -> int:
        """The server answered ``ping_id`` (a result or an error: either proves it processed
        the stream up to there). Returns how many stanzas that confirmed; 0 for an unknown id."""
        covers = None
        for ping in self._pings:
            if ping.ping_id == ping_id:
                covers = ping.covers
                break
        if covers is None:
            return 0
        # In order: an answer to this ping also stands for the earlier ones.
        while self._pings and self._pings[0].covers <= covers:
            self._pings.popleft()
        self.pings_answered += 1
        count = 0
        written = self._written
        while written and written[0][0] <= covers:
            written.popleft()
            count += 1
        self.confirmed += count
        return count

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` wants to run; None when nothing waits."""
        deadlines = []
        if self._first_unpinged_at is not None:
            deadlines.append(self._first_unpinged_at + self.batch_delay)
        if self._pings:
            deadlines.append(self._pings[0].sent_at + self.ping_timeout)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> list[Effect]:
        """The deadline passed: ping a waiting batch, or report the oldest ping overdue."""
        effects: list[Effect] = []
        if self._pings and now >= self._pings[0].sent_at + self.ping_timeout:
            oldest = self._pings[0]
            effects.append(PingOverdue(oldest.ping_id, oldest.sent_at))
        elif (
            self._first_unpinged_at is not None
            and now >= self._first_unpinged_at + self.batch_delay
        ):
            effects.append(self._ping(now))
        return effects

    def lost(self) -> list[Unconfirmed[T]]:
        """The link is gone: every unproven stanza, in write order; the barrier starts afresh."""
        items = [Unconfirmed(item, at) for _seq, at, item in self._written]
        self._written.clear()
        self._pings.clear()
        self._pinged = self._seq
        self._first_unpinged_at = None
        return items

    def _ping(self, now: float) -> SendPing:
        self._ping_ids += 1
        ping = _Ping(f"{self.id_prefix}{self._ping_ids}", self._seq, now)
        self._pings.append(ping)
        self._pinged = self._seq
        self._first_unpinged_at = None
        self.pings_sent += 1
        return SendPing(ping.ping_id)
