"""The database goes away amid traffic and comes back (DESIGN 8, issue 10 item 6).

Once on PostgreSQL (a private cluster stopped with ``pg_ctl stop -m immediate`` and started
again) and once on SQLite (another process holds ``BEGIN EXCLUSIVE`` on the file, then lets
go). Four streams run throughout, against Prosody and a raw SIP peer that is also the
gateway's proxy:

- SIP MESSAGEs to an XMPP user: relayed on the live link, they need no write and get 202;
- registrar commands (``away``/``online``) from a SIP user: they write the user's state, so
  while the database is down they get 503 with Retry-After, never 200;
- XMPP messages to a SIP user the proxy answers 480 for (offline): accepted only once stored,
  so while the database is down they get ``resource-constraint`` (wait); the user comes
  online at the end and every message not refused must arrive;
- XMPP messages to a SIP user who answers 200: delivered throughout.

The gateway is never restarted: its component link stays up, ``/health`` says the database is
down meanwhile and up again after, and the retry queue resumes by itself.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest
from slixmpp import JID
from slixmpp.stanza import Message

from component.store import upgrade
from tests.gateway_fixture import RunningGateway, gateway_settings, wait_until
from tests.harness.ports import free_port
from tests.harness.postgres import PostgresCluster
from tests.harness.rawsip import RawSip, RawSipPeer
from tests.harness.values import COMPONENT_DOMAIN, LOOPBACK
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

pytestmark = pytest.mark.slow

PASSWORD = "secret"
ALICE = "sip:alice@sip.test"
REGISTRAR = "sip:jabber_gateway@sip.test"
CAROL = "sip:carol@sip.test"  # offline (480) until the end
DAVE = "sip:dave@sip.test"  # online throughout
TICK = 0.1  # seconds between rounds of the four streams
DOWN_FOR = 4.0  # seconds the outage lasts once the gateway noticed it
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


class Outage(Protocol):
    """A way for the database to be gone: begin, then end."""

    async def begin(self) -> None: ...

    async def end(self) -> None: ...


class PostgresStopped:
    """The private cluster stopped as by a crash, then started again."""

    def __init__(self, cluster: PostgresCluster) -> None:
        self.cluster = cluster

    async def begin(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.cluster.stop_immediate)

    async def end(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.cluster.start)


LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
db.execute("ROLLBACK")
"""


class SqliteLocked:
    """Another process holds the SQLite file's write lock, then lets go."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[str] | None = None

    async def begin(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(self.path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.get_running_loop().run_in_executor(None, self.proc.stdout.readline)
        assert line.strip() == "locked"

    async def end(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        assert proc.stdin is not None
        proc.stdin.close()  # the locker rolls back and exits
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)


@dataclass
class Sent:
    """One request or stanza of a stream, and what became of it."""

    stream: str
    key: str  # Call-ID or stanza id; also the body
    phase: str
    status: int | None = None  # SIP final answer
    retry_after: str | None = None
    error: tuple[str, str] | None = None  # XMPP (condition, type)


@dataclass
class Traffic:
    """The raw SIP peer's side and everything sent, by key."""

    peer: RawSipPeer
    sent: dict[str, Sent] = field(default_factory=dict)
    delivered_sip: Counter[str] = field(default_factory=Counter)  # bodies reaching carol/dave
    carol_online: bool = False
    phase: str = "before"

    async def listen(self) -> None:
        while True:
            msg: RawSip = await self.peer.received.get()
            if msg.method == "MESSAGE":
                self._on_message(msg)
            elif msg.status >= 200:
                sent = self.sent.get((msg.header("Call-ID") or "").split("@")[0])
                if sent is not None:
                    sent.status = msg.status
                    sent.retry_after = msg.header("Retry-After")

    def _on_message(self, msg: RawSip) -> None:
        if msg.uri == CAROL and not self.carol_online:
            self.peer.send(msg.response(480, "Temporarily Unavailable"), msg.source)
            return
        if msg.uri in (CAROL, DAVE):
            self.delivered_sip[msg.body] += 1
        self.peer.send(msg.response(200, "OK"), msg.source)  # notices to alice too

    def of(self, stream: str, phase: str | None = None) -> list[Sent]:
        return [s for s in self.sent.values() if s.stream == stream and phase in (None, s.phase)]


async def _health(client: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, object]]:
    async with client.get(f"{base}/health") as response:
        return response.status, await response.json()


async def _gauge(client: aiohttp.ClientSession, base: str, name: str) -> float:
    async with client.get(f"{base}/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, text
    return float(found.group(1))


@pytest.fixture(params=["postgresql", "sqlite"])
async def database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, Outage]]:
    """A migrated database URL and the outage to inflict on it."""
    if request.param == "sqlite":
        path = tmp_path / "gateway.db"
        url = f"sqlite:///{path}"
        upgrade(url)
        locked = SqliteLocked(path)
        try:
            yield url, locked
        finally:
            await locked.end()
        return
    cluster = PostgresCluster()
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, cluster.start)
        upgrade(cluster.url)
        yield cluster.url, PostgresStopped(cluster)
    finally:
        await loop.run_in_executor(None, cluster.close)


async def test_database_outage_refuses_what_needs_it_and_recovers_without_restart(
    prosody: XmppServer,
    database: tuple[str, Outage],
    capfd: pytest.CaptureFixture[str],
) -> None:
    db_url, outage = database
    loop = asyncio.get_running_loop()
    bob_user = f"bobdb{free_port()}"
    bob_jid = prosody.jid(bob_user)
    bob_sip = f"sip:{bob_user}*{prosody.domain}@jabber.sip.test"  # bob as SIP users address him
    bob = XmppClient(bob_jid, PASSWORD, register=True)
    await bob.start(prosody.c2s_port)
    peer = await RawSipPeer.open()
    traffic = Traffic(peer)
    listener = asyncio.create_task(traffic.listen())
    sip_port, http_port = free_port(), free_port()
    running = RunningGateway(
        gateway_settings(
            xmpp_port=prosody.component_port,
            sip_port=sip_port,
            proxy=f"sip:{LOOPBACK}:{peer.port}",
            db_url=db_url,
            timers={"sleep_time": 0.5, "delay_time": 60.0},
            metrics={"listen": f"{LOOPBACK}:{http_port}"},
        )
    )
    gateway = await running.start()
    base = f"http://{LOOPBACK}:{http_port}"
    bob_sees: list[Message] = []
    rounds = 0

    def one_round() -> None:
        nonlocal rounds
        i, phase = rounds, traffic.phase
        rounds += 1
        for stream, to_uri, body in (
            ("sip_chat", bob_sip, f"s{i}"),
            ("command", REGISTRAR, "away" if i % 2 else "online"),
        ):
            key = f"{stream}-{i}"
            traffic.sent[key] = Sent(stream, key, phase)
            request = peer.request("MESSAGE", to_uri, ALICE, to_uri, body, call_id=key)
            peer.send(request, (LOOPBACK, sip_port))
        for stream, to_jid in (("to_offline", "carol"), ("to_online", "dave")):
            key = f"{stream}-{i}"
            traffic.sent[key] = Sent(stream, key, phase)
            stanza = bob.make_message(
                mto=JID(f"{to_jid}@{COMPONENT_DOMAIN}"), mbody=key, mtype="chat"
            )
            stanza["id"] = key
            stanza.send()

    async def streams() -> None:
        while True:
            one_round()
            await asyncio.sleep(TICK)

    def drain_bob() -> None:
        while not bob.messages.empty():
            bob_sees.append(bob.messages.get_nowait())

    health_down: tuple[int, dict[str, object]] | None = None
    gauge_down = gauge_up = -1.0
    recovery = outage_s = 0.0
    sender = asyncio.create_task(streams())
    try:
        async with aiohttp.ClientSession() as http:
            assert (await _health(http, base))[0] == 200
            await asyncio.sleep(2.0)
            traffic.phase = "beginning"  # what is sent meanwhile may or may not be stored
            await outage.begin()
            traffic.phase = "down"
            began = loop.time()
            await wait_until(lambda: gateway.store.down, 30)
            health_down = await _health(http, base)
            gauge_down = await _gauge(http, base, "sipxmpp_database_up")
            await asyncio.sleep(DOWN_FOR)
            traffic.phase = "recovering"
            await outage.end()
            back = loop.time()
            outage_s = back - began
            await wait_until(lambda: not gateway.store.down, 30)
            traffic.phase = "after"
            # Recovery: the first registrar command sent after the database is back gets 200.
            first_after = rounds

            def answered_after() -> bool:
                return any(
                    s.status == 200
                    for s in traffic.of("command", "after")
                    if int(s.key.rsplit("-", 1)[1]) >= first_after
                )

            await wait_until(answered_after, 30)
            recovery = loop.time() - back
            await asyncio.sleep(2.0)
            sender.cancel()
            assert (await _health(http, base))[0] == 200
            gauge_up = await _gauge(http, base, "sipxmpp_database_up")
            # Carol comes online: the retry queue delivers what waits for her.
            traffic.carol_online = True

            def settled() -> bool:
                drain_bob()
                refused = {m["id"] for m in bob_sees if m["type"] == "error"}
                answered = all(
                    s.status is not None
                    for s in traffic.sent.values()
                    if s.stream in ("sip_chat", "command")
                )
                offline = {s.key for s in traffic.of("to_offline")}
                return answered and offline <= refused | set(traffic.delivered_sip)

            await wait_until(settled, 90, step=0.2)
            await asyncio.sleep(0.5)  # late duplicates still count
            drain_bob()
    finally:
        sender.cancel()
        listener.cancel()
        peer.close()
        await bob.stop()
        await running.stop()

    for msg in bob_sees:
        if msg["type"] == "error":
            sent = traffic.sent.get(msg["id"])
            assert sent is not None, msg
            sent.error = (msg["error"]["condition"], msg["error"]["type"])
    chats = {m["body"] for m in bob_sees if m["type"] != "error" and m["body"]}
    sip_chat, commands = traffic.of("sip_chat"), traffic.of("command")
    offline, online = traffic.of("to_offline"), traffic.of("to_online")
    refused_503 = [s for s in commands if s.status == 503]
    refused_xmpp = [s for s in offline if s.error is not None]
    figures = {
        "outage_s": round(outage_s, 2),
        "recovery_s": round(recovery, 2),
        "sent": len(traffic.sent),
        "sip_202": sum(s.status == 202 for s in sip_chat),
        "commands_200": sum(s.status == 200 for s in commands),
        "commands_503": len(refused_503),
        "xmpp_refused": len(refused_xmpp),
        "xmpp_delivered": sum(s.key in traffic.delivered_sip for s in offline + online),
        "sip_delivered": len(chats),
        "store_refusals": gateway.sipgate.refusals["store_unavailable"],
        "health_changes": running.health.changes if running.health else None,
    }
    out, err = capfd.readouterr()
    with capfd.disabled():
        print(f"\ndatabase outage figures ({db_url.split(':')[0]}): {figures}")

    # /health and /metrics named the database down meanwhile, and up after.
    assert health_down is not None and health_down[0] == 503
    assert health_down[1]["down"] == ["database"]
    assert gauge_down == 0.0 and gauge_up == 1.0
    # The component link stayed up, and the gateway was never restarted.
    assert gateway.xmpp.stats.connects == 1 and len(running.history) == 1
    # SIP -> XMPP on the live link needs no write: 202, and each one arrives.
    assert all(s.status == 202 for s in sip_chat), Counter(s.status for s in sip_chat)
    assert chats == {f"s{s.key.rsplit('-', 1)[1]}" for s in sip_chat}
    # Registrar commands need a write: 200 or 503 with Retry-After, never 200 while down.
    assert {s.status for s in commands} <= {200, 503}
    assert refused_503 and all(s.retry_after for s in refused_503)
    assert all(s.phase != "before" for s in refused_503)
    assert all(s.status == 200 for s in commands if s.phase == "before")
    assert all(s.status == 503 for s in commands if s.phase == "down")
    # XMPP -> offline SIP user: stored, or refused with resource-constraint (wait); sent =
    # delivered + refused, and everything accepted before the outage arrives.
    assert refused_xmpp
    assert {s.error for s in refused_xmpp} == {("resource-constraint", "wait")}
    assert all(s.phase != "before" for s in refused_xmpp)
    assert all(s.error is not None for s in offline if s.phase == "down")
    for s in offline:
        assert (s.key in traffic.delivered_sip) != (s.error is not None), s
    # XMPP -> online SIP user: delivered throughout, each once.
    assert all(traffic.delivered_sip[s.key] == 1 for s in online), [
        s for s in online if traffic.delivered_sip[s.key] != 1
    ]
    assert all(n == 1 for n in traffic.delivered_sip.values())
    assert "Traceback" not in out + err
