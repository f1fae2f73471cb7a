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
arrived) and an overall timeout. A steady row of the default 1,000 messages lasts 5 s: shorter
than the 32 s an answered UDP request's server transaction lingers (RFC 3261 Timer J), so it
does not include the expiry of its own transactions that sustained traffic pays for; a
``--steady-count`` of 10,000 (50 s) does. Latency is send to arrival on this process's clock.
CPU per message is read from /proc for the gateway, Prosody, Kamailio (all its processes), the
module's Kamailio (all its processes) and this process; the gateway's RSS is read after each
gateway row. A second table puts each load's gateway row beside the module's with the ratio
gateway/module. ``--profile FILE`` runs the gateway under cProfile (or, with ``--profile-clock
sample``, the sampling profiler of ``bench.sampler``) and prints its hot spots at the end (the
timings of a cProfile run are distorted).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from bench.anchor import (
    DEFAULT_ANCHOR_DIR,
    MODULE_DOMAIN,
    Anchor,
    ModuleKamailio,
    cache_dir,
    find_or_build,
)
from bench.load import (
    log_summary,
    machine_line,
    percentile,
    proc_rss_bytes,
    profile_summary,
    register_user,
    send_delay,
)
from bench.message_table import (
    MessagePath,
    RowResult,
    SippResult,
    format_comparison,
    format_sipp,
    format_table,
    inversions,
)
from bench.message_world import (
    PAIRS,
    SIP_AT_GATEWAY,
    SIP_AT_MODULE,
    SIP_DIRECT,
    SIP_TO_XMPP,
    XMPP_BURST,
    XMPP_DIRECT,
    ActiveRow,
    CountedRow,
    World,
)
from bench.sampler import report as sampler_report
from bench.sipp import SippLoad, run_sipp, sipp_available
from sipside.errors import SipError
from tests.harness import process
from tests.harness.values import JDOMAIN, SIP_DOMAIN, XMPP_DOMAIN

WARMUP_COUNT = 50

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
    if args.paths in ("to-xmpp", "to-sip"):
        # One direction of the gateway alone, straight at it or through Kamailio to SIP: for
        # profiling (--profile) one direction at a time.
        path = SIP_AT_GATEWAY if args.paths == "to-xmpp" else PAIRS[1][0]
        specs += [steady(path), full(path)]
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


async def start_module(world: World, anchor: Anchor) -> str:
    """Start the module's Kamailio, register the aliceN there too and wait until a MESSAGE
    through it reaches XMPP; a line saying so, or why the module rows are left out."""
    assert world.prosody is not None and world.sip_receiver is not None
    module = ModuleKamailio(anchor, world.prosody.component_port)
    try:
        module.start()
        for index in range(1, world.users + 1):
            await register_user(
                world.sip_receiver, f"alice{index}", SIP_DOMAIN, registrar=module.peer
            )
    except (RuntimeError, TimeoutError, ConnectionError, SipError) as exc:
        why = f"{exc}; {module.log_tail(5)}"
        module.close()
        return f"Kamailio xmpp module did not start: {why}; gateway rows only"
    world.module = module
    probe = RowSpec(SIP_AT_MODULE, 1, 1, None, 1, timeout=2.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while loop.time() < deadline:
        if (await run_row(world, probe, "probe")).delivered == 1:
            return f"Kamailio xmpp module up as component {MODULE_DOMAIN} at {module.uri}"
        if not module.process.running:
            break
    world.module = None
    why = module.log_tail(5)
    module.close()
    return f"Kamailio xmpp module: no message got through it ({why}); gateway rows only"


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
        if anchor is not None:
            print(await start_module(world, anchor), flush=True)
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
        choices=["all", "gateway", "direct", "burst", "sipp", "to-xmpp", "to-sip"],
        default="all",
        help="which rows to run (gateway: the gateway's and the module's; to-xmpp, to-sip: the "
        "gateway's straight SIP -> XMPP or relayed XMPP -> SIP rows alone, e.g. to profile)",
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
    parser.add_argument("--profile", metavar="FILE", help="run the gateway under a profiler")
    parser.add_argument(
        "--profile-clock",
        choices=["cpu", "wall", "sample"],
        default="cpu",
        help="cpu: cProfile on main-thread CPU time (default); wall: plain python -m cProfile; "
        "sample: bench.sampler, stacks sampled every 2 ms of CPU (shares without call bias)",
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
    if args.profile and args.profile_clock == "sample":
        # Shares of all samples (warm-ups too), in CPU per message of the measured rows.
        handled = sum(r.delivered for r in rows)
        cpu = sum(r.cpu.gateway for r in rows)
        print(sampler_report(Path(args.profile), messages=handled, cpu_seconds=cpu))
    elif args.profile:
        print(profile_summary(Path(args.profile)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
