"""The gateway's health (DESIGN 9): which parts are up, and the database watch.

Adapters report into :class:`Health` through the ``HealthReport`` port: the store when a call
fails for want of a database and when its probe answers again, the XMPP link on each state
change, the SIP endpoint when its listeners open and close. Each change is logged once, never
per request. :func:`watch_database` probes a database marked down until it answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from component.logs import get_logger
from component.ports import Part

log = get_logger("component.runtime.health")

PROBE_INTERVAL = 2.0  # seconds between probes of a database marked down


class Health:
    """The state of each part (implements ``HealthReport``); every part starts down."""

    def __init__(self, parts: tuple[Part, ...] = tuple(Part)) -> None:
        self._up: dict[Part, bool] = dict.fromkeys(parts, False)
        self._since: dict[Part, str] = dict.fromkeys(parts, "not started")
        self.changes = 0

    def report(self, part: Part, up: bool, detail: str = "") -> None:
        """``HealthReport``: record ``part``'s state; log and count only a change."""
        if self._up.get(part) is up:
            return
        self._up[part] = up
        self._since[part] = detail
        self.changes += 1
        if up:
            log.info("health_part_up", part=str(part), detail=detail)
        else:
            log.warning("health_part_down", part=str(part), detail=detail)

    def is_up(self, part: Part) -> bool:
        """Whether ``part`` was last reported up."""
        return self._up.get(part, False)

    @property
    def all_up(self) -> bool:
        """True when every part is up."""
        return all(self._up.values())

    def states(self) -> Mapping[Part, bool]:
        """Each part and whether it is up, in the order the parts were given."""
        return dict(self._up)

    def detail(self, part: Part) -> str:
        """What was said when ``part`` last changed state."""
        return self._since.get(part, "")


class Probed(Protocol):
    """A store whose availability can be probed (``Store``)."""

    @property
    def down(self) -> bool:
        """True while the store refuses calls because its database did not answer."""
        ...

    async def probe(self) -> bool:
        """One trivial query; True (and up again) when the database answered."""
        ...


async def watch_database(store: Probed, *, interval: float = PROBE_INTERVAL) -> None:
    """Until cancelled: while the store is down, probe it every ``interval`` seconds."""
    while True:
        await asyncio.sleep(interval)
        if store.down:
            await store.probe()


__all__ = ["PROBE_INTERVAL", "Health", "Probed", "watch_database"]
