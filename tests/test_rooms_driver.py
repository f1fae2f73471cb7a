"""The rooms driver (component/runtime/rooms_driver.py) with fake XMPP and SIP ports and the
in-memory store: a MESSAGE waits for service discovery, room messages keep their order per SIP
user, and those for a SIP user who is offline go to the retry queue in order."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from component.addresses import AddressBook
from component.rooms.core import RoomsCore
from component.rooms.ports import StoredMemberships
from component.runtime.rooms_driver import RoomsDriver
from component.store import MessageDirection
from component.store.memory import MemoryStore
from component.values import (
    ChatMessage,
    ImdnAsk,
    Presence,
    RoomMessage,
    RoomPresence,
    ServiceInfo,
    ServiceKind,
    SipText,
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


class FakeXmpp:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.answers: dict[str, asyncio.Future[ServiceInfo]] = {}

    def send_message(self, msg: ChatMessage) -> bool:
        self.sent.append(msg)
        return True

    def send_presence(self, presence: Presence) -> bool:
        self.sent.append(presence)
        return True

    def send_invitation(
        self, sender: str, room: str, invitee: str, reason: str | None, msg_id: str
    ) -> bool:
        return True

    def configure_instant_room(self, sender: str, room: str) -> bool:
        return True

    async def answer(self, info: ServiceInfo) -> None:
        await asyncio.sleep(0)  # the driver's query task starts
        self.answers[info.domain].set_result(info)

    async def discover_service(self, domain: str, timeout: float = 10.0) -> ServiceInfo:
        future = self.answers.setdefault(domain, asyncio.get_running_loop().create_future())
        return await future


class FakeSip:
    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.texts: list[tuple[str, str, str | None]] = []

    async def send_text(
        self,
        *,
        from_uri: str,
        to_uri: str,
        body: str,
        from_display: str | None = None,
        imdn: ImdnAsk | None = None,
        sent_at: float | None = None,
    ) -> int:
        await asyncio.sleep(0.001 * (len(self.texts) % 3))  # answers take uneven time
        self.texts.append((from_uri, body, from_display))
        return self.status


async def _driver(sip: FakeSip) -> tuple[RoomsDriver, FakeXmpp, MemoryStore]:
    xmpp, store = FakeXmpp(), MemoryStore()
    driver = RoomsDriver(
        RoomsCore(BOOK),
        book=BOOK,
        xmpp=xmpp,
        sip=sip,  # type: ignore[arg-type]
        store=store,
        memberships=StoredMemberships(store),
        clock=time.time,
        delay_time=60.0,
    )
    await driver.start()
    driver.on_link(True)
    return driver, xmpp, store


async def _joined(driver: RoomsDriver, xmpp: FakeXmpp) -> None:
    text = SipText(ALICE, "sip:alice*room*conference.xmpp.test@jabber.sip.test", "/join")
    assert driver.take_text(text) is None  # the service is not known yet
    assert driver.waiting(text)
    await xmpp.answer(ServiceInfo("conference.xmpp.test", ServiceKind.MUC))
    assert await driver.settle_text(text) is True  # a room's after all: 202, not chat
    assert isinstance(xmpp.sent[-1], Presence) and xmpp.sent[-1].muc
    driver.on_room_presence(RoomPresence(f"{ROOM}/alice", ALICE_JID, status_codes=(110,)))
    driver.on_room_message(RoomMessage(ROOM, ALICE_JID, None, subject="hi"))


async def test_a_person_is_passed_to_chat_after_discovery() -> None:
    driver, xmpp, _ = await _driver(FakeSip())
    text = SipText(ALICE, "sip:bob*xmpp.test@jabber.sip.test", "hello")
    assert driver.take_text(text) is None
    await xmpp.answer(ServiceInfo("xmpp.test", ServiceKind.OTHER))
    assert await driver.settle_text(text) is False
    # known now: the next one is chat at once
    assert driver.take_text(SipText(ALICE, text.to_uri, "again")) is False
    await driver.stop()


async def test_room_messages_reach_the_sip_user_in_order() -> None:
    sip = FakeSip()
    driver, xmpp, _ = await _driver(sip)
    await _joined(driver, xmpp)
    for n in range(20):
        driver.on_room_message(RoomMessage(f"{ROOM}/bob", ALICE_JID, f"m{n}"))
    await driver.stop(timeout=5)
    bodies = [body for _, body, _ in sip.texts if body.startswith("bob: ")]
    assert bodies == [f"bob: m{n}" for n in range(20)]
    assert all(display == "bob" for _, body, display in sip.texts if body.startswith("bob: "))


@pytest.mark.parametrize("status", [480, 404])  # a member who unregistered: 404 at the proxy
async def test_an_offline_sip_users_room_messages_are_queued_in_order(status: int) -> None:
    sip = FakeSip(status=status)
    driver, xmpp, store = await _driver(sip)
    await _joined(driver, xmpp)
    for n in range(5):
        driver.on_room_message(RoomMessage(f"{ROOM}/bob", ALICE_JID, f"m{n}"))
    await driver.stop(timeout=5)
    queued = await store.claim_messages_for_recipient(ALICE, time.time(), "test")
    assert [q.body for q in queued] == [f"bob: m{n}" for n in range(5)]
    assert {q.direction for q in queued} == {MessageDirection.XMPP_TO_SIP}
    assert {q.extra.get("room") for q in queued} == {ROOM}
    # only the first was tried: the rest went straight to the queue behind it
    assert [body for _, body, _ in sip.texts if body.startswith("bob: ")] == ["bob: m0"]
    assert {q.extra.get("from_display") for q in queued} == {"bob"}  # the speaker, for later


async def test_back_online_room_messages_stay_behind_those_still_queued() -> None:
    sip = FakeSip(status=480)
    driver, xmpp, store = await _driver(sip)
    await _joined(driver, xmpp)
    driver.on_room_message(RoomMessage(f"{ROOM}/bob", ALICE_JID, "m0"))
    await asyncio.sleep(0.05)
    sip.status = 200
    driver.user_online(ALICE)
    # m0 still waits in the queue (messaging has not delivered it yet): m1 goes behind it
    driver.on_room_message(RoomMessage(f"{ROOM}/bob", ALICE_JID, "m1"))
    await asyncio.sleep(0.05)
    waiting = await store.messages_for_recipient(ALICE)
    assert [q.body for q in waiting] == ["bob: m0", "bob: m1"]
    # once the queue holds none of alice's room messages, they go out directly again
    for q in await store.claim_messages_for_recipient(ALICE, time.time(), "test"):
        await store.mark_delivered(q.id, time.time())
    driver.on_room_message(RoomMessage(f"{ROOM}/bob", ALICE_JID, "m2"))
    await driver.stop(timeout=5)
    assert [body for _, body, _ in sip.texts if body.startswith("bob: ")] == ["bob: m0", "bob: m2"]
    assert await store.messages_for_recipient(ALICE) == []


async def test_a_member_who_says_offline_gets_room_messages_queued_without_a_try() -> None:
    sip = FakeSip()
    driver, xmpp, store = await _driver(sip)
    await _joined(driver, xmpp)
    driver.user_state(ALICE, False, None, None)  # the `offline` command, or REGISTER expiry
    for n in range(3):
        driver.on_room_message(RoomMessage(f"{ROOM}/bob", ALICE_JID, f"m{n}"))
    await driver.stop(timeout=5)
    assert not [body for _, body, _ in sip.texts if body.startswith("bob: ")]  # none tried
    queued = await store.claim_messages_for_recipient(ALICE, time.time(), "test")
    assert [q.body for q in queued] == [f"bob: m{n}" for n in range(3)]
