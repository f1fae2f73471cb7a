"""The message router with a fake XMPP link and a scripted SIP side, on a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from component.addresses import AddressBook
from component.messaging.router import MessageRouter
from component.store import MessageDirection, upgrade
from component.store.store import Store
from component.values import ChatMessage, SipAnswer, SipText, StanzaError

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

    def send_error(self, err: StanzaError) -> bool:
        self.errors.append(err)
        return self.connected


class FakeSip:
    """Answers each MESSAGE with the next scripted status (200 when the script runs out)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.sent: list[tuple[str, str, str, str | None]] = []

    async def send_text(
        self, *, from_uri: str, to_uri: str, body: str, from_display: str | None = None
    ) -> int:
        self.sent.append((from_uri, to_uri, body, from_display))
        return self.statuses.pop(0) if self.statuses else 200


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    upgrade(url)
    opened = await Store.open(url)
    yield opened
    await opened.close()


def _router(store: Store, sip: FakeSip, xmpp: FakeXmpp, clock: Clock) -> MessageRouter:
    return MessageRouter(BOOK, xmpp, sip, store, clock=clock, delay_time=90.0)


async def _answer(result: SipAnswer | object) -> SipAnswer:
    if isinstance(result, SipAnswer):
        return result
    answer = await result  # type: ignore[misc]
    assert isinstance(answer, SipAnswer)
    return answer


async def test_sip_to_xmpp_written_gets_202(store: Store) -> None:
    xmpp, sip, clock = FakeXmpp(), FakeSip(), Clock()
    router = _router(store, sip, xmpp, clock)
    answer = router.on_sip_message(
        SipText("sip:alice@sip.test", "sip:bob*xmpp.test@jabber.sip.test", "héllo <&>")
    )
    assert isinstance(answer, SipAnswer) and answer.status == 202
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
async def test_sip_to_xmpp_refusals(store: Store, to_uri: str, status: int) -> None:
    xmpp = FakeXmpp()
    router = _router(store, FakeSip(), xmpp, Clock())
    answer = await _answer(router.on_sip_message(SipText("sip:alice@sip.test", to_uri, "x")))
    assert answer.status == status
    assert xmpp.sent == []


async def test_link_down_stores_then_delivers_with_delay_stamp(store: Store) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    xmpp.connected = False
    router = _router(store, FakeSip(), xmpp, clock)
    answer = await _answer(
        router.on_sip_message(
            SipText("sip:alice@sip.test", "sip:bob*xmpp.test@jabber.sip.test", "later")
        )
    )
    assert answer.status == 202
    assert (await store.counts()).queued == 1
    xmpp.connected = True
    clock.now += 3
    assert await router.retry_due() == 1
    [sent] = xmpp.sent
    assert sent.body == "later" and sent.delay_stamp is not None
    assert sent.recipient == "bob@xmpp.test"


async def test_xmpp_to_sip_success(store: Store) -> None:
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
async def test_xmpp_to_sip_final_failures(store: Store, status: int, condition: str) -> None:
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


async def test_offline_user_is_queued_retried_and_expires(store: Store) -> None:
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


async def test_404_for_user_seen_before_means_offline(store: Store) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    await store.mark_user_seen("sip:alice@sip.test", clock.now)
    sip = FakeSip(404)
    router = _router(store, sip, xmpp, clock)
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/phone", "alice@sip.xmpp.test", "hello", id="q2")
    )
    assert xmpp.errors == []
    # the user comes online: delivered at once
    await router.flush_recipient("sip:alice@sip.test")
    assert [s[2] for s in sip.sent] == ["hello", "hello"]
    waiting = await store.messages_for_recipient("sip:alice@sip.test")
    assert waiting == []


async def test_xmpp_error_becomes_notice_to_sip_sender(store: Store) -> None:
    xmpp, sip = FakeXmpp(), FakeSip()
    router = _router(store, sip, xmpp, Clock())
    router.on_sip_message(
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


async def test_busy_gateway_answers_resource_constraint(store: Store) -> None:
    xmpp = FakeXmpp()
    router = _router(store, FakeSip(), xmpp, Clock())
    router.inflight = router.max_inflight
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/x", "alice@sip.xmpp.test", "x"))
    assert [e.condition for e in xmpp.errors] == ["resource-constraint"]


async def test_queue_direction_recorded(store: Store) -> None:
    xmpp = FakeXmpp()
    router = _router(store, FakeSip(503), xmpp, Clock())
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/x", "alice@sip.xmpp.test", "x"))
    [queued] = await store.messages_for_recipient("sip:alice@sip.test")
    assert queued.direction is MessageDirection.XMPP_TO_SIP
