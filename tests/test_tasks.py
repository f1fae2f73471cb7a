"""The task owner: references kept, failures logged, waits cover work started meanwhile."""

from __future__ import annotations

import asyncio

from component.runtime.tasks import TaskOwner


async def test_wait_covers_tasks_started_while_waiting() -> None:
    owner = TaskOwner("test_task_failed")
    done: list[str] = []

    async def second() -> None:
        await asyncio.sleep(0.01)
        done.append("second")

    async def first() -> None:
        await asyncio.sleep(0.01)
        owner.own(second())
        done.append("first")

    owner.own(first())
    assert len(owner) == 1
    await owner.wait()
    assert done == ["first", "second"] and len(owner) == 0


async def test_wait_returns_at_timeout_and_failures_do_not_escape() -> None:
    owner = TaskOwner("test_task_failed")

    async def fails() -> None:
        raise RuntimeError("boom")

    never = asyncio.Event()
    owner.own(fails())
    stuck = owner.own(never.wait())
    await owner.wait(timeout=0.05)
    assert owner.pending() == {stuck}
    stuck.cancel()
    await owner.wait()
    assert len(owner) == 0
