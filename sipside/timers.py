"""RFC 3261 transaction timer values (section 17, table 4), derived once from T1, T2 and T4.

Only the non-INVITE timers are here (E, F, J, K): the gateway never sends or accepts INVITE
dialogs. The config is frozen and shared by every transaction, so each derived value is computed
once in ``__post_init__`` instead of on every timer tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sipside.errors import LocalError

# Every UDP server transaction lingers 64*T1 after its answer (Timer J) to absorb
# retransmissions, each with its own deadline: at a steady 200 requests a second, firing each
# on time wakes the process once more per request. Firing up to this late lets the deadlines of
# one such interval share a wake-up; retransmissions (T1 = 500 ms) are late by at most as much.
TIMER_SLACK_MAX = 0.05


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1 (RTT estimate), T2 (maximum retransmit interval) and T4 (maximum time a message stays
    in the network), in seconds, with the non-INVITE timers derived from them."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    # Derived values, filled in by __post_init__; not constructor arguments.
    timer_f: float = field(init=False, repr=False, compare=False)
    trying_delay: float = field(init=False, repr=False, compare=False)
    slack: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (self.t1 > 0 and self.t2 > 0 and self.t4 >= 0):
            raise LocalError(f"transaction timers must be positive: {self!r}")
        # RFC 3261 17.1.2.2: Timer F = 64*T1, the whole lifetime of a non-INVITE client
        # transaction; also Timer J's value over unreliable transports (17.2.2).
        object.__setattr__(self, "timer_f", 64 * self.t1)
        object.__setattr__(self, "trying_delay", _time_until_e_reaches_t2(self.t1, self.t2))
        # How late a timer may fire so that deadlines close together fire in one wake-up: a
        # tenth of T1 (50 ms by default), never more than TIMER_SLACK_MAX.
        object.__setattr__(self, "slack", min(self.t1 / 10, TIMER_SLACK_MAX))

    def timer_e(self, interval: float | None = None) -> float:
        """The next Timer E interval after ``interval`` (None: the first one, T1).

        RFC 3261 17.1.2.2: E starts at T1 and doubles on each firing, capped at T2.
        """
        if interval is None:
            return min(self.t1, self.t2)
        return min(2 * interval, self.t2)

    def timer_j(self, reliable: bool) -> float:
        """RFC 3261 17.2.2: Timer J is 64*T1 over unreliable transports, zero over reliable."""
        return 0.0 if reliable else self.timer_f

    def timer_k(self, reliable: bool) -> float:
        """RFC 3261 17.1.2.2: Timer K is T4 over unreliable transports, zero over reliable."""
        return 0.0 if reliable else self.t4


def _time_until_e_reaches_t2(t1: float, t2: float) -> float:
    """Seconds from the first send until a client's Timer E is reset to T2 (3.5 s by default).

    RFC 4320 4.1: a server must not send 100 Trying over an unreliable transport before this time.
    """
    elapsed, interval = 0.0, min(t1, t2)
    while True:
        elapsed += interval
        interval = min(2 * interval, t2)
        if interval >= t2:
            return elapsed
