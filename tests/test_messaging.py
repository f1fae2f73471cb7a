"""The message router with a fake XMPP link and a scripted SIP side, on the in-memory store."""

from __future__ import annotations

import pytest

from component.addresses import AddressBook
from component.errors import Refusal
from component.messaging.router import MessageRouter
from component.store import MessageDirection
from component.store.memory import MemoryStore
from component.values import ChatMessage, ImdnAsk, Presence, SipAnswer, SipText, StanzaError
from component.xmpp.stanzas import error_for
from tests.fakes import UnusedSip

BOOK = AddressBook(
    component="sip.xmpp.test",
    sip_domain="sip.test",
    jdomain="jabber.sip.test",
    delimiter="*",
    aliases=(("irc.xmpp.test", "%"),),
    registrar="sip:jabber_gateway@sip.test",
)


class FakeXmpp:
    def __init__(self) -> None:
        self.connected = True
        self.sent: list[ChatMessage] = []
        self.errors: list[StanzaError] = []

    def send_message(self, msg: ChatMessage) -> bool:
        if not self.connected:
            return False
        self.sent.append(msg)
        return True

    def send_presence(self, presence: Presence) -> bool:
        return self.connected

    def refuse(self, stanza: ChatMessage | Presence, refusal: Refusal) -> bool:
        # What the real link writes: the adapter's one Refusal -> error stanza mapping.
        kind = "message" if isinstance(stanza, ChatMessage) else "presence"
        self.errors.append(
            error_for(
                refusal, kind, sender=stanza.recipient, recipient=stanza.sender, id_=stanza.id
            )
        )
        return self.connected


class FakeCommands:
    """Registrar commands: answers "ok" to "online", None (no command) to anything else."""

    def __init__(self) -> None:
        self.seen: list[SipText] = []

    async def command(self, msg: SipText) -> str | None:
        self.seen.append(msg)
        return "ok" if msg.body == "online" else None


class FakeSip(UnusedSip):
    """Answers each MESSAGE with the next scripted status (200 when the script runs out)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.sent: list[tuple[str, str, str, str | None]] = []

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
        self.sent.append((from_uri, to_uri, body, from_display))
        return self.statuses.pop(0) if self.statuses else 200


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(memory_store: MemoryStore) -> MemoryStore:
    """The router's store port: the in-memory fake."""
    return memory_store


def _router(store: MemoryStore, sip: FakeSip, xmpp: FakeXmpp, clock: Clock) -> MessageRouter:
    return MessageRouter(BOOK, xmpp, sip, store, FakeCommands(), clock=clock, delay_time=90.0)


async def _answer(router: MessageRouter, msg: SipText) -> SipAnswer:
    """What the SIP gate does: the hot path, else the path that waits."""
    now = router.answer_now(msg)
    return now if now is not None else await router.answer_later(msg)


async def test_sip_to_xmpp_written_gets_202(store: MemoryStore) -> None:
    xmpp, sip, clock = FakeXmpp(), FakeSip(), Clock()
    router = _router(store, sip, xmpp, clock)
    # The hot path answers in the same call, without awaiting anything.
    answer = router.answer_now(
        SipText("sip:alice@sip.test", "sip:bob*xmpp.test@jabber.sip.test", "héllo <&>")
    )
    assert answer is not None and answer.status == 202
    [sent] = xmpp.sent
    assert (sent.sender, sent.recipient, sent.body) == (
        "alice@sip.test".replace("sip.test", "sip.xmpp.test") + "/sip",
        "bob@xmpp.test",
        "héllo <&>",
    )


@pytest.mark.parametrize(
    ("to_uri", "status"),
    [
        ("sip:carol@elsewhere.example", 403),  # not an open relay
        ("sip:alice@sip.test", 404),  # home users are the proxy's business
        ("sip:*xmpp.test@jabber.sip.test", 400),  # empty localpart
    ],
)
async def test_sip_to_xmpp_refusals(store: MemoryStore, to_uri: str, status: int) -> None:
    xmpp = FakeXmpp()
    router = _router(store, FakeSip(), xmpp, Clock())
    msg = SipText("sip:alice@sip.test", to_uri, "x")
    with pytest.raises(Refusal) as now:
        router.answer_now(msg)
    with pytest.raises(Refusal) as later:
        await router.answer_later(msg)
    assert now.value.sip_status == later.value.sip_status == status
    assert now.value.text  # the Warning text the SIP edge sends
    assert xmpp.sent == []


async def test_link_down_stores_then_delivers_with_delay_stamp(store: MemoryStore) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    xmpp.connected = False
    router = _router(store, FakeSip(), xmpp, clock)
    msg = SipText("sip:alice@sip.test", "sip:bob*xmpp.test@jabber.sip.test", "later")
    assert router.answer_now(msg) is None  # storing must be awaited
    answer = await _answer(router, msg)
    assert answer.status == 202
    assert (await store.counts()).queued == 1
    xmpp.connected = True
    clock.now += 3
    assert await router.retry_due() == 1
    [sent] = xmpp.sent
    assert sent.body == "later" and sent.delay_stamp is not None
    assert sent.recipient == "bob@xmpp.test"


async def test_xmpp_to_sip_success(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), FakeSip(200)
    router = _router(store, sip, xmpp, Clock())
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/phone", "alice@sip.xmpp.test", "hi", id="m1")
    )
    assert sip.sent == [("sip:bob*xmpp.test@jabber.sip.test", "sip:alice@sip.test", "hi", None)]
    assert xmpp.errors == []


@pytest.mark.parametrize(
    ("status", "condition"),
    [
        (404, "item-not-found"),
        (604, "item-not-found"),
        (403, "forbidden"),
        (603, "forbidden"),
        (413, "not-acceptable"),
        (500, "internal-server-error"),
    ],
)
async def test_xmpp_to_sip_final_failures(store: MemoryStore, status: int, condition: str) -> None:
    xmpp = FakeXmpp()
    router = _router(store, FakeSip(status), xmpp, Clock())
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/phone", "alice@sip.xmpp.test", "hi", id="m1")
    )
    [err] = xmpp.errors
    assert (err.condition, err.id, err.recipient, err.sender) == (
        condition,
        "m1",
        "bob@xmpp.test/phone",
        "alice@sip.xmpp.test",
    )


async def test_offline_user_is_queued_retried_and_expires(store: MemoryStore) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    sip = FakeSip(480, 480)
    router = _router(store, sip, xmpp, clock)
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/phone", "alice@sip.xmpp.test", "are you there", id="q1")
    )
    assert xmpp.errors == []
    counts = await store.counts()
    assert counts.queued == 1
    clock.now += 10  # first retry due after 5 s: still 480
    await router.retry_due()
    assert len(sip.sent) == 2 and xmpp.errors == []
    clock.now += 100  # past delay_time: the sender is told
    await router.retry_due()
    [err] = xmpp.errors
    assert err.condition == "recipient-unavailable" and err.id == "q1"
    assert err.recipient == "bob@xmpp.test/phone"


async def test_404_for_user_seen_before_means_offline(store: MemoryStore) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    await store.mark_user_seen("sip:alice@sip.test", clock.now)
    sip = FakeSip(404)
    router = _router(store, sip, xmpp, clock)
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/phone", "alice@sip.xmpp.test", "hello", id="q2")
    )
    assert xmpp.errors == []
    # the user comes online (the UserOnline port): delivered at once, as the router's own work
    router.user_online("sip:alice@sip.test")
    await router.settle(5.0)
    assert [s[2] for s in sip.sent] == ["hello", "hello"]
    waiting = await store.messages_for_recipient("sip:alice@sip.test")
    assert waiting == []


async def test_xmpp_error_becomes_notice_to_sip_sender(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), FakeSip()
    router = _router(store, sip, xmpp, Clock())
    router.answer_now(
        SipText("sip:alice@sip.test", "sip:nobody*xmpp.test@jabber.sip.test", "hello?")
    )
    [sent] = xmpp.sent
    pending = router.on_xmpp_error(
        StanzaError("nobody@xmpp.test", sent.sender, sent.id, "service-unavailable")
    )
    assert pending is not None
    await pending
    [(from_uri, to_uri, body, _)] = sip.sent
    assert from_uri == "sip:jabber_gateway@sip.test" and to_uri == "sip:alice@sip.test"
    assert "nobody@xmpp.test" in body and "service unavailable" in body


async def test_an_error_for_a_message_sent_elsewhere_is_not_this_instances(
    store: MemoryStore,
) -> None:
    """DESIGN 9: None tells the caller to hand the error to the other instances; the one
    that sent the message tells its sender (``notify=False``: no IMDN from there)."""
    xmpp, sip = FakeXmpp(), FakeSip()
    router = _router(store, sip, xmpp, Clock())
    err = StanzaError("nobody@xmpp.test", "alice@sip.xmpp.test/sip", "elsewhere-1", "gone")
    assert router.on_xmpp_error(err) is None and sip.sent == []
    router.answer_now(
        SipText("sip:alice@sip.test", "sip:nobody*xmpp.test@jabber.sip.test", "hello?")
    )
    [sent] = xmpp.sent
    relayed = StanzaError("nobody@xmpp.test", sent.sender, sent.id, "service-unavailable")
    pending = router.on_xmpp_error(relayed, notify=False)
    assert pending is not None
    await pending
    [(_, to_uri, body, _)] = sip.sent
    assert to_uri == "sip:alice@sip.test" and "not delivered" in body
    assert router.on_xmpp_error(relayed, notify=False) is None  # told once


async def test_groupchat_to_a_person_gets_an_error_not_silence(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), FakeSip()
    router = _router(store, sip, xmpp, Clock())
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/x", "alice@sip.xmpp.test", "hi all", id="g", type="groupchat")
    )
    [err] = xmpp.errors
    assert (err.condition, err.type, err.id) == ("not-acceptable", "modify", "g")
    assert err.text and "chat room" in err.text
    assert sip.sent == [] and router.counters["refused"] == 1


async def test_queue_direction_recorded(store: MemoryStore) -> None:
    xmpp = FakeXmpp()
    router = _router(store, FakeSip(503), xmpp, Clock())
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/x", "alice@sip.xmpp.test", "x"))
    [queued] = await store.messages_for_recipient("sip:alice@sip.test")
    assert queued.direction is MessageDirection.XMPP_TO_SIP


@pytest.mark.parametrize(("body", "notice"), [("online", "ok"), ("dance", "Unknown command")])
async def test_registrar_commands_wait_and_answer_with_a_notice(
    store: MemoryStore, body: str, notice: str
) -> None:
    xmpp, sip = FakeXmpp(), FakeSip()
    router = _router(store, sip, xmpp, Clock())
    msg = SipText("sip:alice@sip.test", "sip:jabber_gateway@sip.test", body)
    assert router.answer_now(msg) is None
    answer = await router.answer_later(msg)
    assert answer.status == 200
    assert router.commands.seen == [msg]  # type: ignore[attr-defined]
    [(from_uri, to_uri, text, _)] = sip.sent
    assert (from_uri, to_uri) == ("sip:jabber_gateway@sip.test", "sip:alice@sip.test")
    assert text.startswith(notice)


async def test_sip_failure_answered_with_its_rfc_7247_error(store: MemoryStore) -> None:
    xmpp = FakeXmpp()
    router = _router(store, FakeSip(403), xmpp, Clock())
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/x", "alice@sip.xmpp.test", "x", id="f"))
    [err] = xmpp.errors
    assert (err.condition, err.type, err.text, err.kind) == (
        "forbidden",
        "auth",
        "SIP 403",
        "message",
    )


async def test_unmappable_xmpp_recipient_is_refused_as_an_address(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), FakeSip()
    router = _router(store, sip, xmpp, Clock())
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/x", "sip.xmpp.test", "x", id="a"))
    [err] = xmpp.errors
    assert (err.condition, err.type, err.id) == ("item-not-found", "modify", "a")
    assert sip.sent == []
