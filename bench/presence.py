"""Benchmark of presence: fan-out to SIP watchers, memory per subscription, restart resume.

Run ``python -m bench.presence [--quick]``. It starts Prosody and the gateway as its own process
(``python -m component run``, SQLite store in a temp dir) on loopback, with the gateway's
``sip.proxy`` pointing at a stand-in presence server in this process, and measures:

1. Fan-out (DESIGN 5.2): XMPP user ``bob<N>`` has N SIP watchers (``sip:w<N>x<i>@sip.test``
   subscribed to ``sip:bob<N>*xmpp.test@jabber.sip.test``, approvals pre-seeded in the store
   and in Prosody's roster). bob changes his status; the row is the time from his presence
   stanza until every watcher has answered its NOTIFY, NOTIFYs/s, CPU per NOTIFY and the p50/p99
   delay per watcher. The ``direct`` row is the limit: a plain sipside endpoint in its own
   process sends the same N NOTIFYs (same body size) to the same watcher socket, as many in
   flight as the gateway allows itself (more only overflow the watchers' receive buffer).
2. Memory per stored subscription: the gateway's RSS and the SQLite file before and after
   creating N SIP-watcher subscriptions, then N XMPP-watcher subscriptions (XMPP users
   ``x<u>`` subscribe to SIP users; the gateway SUBSCRIBEs through the stand-in). For SIP
   watchers RSS is read twice: once the gateway is quiet (the SUBSCRIBEs' transactions still
   held for Timer J) and 34 s later, when only the subscriptions are left ("idle").
3. Restart: SIGTERM, then the stored XMPP-watcher subscriptions are made overdue (as after a
   long outage: their ``refresh_at`` is moved into the past), then the gateway starts again on
   the same database. Reported: time to the first OPTIONS answer and to the ``presence_resumed``
   log line, and the refresh SUBSCRIBEs per second arriving at the stand-in (DESIGN 5.3 says
   they are spread out: the peak second and the window), and the RSS after resume less the
   RSS before any subscription, per stored subscription. ``--stored N`` copies stored
   SIP-watcher rows (new watchers and Call-IDs) before the restart until N are stored, to
   resume more subscriptions than the phases above create.

Every phase has a count and a timeout. CPU is read from /proc (``bench.load``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from bench.load import (
    log_summary,
    machine_line,
    proc_cpu_seconds,
    proc_rss_bytes,
    profile_summary,
)
from bench.presence_load import (
    FANOUT_HEADER,
    MEMORY_HEADER,
    FanoutRow,
    MemoryRow,
    PresenceClient,
    PresenceServerStandIn,
    RestartResult,
    Round,
    WatcherPool,
    add_stored_sip_watchers,
    format_table,
    log_event_time,
    make_refreshes_overdue,
    options_answered,
    seed_prosody_user,
    stored_counts,
)
from component.runtime.presence_driver import MAX_IN_FLIGHT
from component.store import ApprovalDirection, ApprovalState, RosterApproval
from component.store.migrate import upgrade
from component.store.store import Store
from sipside.peer import Peer
from tests.harness import process
from tests.harness.ports import free_port
from tests.harness.prosody import ProsodyServer
from tests.harness.values import (
    COMPONENT_DOMAIN,
    COMPONENT_SECRET,
    JDOMAIN,
    LOOPBACK,
    SIP_DOMAIN,
    XMPP_DOMAIN,
)

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "password"
SUBSCRIBE_WINDOW = 200  # SUBSCRIBEs in flight while the watchers are created
DIRECT_WINDOW = MAX_IN_FLIGHT  # NOTIFYs in flight in the direct row: the gateway's bound
CONTACTS_PER_XMPP_USER = 100  # keeps each Prosody roster (rewritten per change) small
TIMER_J = 32.0  # seconds a UDP server transaction outlives its answer (RFC 3261 17.2.2)
XMPP_BURST_FACTOR = 10  # limits.xmpp_burst and xmpp_rate: the largest fan-out times this


class WritingProsody(ProsodyServer):
    """Prosody as the README tells operators with large rosters to run it: a broadcast's
    stanzas are written as they are made (``opportunistic_writes``)."""

    opportunistic_writes = True


@dataclass(frozen=True, slots=True)
class Sizes:
    """Counts of one run."""

    fanout: tuple[int, ...]
    rounds: int
    xmpp_watchers: int
    stored: int = 0  # subscriptions stored at the restart: SIP-watcher rows copied up to it


# --- the world -----------------------------------------------------------------------------------


def gateway_config(
    xmpp: ProsodyServer, sip_port: int, proxy: str, db_url: str, xmpp_burst: int
) -> str:
    """gateway.toml (DESIGN 9 keys) for this run: Prosody, our SIP port, the stand-in proxy.

    One status change reaches the gateway as one stanza per watcher, all from the same sender,
    and so do the server's answers to the probes sent for new watchers. The per-sender XMPP
    limit (``limits.xmpp_rate``, ``xmpp_burst``) counts such broadcasts per sender and
    recipient; the benchmark still sets it out of the way, so that it measures the presence
    path alone.
    """
    return f"""\
[xmpp]
component = "{COMPONENT_DOMAIN}"
host = "{LOOPBACK}"
port = {xmpp.component_port}
secret = "{COMPONENT_SECRET}"

[sip]
listen = ["udp:{LOOPBACK}:{sip_port}"]
domain = "{SIP_DOMAIN}"
jdomain = "{JDOMAIN}"
delimiter = "*"
proxy = "{proxy}"
registrar = "sip:jabber_gateway@{SIP_DOMAIN}"
trusted = ["127.0.0.0/8"]

[database]
url = "{db_url}"

[limits]
xmpp_rate = {float(xmpp_burst)}
xmpp_burst = {xmpp_burst}
"""


def watcher_users(n: int) -> list[str]:
    """The SIP user parts of bob<n>'s watchers."""
    return [f"w{n}x{i}" for i in range(n)]


@dataclass
class World:
    """Prosody, the gateway process, the watchers, the stand-in and the XMPP clients."""

    sizes: Sizes
    workdir: Path
    prosody: ProsodyServer | None = None
    gateway: subprocess.Popen[bytes] | None = None
    gateway_started_at: float = 0.0
    options_seconds: float = 0.0  # spawn -> first OPTIONS answer, of the latest start
    rss_empty: int = 0  # the gateway's RSS once started and logged in, no subscription yet
    profile: Path | None = None  # cProfile output of the first gateway process
    sip_port: int = 0
    watchers: WatcherPool = field(default_factory=WatcherPool)
    standin: PresenceServerStandIn = field(default_factory=PresenceServerStandIn)
    bobs: dict[int, PresenceClient] = field(default_factory=dict)
    xusers: list[PresenceClient] = field(default_factory=list)

    @property
    def db_path(self) -> Path:
        """The gateway's SQLite file."""
        return self.workdir / "gateway.db"

    @property
    def log_path(self) -> Path:
        """The gateway's JSON log."""
        return self.workdir / "gateway.log"

    @property
    def gateway_peer(self) -> Peer:
        """The gateway's SIP address."""
        return Peer("udp", LOOPBACK, self.sip_port)

    def xmpp_user_count(self) -> int:
        """XMPP users needed for the XMPP-watcher subscriptions."""
        return -(-self.sizes.xmpp_watchers // CONTACTS_PER_XMPP_USER)

    async def start(self) -> None:
        """Seed Prosody and the store, start Prosody, the SIP sockets, the gateway, log in."""
        prosody = self.prosody = WritingProsody()
        for n in self.sizes.fanout:
            contacts = [f"{u}@{COMPONENT_DOMAIN}" for u in watcher_users(n)]
            seed_prosody_user(prosody, f"bob{n}", PASSWORD, contacts)
        for u in range(self.xmpp_user_count()):
            seed_prosody_user(prosody, f"x{u}", PASSWORD)
        prosody.start()
        await self._seed_approvals()
        await self.watchers.start()
        await self.standin.start()
        self.sip_port = free_port()
        config = self.workdir / "gateway.toml"
        db_url = f"sqlite:///{self.db_path}"
        burst = XMPP_BURST_FACTOR * max(self.sizes.fanout)
        config.write_text(gateway_config(prosody, self.sip_port, self.standin.uri, db_url, burst))
        await self.start_gateway(config)
        # The first bob also tells us when the component link is up.
        first = self.sizes.fanout[0]
        self.bobs[first] = await self._login(f"bob{first}")
        await self._wait_for_link(self.bobs[first])
        for n in self.sizes.fanout[1:]:
            self.bobs[n] = await self._login(f"bob{n}")

    async def _seed_approvals(self) -> None:
        """bob<n> approved each of his watchers (DESIGN 5.2), written before the gateway runs."""
        db_url = f"sqlite:///{self.db_path}"
        upgrade(db_url)
        store = await Store.open(db_url)
        began = time.perf_counter()
        try:
            now = time.time()
            for n in self.sizes.fanout:
                for user in watcher_users(n):
                    await store.save_approval(
                        RosterApproval(
                            f"{user}@{COMPONENT_DOMAIN}",
                            f"bob{n}@{XMPP_DOMAIN}",
                            ApprovalDirection.SIP_WATCHES_XMPP,
                            ApprovalState.APPROVED,
                            now,
                        )
                    )
        finally:
            await store.close()
        total = sum(self.sizes.fanout)
        print(f"seeded {total} approvals in {time.perf_counter() - began:.1f}s", flush=True)

    async def _login(self, user: str) -> PresenceClient:
        assert self.prosody is not None
        client = PresenceClient(user, XMPP_DOMAIN, PASSWORD)
        await client.login(LOOPBACK, self.prosody.c2s_port, timeout=60.0)
        return client

    async def start_gateway(self, config: Path) -> None:
        """Spawn ``python -m component run`` and wait until its SIP port answers OPTIONS."""
        command = ["-m", "component", "run", "-c", str(config)]
        if self.profile is not None:
            # CPU-clock profiler of bench.load; the restarted gateway runs without it.
            command = ["-m", "bench.load", "profile-gateway", str(self.profile), *command[2:]]
            self.profile = None
        with self.log_path.open("ab") as log:
            self.gateway_started_at = time.time()
            self.gateway = subprocess.Popen(
                [sys.executable, *command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                start_new_session=True,
            )
        self.options_seconds = await self.wait_for_options(30.0)

    async def wait_for_options(self, timeout: float) -> float:
        """Poll OPTIONS until the gateway answers; seconds since it was spawned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.gateway is not None and self.gateway.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.gateway.returncode}")
            if await options_answered(self.watchers.endpoint, self.gateway_peer, 0.2):
                return time.time() - self.gateway_started_at
            await asyncio.sleep(0.02)
        raise RuntimeError("the gateway's SIP port did not answer OPTIONS")

    async def _wait_for_link(self, client: PresenceClient, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ping = "<ping xmlns='urn:xmpp:ping'/>"
                await asyncio.wait_for(client.iq("get", COMPONENT_DOMAIN, ping), 5)
                return
            except (ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway's XMPP link did not come up") from None
                await asyncio.sleep(0.2)

    def stop_gateway(self) -> float:
        """SIGTERM the gateway's group and wait for it (bounded); seconds it took."""
        proc = self.gateway
        if proc is None:
            return 0.0
        began = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        self.gateway = None
        return time.perf_counter() - began

    async def close(self) -> None:
        """Stop everything that was started; never raises."""
        # The gateway first: logging the XMPP users out would start a fan-out of NOTIFYs.
        self.stop_gateway()
        for client in [*self.bobs.values(), *self.xusers]:
            with contextlib.suppress(Exception):
                await client.close()
        for closer in (self.watchers.close, self.standin.close):
            with contextlib.suppress(Exception):
                await closer()
        if self.prosody is not None:
            with contextlib.suppress(Exception):
                self.prosody.close()

    # --- readings ------------------------------------------------------------------------------

    def gateway_cpu(self) -> float:
        """CPU seconds of the gateway process so far."""
        return proc_cpu_seconds(self.gateway.pid) if self.gateway is not None else 0.0

    def prosody_cpu(self) -> float:
        """CPU seconds of Prosody so far."""
        proc = self.prosody.process.proc if self.prosody is not None else None
        return proc_cpu_seconds(proc.pid) if proc is not None else 0.0

    def gateway_rss(self) -> int:
        """The gateway's resident set size."""
        return proc_rss_bytes(self.gateway.pid) if self.gateway is not None else 0

    def db_bytes(self) -> int:
        """The SQLite file after a WAL checkpoint (the WAL holds recent pages until then)."""
        with contextlib.closing(sqlite3.connect(self.db_path, timeout=30)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return self.db_path.stat().st_size

    async def settle(self, timeout: float, quiet: float = 1.0) -> bool:
        """Wait until the gateway is idle (little CPU, no NOTIFY) for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        step = 0.25
        calm = 0.0
        cpu = self.gateway_cpu()
        while time.monotonic() < deadline:
            await asyncio.sleep(step)
            now_cpu = self.gateway_cpu()
            busy = now_cpu - cpu > step * 0.1
            busy = busy or time.perf_counter() - self.watchers.last_notify_at < step
            cpu = now_cpu
            calm = 0.0 if busy else calm + step
            if calm >= quiet:
                return True
        return False


# --- phase 1: fan-out ----------------------------------------------------------------------------


async def create_watchers(world: World, n: int, timeout: float) -> tuple[MemoryRow, Counter[str]]:
    """Subscribe bob<n>'s N watchers; the RSS/DB growth is the SIP-watcher memory row."""
    rss0, db0 = world.gateway_rss(), world.db_bytes()
    began = time.perf_counter()
    target = f"sip:bob{n}*{XMPP_DOMAIN}@{JDOMAIN}"
    outcomes = await world.watchers.subscribe_all(
        watcher_users(n), target, world.gateway_peer, SUBSCRIBE_WINDOW, timeout
    )
    seconds = time.perf_counter() - began
    settled = await world.settle(timeout)
    rss_busy = world.gateway_rss()
    # The SUBSCRIBEs' server transactions live on for Timer J (64*T1 = 32 s over UDP): what
    # the stored subscriptions keep is read after it.
    await asyncio.sleep(TIMER_J + 2.0)
    notes = ", ".join(f"{k} x{v}" for k, v in outcomes.most_common() if v)
    if not settled:
        notes += ", still busy"
    row = MemoryRow(
        "SIP watcher (5.2)",
        n,
        outcomes["202"],
        seconds,
        rss0,
        rss_busy,
        db0,
        world.db_bytes(),
        notes,
        rss_idle=world.gateway_rss(),
    )
    return row, outcomes


def _first_note(arrived: Iterable[float], t0: float) -> str:
    """When the first watcher had its NOTIFY: what comes before the fan-out itself."""
    first = min(arrived, default=None)
    return "none arrived" if first is None else f"first after {(first - t0) * 1e3:.0f} ms"


async def fanout_round(world: World, n: int, number: int, timeout: float) -> FanoutRow:
    """bob<n> goes away with a marked status; wait until every watcher saw the mark."""
    marker = f"fan{number:03d}n{n}"
    row = world.watchers.round_for(set(watcher_users(n)), marker.encode())
    world.watchers.current = row
    bob = world.bobs[n]
    cpu0, pcpu0 = world.gateway_cpu(), world.prosody_cpu()
    bench0 = time.process_time()
    t0 = time.perf_counter()
    bob.send_presence(inner=f"<show>away</show><status>{marker}</status>")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(row.done.wait(), timeout)
    end = max(row.arrived.values(), default=t0)
    # The CPU column includes the tail of the work (the 200s, the store writes) until idle.
    await world.settle(timeout=60.0)
    world.watchers.current = None
    notes = _first_note(row.arrived.values(), t0)
    if not row.done.is_set():
        notes += f"; timeout after {timeout:.0f}s"
    return FanoutRow(
        "bob -> gw -> N watchers",
        len(row.expected),
        len(row.arrived),
        end - t0,
        [at - t0 for at in row.arrived.values()],
        world.gateway_cpu() - cpu0,
        world.prosody_cpu() - pcpu0,
        time.process_time() - bench0,
        notes,
    )


async def direct_round(world: World, n: int, number: int, timeout: float) -> FanoutRow:
    """The same N NOTIFYs from a plain sipside endpoint in its own process (the limit)."""
    marker = f"fan{number:03d}n{n}"
    users = watcher_users(n)
    call_ids = [f"direct-{number}-{i}" for i in range(n)]
    # Same body bytes as the gateway sent, with a mark of the same length.
    sample = world.watchers.last_body or b"x" * 400
    old = sample[sample.find(b"fan") : sample.find(b"fan") + len(marker)]
    body = sample.replace(old, marker.encode()) if old.startswith(b"fan") else marker.encode()
    job = world.workdir / f"direct-{number}.json"
    job.write_text(json.dumps({"users": users, "call_ids": call_ids, "body": body.decode()}))
    sender = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.presence_load",
            "send-notifies",
            world.watchers.peer.hostport(),
            str(DIRECT_WINDOW),
            str(job),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert sender.stdin is not None and sender.stdout is not None
    loop = asyncio.get_running_loop()
    ready = await loop.run_in_executor(None, sender.stdout.readline)
    if ready.strip() != b"ready":
        raise RuntimeError(f"direct sender did not start: {ready!r}")
    row = Round(marker.encode(), {cid: i for i, cid in enumerate(call_ids)})
    world.watchers.current = row
    bench0 = time.process_time()
    t0 = time.perf_counter()
    sender.stdin.write(b"go\n")
    sender.stdin.flush()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(row.done.wait(), timeout)
    end = max(row.arrived.values(), default=t0)
    bench_cpu = time.process_time() - bench0
    world.watchers.current = None
    try:
        line = await asyncio.wait_for(loop.run_in_executor(None, sender.stdout.readline), 30)
        report: dict[str, float] = json.loads(line)
    except (TimeoutError, ValueError):
        report = {}
    with contextlib.suppress(subprocess.TimeoutExpired):
        sender.wait(10)
    if sender.poll() is None:
        sender.kill()
        sender.wait(5)
    notes = (
        f"{_first_note(row.arrived.values(), t0)}; window {DIRECT_WINDOW}; "
        f"watchers' CPU {bench_cpu / max(len(row.arrived), 1) * 1e6:.0f} us"
    )
    if report.get("failed"):
        notes += f"; {report['failed']:.0f} failed"
    if not row.done.is_set():
        notes += f"; timeout after {timeout:.0f}s"
    return FanoutRow(
        "direct endpoint -> N watchers",
        n,
        len(row.arrived),
        end - t0,
        [at - t0 for at in row.arrived.values()],
        None,
        None,
        report.get("cpu"),
        notes,
    )


# --- phase 2b: XMPP watchers ---------------------------------------------------------------------


async def create_xmpp_watchers(world: World, timeout: float) -> MemoryRow:
    """XMPP users x<u> subscribe to SIP users s<j>; the gateway SUBSCRIBEs via the stand-in."""
    total = world.sizes.xmpp_watchers
    for u in range(world.xmpp_user_count()):
        world.xusers.append(await world._login(f"x{u}"))
    await world.settle(timeout=30.0)
    rss0, db0 = world.gateway_rss(), world.db_bytes()
    began = time.perf_counter()
    for j in range(total):
        client = world.xusers[j // CONTACTS_PER_XMPP_USER]
        client.send_presence(to=f"s{j}@{COMPONENT_DOMAIN}", ptype="subscribe")
        if j % 500 == 499:
            await asyncio.sleep(0)  # let the socket drain; Prosody reads at its own pace

    def granted() -> int:
        # The first presence of a SIP user follows the gateway's "subscribed" (DESIGN 5.3).
        suffix = f"@{COMPONENT_DOMAIN}"
        return sum(sum(1 for jid in c.presence_from if jid.endswith(suffix)) for c in world.xusers)

    deadline = time.monotonic() + timeout
    while granted() < total and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    seconds = time.perf_counter() - began
    done = granted()
    settled = await world.settle(timeout=60.0)
    seen = sum((c.presence_in for c in world.xusers), Counter[str]())
    notes = (
        f"stand-in got {world.standin.initial} SUBSCRIBEs, its NOTIFYs: "
        f"{dict(world.standin.notify_outcomes)}; XMPP users got {dict(seen)}"
    )
    if done < total:
        notes += f", timeout after {timeout:.0f}s"
    if not settled:
        notes += ", still busy"
    return MemoryRow(
        "XMPP watcher (5.3)",
        total,
        done,
        seconds,
        rss0,
        world.gateway_rss(),
        db0,
        world.db_bytes(),
        notes,
    )


# --- phase 3: restart ----------------------------------------------------------------------------


async def restart(world: World, timeout: float) -> RestartResult:
    """SIGTERM, make the XMPP-watcher refreshes overdue, start again, watch the refreshes."""
    stop_seconds = world.stop_gateway()
    stored_sip, stored_xmpp = stored_counts(world.db_path)
    added = add_stored_sip_watchers(world.db_path, world.sizes.stored - stored_sip - stored_xmpp)
    stored_sip += added
    made_due = make_refreshes_overdue(world.db_path, time.time() - 3600.0)
    world.standin.refresh_times.clear()
    notifies_before = world.watchers.notifies
    await world.start_gateway(world.workdir / "gateway.toml")
    options = world.options_seconds
    origin = world.gateway_started_at
    deadline = time.monotonic() + timeout
    resumed: tuple[float, dict[str, object]] | None = None
    while time.monotonic() < deadline:
        resumed = resumed or log_event_time(world.log_path, "presence_resumed", origin)
        if resumed is not None and len(world.standin.refresh_times) >= made_due:
            break
        await asyncio.sleep(0.25)
    await world.settle(timeout=60.0)
    counts = "-"
    if resumed is not None:
        fields = resumed[1]
        counts = f"{fields.get('sip_watchers')} SIP, {fields.get('xmpp_watchers')} XMPP watchers"
    notes = (
        f"{made_due} made overdue; watchers got {world.watchers.notifies - notifies_before} NOTIFYs"
    )
    if added:
        notes += f"; {added} SIP-watcher rows copied into the store before the restart"
    return RestartResult(
        stored_sip,
        stored_xmpp,
        stop_seconds,
        options,
        None if resumed is None else resumed[0] - origin,
        counts,
        list(world.standin.refresh_times),
        origin,
        world.gateway_rss(),
        notes,
        rss_empty=world.rss_empty,
    )


# --- running it ----------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything measured, printed at the end (also after a failure, as far as it got)."""

    fanout: list[FanoutRow] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    restart: RestartResult | None = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The three tables."""
        parts = [
            "1. fan-out: bob changes status -> N NOTIFYs answered",
            format_table(FANOUT_HEADER, [r.cells() for r in self.fanout]),
            "",
            "2. memory per stored subscription",
            format_table(MEMORY_HEADER, [r.cells() for r in self.memory]),
            "",
            "3. restart",
            self.restart.lines() if self.restart else "(not reached)",
        ]
        return "\n".join([*parts, *self.notes])


def _step(text: str) -> Callable[[], None]:
    began = time.perf_counter()
    print(f"... {text}", flush=True)

    def done() -> None:
        print(f"    done in {time.perf_counter() - began:.1f}s", flush=True)

    return done


async def bench(sizes: Sizes, workdir: Path, report: Report, profile: Path | None) -> None:
    """Start the world, run the three phases into ``report``, stop the world."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    world = World(sizes, workdir, profile=profile)
    atexit.register(process.stop_all)
    atexit.register(world.stop_gateway)
    try:
        done = _step("starting Prosody (seeded rosters) and the gateway")
        await world.start()
        settled = await world.settle(timeout=120.0)
        world.rss_empty = world.gateway_rss()
        done()
        if not settled:
            report.notes.append("note: the gateway was still busy after the logins")
        # Biggest first: its creation is the SIP-watcher memory row on a quiet gateway.
        for n in sorted(sizes.fanout, reverse=True):
            done = _step(f"{n} SIP watchers subscribe to bob{n}")
            row, _ = await create_watchers(world, n, timeout=n / 20 + 60.0)
            done()
            if n == max(sizes.fanout):
                report.memory.append(row)
        for n in sizes.fanout:
            for number in range(1, sizes.rounds + 1):
                done = _step(f"fan-out to {n} watchers, round {number}")
                report.fanout.append(await fanout_round(world, n, number, n / 20 + 60.0))
                done()
            done = _step(f"direct reference, {n} NOTIFYs")
            report.fanout.append(await direct_round(world, n, 100 + n, n / 50 + 60.0))
            done()
        done = _step(f"{sizes.xmpp_watchers} XMPP watchers subscribe")
        total = sizes.xmpp_watchers
        report.memory.append(await create_xmpp_watchers(world, timeout=total / 20 + 60.0))
        done()
        done = _step("restart with the stored subscriptions")
        report.restart = await restart(world, timeout=120.0)
        done()
    finally:
        await world.close()
        report.notes.append(log_summary(world.log_path))


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1,000")
    parser.add_argument("--fanout", type=int, nargs="+", help="watcher counts (default 1000 10000)")
    parser.add_argument("--rounds", type=int, default=2, help="status changes per N")
    parser.add_argument("--xmpp-watchers", type=int, help="XMPP-watcher subscriptions")
    parser.add_argument(
        "--stored",
        type=int,
        default=0,
        help="subscriptions stored at the restart: SIP-watcher rows are copied up to this count",
    )
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep logs and database")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the first gateway process")
    args = parser.parse_args(argv)
    fanout = args.fanout or ([100, 1000] if args.quick else [1000, 10000])
    xmpp = args.xmpp_watchers or (1000 if args.quick else 10000)
    if min(fanout) < 1 or xmpp < 1 or args.rounds < 1 or len(set(fanout)) != len(fanout):
        parser.error("counts must be positive and the fan-out sizes distinct")
    sizes = Sizes(tuple(fanout), args.rounds, xmpp, max(0, args.stored))
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(machine_line(), flush=True)
    report = Report()
    status = 0
    with contextlib.ExitStack() as stack:
        if args.keep:
            workdir = Path(args.keep).resolve()
            workdir.mkdir(parents=True, exist_ok=False)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sipxmpp-bench-pres-"))
            workdir = Path(tmp)
        try:
            profile = Path(args.profile).resolve() if args.profile else None
            asyncio.run(bench(sizes, workdir, report, profile))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted; every process was stopped", file=sys.stderr)
            status = 130
        except RuntimeError as exc:
            print(f"failed: {exc}", file=sys.stderr)
            status = 1
    print()
    print(report.text())
    print(machine_line())
    if args.profile and Path(args.profile).exists():
        print(profile_summary(Path(args.profile)))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
