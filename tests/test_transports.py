"""Alias transports (DESIGN 3.3, 9) with fakes: probing, states, the 480 path, status chatter,
the gateway domain's presence, and the rooms on a transport going down and coming back."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET

import pytest

from component.addresses import AddressBook
from component.errors import Refusal
from component.rooms.core import RoomsCore
from component.rooms.model import DiscoverService, Notice, RoomPresence, SendPresence, ServiceInfo
from component.rooms.seat import Seat, SeatState
from component.store import ApprovalDirection, ApprovalState, RosterApproval, TransportStatus
from component.store.memory import MemoryStore
from component.transports.board import (
    CameUp,
    SaveStatus,
    TransportBoard,
    TransportState,
    WentDown,
)
from component.transports.chatter import ChatterBuffer
from component.transports.health import SipHealth
from component.transports.service import TransportGuard, Transports
from component.values import ChatMessage, Presence, ServiceKind, SipAnswer, SipText
from component.xmpp.iq import IqResponder
from component.xmpp.stanzas import jid_or_none

IRC = "irc.xmpp.test"
BOOK = AddressBook(
    component="sip.xmpp.test",
    sip_domain="sip.test",
    jdomain="jabber.sip.test",
    aliases=((IRC, "%"),),
    registrar="sip:jabber_gateway@sip.test",
)
ALICE = "sip:alice@sip.test"
CHANNEL = f"#chan%127.0.0.1@{IRC}"
CHANNEL_URI = f"sip:%23chan*127.0.0.1@{IRC}"
T0 = 1_700_000_000.0


# --- the board ----------------------------------------------------------------------------------


def test_board_reports_transitions_once_and_stores_each() -> None:
    board = TransportBoard([IRC], check_time=5)
    up = board.probed(IRC, None, T0)
    assert up == [SaveStatus(TransportStatus(IRC, True, T0, None))]  # first state: no "came up"
    assert board.probed(IRC, None, T0 + 5) == []
    down = board.probed(IRC, "remote-server-timeout", T0 + 10)
    assert down == [
        SaveStatus(TransportStatus(IRC, False, T0 + 10, "remote-server-timeout")),
        WentDown(IRC, "remote-server-timeout"),
    ]
    assert board.probed(IRC, "remote-server-timeout", T0 + 15) == []
    back = board.probed(IRC, None, T0 + 20)
    assert back == [
        SaveStatus(TransportStatus(IRC, True, T0 + 20, "remote-server-timeout")),
        CameUp(IRC),
    ]
    (view,) = board.views()
    assert (view.state, view.since, view.checked_at) == (TransportState.UP, T0 + 20, T0 + 20)
    assert view.last_error == "remote-server-timeout"


def test_board_refuses_only_a_transport_known_down() -> None:
    board = TransportBoard([IRC], check_time=2.5)
    assert board.refusal_for(IRC) is None  # never probed: the XMPP server decides
    board.probed(IRC, "remote-server-timeout", T0)
    refusal = board.refusal_for(IRC)
    assert refusal is not None
    assert (refusal.sip_status, refusal.retry_after) == (480, 3)
    assert "irc.xmpp.test is down" in refusal.text
    assert board.refusal_for("other.example") is None
    assert board.probed("other.example", "x", T0) == []
    board.probed(IRC, None, T0 + 3)
    assert board.refusal_for(IRC) is None


def test_board_lists_transports_with_their_state_and_restores_stored_ones() -> None:
    board = TransportBoard([IRC, "icq.xmpp.test"], check_time=5)
    board.restore(TransportStatus(IRC, False, T0 - 100, "gone"))
    board.probed("icq.xmpp.test", None, T0)
    assert board.disco_items() == [
        ("icq.xmpp.test", "Transport icq.xmpp.test (up)"),
        (IRC, "Transport irc.xmpp.test (unknown)"),
    ]
    view = {v.domain: v for v in board.views()}[IRC]
    assert (view.since, view.last_error) == (T0 - 100, "gone")
    assert board.refusal_for(IRC) is None  # a stored state is shown, never acted on


def test_disco_items_on_the_component_domain_list_the_transports() -> None:
    board = TransportBoard([IRC], check_time=5)
    board.probed(IRC, "remote-server-timeout", T0)
    responder = IqResponder("sip.xmpp.test", "1", disco_items=board.disco_items)
    iq = ET.fromstring("<iq><query xmlns='http://jabber.org/protocol/disco#items'/></iq>")
    domain, user = jid_or_none("sip.xmpp.test"), jid_or_none("alice@sip.xmpp.test")
    assert domain is not None and user is not None
    items = ET.fromstring(responder.answer(iq, "get", domain))
    assert [(i.get("jid"), i.get("name")) for i in items] == [
        (IRC, "Transport irc.xmpp.test (down)")
    ]
    assert list(ET.fromstring(responder.answer(iq, "get", user))) == []


# --- SIP health and chatter ---------------------------------------------------------------------


def test_sip_health_changes_presence_only_on_a_change() -> None:
    health = SipHealth("sip:127.0.0.1:5060")
    assert health.shown.show is None
    first = health.answered(404, T0)  # any answer of the proxy's own counts
    assert first is not None and first.show is None
    assert health.answered(200, T0 + 1) is None
    down = health.answered(408, T0 + 2)
    assert down is not None and down.show == "xa" and "does not answer" in down.status
    assert health.answered(503, T0 + 3) is None
    assert health.answered(200, T0 + 4) is not None


def test_chatter_burst_becomes_one_notice_after_quiet() -> None:
    buffer = ChatterBuffer(quiet=2.0, window=3.0)
    server = f"127.0.0.1@{IRC}"
    for i, line in enumerate(["Connecting to 127.0.0.1:6697", "Connected to IRC server.", "MOTD"]):
        buffer.add(ALICE, server, line, T0 + i)
    buffer.add("sip:dave@sip.test", server, "Connected   to\nIRC server.", T0)
    (dave,) = buffer.due(T0 + 3.5)  # Alice's burst is still going
    assert (dave.aor, dave.text) == (
        "sip:dave@sip.test",
        f"{server} says: Connected to IRC server.",
    )
    assert buffer.deadline == T0 + 4.0
    (notice,) = buffer.due(T0 + 4.0)
    assert notice.aor == ALICE
    assert notice.text == (
        f"{server} says: Connecting to 127.0.0.1:6697 ... (1 more status messages) ... MOTD"
    )
    assert buffer.due(T0 + 100) == [] and buffer.deadline is None


# --- the service with fakes ---------------------------------------------------------------------


class FakeProbe:
    def __init__(self) -> None:
        self.down: set[str] = set()
        self.asked: list[str] = []

    async def discover_service(self, domain: str, timeout: float = 10.0) -> ServiceInfo:
        self.asked.append(domain)
        if domain in self.down:
            return ServiceInfo(domain, ServiceKind.UNREACHABLE, "remote-server-timeout")
        return ServiceInfo(domain, ServiceKind.MUC)


class FakeProxy:
    def __init__(self) -> None:
        self.status = 200
        self.calls: list[tuple[str, str]] = []

    async def options(self, uri: str, from_uri: str) -> int:
        self.calls.append((uri, from_uri))
        return self.status


class FakeXmpp:
    connected = True

    def __init__(self) -> None:
        self.presences: list[Presence] = []

    def send_message(self, msg: ChatMessage) -> bool:
        return True

    def send_presence(self, presence: Presence) -> bool:
        self.presences.append(presence)
        return True

    def refuse(self, stanza: ChatMessage | Presence, refusal: Refusal) -> bool:
        return True


class FakeNotices:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def notice(self, aor: str, text: str) -> None:
        self.sent.append((aor, text))


class FakeRooms:
    def __init__(self) -> None:
        self.changes: list[tuple[str, bool]] = []

    def transport_changed(self, domain: str, up: bool) -> None:
        self.changes.append((domain, up))


class FakeMessages:
    def __init__(self) -> None:
        self.seen: list[SipText] = []

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        self.seen.append(msg)
        return SipAnswer(202, "Accepted")

    async def answer_later(self, msg: SipText) -> SipAnswer:
        return SipAnswer(202, "Accepted")


class World:
    def __init__(self, check_time: float = 5.0) -> None:
        self.now = T0
        self.board = TransportBoard([IRC], check_time=check_time)
        self.probe, self.proxy, self.xmpp = FakeProbe(), FakeProxy(), FakeXmpp()
        self.notices, self.rooms, self.store = FakeNotices(), FakeRooms(), MemoryStore()
        self.service = Transports(
            self.board,
            SipHealth("sip:127.0.0.1:5060"),
            book=BOOK,
            xmpp=self.xmpp,
            probe=self.probe,
            proxy=self.proxy,
            notices=self.notices,
            store=self.store,
            clock=lambda: self.now,
            rooms=self.rooms,
            chatter_quiet=0.05,
            chatter_window=0.05,
        )


async def test_checks_store_states_tell_rooms_and_probe_the_proxy() -> None:
    w = World()
    await w.service.check_once()
    assert w.probe.asked == [IRC]
    assert w.proxy.calls == [("sip:127.0.0.1:5060", "sip:jabber_gateway@sip.test")]
    assert await w.store.transport_status(IRC) == TransportStatus(IRC, True, T0, None)
    w.probe.down.add(IRC)
    w.now += 5
    await w.service.check_once()
    stored = await w.store.transport_status(IRC)
    assert stored == TransportStatus(IRC, False, T0 + 5, "remote-server-timeout")
    w.now += 5
    await w.service.check_once()  # still down: the rooms are not told again
    w.probe.down.clear()
    w.now += 5
    await w.service.check_once()
    assert w.rooms.changes == [(IRC, False), (IRC, True)]
    assert (await w.store.transport_status(IRC)) is not None


async def test_a_message_to_a_transport_that_is_down_gets_480_at_once_and_a_notice() -> None:
    w = World(check_time=7)
    guard = TransportGuard(FakeMessages(), w.service)
    msg = SipText(from_uri=ALICE, to_uri=CHANNEL_URI, body="hi")
    assert guard.answer_now(msg) == SipAnswer(202, "Accepted")
    w.probe.down.add(IRC)
    await w.service.check_once()
    with pytest.raises(Refusal) as refused:
        guard.answer_now(msg)
    assert (refused.value.sip_status, refused.value.retry_after) == (480, 7)
    other = SipText(from_uri=ALICE, to_uri="sip:bob*xmpp.test@jabber.sip.test", body="hi")
    assert guard.answer_now(other) == SipAnswer(202, "Accepted")
    await w.service.stop()
    assert w.notices.sent == [
        (ALICE, "The transport irc.xmpp.test is down (remote server timeout); try again later.")
    ]


async def test_status_chatter_is_held_and_summed_up_but_people_and_channels_are_not() -> None:
    w = World()
    server = f"127.0.0.1@{IRC}"
    chatter = [
        ChatMessage(sender=server, recipient="alice@sip.xmpp.test/sip", body=f"step {i}")
        for i in range(5)
    ]
    assert all(w.service.takes_message(m) for m in chatter)
    person = ChatMessage(sender=f"bob%127.0.0.1@{IRC}", recipient="alice@sip.xmpp.test", body="hi")
    assert not w.service.takes_message(person)
    channel = ChatMessage(
        sender=CHANNEL, recipient="alice@sip.xmpp.test", body="x", type="groupchat"
    )
    assert not w.service.takes_message(channel)
    xmpp_user = ChatMessage(sender="bob@xmpp.test", recipient="alice@sip.xmpp.test", body="hi")
    assert not w.service.takes_message(xmpp_user)
    await w.service.start()
    w.now += 1.0  # past the quiet time
    w.service.takes_message(ChatMessage(sender=server, recipient="dave@sip.xmpp.test", body="x"))
    async with asyncio.timeout(5):
        while not w.notices.sent:
            await asyncio.sleep(0.01)
    await w.service.stop()
    assert w.notices.sent[0] == (
        ALICE,
        f"{server} says: step 0 ... (3 more status messages) ... step 4",
    )
    assert len([n for n in w.notices.sent if n[0] == ALICE]) == 1


async def test_gateway_domain_presence_follows_sip_health_for_subscribers() -> None:
    w = World()
    w.service.on_gateway_presence(Presence("carol@xmpp.test/phone", "sip.xmpp.test", "subscribe"))
    await w.service.stop()
    subscribed, shown = w.xmpp.presences
    assert (subscribed.type, subscribed.recipient) == ("subscribed", "carol@xmpp.test")
    assert (shown.type, shown.show, shown.sender) == (None, None, "sip.xmpp.test")
    approval = await w.store.approval(
        "sip.xmpp.test", "carol@xmpp.test", ApprovalDirection.XMPP_WATCHES_SIP
    )
    assert approval is not None
    w.xmpp.presences.clear()
    await w.service.check_once()  # first answer: shown (available)
    w.proxy.status = 408
    await w.service.check_once()
    await w.service.check_once()  # no change, nothing sent
    assert [(p.show, p.recipient) for p in w.xmpp.presences] == [
        (None, "carol@xmpp.test"),
        ("xa", "carol@xmpp.test"),
    ]
    assert "does not answer" in (w.xmpp.presences[-1].status or "")
    w.xmpp.presences.clear()
    w.service.on_gateway_presence(Presence("carol@xmpp.test/phone", "sip.xmpp.test", "probe"))
    w.service.on_gateway_presence(Presence("eve@xmpp.test/x", "sip.xmpp.test", "probe"))
    await w.service.stop()
    assert [(p.show, p.recipient) for p in w.xmpp.presences] == [("xa", "carol@xmpp.test")]


# --- rooms on a transport -----------------------------------------------------------------------


def _joined_core() -> RoomsCore:
    core = RoomsCore(BOOK, id_prefix="id")
    core.link_up(T0)
    effects = core.on_sip_text(SipText(from_uri=ALICE, to_uri=CHANNEL_URI, body="/join"), T0)
    # disco#info on the channel's own address, not on the transport's domain
    assert effects == [DiscoverService(CHANNEL)]
    effects = core.on_service_info(ServiceInfo(CHANNEL, ServiceKind.MUC), T0)
    assert any(isinstance(e, SendPresence) for e in effects)
    core.on_room_presence(
        RoomPresence(
            sender=f"{CHANNEL}/alice", recipient="alice@sip.xmpp.test/sip", status_codes=(110,)
        ),
        T0,
    )
    return core


def test_a_nick_on_a_transport_is_chat_after_disco_of_its_own_address() -> None:
    core = RoomsCore(BOOK, id_prefix="id")
    core.link_up(T0)
    msg = SipText(from_uri=ALICE, to_uri=f"sip:bob*127.0.0.1@{IRC}", body="hi")
    assert core.on_sip_text(msg, T0) == [DiscoverService(f"bob%127.0.0.1@{IRC}")]
    info = ServiceInfo(f"bob%127.0.0.1@{IRC}", ServiceKind.UNREACHABLE, "feature-not-implemented")
    (passed,) = core.on_service_info(info, T0)
    assert type(passed).__name__ == "PassToChat"


def state_of(seat: Seat) -> SeatState:
    """The seat's state now (read through a call, so the checker does not keep a narrowed
    state across the calls that change it)."""
    return seat.state


def test_rooms_on_a_transport_that_goes_down_and_comes_back() -> None:
    core = _joined_core()
    (seat,) = core.seats.values()
    assert state_of(seat) is SeatState.JOINED
    down = core.transport_down(IRC, T0 + 10)
    assert [n.text for n in down if isinstance(n, Notice)] == [
        "The transport irc.xmpp.test is down: you are out of #chan%127.0.0.1@irc.xmpp.test "
        "until it is back, then the gateway rejoins you."
    ]
    assert state_of(seat) is SeatState.DETACHED
    assert core.transport_down("other.example", T0 + 10) == []
    up = core.transport_up(IRC, T0 + 20)
    assert [n.text for n in up if isinstance(n, Notice)] == [
        "The transport irc.xmpp.test is back up: rejoining #chan%127.0.0.1@irc.xmpp.test."
    ]
    joins = [e.presence for e in up if isinstance(e, SendPresence)]
    assert [(p.recipient, p.muc) for p in joins] == [(f"{CHANNEL}/alice", True)]
    assert state_of(seat) is SeatState.REJOINING


def test_chatter_gap_inside_the_window_stays_one_burst() -> None:
    buffer = ChatterBuffer(quiet=1.0, window=5.0)
    buffer.add(ALICE, IRC, "Connected to IRC server.", T0)
    assert buffer.due(T0 + 2.0) == []  # quiet for longer than `quiet`, but inside the window
    buffer.add(ALICE, IRC, "MOTD", T0 + 3.0)
    assert buffer.due(T0 + 4.9) == []
    (notice,) = buffer.due(T0 + 5.0)
    assert notice.text == f"{IRC} says: Connected to IRC server. ... MOTD"


async def test_no_probe_while_the_xmpp_link_is_down_and_link_up_shows_the_gateway() -> None:
    w = World()
    w.xmpp.connected = False
    w.probe.down.add(IRC)  # what a probe would say with no link: it must not be asked
    await w.service.check_once()
    assert w.probe.asked == [] and not w.board.is_down(IRC)
    assert w.proxy.calls  # the SIP side is checked regardless
    await w.store.save_approval(
        RosterApproval(
            "sip.xmpp.test",
            "carol@xmpp.test",
            ApprovalDirection.XMPP_WATCHES_SIP,
            ApprovalState.APPROVED,
            T0,
        )
    )
    w.xmpp.presences.clear()
    w.xmpp.connected = True
    w.service.on_link(True)
    await w.service.stop()
    assert [(p.recipient, p.show) for p in w.xmpp.presences] == [("carol@xmpp.test", None)]
