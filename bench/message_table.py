"""The table ``bench.messages`` prints: one row per path and mode."""

from __future__ import annotations

from dataclasses import dataclass

from bench.load import CpuSnapshot


@dataclass(frozen=True, slots=True)
class MessagePath:
    """One way a message can travel; ``gateway`` rows get the gateway's CPU and RSS columns."""

    name: str
    gateway: bool


@dataclass(frozen=True, slots=True)
class RowResult:
    """One line of the table."""

    path: MessagePath
    mode: str
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

    def cells(self) -> list[str]:
        """The table cells of this row."""
        per_msg = max(self.delivered, 1)

        def us(seconds: float) -> str:
            return f"{seconds / per_msg * 1e6:.0f}"

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1e3:.1f}"

        rate = self.delivered / self.seconds if self.seconds > 0 else 0.0
        gateway = self.path.gateway
        return [
            self.path.name,
            self.mode,
            str(self.sent),
            str(self.delivered),
            str(self.failed),
            str(self.inversions),
            f"{self.seconds:.2f}",
            f"{rate:,.0f}",
            ms(self.p50),
            ms(self.p99),
            us(self.cpu.gateway) if gateway else "-",
            f"{self.gateway_rss / 2**20:.0f}" if gateway else "-",
            us(self.cpu.prosody),
            us(self.cpu.kamailio),
            us(self.cpu.bench),
            self.notes,
        ]


HEADER = [
    "path",
    "mode",
    "sent",
    "deliv",
    "fail",
    "inv",
    "secs",
    "msg/s",
    "p50 ms",
    "p99 ms",
    "gw us/msg",
    "gw RSS MB",
    "prosody us/msg",
    "kamailio us/msg",
    "bench us/msg",
    "notes",
]


def format_table(rows: list[RowResult]) -> str:
    """The rows as an aligned text table (first two columns left, numbers right)."""
    lines = [HEADER, *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out: list[str] = []
    for index, line in enumerate(lines):
        cells = [
            cell.ljust(width) if col < 2 or col == len(HEADER) - 1 else cell.rjust(width)
            for col, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


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
