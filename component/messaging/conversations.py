"""Per-conversation order and the bounded wait for a free transaction (DESIGN 4.2, 8).

A conversation is one sender talking to one recipient. :class:`Conversations` lets one message
per conversation be in flight, the next only once the previous one is done (a proxy's workers
reorder requests in flight at once), and at most ``max_inflight`` conversations at a time;
everything else waits in one bounded queue, of which one sender may fill at most
``per_sender`` places (so one busy sender cannot get every other one refused). It is a plain
data structure: the router runs what it hands back and reports each end with
:meth:`Conversations.done`.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Generic, TypeVar

T = TypeVar("T")

Pair = tuple[str, str]
"""A conversation: (sender, recipient), each as the router names them (bare JID, SIP AOR)."""


class QueueFull(Exception):
    """No room to wait: ``capacity`` messages already wait for their turn, or ``per_sender``
    of this sender's."""


class Conversations(Generic[T]):
    """One item in flight per pair, ``max_inflight`` pairs at once, ``capacity`` waiting.

    Pairs with waiting items take free slots in the order they became ready, so a long
    conversation does not starve the others: after each of its messages it goes to the back.
    """

    def __init__(self, *, max_inflight: int, capacity: int, per_sender: int | None = None) -> None:
        self.max_inflight = max_inflight
        self.capacity = capacity
        self.per_sender = capacity if per_sender is None else per_sender
        self.waiting = 0
        self._senders: Counter[str] = Counter()  # waiting items by sender
        self._queues: dict[Pair, deque[T]] = {}
        self._busy: set[Pair] = set()
        self._ready: deque[Pair] = deque()
        self._paused = False

    @property
    def inflight(self) -> int:
        """Pairs with an item in flight now."""
        return len(self._busy)

    def offer(self, pair: Pair, item: T) -> list[tuple[Pair, T]]:
        """Queue ``item`` behind its pair's earlier ones; what may start now (perhaps it).

        Raises :class:`QueueFull` when ``capacity`` items already wait.
        """
        if self.waiting >= self.capacity:
            raise QueueFull(f"{self.waiting} messages wait")
        if self._senders[pair[0]] >= self.per_sender:
            raise QueueFull(f"{self.per_sender} messages of this sender wait")
        queue = self._queues.get(pair)
        if queue is None:
            queue = self._queues[pair] = deque()
            if pair not in self._busy:
                self._ready.append(pair)
        queue.append(item)
        self.waiting += 1
        self._senders[pair[0]] += 1
        return self._fill()

    def done(self, pair: Pair) -> list[tuple[Pair, T]]:
        """``pair``'s item in flight has its final answer; what may start now."""
        self._busy.discard(pair)
        if pair in self._queues:
            self._ready.append(pair)
        return self._fill()

    def pause(self) -> None:
        """Start nothing more: what waits stays until :meth:`take_waiting` (stopping)."""
        self._paused = True

    def take_waiting(self) -> list[tuple[Pair, T]]:
        """Remove and return every waiting item, each pair's in order (to persist them)."""
        taken = [(pair, item) for pair, queue in self._queues.items() for item in queue]
        self._queues.clear()
        self._ready.clear()
        self.waiting = 0
        self._senders.clear()
        return taken

    def _fill(self) -> list[tuple[Pair, T]]:
        starts: list[tuple[Pair, T]] = []
        while self._ready and len(self._busy) < self.max_inflight and not self._paused:
            pair = self._ready.popleft()
            queue = self._queues[pair]
            item = queue.popleft()
            self.waiting -= 1
            sender = pair[0]
            if self._senders[sender] <= 1:
                del self._senders[sender]
            else:
                self._senders[sender] -= 1
            if not queue:
                del self._queues[pair]
            self._busy.add(pair)
            starts.append((pair, item))
        return starts
