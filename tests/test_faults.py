"""Faults injected against the real servers, in one place (DESIGN 8): what was accepted arrives
or its sender is told, a flood from one source does not hold up the others.

- Prosody killed (SIGKILL) amid 300 SIP MESSAGEs and started again on the same ports: every
  message answered 202 reaches the XMPP user, or its SIP sender is told it failed; duplicates
  only as re-sends of one stanza (same origin-id), counted.
- The gateway TERMed amid 1,000 messages each way through Kamailio and started again: it exits
  within 10 s; sent = delivered + explicitly failed in both directions.
- A flooding SIP sender and a flooding XMPP sender, each beside a well-behaved one: the flood
  is refused in part (counted), the well-behaved one's messages all arrive, in order.

The database outage has a module of its own (tests/test_db_outage.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from slixmpp import JID
from slixmpp.stanza import Message

from tests.conftest import XMPP_PASSWORD
from tests.gateway_fixture import (
    RunningGateway,
    component_jid,
    gateway_behind_kamailio,
    gateway_settings,
    prepared_db,
    wait_until,
)
from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent, SipAccount
from tests.harness.ports import free_port
from tests.harness.process import ServerProcess
from tests.harness.prosody import ProsodyServer
from tests.harness.rawsip import RawSip, RawSipPeer
from tests.harness.values import JDOMAIN, LOOPBACK, SIP_DOMAIN
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

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
async def offline_prosody() -> AsyncIterator[OfflineProsody]:
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
    tmp_path: Path, offline_prosody: OfflineProsody
) -> None:
    prosody = offline_prosody
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
            _bodies(again, received)
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
    origin_ids = Counter(_origin_id(m) for m in received)
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


# --- the gateway TERMed amid 1,000 messages each way (DESIGN 8 SIGTERM) -------------------------

ROOT = Path(__file__).resolve().parents[1]
TOTAL = 1000
TERM_AT = 500  # messages sent each way when the gateway gets SIGTERM
DURING_DRAIN = 100  # sent each way at most while it drains (they are refused or stored)
EXIT_WITHIN = 10.0  # seconds from SIGTERM to the process's exit (DESIGN 8)
_numbers = itertools.count(1)


class GatewayProcess:
    """The gateway as operators run it, ``python -m component run -c gateway.toml``."""

    def __init__(self, config: Path, log_level: str = "info") -> None:
        self.config = config
        self.log_level = log_level
        self.process = ServerProcess("gateway")
        self.starts = 0

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIPXMPP_")}
        env["PYTHONPATH"] = str(ROOT)  # this checkout's package, whatever is installed
        argv = [sys.executable, "-m", "component", "run", "-c", str(self.config)]
        argv += ["--log-level", self.log_level]
        self.process.spawn(argv, env=env, cwd=ROOT)
        self.starts += 1

    def log(self) -> str:
        return self.process.out_path.read_text(errors="replace")

    async def up(self, timeout: float = 30.0) -> None:
        """Wait until this start's XMPP link is up."""
        try:
            await wait_until(lambda: self.log().count("xmpp_link_up") >= self.starts, timeout, 0.1)
        except AssertionError:
            raise AssertionError(f"gateway not up:\n{self.process.log_tail()}") from None

    def terminate(self) -> subprocess.Popen[bytes]:
        proc = self.process.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        return proc


@dataclass
class XmppSide:
    """What an XMPP user got: the bodies of chat messages, the conditions of errors by id."""

    client: XmppClient
    bodies: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def take(self) -> None:
        while not self.client.messages.empty():
            msg = self.client.messages.get_nowait()
            if msg["type"] == "error":
                self.errors[msg["id"]] = str(msg["error"]["condition"])
            elif msg["body"]:
                self.bodies.append(msg["body"])

    def send(self, to: str, body: str) -> None:
        """A chat message whose id is its body, so an error for it names it."""
        msg = self.client.make_message(mto=JID(to), mbody=body, mtype="chat")
        msg["id"] = body
        msg.send()


def _events(log: str) -> dict[str, int]:
    """How often each event (with its reason, if any) is in a gateway's JSON log."""
    counts: Counter[str] = Counter()
    for line in log.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            reason = event.get("reason")
            counts[event["event"] + (f" ({reason})" if reason else "")] += 1
    return dict(counts)


def _origin_id(msg: Message) -> str | None:
    """The id of the message's XEP-0359 origin-id, which the gateway always adds."""
    origin = msg.xml.find(f"{{{NS_SID}}}origin-id")
    assert origin is not None, msg
    return origin.get("id")


def _received(account: SipAccount, into: list[str]) -> None:
    while not account.messages.empty():
        into.append(account.messages.get_nowait().body)


def _sip_uri_of(jid: str) -> str:
    """The jdomain address of an XMPP user (DESIGN 3.2)."""
    local, domain = jid.split("@", 1)
    return f"sip:{local}*{domain}@{JDOMAIN}"


def _inversions(bodies: list[str]) -> int:
    """Messages that arrived after a later one of the same sender (first copies only)."""
    firsts = list(dict.fromkeys(bodies))
    return sum(1 for a, b in itertools.pairwise(firsts) if b < a)


async def _register(sip: SipSide, kamailio: KamailioServer, aor: str) -> None:
    call_id = f"reg-{secrets.token_hex(4)}"
    request = sip.peer.request(
        "REGISTER", f"sip:{SIP_DOMAIN}", aor, aor, call_id=call_id, extra=("Expires: 600",)
    )
    sip.peer.send(request, (LOOPBACK, kamailio.port))
    await wait_until(lambda: sip.answers.get(f"{call_id}@{LOOPBACK}") == 200, 10)


async def test_gateway_termed_amid_1000_messages_each_way_loses_nothing(
    tmp_path: Path,
    prosody: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
    pjsip_agent: PjsipAgent,
) -> None:
    loop = asyncio.get_running_loop()
    kamailio = kamailio_factory(free_port())
    config = tmp_path / "gateway.toml"
    timers = "\n[timers]\nsleep_time = 0.5\ndelay_time = 120.0\n"
    config.write_text(gateway_toml(prosody, kamailio, prepared_db(tmp_path), timers))
    gateway = GatewayProcess(config)
    n = next(_numbers)
    bob = XmppSide(XmppClient(prosody.jid(f"term{n}{secrets.token_hex(3)}"), XMPP_PASSWORD, True))
    await bob.client.start(prosody.c2s_port)
    alice = await pjsip_agent.add_account(f"termalice{n}", kamailio)
    carol = f"sip:termcarol{n}@{SIP_DOMAIN}"  # the raw SIP peer, registered to get notices
    sip = SipSide(await RawSipPeer.open())
    listener = asyncio.create_task(sip.listen())
    to_bob, to_alice = _sip_uri_of(bob.client.boundjid.bare), component_jid(alice.uri)
    at_alice: list[str] = []
    sent_x = [f"x{i:04}" for i in range(TOTAL)]
    sent_s = [f"s{i:04}" for i in range(TOTAL)]
    term_at = exited_at = 0.0
    log = ""
    requests: dict[str, bytes] = {}
    try:
        gateway.start()
        await gateway.up()
        await _register(sip, kamailio, carol)
        proc: subprocess.Popen[bytes] | None = None
        for i in range(TOTAL):
            if proc is not None and (proc.poll() is not None or i == TERM_AT + DURING_DRAIN):
                # Nobody listens between the exit and the restart: wait for both.
                while proc.poll() is None:
                    await asyncio.sleep(0.01)
                exited_at = loop.time()
                proc = None
                gateway.start()
                await gateway.up()
            bob.send(to_alice, sent_x[i])
            request = sip.peer.request(
                "MESSAGE", to_bob, carol, to_bob, sent_s[i], call_id=sent_s[i]
            )
            requests[f"{sent_s[i]}@{LOOPBACK}"] = request
            sip.peer.send(request, (LOOPBACK, kamailio.port))
            if i + 1 == TERM_AT:
                term_at = loop.time()
                proc = gateway.terminate()
            if i % 10 == 9:
                await asyncio.sleep(0.01)
        assert exited_at, "the gateway was still draining when the last message was sent"

        def settled() -> bool:
            bob.take()
            _received(alice, at_alice)
            accepted = {c.split("@")[0] for c, st in sip.answers.items() if st == 202}
            return (
                len([c for c in sip.answers if c.startswith("s")]) == TOTAL
                and set(sent_x) <= set(at_alice) | set(bob.errors)
                and len(accepted - set(bob.bodies)) <= len(sip.notices)
            )

        # RFC 3261 17.1.2.2: an unanswered request is sent again (a loaded machine's UDP
        # buffers drop some of a burst); the proxy matches it to its transaction.
        for _ in range(120):
            if settled():
                break
            await asyncio.sleep(1.0)
            for call_id, request in requests.items():
                if call_id not in sip.answers:
                    sip.peer.send(request, (LOOPBACK, kamailio.port))
        if not settled():
            accepted = {c.split("@")[0] for c, st in sip.answers.items() if st == 202}
            unaccounted = sorted(set(sent_x) - set(at_alice) - set(bob.errors))
            raise AssertionError(
                f"not settled: SIP answered {len(sip.answers)}/{TOTAL}; XMPP -> SIP neither "
                f"delivered nor refused: {unaccounted[:20]}; "
                f"accepted, undelivered: {len(accepted - set(bob.bodies))}, "
                f"notices: {len(sip.notices)}; the gateway's log: {_events(gateway.log())}"
            )
        await asyncio.sleep(1.0)  # late duplicates still count
        settled()
    finally:
        listener.cancel()
        sip.peer.close()
        await bob.client.stop()
        log = gateway.log()
        (tmp_path / "gateway.log").write_text(log)  # kept for a failure's reader
        gateway.process.close()

    answers = {c.split("@")[0]: st for c, st in sip.answers.items() if c.startswith("s")}
    accepted = {c for c, st in answers.items() if st == 202}
    delivered_s, delivered_x = Counter(bob.bodies), Counter(at_alice)
    drained = [  # the gateway's log, one JSON object a line: how many it stored at each stop
        json.loads(line)["stored"] for line in log.splitlines() if '"messages_drained"' in line
    ]
    sip_answers = Counter(answers.values())
    xmpp_duplicates = sum(c - 1 for c in delivered_x.values())
    figures = {
        "exit_s": round(exited_at - term_at, 2),
        "sip_answers": sip_answers,
        "sip_delivered": len(delivered_s),
        "sip_duplicates": sum(c - 1 for c in delivered_s.values()),
        "sip_notices": len(sip.notices),
        "xmpp_delivered": len(delivered_x),
        "xmpp_duplicates": xmpp_duplicates,
        "xmpp_errors": Counter(bob.errors.values()),
        "xmpp_inversions": _inversions(at_alice),
        "stored_at_term": drained,
    }
    print(f"\ngateway TERMed after {TERM_AT} of {TOTAL} each way: {figures}")
    assert exited_at - term_at <= EXIT_WITHIN, figures
    # SIP -> XMPP: each MESSAGE answered; every 202 delivered or its sender told.
    assert len(answers) == TOTAL
    assert len(accepted - set(delivered_s)) == len(sip.notices), figures
    assert set(delivered_s) <= accepted
    # XMPP -> SIP: each message delivered or answered with an error, never both.
    assert set(delivered_x) | set(bob.errors) == set(sent_x), figures
    assert not set(delivered_x) & set(bob.errors), figures
    # While it drained, new requests were refused: SIP 503 (500 once Kamailio relays it, RFC
    # 3261 16.7), XMPP resource-constraint (a drain of a few tens of ms may see only one kind).
    # Between the exit and the restart Prosody bounces what comes for the missing component
    # ("Component unavailable": remote-server-timeout, or service-unavailable).
    refusals = sip_answers[500] + Counter(bob.errors.values())["resource-constraint"]
    assert refusals > 0, figures
    bounces = {"resource-constraint", "service-unavailable", "remote-server-timeout"}
    assert set(bob.errors.values()) <= bounces, figures
    # What waited at SIGTERM was stored (none when the drain found nothing in flight) and
    # delivered after the restart; a copy only of what was unanswered.
    assert drained, figures
    assert xmpp_duplicates <= 1 and figures["sip_duplicates"] == 0, figures
    # Order held per conversation through the store and the restart.
    assert figures["xmpp_inversions"] == 0, figures


# --- a flooding source beside a well-behaved one (DESIGN 8, per-source limits) ---------------

FLOOD = 2000
CALM = 30  # the well-behaved sender's messages, within its burst
LIMITS = {"sip_rate": 20.0, "sip_burst": 50, "xmpp_rate": 20.0, "xmpp_burst": 50}


@pytest.fixture
async def limited(
    tmp_path: Path, prosody: XmppServer, kamailio_factory: Callable[..., KamailioServer]
) -> AsyncIterator[tuple[RunningGateway, KamailioServer]]:
    """Kamailio in front of a gateway with low per-source limits (in the test's loop)."""
    async with gateway_behind_kamailio(
        tmp_path, prosody.component_port, kamailio_factory, limits=LIMITS
    ) as world:
        yield world


async def _xmpp_user(prosody: XmppServer, name: str) -> XmppSide:
    client = XmppClient(prosody.jid(f"{name}{secrets.token_hex(3)}"), XMPP_PASSWORD, True)
    await client.start(prosody.c2s_port)
    return XmppSide(client)


async def test_flooding_sip_sender_beside_a_well_behaved_one(
    limited: tuple[RunningGateway, KamailioServer], prosody: XmppServer
) -> None:
    running, kamailio = limited
    gateway = running.gateway
    assert gateway is not None
    bob = await _xmpp_user(prosody, "floodbob")
    sip = SipSide(await RawSipPeer.open())
    listener = asyncio.create_task(sip.listen())
    to_bob = _sip_uri_of(bob.client.boundjid.bare)
    mallory, carol = f"sip:mallory@{SIP_DOMAIN}", f"sip:carol@{SIP_DOMAIN}"
    calm = [f"c{i:02}" for i in range(CALM)]

    async def well_behaved() -> None:
        # One MESSAGE at a time, the next once the previous one is answered: the proxy's
        # workers reorder requests in flight together (SERVERS.md), so order needs this.
        for body in calm:
            request = sip.peer.request("MESSAGE", to_bob, carol, to_bob, body, call_id=body)
            sip.peer.send(request, (LOOPBACK, kamailio.port))
            await wait_until(lambda b=body: f"{b}@{LOOPBACK}" in sip.answers, 10, step=0.005)
            await asyncio.sleep(0.01)

    try:
        calm_task = asyncio.create_task(well_behaved())
        flood: dict[str, bytes] = {}
        for i in range(FLOOD):
            body = f"m{i:04}"
            request = sip.peer.request("MESSAGE", to_bob, mallory, to_bob, body, call_id=body)
            flood[f"{body}@{LOOPBACK}"] = request
            sip.peer.send(request, (LOOPBACK, kamailio.port))
            if i % 20 == 19:
                await asyncio.sleep(0.005)
        await calm_task

        def settled() -> bool:
            bob.take()
            return len(sip.answers) == FLOOD + CALM and set(calm) <= set(bob.bodies)

        # RFC 3261 17.1.2.2: an unanswered request is sent again (on a loaded machine UDP
        # buffers drop part of a flood); the proxy matches it to its transaction.
        for _ in range(60):
            if settled():
                break
            await asyncio.sleep(1.0)
            for call_id, request in flood.items():
                if call_id not in sip.answers:
                    sip.peer.send(request, (LOOPBACK, kamailio.port))
        await wait_until(settled, 5, step=0.1)
        await asyncio.sleep(0.5)
        bob.take()
    finally:
        listener.cancel()
        sip.peer.close()
        await bob.client.stop()

    answers = {c.split("@")[0]: st for c, st in sip.answers.items()}
    flood_answers = Counter(st for c, st in answers.items() if c.startswith("m"))
    delivered = [b for b in bob.bodies if b.startswith("m")]
    limited_count = gateway.sipgate.refusals["rate_limited"]
    print(
        f"\nSIP flood of {FLOOD} beside {CALM}: answers {dict(flood_answers)}, "
        f"delivered {len(delivered)}, rate_limited {limited_count}"
    )
    # The well-behaved sender: every message accepted and delivered, in order.
    assert [answers[c] for c in calm] == [202] * CALM
    assert [b for b in bob.bodies if b.startswith("c")] == calm
    # The flood: refused in part (503, relayed by Kamailio as 500), each refusal counted,
    # and what was accepted delivered.
    assert flood_answers[202] + flood_answers[500] == FLOOD
    assert flood_answers[500] == limited_count > 0
    assert sorted(delivered) == sorted(c for c, st in answers.items() if st == 202 and c[0] == "m")


async def test_flooding_xmpp_sender_beside_a_well_behaved_one(
    limited: tuple[RunningGateway, KamailioServer],
    prosody: XmppServer,
    pjsip_agent: PjsipAgent,
) -> None:
    running, kamailio = limited
    gateway = running.gateway
    assert gateway is not None
    n = next(_numbers)
    target = await pjsip_agent.add_account(f"flooded{n}", kamailio)
    quiet = await pjsip_agent.add_account(f"quiet{n}", kamailio)
    mal, bob = await _xmpp_user(prosody, "mal"), await _xmpp_user(prosody, "calmbob")
    flooded, calm_got = list[str](), list[str]()
    calm = [f"c{i:02}" for i in range(CALM)]
    try:
        for i in range(FLOOD):
            mal.send(component_jid(target.uri), f"m{i:04}")
            if i % (FLOOD // CALM) == 0 and i // (FLOOD // CALM) < CALM:
                bob.send(component_jid(quiet.uri), calm[i // (FLOOD // CALM)])
            if i % 50 == 49:
                await asyncio.sleep(0.002)

        def settled() -> bool:
            mal.take()
            bob.take()
            _received(target, flooded)
            _received(quiet, calm_got)
            return len(flooded) + len(mal.errors) >= FLOOD and len(calm_got) >= CALM

        await wait_until(settled, 120, step=0.2)
    finally:
        await mal.client.stop()
        await bob.client.stop()

    limited_count = gateway.xmpp.stats.rate_limited
    print(
        f"\nXMPP flood of {FLOOD} beside {CALM}: delivered {len(flooded)}, "
        f"errors {dict(Counter(mal.errors.values()))}, rate_limited {limited_count}"
    )
    assert calm_got == calm and bob.errors == {}
    assert set(mal.errors.values()) == {"resource-constraint"}
    assert len(mal.errors) == limited_count > 0
    assert len(flooded) + len(mal.errors) == FLOOD and not set(flooded) & set(mal.errors)
