"""Typing, receipts, read markers, corrections (DESIGN 4.3) through the message router, with a
fake XMPP link and a recording SIP side, on the in-memory store and a fake clock."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import pytest

from component.messaging.notifications import Recent, sip_text_of
from component.messaging.router import MessageRouter
from component.store.memory import MemoryStore
from component.values import (
    ChatMessage,
    Composing,
    ImdnAsk,
    ImdnNews,
    ImdnStatus,
    SipAnswer,
    SipText,
    StanzaError,
)
from component.xmpp.stanzas import format_message, parse_message
from tests.fakes import UnusedSip
from tests.test_messaging import BOOK, Clock, FakeCommands, FakeXmpp

ALICE = "sip:alice@sip.test"  # the SIP user
ALICE_JID = "alice@sip.xmpp.test"
BOB_URI = "sip:bob*xmpp.test@jabber.sip.test"  # the XMPP user as SIP sees him
BOB = "bob@xmpp.test/phone"


@dataclass
class Sent:
    """One request the SIP side was asked to send."""

    kind: str  # text, composing, notification
    from_uri: str
    to_uri: str
    body: str | None = None
    imdn: ImdnAsk | None = None
    sent_at: float | None = None
    active: bool | None = None
    refresh: int | None = None
    message_id: str | None = None
    status: ImdnStatus | None = None


@dataclass
class RecordingSip(UnusedSip):
    """Records every MESSAGE; answers each with the next scripted status (200 after)."""

    statuses: list[int] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)

    def _answer(self) -> int:
        return self.statuses.pop(0) if self.statuses else 200

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
        self.sent.append(Sent("text", from_uri, to_uri, body, imdn, sent_at))
        return self._answer()

    async def send_composing(
        self, *, from_uri: str, to_uri: str, active: bool, refresh: int | None
    ) -> int:
        self.sent.append(Sent("composing", from_uri, to_uri, active=active, refresh=refresh))
        return self._answer()

    async def send_notification(
        self, *, from_uri: str, to_uri: str, message_id: str, sent_at: float, status: ImdnStatus
    ) -> int:
        self.sent.append(
            Sent(
                "notification",
                from_uri,
                to_uri,
                sent_at=sent_at,
                message_id=message_id,
                status=status,
            )
        )
        return self._answer()


@dataclass
class World:
    router: MessageRouter
    xmpp: FakeXmpp
    sip: RecordingSip
    clock: Clock
    store: MemoryStore


@pytest.fixture
def world(memory_store: MemoryStore) -> World:
    xmpp, sip, clock = FakeXmpp(), RecordingSip(), Clock()
    router = MessageRouter(
        BOOK, xmpp, sip, memory_store, FakeCommands(), clock=clock, delay_time=90.0
    )
    return World(router, xmpp, sip, clock, memory_store)


def _sip(body: str = "", **fields: object) -> SipText:
    return SipText(ALICE, BOB_URI, body, **fields)  # type: ignore[arg-type]


def _answer(world: World, msg: SipText) -> SipAnswer:
    answer = world.router.answer_now(msg)
    assert answer is not None
    return answer


# --- chat states ---------------------------------------------------------------------------------


def test_sip_typing_is_composing_then_active_on_idle(world: World) -> None:
    assert _answer(world, _sip(composing=Composing(True, 30))).status == 200
    assert _answer(world, _sip(composing=Composing(False))).status == 200
    states = [(m.sender, m.recipient, m.body, m.chat_state) for m in world.xmpp.sent]
    assert states == [
        (f"{ALICE_JID}/sip", "bob@xmpp.test", None, "composing"),
        (f"{ALICE_JID}/sip", "bob@xmpp.test", None, "active"),
    ]


async def test_sip_typing_that_lapses_is_paused(world: World) -> None:
    _answer(world, _sip(composing=Composing(True, 30)))
    world.clock.now += 29
    await world.router.notes.expire()
    assert [m.chat_state for m in world.xmpp.sent] == ["composing"]
    world.clock.now += 1  # RFC 3994 refresh ran out without news
    await world.router.notes.expire()
    assert [m.chat_state for m in world.xmpp.sent] == ["composing", "paused"]
    # idle after the lapse says nothing more; a lone idle neither
    _answer(world, _sip(composing=Composing(False)))
    assert [m.chat_state for m in world.xmpp.sent] == ["composing", "paused"]


async def test_sip_typing_without_refresh_lapses_after_120s(world: World) -> None:
    _answer(world, _sip(composing=Composing(True)))
    world.clock.now += 119
    await world.router.notes.expire()
    assert len(world.xmpp.sent) == 1
    world.clock.now += 1
    await world.router.notes.expire()
    assert world.xmpp.sent[-1].chat_state == "paused"


async def test_sip_typing_is_never_stored(world: World) -> None:
    world.xmpp.connected = False
    assert _answer(world, _sip(composing=Composing(True, 30))).status == 200
    assert world.xmpp.sent == []
    assert (await world.store.counts()).queued == 0
    assert world.router.notes.counters["dropped"] == 1


def test_sip_text_ends_typing_without_a_state_message(world: World) -> None:
    _answer(world, _sip(composing=Composing(True, 30)))
    assert _answer(world, _sip("done typing")).status == 202
    _answer(world, _sip(composing=Composing(False)))  # already ended by the message
    assert [(m.body, m.chat_state) for m in world.xmpp.sent] == [
        (None, "composing"),
        ("done typing", None),
    ]


async def test_xmpp_composing_is_active_with_refresh_then_idle(world: World) -> None:
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="composing"))
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="paused"))
    # a state without earlier composing is not news on the SIP side
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="gone"))
    assert [(s.kind, s.from_uri, s.to_uri, s.active, s.refresh) for s in world.sip.sent] == [
        ("composing", BOB_URI, ALICE, True, 60),
        ("composing", BOB_URI, ALICE, False, None),
    ]
    assert all(s.body is None for s in world.sip.sent)


async def test_xmpp_paused_after_a_composing_relayed_elsewhere_is_idle(world: World) -> None:
    """DESIGN 9: the composing went through another instance; paused still ends it here."""
    world.router.notes.shared = True
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="paused"))
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="inactive"))
    assert [(s.kind, s.to_uri, s.active) for s in world.sip.sent] == [("composing", ALICE, False)]


async def test_xmpp_composing_without_follow_up_turns_idle(world: World) -> None:
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="composing"))
    world.clock.now += 59
    await world.router.notes.expire()
    assert len(world.sip.sent) == 1
    world.clock.now += 1
    await world.router.notes.expire()
    assert [(s.kind, s.active) for s in world.sip.sent] == [
        ("composing", True),
        ("composing", False),
    ]


async def test_xmpp_typing_refused_is_dropped_not_queued(world: World) -> None:
    world.sip.statuses = [415]
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="composing"))
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state="paused"))
    assert [(s.kind, s.active) for s in world.sip.sent] == [("composing", True)]
    assert (await world.store.counts()).queued == 0
    assert world.xmpp.errors == []


# --- delivery receipts and read markers ----------------------------------------------------------


def test_sip_imdn_request_becomes_request_and_markable(world: World) -> None:
    ask = ImdnAsk("imdn-1", 1_600_000_000.0, delivery=True, display=True)
    assert _answer(world, _sip("read me", imdn=ask)).status == 202
    [stanza] = world.xmpp.sent
    assert stanza.receipt_request and stanza.markable and stanza.body == "read me"
    delivery_only = ImdnAsk("imdn-2", 1_600_000_000.0)
    _answer(world, _sip("just deliver", imdn=delivery_only))
    assert world.xmpp.sent[-1].receipt_request and not world.xmpp.sent[-1].markable


async def test_xmpp_received_and_displayed_go_back_as_imdn(world: World) -> None:
    ask = ImdnAsk("imdn-1", 1_600_000_000.0, delivery=True, display=True)
    _answer(world, _sip("read me", imdn=ask))
    [stanza] = world.xmpp.sent
    assert stanza.id is not None
    # someone else's receipt for that id is ignored
    await world.router.on_xmpp_message(
        ChatMessage("mallory@xmpp.test/x", ALICE_JID, None, receipt_for=stanza.id)
    )
    assert world.sip.sent == []
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, receipt_for=stanza.id))
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, displayed_for=stanza.id))
    # a second marker for the same message is not news
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, displayed_for=stanza.id))
    got = [
        (s.kind, s.from_uri, s.to_uri, s.message_id, s.status, s.sent_at) for s in world.sip.sent
    ]
    assert got == [
        ("notification", BOB_URI, ALICE, "imdn-1", ImdnStatus.DELIVERED, 1_600_000_000.0),
        ("notification", BOB_URI, ALICE, "imdn-1", ImdnStatus.DISPLAYED, 1_600_000_000.0),
    ]


async def test_xmpp_displayed_for_a_message_that_did_not_ask_is_dropped(world: World) -> None:
    _answer(world, _sip("plain", imdn=ImdnAsk("imdn-3", 1.0, delivery=True, display=False)))
    stanza_id = world.xmpp.sent[0].id
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, displayed_for=stanza_id))
    assert world.sip.sent == []


async def test_xmpp_error_is_negative_imdn(world: World) -> None:
    _answer(world, _sip("to nobody", imdn=ImdnAsk("imdn-4", 5.0)))
    stanza_id = world.xmpp.sent[0].id
    pending = world.router.on_xmpp_error(
        StanzaError("bob@xmpp.test", f"{ALICE_JID}/sip", stanza_id, "item-not-found")
    )
    assert pending is not None
    await pending  # the notice (DESIGN 4.4)
    await world.router._tasks.wait(1.0)
    kinds = [(s.kind, s.status, s.message_id) for s in world.sip.sent]
    assert ("notification", ImdnStatus.FAILED, "imdn-4") in kinds
    assert any(s.kind == "text" and "not delivered" in (s.body or "") for s in world.sip.sent)


async def test_xmpp_receipt_request_goes_as_imdn_with_origin_id(world: World) -> None:
    msg = ChatMessage(
        BOB, ALICE_JID, "did you get it?", id="s-1", origin_id="o-1", receipt_request=True
    )
    await world.router.on_xmpp_message(msg)
    [text] = world.sip.sent
    assert text.imdn is not None
    assert (text.imdn.message_id, text.imdn.delivery, text.imdn.display) == ("o-1", True, False)
    # the SIP user's delivery notification comes back as <received id=stanza id/>
    news = ImdnNews("o-1", ImdnStatus.DELIVERED, text.imdn.sent_at or 0.0)
    assert _answer(world, SipText(ALICE, BOB_URI, "", notification=news)).status == 200
    [receipt] = world.xmpp.sent
    assert (receipt.sender, receipt.recipient, receipt.receipt_for, receipt.body) == (
        ALICE_JID,
        BOB,
        "s-1",
        None,
    )


async def test_xmpp_markable_asks_display_and_gets_displayed(world: World) -> None:
    msg = ChatMessage(BOB, ALICE_JID, "mark me", id="s-2", receipt_request=True, markable=True)
    await world.router.on_xmpp_message(msg)
    ask = world.sip.sent[0].imdn
    assert ask is not None and ask.display and ask.delivery
    assert ask.message_id.startswith("sn")  # no origin-id: one of ours
    for status in (ImdnStatus.DELIVERED, ImdnStatus.DISPLAYED):
        news = ImdnNews(ask.message_id, status, 0.0)
        _answer(world, SipText(ALICE, BOB_URI, "", notification=news))
    assert [(m.receipt_for, m.displayed_for) for m in world.xmpp.sent] == [
        ("s-2", None),
        (None, "s-2"),
    ]


async def test_imdn_from_another_sip_user_or_unknown_id_is_dropped(world: World) -> None:
    await world.router.on_xmpp_message(
        ChatMessage(BOB, ALICE_JID, "x", id="s-3", origin_id="o-3", receipt_request=True)
    )
    news = ImdnNews("o-3", ImdnStatus.DELIVERED, 0.0)
    _answer(world, SipText("sip:carol@sip.test", BOB_URI, "", notification=news))
    _answer(world, SipText(ALICE, BOB_URI, "", notification=ImdnNews("zz", news.status, 0.0)))
    assert world.xmpp.sent == []


async def test_sip_imdn_failed_is_an_error_stanza(world: World) -> None:
    await world.router.on_xmpp_message(
        ChatMessage(BOB, ALICE_JID, "x", id="s-4", origin_id="o-4", receipt_request=True)
    )
    news = ImdnNews("o-4", ImdnStatus.FAILED, 0.0)
    _answer(world, SipText(ALICE, BOB_URI, "", notification=news))
    [err] = world.xmpp.errors
    assert (err.id, err.recipient, err.sender, err.condition) == (
        "s-4",
        BOB,
        ALICE_JID,
        "recipient-unavailable",
    )
    assert err.text == "alice@sip.test reports the message was not delivered"
    assert world.xmpp.sent == []


async def test_final_sip_failure_of_receipt_request_is_an_error_stanza(world: World) -> None:
    world.sip.statuses = [404]
    await world.router.on_xmpp_message(
        ChatMessage(BOB, "nobody@sip.xmpp.test", "x", id="s-5", receipt_request=True)
    )
    [err] = world.xmpp.errors
    assert (err.id, err.condition) == ("s-5", "item-not-found")


async def test_identities_expire_after_keep(world: World) -> None:
    await world.router.on_xmpp_message(
        ChatMessage(BOB, ALICE_JID, "x", id="s-6", origin_id="o-6", receipt_request=True)
    )
    world.clock.now += 90  # keep = delay_time for a router built without its notifications
    _answer(
        world, SipText(ALICE, BOB_URI, "", notification=ImdnNews("o-6", ImdnStatus.DELIVERED, 0))
    )
    assert world.xmpp.sent == []


# --- stored messages keep their identity and say when they were written ------------------------


async def test_stored_xmpp_message_goes_late_with_datetime_and_imdn(world: World) -> None:
    world.sip.statuses = [480]
    sent_at = world.clock.now
    await world.router.on_xmpp_message(
        ChatMessage(BOB, ALICE_JID, "while away", id="s-7", origin_id="o-7", receipt_request=True)
    )
    world.clock.now += 30
    assert await world.router.retry_due() == 1
    first, late = world.sip.sent
    assert first.sent_at is None and late.sent_at == sent_at
    assert late.imdn is not None and late.imdn.message_id == "o-7"
    news = ImdnNews("o-7", ImdnStatus.DELIVERED, sent_at)
    _answer(world, SipText(ALICE, BOB_URI, "", notification=news))
    assert [m.receipt_for for m in world.xmpp.sent] == ["s-7"]


async def test_stored_sip_message_keeps_its_receipt_request(world: World) -> None:
    world.xmpp.connected = False
    msg = _sip("later", imdn=ImdnAsk("imdn-8", 1.0, delivery=True, display=True))
    assert world.router.answer_now(msg) is None
    assert (await world.router.answer_later(msg)).status == 202
    world.xmpp.connected = True
    world.clock.now += 3
    await world.router.retry_due()
    [stanza] = world.xmpp.sent
    assert stanza.receipt_request and stanza.markable and stanza.delay_stamp
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, receipt_for=stanza.id))
    assert [(s.kind, s.message_id) for s in world.sip.sent] == [("notification", "imdn-8")]


# --- corrections, replies, links -----------------------------------------------------------------


async def test_correction_says_what_it_corrects(world: World) -> None:
    await world.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, "see you at 5", id="m-1"))
    await world.router.on_xmpp_message(
        ChatMessage(BOB, ALICE_JID, "see you at 6", id="m-2", replaces="m-1")
    )
    await world.router.on_xmpp_message(
        ChatMessage(BOB, ALICE_JID, "at 7", id="m-3", replaces="unknown")
    )
    assert [s.body for s in world.sip.sent] == [
        "see you at 5",
        'Correction of "see you at 5": see you at 6',
        "Correction of the previous message: at 7",
    ]


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        # XEP-0461: the fallback quote is part of the body and stays
        (ChatMessage(BOB, ALICE_JID, "> earlier words\nmy answer"), "> earlier words\nmy answer"),
        # XEP-0066 / XEP-0363: the URL reaches SIP in the text
        (
            ChatMessage(BOB, ALICE_JID, None, link="https://up.xmpp.test/a.png"),
            "https://up.xmpp.test/a.png",
        ),
        (
            ChatMessage(BOB, ALICE_JID, "look", link="https://up.xmpp.test/a.png"),
            "look\nhttps://up.xmpp.test/a.png",
        ),
        (
            ChatMessage(
                BOB, ALICE_JID, "https://up.xmpp.test/a.png", link="https://up.xmpp.test/a.png"
            ),
            "https://up.xmpp.test/a.png",
        ),
        (ChatMessage(BOB, ALICE_JID, None, chat_state="composing"), None),
    ],
)
def test_sip_text_of(msg: ChatMessage, text: str | None) -> None:
    assert sip_text_of(msg) == text


def test_recent_expires_and_is_bounded() -> None:
    recent: Recent[str, int] = Recent(10.0, max_entries=2)
    recent.put("a", 1, 0.0)
    recent.put("b", 2, 5.0)
    assert recent.get("a", 9.9) == 1 and recent.get("a", 10.0) is None
    recent.put("c", 3, 6.0)
    recent.put("d", 4, 6.0)
    assert len(recent) == 2 and recent.get("b", 6.0) is None
    assert recent.pop("c", 6.0) == 3 and recent.get("c", 6.0) is None


# --- the stanza elements -------------------------------------------------------------------------


def test_parse_markers_correction_link_origin() -> None:
    xml = ET.fromstring(
        "<message xmlns='jabber:component:accept' type='chat' id='s-9'>"
        "<body>fixed</body>"
        "<markable xmlns='urn:xmpp:chat-markers:0'/>"
        "<displayed xmlns='urn:xmpp:chat-markers:0' id='d-1'/>"
        "<replace xmlns='urn:xmpp:message-correct:0' id='s-8'/>"
        "<x xmlns='jabber:x:oob'><url> https://up.xmpp.test/f.jpg </url></x>"
        "<origin-id xmlns='urn:xmpp:sid:0' id='o-9'/>"
        "</message>"
    )
    msg = parse_message(xml, BOB, ALICE_JID)
    assert (msg.markable, msg.displayed_for, msg.replaces, msg.link, msg.origin_id) == (
        True,
        "d-1",
        "s-8",
        "https://up.xmpp.test/f.jpg",
        "o-9",
    )


def test_format_markable_and_displayed() -> None:
    text = format_message(
        ChatMessage(f"{ALICE_JID}/sip", BOB, "x", id="i", receipt_request=True, markable=True)
    )
    assert '<markable xmlns="urn:xmpp:chat-markers:0"/>' in text
    shown = format_message(ChatMessage(ALICE_JID, BOB, None, id="j", displayed_for="i"))
    assert '<displayed xmlns="urn:xmpp:chat-markers:0" id="i"/>' in shown
    assert "<body" not in shown


async def test_unconfirmed_after_link_loss_keeps_receipt_request_typing_dropped(
    world: World,
) -> None:
    _answer(world, _sip("lost?", imdn=ImdnAsk("imdn-9", 1.0, delivery=True, display=True)))
    _answer(world, _sip(composing=Composing(True, 30)))
    written = list(world.xmpp.sent)
    world.xmpp.sent.clear()
    await world.router.requeue_unconfirmed(written)  # the link went away before the ping
    world.clock.now += 1
    await world.router.retry_due()
    [again] = world.xmpp.sent
    assert (again.id, again.body) == (written[0].id, "lost?")
    assert again.receipt_request and again.markable


async def test_sip_refresh_is_capped(world: World) -> None:
    _answer(world, _sip(composing=Composing(True, 99_999)))
    world.clock.now += 300  # MAX_REFRESH: typing is not kept for a day
    await world.router.notes.expire()
    assert [m.chat_state for m in world.xmpp.sent] == ["composing", "paused"]


class SlowSip(RecordingSip):
    """Holds each isComposing until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def send_composing(
        self, *, from_uri: str, to_uri: str, active: bool, refresh: int | None
    ) -> int:
        status = await super().send_composing(
            from_uri=from_uri, to_uri=to_uri, active=active, refresh=refresh
        )
        await self.release.wait()
        return status


@pytest.mark.parametrize(("first", "sent"), [(200, [True, False]), (415, [True])])
async def test_states_while_one_is_in_flight_keep_only_the_latest(
    memory_store: MemoryStore, first: int, sent: list[bool]
) -> None:
    xmpp, sip = FakeXmpp(), SlowSip()
    sip.statuses = [first]
    router = MessageRouter(
        BOOK, xmpp, sip, memory_store, FakeCommands(), clock=Clock(), delay_time=90
    )
    states = ["composing", "paused", "composing", "paused"]
    tasks = [
        asyncio.create_task(router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, chat_state=s)))
        for s in states
    ]
    await asyncio.sleep(0)
    sip.release.set()
    await asyncio.gather(*tasks)
    # the first in flight; of the three that came meanwhile only the last one, once answered
    assert [s.active for s in sip.sent] == sent
