"""The edges of chat rooms: MUC stanzas in and out (component/xmpp/muc.py, XEP-0045 examples),
the origin-id on groupchat, and seats kept through the store port without passwords."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from component.rooms.ports import StoredMemberships
from component.store.memory import MemoryStore
from component.values import ChatMessage, Membership, ServiceKind
from component.xmpp.muc import (
    format_instant_room,
    format_invitation,
    parse_invitation,
    parse_room_message,
    parse_room_presence,
    service_info,
)
from component.xmpp.stanzas import format_message

NS = "jabber:component:accept"
ROOM = "coven@chat.shakespeare.lit"
ME = "alice@sip.xmpp.test/sip"


def _element(text: str) -> ET.Element:
    tag_end = text.index(" ")
    return ET.fromstring(text[:tag_end] + f' xmlns="{NS}"' + text[tag_end:])


def test_self_presence_with_codes_item_and_show() -> None:
    xml = _element(
        f'<presence from="{ROOM}/thirdwitch" to="{ME}"><show>away</show>'
        '<x xmlns="http://jabber.org/protocol/muc#user">'
        '<item affiliation="member" role="participant" jid="hag66@shakespeare.lit/pda"/>'
        '<status code="110"/><status code="210"/></x></presence>'
    )
    p = parse_room_presence(xml, f"{ROOM}/thirdwitch", ME)
    assert (p.type, p.show, p.status_codes) == (None, "away", (110, 210))
    assert (p.affiliation, p.role, p.real_jid) == (
        "member",
        "participant",
        "hag66@shakespeare.lit/pda",
    )


def test_kick_with_actor_and_reason() -> None:
    xml = _element(
        f'<presence from="{ROOM}/pistol" to="{ME}" type="unavailable">'
        '<x xmlns="http://jabber.org/protocol/muc#user">'
        '<item affiliation="none" role="none"><actor nick="Fluellen"/>'
        "<reason>Avaunt, you cullion!</reason></item>"
        '<status code="110"/><status code="307"/></x></presence>'
    )
    p = parse_room_presence(xml, f"{ROOM}/pistol", ME)
    assert (p.type, p.status_codes) == ("unavailable", (110, 307))
    assert (p.actor, p.reason) == ("Fluellen", "Avaunt, you cullion!")


def test_nick_change_and_destroy() -> None:
    rename = parse_room_presence(
        _element(
            f'<presence from="{ROOM}/old" to="{ME}" type="unavailable">'
            '<x xmlns="http://jabber.org/protocol/muc#user"><item nick="new"/>'
            '<status code="303"/><status code="110"/></x></presence>'
        ),
        f"{ROOM}/old",
        ME,
    )
    assert (rename.item_nick, rename.status_codes) == ("new", (303, 110))
    gone = parse_room_presence(
        _element(
            f'<presence from="{ROOM}/me" to="{ME}" type="unavailable">'
            '<x xmlns="http://jabber.org/protocol/muc#user"><item role="none"/>'
            '<destroy jid="coven2@chat.shakespeare.lit"><reason>moved</reason></destroy>'
            "</x></presence>"
        ),
        f"{ROOM}/me",
        ME,
    )
    assert (gone.destroyed, gone.alternate_venue, gone.reason) == (
        True,
        "coven2@chat.shakespeare.lit",
        "moved",
    )


def test_join_error_condition_and_text() -> None:
    xml = _element(
        f'<presence from="{ROOM}/me" to="{ME}" type="error">'
        '<x xmlns="http://jabber.org/protocol/muc"/><error type="cancel">'
        '<conflict xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/>'
        '<text xmlns="urn:ietf:params:xml:ns:xmpp-stanzas">in use</text></error></presence>'
    )
    p = parse_room_presence(xml, f"{ROOM}/me", ME)
    assert (p.type, p.error_condition, p.error_text) == ("error", "conflict", "in use")


def test_groupchat_with_origin_id_and_delay_and_a_subject() -> None:
    msg = parse_room_message(
        _element(
            f'<message from="{ROOM}/bob" to="{ME}" type="groupchat" id="r1"><body>hi</body>'
            '<origin-id xmlns="urn:xmpp:sid:0" id="mine-7"/>'
            '<delay xmlns="urn:xmpp:delay" stamp="2002-10-13T23:58:37Z"/></message>'
        ),
        f"{ROOM}/bob",
        ME,
    )
    assert (msg.body, msg.id, msg.origin_id, msg.delay_stamp) == (
        "hi",
        "r1",
        "mine-7",
        "2002-10-13T23:58:37Z",
    )
    topic = parse_room_message(
        _element(
            f'<message from="{ROOM}/bob" to="{ME}" type="groupchat"><subject>plan</subject>'
            "</message>"
        ),
        f"{ROOM}/bob",
        ME,
    )
    assert (topic.body, topic.subject, topic.type) == (None, "plan", "groupchat")


def test_direct_and_mediated_invitations() -> None:
    direct = parse_invitation(
        _element(
            f'<message from="crone1@shakespeare.lit/desktop" to="{ME}">'
            f'<x xmlns="jabber:x:conference" jid="{ROOM}" password="cauldronburn" '
            'reason="Hey Hecate"/></message>'
        ),
        "crone1@shakespeare.lit/desktop",
        ME,
    )
    assert direct is not None
    assert (direct.room, direct.inviter, direct.password, direct.reason, direct.mediated) == (
        ROOM,
        "crone1@shakespeare.lit/desktop",
        "cauldronburn",
        "Hey Hecate",
        False,
    )
    mediated = parse_invitation(
        _element(
            f'<message from="{ROOM}" to="{ME}"><x xmlns="http://jabber.org/protocol/muc#user">'
            '<invite from="crone1@shakespeare.lit/desktop"><reason>Join us</reason></invite>'
            "<password>cauldronburn</password></x></message>"
        ),
        ROOM,
        ME,
    )
    assert mediated is not None
    assert (mediated.room, mediated.inviter, mediated.reason, mediated.password) == (
        ROOM,
        "crone1@shakespeare.lit/desktop",
        "Join us",
        "cauldronburn",
    )
    # A room passing a mediated invitation on may add a XEP-0249 element (Prosody does): the
    # mediated one names the inviter and the reason, so it wins.
    both = parse_invitation(
        _element(
            f'<message from="{ROOM}" to="{ME}"><x xmlns="jabber:x:conference" jid="{ROOM}"/>'
            '<x xmlns="http://jabber.org/protocol/muc#user">'
            '<invite from="crone1@shakespeare.lit/desktop"><reason>Join us</reason></invite>'
            "</x></message>"
        ),
        ROOM,
        ME,
    )
    assert both is not None
    assert (both.inviter, both.reason, both.mediated) == (
        "crone1@shakespeare.lit/desktop",
        "Join us",
        True,
    )
    plain = _element(
        f'<message from="{ROOM}/bob" to="{ME}" type="groupchat"><body>x</body></message>'
    )
    assert parse_invitation(plain, f"{ROOM}/bob", ME) is None


@pytest.mark.parametrize(
    ("children", "kind"),
    [
        ('<identity category="conference" type="text"/>', ServiceKind.MUC),
        ('<feature var="http://jabber.org/protocol/muc"/>', ServiceKind.MUC),
        (
            '<identity category="server" type="im"/><feature var="jabber:iq:version"/>',
            ServiceKind.OTHER,
        ),
    ],
)
def test_disco_info_tells_a_room_service(children: str, kind: ServiceKind) -> None:
    iq = _element(
        '<iq type="result" from="chat.shakespeare.lit" to="sip.xmpp.test" id="1">'
        f'<query xmlns="http://jabber.org/protocol/disco#info">{children}</query></iq>'
    )
    assert service_info("chat.shakespeare.lit", iq).kind is kind


def test_outbound_room_stanzas() -> None:
    groupchat = format_message(
        ChatMessage(ME, ROOM, "hi", id="m1", type="groupchat", origin_id="m1")
    )
    out = ET.fromstring(groupchat)
    assert out.find("{urn:xmpp:sid:0}origin-id").get("id") == "m1"  # type: ignore[union-attr]
    invite = ET.fromstring(format_invitation(ME, ROOM, "bob@xmpp.test", "come & see", "i1"))
    assert invite.get("id") == "i1"  # the room's error for it comes back with this id
    item = invite.find(
        "{http://jabber.org/protocol/muc#user}x/{http://jabber.org/protocol/muc#user}invite"
    )
    assert item is not None and item.get("to") == "bob@xmpp.test"
    assert item.findtext("{http://jabber.org/protocol/muc#user}reason") == "come & see"
    owner = ET.fromstring(format_instant_room(ME, ROOM, "q1"))
    form = owner.find("{http://jabber.org/protocol/muc#owner}query/{jabber:x:data}x")
    assert (owner.get("type"), form is not None and form.get("type")) == ("set", "submit")


async def test_memberships_are_kept_with_their_passwords() -> None:
    store = MemoryStore()
    seats = StoredMemberships(store)
    await seats.save_membership(Membership("sip:alice@sip.test", ROOM, "alice", "secret"))
    await seats.save_membership(Membership("sip:alice@sip.test", ROOM, "alison", "s3cret"))
    await seats.save_membership(Membership("sip:bob@sip.test", ROOM, "bob"))
    assert await seats.list_memberships() == [
        Membership("sip:alice@sip.test", ROOM, "alison", "s3cret"),
        Membership("sip:bob@sip.test", ROOM, "bob"),
    ]
    assert await seats.delete_membership("sip:bob@sip.test", ROOM)
    assert await seats.delete_membership("sip:alice@sip.test", ROOM)
    assert not await seats.delete_membership("sip:alice@sip.test", ROOM)
    assert await seats.list_memberships() == []
