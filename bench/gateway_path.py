"""The whole SIP -> XMPP chat path of a real gateway, in process, with no socket I/O.

A :class:`GatewayPath` builds the real ``Gateway`` (settings, SQLite store, endpoint, SIP gate,
router, rooms, notifications, XMPP link, metrics), then puts two fakes where the sockets
would be: a UDP transport under the endpoint that keeps the responses, and a stream transport
under the XMPP link that keeps the stanzas and plays the server for what the gateway asks of
it (the acknowledgement barrier's pings come back, as the server routes an iq to the
component's own domain back to it). Nothing is patched in the path itself: a datagram goes
through ``Endpoint._on_datagram`` -> transaction layer -> ``SipGate.handle`` -> the transport
guard -> ``MessageRouter.answer_now`` -> ``XmppLink.send_message`` -> stanza bytes, and the 202
goes back through the server transaction to the fake UDP transport.

The recipient's domain is known to host no chat rooms (what a cached disco#info answer says
in steady state), and the store is fresh (no earlier run left messages), so every message
takes the hot path. ``bench.hotpath`` runs it as its ``gateway`` row.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from component.app import Gateway
from component.logs import configure_logging
from component.runtime.health import Health
from component.store.migrate import upgrade
from component.store.store import Store
from component.values import ServiceKind
from component.xmpp.stream import LinkState, Stream
from sipside.endpoint import Endpoint
from sipside.peer import Peer
from tests.gateway_fixture import gateway_settings
from tests.harness.ports import free_port

PROXY = Peer("udp", "127.0.0.1", 5060)
RECIPIENT_DOMAIN = "xmpp.test"


def relayed_message(i: int, body: bytes = b"Hello Bob, are you there this time?") -> bytes:
    """A MESSAGE as Kamailio relays it to the gateway; ``i`` makes branch, tag, Call-ID unique."""
    return (
        b"MESSAGE sip:bob*xmpp.test@jabber.sip.test SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK3c1d.7a0f2b1e%06d.0;rport\r\n"
        b"Via: SIP/2.0/UDP 127.0.0.1:40112;rport=40112;received=127.0.0.1;"
        b"branch=z9hG4bKPj8d2f8a7e-4c1b-%06d\r\n"
        b"Max-Forwards: 69\r\n"
        b'From: "Alice" <sip:alice@sip.test>;tag=6a9c2f0e-%06d\r\n'
        b"To: <sip:bob*xmpp.test@jabber.sip.test>\r\n"
        b"Call-ID: 1f2e3d4c-5b6a-4798-%06d\r\n"
        b"CSeq: 21764 MESSAGE\r\n"
        b"Accept: text/plain, application/im-iscomposing+xml\r\n"
        b"User-Agent: PJSUA v2.15 Linux\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: %d\r\n"
        b"\r\n%s"
    ) % (i, i, i, i, len(body), body)


class FakeUdp:
    """The endpoint's datagram transport: keeps what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        """Record one datagram."""
        self.sent.append(data)

    def close(self) -> None:
        """Nothing to close."""


def fake_udp(endpoint: Endpoint) -> FakeUdp:
    """Put one FakeUdp in place of every UDP socket of a started ``endpoint``."""
    udp = FakeUdp()
    for datagram in endpoint._udp.values():
        assert datagram.transport is not None
        datagram.transport.close()
        datagram.transport = udp  # type: ignore[assignment]
    return udp


class FakeServer:
    """The XMPP link's stream transport, and the server behind it: keeps every write, and
    hands the link back the barrier pings it wrote (after the run's writes, as a server that
    reads the stream in order answers them)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.pings: list[bytes] = []

    def write(self, data: bytes) -> None:
        """Record one write; a barrier ping in it is also kept to be routed back."""
        self.written.append(data)
        if b"urn:xmpp:ping" not in data:
            return
        # A ping may go in the same write as the message it follows.
        start = data.find(b"<iq ")
        while start >= 0:
            end = data.index(b"</iq>", start) + len(b"</iq>")
            if b"urn:xmpp:ping" in data[start:end]:
                self.pings.append(data[start:end])
            start = data.find(b"<iq ", end)

    def is_closing(self) -> bool:
        """Never: the link stays up."""
        return False

    def close(self) -> None:
        """Nothing to close."""

    def abort(self) -> None:
        """Nothing to abort."""


class GatewayPath:
    """A real gateway with fake transports under it; use :meth:`open` and :meth:`close`."""

    def __init__(self, gateway: Gateway, store: Store, udp: FakeUdp, server: FakeServer) -> None:
        self.gateway = gateway
        self.store = store
        self.udp = udp
        self.server = server

    @classmethod
    async def open(cls, workdir: Path) -> GatewayPath:
        """Build and start the gateway's SIP side on ``workdir``'s SQLite store."""
        url = f"sqlite:///{workdir / 'gateway.db'}"
        upgrade(url)
        port = free_port()
        settings = gateway_settings(
            xmpp_port=free_port(),
            sip_port=port,
            proxy="sip:127.0.0.1:5060",
            db_url=url,
            sip={"listen": [f"udp:127.0.0.1:{port}"]},
        )
        health = Health()
        store = await Store.open(url, health=health)
        gateway = Gateway(settings, store, health)
        await gateway.router.resume()
        await gateway.endpoint.start(gateway.sipgate.handle)
        udp = fake_udp(gateway.endpoint)
        server = FakeServer()
        link = gateway.xmpp
        stream = Stream(link, settings.xmpp.secret.get_secret_value())
        stream.transport = server  # type: ignore[assignment]
        link._stream = stream
        link.state = LinkState.UP
        # What a cached disco#info answer says: the recipient's domain hosts no rooms.
        gateway.rooms.core.services.learn(RECIPIENT_DOMAIN, ServiceKind.OTHER, time.time())
        return cls(gateway, store, udp, server)

    def feed(self, datagrams: list[bytes]) -> None:
        """Each datagram into the endpoint as from the proxy; then the server's ping answers."""
        on_datagram = self.gateway.endpoint._on_datagram
        for data in datagrams:
            on_datagram(data, PROXY)
        self.answer_pings()

    def answer_pings(self) -> None:
        """The server routes each barrier ping back to the component, in order."""
        dispatch = self.gateway.xmpp._dispatch
        pings, self.server.pings = self.server.pings, []
        for ping in pings:
            dispatch("iq", ET.fromstring(ping))

    def clear(self) -> None:
        """Forget what was written so far."""
        self.udp.sent.clear()
        self.server.written.clear()

    async def close(self) -> None:
        """Stop the endpoint and close the store."""
        gateway = self.gateway
        gateway.xmpp.state = LinkState.STOPPED
        gateway.xmpp.confirmations.close()
        await gateway.endpoint.close()
        await self.store.close()


async def run_gateway(count: int, warmup: int = 200) -> float:
    """CPU seconds for ``count`` relayed MESSAGEs through the whole gateway path; checks that
    each got its 202 and its stanza."""
    # Production logging at its default level, to a sink: what is rendered is paid for.
    configure_logging("info", json=True, stream=io.StringIO())
    with tempfile.TemporaryDirectory() as workdir:
        path = await GatewayPath.open(Path(workdir))
        try:
            path.feed([relayed_message(i) for i in range(warmup)])
            path.clear()
            data = [relayed_message(warmup + i) for i in range(count)]
            t0 = time.process_time()
            path.feed(data)
            cpu = time.process_time() - t0
            accepted = sum(1 for sent in path.udp.sent if sent.startswith(b"SIP/2.0 202 "))
            stanzas = sum(written.count(b"<message ") for written in path.server.written)
            unconfirmed = path.gateway.xmpp.confirmations.barrier.unconfirmed
        finally:
            await path.close()
    if accepted != count or stanzas != count:
        raise RuntimeError(f"gateway row: {accepted} 202s and {stanzas} stanzas for {count}")
    if unconfirmed >= path.gateway.xmpp.confirmations.barrier.batch_size:
        raise RuntimeError(f"gateway row: {unconfirmed} stanzas left unconfirmed")
    return cpu


__all__ = ["FakeServer", "FakeUdp", "GatewayPath", "fake_udp", "relayed_message", "run_gateway"]


def main(argv: list[str] | None = None) -> None:
    """One round; under ``valgrind --tool=callgrind`` two counts give instructions per message
    (the difference of their totals over the difference of the counts)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--count", type=int, default=5000, help="messages measured")
    args = parser.parse_args(argv)
    cpu = asyncio.run(run_gateway(args.count))
    print(f"{args.count} messages, {cpu / args.count * 1e6:.1f} us/msg of CPU")


if __name__ == "__main__":
    main()
