"""Several gateway instances on one database (DESIGN 9): heartbeats, and the takeover of a dead
instance's state by a survivor.

Each instance beats every half ``check_time``. One whose heartbeat is older than two
``check_time`` intervals, or that marked itself gone on SIGTERM, is dead: the first survivor to
notice moves its subscriptions, publications, seats and claimed messages to itself (one
transaction, so two survivors never both take the same rows) and resumes them. An instance that
finds itself taken over (it stalled past the limit) stops, rather than serve state another
instance now holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from component.logs import get_logger
from component.ports import Clock
from component.store import GatewayInstance, StorePort, StoreUnavailable, Takeover

log = get_logger("component.runtime.instances")

DEAD_AFTER = 2.0
"""``check_time`` intervals without a heartbeat after which an instance is dead."""


class SharedSqlite(Exception):
    """A second live instance on one SQLite database: several instances need PostgreSQL."""


def dead_instances(
    rows: Iterable[GatewayInstance], me: str, now: float, check_time: float
) -> list[str]:
    """Instances other than ``me`` that left, or whose heartbeat is past the limit."""
    limit = now - DEAD_AFTER * check_time
    return [row.name for row in rows if row.name != me and (row.gone or row.heartbeat_at < limit)]


def live_instances(
    rows: Iterable[GatewayInstance], me: str, now: float, check_time: float
) -> list[str]:
    """Instances other than ``me`` still beating."""
    dead = set(dead_instances(rows, me, now, check_time))
    return [row.name for row in rows if row.name != me and row.name not in dead]


class Instances:
    """This instance among the others: joins, beats, takes over the dead, leaves.

    ``resume`` is called after rows were moved to this instance, with what was moved and the
    names of the dead instances: it resumes them (re-SUBSCRIBEs, rejoins, retries the queue,
    hands on what was forwarded to the dead ones and not acknowledged). ``lost`` is
    called once if this instance finds itself taken over.
    """

    def __init__(
        self,
        store: StorePort,
        instance: str,
        *,
        check_time: float,
        clock: Clock,
        resume: Callable[[Takeover, list[str]], Awaitable[None]],
        lost: Callable[[], None],
    ) -> None:
        self.store = store
        self.instance = instance
        self.check_time = check_time
        self.clock = clock
        self._resume = resume
        self._lost = lost
        self.taken: list[str] = []
        """Instances this one took over, oldest first (for logs and tests)."""

    async def join(self, *, sqlite: bool = False) -> Takeover:
        """Register this instance; adopt rows without owner and the state of instances already
        dead. On SQLite, refuse (``SharedSqlite``) while another instance is beating."""
        now = self.clock()
        rows = await self.store.instances()
        if sqlite and (others := live_instances(rows, self.instance, now, self.check_time)):
            raise SharedSqlite(
                f"gateway instance {others[0]!r} is running on this SQLite database; several "
                "instances need PostgreSQL (database.url = postgresql://...). After a crash, "
                f"start again {DEAD_AFTER * self.check_time:g} s after its last heartbeat, or "
                "give gateway.instance the crashed instance's name."
            )
        await self.store.join_instances(self.instance, now)
        moved = await self.store.take_over(None, self.instance, now)
        for dead in dead_instances(rows, self.instance, now, self.check_time):
            moved = _sum(moved, await self._take(dead, now))
        return moved

    async def check(self) -> Takeover:
        """One round: beat, then take over every dead instance and resume what was moved."""
        now = self.clock()
        if not await self.store.beat(self.instance, now):
            log.error("instance_taken_over", instance=self.instance)
            self._lost()
            return Takeover()
        moved = Takeover()
        rows = await self.store.instances()
        lost = dead_instances(rows, self.instance, now, self.check_time)
        for dead in lost:
            moved = _sum(moved, await self._take(dead, now))
        if moved.total:
            await self._resume(moved, lost)
        return moved

    async def _take(self, dead: str, now: float) -> Takeover:
        moved = await self.store.take_over(dead, self.instance, now)
        self.taken.append(dead)
        log.warning(
            "instance_state_taken_over",
            dead=dead,
            instance=self.instance,
            sip_watchers=moved.sip_watchers,
            xmpp_watchers=moved.xmpp_watchers,
            publications=moved.publications,
            memberships=moved.memberships,
            messages=moved.messages,
        )
        return moved

    async def run(self) -> None:
        """Until cancelled: a ``check`` every half ``check_time``."""
        while True:
            await asyncio.sleep(self.check_time / 2)
            try:
                await self.check()
            except StoreUnavailable as exc:
                log.debug("instance_check_skipped", reason=str(exc))
            except Exception:
                log.exception("instance_check_failed")

    async def leave(self) -> None:
        """Mark this instance gone, so a survivor takes over at its next check (SIGTERM)."""
        try:
            await self.store.leave_instances(self.instance, self.clock())
        except StoreUnavailable as exc:
            log.warning("instance_leave_failed", reason=str(exc))


def _sum(a: Takeover, b: Takeover) -> Takeover:
    return Takeover(
        sip_watchers=a.sip_watchers + b.sip_watchers,
        xmpp_watchers=a.xmpp_watchers + b.xmpp_watchers,
        publications=a.publications + b.publications,
        memberships=a.memberships + b.memberships,
        messages=a.messages + b.messages,
    )
