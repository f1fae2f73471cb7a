"""CPU cost of the XMPP -> SIP chat path per message, in process, with no real sockets.

The real pieces as the gateway wires them (``component.app``): stanza bytes into the XMPP
link's stream (slixmpp's parser, our dispatch) -> the message router (one MESSAGE in flight
per conversation) -> the SIP side and sender -> the endpoint's client transaction -> the
MESSAGE written to a fake UDP transport. The far end answers each MESSAGE written with a 200
fed back as a datagram, as Kamailio relays a UA's (our Via's rport filled in, a To tag); the
final answer lets the next message of that conversation go.

Every stanza has a fresh id, and every MESSAGE its own branch, Call-ID and tag. The messages
of a round are read ``READ`` stanzas at a time, spread over ``conversations`` senders talking
to one SIP user each. Used by ``bench.hotpath`` (rows ``xmpp-in-1`` and ``xmpp-in-10``); the
time the far end spends making up its 200s is not counted.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

from bench.gateway_path import FakeUdp
from component.addresses import AddressBook
from component.logs import configure_logging
from component.messaging.router import MessageRouter
from component.presence.core import PresenceCore
from component.runtime.presence_driver import CoreSerial
from component.runtime.signal import UserOnlineSignal, UserStateSignal
from component.runtime.tasks import TaskOwner
from component.sip.sender import SipSender
from component.sip.side import SipSide
from component.sip.transactions import ClientTransactions
from component.store.memory import MemoryStore
from component.values import ChatMessage, SipText
from component.xmpp.link import XmppLink
from component.xmpp.stream import LinkState, Stream
from sipside.endpoint import Endpoint
from sipside.peer import Peer

COMPONENT = "sip.xmpp.test"
BOOK = AddressBook(
    component=COMPONENT,
    sip_domain="sip.test",
    jdomain="jabber.sip.test",
    delimiter="*",
    registrar="sip:jabber_gateway@sip.test",
)
PROXY = Peer("udp", "127.0.0.1", 5060)
READ = 10  # stanzas per read of the XMPP stream
STREAM_HEAD = (
    b"<stream:stream xmlns='jabber:component:accept' "
    b"xmlns:stream='http://etherx.jabber.org/streams' from='sip.xmpp.test' id='s1'>"
)


def relayed_200(request: bytes) -> bytes:
    """The UA's 200 to one of our MESSAGEs as Kamailio relays it back: our Via with the rport
    it saw filled in (RFC 3581), the UA's To tag, From, Call-ID and CSeq copied."""
    head = request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    lines = [b"SIP/2.0 200 OK"]
    for line in head[1:]:
        if line.startswith(b"Via:"):
            port = line.rpartition(b";branch=")[0].rpartition(b":")[2]
            lines.append(line + b"=" + port)
        elif line.startswith(b"To:"):
            lines.append(line + b";tag=8a3e9f1c")
        elif line.startswith((b"From:", b"Call-ID:", b"CSeq:")):
            lines.append(line)
    lines += [b"Content-Length: 0", b"", b""]
    return b"\r\n".join(lines)


class FakeTcp:
    """Stands in for the XMPP link's TCP transport: keeps what was written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Record one write."""
        self.written.append(data)

    def is_closing(self) -> bool:
        """Never closing."""
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """No socket, no TLS."""
        return default

    def close(self) -> None:
        """Nothing to close."""

    abort = close


def chat_stanza(i: int, conversations: int) -> bytes:
    """A ``<message type='chat'>`` as the XMPP server routes it to the component."""
    n = i % conversations
    return (
        b"<message from='carol%d@xmpp.test/phone' to='alice%d@sip.xmpp.test' type='chat' "
        b"id='m%07d' xmlns='jabber:component:accept'><body>Hello Alice, this is Carol over "
        b"XMPP</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    ) % (n, n, i)


class Path:
    """The XMPP -> SIP path of one gateway, its sockets replaced by fakes."""

    def __init__(self) -> None:
        self.tasks = TaskOwner("bench_task_failed")
        self.endpoint = Endpoint(["udp:127.0.0.1:0"], outbound_proxy="sip:127.0.0.1:5060")
        self.link = XmppLink(
            component=COMPONENT,
            host="127.0.0.1",
            port=5347,
            secret="secret",
            on_message=self._on_message,
            on_error=lambda err: None,
            on_presence=lambda presence: None,
        )
        serial = CoreSerial(clock=time.time)
        store = MemoryStore()
        side = SipSide(
            BOOK,
            driver=serial,
            transactions=ClientTransactions(self.endpoint, serial),
            sender=SipSender(self.endpoint),
            store=store,
            presence=lambda sip_port: PresenceCore(
                BOOK,
                sip=sip_port,
                xmpp=self.link,
                store=store,
                user_online=UserOnlineSignal(),
                user_state=UserStateSignal(),
            ),
        )
        self.router = MessageRouter(
            BOOK, self.link, side, store, _NoCommands(), clock=time.time, delay_time=90.0
        )
        self.udp = FakeUdp()
        self.tcp = FakeTcp()
        self.stream: Stream | None = None

    async def start(self) -> None:
        """Bind the endpoint (then swap in the fake UDP) and bring the stream up."""
        await self.endpoint.start()
        real = self.endpoint._udp[socket.AF_INET].transport
        assert real is not None
        real.close()
        self.endpoint._udp[socket.AF_INET].transport = self.udp  # type: ignore[assignment]
        await self.router.resume()
        stream = self.stream = Stream(self.link, "secret")
        self.link._stream = stream
        stream.connection_made(self.tcp)  # type: ignore[arg-type]
        stream.data_received(STREAM_HEAD + b"<handshake/>")
        assert self.link.state is LinkState.UP, self.link.state

    async def close(self) -> None:
        """Close the endpoint; what is still running is cancelled."""
        for task in self.tasks.pending():
            task.cancel()
        await self.endpoint.close()

    def _on_message(self, msg: ChatMessage) -> None:
        # As Gateway._on_xmpp_message does (the transports' status chatter aside).
        work = self.router.take_xmpp_message(msg)
        if work is not None:
            self.tasks.own(work)

    async def run(self, stanzas: list[bytes]) -> float:
        """Read ``stanzas`` and answer every MESSAGE until each got its 200; CPU seconds."""
        assert self.stream is not None
        feed, answer = self.stream.data_received, self.endpoint._on_datagram
        sent = self.udp.sent
        answered = 0
        delivered = self.router.counters["xmpp_to_sip"]
        cpu = 0.0
        t0 = time.process_time()
        for start in range(0, len(stanzas), READ):
            feed(b"".join(stanzas[start : start + READ]))
        await _until(sent)
        cpu += time.process_time() - t0
        while answered < len(stanzas):
            answers = [relayed_200(data) for data in sent]  # the far end: not counted
            answered += len(sent)
            sent.clear()
            t0 = time.process_time()
            for data in answers:
                answer(data, PROXY)
            if answered < len(stanzas):
                await _until(sent)
            cpu += time.process_time() - t0
        await asyncio.sleep(0)  # the last final answers reach the router
        if self.router.counters["xmpp_to_sip"] - delivered != len(stanzas):
            raise RuntimeError(f"xmpp-in: {self.router.counters} for {len(stanzas)} messages")
        return cpu


async def _until(sent: list[bytes]) -> None:
    """Let the event loop run until a MESSAGE was written: as many turns as the path takes."""
    for _ in range(100):
        await asyncio.sleep(0)
        if sent:
            return
    raise RuntimeError("xmpp-in: no MESSAGE written after 100 event-loop turns")


class _NoCommands:
    async def command(self, msg: SipText) -> str | None:
        return None


async def measure(count: int, conversations: int) -> float:
    """CPU seconds for ``count`` chat messages over ``conversations`` conversations."""
    path = Path()
    await path.start()
    try:
        return await path.run([chat_stanza(i, conversations) for i in range(count)])
    finally:
        await path.close()


def run(count: int, conversations: int) -> float:
    """:func:`measure` in a fresh event loop, logging as the gateway does by default (JSON
    lines at info, here into nothing): an event logged per message is part of its cost."""
    with open(os.devnull, "w") as sink:
        configure_logging("info", json=True, stream=sink)
        return asyncio.run(measure(count, conversations))
