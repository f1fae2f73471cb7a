"""The deadlines of many dialogs in one heap, so the next timer is cheap to find (DESIGN 8)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["DeadlineHeap"]

K = TypeVar("K", bound=Hashable)


class DeadlineHeap(Generic[K]):
    """The deadlines of many machines, earliest first: O(log n) to set, O(1) amortised to read.

    Each machine's current deadline is kept in a dict; the heap may hold stale entries for it
    (lazy invalidation, as ``sipside.txlayer`` does), skipped when they reach the top.
    """

    def __init__(self) -> None:
        self._current: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()  # ties break by insertion, keys need not be ordered

    def __len__(self) -> int:
        return len(self._current)

    @property
    def entries(self) -> int:
        """Heap entries, stale ones included (for tests: the heap must not grow without end)."""
        return len(self._heap)

    def set(self, key: K, deadline: float | None) -> None:
        """``key``'s deadline is now ``deadline`` (None: it has none)."""
        if deadline is None:
            self._current.pop(key, None)
            return
        if self._current.get(key) == deadline:
            return
        self._current[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), key))
        if len(self._heap) > 2 * len(self._current) + 64:
            # Mostly stale entries: rebuild so memory follows the live machines, not the churn.
            self._heap = [(t, next(self._seq), k) for k, t in self._current.items()]
            heapq.heapify(self._heap)

    def earliest(self) -> float | None:
        """The earliest deadline of any key, or None."""
        heap = self._heap
        while heap:
            deadline, _, key = heap[0]
            if self._current.get(key) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float, limit: int | None = None) -> list[K]:
        """Remove and return the keys due at ``now``, earliest first (at most ``limit``).

        The caller runs each machine and ``set``s its new deadline.
        """
        due: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(due) < limit):
            deadline, _, key = heapq.heappop(heap)
            if self._current.get(key) == deadline:
                del self._current[key]
                due.append(key)
        return due
