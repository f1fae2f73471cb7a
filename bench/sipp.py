"""SIP load from SIPp (Debian ``sip-tester``): page-mode MESSAGEs at a fixed offered rate.

``sipp_message.xml`` beside this file is the scenario: one MESSAGE, then a 200 (the module) or
a 202 (the gateway). SIPp runs as a subprocess of the event loop, so the benchmark's XMPP
clients keep counting arrivals meanwhile; its results come from the statistics file it writes
(``-trace_stat -stf``): the last row holds the cumulative counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from sipside.peer import Peer
from tests.harness.ports import free_port
from tests.harness.values import LOOPBACK

SCENARIO = Path(__file__).resolve().parent / "sipp_message.xml"
SIPP = "sipp"


def sipp_available() -> bool:
    """True when the ``sipp`` binary is on PATH."""
    return shutil.which(SIPP) is not None


@dataclass(frozen=True, slots=True)
class SippLoad:
    """One SIPp run: ``count`` MESSAGEs at ``rate`` per second to ``target``, R-URI
    ``sip:<user>@<domain>`` from ``sip:<sender>@<sender_domain>``; ``tag`` starts each body."""

    target: Peer
    user: str
    domain: str
    sender: str
    sender_domain: str
    tag: str
    rate: float
    count: int
    timeout: float

    def argv(self, stats: Path) -> list[str]:
        """SIPp's command line for this load, its statistics written to ``stats``."""
        return [
            SIPP,
            "-sf",
            str(SCENARIO),
            "-s",
            self.user,
            "-key",
            "domain",
            self.domain,
            "-key",
            "from_user",
            self.sender,
            "-key",
            "from_domain",
            self.sender_domain,
            "-key",
            "tag",
            self.tag,
            "-i",
            LOOPBACK,
            "-p",
            str(free_port()),
            f"{self.target.host}:{self.target.port}",
            "-r",
            f"{self.rate:g}",
            "-m",
            str(self.count),
            "-l",
            str(self.count),  # every message may be open at once: the rate is really offered
            "-timeout",
            f"{self.timeout:.0f}",
            "-trace_stat",
            "-stf",
            str(stats),
            "-nostdin",
        ]


@dataclass(frozen=True, slots=True)
class SippStats:
    """The cumulative counters of a SIPp run."""

    successful: int
    failed: int
    retransmissions: int
    seconds: float  # from SIPp's start to its last statistics row

    @property
    def rate(self) -> float:
        """Successful messages per second over the run."""
        return self.successful / self.seconds if self.seconds > 0 else 0.0


def parse_stats(text: str) -> SippStats:
    """The last row of a SIPp ``-stf`` file (``;``-separated, header first)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        raise ValueError("SIPp wrote no statistics row")
    row = dict(zip(lines[0].split(";"), lines[-1].split(";"), strict=False))

    def epoch(name: str) -> float:
        # "2026-12-03\t13:33:49.495324\t1796304829.495324": the last part is epoch seconds.
        return float(row[name].split("\t")[-1])

    return SippStats(
        int(row["SuccessfulCall(C)"]),
        int(row["FailedCall(C)"]),
        int(row["Retransmissions(C)"]),
        epoch("CurrentTime") - epoch("StartTime"),
    )


async def run_sipp(load: SippLoad, workdir: Path) -> tuple[SippStats | None, str]:
    """Run SIPp for ``load`` (bounded by its timeout plus a margin); the statistics, or None
    and why not."""
    stats = workdir / f"sipp-{load.tag}.csv"
    out = workdir / f"sipp-{load.tag}.out"
    with out.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *load.argv(stats), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            await asyncio.wait_for(proc.wait(), load.timeout + 15.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    try:
        return parse_stats(stats.read_text()), ""
    except (OSError, ValueError, KeyError) as exc:
        tail = " / ".join(out.read_text(errors="replace").strip().splitlines()[-2:])
        return None, f"SIPp exited with {proc.returncode}: {exc}; {tail}"
