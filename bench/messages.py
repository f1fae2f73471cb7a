"""Benchmark of chat messages through the gateway, beside Kamailio's ``xmpp`` module and against
the direct paths as the limit.

Run ``python -m bench.messages [--quick] [--count N] ...`` (``--help`` lists the options). It
starts Prosody, Kamailio (``-m 512``), the gateway as its own process (``python -m component
run``, SQLite store in a temp dir) and, when it can be had (``bench.anchor``: built once into a
cache directory), a second Kamailio running the anchor's config with the ``xmpp`` module as a
component of the same Prosody. Then, in one run and on loopback:

- ``xmpp -> xmpp``: raw XMPP clients carolN -> Prosody -> bobN (the XMPP limit);
- ``sip -> sip``: a sipside Endpoint (daveN) -> Kamailio -> a registered Endpoint (aliceN);
- ``sip -> kamailio -> gw -> xmpp``: daveN -> Kamailio -> gateway -> Prosody -> bobN;
- ``sip -> gw -> xmpp`` and ``sip -> module -> xmpp``: daveN straight at each element;
- ``xmpp -> gw -> kamailio -> sip`` and ``xmpp -> module -> sip``: carolN -> Prosody -> the
  element -> a Kamailio (the module's own, which it uses as outbound proxy) -> aliceN, over
  ``--conversations`` conversations and over one;
- ``xmpp burst -> gw -> sip``: carol1 sends ``--burst`` messages (default 200) at once to the
  aliceN in turn; refused ones count as failed, with their error condition in the notes;
- SIPp (``bench/sipp_message.xml``) offering ``--sipp-rate`` MESSAGE/s (6,000) for
  ``--sipp-count`` messages (15,000), and a steady ``--rate`` (200/s), straight at each element.

The ``inv`` column counts per-conversation inversions: messages that arrived after a later
one from the same sender to the same receiver (DESIGN 4.2 wants none); ``refused`` counts
error answers, ``lost`` messages neither delivered nor refused by the end of the row.

Each path runs at a steady offered load (``--rate`` per second) and at the maximum rate, each
row with a fixed message count, at most ``--concurrency`` messages in flight (sent, not yet
arrived) and an overall timeout. Latency is send to arrival on this process's clock. CPU per
message is read from /proc for the gateway, Prosody, Kamailio (all its processes), the module's
Kamailio (all its processes) and this process; the gateway's RSS is read after each gateway
row. A second table puts each load's gateway row beside the module's with the ratio
gateway/module. ``--profile FILE`` runs the gateway under cProfile and prints its hot spots at
the end (the timings of that run are distorted).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bench.anchor import (
    DEFAULT_ANCHOR_DIR,
    MODULE_DOMAIN,
    Anchor,
    AnchorProsody,
    ModuleKamailio,
    cache_dir,
    find_or_build,
)
from bench.load import (
    CpuSnapshot,
    RawXmppClient,
    Received,
    Tracker,
    group_cpu_seconds,
    log_summary,
    machine_line,
    message_tag,
    parse_tag,
    percentile,
    proc_cpu_seconds,
    proc_rss_bytes,
    profile_summary,
    register_user,
    send_delay,
    sip_message,
)
from bench.message_table import (
    GATEWAY,
    MODULE,
    MessagePath,
    RowResult,
    SippResult,
    format_comparison,
    format_sipp,
    format_table,
    inversions,
)
from bench.sipp import SippLoad, run_sipp, sipp_available
from component.store.migrate import upgrade
from sipside.endpoint import Endpoint, IncomingRequest
from sipside.errors import SipError
from sipside.message import SipRequest
from sipside.peer import Peer
from tests.harness import process
from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.ports import free_port, wait_for_port
from tests.harness.prosody import ProsodyServer
from tests.harness.values import COMPONENT_DOMAIN, JDOMAIN, LOOPBACK, SIP_DOMAIN, XMPP_DOMAIN

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "password"
BODY_TEXT = "Hello Bob, are you there this time?"
WARMUP_COUNT = 50
KAMAILIO_SHM_MB = 512  # SERVERS.md: the default 128 MB runs out under load and tm drops requests

# --- paths and results -------------------------------------------------------------------------


STRAIGHT = "sip -> xmpp, UA straight at the element"
RELAYED = "xmpp -> sip, through Kamailio to a registered UA"
XMPP_DIRECT = MessagePath("xmpp -> xmpp")
SIP_DIRECT = MessagePath("sip -> sip")
SIP_TO_XMPP = MessagePath("sip -> kamailio -> gw -> xmpp", GATEWAY)
SIP_AT_GATEWAY = MessagePath("sip -> gw -> xmpp", GATEWAY, STRAIGHT)
SIP_AT_MODULE = MessagePath("sip -> module -> xmpp", MODULE, STRAIGHT)
XMPP_TO_SIP = MessagePath("xmpp -> gw -> kamailio -> sip", GATEWAY, RELAYED)
XMPP_TO_MODULE = MessagePath("xmpp -> module -> sip", MODULE, RELAYED)
# DESIGN 8: one XMPP user (carol1) sends a burst to the SIP users in turn, all at once.
XMPP_BURST = MessagePath("xmpp burst -> gw -> sip", GATEWAY)
#: Loads measured on the gateway and, when it runs, on the module.
PAIRS = ((SIP_AT_GATEWAY, SIP_AT_MODULE), (XMPP_TO_SIP, XMPP_TO_MODULE))
SIP_PATHS = (SIP_DIRECT, SIP_TO_XMPP, SIP_AT_GATEWAY, SIP_AT_MODULE)


# --- one row in flight ---------------------------------------------------------------------------


class ActiveRow:
    """The row being measured: its tracker, its window of messages in flight, its end."""

    def __init__(self, tag: str, count: int, window: int) -> None:
        self.tag = tag
        self.tracker = Tracker(count)
        self.window = asyncio.Semaphore(window)
        self.finished = asyncio.Event()
        self.statuses: Counter[str] = Counter()
        self.arrivals: list[int] = []  # sequence numbers in the order they arrived

    def arrived(self, text: str) -> None:
        """A message with ``text`` (a body) reached its receiver."""
        seq = parse_tag(text, self.tag)
        if seq is not None and self.tracker.on_arrived(seq, time.perf_counter()):
            self.arrivals.append(seq)
            self._settled()

    def failed(self, seq: int, why: str) -> None:
        """Message ``seq`` was refused on the way (``why`` is counted for the notes)."""
        self.statuses[why] += 1
        if self.tracker.on_failed(seq, time.perf_counter()):
            self._settled()

    def failed_id(self, stanza_id: str, why: str) -> None:
        """An XMPP error came back for the stanza with ``stanza_id``."""
        seq = parse_tag(stanza_id, self.tag)
        if seq is not None:
            self.failed(seq, why)

    def _settled(self) -> None:
        self.window.release()
        if self.tracker.done:
            self.finished.set()


# --- the servers, the gateway and the clients ----------------------------------------------------


class CountedRow:
    """A SIPp run's arrivals: how many of its messages (bodies ``tag-N``) reached XMPP."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.seen: set[int] = set()

    def arrived(self, text: str) -> None:
        """A message with ``text`` (a body) reached its receiver."""
        seq = parse_tag(text, self.tag)
        if seq is not None:
            self.seen.add(seq)

    def failed_id(self, stanza_id: str, why: str) -> None:
        """SIPp counts its own failures; XMPP errors to the receivers are not expected."""


@dataclass
class World:
    """Everything started for the run, and what the clients report arrivals to."""

    users: int
    workdir: Path
    anchor: Anchor | None = None
    profile: Path | None = None
    profile_clock: str = "cpu"
    concurrency: int = 50
    prosody: ProsodyServer | None = None
    kamailio: KamailioServer | None = None
    module: ModuleKamailio | None = None  # Kamailio with the xmpp module, once its link is up
    gateway: subprocess.Popen[bytes] | None = None
    bobs: list[RawXmppClient] = field(default_factory=list)  # XMPP receivers
    carols: list[RawXmppClient] = field(default_factory=list)  # XMPP senders
    sip_sender: Endpoint | None = None  # daveN
    sip_receiver: Endpoint | None = None  # aliceN, registered at both Kamailios
    current: ActiveRow | CountedRow | None = None
    sending: set[asyncio.Task[None]] = field(default_factory=set)

    # receivers

    def on_xmpp(self, msg: Received) -> None:
        """Every message stanza any XMPP client receives."""
        row = self.current
        if row is None:
            return
        if msg.type == "error":
            row.failed_id(msg.id, msg.error or "xmpp error")
        else:
            row.arrived(msg.body)

    def on_sip(self, incoming: IncomingRequest) -> None:
        """Every request the receiving SIP endpoint gets: MESSAGEs are answered 200 and counted."""
        incoming.respond(200)
        row = self.current
        if row is not None and incoming.request.method == "MESSAGE":
            row.arrived(incoming.request.body.decode("utf-8", "replace"))

    # start and stop

    async def start(self) -> None:
        """Start Prosody, Kamailio, the gateway, the SIP endpoints and the XMPP clients, then the
        module's Kamailio if there is an anchor (without it if it does not come up)."""
        prosody = self.prosody = AnchorProsody()
        prosody.start()
        for index in range(1, self.users + 1):
            prosody.register(f"bob{index}", PASSWORD)
            prosody.register(f"carol{index}", PASSWORD)
        gateway_port = free_port()
        kamailio = self.kamailio = KamailioServer(gateway_port, trace=False, shm_mb=KAMAILIO_SHM_MB)
        kamailio.start()
        self._start_gateway(prosody, kamailio)
        wait_for_port(gateway_port, 30.0, self.gateway)

        listen = [f"udp:{LOOPBACK}:0"]
        self.sip_sender = Endpoint(listen, self.on_sip, outbound_proxy=kamailio.uri)
        self.sip_receiver = Endpoint(listen, self.on_sip, outbound_proxy=kamailio.uri)
        await self.sip_sender.start()
        await self.sip_receiver.start()
        for index in range(1, self.users + 1):
            await register_user(self.sip_receiver, f"alice{index}", SIP_DOMAIN)
        for name, group in (("bob", self.bobs), ("carol", self.carols)):
            for index in range(1, self.users + 1):
                client = RawXmppClient(f"{name}{index}", XMPP_DOMAIN, PASSWORD, self.on_xmpp)
                group.append(client)
                await client.login(LOOPBACK, prosody.c2s_port)
        await self._wait_for_link()
        if self.anchor is not None:
            print(await self._start_module(self.anchor, prosody), flush=True)

    async def _start_module(self, anchor: Anchor, prosody: ProsodyServer) -> str:
        """Start the module's Kamailio, register the aliceN there too and wait until a MESSAGE
        through it reaches XMPP; a line saying so, or why the module rows are left out."""
        module = ModuleKamailio(anchor, prosody.component_port)
        try:
            module.start()
            assert self.sip_receiver is not None
            for index in range(1, self.users + 1):
                await register_user(
                    self.sip_receiver, f"alice{index}", SIP_DOMAIN, registrar=module.peer
                )
        except (RuntimeError, TimeoutError, ConnectionError, SipError) as exc:
            why = f"{exc}; {module.log_tail(5)}"
            module.close()
            return f"Kamailio xmpp module did not start: {why}; gateway rows only"
        self.module = module
        probe = RowSpec(SIP_AT_MODULE, 1, 1, None, 1, timeout=2.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30.0
        while loop.time() < deadline:
            if (await run_row(self, probe, "probe")).delivered == 1:
                return f"Kamailio xmpp module up as component {MODULE_DOMAIN} at {module.uri}"
            if not module.process.running:
                break
        self.module = None
        why = module.log_tail(5)
        module.close()
        return f"Kamailio xmpp module: no message got through it ({why}); gateway rows only"

    def _start_gateway(self, prosody: ProsodyServer, kamailio: KamailioServer) -> None:
        db_url = f"sqlite:///{self.workdir / 'gateway.db'}"
        upgrade(db_url)
        # Default limits (DESIGN 8): what is beyond workers x max_jobs waits, nothing is refused.
        extra = ""
        config = self.workdir / "gateway.toml"
        config.write_text(gateway_toml(prosody, kamailio, db_url, extra))
        prefix: list[str] = []
        if self.profile is not None and self.profile_clock == "wall":
            prefix = ["-m", "cProfile", "-o", str(self.profile)]
        elif self.profile is not None:
            prefix = ["-m", "bench.load", "profile-gateway", str(self.profile)]
        # bench.load's profiler calls the CLI itself; python -m cProfile takes -m component.
        component = [] if prefix[1:2] == ["bench.load"] else ["-m", "component"]
        with (self.workdir / "gateway.log").open("wb") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, *prefix, *component, "run", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                start_new_session=True,  # stop() signals its whole group
            )

    async def _wait_for_link(self, timeout: float = 30.0) -> None:
        """Until the gateway's component answers a ping through Prosody."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await asyncio.wait_for(
                    self.carols[0].iq("get", COMPONENT_DOMAIN, "<ping xmlns='urn:xmpp:ping'/>"), 5
                )
                return
            except (ConnectionError, TimeoutError):
                if loop.time() > deadline:
                    raise RuntimeError("the gateway's XMPP link did not come up") from None
                if self.gateway is not None and self.gateway.poll() is not None:
                    raise RuntimeError(f"gateway exited with {self.gateway.returncode}") from None
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        """Stop everything that was started, in reverse order; never raises."""
        for task in self.sending:
            task.cancel()
        for client in [*self.bobs, *self.carols]:
            with contextlib.suppress(Exception):
                await client.close()
        for endpoint in (self.sip_sender, self.sip_receiver):
            if endpoint is not None:
                with contextlib.suppress(Exception):
                    await endpoint.close()
        self.stop_gateway()
        for server in (self.module, self.kamailio, self.prosody):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.close()

    def stop_gateway(self) -> None:
        """SIGTERM the gateway's process group, give it time to drain (and write its profile)."""
        proc = self.gateway
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        self.gateway = None

    # measuring

    def cpu(self) -> CpuSnapshot:
        """CPU seconds so far of the gateway, Prosody, Kamailio (all workers), this process and
        the module's Kamailio (all its processes)."""

        def pid(proc: subprocess.Popen[bytes] | None) -> int:
            return proc.pid if proc is not None else -1

        prosody = self.prosody.process.proc if self.prosody else None
        kamailio = self.kamailio.process.proc if self.kamailio else None
        module = self.module.process.proc if self.module else None
        return CpuSnapshot(
            proc_cpu_seconds(pid(self.gateway)),
            proc_cpu_seconds(pid(prosody)),
            group_cpu_seconds(pid(kamailio)),
            time.process_time(),
            group_cpu_seconds(pid(module)) if module is not None else 0.0,
        )

    def element_peer(self, path: MessagePath) -> Peer | None:
        """Where a SIP request of ``path`` is sent: straight to the gateway or the module, or
        None for the SIP sender's outbound proxy (the Kamailio in front of the gateway)."""
        if path is SIP_AT_GATEWAY and self.kamailio is not None:
            return Peer("udp", LOOPBACK, self.kamailio.gateway_port)
        if path is SIP_AT_MODULE and self.module is not None:
            return self.module.peer
        return None

    def sender_for(
        self, path: MessagePath, row: ActiveRow, conversations: int
    ) -> Callable[[int], None]:
        """A function that sends message ``seq`` of ``row`` along ``path`` without waiting,
        from sender ``n`` to receiver ``n`` for ``n = seq % conversations``."""

        def body(seq: int) -> str:
            return f"{message_tag(row.tag, seq)} {BODY_TEXT}"

        if path not in SIP_PATHS:
            to_domain = {
                XMPP_DIRECT: XMPP_DOMAIN,
                XMPP_TO_MODULE: f"{SIP_DOMAIN}@{MODULE_DOMAIN}",
            }.get(path, COMPONENT_DOMAIN)
            target = "bob" if path is XMPP_DIRECT else "alice"
            separator = "*" if path is XMPP_TO_MODULE else "@"

            def send_xmpp(seq: int) -> None:
                n = seq % conversations
                to = f"{target}{n + 1}{separator}{to_domain}"
                sender = self.carols[0 if path is XMPP_BURST else n]
                sender.send_chat(to, message_tag(row.tag, seq), body(seq))

            return send_xmpp

        endpoint = self.sip_sender
        assert endpoint is not None
        peer = self.element_peer(path)
        to_domain = MODULE_DOMAIN if path is SIP_AT_MODULE else JDOMAIN

        def send_sip(seq: int) -> None:
            n = seq % conversations + 1
            if path is SIP_DIRECT:
                to = f"sip:alice{n}@{SIP_DOMAIN}"
            else:
                to = f"sip:bob{n}*{XMPP_DOMAIN}@{to_domain}"
            request = sip_message(f"sip:dave{n}@{SIP_DOMAIN}", to, body(seq))
            task = asyncio.ensure_future(self._sip_request(endpoint, request, peer, row, seq))
            self.sending.add(task)
            task.add_done_callback(self.sending.discard)

        return send_sip

    @staticmethod
    async def _sip_request(
        endpoint: Endpoint, request: SipRequest, peer: Peer | None, row: ActiveRow, seq: int
    ) -> None:
        try:
            response = await endpoint.request(request, peer)
        except SipError as exc:
            row.failed(seq, type(exc).__name__)
            return
        if response.status >= 300:
            row.failed(seq, f"SIP {response.status}")


# --- running the rows ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowSpec:
    """What one row does: path, message count, window, rate (None: as fast as possible), the
    number of conversations the messages are spread over, and how long it may take."""

    path: MessagePath
    count: int
    window: int
    rate: float | None
    conversations: int
    timeout: float

    @property
    def mode(self) -> str:
        """The mode column: steady N/s or max with the window."""
        return f"steady {self.rate:g}/s" if self.rate else f"max x{self.window}"


async def run_row(world: World, spec: RowSpec, tag: str) -> RowResult:
    """Send ``spec.count`` messages along the path and wait (bounded) for them to settle."""
    row = ActiveRow(tag, spec.count, spec.window)
    send = world.sender_for(spec.path, row, spec.conversations)
    tracker = row.tracker
    world.current = row
    cpu0 = world.cpu()
    start = time.perf_counter()
    deadline = start + spec.timeout
    try:
        for seq in range(spec.count):
            try:
                await asyncio.wait_for(row.window.acquire(), deadline - time.perf_counter())
            except TimeoutError:
                break
            delay = send_delay(seq, start, spec.rate, time.perf_counter())
            if delay > 0:
                await asyncio.sleep(delay)
            tracker.on_sent(seq, time.perf_counter())
            try:
                send(seq)
            except ConnectionError as exc:
                row.failed(seq, str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(row.finished.wait(), max(deadline - time.perf_counter(), 0))
        now = time.perf_counter()
        cpu = world.cpu().minus(cpu0)
        # The SIP senders wait for their final responses; those are due by now.
        if world.sending:
            await asyncio.wait(set(world.sending), timeout=5.0)
    finally:
        world.current = None
    rss = proc_rss_bytes(world.gateway.pid) if world.gateway is not None else 0
    notes = ", ".join(f"{why} x{n}" for why, n in row.statuses.most_common(3))
    if not tracker.done:
        notes = ", ".join(filter(None, [f"timeout after {spec.timeout:.0f}s", notes]))
    return RowResult(
        spec.path,
        spec.mode,
        spec.conversations,
        tracker.sent,
        tracker.arrived,
        tracker.failed,
        tracker.duration(now),
        percentile(tracker.latencies, 0.50),
        percentile(tracker.latencies, 0.99),
        cpu,
        rss,
        inversions(row.arrivals, spec.conversations),
        notes,
    )


def row_specs(args: argparse.Namespace, module: bool) -> list[RowSpec]:
    """The rows ``args.paths`` asks for, each load on the gateway then (if ``module``) on the
    module: a steady row at ``args.rate`` and a max-rate row per path, XMPP -> SIP also over one
    conversation, then the burst."""
    conversations = args.conversations

    def steady(path: MessagePath) -> RowSpec:
        count = args.steady_count
        return RowSpec(
            path, count, args.concurrency, args.rate, conversations, count / args.rate + 30
        )

    def full(path: MessagePath, conv: int = conversations) -> RowSpec:
        # Bounded even if the path crawls: at least 50 messages per second or the row ends.
        return RowSpec(path, args.count, args.concurrency, None, conv, args.count / 50 + 30.0)

    specs: list[RowSpec] = []
    if args.paths in ("all", "direct"):
        for path in (XMPP_DIRECT, SIP_DIRECT):
            specs += [steady(path), full(path)]
    if args.paths in ("all", "gateway"):
        specs += [steady(SIP_TO_XMPP), full(SIP_TO_XMPP)]
        for pair in PAIRS:
            elements = pair if module else pair[:1]
            specs += [steady(p) for p in elements] + [full(p) for p in elements]
        elements = PAIRS[1] if module else PAIRS[1][:1]
        specs += [full(p, 1) for p in elements]
    if args.paths in ("all", "gateway", "burst") and args.burst:
        # The whole burst at once: the window is the burst.
        burst = args.burst
        specs.append(RowSpec(XMPP_BURST, burst, burst, None, conversations, burst / 50 + 30))
    return specs


async def run_all(world: World, specs: list[RowSpec]) -> list[RowResult]:
    """Warm each path up (unmeasured), then run its rows; a path that fails to warm up is
    skipped with a note."""
    results: list[RowResult] = []
    warmed: dict[MessagePath, RowResult] = {}
    for number, spec in enumerate(specs, 1):
        if spec.path not in warmed:
            warm = RowSpec(spec.path, WARMUP_COUNT, 10, None, spec.conversations, timeout=30.0)
            warmed[spec.path] = await run_row(world, warm, f"w{number}")
            print(f"warm-up {spec.path.name}: {warmed[spec.path].delivered}/{WARMUP_COUNT}")
        if warmed[spec.path].delivered == 0:
            continue
        result = await run_row(world, spec, f"r{number}")
        print(
            f"  {result.path.name:<29} {result.mode:<14} x{result.conversations:<3} "
            f"{result.delivered}/{result.sent} in {result.seconds:.2f}s {result.notes}",
            flush=True,
        )
        results.append(result)
    return results


async def run_sipp_rows(world: World, args: argparse.Namespace) -> list[SippResult]:
    """SIPp straight at the gateway and at the module: ``--sipp-rate`` for ``--sipp-count``
    messages, then a steady ``--rate``; each run's messages counted as they reach XMPP."""
    loads = [(args.sipp_rate, args.sipp_count), (args.rate, args.sipp_steady_count)]
    paths = [SIP_AT_GATEWAY, SIP_AT_MODULE] if world.module is not None else [SIP_AT_GATEWAY]
    results: list[SippResult] = []
    for rate, count in loads:
        if count == 0:
            continue
        for path in paths:
            peer = world.element_peer(path)
            assert peer is not None
            tag = f"p{len(results) + 1}"
            load = SippLoad(
                peer,
                f"bob1*{XMPP_DOMAIN}",
                MODULE_DOMAIN if path is SIP_AT_MODULE else JDOMAIN,
                "dave1",
                SIP_DOMAIN,
                tag,
                rate,
                count,
                timeout=count / rate + 30.0,
            )
            counted = world.current = CountedRow(tag)
            cpu0 = world.cpu()
            try:
                stats, why = await run_sipp(load, world.workdir)
                # What was answered should reach XMPP within moments.
                answered = stats.successful if stats is not None else 0
                for _ in range(50):
                    if len(counted.seen) >= answered:
                        break
                    await asyncio.sleep(0.1)
                cpu = world.cpu().minus(cpu0)
            finally:
                world.current = None
            result = SippResult(path, rate, count, stats, len(counted.seen), cpu, why)
            print(f"  SIPp {path.name:<24} {result.mode:<18} {result.notes_line()}", flush=True)
            results.append(result)
    return results


async def idle_line(world: World, seconds: float = 2.0) -> str:
    """What the idle gateway costs: CPU per second of wall time with no traffic, and its RSS."""
    before = world.cpu()
    await asyncio.sleep(seconds)
    used = world.cpu().minus(before).gateway
    rss = proc_rss_bytes(world.gateway.pid) if world.gateway is not None else 0
    return f"gateway idle: {used / seconds * 1e3:.0f} ms CPU per s, RSS {rss / 2**20:.0f} MB"


async def bench(
    args: argparse.Namespace, workdir: Path, anchor: Anchor | None
) -> tuple[list[RowResult], list[SippResult]]:
    """Start the world, run every row, stop the world (also on failure or cancellation)."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    world = World(
        users=args.conversations,
        workdir=workdir,
        anchor=anchor,
        profile=Path(args.profile).resolve() if args.profile else None,
        profile_clock=args.profile_clock,
        concurrency=args.concurrency,
    )
    # Last resort if this process dies without unwinding: the harness reaps its servers.
    atexit.register(process.stop_all)
    atexit.register(world.stop_gateway)
    try:
        began = time.perf_counter()
        await world.start()
        print(f"servers, gateway and clients up in {time.perf_counter() - began:.1f}s", flush=True)
        print(await idle_line(world), flush=True)
        rows = await run_all(world, row_specs(args, world.module is not None))
        sipp: list[SippResult] = []
        if args.paths in ("all", "gateway", "sipp"):
            if sipp_available():
                sipp = await run_sipp_rows(world, args)
            else:
                print("SIPp (sipp) is not installed: no SIPp rows", flush=True)
        return rows, sipp
    finally:
        await world.close()
        print(log_summary(workdir / "gateway.log"), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller counts: 300 per row, 200 per steady row, SIPp 3000 and 400",
    )
    parser.add_argument("--count", type=int, help="messages per max-rate row (default 3000)")
    parser.add_argument("--steady-count", type=int, help="messages per steady row (default 1000)")
    parser.add_argument("--concurrency", type=int, default=50, help="messages in flight")
    parser.add_argument("--rate", type=float, default=200.0, help="steady rows: messages/s")
    parser.add_argument(
        "--conversations", type=int, default=10, help="users on each side, one conversation each"
    )
    parser.add_argument(
        "--paths",
        choices=["all", "gateway", "direct", "burst", "sipp"],
        default="all",
        help="which rows to run (gateway: the gateway's and the module's)",
    )
    parser.add_argument(
        "--burst", type=int, default=200, help="one XMPP user's burst to SIP (0: no burst row)"
    )
    parser.add_argument("--sipp-rate", type=float, default=6000.0, help="SIPp's offered rate")
    parser.add_argument(
        "--sipp-count",
        type=int,
        help="messages SIPp offers at --sipp-rate (default 15000, 0: none)",
    )
    parser.add_argument(
        "--sipp-steady-count",
        type=int,
        help="messages SIPp sends at the steady --rate (default 2000, 0: none)",
    )
    parser.add_argument(
        "--anchor-dir",
        type=Path,
        default=DEFAULT_ANCHOR_DIR,
        help="the anchor with build.sh and kamailio-xmpp.cfg (default: "
        "../shared/anchors/kamailio-xmpp from the repository root)",
    )
    parser.add_argument("--no-module", action="store_true", help="leave Kamailio's xmpp module out")
    parser.add_argument("--profile", metavar="FILE", help="run the gateway under cProfile")
    parser.add_argument(
        "--profile-clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="cpu: main-thread CPU time (default); wall: plain python -m cProfile",
    )
    args = parser.parse_args(argv)
    for name, full, quick in (
        ("count", 3000, 300),
        ("steady_count", 1000, 200),
        ("sipp_count", 15000, 3000),
        ("sipp_steady_count", 2000, 400),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.count, args.steady_count, args.concurrency, args.conversations) < 1:
        parser.error("--count, --steady-count, --concurrency and --conversations must be positive")
    if args.rate <= 0 or args.sipp_rate <= 0 or args.burst < 0:
        parser.error("--rate and --sipp-rate must be positive, --burst not negative")
    if min(args.sipp_count, args.sipp_steady_count) < 0:
        parser.error("--sipp-count and --sipp-steady-count must not be negative")
    # The endpoints log each start and close at info; keep the output to the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(machine_line(), flush=True)
    anchor: Anchor | None = None
    if args.no_module:
        print("Kamailio xmpp module: left out (--no-module)", flush=True)
    else:
        anchor, said = find_or_build(args.anchor_dir.resolve(), cache_dir())
        print(said, flush=True)
    with tempfile.TemporaryDirectory(prefix="sipxmpp-bench-") as tmp:
        try:
            rows, sipp = asyncio.run(bench(args, Path(tmp), anchor))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted; every process was stopped", file=sys.stderr)
            return 130
    print()
    print(format_table(rows))
    comparison = format_comparison(rows)
    if comparison:
        print(
            "\nthe gateway beside Kamailio's xmpp module (CPU: the gateway process; all of "
            "the module's Kamailio)"
        )
        print(comparison)
    if sipp:
        print("\nSIPp straight at each element")
        print(format_sipp(sipp))
    print(machine_line())
    if args.profile:
        print(profile_summary(Path(args.profile)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
