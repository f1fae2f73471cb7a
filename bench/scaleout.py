"""Benchmark of chat messages through one gateway instance and through two (DESIGN 9), on
ejabberd, Kamailio's dispatcher and PostgreSQL.

Run ``python -m bench.scaleout [--count N] [--steady-count N] [--rate R] ...`` (``--help``
lists the options). It starts ejabberd and a private PostgreSQL cluster once, then runs two row
sets, each on a fresh database at the newest schema and a Kamailio of its own running
``kamailio/sipxmpp-dispatcher.cfg``:

- set A: ONE gateway instance, the dispatcher's list holding that one instance;
- set B: TWO instances in the list, both connected to ejabberd as the same component domain
  (ejabberd spreads the domain's stanzas over both; the dispatcher hashes the SIP From URI).

Each set measures, over ``--conversations`` users on each side, ``sip -> kamailio -> gw ->
xmpp`` (daveN -> Kamailio -> an instance -> ejabberd -> bobN) and ``xmpp -> gw -> kamailio ->
sip`` (carolN -> ejabberd -> an instance -> Kamailio -> aliceN), at a steady ``--rate`` and at
the maximum rate, each row with a fixed count (``bench.messages``' rows and loads). Beside
msg/s, latency and lost/refused, each row gives the CPU per message of every gateway process
(from /proc: the process's CPU over the row / the messages it relayed) and each instance's
share of the messages, counted from what it relayed by its own ``/metrics`` endpoint (messages
delivered, either way). The last line says whether neither instance took more than 60% of any
row of set B. How SIP -> XMPP is shared follows the dispatcher's hash of the senders' From URIs,
so with few senders it moves in steps of one sender's messages (10 senders: 4 and 6); ejabberd
picks a connection per stanza, so XMPP -> SIP is shared about evenly.

Two instances on one machine share its CPUs: what the second one shows here is how the load is
spread and what each message costs, not a doubling of throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import structlog
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from bench.load import (
    CpuSnapshot,
    RawXmppClient,
    group_cpu_seconds,
    log_summary,
    machine_line,
    proc_cpu_seconds,
    tree_cpu_seconds,
)
from bench.message_table import MessagePath, RowResult, micros, ms
from bench.message_world import (
    KAMAILIO_SHM_MB,
    PASSWORD,
    SIP_TO_XMPP,
    XMPP_TO_SIP,
    World,
)
from bench.messages import WARMUP_COUNT, RowSpec, run_row
from bench.presence_load import format_table as aligned
from component.store.migrate import engine_url, upgrade
from tests.harness import process
from tests.harness.ejabberd import EjabberdServer
from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.ports import free_port
from tests.harness.postgres import PostgresCluster
from tests.harness.process import ServerProcess
from tests.harness.values import LOOPBACK, REPO_ROOT

#: DESIGN 9, issue 13: with two instances, neither may take more than this share of a load.
MAX_SHARE = 0.60
PATHS = (SIP_TO_XMPP, XMPP_TO_SIP)

# --- what each instance relayed (its /metrics) ---------------------------------------------------


def delivered_count(exposition: str) -> int:
    """Chat messages the instance delivered, both ways, from its ``/metrics`` text."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        if family.name != "sipxmpp_messages":
            continue
        for sample in family.samples:
            if sample.name == "sipxmpp_messages_total" and sample.labels["outcome"] == "delivered":
                total += sample.value
    return int(total)


def shares(relayed: tuple[int, ...]) -> tuple[float, ...]:
    """Each instance's fraction of the messages relayed (all zero when none were)."""
    total = sum(relayed)
    return tuple(n / total if total else 0.0 for n in relayed)


def share_verdict(rows: list[ScaleRow], limit: float = MAX_SHARE) -> str:
    """One line: whether, in every row with several instances, none took more than ``limit``."""
    spread = [row for row in rows if len(row.relayed) > 1]
    if not spread:
        return "no row with several instances: nothing to say about the share"
    worst = max(spread, key=lambda row: max(shares(row.relayed)))
    top = max(shares(worst.relayed))
    if any(sum(row.relayed) == 0 for row in spread):
        return "NOT shared: a row with several instances relayed nothing"
    if top <= limit:
        return (
            f"shared: in every row with {len(worst.relayed)} instances neither took more than "
            f"{limit:.0%} of the messages (largest share {top:.0%}, {worst.path.name} "
            f"{worst.mode})"
        )
    return (
        f"NOT shared: one instance took {top:.0%} (more than {limit:.0%}) of "
        f"{worst.path.name} {worst.mode}"
    )


# --- one row of the table ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerCpu:
    """CPU seconds so far of each gateway instance and of the servers around them."""

    instances: tuple[float, ...]
    ejabberd: float
    kamailio: float
    postgres: float

    def minus(self, other: ServerCpu) -> ServerCpu:
        """The CPU used between ``other`` and this reading."""
        return ServerCpu(
            tuple(a - b for a, b in zip(self.instances, other.instances, strict=True)),
            self.ejabberd - other.ejabberd,
            self.kamailio - other.kamailio,
            self.postgres - other.postgres,
        )


@dataclass(frozen=True, slots=True)
class ScaleRow:
    """One row: ``bench.messages``' figures, and per instance its CPU and what it relayed."""

    result: RowResult
    cpu: ServerCpu
    relayed: tuple[int, ...]

    @property
    def path(self) -> MessagePath:
        """The row's path."""
        return self.result.path

    @property
    def mode(self) -> str:
        """Steady N/s or max with the window."""
        return self.result.mode

    def cells(self) -> list[str]:
        """The table cells of this row."""
        r = self.result
        per_msg = max(r.delivered, 1)
        count = len(self.relayed)
        per_instance = "/".join(
            micros(cpu / relayed) if relayed else "-"
            for cpu, relayed in zip(self.cpu.instances, self.relayed, strict=True)
        )
        return [
            f"{count} instance{'s' if count > 1 else ''}",
            r.path.name,
            r.mode,
            str(r.sent),
            str(r.delivered),
            str(r.failed),
            str(r.lost),
            f"{r.seconds:.2f}",
            f"{r.rate:,.0f}",
            ms(r.p50),
            ms(r.p99),
            micros(sum(self.cpu.instances) / per_msg),
            per_instance,
            "/".join(map(str, self.relayed)),
            "/".join(f"{share:.0%}" for share in shares(self.relayed)),
            micros(self.cpu.ejabberd / per_msg),
            micros(self.cpu.kamailio / per_msg),
            micros(self.cpu.postgres / per_msg),
            r.notes,
        ]


HEADER = [
    "set",
    "path",
    "mode",
    "sent",
    "deliv",
    "refused",
    "lost",
    "secs",
    "msg/s",
    "p50 ms",
    "p99 ms",
    "gw us/msg",
    "each gw us/msg",
    "relayed",
    "share",
    "ejabberd us/msg",
    "kamailio us/msg",
    "postgres us/msg",
    "notes",
]


def format_table(rows: list[ScaleRow]) -> str:
    """The rows, each load's one-instance row beside its two-instance row."""
    ordered = sorted(
        rows,
        key=lambda row: (PATHS.index(row.path), row.mode.startswith("max"), len(row.relayed)),
    )
    return aligned(HEADER, [row.cells() for row in ordered], left=3)


# --- the world: ejabberd, a Kamailio with the dispatcher, the instances --------------------------


@dataclass
class Instance:
    """One gateway process: its name, SIP port, metrics port and process."""

    name: str
    sip_port: int
    metrics_port: int
    process: ServerProcess

    @property
    def pid(self) -> int:
        """The gateway's process id (-1 once stopped)."""
        proc = self.process.proc
        return proc.pid if proc is not None else -1

    def fetch(self, path: str) -> tuple[int, str]:
        """GET ``path`` from the instance's status endpoint: (status, body); (0, why) if none."""
        url = f"http://{LOOPBACK}:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        except OSError as error:
            return 0, str(error)


@dataclass
class ScaleWorld(World):
    """``bench.message_world.World`` with ejabberd for Prosody and ``instances`` gateway
    processes behind a Kamailio running the dispatcher snippet, on one PostgreSQL database."""

    ejabberd: EjabberdServer | None = None
    postgres: PostgresCluster | None = None
    database_url: str = ""
    instance_names: tuple[str, ...] = ("gw-a",)
    instances: list[Instance] = field(default_factory=list)
    readings: list[ServerCpu] = field(default_factory=list)

    async def start(self) -> None:
        """Kamailio with the instances in its dispatcher list, the instances (until each says
        healthy), the SIP endpoints (aliceN registered) and the XMPP clients."""
        assert self.ejabberd is not None
        ports = [free_port() for _ in self.instance_names]
        kamailio = self.kamailio = KamailioServer(
            ports[0], trace=False, shm_mb=KAMAILIO_SHM_MB, instances=ports
        )
        kamailio.start()
        for name, port in zip(self.instance_names, ports, strict=True):
            self.instances.append(self._start_instance(name, port, kamailio))
        for instance in self.instances:
            await self._healthy(instance)

        await self.start_clients(kamailio.uri, self.ejabberd.c2s_port)

    def _start_instance(self, name: str, port: int, kamailio: KamailioServer) -> Instance:
        assert self.ejabberd is not None
        metrics_port = free_port()
        extra = f'[gateway]\ninstance = "{name}"\n[metrics]\nlisten = "{LOOPBACK}:{metrics_port}"\n'
        text = gateway_toml(self.ejabberd, kamailio, self.database_url, extra)
        # gateway_toml listens on the Kamailio's first gateway port; each instance has its own.
        text = text.replace(f':{kamailio.gateway_port}"', f':{port}"')
        config = self.workdir / f"{name}.toml"
        config.write_text(text)
        server = ServerProcess(f"gateway-{name}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIPXMPP_")}
        env["PYTHONPATH"] = str(REPO_ROOT)  # this checkout's package, whatever is installed
        server.spawn([sys.executable, "-m", "component", "run", "-c", str(config)], env=env)
        return Instance(name, port, metrics_port, server)

    @staticmethod
    async def _healthy(instance: Instance, timeout: float = 60.0) -> None:
        """Until the instance's ``/health`` says every part (database, XMPP link, SIP) is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status, body = await asyncio.to_thread(instance.fetch, "/health")
            if status == 200:
                return
            if not instance.process.running or loop.time() > deadline:
                raise RuntimeError(
                    f"gateway {instance.name} not healthy ({status} {body[:200]}):\n"
                    f"{instance.process.log_tail(20)}"
                )
            await asyncio.sleep(0.2)

    async def relayed(self) -> tuple[int, ...]:
        """Messages each instance has delivered so far (either way), read from its /metrics."""
        counts: list[int] = []
        for instance in self.instances:
            status, body = await asyncio.to_thread(instance.fetch, "/metrics")
            if status != 200:
                raise RuntimeError(f"gateway {instance.name} /metrics: {status} {body[:200]}")
            counts.append(delivered_count(body))
        return tuple(counts)

    def cpu(self) -> CpuSnapshot:
        """For ``run_row``: the gateway column is all instances together, the XMPP server's is
        ejabberd's. Each call also keeps the reading per instance in ``readings``."""
        reading = self.server_cpu()
        self.readings.append(reading)
        return CpuSnapshot(
            sum(reading.instances), reading.ejabberd, reading.kamailio, time.process_time()
        )

    def server_cpu(self) -> ServerCpu:
        """CPU seconds so far of each instance, ejabberd, Kamailio and PostgreSQL (all their
        processes)."""

        def group(server: ServerProcess | None) -> float:
            proc = server.proc if server is not None else None
            return group_cpu_seconds(proc.pid) if proc is not None else 0.0

        return ServerCpu(
            tuple(proc_cpu_seconds(instance.pid) for instance in self.instances),
            group(self.ejabberd.process if self.ejabberd else None),
            group(self.kamailio.process if self.kamailio else None),
            tree_cpu_seconds(
                self.postgres.proc.pid if self.postgres and self.postgres.proc else -1
            ),
        )

    def stop_gateway(self) -> None:
        """For ``World.close``: SIGTERM each instance, give it time to drain, say what it
        logged (ejabberd and PostgreSQL are the run's, not this set's)."""
        for instance in self.instances:
            instance.process.stop()
            print(f"{instance.name}: {log_summary(instance.process.out_path)}", flush=True)
            instance.process.close()
        self.instances.clear()


# --- running the sets ----------------------------------------------------------------------------


async def measure(world: ScaleWorld, spec: RowSpec, tag: str) -> ScaleRow:
    """One row by ``bench.messages.run_row``, with each instance's CPU over the same window
    (``run_row`` reads the CPU when it starts sending and when the row settles) and what each
    instance relayed meanwhile."""
    before = await world.relayed()
    world.readings.clear()
    result = await run_row(world, spec, tag)
    first, last = world.readings[0], world.readings[-1]
    after = await world.relayed()
    return ScaleRow(
        result, last.minus(first), tuple(b - a for a, b in zip(before, after, strict=True))
    )


def row_specs(args: argparse.Namespace) -> list[RowSpec]:
    """Per path: a steady row at ``args.rate`` and a max-rate row (bounded in time as in
    ``bench.messages``: a row ends once it would have taken 50 msg/s)."""
    conv, window = args.conversations, args.concurrency
    specs: list[RowSpec] = []
    for path in PATHS:
        steady, full = args.steady_count, args.count
        specs.append(RowSpec(path, steady, window, args.rate, conv, steady / args.rate + 30))
        specs.append(RowSpec(path, full, window, None, conv, full / 50 + 30))
    return specs


async def run_set(
    args: argparse.Namespace,
    workdir: Path,
    ejabberd: EjabberdServer,
    postgres: PostgresCluster,
    names: tuple[str, ...],
) -> list[ScaleRow]:
    """One row set: a fresh database, Kamailio and ``names`` instances; warm each path up
    (unmeasured), run its rows, stop all but ejabberd and PostgreSQL."""
    began = time.perf_counter()
    url = fresh_database(postgres, f"scaleout_{len(names)}_{secrets.token_hex(3)}")
    world = ScaleWorld(
        users=args.conversations,
        workdir=workdir,
        concurrency=args.concurrency,
        ejabberd=ejabberd,
        postgres=postgres,
        database_url=url,
        instance_names=names,
    )
    rows: list[ScaleRow] = []
    try:
        await world.start()
        print(
            f"set of {len(names)} ({', '.join(names)}): up in {time.perf_counter() - began:.1f}s",
            flush=True,
        )
        print(await idle_line(world), flush=True)
        warmed: set[MessagePath] = set()
        for number, spec in enumerate(row_specs(args), 1):
            tag = f"s{len(names)}r{number}"
            if spec.path not in warmed:
                warm_spec = RowSpec(spec.path, WARMUP_COUNT, 10, None, spec.conversations, 30.0)
                warm = await measure(world, warm_spec, f"{tag}w")
                print(
                    f"  warm-up {spec.path.name}: {warm.result.delivered}/{WARMUP_COUNT}, "
                    f"relayed {'/'.join(map(str, warm.relayed))}",
                    flush=True,
                )
                warmed.add(spec.path)
            row = await measure(world, spec, tag)
            r = row.result
            print(
                f"  {r.path.name:<29} {r.mode:<14} {r.delivered}/{r.sent} in {r.seconds:.2f}s "
                f"relayed {'/'.join(map(str, row.relayed))} {r.notes}",
                flush=True,
            )
            rows.append(row)
    finally:
        await world.close()
    return rows


async def idle_line(world: ScaleWorld, seconds: float = 2.0) -> str:
    """What each idle instance costs: CPU per second of wall time with no traffic."""
    before = world.server_cpu()
    await asyncio.sleep(seconds)
    used = world.server_cpu().minus(before).instances
    each = ", ".join(
        f"{instance.name} {cpu / seconds * 1e3:.0f}"
        for instance, cpu in zip(world.instances, used, strict=True)
    )
    return f"  idle, ms CPU per s: {each}"


def fresh_database(postgres: PostgresCluster, name: str) -> str:
    """A new database in the private cluster, migrated to the newest schema; its URL."""
    admin = create_engine(
        engine_url(postgres.url), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        admin.dispose()
    url = postgres.url.rpartition("/")[0] + f"/{name}"
    upgrade(url)
    return url


class RegisteringClient(RawXmppClient):
    """A raw c2s stream that creates its account by XEP-0077 in-band registration (one
    ejabberdctl call per user would cost an Erlang VM start each)."""

    async def register(self, host: str, port: int, timeout: float = 15.0) -> None:
        """Connect, register ``user`` with ``password``, close."""
        loop = asyncio.get_running_loop()
        await loop.create_connection(lambda: self, host, port)
        try:
            await asyncio.wait_for(self._register_steps(), timeout)
        finally:
            await self.close()

    async def _register_steps(self) -> None:
        self._write(
            f"<?xml version='1.0'?><stream:stream to={quoteattr(self.domain)} "
            "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
        )
        await self._expect("stream:features")
        await self.iq(
            "set",
            None,
            f"<query xmlns='jabber:iq:register'><username>{escape(self.user)}</username>"
            f"<password>{escape(self.password)}</password></query>",
        )


async def bench(args: argparse.Namespace, workdir: Path) -> list[ScaleRow]:
    """Start ejabberd and PostgreSQL, run set A then set B, stop everything (also on failure or
    cancellation)."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    # Last resort if this process dies without unwinding: the harness reaps its servers.
    atexit.register(process.stop_all)
    ejabberd = EjabberdServer()
    postgres = PostgresCluster()
    try:
        began = time.perf_counter()
        await asyncio.gather(asyncio.to_thread(ejabberd.start), asyncio.to_thread(postgres.start))
        for index in range(1, args.conversations + 1):
            for name in ("bob", "carol"):
                client = RegisteringClient(f"{name}{index}", ejabberd.domain, PASSWORD, print)
                await client.register(LOOPBACK, ejabberd.c2s_port)
        print(f"ejabberd and PostgreSQL up in {time.perf_counter() - began:.1f}s", flush=True)
        rows = await run_set(args, workdir, ejabberd, postgres, ("one-a",))
        rows += await run_set(args, workdir, ejabberd, postgres, ("two-a", "two-b"))
        return rows
    finally:
        for server in (ejabberd, postgres):
            with contextlib.suppress(Exception):
                server.close()


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run both sets and print the table and the share line."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--count", type=int, default=3000, help="messages per max-rate row")
    parser.add_argument("--steady-count", type=int, default=1000, help="messages per steady row")
    parser.add_argument("--rate", type=float, default=200.0, help="steady rows: messages/s")
    parser.add_argument("--concurrency", type=int, default=50, help="messages in flight")
    parser.add_argument(
        "--conversations", type=int, default=10, help="users on each side, one conversation each"
    )
    args = parser.parse_args(argv)
    if min(args.count, args.steady_count, args.concurrency, args.conversations) < 1:
        parser.error("--count, --steady-count, --concurrency and --conversations must be positive")
    if args.rate <= 0:
        parser.error("--rate must be positive")
    # The endpoints log each start and close at info; keep the output to the table.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory(prefix="sipxmpp-scaleout-") as tmp:
        try:
            rows = asyncio.run(bench(args, Path(tmp)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted; every process was stopped", file=sys.stderr)
            return 130
    print()
    print(format_table(rows))
    print()
    print(share_verdict(rows))
    print(machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
