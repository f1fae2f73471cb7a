"""Messages a lost XMPP link never confirmed (DESIGN 8): the router queues them for a re-send
with the same id and stamp, and a SIP sender is told whatever cannot be queued."""

from __future__ import annotations

from dataclasses import replace

from component.store import MessageDirection
from component.store.memory import MemoryStore
from component.values import ChatMessage, SipText, StanzaError
from tests.test_messaging import Clock, FakeSip, FakeXmpp, _router

BOB = "sip:bob*xmpp.test@jabber.sip.test"


def _unconfirmed(sent: ChatMessage) -> ChatMessage:
    """What the link hands over: the message as written, stamped with when it was."""
    return replace(sent, delay_stamp="2023-11-14T22:13:20Z", delay_from="sip.xmpp.test")


async def test_unconfirmed_messages_are_resent_with_their_id_and_stamp(
    memory_store: MemoryStore,
) -> None:
    xmpp, sip, clock = FakeXmpp(), FakeSip(), Clock()
    router = _router(memory_store, sip, xmpp, clock)
    for i in range(3):
        answer = router.answer_now(SipText("sip:alice@sip.test", BOB, f"m{i}"))
        assert answer is not None and answer.status == 202
    confirmed, *lost = xmpp.sent
    xmpp.sent.clear()
    xmpp.connected = False
    await router.requeue_unconfirmed([_unconfirmed(m) for m in lost])
    queued = await memory_store.messages_for_recipient("bob@xmpp.test")
    assert [(q.direction, q.sender, q.body) for q in queued] == [
        (MessageDirection.SIP_TO_XMPP, "sip:alice@sip.test", "m1"),
        (MessageDirection.SIP_TO_XMPP, "sip:alice@sip.test", "m2"),
    ]
    assert router.counters["requeued"] == 2
    xmpp.connected = True
    clock.now += 2
    assert await router.retry_due() == 2
    assert [(m.id, m.body, m.delay_stamp) for m in xmpp.sent] == [
        (lost[0].id, "m1", "2023-11-14T22:13:20Z"),
        (lost[1].id, "m2", "2023-11-14T22:13:20Z"),
    ]
    assert confirmed.id not in {m.id for m in xmpp.sent}
    # An error for the re-sent message still finds its SIP sender.
    resent = xmpp.sent[0]
    pending = router.on_xmpp_error(
        StanzaError("bob@xmpp.test", resent.sender, resent.id, "service-unavailable")
    )
    assert pending is not None
    await pending
    [(_, to_uri, body, _)] = sip.sent
    assert to_uri == "sip:alice@sip.test" and "not delivered" in body


async def test_unconfirmed_message_that_cannot_be_queued_is_told_to_its_sender(
    memory_store: MemoryStore,
) -> None:
    xmpp, sip = FakeXmpp(), FakeSip()
    router = _router(memory_store, sip, xmpp, Clock())
    router.answer_now(SipText("sip:alice@sip.test", BOB, "hello"))
    [sent] = xmpp.sent
    memory_store.unavailable = True
    await router.requeue_unconfirmed([_unconfirmed(sent)])
    [(from_uri, to_uri, body, _)] = sip.sent
    assert (from_uri, to_uri) == ("sip:jabber_gateway@sip.test", "sip:alice@sip.test")
    assert "bob@xmpp.test" in body and "may not have been delivered" in body
    assert router.counters["failed"] == 1 and router.counters["requeued"] == 0


async def test_unconfirmed_typing_is_dropped_and_counted(memory_store: MemoryStore) -> None:
    router = _router(memory_store, FakeSip(), FakeXmpp(), Clock())
    typing = ChatMessage("alice@sip.xmpp.test/sip", "bob@xmpp.test", None, chat_state="composing")
    await router.requeue_unconfirmed([typing])
    assert await memory_store.messages_for_recipient("bob@xmpp.test") == []
    assert router.counters["unconfirmed_dropped"] == 1
