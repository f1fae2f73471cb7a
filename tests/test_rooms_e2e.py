"""Chat rooms end to end (DESIGN 6): PJSIP <-> Kamailio <-> gateway <-> Prosody MUC / ejabberd
mod_muc <-> slixmpp clients, every server real and on loopback. Runs once per XMPP server.

A SIP user joins by a MESSAGE to an occupant address (``nick*room*service@jdomain``) and talks
by MESSAGEs to the room address (``room*service@jdomain``); what the room says arrives as
MESSAGEs from the room address with the speaker's nick, and the gateway's notices come from
``sip.registrar``.
"""

from __future__ import annotations

import asyncio
import itertools
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID

from tests.gateway_fixture import RunningGateway, gateway_behind_kamailio, wait_until
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent, ReceivedMessage, SipAccount
from tests.harness.values import COMPONENT_DOMAIN, JDOMAIN, MUC_DOMAIN, SIP_DOMAIN
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

pytestmark = pytest.mark.slow

ClientFactory = Callable[[str], Awaitable[XmppClient]]
World = tuple[RunningGateway, KamailioServer]

REGISTRAR = f"sip:jabber_gateway@{SIP_DOMAIN}"
_numbers = itertools.count(1)


@pytest.fixture
async def world(
    tmp_path: Path,
    xmpp_server: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
) -> AsyncIterator[World]:
    """Kamailio in front of a running gateway connected to the XMPP server under test."""
    async with gateway_behind_kamailio(tmp_path, xmpp_server.component_port, kamailio_factory) as w:
        yield w


# --- addresses ------------------------------------------------------------------------------


def _room() -> str:
    return f"room{next(_numbers)}@{MUC_DOMAIN}"


def _room_uri(room: str) -> str:
    """DESIGN 3.2: room@conference.xmpp.test is sip:room*conference.xmpp.test@jabber.sip.test."""
    local, domain = room.split("@")
    return f"sip:{local}*{domain}@{JDOMAIN}"


def _occupant_uri(room: str, nick: str) -> str:
    """DESIGN 3.2: room@service/nick is sip:nick*room*service@jdomain."""
    local, domain = room.split("@")
    return f"sip:{nick}*{local}*{domain}@{JDOMAIN}"


def _user(account: SipAccount) -> str:
    return account.uri.split(":", 1)[1].split("@", 1)[0]


def _component_jid(account: SipAccount) -> str:
    return f"{_user(account)}@{COMPONENT_DOMAIN}"


async def _sip_user(agent: PjsipAgent, kamailio: KamailioServer) -> SipAccount:
    return await agent.add_account(f"sipper{next(_numbers)}", kamailio)


def _addr(from_header: str) -> str:
    """The URI inside a From value (``"nick" <sip:...>;tag=...``)."""
    text = from_header
    if "<" in text:
        text = text.split("<", 1)[1].split(">", 1)[0]
    return text.split(";", 1)[0].strip()


def _display(from_header: str) -> str | None:
    if "<" not in from_header:
        return None
    return from_header.split("<", 1)[0].strip().strip('"') or None


# --- waiting for what arrives ----------------------------------------------------------------


async def _sip_message(
    account: SipAccount,
    match: Callable[[ReceivedMessage], bool],
    timeout: float = 15.0,
) -> ReceivedMessage:
    """The first MESSAGE that matches; what was skipped is in the failure message."""
    skipped: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        left = deadline - loop.time()
        try:
            msg = await account.next_message(timeout=max(left, 0.01))
        except TimeoutError:
            raise AssertionError(f"no matching MESSAGE; skipped: {skipped}") from None
        if match(msg):
            return msg
        skipped.append(f"{msg.from_uri}: {msg.body}")


async def _notice(account: SipAccount, contains: str, timeout: float = 15.0) -> ReceivedMessage:
    """The next notice from sip.registrar containing ``contains``."""
    return await _sip_message(
        account, lambda m: _addr(m.from_uri) == REGISTRAR and contains in m.body, timeout
    )


async def _from_room(account: SipAccount, room: str, body: str) -> ReceivedMessage:
    return await _sip_message(
        account, lambda m: _addr(m.from_uri) == _room_uri(room) and m.body == body
    )


async def _no_sip_message(account: SipAccount, seconds: float) -> list[str]:
    """Every MESSAGE that arrives within ``seconds``."""
    got: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (left := deadline - loop.time()) > 0:
        try:
            msg = await account.next_message(timeout=left)
        except TimeoutError:
            break
        got.append(f"{msg.from_uri}: {msg.body}")
    return got


async def _groupchat(client: XmppClient, room: str, body: str, timeout: float = 15.0) -> Any:
    """The first groupchat message from ``room`` with ``body``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: list[str] = []
    while True:
        left = deadline - loop.time()
        try:
            msg = await client.next_message(timeout=max(left, 0.01))
        except TimeoutError:
            raise AssertionError(f"no groupchat {body!r}; seen: {seen}") from None
        if str(msg["from"].bare) == room and msg["body"] == body:
            return msg
        seen.append(f"{msg['from']} {msg['type']}: {msg['body']}")


async def _occupant_presence(client: XmppClient, room: str, nick: str) -> Any:
    """Wait until ``client`` sees ``nick`` available in ``room``."""
    while True:
        pres = await client.next_presence(timeout=15)
        if str(pres["from"]) == f"{room}/{nick}" and pres["type"] != "unavailable":
            return pres


async def _join(account: SipAccount, room: str, nick: str) -> ReceivedMessage:
    """The SIP user joins ``room`` as ``nick`` and gets the joined notice."""
    status = await account.send_message(_occupant_uri(room, nick), "/join")
    assert status.code == 202
    return await _notice(account, f"{room} as {nick}")


async def _alice_and_a_room_of_bob(
    world: World, agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> tuple[SipAccount, XmppClient, str]:
    """alice (SIP, registered), and a new room with bob (XMPP) in it as bob."""
    _, kamailio = world
    alice = await _sip_user(agent, kamailio)
    bob = await xmpp_client_factory("bob")
    room = _room()
    await bob.join_room(room, "bob")
    return alice, bob, room


async def _alice_and_bob_in_a_room(
    world: World, agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> tuple[SipAccount, XmppClient, str]:
    """A new room with bob (XMPP) in it, and alice (SIP) joined as alice."""
    alice, bob, room = await _alice_and_a_room_of_bob(world, agent, xmpp_client_factory)
    await _join(alice, room, "alice")
    return alice, bob, room


# --- the tests --------------------------------------------------------------------------------


async def test_join_talk_both_ways_without_echo(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_a_room_of_bob(world, pjsip_agent, xmpp_client_factory)
    notice = await _join(alice, room, "alice")
    assert "2 occupants" in notice.body
    await _occupant_presence(bob, room, "alice")
    # SIP -> room: a groupchat from the room occupant alice
    status = await alice.send_message(_room_uri(room), "hello room ✓")
    assert status.code == 202
    msg = await _groupchat(bob, room, "hello room ✓")
    assert str(msg["from"]) == f"{room}/alice"
    # room -> SIP: from the room's address, nick as display name and body prefix
    bob.send_groupchat(room, "hi alice <&>")
    got = await _from_room(alice, room, "bob: hi alice <&>")
    assert _display(got.from_uri) == "bob"
    # no echo: alice's own message came back from the room only to the room, not to her
    assert [m for m in await _no_sip_message(alice, 1.5) if "hello room" in m] == []


async def test_private_messages_both_ways(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_bob_in_a_room(world, pjsip_agent, xmpp_client_factory)
    status = await alice.send_message(_occupant_uri(room, "bob"), "psst bob")
    assert status.code == 202
    while True:
        msg = await bob.next_message(timeout=15, with_body=True)
        if msg["body"] == "psst bob":
            break
    assert str(msg["from"]) == f"{room}/alice"
    assert msg["type"] == "chat"
    msg.reply("psst alice").send()  # type: ignore[no-untyped-call]
    got = await _sip_message(alice, lambda m: m.body == "psst alice")
    assert _addr(got.from_uri) == _occupant_uri(room, "bob")


async def test_nick_conflict_is_told(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    bob = await xmpp_client_factory("bob")
    room = _room()
    await bob.join_room(room, "taken")
    status = await alice.send_message(_occupant_uri(room, "taken"), "/join")
    assert status.code == 202
    notice = await _notice(alice, "Could not join")
    assert "already in use" in notice.body
    # the failed join left no seat: a join under another nick works
    await _join(alice, room, "free")


async def test_commands_who_topic_nick_leave(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_bob_in_a_room(world, pjsip_agent, xmpp_client_factory)
    assert (await alice.send_message(_room_uri(room), "/who")).code == 202
    who = await _notice(alice, f"In {room}")
    assert "alice" in who.body and "bob" in who.body
    # bob created the room: he owns it and may set the topic; the change reaches alice
    bob.send_message(mto=JID(room), msubject="the plan", mtype="groupchat")
    await _notice(alice, "set the topic")
    assert (await alice.send_message(_room_uri(room), "/topic")).code == 202
    assert "the plan" in (await _notice(alice, "Topic of")).body
    assert (await alice.send_message(_room_uri(room), "/nick alison")).code == 202
    await _notice(alice, f"You are now alison in {room}")
    await _occupant_presence(bob, room, "alison")
    assert (await alice.send_message(_room_uri(room), "/leave")).code == 202
    await _notice(alice, f"You left {room}")
    while True:
        pres = await bob.next_presence(timeout=15, ptype="unavailable")
        if str(pres["from"]) == f"{room}/alison":
            break
    # out of the room: bob's messages no longer reach alice
    bob.send_groupchat(room, "anyone?")
    assert [m for m in await _no_sip_message(alice, 1.5) if "anyone?" in m] == []


async def test_invitation_reaches_sip_user_and_join_by_reply(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_a_room_of_bob(world, pjsip_agent, xmpp_client_factory)
    # XEP-0249 direct invitation
    invite = bob.Message()
    invite["to"] = _component_jid(alice)
    invite.append(_direct_invite(room, "come chat"))
    invite.send()
    got = await _sip_message(alice, lambda m: "invites you" in m.body)
    assert room in got.body and "come chat" in got.body and str(bob.boundjid.bare) in got.body
    assert _addr(got.from_uri) == _room_uri(room)
    # replying /join to what arrived joins the room
    assert (await alice.send_message(_addr(got.from_uri), "/join")).code == 202
    await _notice(alice, f"You joined {room}")


def _direct_invite(room: str, reason: str) -> ET.Element:
    """XEP-0249: ``<x xmlns="jabber:x:conference" jid=room reason=.../>``."""
    return ET.Element("{jabber:x:conference}x", {"jid": room, "reason": reason})


async def test_order_kept_over_a_burst_of_50(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_bob_in_a_room(world, pjsip_agent, xmpp_client_factory)
    for n in range(50):
        bob.send_groupchat(room, f"burst {n}")
    bodies = []
    for _ in range(50):
        got = await _sip_message(alice, lambda m: m.body.startswith("bob: burst "), timeout=30)
        bodies.append(got.body)
    assert bodies == [f"bob: burst {n}" for n in range(50)]


async def test_rejoin_after_gateway_restart(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    running, _ = world
    alice, bob, room = await _alice_and_bob_in_a_room(world, pjsip_agent, xmpp_client_factory)
    bob.send_groupchat(room, "before restart")
    await _from_room(alice, room, "bob: before restart")
    await running.stop()
    await running.start()
    gateway = running.gateway
    assert gateway is not None
    # the stored seat is rejoined quietly; talking works both ways again
    seats = gateway.rooms.core.seats
    await wait_until(lambda: any(s.state.value == "joined" for s in seats.values()), 20)
    bob.send_groupchat(room, "after restart")
    # nothing was said to alice about the rejoin and no history was replayed: the next
    # MESSAGE she gets is bob's new one
    got = await alice.next_message(timeout=15)
    assert (got.body, _addr(got.from_uri)) == ("bob: after restart", _room_uri(room))
    assert (await alice.send_message(_room_uri(room), "me too")).code == 202
    await _groupchat(bob, room, "me too")


async def _configure(client: XmppClient, room: str, **fields: str) -> None:
    """The owner submits a room configuration form (XEP-0045 10.2) with these fields."""
    form = client.plugin["xep_0004"].make_form(ftype="submit")  # type: ignore[no-untyped-call]
    form.add_field(
        var="FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/muc#roomconfig"
    )
    for var, value in fields.items():
        form.add_field(var=f"muc#roomconfig_{var}", value=value)
    await client.plugin["xep_0045"].set_room_config(JID(room), form, timeout=10)


async def test_members_only_room_refuses(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_a_room_of_bob(world, pjsip_agent, xmpp_client_factory)
    await _configure(bob, room, membersonly="1")
    assert (await alice.send_message(_occupant_uri(room, "alice"), "/join")).code == 202
    notice = await _notice(alice, "Could not join")
    assert "members-only" in notice.body


async def test_password_room(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_a_room_of_bob(world, pjsip_agent, xmpp_client_factory)
    await _configure(bob, room, passwordprotectedroom="1", roomsecret="s3cret")
    assert (await alice.send_message(_room_uri(room), "/join alice")).code == 202
    assert "needs a password" in (await _notice(alice, "Could not join")).body
    assert (await alice.send_message(_room_uri(room), "/join alice wrong")).code == 202
    assert "password is wrong" in (await _notice(alice, "Could not join")).body
    assert (await alice.send_message(_room_uri(room), "/join alice s3cret")).code == 202
    await _notice(alice, f"You joined {room} as alice")
    bob.send_groupchat(room, "welcome")
    await _from_room(alice, room, "bob: welcome")


async def test_rejoin_after_xmpp_server_restart(
    world: World,
    pjsip_agent: PjsipAgent,
    xmpp_server: XmppServer,
    xmpp_client_factory: ClientFactory,
) -> None:
    running, _ = world
    alice, _, room = await _alice_and_bob_in_a_room(world, pjsip_agent, xmpp_client_factory)
    gateway = running.gateway
    assert gateway is not None
    await asyncio.get_running_loop().run_in_executor(None, xmpp_server.restart)
    await wait_until(lambda: gateway.xmpp.connected, 60)
    seats = gateway.rooms.core.seats
    await wait_until(lambda: any(s.state.value == "joined" for s in seats.values()), 30)
    carol = await xmpp_client_factory("carol")
    await carol.join_room(room, "carol")
    await _occupant_presence(carol, room, "alice")
    carol.send_groupchat(room, "after server restart")
    # the rejoin told alice nothing: the next MESSAGE she gets is carol's
    got = await alice.next_message(timeout=15)
    assert (got.body, _addr(got.from_uri)) == ("carol: after server restart", _room_uri(room))
    assert (await alice.send_message(_room_uri(room), "still here")).code == 202
    await _groupchat(carol, room, "still here")


async def test_sip_user_invites_an_xmpp_user(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    bob = await xmpp_client_factory("bob")
    carol = await xmpp_client_factory("carol")
    room = _room()
    await bob.join_room(room, "bob")
    # ejabberd lets only moderators invite unless the room allows it
    await _configure(bob, room, allowinvites="1")
    await _join(alice, room, "alice")
    carol_jid = str(carol.boundjid.bare)
    status = await alice.send_message(_room_uri(room), f"/invite {carol_jid} see this")
    assert status.code == 202
    await _notice(alice, f"Invitation to {room} sent to {carol_jid}")
    ns = "{http://jabber.org/protocol/muc#user}"
    while True:
        msg = await carol.next_message(timeout=15)
        invite = msg.xml.find(f"{ns}x/{ns}invite")
        if invite is not None:
            break
    # XEP-0045 7.8.2: the room passes it on, naming the inviter
    assert str(msg["from"].bare) == room
    # from the occupant (semi-anonymous room) or the SIP user's JID (non-anonymous)
    assert (invite.get("from") or "") in (f"{room}/alice", f"{_component_jid(alice)}/sip")
    assert invite.findtext(f"{ns}reason") == "see this"
