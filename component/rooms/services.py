"""Which domains are chat-room services (DESIGN 3.2): service discovery, cached for cache_time.

``room*conference.xmpp.test@jdomain`` and ``bob*xmpp.test@jdomain`` have the same shape; only
disco#info (XEP-0030) on the domain tells a room from a person. ``ServiceDirectory`` remembers
the answers for ``timers.cache_time``, asks each domain once at a time, and gives up on a query
after ``disco_timeout``. An unreachable domain is not cached: the next message asks again.
"""

from __future__ import annotations

from dataclasses import dataclass

from component.rooms.model import DiscoverService, ServiceInfo, ServiceKind


@dataclass(frozen=True, slots=True)
class _Known:
    kind: ServiceKind
    until: float


class ServiceDirectory:
    """A disco cache with the queries in flight; every call takes ``now``."""

    def __init__(self, *, cache_time: float, disco_timeout: float) -> None:
        self.cache_time = cache_time
        self.disco_timeout = disco_timeout
        self._known: dict[str, _Known] = {}
        self._asked: dict[str, float] = {}  # domain -> when we stop waiting

    def kind(self, domain: str, now: float) -> ServiceKind | None:
        """What ``domain`` is, if known and still fresh; None means ask."""
        known = self._known.get(domain)
        if known is None:
            return None
        if now >= known.until:
            del self._known[domain]
            return None
        return known.kind

    def ask(self, domain: str, now: float) -> list[DiscoverService]:
        """The disco query to send for ``domain``, unless one is already on its way."""
        deadline = self._asked.get(domain)
        if deadline is not None and now < deadline:
            return []
        self._asked[domain] = now + self.disco_timeout
        return [DiscoverService(domain)]

    def waiting(self, domain: str) -> bool:
        """True while a query for ``domain`` is on its way."""
        return domain in self._asked

    def answer(self, info: ServiceInfo, now: float) -> bool:
        """Take an answer; False when nobody asked (late, or unsolicited), which is still kept."""
        asked = self._asked.pop(info.domain, None) is not None
        if info.kind is not ServiceKind.UNREACHABLE:
            self._known[info.domain] = _Known(info.kind, now + self.cache_time)
        return asked

    def learn(self, domain: str, kind: ServiceKind, now: float) -> None:
        """Something else proved what ``domain`` is (a room spoke to us from it)."""
        self._known[domain] = _Known(kind, now + self.cache_time)

    def timed_out(self, now: float) -> list[str]:
        """Domains whose query got no answer in time; they are no longer waited for."""
        late = [domain for domain, deadline in self._asked.items() if now >= deadline]
        for domain in late:
            del self._asked[domain]
        return late

    @property
    def deadline(self) -> float | None:
        """When the next query times out."""
        return min(self._asked.values(), default=None)
