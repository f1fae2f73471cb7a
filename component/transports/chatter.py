"""A transport's own status messages folded into one notice per burst (DESIGN 3.3), sans-IO.

biboumi reports every step of an IRC connection (each port tried, "Connected to IRC server.",
the server's MOTD) as chat messages from ``server@<transport>``: a dozen MESSAGEs per join if
relayed. Messages from a transport JID whose localpart has no alias delimiter (the transport or
one of its servers, not a person or a channel) are held here instead. A burst lasts at least
``window`` seconds from its first message (a connection's steps and the MOTD come seconds
apart) and ends once ``quiet`` seconds pass without another from the same sender to the same
user; then one notice sums it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SHOWN = 300  # characters of a status line quoted in the notice


@dataclass(slots=True)
class _Burst:
    first: str
    last: str
    count: int
    began: float
    until: float


@dataclass(frozen=True, slots=True)
class ChatterNotice:
    """One notice for ``aor`` summing up a burst of status messages from ``sender``."""

    aor: str
    sender: str
    text: str


@dataclass(slots=True)
class ChatterBuffer:
    """Bursts of status messages per (SIP user, transport sender), until they go quiet."""

    quiet: float = 3.0
    window: float = 10.0
    _bursts: dict[tuple[str, str], _Burst] = field(default_factory=dict)

    def add(self, aor: str, sender: str, body: str, now: float) -> None:
        """One status message from ``sender`` for the SIP user ``aor``."""
        line = " ".join(body.split())[:MAX_SHOWN]
        burst = self._bursts.get((aor, sender))
        if burst is None:
            until = now + max(self.quiet, self.window)
            self._bursts[(aor, sender)] = _Burst(line, line, 1, now, until)
            return
        burst.last, burst.count = line, burst.count + 1
        burst.until = max(burst.began + self.window, now + self.quiet)

    @property
    def deadline(self) -> float | None:
        """When the next burst goes quiet."""
        return min((b.until for b in self._bursts.values()), default=None)

    def due(self, now: float) -> list[ChatterNotice]:
        """The notices of every burst that went quiet by ``now``."""
        done = [key for key, burst in self._bursts.items() if burst.until <= now]
        return [_notice(key, self._bursts.pop(key)) for key in done]

    def flush(self) -> list[ChatterNotice]:
        """Every burst at once (stopping)."""
        bursts, self._bursts = self._bursts, {}
        return [_notice(key, burst) for key, burst in bursts.items()]


def _notice(key: tuple[str, str], burst: _Burst) -> ChatterNotice:
    aor, sender = key
    if burst.count == 1:
        text = f"{sender} says: {burst.first}"
    else:
        more = burst.count - 2
        middle = f" ... ({more} more status messages) ... " if more else " ... "
        text = f"{sender} says: {burst.first}{middle}{burst.last}"
    return ChatterNotice(aor, sender, text)
