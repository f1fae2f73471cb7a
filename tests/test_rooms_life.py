"""Room commands, what rooms do to SIP users, invitations, presence, restarts and disco."""

from __future__ import annotations

import pytest

from component.errors import Refusal
from component.rooms.model import (
    DeleteMembership,
    DiscoverService,
    Membership,
    Notice,
    PassToChat,
    RoomInvitation,
    RoomMessage,
    RoomsConfig,
    SaveMembership,
    SeatKey,
    SendInvitation,
    ServiceInfo,
    ServiceKind,
    SipUserState,
)
from component.rooms.seat import OFFLINE_STATUS, SeatState
from component.values import Presence, SipText, StanzaError
from tests.test_rooms_core import (
    ALICE,
    ALICE_JID,
    ROOM,
    ROOM_URI,
    SERVICE,
    T0,
    Gateway,
    error_presence,
    groupchat,
    messages,
    notices,
    occupant_uri,
    of,
    other,
    presences,
    self_presence,
    sip_texts,
    subject,
)

# --- commands to the room address ------------------------------------------------------------


@pytest.mark.parametrize("body", ["/leave", "/exit", "/part", "/PART see you"])
def test_leave_commands(body: str) -> None:
    gw = Gateway()
    gw.join()
    effects = gw.sip(body)
    [bye] = presences(effects)
    assert (bye.type, bye.recipient, bye.sender) == ("unavailable", f"{ROOM}/alice", ALICE_JID)
    assert of(DeleteMembership, effects) == [DeleteMembership(ALICE, ROOM)]
    assert notices(effects) == [f"You left {ROOM}."]
    assert gw.seat_state() is None
    # The room's goodbye and later stanzas find no seat.
    assert gw.presence(self_presence("alice", codes=(110,))) == []
    assert gw.message(groupchat("bob", "still there?")) == []


def test_nick_change_asked_by_the_user() -> None:
    gw = Gateway()
    gw.join()
    assert presences(gw.sip("/nick alicia")) == [Presence(ALICE_JID, f"{ROOM}/alicia")]
    gone = self_presence("alice", codes=(110, 303), type="unavailable", item_nick="alicia")
    effects = gw.presence(gone, self_presence("alicia"))
    assert of(SaveMembership, effects) == [SaveMembership(Membership(ALICE, ROOM, "alicia"))]
    assert notices(effects) == [f"You are now alicia in {ROOM}."]
    # Messages now come as alicia; her reflection by nick is dropped.
    assert gw.message(groupchat("alicia", "me again")) == []


def test_nick_change_refused() -> None:
    gw = Gateway()
    gw.join()
    gw.sip("/nick bob")
    [text] = notices(gw.presence(error_presence("bob", "conflict")))
    assert "Could not change your nick in" in text and "'bob' is already in use" in text
    seat = gw.core.seats[SeatKey(ALICE, ROOM)]
    assert (seat.nick, seat.requested_nick, seat.state) == ("alice", None, SeatState.JOINED)


def test_topic_set_and_shown() -> None:
    gw = Gateway()
    gw.join(topic="Old")
    [msg] = messages(gw.sip("/topic New plans"))
    assert (msg.type, msg.subject, msg.body) == ("groupchat", "New plans", None)
    assert msg.recipient == ROOM
    assert notices(gw.sip("/topic")) == [f"Topic of {ROOM}: Old"]
    # The room's reflection of the change confirms it; a repeat is no news.
    confirmed = f"alice set the topic of {ROOM}: New plans"
    assert notices(gw.message(subject("New plans", nick="alice"))) == [confirmed]
    assert notices(gw.message(subject("New plans", nick="alice"))) == []
    assert notices(gw.sip("/topic")) == [f"Topic of {ROOM}: New plans"]


def test_topic_refused_by_the_room() -> None:
    gw = Gateway()
    gw.join()
    [msg] = messages(gw.sip("/topic mine"))
    err = StanzaError(sender=ROOM, recipient=ALICE_JID, id=msg.id, condition="forbidden")
    assert "may not change the topic" in notices(gw.core.on_message_error(err, gw.now))[0]


def test_who_lists_occupants_with_roles() -> None:
    gw = Gateway()
    gw.sip("/join")
    gw.presence(
        other("bob", role="moderator", affiliation="owner"),
        other("carol", show="dnd"),
        other("eve", role="visitor"),
        other("gone"),
        other("gone", type="unavailable"),
        self_presence("alice"),
    )
    gw.message(subject("t"))
    assert notices(gw.sip("/who")) == [
        f"In {ROOM} (4): bob (moderator, owner), alice, carol (busy), eve (visitor)."
    ]


def test_occupant_renames_follow_in_who() -> None:
    gw = Gateway()
    gw.join()
    gw.presence(other("bob", type="unavailable", status_codes=(303,), item_nick="robert"))
    assert "robert" in notices(gw.sip("/who"))[0]


@pytest.mark.parametrize(
    ("address", "invitee"),
    [
        ("sip:bob@sip.test", "bob@sip.xmpp.test"),
        ("carol@xmpp.test", "carol@xmpp.test"),
        ("sip:carol*xmpp.test@jabber.sip.test", "carol@xmpp.test"),
    ],
)
def test_invite_sends_a_mediated_invitation(address: str, invitee: str) -> None:
    gw = Gateway()
    gw.join()
    effects = gw.sip(f"/invite {address} come and see")
    [invitation] = of(SendInvitation, effects)
    assert invitation == SendInvitation(ALICE_JID, ROOM, invitee, invitation.id, "come and see")
    assert notices(effects) == [f"Invitation to {ROOM} sent to {address}."]


@pytest.mark.parametrize(
    ("condition", "text", "words"),
    [
        ("not-allowed", "Invitations are not allowed in this conference", "does not let you"),
        ("forbidden", None, "does not let you invite"),
        ("jid-malformed", None, "carol@xmpp.test is not a valid address there"),
        ("item-not-found", None, "carol@xmpp.test is not a valid address there"),
        ("remote-server-not-found", None, "carol@xmpp.test could not be reached"),
        ("resource-constraint", None, "resource constraint"),
    ],
)
def test_a_refused_invitation_is_told_with_the_reason(
    condition: str, text: str | None, words: str
) -> None:
    gw = Gateway()
    gw.join()
    [invitation] = of(SendInvitation, gw.sip("/invite carol@xmpp.test come"))
    err = StanzaError(ROOM, ALICE_JID, invitation.id, condition, text=text)
    effects = gw.core.on_message_error(err, gw.now)
    [notice] = notices(effects)
    assert notice.startswith(f"Your invitation of carol@xmpp.test to {ROOM} was refused: ")
    assert words in notice
    assert text is None or f"({text})" in notice
    assert presences(effects) == []  # no rejoin: the seat is fine
    assert gw.seat_state() is SeatState.JOINED
    # a second error with that id is no news
    assert gw.core.on_message_error(err, gw.now) == []


def test_an_invitation_refused_as_not_acceptable_does_not_rejoin() -> None:
    gw = Gateway()
    gw.join()
    [invitation] = of(SendInvitation, gw.sip("/invite carol@xmpp.test"))
    err = StanzaError(ROOM, ALICE_JID, invitation.id, "not-acceptable")
    effects = gw.core.on_message_error(err, gw.now)
    assert "was refused: not acceptable" in notices(effects)[0]
    assert presences(effects) == []


@pytest.mark.parametrize(
    "address", ["sip:x@elsewhere.org", "carol", "sip:jabber_gateway@sip.test", "a@b/c"]
)
def test_invite_refuses_bad_addresses(address: str) -> None:
    gw = Gateway()
    gw.join()
    effects = gw.sip(f"/invite {address}")
    assert of(SendInvitation, effects) == []
    assert notices(effects)[0].startswith(f"Cannot invite {address}")


@pytest.mark.parametrize("body", ["/who", "/topic x", "/nick y", "/invite carol@xmpp.test"])
def test_commands_that_need_a_seat(body: str) -> None:
    gw = Gateway()
    effects = gw.sip(body)
    assert notices(effects) == [f"You are not in {ROOM}. Send /join to join it."]
    assert presences(effects) == []


@pytest.mark.parametrize(
    ("body", "words"),
    [("/help", "/leave"), ("/frobnicate", "Unknown command /frobnicate"), ("/nick", "/nick")],
)
def test_help_and_bad_commands(body: str, words: str) -> None:
    gw = Gateway()
    [text] = notices(gw.sip(body))
    assert words in text


# --- what rooms do to SIP users --------------------------------------------------------------


@pytest.mark.parametrize(
    ("presence_kw", "words"),
    [
        (
            {"codes": (110, 307), "actor": "bob", "reason": "spam"},
            f"You were kicked from {ROOM} by bob: spam",
        ),
        ({"codes": (110, 301)}, f"You were banned from {ROOM}."),
        ({"codes": (110, 321)}, "membership was taken away"),
        ({"codes": (110, 322)}, "now members-only"),
        (
            {"destroyed": True, "reason": "moved", "alternate_venue": "new@conference.xmpp.test"},
            f"The room {ROOM} was destroyed: moved. It moved to new@conference.xmpp.test",
        ),
    ],
)
def test_removals_become_notices_and_forget_the_seat(presence_kw: dict, words: str) -> None:  # type: ignore[type-arg]
    gw = Gateway()
    gw.join()
    effects = gw.presence(self_presence("alice", type="unavailable", **presence_kw))
    [text] = notices(effects)
    assert words in text
    assert of(DeleteMembership, effects) == [DeleteMembership(ALICE, ROOM)]
    assert gw.seat_state() is None


def test_a_nick_change_forced_by_the_service() -> None:
    gw = Gateway()
    gw.join()
    gone = self_presence("alice", codes=(110, 303), type="unavailable", item_nick="alice2")
    effects = gw.presence(gone, self_presence("alice2", codes=(110, 210)))
    assert notices(effects) == [f"The room {ROOM} changed your nick to alice2."]
    assert of(SaveMembership, effects)[0].membership.nick == "alice2"


def test_service_shutdown_keeps_the_seat_and_rejoins_quietly() -> None:
    gw = Gateway()
    gw.join()
    effects = gw.presence(self_presence("alice", codes=(110, 332), type="unavailable"))
    assert effects == []
    assert gw.seat_state() is SeatState.DETACHED
    gw.core.link_down(gw.now)
    [join] = presences(gw.core.link_up(gw.now))
    assert (join.muc, join.muc_history) == (True, 0)


def test_subject_change_by_another_occupant() -> None:
    gw = Gateway()
    gw.join(topic="a")
    assert notices(gw.message(subject("b", nick="bob"))) == [f"bob set the topic of {ROOM}: b"]
    assert notices(gw.message(subject("", nick="bob"))) == [f"bob cleared the topic of {ROOM}."]


def test_error_for_a_private_message() -> None:
    gw = Gateway()
    gw.join()
    [pm] = messages(gw.sip("psst", to=occupant_uri("nobody")))
    err = StanzaError(
        sender=f"{ROOM}/nobody", recipient=ALICE_JID, id=pm.id, condition="item-not-found"
    )
    [text] = notices(gw.core.on_message_error(err, gw.now))
    assert text == f"Your private message to nobody in {ROOM} failed: nobody is not in the room."


def test_not_acceptable_for_a_groupchat_rejoins_quietly() -> None:
    gw = Gateway()
    gw.join()
    [msg] = messages(gw.sip("anyone?"))
    err = StanzaError(sender=ROOM, recipient=ALICE_JID, id=msg.id, condition="not-acceptable")
    effects = gw.core.on_message_error(err, gw.now)
    assert "send /join" in notices(effects)[0]
    [join] = presences(effects)
    assert (join.muc, join.muc_history) == (True, 0)
    # An error for an id we never sent is not ours to tell about.
    stray = StanzaError(sender=ROOM, recipient=ALICE_JID, id="other", condition="forbidden")
    assert gw.core.on_message_error(stray, gw.now) == []


# --- invitations -----------------------------------------------------------------------------


def test_a_mediated_invitation_from_an_occupant_jid_names_the_nick() -> None:
    gw = Gateway()
    inv = RoomInvitation(ROOM, f"{ROOM}/bob", "alice@sip.xmpp.test", "hi", mediated=True)
    [notice] = gw.core.on_invitation(inv, gw.now)
    assert isinstance(notice, Notice)
    assert notice.text.startswith(f"bob in {ROOM} invites you to the room {ROOM}")


@pytest.mark.parametrize("mediated", [False, True])
def test_invitations_reach_the_sip_user_from_the_room_address(mediated: bool) -> None:
    gw = Gateway()
    inv = RoomInvitation(
        room=ROOM,
        inviter="bob@xmpp.test/phone",
        invitee="alice@sip.xmpp.test",
        reason="standup",
        mediated=mediated,
    )
    [notice] = gw.core.on_invitation(inv, gw.now)
    assert isinstance(notice, Notice)
    assert notice.aor == ALICE
    assert notice.from_uri == ROOM_URI
    assert "bob@xmpp.test invites you to the room" in notice.text
    assert ROOM in notice.text and '"standup"' in notice.text and "reply /join" in notice.text


def test_an_invitation_password_is_used_by_the_reply() -> None:
    gw = Gateway()
    inv = RoomInvitation(ROOM, "bob@xmpp.test", "alice@sip.xmpp.test", password="pw")
    [notice] = gw.core.on_invitation(inv, gw.now)
    assert isinstance(notice, Notice)
    assert "/join NICK pw" in notice.text
    [join] = presences(gw.sip("/join"))
    assert join.muc_password == "pw"


def test_an_invitation_from_a_sip_user_names_their_sip_address() -> None:
    gw = Gateway()
    inv = RoomInvitation(ROOM, "dave@sip.xmpp.test/sip", "alice@sip.xmpp.test", mediated=True)
    [notice] = gw.core.on_invitation(inv, gw.now)
    assert isinstance(notice, Notice)
    assert notice.text.startswith("sip:dave@sip.test invites you")


# --- presence follows the SIP user (DESIGN 5.4) ----------------------------------------------


@pytest.mark.parametrize(
    ("state", "show", "status"),
    [
        (SipUserState(ALICE, show="away", status="lunch"), "away", "lunch"),
        (SipUserState(ALICE, show="dnd"), "dnd", None),
        (SipUserState(ALICE), None, None),
        (SipUserState(ALICE, online=False), "xa", OFFLINE_STATUS),
    ],
)
def test_room_presence_follows_the_sip_user(
    state: SipUserState, show: str | None, status: str | None
) -> None:
    gw = Gateway()
    gw.join()
    effects = gw.core.on_user_state(state, gw.now)
    assert presences(effects) == [Presence(ALICE_JID, f"{ROOM}/alice", show=show, status=status)]
    assert gw.seat_state() is SeatState.JOINED  # offline keeps the seat and its messages
    assert len(sip_texts(gw.message(groupchat("bob", "still for you")))) == 1


def test_a_join_carries_the_current_presence() -> None:
    gw = Gateway()
    assert gw.core.on_user_state(SipUserState(ALICE, show="away"), gw.now) == []
    [join] = presences(gw.sip("/join"))
    assert join.show == "away"


# --- restart and link (DESIGN 6, 8) ----------------------------------------------------------


def test_restore_rejoins_quietly_with_the_same_nick() -> None:
    gw = Gateway()
    stored = [Membership(ALICE, ROOM, "al", "pw")]
    [join] = presences(gw.core.restore(stored, gw.now))
    assert join == Presence(ALICE_JID, f"{ROOM}/al", muc=True, muc_history=0, muc_password="pw")
    effects = gw.presence(other("bob"), self_presence("al"))
    effects += gw.message(
        groupchat("bob", "old", delay_stamp="2024-01-01T00:00:00Z"), subject("topic")
    )
    effects += gw.advance(10)
    assert effects == []  # no notice, no history, no new row
    assert gw.seat_state() is SeatState.JOINED


def test_the_password_is_stored_with_the_seat_and_again_when_it_changes() -> None:
    gw = Gateway()
    gw.sip("/join alice s3cret")
    effects = gw.presence(self_presence("alice"))
    stored = Membership(ALICE, ROOM, "alice", "s3cret")
    assert of(SaveMembership, effects) == [SaveMembership(stored)]
    # a rejoin with the same nick and password writes nothing
    gw.core.link_down(gw.now)
    gw.core.link_up(gw.now)
    assert of(SaveMembership, gw.presence(self_presence("alice"))) == []
    # a /join with a new password while detached: written once it worked
    gw.core.link_down(gw.now)
    gw.sip("/join alice n3w")
    [join] = presences(gw.core.link_up(gw.now))
    assert join.muc_password == "n3w"
    effects = gw.presence(self_presence("alice"))
    assert of(SaveMembership, effects) == [SaveMembership(Membership(ALICE, ROOM, "alice", "n3w"))]


def test_a_restored_seat_with_a_password_is_not_written_again() -> None:
    gw = Gateway()
    gw.core.restore([Membership(ALICE, ROOM, "alice", "pw")], gw.now)
    assert of(SaveMembership, gw.presence(self_presence("alice"))) == []


def test_restore_before_the_link_is_up_waits_for_it() -> None:
    gw = Gateway(link=False)
    assert gw.core.restore([Membership(ALICE, ROOM, "alice")], gw.now) == []
    assert len(presences(gw.core.link_up(gw.now))) == 1


@pytest.mark.parametrize("condition", ["forbidden", "registration-required", "conflict"])
def test_a_rejoin_refused_for_good_is_told_and_forgotten(condition: str) -> None:
    gw = Gateway()
    gw.core.restore([Membership(ALICE, ROOM, "alice")], gw.now)
    effects = gw.presence(error_presence("alice", condition))
    assert notices(effects)[0].startswith(f"Could not rejoin {ROOM}: ")
    assert of(DeleteMembership, effects) == [DeleteMembership(ALICE, ROOM)]
    assert gw.seat_state() is None


def test_a_rejoin_that_fails_for_now_is_retried_and_told_once() -> None:
    gw = Gateway(RoomsConfig(rejoin_retry=60, rejoin_retry_max=100))
    gw.core.restore([Membership(ALICE, ROOM, "alice")], gw.now)
    effects = gw.presence(error_presence("alice", "remote-server-not-found"))
    assert "keeps trying" in notices(effects)[0]
    assert of(DeleteMembership, effects) == []
    assert gw.core.next_deadline() == T0 + 60
    assert len(presences(gw.advance(60))) == 1
    assert notices(gw.advance(30)) == []  # the join timed out: a passing failure, told before
    assert gw.core.next_deadline() == gw.now + 100  # backed off, capped
    assert len(presences(gw.advance(100))) == 1
    assert notices(gw.presence(self_presence("alice"))) == []


def test_link_down_and_up_rejoins_and_sends_what_waited() -> None:
    gw = Gateway()
    gw.join()
    assert gw.core.link_down(gw.now) == []
    assert messages(gw.sip("while away")) == []  # waits for the rejoin
    [join] = presences(gw.core.link_up(gw.now))
    assert join.muc_history == 0
    effects = gw.presence(self_presence("alice"))
    assert [m.body for m in messages(effects)] == ["while away"]
    assert notices(effects + gw.message(subject("Hi")) + gw.advance(10)) == []


def test_a_join_asked_while_the_link_is_down_goes_when_it_is_up() -> None:
    gw = Gateway(link=False)
    assert gw.sip("/join") == []
    [join] = presences(gw.core.link_up(gw.now))
    assert join.muc_history == 0
    gw.presence(self_presence("alice"))
    assert "You joined" in notices(gw.message(subject("x")))[0]  # asked for: told


def test_messages_that_wait_too_long_are_reported() -> None:
    gw = Gateway(RoomsConfig(pending_limit=90))
    gw.join()
    gw.core.link_down(gw.now)
    gw.sip("lost?")
    [text] = notices(gw.advance(90))
    assert "not sent" in text and "1 message" in text


# --- MUC service recognition (DESIGN 3.2) ----------------------------------------------------


def fresh(link: bool = True) -> Gateway:
    gw = Gateway(link=link)
    gw.core.services = type(gw.core.services)(cache_time=600, disco_timeout=20)
    return gw


def test_an_unknown_service_is_discovered_once_and_messages_wait() -> None:
    gw = fresh()
    assert gw.sip("hello") == [DiscoverService(SERVICE)]
    assert gw.sip("/join") == []  # the query is already on its way
    effects = gw.core.on_service_info(ServiceInfo(SERVICE, ServiceKind.MUC), gw.now)
    assert len(presences(effects)) == 1
    assert "Already joining" in notices(effects)[0]
    [msg] = messages(gw.presence(self_presence("alice")))
    assert msg.body == "hello"


def test_a_person_is_chatted_with_not_joined() -> None:
    gw = fresh()
    to = "sip:bob*xmpp.test@jabber.sip.test"
    assert gw.sip("hi bob", to=to) == [DiscoverService("xmpp.test")]
    effects = gw.core.on_service_info(ServiceInfo("xmpp.test", ServiceKind.OTHER), gw.now)
    assert effects == [PassToChat(SipText(ALICE, to, "hi bob"))]
    assert gw.sip("hi again", to=to) == [PassToChat(SipText(ALICE, to, "hi again"))]


def test_room_forms_on_a_service_that_is_no_muc_get_a_clear_error() -> None:
    gw = fresh()
    to = "sip:nick*bob*xmpp.test@jabber.sip.test"
    gw.sip("hi", to=to)
    [text] = notices(gw.core.on_service_info(ServiceInfo("xmpp.test", ServiceKind.OTHER), gw.now))
    assert text == "xmpp.test is not a chat room service."
    with pytest.raises(Refusal) as caught:
        gw.sip("hi", to=to)
    assert (caught.value.sip_status, caught.value.xmpp_condition) == (404, "item-not-found")
    with pytest.raises(Refusal):
        gw.sip("/join", to="sip:bob*xmpp.test@jabber.sip.test")


def test_disco_timeout_reports_an_unreachable_service() -> None:
    gw = fresh()
    gw.sip("/join")
    gw.sip("plain words")
    effects = gw.advance(20)
    assert "Could not reach conference.xmpp.test" in notices(effects)[0]
    assert effects[1] == PassToChat(SipText(ALICE, ROOM_URI, "plain words"))
    assert gw.sip("/join") == [DiscoverService(SERVICE)]  # not cached: asked again


def test_disco_answers_are_cached_for_cache_time() -> None:
    gw = fresh()
    gw.sip("/join")
    gw.core.on_service_info(ServiceInfo(SERVICE, ServiceKind.MUC), gw.now)
    gw.sip("/leave")
    gw.now += 599
    assert len(presences(gw.sip("/join"))) == 1
    gw.sip("/leave")
    gw.now += 1
    assert gw.sip("/join") == [DiscoverService(SERVICE)]


def test_a_joined_room_needs_no_disco() -> None:
    gw = fresh()
    gw.core.restore([Membership(ALICE, ROOM, "alice")], gw.now)
    gw.now += 10_000
    assert messages(gw.presence(self_presence("alice")) + gw.sip("hi"))[0].body == "hi"


def test_addresses_that_cannot_be_mapped_are_refused() -> None:
    gw = Gateway()
    with pytest.raises(Refusal) as caught:
        gw.sip("hi", frm="sip:alice@jabber.sip.test")
    assert caught.value.sip_status == 403
    with pytest.raises(Refusal):
        gw.sip("hi", to="sip:a*b*c@elsewhere.org")


def test_transport_addresses_ask_disco_of_themselves_and_domains_are_not_rooms() -> None:
    gw = Gateway()
    # DESIGN 3.3: a transport hosts rooms and people under one domain; its answer for the
    # address itself decides (tests/test_transports.py follows both outcomes).
    to = "sip:%23chan*irc.example.net@irc.xmpp.test"
    assert gw.sip("hi", to=to) == [DiscoverService("#chan%irc.example.net@irc.xmpp.test")]
    to = "sip:xmpp.test@jabber.sip.test"
    assert gw.sip("hi", to=to) == [PassToChat(SipText(ALICE, to, "hi"))]


def test_stanzas_for_no_seat_are_ignored_and_not_claimed() -> None:
    gw = Gateway()
    assert not gw.core.claims(f"{ROOM}/bob", ALICE_JID)
    assert gw.message(RoomMessage(f"{ROOM}/bob", ALICE_JID, "hi")) == []
    assert gw.presence(other("bob")) == []
    gw.join()
    assert gw.core.claims(f"{ROOM}/bob", ALICE_JID)
    assert not gw.core.claims(f"{ROOM}/bob", "stranger@elsewhere.test")
