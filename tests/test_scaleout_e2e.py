"""Two gateway processes on one PostgreSQL database (DESIGN 9), end to end.

- ejabberd, both instances active on one component domain, Kamailio's dispatcher snippet in
  front: messages both ways for several SIP users spread over both; one instance killed with
  SIGKILL amid a stream: every MESSAGE answered 2xx reaches the XMPP user or its sender gets a
  failure notice, and the survivor takes over the dead one's rows.
- ejabberd, both instances active: a SIP user's room seat and her subscription to an XMPP
  user's presence live on one instance, yet every room message and every presence change
  reaches her though ejabberd hands some of them to the other instance (which forwards them);
  after a SIGKILL of the instance holding both, they keep working through the survivor.
- Prosody, a second instance standing by (Prosody refuses its connection): killing the first
  makes the second the active one, and it takes over the first one's state.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from slixmpp import JID

from component.store import SeatOwner, Store, migrate
from tests.conftest import XMPP_PASSWORD
from tests.gateway_fixture import component_jid, wait_until
from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import BuddyState, PjsipAgent, ReceivedMessage, SipAccount
from tests.harness.ports import free_port
from tests.harness.rawsip import RawSipPeer
from tests.harness.values import COMPONENT_DOMAIN, JDOMAIN, LOOPBACK, MUC_DOMAIN, SIP_DOMAIN
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer
from tests.test_faults import GatewayProcess, SipSide, XmppSide, _register
from tests.test_store import scratch_postgres_database

pytestmark = pytest.mark.slow

CHECK = 2.0  # check_time: dead after 4 s without a heartbeat
USERS = 6
EACH = 10


@pytest.fixture
def pg() -> Iterator[str]:
    """A fresh PostgreSQL database of the test's own, at the newest schema, dropped after."""
    with scratch_postgres_database("sipxmpp_scale") as url:
        migrate.upgrade(url)
        yield url


def _instance(
    tmp_path: Path, name: str, xmpp: XmppServer, kamailio: KamailioServer, url: str, port: int
) -> GatewayProcess:
    """Instance ``name`` listening on ``port``, sharing ``url`` with the others."""
    text = gateway_toml(
        xmpp,
        kamailio,
        url,
        f'\n[gateway]\ninstance = "{name}"\n[timers]\ncheck_time = {CHECK}\nsleep_time = 0.5\n',
    ).replace(f':{kamailio.gateway_port}"', f':{port}"')
    config = tmp_path / f"{name}.toml"
    config.write_text(text)
    return GatewayProcess(config, log_level="debug")  # one line per relayed message


def _kill(gateway: GatewayProcess) -> None:
    proc = gateway.process.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _took_over(survivor: GatewayProcess, dead: str) -> bool:
    """The survivor logged taking over ``dead``'s state."""
    return any(
        "instance_state_taken_over" in line and dead in line for line in survivor.log().splitlines()
    )


def _relayed(gateway: GatewayProcess) -> int:
    return gateway.log().count("message_relayed")


async def test_two_active_instances_on_ejabberd_share_and_survive_a_kill(
    tmp_path: Path,
    ejabberd: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
    pg: str,
) -> None:
    ports = [free_port(), free_port()]
    kamailio = kamailio_factory(ports[0], instances=ports)
    a = _instance(tmp_path, "gw-a", ejabberd, kamailio, pg, ports[0])
    b = _instance(tmp_path, "gw-b", ejabberd, kamailio, pg, ports[1])
    bob = XmppSide(XmppClient(ejabberd.jid(f"scale{secrets.token_hex(3)}"), XMPP_PASSWORD, True))
    await bob.client.start(ejabberd.c2s_port)
    sip = SipSide(await RawSipPeer.open())
    listener = asyncio.create_task(sip.listen())
    users = [f"sip:scale{n}{secrets.token_hex(2)}@{SIP_DOMAIN}" for n in range(USERS)]
    to_bob = f"sip:{bob.client.boundjid.user}*{bob.client.boundjid.domain}@{JDOMAIN}"
    try:
        a.start()
        b.start()
        await a.up()
        await b.up()
        for user in users:
            await _register(sip, kamailio, user)

        def send_from(user: str, body: str, to: str = to_bob) -> str:
            call_id = f"m-{secrets.token_hex(6)}"
            request = sip.peer.request("MESSAGE", to, user, to, body, call_id=call_id)
            sip.peer.send(request, (LOOPBACK, kamailio.port))
            return f"{call_id}@{LOOPBACK}"

        # Both ways, several users: the dispatcher's hash and ejabberd spread them.
        calls = [send_from(u, f"{i}:{n}") for n, u in enumerate(users) for i in range(EACH)]
        for user in users:
            for i in range(EACH):
                bob.send(component_jid(user), f"x{i}:{user}")
        await wait_until(lambda: all(sip.answers.get(c) for c in calls), 30)
        assert all(200 <= sip.answers[c] < 300 for c in calls)

        def bob_has_all() -> bool:
            bob.take()
            return len(bob.bodies) >= USERS * EACH

        await wait_until(bob_has_all, 30)
        await wait_until(lambda: len(sip.notices) >= USERS * EACH, 30)
        assert sorted(bob.bodies) == sorted(f"{i}:{n}" for n in range(USERS) for i in range(EACH))
        assert _relayed(a) > 0 and _relayed(b) > 0  # both instances carried messages

        # ejabberd bounces a message to an account that does not exist; the error lands on
        # either instance, and the one that sent the message tells its SIP sender.
        nobody = f"sip:nobody{secrets.token_hex(3)}*{bob.client.boundjid.domain}@{JDOMAIN}"
        told_before = len(sip.notices)
        for n, user in enumerate(users * 2):
            send_from(user, f"lost {n}", to=nobody)

        def bounced() -> int:
            return sum("was not delivered" in t for t in sip.notices[told_before:])

        await wait_until(lambda: bounced() >= 2 * USERS, 30)
        told = {
            g: (g.log().count("message_bounced"), g.log().count("error_unmatched")) for g in (a, b)
        }
        print(f"{2 * USERS} bounced: (told, errors that landed elsewhere) per instance {told}")

        # A stream through the dispatcher; gw-a killed in the middle of it.
        bob.bodies.clear()
        notices_before = len(sip.notices)
        streamed: list[tuple[str, str]] = []
        for i in range(60):
            user = users[i % USERS]
            body = f"s{i:03}"
            streamed.append((send_from(user, body), body))
            if i == 30:
                _kill(a)
            await asyncio.sleep(0.02)
        await wait_until(lambda: all(sip.answers.get(c) for c, _ in streamed), 60)
        accepted = [body for call, body in streamed if 200 <= sip.answers[call] < 300]
        # The survivor takes over gw-a within two check_time intervals of its last beat, plus
        # one check; the messages gw-a answered are then retried from the shared queue.
        await wait_until(lambda: _took_over(b, "gw-a"), 10 * CHECK)

        def settled() -> bool:
            bob.take()
            told = "\n".join(sip.notices[notices_before:])
            return all(body in bob.bodies or body in told for body in accepted)

        await wait_until(settled, 60)
        assert len(accepted) >= 30  # the dispatcher kept answering through the survivor
    finally:
        listener.cancel()
        await bob.client.stop()
        for gateway in (a, b):
            gateway.process.close()


async def _owners(url: str, watched: str) -> tuple[list[SeatOwner], list[str]]:
    """The seats' owners, and the owners of subscriptions to ``watched``'s presence."""
    store = await Store.open(url, instance="test-probe")
    try:
        return await store.seat_owners(), await store.watcher_owners(watched)
    finally:
        await store.close()


def _forwarded(gateway: GatewayProcess, to: str) -> int:
    """Stanzas ``gateway`` forwarded to instance ``to``."""
    events = (json.loads(line) for line in gateway.log().splitlines() if line.startswith("{"))
    return sum(e["count"] for e in events if e["event"] == "stanzas_forwarded" and e["to"] == to)


async def _room_bodies(account: SipAccount, room_uri: str, want: set[str], timeout: float) -> None:
    """Wait until every body in ``want`` came as a MESSAGE from ``room_uri``."""
    got: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not want <= set(got):
        left = deadline - loop.time()
        try:
            msg: ReceivedMessage = await account.next_message(timeout=max(left, 0.01))
        except TimeoutError:
            raise AssertionError(f"missing {sorted(want - set(got))}; got {got}") from None
        if room_uri in msg.from_uri:
            got.append(msg.body.partition(": ")[2])  # "nick: text"


def _relayed_from(gateway: GatewayProcess, jid: str) -> int:
    """Chat messages from ``jid`` that ``gateway`` relayed to SIP."""
    events = (json.loads(line) for line in gateway.log().splitlines() if line.startswith("{"))
    return sum(
        1
        for e in events
        if e["event"] == "message_relayed" and str(e.get("jid", "")).startswith(jid)
    )


async def _chat_bodies(account: SipAccount, uri: str, count: int, timeout: float) -> list[str]:
    """The bodies of the next ``count`` MESSAGEs from ``uri``, in arrival order."""
    got: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(got) < count:
        try:
            msg = await account.next_message(timeout=max(deadline - loop.time(), 0.01))
        except TimeoutError:
            raise AssertionError(f"{len(got)} of {count} arrived: {got}") from None
        if uri in msg.from_uri:
            got.append(msg.body)
    return got


async def _joined(account: SipAccount, text: str, timeout: float) -> None:
    """Wait for the gateway's notice containing ``text``."""
    seen: list[str] = []
    while not any(text in body for body in seen):
        try:
            seen.append((await account.next_message(timeout=timeout)).body)
        except TimeoutError:
            raise AssertionError(f"no notice with {text!r}; got {seen}") from None


async def _note(account: SipAccount, uri: str, note: str, timeout: float) -> BuddyState:
    """The first NOTIFY showing ``uri`` online with ``note``."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            state = await account.next_buddy_state(timeout=max(0.01, deadline - loop.time()))
        except TimeoutError:
            raise AssertionError(f"no NOTIFY with note {note!r}; saw {seen}") from None
        seen.append(f"{state.sub_state}/{state.online}/{state.note!r}")
        if state.uri == uri and state.online and state.note == note:
            return state


async def test_room_seat_and_presence_watch_reach_their_owner_and_survive_its_kill(
    tmp_path: Path,
    ejabberd: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
    pjsip_agent: PjsipAgent,
    pg: str,
) -> None:
    ports = [free_port(), free_port()]
    kamailio = kamailio_factory(ports[0], instances=ports)
    gateways = {
        "gw-a": _instance(tmp_path, "gw-a", ejabberd, kamailio, pg, ports[0]),
        "gw-b": _instance(tmp_path, "gw-b", ejabberd, kamailio, pg, ports[1]),
    }
    tag = secrets.token_hex(3)
    dave = XmppClient(ejabberd.jid(f"dave{tag}"), XMPP_PASSWORD, True)
    bob = XmppClient(ejabberd.jid(f"bob{tag}"), XMPP_PASSWORD, True)  # approves by default
    room = f"scale{tag}@{MUC_DOMAIN}"
    local, service = room.split("@")
    room_uri = f"{local}*{service}@{JDOMAIN}"
    try:
        for gateway in gateways.values():
            gateway.start()
        for gateway in gateways.values():
            await gateway.up()
        await dave.start(ejabberd.c2s_port)
        await bob.start(ejabberd.c2s_port)
        await dave.join_room(room, "dave")
        carol = await pjsip_agent.add_account(f"carol{tag}", kamailio)
        assert (await carol.send_message(f"sip:carol*{room_uri}", "/join")).code == 202
        await _joined(carol, f"{room} as carol", 20)
        bob_bare = str(bob.boundjid.bare)
        bob_uri = f"sip:{bob_bare.replace('@', '*')}@{JDOMAIN}"
        await carol.subscribe(bob_uri)
        bob.send_presence(pshow="away", pstatus="n-start")
        await _note(carol, bob_uri, "n-start", 20)
        seats, watchers = await _owners(pg, bob_bare)
        assert [s.room_jid for s in seats] == [room]
        owner = seats[0].owner
        assert watchers == [owner]  # the dispatcher's hash kept carol on one instance
        [other] = [name for name in gateways if name != owner]

        # Before the kill: ejabberd spreads the room's messages and bob's presence changes over
        # both connections; what lands on the other instance is forwarded to the owner.
        bodies = {f"r{i:02}" for i in range(30)}
        for body in sorted(bodies):
            dave.send_groupchat(room, body)
        await _room_bodies(carol, room_uri, bodies, 30)
        for k in range(8):
            bob.send_presence(pshow="away", pstatus=f"n{k}")
            await _note(carol, bob_uri, f"n{k}", 20)
        forwarded = _forwarded(gateways[other], owner)
        assert forwarded > 0, "ejabberd handed the other instance nothing: nothing was routed"

        # One-to-one chat from one XMPP user: ejabberd 23.01 spreads even one sender's stanzas
        # over the connections, and each instance keeps its own per-conversation order.
        chats = [f"c{i:02}" for i in range(30)]
        for body in chats:
            bob.send_message(mto=JID(f"carol{tag}@{COMPONENT_DOMAIN}"), mbody=body, mtype="chat")
        got = await _chat_bodies(carol, bob_uri, len(chats), 30)
        assert sorted(got) == chats
        relayed = {name: _relayed_from(g, bob_bare) for name, g in gateways.items()}
        assert all(relayed.values()), f"one sender's chat stayed on one connection: {relayed}"
        inversions = sum(a > b for i, a in enumerate(got) for b in got[i + 1 :])
        print(f"one sender's 30 chats: relayed per instance {relayed}, {inversions} inversions")

        # The owner dies; the survivor takes over, rejoins the seat and notifies carol.
        killed_at = time.monotonic()
        _kill(gateways[owner])
        await wait_until(lambda: _took_over(gateways[other], owner), 10 * CHECK)
        after = {f"after{i:02}" for i in range(10)}
        for body in sorted(after):
            dave.send_groupchat(room, body)
        await _room_bodies(carol, room_uri, after, 30)
        room_back = time.monotonic() - killed_at
        bob.send_presence(pshow="dnd", pstatus="n-after")
        await _note(carol, bob_uri, "n-after", 30)
        presence_back = time.monotonic() - killed_at
        print(
            f"forwarded before the kill: {forwarded}; after the kill, room messages back in "
            f"{room_back:.1f} s, presence in {presence_back:.1f} s (check_time {CHECK} s)"
        )
    finally:
        await dave.stop()
        await bob.stop()
        for name, gateway in gateways.items():
            (tmp_path / f"{name}.log").write_text(gateway.log())  # kept for a failure's reader
            gateway.process.close()


async def test_prosody_standby_takes_over_when_the_active_one_dies(
    tmp_path: Path,
    prosody: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
    pg: str,
) -> None:
    ports = [free_port(), free_port()]
    kamailio = kamailio_factory(ports[0], instances=ports)
    a = _instance(tmp_path, "gw-a", prosody, kamailio, pg, ports[0])
    b = _instance(tmp_path, "gw-b", prosody, kamailio, pg, ports[1])
    bob = XmppSide(XmppClient(prosody.jid(f"standby{secrets.token_hex(3)}"), XMPP_PASSWORD, True))
    await bob.client.start(prosody.c2s_port)
    sip = SipSide(await RawSipPeer.open())
    listener = asyncio.create_task(sip.listen())
    carol = f"sip:standby{secrets.token_hex(2)}@{SIP_DOMAIN}"
    try:
        a.start()
        await a.up()
        b.start()
        # gw-b is refused (conflict) while gw-a holds the component domain: it keeps retrying.
        await wait_until(lambda: "gateway_started" in b.log(), 30)
        await asyncio.sleep(2 * CHECK)  # a few refused attempts
        assert "xmpp_link_up" not in b.log()
        await _register(sip, kamailio, carol)
        bob.send(component_jid(carol), "before")
        await wait_until(lambda: "before" in sip.notices, 20)
        _kill(a)
        await b.up(timeout=10 * CHECK)  # active within check_time of the link drop (+ startup)
        await wait_until(lambda: _took_over(b, "gw-a"), 10 * CHECK)
        bob.send(component_jid(carol), "after")
        await wait_until(lambda: "after" in sip.notices, 20)
    finally:
        listener.cancel()
        await bob.client.stop()
        for gateway in (a, b):
            gateway.process.close()
