"""What needs the store while it is down (DESIGN 8): no 2xx for what was not stored, and an
error stanza rather than silence. The in-memory store's ``unavailable`` plays the outage."""

from __future__ import annotations

import pytest

from component.errors import Refusal
from component.runtime.presence_driver import CoreSerial, PresenceDriver
from component.sip.gate import RETRY_LATER, SipGate
from component.store import SipWatcherSubscription, StoreUnavailable
from component.store.memory import MemoryStore
from component.values import ChatMessage, Presence
from tests import test_sipgate as sipgate
from tests.test_presence import (
    ALICE_AOR,
    ALICE_JID,
    BOB,
    T0,
    FakeIncoming,
    build,
    pidf_body,
    publish,
    register,
    subscribe_request,
)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


async def test_publish_is_not_answered_2xx_when_it_cannot_be_stored(store: MemoryStore) -> None:
    w = build(store)
    store.unavailable = True
    incoming = FakeIncoming(publish(pidf_body("open"), []))
    with pytest.raises(StoreUnavailable):
        await w.side.on_request(incoming, T0)
    assert incoming.responses == []  # the gate answers 503 + Retry-After
    store.unavailable = False
    again = FakeIncoming(publish(pidf_body("open"), []))
    await w.side.on_request(again, T0 + 1)
    assert [r.status for r in again.responses] == [200]
    assert len(await store.publications_of(ALICE_AOR)) == 1


async def test_register_copy_is_not_answered_2xx_when_it_cannot_be_stored(
    store: MemoryStore,
) -> None:
    w = build(store)
    store.unavailable = True
    incoming = FakeIncoming(register([("Contact", "<sip:alice@127.0.0.1:5062>")]))
    with pytest.raises(StoreUnavailable):
        await w.side.on_request(incoming, T0)
    assert incoming.responses == []


class RefusingXmpp:
    def __init__(self) -> None:
        self.refused: list[tuple[ChatMessage | Presence, Refusal]] = []

    @property
    def connected(self) -> bool:
        return True

    def send_message(self, msg: ChatMessage) -> bool:
        raise AssertionError(f"the driver sent a chat message to {msg.recipient}")

    def send_presence(self, presence: Presence) -> bool:
        raise AssertionError(f"the driver sent a presence to {presence.recipient}")

    def refuse(self, stanza: ChatMessage | Presence, refusal: Refusal) -> bool:
        self.refused.append((stanza, refusal))
        return True


class StoreDownCore:
    """A presence core whose every stanza needs the store, which is down."""

    def __init__(self) -> None:
        self.seen: list[Presence] = []

    async def on_presence(self, presence: Presence, now: float) -> None:
        self.seen.append(presence)
        raise StoreUnavailable("database down")


@pytest.mark.parametrize(
    ("ptype", "refused"),
    [("subscribe", True), ("subscribed", True), ("unsubscribe", True), (None, False)],
)
async def test_presence_stanza_needing_the_store_gets_resource_constraint(
    ptype: str | None, refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    core, xmpp = StoreDownCore(), RefusingXmpp()
    driver = PresenceDriver(
        CoreSerial(clock=lambda: T0),
        core=core,  # type: ignore[arg-type]
        sip=None,  # type: ignore[arg-type]
        xmpp=xmpp,
    )
    stanza = Presence(sender=f"{BOB}/phone", recipient=ALICE_JID, type=ptype)
    driver.on_presence(stanza)
    await driver.settle()
    assert core.seen == [stanza]
    if not refused:
        assert xmpp.refused == []  # plain availability is sent again on the next change
        return
    [(answered, refusal)] = xmpp.refused
    assert answered is stanza
    assert (refusal.xmpp_condition, refusal.xmpp_type) == ("resource-constraint", "wait")


async def test_gate_counts_store_refusals_as_it_answers_them() -> None:
    core = sipgate.Core()
    core.now, core.later = None, StoreUnavailable("database down")
    gate = SipGate(core, book=sipgate.BOOK)
    answered = [sipgate.FakeIncoming(sipgate._request("MESSAGE")) for _ in range(3)]
    for incoming in answered:
        gate.handle(incoming)  # type: ignore[arg-type]
    await gate.drain(5)
    for incoming in answered:
        assert incoming.responses == [(503, {"Retry-After": str(RETRY_LATER)})]
    assert gate.refusals["store_unavailable"] == 3


class WatcherWritesFail(MemoryStore):
    """Reads work, storing a SIP watcher's dialog does not (a lock held elsewhere)."""

    fail = True

    async def save_sip_watcher_subscription(self, sub: SipWatcherSubscription) -> None:
        if self.fail:
            raise StoreUnavailable("database is locked")
        await super().save_sip_watcher_subscription(sub)


async def test_subscribe_is_answered_202_only_once_its_dialog_is_stored() -> None:
    store = WatcherWritesFail()
    w = build(store)
    incoming = FakeIncoming(subscribe_request())
    with pytest.raises(StoreUnavailable):
        await w.side.on_request(incoming, T0)
    assert incoming.responses == []  # the gate answers 503 + Retry-After
    assert w.side.watches.dialogs == {}  # nothing half-made is kept
    store.fail = False
    again = FakeIncoming(subscribe_request(call_id="c2"))
    await w.side.on_request(again, T0 + 1)
    assert [r.status for r in again.responses] == [202]
    assert len(await store.sip_watcher_subscriptions()) == 1
