"""The state of each alias transport (DESIGN 9, seed: check_time), sans-IO.

Every ``timers.check_time`` seconds each transport domain of ``sip.aliases`` is probed
(disco#info on the domain); :meth:`TransportBoard.probed` takes the outcome with ``now`` and
returns what follows from it: the status to store, and a transition (down, back up) for the
chat rooms and the users to hear of. A transport known down refuses SIP MESSAGEs at once
(:meth:`TransportBoard.refusal_for`) instead of accepting them for a late bounce.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

from component.errors import Refusal
from component.store import TransportStatus


class TransportState(enum.Enum):
    """What the probes said last."""

    UNKNOWN = "unknown"  # not probed yet: traffic goes through, the XMPP server decides
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class TransportView:
    """One transport as the operator sees it: state, since when, the last probe error."""

    domain: str
    state: TransportState
    since: float | None
    last_error: str | None
    checked_at: float | None


@dataclass(frozen=True, slots=True)
class SaveStatus:
    """Store the transport's state (``checked_at`` is when the current state began)."""

    status: TransportStatus


@dataclass(frozen=True, slots=True)
class WentDown:
    """The transport stopped answering: its rooms' members hear of it once."""

    domain: str
    error: str


@dataclass(frozen=True, slots=True)
class CameUp:
    """The transport answers again (after being down): rejoin its rooms, say so."""

    domain: str


Effect = SaveStatus | WentDown | CameUp


@dataclass(slots=True)
class _Entry:
    state: TransportState = TransportState.UNKNOWN
    since: float | None = None
    last_error: str | None = None
    checked_at: float | None = None


class TransportBoard:
    """The alias transports' states; every call takes ``now`` or needs none."""

    def __init__(self, domains: Iterable[str], *, check_time: float) -> None:
        self.check_time = check_time
        self._entries = {domain: _Entry() for domain in sorted(domains)}

    @property
    def domains(self) -> list[str]:
        """The transport domains, sorted."""
        return list(self._entries)

    def restore(self, status: TransportStatus) -> None:
        """A state stored by an earlier run: shown until the first probe, never acted on."""
        entry = self._entries.get(status.domain)
        if entry is not None and entry.state is TransportState.UNKNOWN:
            entry.since = status.checked_at
            entry.last_error = status.detail

    def probed(self, domain: str, error: str | None, now: float) -> list[Effect]:
        """One probe's outcome: ``error`` None means the transport answered."""
        entry = self._entries.get(domain)
        if entry is None:
            return []
        entry.checked_at = now
        was = entry.state
        new = TransportState.UP if error is None else TransportState.DOWN
        if error is not None:
            entry.last_error = error
        if new is was:
            return []
        entry.state, entry.since = new, now
        effects: list[Effect] = [
            SaveStatus(TransportStatus(domain, new is TransportState.UP, now, entry.last_error))
        ]
        if new is TransportState.DOWN:
            effects.append(WentDown(domain, error or ""))
        elif was is TransportState.DOWN:
            effects.append(CameUp(domain))
        return effects

    def is_down(self, domain: str) -> bool:
        """True when the last probe of ``domain`` failed."""
        entry = self._entries.get(domain)
        return entry is not None and entry.state is TransportState.DOWN

    def refusal_for(self, domain: str) -> Refusal | None:
        """480 + Retry-After (the next probe) for a transport known down; None otherwise."""
        entry = self._entries.get(domain)
        if entry is None or entry.state is not TransportState.DOWN:
            return None
        return Refusal(
            480,
            "Temporarily Unavailable",
            "recipient-unavailable",
            down_text(domain, entry.last_error),
            xmpp_type="wait",
            retry_after=max(1, math.ceil(self.check_time)),
        )

    def views(self) -> list[TransportView]:
        """Every transport's state, by domain."""
        return [
            TransportView(domain, e.state, e.since, e.last_error, e.checked_at)
            for domain, e in self._entries.items()
        ]

    def disco_items(self) -> list[tuple[str, str]]:
        """XEP-0030 items for the component domain: (JID, name with the state)."""
        return [(v.domain, f"Transport {v.domain} ({v.state.value})") for v in self.views()]


def down_text(domain: str, error: str | None) -> str:
    """The words for a transport that does not answer."""
    why = f" ({error.replace('-', ' ')})" if error else ""
    return f"The transport {domain} is down{why}; try again later."
