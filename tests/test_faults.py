"""Prosody killed (SIGKILL) in the middle of a stream of SIP MESSAGEs and started again on the
same ports (DESIGN 8, "written is not delivered"): every message answered 202 reaches the XMPP
user after the restart, or its SIP sender is told it failed. Duplicates are allowed only as
re-sends of one stanza (same origin-id), and are counted.

The gateway runs in the test's loop against its own Prosody (with offline storage, as operators
run it, so a message that arrives while the user logs in again waits for them); a raw SIP peer
sends the MESSAGEs straight to the gateway and is also its proxy, so notices come back to it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from slixmpp.stanza import Message

from tests.gateway_fixture import RunningGateway, gateway_settings, prepared_db, wait_until
from tests.harness.ports import free_port
from tests.harness.prosody import ProsodyServer
from tests.harness.rawsip import RawSip, RawSipPeer
from tests.harness.values import LOOPBACK
from tests.harness.xmppclient import XmppClient

pytestmark = pytest.mark.slow

COUNT = 300
KILL_AFTER = 160  # MESSAGEs sent when Prosody is killed
BURST = 10  # MESSAGEs sent at once
PASSWORD = "secret"
ALICE = "sip:alice@sip.test"
NS_SID = "urn:xmpp:sid:0"


class OfflineProsody(ProsodyServer):
    """The harness's Prosody with offline storage back on (XEP-0160)."""

    name = "prosody-fault"

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        self.config_path.write_text(text.replace('"s2s"; "offline";', '"s2s";', 1))

    def kill(self) -> None:
        """SIGKILL, as a crash would: no stream ends, nothing flushed."""
        proc = self.process.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class SipSide:
    """The raw SIP peer: what the gateway answered to each MESSAGE, and the notices it sent."""

    peer: RawSipPeer
    answers: dict[str, int] = field(default_factory=dict)  # Call-ID -> final status
    notices: list[str] = field(default_factory=list)

    async def listen(self) -> None:
        while True:
            msg: RawSip = await self.peer.received.get()
            if msg.method == "MESSAGE":  # a notice from the gateway's registrar
                self.notices.append(msg.body)
                self.peer.send(msg.response(200, "OK"), msg.source)
            elif msg.status >= 200:
                self.answers[msg.header("Call-ID") or ""] = msg.status


@pytest.fixture
async def prosody() -> AsyncIterator[OfflineProsody]:
    server = OfflineProsody()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, server.start)
    try:
        yield server
    finally:
        await loop.run_in_executor(None, server.close)


def _bodies(client: XmppClient, into: list[Message]) -> None:
    while not client.messages.empty():
        msg = client.messages.get_nowait()
        if msg["body"]:
            into.append(msg)


async def test_prosody_killed_midway_loses_nothing_answered(
    tmp_path: Path, prosody: OfflineProsody
) -> None:
    loop = asyncio.get_running_loop()
    jid = prosody.jid("bob")
    bob = XmppClient(jid, PASSWORD, register=True)
    await bob.start(prosody.c2s_port)
    peer = await RawSipPeer.open()
    sip = SipSide(peer)
    listener = asyncio.create_task(sip.listen())
    sip_port = free_port()
    running = RunningGateway(
        gateway_settings(
            xmpp_port=prosody.component_port,
            sip_port=sip_port,
            proxy=f"sip:{LOOPBACK}:{peer.port}",
            db_url=prepared_db(tmp_path),
            timers={"sleep_time": 0.5, "delay_time": 120.0},
        )
    )
    gateway = await running.start()
    to_uri = "sip:bob*xmpp.test@jabber.sip.test"
    call_ids: dict[str, str] = {}  # Call-ID -> body
    received: list[Message] = []
    again: XmppClient | None = None
    restart: asyncio.Future[None] | None = None
    try:
        for i in range(COUNT):
            call_id = f"fault-{i}"
            call_ids[f"{call_id}@{LOOPBACK}"] = f"m{i}"
            request = peer.request("MESSAGE", to_uri, ALICE, to_uri, f"m{i}", call_id=call_id)
            peer.send(request, (LOOPBACK, sip_port))
            if i % BURST < BURST - 1:
                continue
            if i + 1 == KILL_AFTER:
                # Let the gateway take in the burst (one datagram per loop turn) and write it
                # to the component stream, then kill Prosody before it can have read it all.
                for _ in range(BURST):
                    await asyncio.sleep(0)
                prosody.kill()
                restart = loop.run_in_executor(None, prosody.start)
            else:
                await asyncio.sleep(0.02)
        assert restart is not None
        await asyncio.wait_for(restart, 60)
        _bodies(bob, received)
        await bob.stop()
        await wait_until(lambda: len(sip.answers) == COUNT, 30)
        again = XmppClient(jid, PASSWORD)
        await again.start(prosody.c2s_port)
        accepted = {call_ids[c] for c, status in sip.answers.items() if status == 202}

        def settled() -> bool:
            _bodies(again, received)  # type: ignore[arg-type]
            delivered = {m["body"] for m in received}
            return len(accepted - delivered) <= len(sip.notices)

        await wait_until(settled, 60, step=0.2)
        await asyncio.sleep(1.0)  # late duplicates still count
        _bodies(again, received)
    finally:
        listener.cancel()
        peer.close()
        if again is not None:
            await again.stop()
        await bob.stop()
        await running.stop()

    delivered = Counter(m["body"] for m in received)
    origin_ids = Counter(m.xml.find(f"{{{NS_SID}}}origin-id").get("id") for m in received)
    duplicates = sum(n - 1 for n in delivered.values())
    missing = accepted - set(delivered)
    stats, barrier = gateway.xmpp.stats, gateway.xmpp.confirmations.barrier
    figures = {
        "accepted_202": len(accepted),
        "other_answers": Counter(s for s in sip.answers.values() if s != 202),
        "delivered": len(delivered),
        "duplicates": duplicates,
        "failed_notices": len(sip.notices),
        "unconfirmed_handed_off": stats.unconfirmed,
        "requeued": gateway.router.counters["requeued"],
        "queued_while_down": gateway.router.counters["queued"],
        "confirmed": barrier.confirmed,
        "pings": barrier.pings_sent,
        "reconnects": stats.reconnects,
    }
    print(f"\nlink fault figures (killed after {KILL_AFTER} of {COUNT} sent): {figures}")
    # Sent = delivered + explicitly failed: nothing answered 202 just vanished.
    assert len(missing) == len(sip.notices), (missing, sip.notices, figures)
    # A duplicate is only ever a re-send of one stanza: same id, same origin-id.
    assert sum(n - 1 for n in origin_ids.values()) == duplicates
    assert not set(delivered) - accepted  # nothing arrives that was not accepted
    assert stats.reconnects >= 1 and stats.connects == 2
