"""Chat rooms end to end, continued (DESIGN 6): several users in one room, invitations both
ways and refused, a SIP user's own presence in the room, offline members, and a password room
after a restart. PJSIP <-> Kamailio <-> gateway <-> Prosody MUC / ejabberd mod_muc <-> slixmpp.

Kamailio copies REGISTERs to the gateway and there is no SIP presence server
(``presence.sip_server = false``): the gateway knows who is online (DESIGN 5.4).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID

from tests.gateway_fixture import gateway_behind_kamailio, wait_until
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer
from tests.test_rooms_e2e import (
    REGISTRAR,
    ClientFactory,
    World,
    _addr,
    _alice_and_a_room_of_bob,
    _alice_and_bob_in_a_room,
    _component_jid,
    _configure,
    _display,
    _from_room,
    _groupchat,
    _join,
    _no_sip_message,
    _notice,
    _occupant_presence,
    _room,
    _room_uri,
    _sip_message,
    _sip_user,
)

pytestmark = pytest.mark.slow

NS_MUC_USER = "{http://jabber.org/protocol/muc#user}"


@pytest.fixture
async def world(
    tmp_path: Path,
    xmpp_server: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
) -> AsyncIterator[World]:
    """Kamailio copying REGISTERs to a running gateway without a SIP presence server."""

    def kamailio(port: int) -> KamailioServer:
        return kamailio_factory(port, copy_register=True)

    async with gateway_behind_kamailio(
        tmp_path, xmpp_server.component_port, kamailio, presence={"sip_server": False}
    ) as w:
        yield w


async def _room_presence(client: XmppClient, room: str, nick: str, timeout: float = 15) -> Any:
    """The next presence ``client`` sees from ``room``/``nick`` (any type)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pres = await client.next_presence(timeout=max(deadline - loop.time(), 0.01))
        if str(pres["from"]) == f"{room}/{nick}":
            return pres


async def _shows(client: XmppClient, room: str, nick: str, show: str, status: str) -> None:
    """Wait until ``client`` sees ``nick`` in ``room`` with this show and status."""
    seen: list[str] = []
    while True:
        try:
            pres = await _room_presence(client, room, nick)
        except TimeoutError:
            raise AssertionError(f"{nick} never showed {show!r}; saw {seen}") from None
        assert pres["type"] != "unavailable", f"{nick} left {room}: {pres}"
        seen.append(f"{pres['show']}/{pres['status']}")
        if (pres["show"], pres["status"]) == (show, status):
            return


async def _invitation_to(client: XmppClient) -> Any:
    """The next XEP-0045 mediated invitation ``client`` receives, with its message."""
    while True:
        msg = await client.next_message(timeout=15)
        invite = msg.xml.find(f"{NS_MUC_USER}x/{NS_MUC_USER}invite")
        if invite is not None:
            return msg, invite


# --- the tests --------------------------------------------------------------------------------


async def test_two_sip_users_and_two_xmpp_users_talk_in_one_room(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    dave = await _sip_user(pjsip_agent, kamailio)
    bob = await xmpp_client_factory("bob")
    carol = await xmpp_client_factory("carol")
    room = _room()
    await bob.join_room(room, "bob")
    await carol.join_room(room, "carol")
    await _join(alice, room, "alice")
    assert "4 occupants" in (await _join(dave, room, "dave")).body
    await _occupant_presence(bob, room, "dave")
    await _occupant_presence(carol, room, "dave")
    said = {"alice": alice, "dave": dave}
    for nick, account in said.items():
        assert (await account.send_message(_room_uri(room), f"{nick} here")).code == 202
        for client in (bob, carol):
            await _groupchat(client, room, f"{nick} here")
    await _from_room(dave, room, "alice: alice here")
    await _from_room(alice, room, "dave: dave here")
    bob.send_groupchat(room, "bob here")
    carol.send_groupchat(room, "carol here")
    # two speakers at once: the room may pass them on in either order
    for account in (alice, dave):
        got = [await _sip_message(account, lambda m: "here" in m.body) for _ in range(2)]
        assert {m.body for m in got} == {"bob: bob here", "carol: carol here"}
        assert {_addr(m.from_uri) for m in got} == {_room_uri(room)}
    # nobody got their own words back
    assert [m for m in await _no_sip_message(alice, 1.5) if "alice here" in m] == []
    assert [m for m in await _no_sip_message(dave, 0.5) if "dave here" in m] == []


async def test_mediated_invitation_from_an_xmpp_user_reaches_the_sip_user(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_a_room_of_bob(world, pjsip_agent, xmpp_client_factory)
    # XEP-0045 7.8.2: bob asks the room to invite alice; the room passes it on
    bob.plugin["xep_0045"].invite(JID(room), JID(_component_jid(alice)), "our meeting")
    got = await _sip_message(alice, lambda m: "invites you" in m.body)
    assert _addr(got.from_uri) == _room_uri(room)
    assert room in got.body and "our meeting" in got.body and "/join" in got.body
    # the inviter is named: by JID, or by nick in a room that hides JIDs
    assert str(bob.boundjid.bare) in got.body or f"bob in {room}" in got.body
    assert (await alice.send_message(_addr(got.from_uri), "/join")).code == 202
    await _notice(alice, f"You joined {room}")
    await _occupant_presence(bob, room, _component_jid(alice).split("@")[0])


async def test_a_refused_invite_is_told_with_the_reason(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    bob = await xmpp_client_factory("bob")
    carol = await xmpp_client_factory("carol")
    room = _room()
    await bob.join_room(room, "bob")
    # A members-only room where alice is a member: ejabberd lets only moderators invite unless
    # the room allows it; Prosody lets only admins invite to a members-only room.
    await _configure(bob, room, membersonly="1")
    await bob.plugin["xep_0045"].set_affiliation(
        JID(room), "member", jid=JID(_component_jid(alice)), timeout=10
    )
    await _join(alice, room, "alice")
    carol_jid = str(carol.boundjid.bare)
    status = await alice.send_message(_room_uri(room), f"/invite {carol_jid} please")
    assert status.code == 202
    refused = await _notice(alice, "was refused")
    assert refused.body.startswith(f"Your invitation of {carol_jid} to {room} was refused: ")
    assert "does not let you invite" in refused.body
    # the room passed nothing on, and alice is still in it
    bob.send_groupchat(room, "still with us?")
    await _from_room(alice, room, "bob: still with us?")


async def test_away_and_dnd_are_shown_in_the_room(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    alice, bob, room = await _alice_and_bob_in_a_room(world, pjsip_agent, xmpp_client_factory)
    await _occupant_presence(bob, room, "alice")
    for command, show, status in [
        ("away gone fishing", "away", "gone fishing"),
        ("dnd in a call", "dnd", "in a call"),
        ("online", "", ""),
    ]:
        assert (await alice.send_message(REGISTRAR, command)).code == 200
        await _shows(bob, room, "alice", show, status)


async def test_offline_member_stays_and_gets_room_messages_when_back(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    running, _ = world
    alice, bob, room = await _alice_and_bob_in_a_room(world, pjsip_agent, xmpp_client_factory)
    await _occupant_presence(bob, room, "alice")
    # REGISTER with Expires 0, copied to the gateway: alice is offline, shown as extended away
    assert (await alice.unregister()).code == 200
    await _shows(bob, room, "alice", "xa", "offline (messages are kept)")
    store = running.store
    assert store is not None
    for n in range(3):
        bob.send_groupchat(room, f"while you were out {n}")
    # Kamailio answers 404 for a user who is not registered: the messages wait in the queue
    waiting: list[str] = []

    async def queued() -> list[str]:
        return [m.body for m in await store.messages_for_recipient(alice.uri)]

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while len(waiting) < 3 and loop.time() < deadline:
        waiting = await queued()
        await asyncio.sleep(0.2)
    assert waiting == [f"bob: while you were out {n}" for n in range(3)]
    # back: everything arrives in order, from the room with the speaker's nick
    assert (await alice.register()).code == 200
    for n in range(3):
        got = await _sip_message(alice, lambda m: m.body.startswith("bob: while"), timeout=20)
        assert got.body == f"bob: while you were out {n}"
        assert (_addr(got.from_uri), _display(got.from_uri)) == (_room_uri(room), "bob")
    await _shows(bob, room, "alice", "", "")
    # never out of the room: talking works at once
    assert (await alice.send_message(_room_uri(room), "back")).code == 202
    await _groupchat(bob, room, "back")
    assert await queued() == []


async def test_password_room_rejoined_after_a_gateway_restart(
    world: World, pjsip_agent: PjsipAgent, xmpp_client_factory: ClientFactory
) -> None:
    running, _ = world
    alice, bob, room = await _alice_and_a_room_of_bob(world, pjsip_agent, xmpp_client_factory)
    await _configure(bob, room, passwordprotectedroom="1", roomsecret="s3cret")
    assert (await alice.send_message(_room_uri(room), "/join alice s3cret")).code == 202
    await _notice(alice, f"You joined {room} as alice")
    await _occupant_presence(bob, room, "alice")
    await running.stop()
    # The room keeps an occupant whose gateway went away; bob kicks alice meanwhile, so the
    # rejoin is a real join that the room lets in only with the password.
    await bob.plugin["xep_0045"].set_role(JID(room), "alice", "none", timeout=10)
    while (await _room_presence(bob, room, "alice"))["type"] != "unavailable":
        pass
    await running.start()
    gateway = running.gateway
    assert gateway is not None
    seats = gateway.rooms.core.seats
    # A rejoin whose answer does not come within join_timeout (30 s) is tried again: allow one.
    await wait_until(lambda: any(s.state.value == "joined" for s in seats.values()), 45)
    await _occupant_presence(bob, room, "alice")
    bob.send_groupchat(room, "welcome back")
    # no notice about the rejoin (no "Could not rejoin"): the next MESSAGE is bob's
    got = await alice.next_message(timeout=15)
    assert (got.body, _addr(got.from_uri)) == ("bob: welcome back", _room_uri(room))
    assert (await alice.send_message(_room_uri(room), "thanks")).code == 202
    await _groupchat(bob, room, "thanks")
