"""The tables ``bench.messages`` prints: one row per path and mode, the gateway beside Kamailio's
``xmpp`` module with their ratio, and the SIPp runs against each."""

from __future__ import annotations

from dataclasses import dataclass

from bench.load import CpuSnapshot
from bench.presence_load import format_table as aligned
from bench.sipp import SippStats

GATEWAY = "gateway"
MODULE = "module"  # Kamailio's xmpp module (bench.anchor)


@dataclass(frozen=True, slots=True)
class MessagePath:
    """One way a message can travel.

    ``element`` is the gateway or the module when the path goes through one (its CPU is the
    element's column); paths with the same ``case`` are the same load on either element.
    """

    name: str
    element: str = ""
    case: str = ""


@dataclass(frozen=True, slots=True)
class RowResult:
    """One line of the table."""

    path: MessagePath
    mode: str
    conversations: int
    sent: int
    delivered: int
    failed: int
    seconds: float
    p50: float | None
    p99: float | None
    cpu: CpuSnapshot
    gateway_rss: int
    inversions: int = 0
    notes: str = ""

    @property
    def lost(self) -> int:
        """Sent, neither delivered nor refused by the end of the row."""
        return self.sent - self.delivered - self.failed

    @property
    def rate(self) -> float:
        """Delivered messages per second."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def element_cpu(self) -> float | None:
        """CPU seconds per delivered message of the element the path goes through: the gateway
        process, or all of the module's Kamailio processes."""
        used = {GATEWAY: self.cpu.gateway, MODULE: self.cpu.module}.get(self.path.element)
        return None if used is None else used / max(self.delivered, 1)

    def cells(self) -> list[str]:
        """The table cells of this row."""
        per_msg = max(self.delivered, 1)

        def us(seconds: float) -> str:
            return f"{seconds / per_msg * 1e6:.0f}"

        return [
            self.path.name,
            self.mode,
            str(self.conversations),
            str(self.sent),
            str(self.delivered),
            str(self.failed),
            str(self.lost),
            str(self.inversions),
            f"{self.seconds:.2f}",
            f"{self.rate:,.0f}",
            ms(self.p50),
            ms(self.p99),
            micros(self.element_cpu),
            f"{self.gateway_rss / 2**20:.0f}" if self.path.element == GATEWAY else "-",
            us(self.cpu.prosody),
            us(self.cpu.kamailio),
            us(self.cpu.bench),
            self.notes,
        ]


HEADER = [
    "path",
    "mode",
    "conv",
    "sent",
    "deliv",
    "refused",
    "lost",
    "inv",
    "secs",
    "msg/s",
    "p50 ms",
    "p99 ms",
    "elem us/msg",
    "gw RSS MB",
    "prosody us/msg",
    "kamailio us/msg",
    "bench us/msg",
    "notes",
]


def ms(value: float | None) -> str:
    """Seconds as milliseconds, "-" when unknown."""
    return "-" if value is None else f"{value * 1e3:.1f}"


def micros(value: float | None) -> str:
    """Seconds as whole microseconds, "-" when unknown."""
    return "-" if value is None else f"{value * 1e6:.0f}"


def ratio(gateway: float | None, module: float | None) -> str:
    """``gateway / module`` as "1.23x", "-" when either is unknown or the module's is zero."""
    if gateway is None or module is None or module == 0:
        return "-"
    return f"{gateway / module:.2f}x"


def format_table(rows: list[RowResult]) -> str:
    """The rows as an aligned text table (first three columns left, numbers right)."""
    return aligned(HEADER, [row.cells() for row in rows], left=3)


COMPARISON_HEADER = [
    "load",
    "mode",
    "conv",
    "element",
    "msg/s",
    "p50 ms",
    "p99 ms",
    "CPU us/msg",
    "refused",
    "lost",
    "inv",
]


def format_comparison(rows: list[RowResult]) -> str:
    """Each load measured on both elements: the gateway's row, the module's, and the ratio
    gateway/module of throughput, latency and CPU per message ("" when no pair was measured)."""
    lines: list[list[str]] = []
    for gw in rows:
        if gw.path.element != GATEWAY or not gw.path.case:
            continue
        mod = next(
            (
                r
                for r in rows
                if r.path.element == MODULE
                and (r.path.case, r.mode, r.conversations)
                == (gw.path.case, gw.mode, gw.conversations)
            ),
            None,
        )
        if mod is None:
            continue
        for row in (gw, mod):
            lines.append(
                [
                    gw.path.case if row is gw else "",
                    row.mode,
                    str(row.conversations),
                    row.path.element,
                    f"{row.rate:,.0f}",
                    ms(row.p50),
                    ms(row.p99),
                    micros(row.element_cpu),
                    str(row.failed),
                    str(row.lost),
                    str(row.inversions),
                ]
            )
        lines.append(
            [
                "",
                "",
                "",
                "gw/module",
                ratio(gw.rate, mod.rate),
                ratio(gw.p50, mod.p50),
                ratio(gw.p99, mod.p99),
                ratio(gw.element_cpu, mod.element_cpu),
                "",
                "",
                "",
            ]
        )
    if not lines:
        return ""
    return aligned(COMPARISON_HEADER, lines, left=4)


@dataclass(frozen=True, slots=True)
class SippResult:
    """One SIPp run straight at an element: what SIPp counted and what reached XMPP."""

    path: MessagePath
    rate: float
    count: int
    stats: SippStats | None
    delivered: int  # distinct messages of the run that reached the XMPP receiver
    cpu: CpuSnapshot
    why: str = ""  # why there are no statistics

    @property
    def mode(self) -> str:
        """Offered rate and count, e.g. "6000/s x 15000"."""
        return f"{self.rate:g}/s x {self.count}"

    @property
    def element_cpu(self) -> float | None:
        """CPU seconds of the element per message SIPp saw answered."""
        if self.stats is None:
            return None
        used = self.cpu.module if self.path.element == MODULE else self.cpu.gateway
        return used / max(self.stats.successful, 1)

    def notes_line(self) -> str:
        """A one-line summary for the progress output."""
        if self.stats is None:
            return self.why
        stats = self.stats
        return (
            f"{stats.successful} ok, {stats.failed} failed, {stats.retransmissions} retrans, "
            f"{stats.rate:,.0f}/s, {self.delivered} reached XMPP"
        )

    def cells(self) -> list[str]:
        """The table cells of this run."""
        stats = self.stats
        if stats is None:
            return [self.mode, self.path.element, *["-"] * 7, self.why]
        return [
            self.mode,
            self.path.element,
            str(stats.successful),
            str(stats.failed),
            str(stats.retransmissions),
            f"{stats.seconds:.2f}",
            f"{stats.rate:,.0f}",
            str(self.delivered),
            micros(self.element_cpu),
            "",
        ]


SIPP_HEADER = [
    "SIPp offering",
    "element",
    "answered",
    "failed",
    "retrans",
    "secs",
    "msg/s",
    "reached XMPP",
    "CPU us/msg",
    "notes",
]


def format_sipp(results: list[SippResult]) -> str:
    """The SIPp runs, each gateway run followed by the module's at the same load (if measured)
    and the ratio gateway/module of the achieved rate and CPU per message."""
    lines: list[list[str]] = []
    for run in results:
        lines.append(run.cells())
        if run.path.element != MODULE:
            continue
        gw = next((r for r in results if r.path.element == GATEWAY and r.mode == run.mode), None)
        if gw is None or gw.stats is None or run.stats is None:
            continue
        rates = ratio(gw.stats.rate, run.stats.rate)
        cpus = ratio(gw.element_cpu, run.element_cpu)
        lines.append(["", "gw/module", "", "", "", "", rates, "", cpus, ""])
    return aligned(SIPP_HEADER, lines, left=2)


def inversions(arrivals: list[int], conversations: int) -> int:
    """Messages that arrived after a later one of their conversation (``seq % conversations``).

    Each row's messages go from sender ``n`` to receiver ``n`` for ``n = seq % conversations``,
    and each sender sends in ``seq`` order, so any inversion is the path's reordering.
    """
    latest: dict[int, int] = {}
    count = 0
    for seq in arrivals:
        conversation = seq % conversations
        if seq < latest.get(conversation, -1):
            count += 1
        else:
            latest[conversation] = seq
    return count
