"""Stanzas reaching the instance that does not hold the state (DESIGN 9): forwarding.

The routing runs on the in-memory store with an in-memory bus between two instances; the
owner lookups on SQLite, PostgreSQL and in memory; the LISTEN/NOTIFY bus on PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg2  # type: ignore[import-untyped]
import pytest

from component.addresses import AddressBook
from component.runtime.forwarding import (
    Ack,
    Forwarding,
    IqAnswer,
    SeatAnnouncing,
    Seats,
    StrayError,
    decode,
    decode_sent,
    encode,
)
from component.store import (
    MembershipState,
    RoomMembership,
    SeatOwner,
    SipWatcherSubscription,
    Store,
    StorePort,
    SubscriptionState,
)
from component.store.memory import MemoryDatabase, MemoryStore
from component.store.notify import Joiner, PgBus, pieces
from component.values import (
    ChatMessage,
    Presence,
    RoomInvitation,
    RoomMessage,
    RoomPresence,
    ServiceInfo,
    ServiceKind,
    StanzaError,
)
from tests.harness.values import MUC_DOMAIN
from tests.test_scaleout import OpenAs, open_as  # noqa: F401 (fixture)
from tests.test_store import database, pg_url, sqlite_template  # noqa: F401 (fixtures)
from tests.test_xmpp_adapter import (
    DOMAIN,
    NS,
    Recorder,
    ScriptedServer,
    _link,
    running,
    scripted,  # noqa: F401 (fixture)
)

BOOK = AddressBook(
    component="sip.xmpp.test",
    sip_domain="sip.test",
    jdomain="jabber.sip.test",
    delimiter="*",
    aliases=(),
    registrar="sip:jabber_gateway@sip.test",
)
ROOM = "room@conference.xmpp.test"
ALICE = "sip:alice@sip.test"
ALICE_JID = "alice@sip.xmpp.test/sip"
BOB = "bob@xmpp.test"
T0 = 1_700_000_000.0


# --- the wire: values as text, long texts in pieces ------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        Presence(f"{BOB}/phone", ALICE_JID, None, "away", "lunch", 5, "p1"),
        Presence(BOB, ALICE_JID, "unavailable"),
        RoomPresence(f"{ROOM}/bob", ALICE_JID, status_codes=(110, 201), role="moderator"),
        RoomMessage(f"{ROOM}/bob", ALICE_JID, "hi", id="m1", delay_stamp="2026-01-01T00:00:00Z"),
        StanzaError(ROOM, ALICE_JID, "e1", "forbidden", "auth", "no", "message"),
        SeatOwner(ALICE, ROOM, "gw-a"),
        IqAnswer('<iq type="result" id="sx1-2" from="conference.xmpp.test"/>', "gw-b"),
        Ack("gw-b", 42),
        StrayError("bob@xmpp.test", ALICE_JID, "m1", "item-not-found", "cancel", None, "gw-a"),
    ],
)
def test_values_survive_the_wire(value: Any) -> None:
    assert decode(encode(value)) == value
    assert decode_sent(encode(value)) == (value, None, None)
    assert decode_sent(encode(value, "gw-a", 7)) == (value, "gw-a", 7)


@pytest.mark.parametrize("text", ["{}", "[1]", '{"k": "Nope", "v": {}}', '{"k": "Presence"}'])
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        decode(text)


def test_a_long_text_goes_in_pieces_under_the_notify_limit() -> None:
    text = encode(RoomMessage(f"{ROOM}/bob", ALICE_JID, "é€😀x" * 9000))
    parts = pieces(text)
    assert len(parts) > 1
    assert all(len(p.encode()) < 8000 for p in parts)
    joiner = Joiner()
    got = [joiner.add(p) for p in parts]
    assert got[:-1] == [None] * (len(parts) - 1)
    assert got[-1] == text
    assert pieces("short") == ["short"]
    assert joiner.add("short") == "short"
    # A piece missing: the text is dropped, not joined wrong.
    assert Joiner().add(parts[1]) is None


# --- owners, from the rows --------------------------------------------------------------------


async def test_owners_of_seats_and_of_sip_watchers(open_as: OpenAs) -> None:  # noqa: F811
    a, b = await open_as("gw-a"), await open_as("gw-b")
    await a.save_membership(RoomMembership(ALICE, ROOM, "alice", MembershipState.JOINED))
    sub = SipWatcherSubscription("d1", ALICE, BOB, SubscriptionState.ACTIVE, {}, T0 + 600)
    await a.save_sip_watcher_subscription(sub)
    await b.save_sip_watcher_subscription(
        SipWatcherSubscription("d2", "sip:carol@sip.test", BOB, SubscriptionState.ACTIVE, {}, T0)
    )
    assert await b.seat_owners() == [SeatOwner(ALICE, ROOM, "gw-a")]
    assert await b.watcher_owners(BOB) == ["gw-a", "gw-b"]
    assert await a.watcher_owners("eve@xmpp.test") == []
    await b.take_over("gw-a", "gw-b", T0)
    assert await a.seat_owners() == [SeatOwner(ALICE, ROOM, "gw-b")]
    assert await a.watcher_owners(BOB) == ["gw-b"]


# --- routing between two instances ------------------------------------------------------------


class MemoryBus:
    """Texts between instances of one test, delivered on the next loop turn as NOTIFY is."""

    def __init__(self, hub: dict[str, Callable[[str], None]], instance: str) -> None:
        self.hub, self.instance = hub, instance
        self.sent: list[tuple[str | None, list[str]]] = []

    async def send(self, instance: str | None, texts: list[str]) -> None:
        self.sent.append((instance, texts))
        loop = asyncio.get_running_loop()
        for name, handler in self.hub.items():
            if instance in (None, name):
                for text in texts:
                    loop.call_soon(handler, text)

    async def listen(self, handler: Callable[[str], None]) -> None:
        self.hub[self.instance] = handler
        try:
            await asyncio.Event().wait()
        finally:
            self.hub.pop(self.instance, None)


class LocalRooms:
    """The seats one instance holds, and the stanzas its rooms were handed."""

    def __init__(self) -> None:
        self.seats: set[tuple[str, str]] = set()  # (room, SIP user's bare JID)
        self.got: list[Any] = []

    def claims(self, sender: str, recipient: str) -> bool:
        return (sender.partition("/")[0], recipient.partition("/")[0]) in self.seats

    def on_room_presence(self, presence: RoomPresence) -> None:
        self.got.append(presence)

    def on_room_message(self, message: RoomMessage) -> None:
        self.got.append(message)

    def on_room_error(self, error: StanzaError) -> None:
        self.got.append(error)

    def on_invitation(self, invitation: RoomInvitation) -> None:
        self.got.append(invitation)

    def on_unclaimed(self, stanza: RoomPresence | RoomMessage) -> bool:
        raise AssertionError("only the link asks: Forwarding stands in front of the rooms")


class Node:
    """One instance: its store, bus, rooms, presence handler and forwarding."""

    def __init__(
        self,
        db: MemoryDatabase,
        hub: dict[str, Callable[[str], None]],
        name: str,
        clock: Callable[[], float] = lambda: T0,
    ):
        self.store: StorePort = MemoryStore(db, instance=name)
        self.bus = MemoryBus(hub, name)
        self.seats = Seats(self.store, self.bus, name, book=BOOK, clock=clock)
        self.rooms = LocalRooms()
        self.presences: list[Presence] = []
        self.answers: list[str] = []
        self.errors: list[StanzaError] = []
        self.forwarding = Forwarding(
            self.seats,
            rooms=self.rooms,
            presence=self.presences.append,
            answers=self._answer,
            errors=self.errors.append,
            refresh=0.05,
            keep=10.0,
        )
        self.task: asyncio.Task[None] | None = None

    def _answer(self, xml: str) -> bool:
        self.answers.append(xml)
        return True

    def start(self) -> None:
        self.task = asyncio.create_task(self.forwarding.run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _stanzas(bus: MemoryBus) -> list[Any]:
    """What ``bus`` sent, acknowledgements left out."""
    values = (decode(text) for _, texts in bus.sent for text in texts)
    return [value for value in values if not isinstance(value, Ack)]


async def _settle(until: Callable[[], bool]) -> None:
    for _ in range(200):
        if until():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


async def _pair() -> tuple[Node, Node]:
    db = MemoryDatabase()
    hub: dict[str, Callable[[str], None]] = {}
    a, b = Node(db, hub, "gw-a"), Node(db, hub, "gw-b")
    return a, b


async def test_a_room_stanza_for_a_seat_the_other_instance_holds_goes_there() -> None:
    a, b = await _pair()
    await a.store.save_membership(RoomMembership(ALICE, ROOM, "alice", MembershipState.JOINED))
    a.rooms.seats.add((ROOM, "alice@sip.xmpp.test"))
    a.start()
    b.start()
    try:
        message = RoomMessage(f"{ROOM}/bob", ALICE_JID, "hi there")
        await _settle(lambda: b.forwarding.claims(message.sender, message.recipient))
        # gw-b claims it (so the link does not take it for one-to-one chat) and forwards it.
        b.forwarding.on_room_message(message)
        presence = RoomPresence(f"{ROOM}/carol", ALICE_JID, status_codes=(100,))
        b.forwarding.on_room_presence(presence)
        await _settle(lambda: len(a.rooms.got) == 2)
        assert a.rooms.got == [message, presence]
        assert b.rooms.got == []
        # gw-a handles its own seat's stanzas without forwarding.
        a.forwarding.on_room_message(message)
        assert a.rooms.got[-1] == message and _stanzas(a.bus) == []  # acknowledgements only
        # Neither holds a seat of carol's: nobody claims, nothing is forwarded.
        assert not b.forwarding.claims(f"{ROOM}/bob", "carol@sip.xmpp.test/sip")
    finally:
        await a.stop()
        await b.stop()


async def test_an_announced_seat_is_routed_before_its_row_exists() -> None:
    a, b = await _pair()
    a.start()
    b.start()
    try:
        await _settle(lambda: "gw-b" in a.bus.hub)
        await a.seats.announce(ALICE, ROOM)
        a.rooms.seats.add((ROOM, "alice@sip.xmpp.test"))
        joined = RoomPresence(f"{ROOM}/alice", ALICE_JID, status_codes=(110,))
        await _settle(lambda: b.forwarding.claims(joined.sender, joined.recipient))
        b.forwarding.on_room_presence(joined)
        await _settle(lambda: a.rooms.got == [joined])
    finally:
        await a.stop()
        await b.stop()


async def test_a_join_answer_that_lands_before_the_announcement_still_reaches_the_seat() -> None:
    a, b = await _pair()
    a.start()
    b.start()
    try:
        await _settle(lambda: "gw-a" in a.bus.hub and "gw-b" in a.bus.hub)
        a.rooms.seats.add((ROOM, "alice@sip.xmpp.test"))  # joining; gw-b has heard nothing
        joined = RoomPresence(f"{ROOM}/alice", ALICE_JID, status_codes=(110,))
        said = RoomMessage(ROOM, ALICE_JID, "welcome")
        assert not b.forwarding.claims(joined.sender, joined.recipient)
        assert b.forwarding.on_unclaimed(joined) and b.forwarding.on_unclaimed(said)
        await _settle(lambda: a.rooms.got == [joined, said])
        await asyncio.sleep(0.05)
        assert b.rooms.got == []  # its own broadcast came back to it and was left alone
        assert a.rooms.got == [joined, said]
    finally:
        await a.stop()
        await b.stop()


async def test_a_forwarded_stanza_for_a_seat_gone_meanwhile_is_dropped_not_bounced() -> None:
    a, b = await _pair()
    await a.store.save_membership(RoomMembership(ALICE, ROOM, "alice", MembershipState.JOINED))
    a.start()
    b.start()
    try:
        message = RoomMessage(f"{ROOM}/bob", ALICE_JID, "late")
        await _settle(lambda: b.forwarding.claims(message.sender, message.recipient))
        b.forwarding.on_room_message(message)  # gw-a's rooms no longer claim it
        await _settle(lambda: a.forwarding.received == 1)
        await asyncio.sleep(0.05)
        assert a.rooms.got == [] and b.rooms.got == []
        assert _stanzas(a.bus) == []  # not sent back, only acknowledged
    finally:
        await a.stop()
        await b.stop()


async def test_room_stanzas_a_dead_owner_did_not_acknowledge_reach_the_one_taking_over() -> None:
    db = MemoryDatabase()
    hub: dict[str, Callable[[str], None]] = {}
    now = [T0]
    a, b = Node(db, hub, "gw-a"), Node(db, hub, "gw-b", clock=lambda: now[0])
    await a.store.save_membership(RoomMembership(ALICE, ROOM, "alice", MembershipState.JOINED))
    a.rooms.seats.add((ROOM, "alice@sip.xmpp.test"))
    a.start()
    b.start()
    try:
        handled = RoomMessage(f"{ROOM}/bob", ALICE_JID, "before the last beat")
        await _settle(lambda: b.forwarding.claims(handled.sender, handled.recipient))
        b.forwarding.on_room_message(handled)
        await _settle(lambda: a.rooms.got == [handled])
        await _settle(lambda: b.forwarding.unacknowledged == 0)  # gw-a said it handled it
        await a.stop()  # gw-a dies
        now[0] = T0 + 2
        lost = [RoomMessage(f"{ROOM}/bob", ALICE_JID, f"lost {i}") for i in range(3)]
        for message in lost:
            b.forwarding.on_room_message(message)  # to gw-a, which hears nothing any more
        await _settle(lambda: sum(len(texts) for _, texts in b.bus.sent) == 4)
        assert b.rooms.got == [] and b.forwarding.unacknowledged == 3
        # gw-b takes over: the seat is restored here, then what went to the dead is handed on.
        b.rooms.seats.add((ROOM, "alice@sip.xmpp.test"))
        assert b.forwarding.replay("gw-a") == 3
        assert b.rooms.got == lost  # in arrival order, not the one gw-a handled
        assert b.forwarding.replay("gw-a") == 0  # once only
        after = RoomMessage(f"{ROOM}/bob", ALICE_JID, "after")
        b.forwarding.on_room_message(after)
        assert b.rooms.got[-1] == after
        # A seat the taker did not restore is no longer routed to the dead instance.
        b.rooms.seats.clear()
        assert not b.forwarding.claims(after.sender, after.recipient)
    finally:
        await b.stop()


async def test_a_presence_change_reaches_every_instance_holding_a_watcher() -> None:
    a, b = await _pair()
    sub = SipWatcherSubscription("d1", ALICE, BOB, SubscriptionState.ACTIVE, {}, T0 + 600)
    await a.store.save_sip_watcher_subscription(sub)
    a.start()
    b.start()
    try:
        await _settle(lambda: "gw-a" in a.bus.hub and "gw-b" in a.bus.hub)
        changes = [
            Presence(f"{BOB}/phone", ALICE_JID, None, "away"),
            Presence(f"{BOB}/phone", ALICE_JID, None, "dnd"),
            Presence(f"{BOB}/phone", ALICE_JID, "unavailable"),
        ]
        for change in changes:
            b.forwarding.on_presence(change)
        b.forwarding.on_presence(Presence(BOB, ALICE_JID, "subscribe"))  # not a change
        b.forwarding.on_presence(Presence("eve@xmpp.test", ALICE_JID))  # nobody watches eve
        await _settle(lambda: len(a.presences) == 3)
        assert a.presences == changes  # in order
        assert len(b.presences) == 5  # gw-b handled every one itself too
        # gw-a holds the watcher: what reaches it directly is not forwarded anywhere.
        a.forwarding.on_presence(changes[0])
        await asyncio.sleep(0.05)
        assert a.bus.sent == [] and len(b.presences) == 5
    finally:
        await a.stop()
        await b.stop()


async def test_an_iq_answer_nobody_here_asked_for_goes_to_the_others() -> None:
    a, b = await _pair()
    a.start()
    b.start()
    try:
        await _settle(lambda: "gw-a" in a.bus.hub and "gw-b" in a.bus.hub)
        answer = '<iq type="result" id="sx1-7" from="conference.xmpp.test" to="sip.xmpp.test"/>'
        b.forwarding.on_stray_answer(answer)
        await _settle(lambda: a.answers == [answer])
        await asyncio.sleep(0.05)
        assert b.answers == []  # not back to the one that sent it
    finally:
        await a.stop()
        await b.stop()


async def test_an_error_for_a_chat_message_sent_elsewhere_goes_to_the_others() -> None:
    a, b = await _pair()
    a.start()
    b.start()
    try:
        await _settle(lambda: "gw-a" in a.bus.hub and "gw-b" in a.bus.hub)
        err = StanzaError("nobody@xmpp.test", ALICE_JID, "m7", "item-not-found", "cancel", "no")
        b.forwarding.on_stray_error(err)
        await _settle(lambda: a.errors == [err])
        await asyncio.sleep(0.05)
        assert b.errors == [] and a.rooms.got == []  # not back to its sender, not to the rooms
    finally:
        await a.stop()
        await b.stop()


# --- a join waits for its announcement -------------------------------------------------------


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send_message(self, msg: ChatMessage) -> bool:
        self.sent.append(msg)
        return True

    def send_presence(self, presence: Presence) -> bool:
        self.sent.append(presence)
        return True

    def send_invitation(
        self, sender: str, room: str, invitee: str, reason: str | None, msg_id: str
    ) -> bool:
        self.sent.append(("invite", room, invitee))
        return True

    def configure_instant_room(self, sender: str, room: str) -> bool:
        self.sent.append(("configure", room))
        return True

    async def discover_service(self, domain: str, timeout: float = 10.0) -> ServiceInfo:
        raise NotImplementedError


async def test_a_join_goes_out_after_its_announcement_and_the_rest_behind_it() -> None:
    a, _ = await _pair()
    link = FakeLink()
    tasks: list[asyncio.Task[None]] = []
    port = SeatAnnouncing(link, a.seats, lambda work: tasks.append(asyncio.ensure_future(work)))
    join = Presence(ALICE_JID, f"{ROOM}/alice", muc=True)
    said = ChatMessage(ALICE_JID, ROOM, "hello", type="groupchat")
    assert port.send_presence(join)
    assert port.send_message(said)
    assert link.sent == []  # both wait for the announcement
    await asyncio.gather(*tasks)
    assert link.sent == [join, said]
    [(to, [text])] = a.bus.sent
    assert to is None and decode(text) == SeatOwner(ALICE, ROOM, "gw-a")
    port.send_message(said)  # nothing waits: at once
    assert link.sent == [join, said, said]


# --- LISTEN/NOTIFY on PostgreSQL ----------------------------------------------------------------


async def test_postgres_bus_to_one_instance_and_to_all(pg_url: str) -> None:  # noqa: F811
    stores = [await Store.open(pg_url, instance=n) for n in ("gw-a", "gw-b")]
    buses = [PgBus(s, pg_url, s.instance) for s in stores]
    got: dict[str, list[str]] = {"gw-a": [], "gw-b": []}
    listening = [
        asyncio.create_task(bus.listen(got[store.instance].append))
        for bus, store in zip(buses, stores, strict=True)
    ]
    try:
        await _settle(lambda: all(bus.listening for bus in buses))
        long = "x" * 20_000 + "é" * 5_000
        await buses[0].send("gw-b", ["one", long, "three"])
        await buses[1].send(None, ["all"])
        await _settle(lambda: len(got["gw-b"]) == 4 and len(got["gw-a"]) == 1)
        assert got["gw-b"] == ["one", long, "three", "all"]
        assert got["gw-a"] == ["all"]
        # The listening connection broken (PostgreSQL restarted, say): made again.
        conn = buses[1]._conn
        assert conn is not None
        await stores[0].notify("unused", [])  # the pool is up
        killer = psycopg2.connect(buses[0]._dsn)
        killer.autocommit = True
        with killer.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
        killer.close()
        await _settle(lambda: buses[1]._conn is not conn and buses[1].listening)
        await buses[0].send("gw-b", ["again"])
        await _settle(lambda: got["gw-b"][-1:] == ["again"])
    finally:
        for task in listening:
            task.cancel()
        await asyncio.gather(*listening, return_exceptions=True)
        for store in stores:
            await store.close()


# --- the XMPP link: stray iq answers out, another instance's answers in ------------------------


async def test_link_hands_out_stray_answers_and_takes_its_own_back(
    scripted: ScriptedServer,  # noqa: F811
) -> None:
    rec = Recorder()
    strays: list[str] = []
    link = _link(scripted.port, rec, on_stray_answer=strays.append)
    async with running(link):
        await rec.wait_link([True])
        query = asyncio.create_task(link.discover_service(MUC_DOMAIN, timeout=10))
        asked = await scripted.next_stanza()
        iq_id = asked.get("id")
        # Answers for queries this link never made go out whole, errors included.
        scripted.push(f"<iq type='result' id='other-1' from='{MUC_DOMAIN}' to='{DOMAIN}'/>")
        scripted.push(
            f"<iq type='error' id='other-2' from='{MUC_DOMAIN}' to='{DOMAIN}'><error "
            "type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
            "</error></iq>"
        )
        await _settle(lambda: len(strays) == 2)
        assert ["other-1" in strays[0], "other-2" in strays[1]] == [True, True]
        assert rec.errors.empty()  # not taken for a message's error
        assert not link.take_stray_answer(strays[0])  # not ours
        assert not link.take_stray_answer("<not xml")
        # The answer to our query, as another instance received and forwarded it.
        answer = (
            f"<iq xmlns='{NS}' type='result' id='{iq_id}' from='{MUC_DOMAIN}' to='{DOMAIN}'>"
            f"<query xmlns='http://jabber.org/protocol/disco#info'><identity "
            "category='conference' type='text'/><feature var='http://jabber.org/protocol/muc'/>"
            "</query></iq>"
        )
        assert link.take_stray_answer(answer)
        info = await asyncio.wait_for(query, 5)
        assert info.kind is ServiceKind.MUC
