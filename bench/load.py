"""Pieces of ``bench.messages``: arrival bookkeeping, CPU/RSS readings from /proc, the reports
(machine, gateway log, profile), a raw XMPP client, SIP users, and the gateway under a profiler.

The bookkeeping (``Tracker``, ``percentile``, ``send_delay``, ``parse_tag``) is pure and takes
``now``; the clients are thin asyncio adapters. The XMPP client is a raw c2s stream parsed with
expat instead of slixmpp: slixmpp costs about as much CPU per stanza as the gateway itself
(SERVERS.md), and the load generator shares the machine's two cores with everything it measures.
It is used for the direct XMPP path too, so both rows pay the same client cost.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import cProfile
import enum
import io
import json
import os
import pstats
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

from sipside.endpoint import Endpoint, make_request
from sipside.message import SipRequest, new_call_id, new_tag
from sipside.peer import Peer

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# --- bookkeeping (pure) ------------------------------------------------------------------------


class Outcome(enum.Enum):
    """What became of one message of a row."""

    PENDING = 0
    ARRIVED = 1
    FAILED = 2


@dataclass(slots=True)
class Tracker:
    """Send times, arrivals and failures of the ``count`` messages of one row (pure: takes now)."""

    count: int
    sent_at: list[float] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    sent: int = 0
    arrived: int = 0
    failed: int = 0
    duplicates: int = 0
    first_sent: float | None = None
    last_settled: float | None = None

    def __post_init__(self) -> None:
        self.sent_at = [0.0] * self.count
        self.outcomes = [Outcome.PENDING] * self.count

    @property
    def settled(self) -> int:
        """Messages that arrived or failed."""
        return self.arrived + self.failed

    @property
    def done(self) -> bool:
        """True once every message has arrived or failed."""
        return self.settled >= self.count

    def on_sent(self, seq: int, now: float) -> None:
        """Message ``seq`` leaves now."""
        self.sent_at[seq] = now
        self.sent += 1
        if self.first_sent is None:
            self.first_sent = now

    def on_arrived(self, seq: int, now: float) -> bool:
        """Message ``seq`` arrived; True if that settles it (not a duplicate or unknown)."""
        if not 0 <= seq < self.count or self.outcomes[seq] is not Outcome.PENDING:
            self.duplicates += 1
            return False
        self.outcomes[seq] = Outcome.ARRIVED
        self.arrived += 1
        self.latencies.append(now - self.sent_at[seq])
        self.last_settled = now
        return True

    def on_failed(self, seq: int, now: float) -> bool:
        """Message ``seq`` will not arrive (an error came back); True if that settles it."""
        if not 0 <= seq < self.count or self.outcomes[seq] is not Outcome.PENDING:
            return False
        self.outcomes[seq] = Outcome.FAILED
        self.failed += 1
        self.last_settled = now
        return True

    def duration(self, now: float) -> float:
        """Seconds from the first send to the last settled message (or ``now`` if none)."""
        if self.first_sent is None:
            return 0.0
        end = self.last_settled if self.done and self.last_settled is not None else now
        return max(end - self.first_sent, 0.0)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (``fraction`` in 0..1) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    # rank = ceil(fraction * n), rounded first so that 0.99 * 100 is 99 and not 99.00000000000001
    scaled = round(fraction * len(ordered) * 1_000_000)
    rank = max(1, min(len(ordered), -(-scaled // 1_000_000)))
    return ordered[rank - 1]


def send_delay(seq: int, start: float, rate: float | None, now: float) -> float:
    """Seconds to wait before message ``seq`` at a steady ``rate`` per second (None: at once)."""
    if rate is None or rate <= 0:
        return 0.0
    return max(start + seq / rate - now, 0.0)


def message_tag(row: str, seq: int) -> str:
    """The identifier carried in a benchmark message's body and stanza id."""
    return f"{row}-{seq}"


def parse_tag(text: str, row: str) -> int | None:
    """The sequence number of a body or id made by ``message_tag`` for ``row``; None otherwise."""
    head = text.split(" ", 1)[0]
    prefix, sep, number = head.rpartition("-")
    if not sep or prefix != row or not number.isdigit():
        return None
    return int(number)


# --- CPU and memory of other processes (/proc) -------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0.0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    return _stat_cpu(stat)


def _stat_cpu(stat: str) -> float:
    # "pid (comm) state ...": comm may hold spaces and parentheses; fields 14 and 15 (utime,
    # stime) are the 12th and 13th after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _live_stats() -> dict[int, str]:
    """Each live process's /proc stat line, by pid."""
    stats: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats[int(entry.name)] = (entry / "stat").read_text()
        except OSError:
            continue
    return stats


def _after_comm(stat: str) -> list[str]:
    """The fields after "pid (comm)": state, ppid, pgrp, ..."""
    return stat[stat.rindex(")") + 2 :].split()


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime summed over the live processes of a process group (Kamailio's workers)."""
    stats = _live_stats().values()
    return sum(_stat_cpu(stat) for stat in stats if int(_after_comm(stat)[2]) == pgid)


def tree_cpu_seconds(root: int) -> float:
    """utime + stime summed over ``root`` and its live descendants (PostgreSQL's backends each
    start a session of their own, so its process group holds the postmaster alone)."""
    stats = _live_stats()
    parents = {pid: int(_after_comm(stat)[1]) for pid, stat in stats.items()}
    total = 0.0
    for pid, stat in stats.items():
        ancestor = pid
        while ancestor > 1 and ancestor != root:
            ancestor = parents.get(ancestor, 0)
        if ancestor == root:
            total += _stat_cpu(stat)
    return total


def proc_rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 once it is gone)."""
    try:
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(statm[1]) * PAGE_SIZE


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds used so far by each process of interest."""

    gateway: float
    prosody: float
    kamailio: float
    bench: float
    module: float = 0.0  # all processes of the Kamailio running the xmpp module (bench.anchor)

    def minus(self, other: CpuSnapshot) -> CpuSnapshot:
        """The CPU used between ``other`` and this snapshot."""
        return CpuSnapshot(
            self.gateway - other.gateway,
            self.prosody - other.prosody,
            self.kamailio - other.kamailio,
            self.bench - other.bench,
            self.module - other.module,
        )


def machine_line() -> str:
    """Core count, CPU model and load average, so a reader can tell how busy the box was, and
    whether the gateway's SIP stack ran compiled (sipside/__init__.py; the gateway processes
    import the same checkout)."""
    import sipside

    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stack = "compiled" if sipside.NATIVE else "pure Python"
    return f"machine: {os.cpu_count()} cores ({model}); load average {load}; SIP stack {stack}"


def profile_summary(path: Path, top: int = 15) -> str:
    """The gateway's top functions by cumulative and by own time, from a cProfile dump."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs()
    for key in ("cumulative", "tottime"):
        out.write(f"\n--- gateway cProfile, top {top} by {key}\n")
        stats.sort_stats(key).print_stats(top)
    return out.getvalue()


def log_summary(path: Path, top: int = 6) -> str:
    """How much the gateway logged, and its most frequent events (logging costs CPU too)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "gateway log: none"
    events: Counter[str] = Counter()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            events["(not JSON)"] += 1
            continue
        events[f"{entry.get('level', '?')} {entry.get('event', '?')}"] += 1
    common = ", ".join(f"{name} x{count}" for name, count in events.most_common(top))
    return f"gateway log: {len(lines)} lines; {common}"


# --- a raw XMPP c2s client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """One ``<message>`` stanza as the benchmark needs it."""

    sender: str
    id: str
    type: str
    body: str
    error: str = ""  # for type="error": the condition and the text, e.g. "item-not-found: SIP 404"


MessageHandler = Callable[[Received], None]

_STREAM_OPEN = (
    "<?xml version='1.0'?><stream:stream to={domain} xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
)


class RawXmppClient(asyncio.Protocol):
    """A minimal c2s client: SASL PLAIN without TLS, bind, presence, then raw ``<message>``s.

    Stanzas are parsed by expat into small ElementTree elements; messages go to ``on_message``,
    everything else to a queue that the login steps read.
    """

    def __init__(self, user: str, domain: str, password: str, on_message: MessageHandler) -> None:
        self.user, self.domain, self.password = user, domain, password
        self.on_message = on_message
        self.jid = f"{user}@{domain}"
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._stanzas: asyncio.Queue[ET.Element] = asyncio.Queue()
        self._ids = 0
        self._parser = self._new_parser()
        self._depth = 0
        self._builder: ET.TreeBuilder | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.Parse(data, False)
        except expat.ExpatError:
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    # parsing

    def _new_parser(self) -> expat.XMLParserType:
        parser = expat.ParserCreate()
        parser.buffer_text = True
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._chars
        return parser

    def _start(self, tag: str, attrs: dict[str, str]) -> None:
        self._depth += 1
        if self._depth == 2:  # a stanza (depth 1 is <stream:stream>)
            self._builder = ET.TreeBuilder()
        if self._builder is not None:
            self._builder.start(tag, attrs)

    def _chars(self, text: str) -> None:
        if self._builder is not None:
            self._builder.data(text)

    def _end(self, tag: str) -> None:
        self._depth -= 1
        builder = self._builder
        if builder is None:
            return
        builder.end(tag)
        if self._depth == 1:
            self._builder = None
            self._stanza(builder.close())

    def _stanza(self, element: ET.Element) -> None:
        if element.tag == "message":
            get = element.attrib.get
            self.on_message(
                Received(
                    get("from", ""),
                    get("id", ""),
                    get("type", "normal"),
                    element.findtext("body", ""),
                    _error_text(element),
                )
            )
        else:
            self._stanzas.put_nowait(element)

    # login

    async def login(self, host: str, port: int, timeout: float = 15.0) -> None:
        """Connect, authenticate, bind, send presence, and wait until the server has seen it."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, host, port)
        await asyncio.wait_for(self._login_steps(), timeout)

    async def _login_steps(self) -> None:
        self._write(_STREAM_OPEN.format(domain=quoteattr(self.domain)))
        await self._expect("stream:features")
        token = base64.b64encode(f"\0{self.user}\0{self.password}".encode()).decode()
        self._write(
            f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{token}</auth>"
        )
        answer = await self._next()
        if answer.tag != "success":
            raise ConnectionError(f"XMPP login of {self.jid} refused: {answer.tag}")
        # RFC 6120 6.4.6: after SASL success both sides restart the stream.
        self._parser = self._new_parser()
        self._depth = 0
        self._write(_STREAM_OPEN.format(domain=quoteattr(self.domain)))
        await self._expect("stream:features")
        await self.iq(
            "set",
            None,
            "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>bench</resource></bind>",
        )
        self._write("<presence/>")
        # The server handles one stream in order: once this ping is answered, the presence is in
        # effect and messages to the bare JID reach this resource.
        await self.iq("get", self.domain, "<ping xmlns='urn:xmpp:ping'/>")

    async def iq(self, itype: str, to: str | None, payload: str) -> ET.Element:
        """Send an iq and return its answer; raises ConnectionError for an error answer."""
        self._ids += 1
        iq_id = f"q{self._ids}"
        dest = f" to={quoteattr(to)}" if to else ""
        self._write(f"<iq type='{itype}' id='{iq_id}'{dest}>{payload}</iq>")
        while True:
            answer = await self._next()
            if answer.tag == "iq" and answer.get("id") == iq_id:
                if answer.get("type") != "result":
                    raise ConnectionError(f"iq to {to} failed: {ET.tostring(answer)[:200]!r}")
                return answer

    async def _expect(self, tag: str) -> ET.Element:
        element = await self._next()
        if element.tag != tag:
            raise ConnectionError(f"expected <{tag}>, got <{element.tag}>")
        return element

    async def _next(self) -> ET.Element:
        getter = asyncio.ensure_future(self._stanzas.get())
        waited: set[asyncio.Future[object]] = {cast("asyncio.Future[object]", getter), self.closed}
        done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            raise ConnectionError(f"XMPP stream of {self.jid} closed")
        return getter.result()

    # sending

    def _write(self, text: str) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError(f"XMPP stream of {self.jid} is not open")
        self.transport.write(text.encode())

    def send_chat(self, to: str, stanza_id: str, body: str) -> None:
        """Write one ``<message type='chat'>``."""
        self._write(message_xml(to, stanza_id, body))

    async def close(self) -> None:
        """Close the stream (bounded wait)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"</stream:stream>")
            self.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), 2.0)


def _error_text(stanza: ET.Element) -> str:
    error = stanza.find("error")
    if error is None:
        return ""
    condition = next((child.tag for child in error if child.tag != "text"), "?")
    text = error.findtext("text")
    return f"{condition}: {text}" if text else condition


def message_xml(to: str, stanza_id: str, body: str) -> str:
    """The wire text of a chat message (escaped)."""
    return (
        f"<message to={quoteattr(to)} type='chat' id={quoteattr(stanza_id)}>"
        f"<body>{escape(body)}</body></message>"
    )


# --- SIP users ---------------------------------------------------------------------------------


async def register_user(
    endpoint: Endpoint, user: str, domain: str, expires: int = 3600, registrar: Peer | None = None
) -> None:
    """REGISTER ``sip:user@domain`` at ``registrar`` (default: the endpoint's outbound proxy),
    Contact = this endpoint."""
    aor = f"sip:{user}@{domain}"
    request = make_request(
        "REGISTER",
        f"sip:{domain}",
        from_=f"<{aor}>;tag={new_tag()}",
        to=f"<{aor}>",
        call_id=new_call_id(),
        headers=[("Contact", f"<{endpoint.contact_for('udp', user)}>"), ("Expires", str(expires))],
    )
    response = await endpoint.request(request, registrar)
    if response.status != 200:
        raise ConnectionError(f"REGISTER {aor} got {response.status} {response.reason}")


def sip_message(from_uri: str, to_uri: str, body: str) -> SipRequest:
    """A MESSAGE request ready for ``Endpoint.request`` (text/plain)."""
    return make_request(
        "MESSAGE",
        to_uri,
        from_=f"<{from_uri}>;tag={new_tag()}",
        to=f"<{to_uri}>",
        call_id=new_call_id(),
        headers=[("Content-Type", "text/plain")],
        body=body.encode(),
    )


# --- the gateway under a CPU-time profiler -----------------------------------------------------


def profile_gateway(out: str, argv: list[str]) -> int:
    """Run the gateway's command line under cProfile timed by the main thread's CPU clock.

    ``python -m cProfile`` times with the wall clock; on a busy two-core box a process that
    wakes another one is often preempted inside the very syscall (sendto, send), which then
    looks expensive. CPU time charges each function only for the work it does.
    """
    from component.cli import main

    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        return main(argv)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    # python -m bench.load profile-gateway OUT run -c gateway.toml
    if len(sys.argv) < 3 or sys.argv[1] != "profile-gateway":
        raise SystemExit("usage: python -m bench.load profile-gateway OUT COMPONENT-ARGS...")
    raise SystemExit(profile_gateway(sys.argv[2], sys.argv[3:]))
