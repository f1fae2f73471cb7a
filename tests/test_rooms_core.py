"""The room core (DESIGN 6) with a hand-driven clock: SIP users join, talk, leave, come back."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from component.addresses import AddressBook
from component.rooms.core import RoomsCore
from component.rooms.model import (
    ConfigureInstantRoom,
    DeleteMembership,
    Effect,
    Membership,
    Notice,
    PassToChat,
    RoomMessage,
    RoomPresence,
    RoomsConfig,
    SaveMembership,
    SeatKey,
    SendMessage,
    SendPresence,
    SendSip,
    ServiceInfo,
    ServiceKind,
)
from component.rooms.seat import SeatState
from component.values import ChatMessage, Presence, SipText

BOOK = AddressBook(
    component="sip.xmpp.test",
    sip_domain="sip.test",
    jdomain="jabber.sip.test",
    delimiter="*",
    aliases=(("irc.xmpp.test", "%"),),
    registrar="sip:jabber_gateway@sip.test",
)
SERVICE = "conference.xmpp.test"
ROOM = f"room@{SERVICE}"
ROOM_URI = "sip:room*conference.xmpp.test@jabber.sip.test"
ALICE = "sip:alice@sip.test"
ALICE_JID = "alice@sip.xmpp.test/sip"
DAVE = "sip:dave@sip.test"
DAVE_JID = "dave@sip.xmpp.test/sip"
T0 = 1_700_000_000.0


def occupant_uri(nick: str, room: str = "room") -> str:
    return f"sip:{nick}*{room}*conference.xmpp.test@jabber.sip.test"


def of(kind: type, effects: Iterable[Effect]) -> list:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, kind)]


def notices(effects: Iterable[Effect]) -> list[str]:
    return [e.text for e in effects if isinstance(e, Notice)]


def presences(effects: Iterable[Effect]) -> list[Presence]:
    return [e.presence for e in effects if isinstance(e, SendPresence)]


def messages(effects: Iterable[Effect]) -> list[ChatMessage]:
    return [e.message for e in effects if isinstance(e, SendMessage)]


def sip_texts(effects: Iterable[Effect]) -> list[SipText]:
    return [e.text for e in effects if isinstance(e, SendSip)]


def self_presence(
    nick: str, to: str = ALICE_JID, codes: tuple[int, ...] = (110,), **kw: object
) -> RoomPresence:
    return RoomPresence(
        sender=f"{ROOM}/{nick}",
        recipient=to,
        status_codes=codes,
        role=str(kw.pop("role", "participant")),
        affiliation=str(kw.pop("affiliation", "none")),
        **kw,  # type: ignore[arg-type]
    )


def other(nick: str, to: str = ALICE_JID, role: str = "participant", **kw: object) -> RoomPresence:
    return RoomPresence(sender=f"{ROOM}/{nick}", recipient=to, role=role, **kw)  # type: ignore[arg-type]


def error_presence(nick: str, condition: str, to: str = ALICE_JID) -> RoomPresence:
    return RoomPresence(
        sender=f"{ROOM}/{nick}", recipient=to, type="error", error_condition=condition
    )


def groupchat(nick: str | None, body: str, to: str = ALICE_JID, **kw: object) -> RoomMessage:
    sender = f"{ROOM}/{nick}" if nick else ROOM
    return RoomMessage(sender=sender, recipient=to, body=body, **kw)  # type: ignore[arg-type]


def subject(text: str, nick: str | None = None, to: str = ALICE_JID) -> RoomMessage:
    sender = f"{ROOM}/{nick}" if nick else ROOM
    return RoomMessage(sender=sender, recipient=to, body=None, subject=text)


class Gateway:
    """The core with the link up and the conference service known, and a clock to move."""

    def __init__(self, config: RoomsConfig | None = None, *, link: bool = True) -> None:
        self.core = RoomsCore(BOOK, config, id_prefix="id")
        self.now = T0
        if link:
            self.core.link_up(self.now)
        self.core.on_service_info(ServiceInfo(SERVICE, ServiceKind.MUC), self.now)

    def sip(self, body: str, to: str = ROOM_URI, frm: str = ALICE) -> list[Effect]:
        return self.core.on_sip_text(SipText(from_uri=frm, to_uri=to, body=body), self.now)

    def presence(self, *ps: RoomPresence) -> list[Effect]:
        out: list[Effect] = []
        for p in ps:
            out += self.core.on_room_presence(p, self.now)
        return out

    def message(self, *ms: RoomMessage) -> list[Effect]:
        out: list[Effect] = []
        for m in ms:
            out += self.core.on_room_message(m, self.now)
        return out

    def advance(self, seconds: float) -> list[Effect]:
        self.now += seconds
        return self.core.handle_timer(self.now)

    def join(
        self, nick: str = "alice", frm: str = ALICE, to: str = ALICE_JID, topic: str = "Hi"
    ) -> list[Effect]:
        """A full, successful join: the request, the occupants, self-presence, the subject."""
        out = self.sip("/join" if nick == "alice" else f"/join {nick}", frm=frm)
        out += self.presence(other("bob", to=to, role="moderator"), self_presence(nick, to=to))
        out += self.message(subject(topic, to=to))
        return out

    def seat_state(self, aor: str = ALICE) -> SeatState | None:
        seat = self.core.seats.get(SeatKey(aor, ROOM))
        return seat.state if seat else None


# --- joining ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "body", "nick", "password"),
    [
        (occupant_uri("al"), "hello", "al", None),
        ("sip:*room*conference.xmpp.test@jabber.sip.test", "hi", "alice", None),
        (ROOM_URI, "/join", "alice", None),
        (ROOM_URI, "/join wonder", "wonder", None),
        (ROOM_URI, "/join wonder s3cret", "wonder", "s3cret"),
        (occupant_uri("al"), "/join al s3cret", "al", "s3cret"),
    ],
)
def test_join_sends_muc_presence_from_the_component_jid(
    to: str, body: str, nick: str, password: str | None
) -> None:
    gw = Gateway()
    effects = gw.sip(body, to=to)
    assert presences(effects) == [
        Presence(
            sender=ALICE_JID,
            recipient=f"{ROOM}/{nick}",
            muc=True,
            muc_history=0,
            muc_password=password,
        )
    ]
    assert notices(effects) == []
    assert gw.seat_state() is SeatState.JOINING


def test_join_asks_for_the_configured_history() -> None:
    gw = Gateway(RoomsConfig(history=5))
    assert presences(gw.sip("/join"))[0].muc_history == 5


def test_join_result_names_nick_count_and_subject_once_the_subject_came() -> None:
    gw = Gateway()
    gw.sip("/join")
    effects = gw.presence(other("bob", role="moderator"), other("carol"), self_presence("alice"))
    assert notices(effects) == []
    assert of(SaveMembership, effects) == [SaveMembership(Membership(ALICE, ROOM, "alice"))]
    effects = gw.message(subject("Lunch at noon"))
    [text] = notices(effects)
    assert f"You joined {ROOM} as alice" in text
    assert "3 occupants" in text
    assert "Topic: Lunch at noon" in text
    assert gw.seat_state() is SeatState.JOINED


def test_the_rooms_own_presence_is_no_occupant() -> None:
    gw = Gateway()
    gw.sip("/join")
    room_itself = RoomPresence(sender=ROOM, recipient=ALICE_JID)
    gw.presence(other("bob", role="moderator"), room_itself, self_presence("alice"))
    (text,) = notices(gw.message(subject("Hi")))
    assert "2 occupants, you included" in text


def test_join_result_goes_without_a_subject_after_the_wait() -> None:
    gw = Gateway()
    gw.sip("/join")
    gw.presence(self_presence("alice"))
    assert gw.core.next_deadline() == T0 + 3.0
    assert notices(gw.advance(2.9)) == []
    [text] = notices(gw.advance(0.2))
    assert "No one else is here" in text
    assert "Topic" not in text


def test_a_created_room_is_configured_as_instant_room() -> None:
    gw = Gateway()
    gw.sip("/join")
    effects = gw.presence(self_presence("alice", codes=(110, 201), affiliation="owner"))
    assert of(ConfigureInstantRoom, effects) == [ConfigureInstantRoom(ALICE_JID, ROOM)]
    [text] = notices(gw.advance(5))
    assert "You created the room" in text


def test_a_nick_assigned_by_the_service_is_told() -> None:
    gw = Gateway()
    gw.sip("/join")
    effects = gw.presence(self_presence("alice (sip)", codes=(110, 210)))
    assert of(SaveMembership, effects)[0].membership.nick == "alice (sip)"
    effects = gw.message(subject(""))
    assert "the room gave you the nick alice (sip)" in notices(effects)[0]


@pytest.mark.parametrize(
    ("condition", "body", "words"),
    [
        ("conflict", "/join", "nick 'alice' is already in use"),
        ("registration-required", "/join", "members-only"),
        ("forbidden", "/join", "banned"),
        ("not-authorized", "/join", "needs a password"),
        ("not-authorized", "/join alice wrong", "password is wrong"),
        ("item-not-found", "/join", "does not exist and cannot be created"),
        ("not-allowed", "/join", "does not exist and cannot be created"),
        ("service-unavailable", "/join", "full"),
        ("remote-server-not-found", "/join", "unreachable"),
        ("remote-server-timeout", "/join", "unreachable"),
        ("not-acceptable", "/join", "not accepted"),
        ("undefined-condition", "/join", "undefined condition"),
    ],
)
def test_join_errors_become_notices_in_words(condition: str, body: str, words: str) -> None:
    gw = Gateway()
    gw.sip(body)
    effects = gw.presence(error_presence("alice", condition))
    [text] = notices(effects)
    assert text.startswith(f"Could not join {ROOM}: ")
    assert words in text
    assert of(DeleteMembership, effects) == []  # nothing was stored
    assert gw.seat_state() is None


def test_no_answer_from_the_room_is_a_timeout() -> None:
    gw = Gateway()
    gw.sip("/join")
    assert gw.core.next_deadline() == T0 + 30.0
    assert notices(gw.advance(29)) == []
    [text] = notices(gw.advance(1))
    assert "unreachable" in text
    assert gw.seat_state() is None
    assert gw.core.next_deadline() is None


def test_join_commands_while_in_the_room() -> None:
    gw = Gateway()
    assert "Already joining" in notices(gw.sip("hi", to=occupant_uri("alice")) + gw.sip("/join"))[0]
    gw.presence(self_presence("alice"))
    assert "already in" in notices(gw.sip("/join"))[0]
    # /join with another nick while in the room is a nick change.
    assert presences(gw.sip("/join alicia")) == [Presence(ALICE_JID, f"{ROOM}/alicia")]


def test_a_nick_without_a_sip_form_is_refused_before_joining() -> None:
    gw = Gateway()
    effects = gw.sip("/join " + "x" * 1100)
    assert presences(effects) == []
    assert "cannot be a nick" in notices(effects)[0]


# --- room messages to SIP users --------------------------------------------------------------


@pytest.mark.parametrize(("prefix", "body"), [(True, "bob: hello all"), (False, "hello all")])
def test_room_messages_come_from_the_room_with_the_nick(prefix: bool, body: str) -> None:
    gw = Gateway(RoomsConfig(nick_prefix=prefix))
    gw.join()
    effects = gw.message(groupchat("bob", "hello all"))
    assert effects == [
        SendSip(SipText(from_uri=ROOM_URI, to_uri=ALICE, body=body, from_display="bob"), ROOM)
    ]


def test_each_sip_user_gets_the_copy_addressed_to_them() -> None:
    gw = Gateway()
    gw.join()
    gw.join(nick="dave", frm=DAVE, to=DAVE_JID)
    out = gw.message(groupchat("bob", "hi", to=ALICE_JID), groupchat("bob", "hi", to=DAVE_JID))
    assert [t.to_uri for t in sip_texts(out)] == [ALICE, DAVE]


def test_the_rooms_reflection_of_our_own_message_is_not_sent_back() -> None:
    gw = Gateway()
    gw.join()
    [sent] = messages(gw.sip("hello room"))
    assert sent == ChatMessage(
        sender=ALICE_JID, recipient=ROOM, body="hello room", id="id1", type="groupchat"
    )
    assert gw.message(groupchat("alice", "hello room", id="id1")) == []
    # After a nick change the reflection is still known by its id (or origin-id).
    gw.sip("/nick alicia")
    [again] = messages(gw.sip("second"))
    assert gw.message(groupchat("someone-else", "second", origin_id=again.id)) == []


def test_messages_from_one_room_keep_their_order() -> None:
    gw = Gateway()
    gw.join()
    burst = [groupchat("bob", f"message {i}") for i in range(50)]
    out = gw.message(*burst)
    assert [t.body for t in sip_texts(out)] == [f"bob: message {i}" for i in range(50)]


def test_status_messages_of_the_room_itself_are_passed_on() -> None:
    gw = Gateway()
    gw.join()
    [text] = sip_texts(gw.message(groupchat(None, "The room is now logged", status_codes=(170,))))
    assert (text.from_uri, text.body, text.from_display) == (
        ROOM_URI,
        "The room is now logged",
        None,
    )


@pytest.mark.parametrize(
    ("history", "delivered"),
    [(0, []), (2, ["bob: old one", "bob: old two"])],
)
def test_history_only_when_configured(history: int, delivered: list[str]) -> None:
    gw = Gateway(RoomsConfig(history=history))
    gw.sip("/join")
    gw.presence(self_presence("alice"))
    stamp = "2024-01-01T00:00:00Z"
    old = [groupchat("bob", f"old {n}", delay_stamp=stamp) for n in ("one", "two")]
    out = gw.message(*old)
    assert [t.body for t in sip_texts(out)] == delivered


# --- SIP users' messages to the room ---------------------------------------------------------


def test_auto_join_sends_the_message_after_the_join() -> None:
    gw = Gateway()
    effects = gw.sip("hello everyone")
    assert presences(effects)[0].muc
    assert messages(effects) == []
    effects = gw.presence(self_presence("alice"))
    assert [m.body for m in messages(effects)] == ["hello everyone"]
    assert notices(effects) == []  # the joined notice still waits for the subject


def test_a_message_waiting_for_a_failed_join_is_reported_not_lost() -> None:
    gw = Gateway()
    gw.sip("one")
    gw.sip("two")
    effects = gw.presence(error_presence("alice", "registration-required"))
    texts = notices(effects)
    assert "members-only" in texts[0]
    assert "2 messages" in texts[1] and "not sent" in texts[1]
    assert messages(effects) == []


def test_without_auto_join_a_room_message_is_refused_in_a_notice() -> None:
    gw = Gateway(RoomsConfig(auto_join=False))
    effects = gw.sip("hello")
    assert presences(effects) == []
    assert notices(effects) == [f"You are not in {ROOM}. Send /join to join it."]


def test_private_messages_both_ways() -> None:
    gw = Gateway()
    gw.join()
    [pm] = messages(gw.sip("psst", to=occupant_uri("bob")))
    assert (pm.type, pm.sender, pm.recipient, pm.body) == ("chat", ALICE_JID, f"{ROOM}/bob", "psst")
    [text] = sip_texts(gw.message(RoomMessage(f"{ROOM}/bob", ALICE_JID, "back", type="chat")))
    assert text == SipText(
        from_uri=occupant_uri("bob"), to_uri=ALICE, body="back", from_display="bob"
    )


def test_own_occupant_address_talks_to_the_room() -> None:
    gw = Gateway()
    gw.join()
    [msg] = messages(gw.sip("hi all", to=occupant_uri("alice")))
    assert (msg.type, msg.recipient) == ("groupchat", ROOM)


def test_private_message_before_the_join_ended_is_reported() -> None:
    gw = Gateway()
    gw.sip("/join")
    effects = gw.sip("psst", to=occupant_uri("bob"))
    assert messages(effects) == []
    assert "not sent" in notices(effects)[0]


# --- the plain-chat short cut ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("to", "body", "plain"),
    [
        ("sip:bob*xmpp.test@jabber.sip.test", "hello", True),  # disco said: no rooms there
        ("sip:bob*xmpp.test@jabber.sip.test", "/me waves", False),  # a command: the long way
        ("sip:bob*xmpp.test@jabber.sip.test", " /join", False),
        ("sip:carol*elsewhere.test@jabber.sip.test", "hello", False),  # not asked yet
        ("sip:xmpp.test@jabber.sip.test", "hello", True),  # a bare domain is no room
        (ROOM_URI, "hello", False),  # a MUC service
        (occupant_uri("al"), "hello", False),  # the occupant form
        ("sip:nick*irc.example.net@irc.xmpp.test", "hi", True),  # a transport's person
        ("sip:%23chan*irc.example.net@irc.xmpp.test", "hi", False),  # its channel
    ],
)
def test_plain_chat_short_cut_agrees_with_the_full_decision(
    to: str, body: str, plain: bool
) -> None:
    gw = Gateway()
    gw.core.on_service_info(ServiceInfo("xmpp.test", ServiceKind.OTHER), gw.now)
    gw.core.on_service_info(
        ServiceInfo("nick%irc.example.net@irc.xmpp.test", ServiceKind.OTHER), gw.now
    )
    gw.core.on_service_info(
        ServiceInfo("#chan%irc.example.net@irc.xmpp.test", ServiceKind.MUC), gw.now
    )
    msg = SipText(from_uri=ALICE, to_uri=to, body=body)
    assert gw.core.is_plain_chat(msg, BOOK.xmpp_target_for_sip_uri(to), gw.now) is plain
    if plain:
        assert gw.core.on_sip_text(msg, gw.now) == [PassToChat(msg)]


def test_plain_chat_short_cut_yields_to_a_seat_and_to_an_expired_disco_answer() -> None:
    gw = Gateway()
    gw.join()
    # A seat in a room of a domain disco later called no MUC: still the room's (the full way).
    gw.core.on_service_info(ServiceInfo(SERVICE, ServiceKind.OTHER), gw.now)
    msg = SipText(from_uri=ALICE, to_uri=ROOM_URI, body="hello")
    assert not gw.core.is_plain_chat(msg, BOOK.xmpp_target_for_sip_uri(ROOM_URI), gw.now)
    dave = SipText(from_uri=DAVE, to_uri=ROOM_URI, body="hello")
    assert gw.core.is_plain_chat(dave, BOOK.xmpp_target_for_sip_uri(ROOM_URI), gw.now)
    gw.now += 10 * 24 * 3600  # past cache_time: the answer is no longer known
    assert not gw.core.is_plain_chat(dave, BOOK.xmpp_target_for_sip_uri(ROOM_URI), gw.now)
