"""Per-source fairness of both edges: one source floods, another's latency is measured.

Run ``python -m bench.fairness [--side both|sip|xmpp] [--flood 2000] [--probes 400]
[--rate 200] [--rounds 1]``.

SIP side: for each row it starts the gateway's SIP edge in its own process: the endpoint, the
gate and the real message router, whose XMPP port checks and formats every stanza as the link
does but writes it nowhere (the XMPP server's share is not what this measures). Then, on
loopback:

- the probe source (127.0.0.2) sends one MESSAGE every 1/``--rate`` s, ``--probes`` in all,
  and measures each one's time from sending to its final response;
- in the flood rows, a third process (127.0.0.1) sends ``--flood`` MESSAGEs at
  ``--flood-rate`` a second (above what the edge can answer), once a quarter of the probes
  have been sent, and counts the answers it gets.

Rows: without the flood and with it, with the per-source limit off and on (``limits.sip_rate``
and ``limits.sip_burst``: their defaults unless ``--sip-rate`` and ``--sip-burst`` say). The
table gives the probe's p50/p99/max latency and how many probes went unanswered (UDP: the
kernel drops what overflows the socket buffer; a real client would retransmit after T1), and
the flood's answers by status.

XMPP side: the gateway's XMPP link (the real ``XmppLink``, its per-sender limit
``limits.xmpp_rate`` / ``xmpp_burst`` on or off) runs in its own process with the real message
router, whose SIP port answers every MESSAGE 200 at once; this process plays the XMPP server
on the component stream. The probe sender sends a XEP-0199 ping to the component every
1/``--xmpp-probe-rate`` s (the link answers it itself) and measures each round trip; in the
flood rows, another sender's ``--flood`` chat messages to a SIP user are written to the same
stream (as a server multiplexes every sender onto it) at ``--xmpp-flood-rate``, and their
error replies are counted by condition.

Each edge process sets the garbage collector as the gateway does once started
(``component.app.serve``: start-up objects frozen, a larger young generation), and this process
freezes its own, so that neither side's first full collection (70-80 ms) lands in a row.
``--profile FILE`` writes a cProfile of the XMPP edge in each flood row to ``FILE.on`` and
``FILE.off``.

Every row is bounded in count and time. The issue's target: the probe's p99 with the flood at
most 2x its p99 without it, or 5 ms if that is more.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import structlog

from bench.load import percentile
from component.addresses import AddressBook
from component.messaging.router import MessageRouter
from component.ratelimit import SourceBuckets
from component.runtime.tasks import TaskOwner
from component.settings import LimitSettings, Settings
from component.sip.gate import SipGate
from component.store.memory import MemoryStore
from component.values import ChatMessage, ImdnAsk
from component.xmpp.link import XmppLink
from component.xmpp.stanzas import format_message, outbound_jids
from sipside.endpoint import Endpoint

HOST = "127.0.0.1"
PROBE_HOST = "127.0.0.2"
FLOOD_HOST = "127.0.0.1"
ANSWER_WAIT = 3.0  # seconds to wait for the last answers of a row


class FormattingXmpp:
    """The XMPP port of the bench: the link's checks and formatting, no socket."""

    def __init__(self, component: str) -> None:
        self.component = component
        self.written = 0

    @property
    def connected(self) -> bool:
        return True

    def send_message(self, msg: ChatMessage) -> bool:
        outbound_jids(msg.sender, msg.recipient, self.component)
        self.written += len(format_message(msg))
        return True


def collect_like_the_gateway() -> None:
    """The garbage collector as ``component.app.serve`` sets it once the gateway is built:
    start-up objects frozen out of the scans, a larger young generation. Without it, the
    first full collection of a run (70-80 ms: every module, class and setting the process
    imported) lands in the middle of the flood and is what the probe measures, not the edge."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def serve(port_file: str, limits: LimitSettings | None) -> None:
    """The SIP edge in this process until stdin closes; its port goes to ``port_file``."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    settings = Settings()
    book = AddressBook.from_settings(settings)
    none = cast(Any, None)  # ports the SIP -> XMPP hot path never touches
    router = MessageRouter(
        book,
        cast(Any, FormattingXmpp(settings.xmpp.component)),
        none,
        none,
        none,
        clock=time.time,
        delay_time=30.0,
    )
    rate = SourceBuckets(limits.sip_rate, limits.sip_burst) if limits else None
    gate = SipGate(router, book=book, rate=rate, max_pending=100000)
    endpoint = Endpoint([f"udp:{HOST}:0"], gate.handle, admit=gate.admit_source)
    collect_like_the_gateway()
    await endpoint.start()
    with open(port_file, "w") as out:
        out.write(str(endpoint.local_peers["udp"].port))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await endpoint.close()


def message(source: str, n: int, tag: str) -> bytes:
    """A MESSAGE from ``source`` with its own branch, Call-ID and From tag."""
    body = b"Hello Bob, are you there this time?"
    return (
        f"MESSAGE sip:bob*xmpp.test@jabber.sip.test SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {source}:5999;branch=z9hG4bK{tag}{n};rport\r\n"
        "Max-Forwards: 70\r\n"
        f'From: "Dave" <sip:dave{tag}@sip.test>;tag={tag}{n}\r\n'
        "To: <sip:bob*xmpp.test@jabber.sip.test>\r\n"
        f"Call-ID: {tag}-{n}@bench.test\r\n"
        f"CSeq: 1 MESSAGE\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def answer_of(data: bytes) -> tuple[str, int]:
    """(Call-ID, status) of a response datagram."""
    status = int(data[8:11])
    start = data.index(b"\r\nCall-ID: ") + 11
    return data[start : data.index(b"\r\n", start)].decode(), status


def flood(port: int, count: int, rate: float) -> None:
    """Send ``count`` MESSAGEs from FLOOD_HOST at ``rate`` a second (in bursts of 20); print
    the answers by status as JSON."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((FLOOD_HOST, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    data = [message(FLOOD_HOST, n, "flood") for n in range(count)]
    start = time.perf_counter()
    for n, item in enumerate(data):
        if n % 20 == 0:
            time.sleep(max(0.0, start + n / rate - time.perf_counter()))
        sock.sendto(item, (HOST, port))
    statuses: Counter[int] = Counter()
    sock.settimeout(ANSWER_WAIT)
    try:
        while sum(statuses.values()) < count:
            statuses[answer_of(sock.recv(65535))[1]] += 1
    except TimeoutError:
        pass
    print(json.dumps({str(k): v for k, v in sorted(statuses.items())}))


@dataclass
class Row:
    """One row's figures."""

    name: str
    latencies: list[float]
    lost: int
    flood: dict[str, int]


class Probe(asyncio.DatagramProtocol):
    """The measured source: sends on a steady clock, matches answers by Call-ID."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        call_id, status = answer_of(data)
        start = self.sent.pop(call_id, None) if status >= 200 else None
        if start is not None:
            self.latencies.append(time.perf_counter() - start)


async def run_row(name: str, limited: bool, flooded_row: bool, args: argparse.Namespace) -> Row:
    """Start the edge, probe it (and flood it), stop it."""
    workdir = Path(tempfile.mkdtemp(prefix="fairness-"))
    port_file = workdir / "port"
    limit = ["--limited", "--sip-rate", str(args.sip_rate), "--sip-burst", str(args.sip_burst)]
    limit = limit if limited else []
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.fairness", "--serve", str(port_file), *limit],
        stdin=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text()):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the SIP edge did not start")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text())
        loop = asyncio.get_running_loop()
        transport, probe = await loop.create_datagram_endpoint(Probe, local_addr=(PROBE_HOST, 0))
        flooder: subprocess.Popen[bytes] | None = None
        start = loop.time()
        for n in range(args.probes):
            await asyncio.sleep(max(0.0, start + n / args.rate - loop.time()))
            if flooded_row and n == args.probes // 4:
                flood_args = ["--flood", str(args.flood), "--flood-rate", str(args.flood_rate)]
                flooder = subprocess.Popen(
                    [sys.executable, "-m", "bench.fairness", "--flood-to", str(port), *flood_args],
                    stdout=subprocess.PIPE,
                )
            data = message(PROBE_HOST, n, "probe")
            probe.sent[f"probe-{n}@bench.test"] = time.perf_counter()
            transport.sendto(data, (HOST, port))
        await asyncio.sleep(min(ANSWER_WAIT, 0.5))
        transport.close()
        flooded: dict[str, int] = {}
        if flooder is not None:
            out, _ = await loop.run_in_executor(None, lambda: flooder.communicate(timeout=30))
            flooded = json.loads(out)
        return Row(name, probe.latencies, len(probe.sent), flooded)
    finally:
        if server.stdin is not None:
            server.stdin.close()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


# --- the XMPP side ---------------------------------------------------------------------------

COMPONENT = "sip.xmpp.test"
PROBE_JID = "probe@xmpp.test/bench"
FLOOD_JID = "flood@xmpp.test/bench"


class AnsweringSip:
    """The SIP port of the XMPP rows: every MESSAGE answered 200 on the next loop turn."""

    def __init__(self) -> None:
        self.sent = 0

    async def send_text(
        self,
        *,
        from_uri: str,
        to_uri: str,
        body: str,
        from_display: str | None = None,
        imdn: ImdnAsk | None = None,
        sent_at: float | None = None,
    ) -> int:
        self.sent += 1
        await asyncio.sleep(0)
        return 200


async def serve_xmpp(port: int, limits: LimitSettings | None) -> None:
    """The gateway's XMPP edge in this process, connected to the bench's server at ``port``,
    until stdin closes."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    settings = Settings()
    book = AddressBook.from_settings(settings)
    none = cast(Any, None)  # ports these messages never reach (commands, notices)
    tasks = TaskOwner("bench_message_failed")
    routed: list[MessageRouter] = []

    def on_message(msg: ChatMessage) -> None:
        # As the gateway's composition root does: a task only for what must be awaited.
        work = routed[0].take_xmpp_message(msg)
        if work is not None:
            tasks.own(work)

    rate = SourceBuckets(limits.xmpp_rate, limits.xmpp_burst) if limits else None
    link = XmppLink(
        component=COMPONENT,
        host=HOST,
        port=port,
        secret="bench",
        on_message=on_message,
        on_error=lambda err: None,
        on_presence=lambda presence: None,
        rate=rate,
    )
    router = MessageRouter(
        book, link, cast(Any, AnsweringSip()), MemoryStore(), none, clock=time.time, delay_time=30.0
    )
    routed.append(router)
    collect_like_the_gateway()
    running = asyncio.ensure_future(link.run())
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await link.stop()
    await asyncio.gather(running, return_exceptions=True)


_START_TAG = re.compile(rb"<((?:iq|message|presence) [^>]*)>")
_ATTR = re.compile(rb'(\w+)="([^"]*)"')
_CONDITION = re.compile(rb'<error type="\w+"><([a-z-]+) ')
_STREAM = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept'"
    f" xmlns:stream='http://etherx.jabber.org/streams' id='bench' from='{COMPONENT}'>"
)


class XmppServerSide:
    """The server end of the component stream: writes the senders' stanzas, reads replies."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b">")
        writer.write(_STREAM.encode())
        await reader.readuntil(b"</handshake>")
        writer.write(b"<handshake/>")
        self.writer = writer
        self.ready.set()
        # The replies are scanned, not parsed: this process's own cost must not be what the
        # probe measures. Every start tag the link writes is complete before its next '>'.
        rest = b""
        while data := await reader.read(65536):
            data = rest + data
            cut = data.rfind(b">") + 1
            self.received(data[:cut])
            rest = data[cut:]
            if b"</stream:stream>" in data:
                writer.write(b"</stream:stream>")
                break
        writer.close()
        self.closed.set()

    def received(self, data: bytes) -> None:
        now = time.perf_counter()
        for tag in _START_TAG.findall(data):
            attrs = dict(_ATTR.findall(tag))
            kind = tag.split(b" ", 1)[0]
            if kind == b"iq" and attrs.get(b"to") == attrs.get(b"from") == COMPONENT.encode():
                assert self.writer is not None  # the link's own barrier ping: routed back
                self.writer.write(b"<" + tag + b'><ping xmlns="urn:xmpp:ping"/></iq>')
                continue
            start = self.sent.pop(attrs.get(b"id", b"").decode(), None)
            if start is not None and attrs.get(b"type") == b"result":
                self.latencies.append(now - start)
        for condition in _CONDITION.findall(data):
            self.errors[condition.decode()] += 1

    def probe(self, n: int) -> None:
        assert self.writer is not None
        iq_id = f"probe-{n}"
        self.sent[iq_id] = time.perf_counter()
        self.writer.write(
            f"<iq type='get' id='{iq_id}' from='{PROBE_JID}' to='{COMPONENT}'>"
            "<ping xmlns='urn:xmpp:ping'/></iq>".encode()
        )

    async def flood(self, count: int, rate: float) -> None:
        assert self.writer is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(count):
            if n % 20 == 0:
                await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
            self.writer.write(
                f"<message type='chat' id='flood-{n}' from='{FLOOD_JID}'"
                f" to='alice@{COMPONENT}'><body>Hello Alice, are you there this time?</body>"
                "</message>".encode()
            )


async def run_xmpp_row(
    name: str, limited: bool, flooded_row: bool, args: argparse.Namespace
) -> Row:
    """Serve the component stream, start the XMPP edge, probe it (and flood it), stop it."""
    side = XmppServerSide()
    server = await asyncio.start_server(side.serve, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    limit = ["--xmpp-rate", str(args.xmpp_rate), "--xmpp-burst", str(args.xmpp_burst)]
    argv = ["--serve-xmpp", str(port), *(["--limited", *limit] if limited else [])]
    if args.profile and flooded_row:
        argv += ["--profile", f"{args.profile}.{'on' if limited else 'off'}"]
    edge = subprocess.Popen([sys.executable, "-m", "bench.fairness", *argv], stdin=subprocess.PIPE)
    try:
        await asyncio.wait_for(side.ready.wait(), 20)
        await asyncio.sleep(0.2)  # the link is up once the handshake is answered
        loop = asyncio.get_running_loop()
        flooding: asyncio.Task[None] | None = None
        start = loop.time()
        for n in range(args.probes):
            await asyncio.sleep(max(0.0, start + n / args.xmpp_probe_rate - loop.time()))
            if flooded_row and n == args.probes // 4:
                flooding = asyncio.ensure_future(side.flood(args.flood, args.xmpp_flood_rate))
            side.probe(n)
        if flooding is not None:
            await flooding
        deadline = loop.time() + ANSWER_WAIT
        while side.sent and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        return Row(name, side.latencies, len(side.sent), dict(side.errors))
    finally:
        if edge.stdin is not None:
            edge.stdin.close()
        edge.wait(timeout=20)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(side.closed.wait(), 5)
        server.close()


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.2f}"


def print_table(rows: list[Row], title: str) -> None:
    """The table, one line per row."""
    print(title)
    head = f"{'row':<24} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'lost':>5}  flood answers"
    print(head)
    print("-" * len(head))
    for row in rows:
        flood = ", ".join(f"{k}: {v}" for k, v in row.flood.items()) or "-"
        lat = row.latencies
        print(
            f"{row.name:<24} {ms(percentile(lat, 0.5)):>8} {ms(percentile(lat, 0.99)):>8} "
            f"{ms(max(lat) if lat else None):>8} {row.lost:>5}  {flood}"
        )


ROWS = [  # name, limit on, flood
    ("limit off, no flood", False, False),
    ("limit off, flood", False, True),
    ("limit on, no flood", True, False),
    ("limit on, flood", True, True),
]


async def bench(args: argparse.Namespace, run: Any) -> list[Row]:
    """Every row, ``--rounds`` times each, in turn, with ``run`` (one side's row)."""
    rows = []
    for _ in range(args.rounds):
        for name, limited, flooded in ROWS:
            rows.append(await run(name, limited, flooded, args))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the table (or run one of the helper processes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--flood", type=int, default=2000, help="requests of the flood")
    parser.add_argument(
        "--flood-rate", type=float, default=20000.0, help="flood requests per second"
    )
    parser.add_argument("--probes", type=int, default=400, help="requests of the probe source")
    parser.add_argument("--rate", type=float, default=200.0, help="probe requests per second")
    parser.add_argument("--rounds", type=int, default=1, help="times to run every row")
    defaults = LimitSettings()
    parser.add_argument("--sip-rate", type=float, default=defaults.sip_rate, help="limits.sip_rate")
    parser.add_argument(
        "--sip-burst", type=int, default=defaults.sip_burst, help="limits.sip_burst"
    )
    parser.add_argument(
        "--xmpp-rate", type=float, default=defaults.xmpp_rate, help="limits.xmpp_rate"
    )
    parser.add_argument(
        "--xmpp-burst", type=int, default=defaults.xmpp_burst, help="limits.xmpp_burst"
    )
    parser.add_argument(
        "--xmpp-probe-rate",
        type=float,
        default=50.0,
        help="probe pings per second (below limits.xmpp_rate: the probe is well-behaved)",
    )
    parser.add_argument(
        "--xmpp-flood-rate",
        type=float,
        default=5000.0,
        help="flood stanzas per second on the component stream",
    )
    parser.add_argument(
        "--profile",
        help="XMPP side: cProfile the edge in the flood rows, to PROFILE.on and PROFILE.off",
    )
    parser.add_argument("--side", choices=["both", "sip", "xmpp"], default="both")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--serve-xmpp", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--limited", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--flood-to", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    limits = LimitSettings(
        sip_rate=args.sip_rate,
        sip_burst=args.sip_burst,
        xmpp_rate=args.xmpp_rate,
        xmpp_burst=args.xmpp_burst,
    )
    if args.serve:
        asyncio.run(serve(args.serve, limits if args.limited else None))
        return 0
    if args.serve_xmpp:
        edge = serve_xmpp(args.serve_xmpp, limits if args.limited else None)
        if not args.profile:
            asyncio.run(edge)
            return 0
        profile = cProfile.Profile()
        profile.runcall(asyncio.run, edge)
        profile.dump_stats(args.profile)
        return 0
    if args.flood_to:
        flood(args.flood_to, args.flood, args.flood_rate)
        return 0
    # This process measures: its own collector's pauses must not count as the edge's latency.
    gc.freeze()
    if args.side in ("both", "sip"):
        print_table(
            asyncio.run(bench(args, run_row)),
            f"SIP: probe {args.probes} MESSAGEs at {args.rate:g}/s from {PROBE_HOST}; "
            f"flood {args.flood} MESSAGEs at {args.flood_rate:g}/s from {FLOOD_HOST}; "
            f"limit: sip_rate {args.sip_rate:g}/s, sip_burst {args.sip_burst}",
        )
    if args.side in ("both", "xmpp"):
        print_table(
            asyncio.run(bench(args, run_xmpp_row)),
            f"XMPP: probe {args.probes} pings at {args.xmpp_probe_rate:g}/s from {PROBE_JID}; "
            f"flood {args.flood} messages at {args.xmpp_flood_rate:g}/s from {FLOOD_JID}; "
            f"limit: xmpp_rate {args.xmpp_rate:g}/s, xmpp_burst {args.xmpp_burst}",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
