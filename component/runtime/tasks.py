"""Owned background tasks (STYLE 8): nothing is fire and forget, shutdown waits for the work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from component.logs import get_logger

log = get_logger("component.runtime.tasks")


class TaskOwner:
    """Keeps a reference to every task it starts, logs failures, and waits for them at the end."""

    def __init__(self, failure_event: str) -> None:
        self._failure_event = failure_event
        self._tasks: set[asyncio.Task[Any]] = set()

    def own(self, work: Awaitable[Any]) -> asyncio.Task[Any]:
        """Run ``work`` as a task owned here."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(self._failure_event, error=repr(task.exception()))

    def __len__(self) -> int:
        return len(self._tasks)

    def pending(self) -> set[asyncio.Task[Any]]:
        """The tasks still running."""
        return set(self._tasks)

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until no owned task is left, tasks started meanwhile included, or ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._tasks:
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return
            await asyncio.wait(set(self._tasks), timeout=left)
