"""The world ``bench.messages`` measures: Prosody, Kamailio, the gateway as its own process, the
SIP endpoints and raw XMPP clients, the module's Kamailio once it is up, and the paths a message
can take between them (``MessagePath``s, each sent by ``World.sender_for``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.anchor import (
    MODULE_DOMAIN,
    AnchorProsody,
    ModuleKamailio,
)
from bench.load import (
    CpuSnapshot,
    RawXmppClient,
    Received,
    Tracker,
    group_cpu_seconds,
    message_tag,
    parse_tag,
    proc_cpu_seconds,
    register_user,
    sip_message,
)
from bench.message_table import (
    GATEWAY,
    MODULE,
    MessagePath,
)
from component.store.migrate import upgrade
from sipside.endpoint import Endpoint, IncomingRequest
from sipside.errors import SipError
from sipside.message import SipRequest
from sipside.peer import Peer
from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.ports import free_port, wait_for_port
from tests.harness.prosody import ProsodyServer
from tests.harness.values import (
    COMPONENT_DOMAIN,
    JDOMAIN,
    LOOPBACK,
    REPO_ROOT,
    SIP_DOMAIN,
    XMPP_DOMAIN,
)

PASSWORD = "password"
BODY_TEXT = "Hello Bob, are you there this time?"
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
        """Start Prosody (with a component domain for the module), Kamailio, the gateway, the SIP
        endpoints and the XMPP clients."""
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
        await self.start_clients(kamailio.uri, prosody.c2s_port)
        await self._wait_for_link()

    async def start_clients(self, proxy: str, c2s_port: int) -> None:
        """The SIP endpoints behind ``proxy`` (aliceN registered there) and the XMPP clients
        (bobN, carolN) logged in at ``c2s_port``."""
        listen = [f"udp:{LOOPBACK}:0"]
        self.sip_sender = Endpoint(listen, self.on_sip, outbound_proxy=proxy)
        self.sip_receiver = Endpoint(listen, self.on_sip, outbound_proxy=proxy)
        await self.sip_sender.start()
        await self.sip_receiver.start()
        for index in range(1, self.users + 1):
            await register_user(self.sip_receiver, f"alice{index}", SIP_DOMAIN)
        for name, group in (("bob", self.bobs), ("carol", self.carols)):
            for index in range(1, self.users + 1):
                client = RawXmppClient(f"{name}{index}", XMPP_DOMAIN, PASSWORD, self.on_xmpp)
                group.append(client)
                await client.login(LOOPBACK, c2s_port)

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
        elif self.profile is not None and self.profile_clock == "sample":
            prefix = ["-m", "bench.sampler", str(self.profile)]
        elif self.profile is not None:
            prefix = ["-m", "bench.load", "profile-gateway", str(self.profile)]
        # bench.load's and bench.sampler's profilers call the CLI themselves; python -m cProfile
        # takes -m component.
        component = (
            [] if prefix[1:2] in (["bench.load"], ["bench.sampler"]) else ["-m", "component"]
        )
        with (self.workdir / "gateway.log").open("wb") as log:
            self.gateway = subprocess.Popen(
                [sys.executable, *prefix, *component, "run", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
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
