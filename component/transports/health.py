"""The gateway domain's own presence (DESIGN 9): the SIP side's health, sans-IO.

Every ``timers.check_time`` seconds the gateway sends OPTIONS to ``sip.proxy``. While the proxy
answers (any final response of its own: 2xx-6xx other than our 408/503 for silence or a broken
transport) the gateway's domain is available to its XMPP subscribers; when it does not, it is
``xa`` with a status text saying so. :class:`SipHealth` turns each OPTIONS outcome into the
presence to show, only when that changes.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Our own SIP client's statuses for "no answer" and "could not send" (component.sip.sender).
NO_ANSWER = frozenset({408, 503})


@dataclass(frozen=True, slots=True)
class Shown:
    """What the gateway's domain shows: ``show`` None is plainly available."""

    show: str | None
    status: str


class SipHealth:
    """The SIP proxy's last OPTIONS outcome and the presence it gives the gateway's domain."""

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.healthy: bool | None = None
        self.since: float | None = None
        self.last_status: int | None = None

    @property
    def shown(self) -> Shown:
        """The presence to show now (available before the first check)."""
        if self.healthy is False:
            return Shown("xa", f"SIP side unreachable: {self.proxy} does not answer OPTIONS")
        if not self.proxy:
            return Shown(None, "SIP gateway (no proxy to check)")
        return Shown(None, f"SIP gateway: {self.proxy} answers")

    def answered(self, status: int, now: float) -> Shown | None:
        """One OPTIONS final status; the new presence when the health changed, else None."""
        self.last_status = status
        healthy = status not in NO_ANSWER
        if healthy is self.healthy:
            return None
        self.healthy, self.since = healthy, now
        return self.shown
