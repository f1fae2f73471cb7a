"""Message identities in the store (DESIGN 4.3): the store methods on SQLite, PostgreSQL and in
memory, revision 0004 up and down, the sweep, and notifications that find their message after
a restart or on another instance sharing the database. Fake clock; nothing sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect
from sqlalchemy.pool import NullPool
from structlog.testing import capture_logs

from component.messaging.notifications import Notifications
from component.messaging.router import MessageRouter
from component.runtime.sweeps import sweep_message_identities
from component.store import (
    IdentityKey,
    MessageDirection,
    MessageIdentity,
    Store,
    StorePort,
    migrate,
)
from component.store.memory import MemoryDatabase, MemoryStore
from component.store.migrate import engine_url
from component.values import ChatMessage, ImdnAsk, ImdnNews, ImdnStatus, SipText, StanzaError
from tests.test_messaging import BOOK, Clock, FakeCommands, FakeXmpp
from tests.test_receipts import ALICE, ALICE_JID, BOB, BOB_URI, RecordingSip
from tests.test_store import (  # noqa: F401 (fixtures)
    database,
    pg_url,
    scratch_postgres_database,
    sqlite_template,
)

T0 = 1_700_000_000.0
KEEP = 120.0  # delay_time 90 + cache_time 30
TO_XMPP, TO_SIP = MessageDirection.SIP_TO_XMPP, MessageDirection.XMPP_TO_SIP


def _identity(recipient_id: str = "sn1", **changes: Any) -> MessageIdentity:
    base = MessageIdentity(
        TO_XMPP,
        "bob@xmpp.test",
        recipient_id,
        ALICE,
        "imdn-1",
        BOB_URI,
        1_600_000_000.25,
        True,
        False,
        T0 + KEEP,
    )
    return replace(base, **changes)


class CountingStore:
    """A store port that counts identity writes and can fail them, around a real one."""

    def __init__(self, inner: StorePort) -> None:
        self.inner = inner
        self.writes: list[tuple[int, int]] = []  # (saved, forgotten) per call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write_message_identities(
        self, saved: list[MessageIdentity], forgotten: list[IdentityKey]
    ) -> None:
        self.writes.append((len(saved), len(forgotten)))
        await self.inner.write_message_identities(saved, forgotten)


@pytest.fixture
async def stores(database: str | MemoryDatabase) -> AsyncIterator[list[StorePort]]:  # noqa: F811
    """Two stores on one database: two gateway processes (a restart, or a second instance)."""
    opened: list[Store | MemoryStore] = []
    for name in ("gw-a", "gw-b"):
        if isinstance(database, MemoryDatabase):
            opened.append(MemoryStore(database, instance=name))
        else:
            opened.append(await Store.open(database, instance=name))
    yield list(opened)
    for store in opened:
        await store.close()


# --- the store methods, on each backend ---------------------------------------------------------


async def test_identities_are_written_found_replaced_and_forgotten(
    stores: list[StorePort],
) -> None:
    store, other = stores
    sip_to_xmpp = _identity()
    xmpp_to_sip = _identity(
        "o-1", direction=TO_SIP, recipient=ALICE, sender=BOB, sender_id="s-1", display=True
    )
    await store.write_message_identities([sip_to_xmpp, xmpp_to_sip], [])
    # the other store (process) reads what this one wrote
    assert await other.message_identity(TO_XMPP, "sn1", T0, "bob@xmpp.test") == sip_to_xmpp
    assert await other.message_identity(TO_XMPP, "sn1", T0) == sip_to_xmpp  # any recipient
    assert await other.message_identity(TO_SIP, "o-1", T0, ALICE) == xmpp_to_sip
    # the key is direction, recipient and id: each part must match
    assert await other.message_identity(TO_SIP, "sn1", T0) is None
    assert await other.message_identity(TO_XMPP, "sn1", T0, "mallory@xmpp.test") is None
    assert await other.message_identity(TO_XMPP, "sn2", T0) is None
    # expired by now: not found
    assert await other.message_identity(TO_XMPP, "sn1", T0 + KEEP) is None
    # a second write of a key replaces it; the last of equal keys in one batch wins
    later = replace(sip_to_xmpp, display=True, expires_at=T0 + 2 * KEEP)
    await store.write_message_identities([replace(later, sender_id="x"), later], [])
    assert await other.message_identity(TO_XMPP, "sn1", T0 + KEEP) == later
    await other.write_message_identities([], [sip_to_xmpp.key])
    assert await store.message_identity(TO_XMPP, "sn1", T0) is None
    assert await store.message_identity(TO_SIP, "o-1", T0) == xmpp_to_sip


async def test_a_large_batch_and_the_expiry(stores: list[StorePort]) -> None:
    store, other = stores
    # more rows than one statement takes: the batch is cut into several
    batch = [_identity(f"sn{i}", expires_at=T0 + i) for i in range(1, 1201)]
    await store.write_message_identities(batch, [])
    assert await store.message_identity(TO_XMPP, "sn1200", T0) == batch[-1]
    await store.write_message_identities([], [b.key for b in batch[600:]])
    assert await store.message_identity(TO_XMPP, "sn601", T0) is None
    assert await other.expire_message_identities(T0 + 100) == 100
    assert await other.expire_message_identities(T0 + 100) == 0
    assert await other.message_identity(TO_XMPP, "sn100", T0) is None
    assert await other.message_identity(TO_XMPP, "sn101", T0) == batch[100]
    assert await other.expire_message_identities(T0 + 10_000) == 500


# --- revision 0004 ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ids.db'}"
        return
    with scratch_postgres_database("sipxmpp_ids") as url:
        yield url


def _tables(url: str) -> set[str]:
    engine = create_engine(engine_url(url), poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


async def test_identity_revision_up_and_down(empty_url: str) -> None:
    migrate.upgrade(empty_url, "0003")
    assert "message_identity" not in _tables(empty_url)
    migrate.upgrade(empty_url)
    assert migrate.current_revision(empty_url) == "0004" == migrate.head_revision()
    store = await Store.open(empty_url)
    try:
        await store.write_message_identities([_identity()], [])
        assert await store.message_identity(TO_XMPP, "sn1", T0) == _identity()
    finally:
        await store.close()
    migrate.downgrade(empty_url, "0003")
    assert "message_identity" not in _tables(empty_url)
    assert {"queued_message", "gateway_instance"} <= _tables(empty_url)
    migrate.upgrade(empty_url)  # and up again
    assert "message_identity" in _tables(empty_url)


# --- notifications across a restart or instances --------------------------------------------------


@dataclass
class Gateway:
    """One gateway process's messaging: its router, its notifications, its store."""

    router: MessageRouter
    notes: Notifications
    xmpp: FakeXmpp
    sip: RecordingSip
    store: CountingStore

    def answer(self, msg: SipText) -> int:
        answer = self.router.answer_now(msg)
        assert answer is not None
        return answer.status


def _gateway(store: StorePort, clock: Clock) -> Gateway:
    xmpp, sip, counting = FakeXmpp(), RecordingSip(), CountingStore(store)
    notes = Notifications(xmpp, sip, clock=clock, keep=KEEP, store=counting)
    router = MessageRouter(
        BOOK, xmpp, sip, store, FakeCommands(), clock=clock, delay_time=90.0, notifications=notes
    )
    return Gateway(router, notes, xmpp, sip, counting)


def _notifications(gw: Gateway) -> list[tuple[str, str, str | None, ImdnStatus | None]]:
    return [
        (s.from_uri, s.to_uri, s.message_id, s.status)
        for s in gw.sip.sent
        if s.kind == "notification"
    ]


async def test_sip_message_receipt_and_marker_after_a_restart_or_on_another_instance(
    stores: list[StorePort],
) -> None:
    clock = Clock()
    first, second = _gateway(stores[0], clock), _gateway(stores[1], clock)
    ask = ImdnAsk("imdn-1", 1_600_000_000.0, delivery=True, display=True)
    assert first.answer(SipText(ALICE, BOB_URI, "read me", imdn=ask)) == 202
    [stanza] = first.xmpp.sent
    assert stanza.id is not None and stanza.receipt_request and stanza.markable
    await first.notes.drain(5.0)
    assert first.store.writes == [(1, 0)]
    clock.now += 60
    # the markers reach the other process, whose memory never saw the message
    for marker in ({"receipt_for": stanza.id}, {"displayed_for": stanza.id}):
        await second.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, **marker))  # type: ignore[arg-type]
    # a marker from someone else for the same id is not news
    await second.router.on_xmpp_message(
        ChatMessage("mallory@xmpp.test/x", ALICE_JID, None, receipt_for=stanza.id)
    )
    assert _notifications(second) == [
        (BOB_URI, ALICE, "imdn-1", ImdnStatus.DELIVERED),
        (BOB_URI, ALICE, "imdn-1", ImdnStatus.DISPLAYED),
    ]
    assert [s.sent_at for s in second.sip.sent] == [1_600_000_000.0] * 2
    assert second.notes.counters["identities_found"] == 1  # then memory had it
    # displayed is the last notification: the identity is forgotten in the store too
    await second.notes.drain(5.0)
    assert await stores[0].message_identity(TO_XMPP, stanza.id, clock.now) is None


async def test_xmpp_message_receipt_and_failure_after_a_restart(stores: list[StorePort]) -> None:
    clock = Clock()
    first, second = _gateway(stores[0], clock), _gateway(stores[1], clock)
    for n in (1, 2):
        await first.router.on_xmpp_message(
            ChatMessage(BOB, ALICE_JID, "x", id=f"s-{n}", origin_id=f"o-{n}", receipt_request=True)
        )
    assert [s.imdn.message_id for s in first.sip.sent if s.imdn] == ["o-1", "o-2"]
    await first.notes.drain(5.0)
    delivered = SipText(ALICE, BOB_URI, "", notification=ImdnNews("o-1", ImdnStatus.DELIVERED, 0))
    failed = SipText(ALICE, BOB_URI, "", notification=ImdnNews("o-2", ImdnStatus.FAILED, 0))
    # the answer does not wait for the store: the lookup runs on its own
    assert second.answer(delivered) == 200 and second.answer(failed) == 200
    # an IMDN from another SIP user about the same id finds nothing
    assert second.answer(replace(delivered, from_uri="sip:carol@sip.test")) == 200
    await second.notes.drain(5.0)
    [receipt] = second.xmpp.sent
    assert (receipt.sender, receipt.recipient, receipt.receipt_for) == (ALICE_JID, BOB, "s-1")
    [error] = second.xmpp.errors
    assert (error.id, error.recipient, error.condition) == ("s-2", BOB, "recipient-unavailable")


async def test_xmpp_error_after_a_restart_is_a_negative_imdn(stores: list[StorePort]) -> None:
    clock = Clock()
    first, second = _gateway(stores[0], clock), _gateway(stores[1], clock)
    first.answer(SipText(ALICE, BOB_URI, "to nobody", imdn=ImdnAsk("imdn-4", 5.0)))
    stanza_id = first.xmpp.sent[0].id
    await first.notes.drain(5.0)
    # the error comes from the recipient's server, not the recipient
    second.router.on_xmpp_error(StanzaError("xmpp.test", f"{ALICE_JID}/sip", stanza_id, "gone"))
    await second.notes.drain(5.0)
    assert _notifications(second) == [(BOB_URI, ALICE, "imdn-4", ImdnStatus.FAILED)]
    await second.notes.drain(5.0)
    assert await stores[0].message_identity(TO_XMPP, stanza_id or "", clock.now) is None


async def test_expired_identities_map_nothing_and_are_swept(stores: list[StorePort]) -> None:
    clock = Clock()
    first, second = _gateway(stores[0], clock), _gateway(stores[1], clock)
    first.answer(SipText(ALICE, BOB_URI, "old", imdn=ImdnAsk("imdn-5", 5.0)))
    stanza_id = first.xmpp.sent[0].id
    await first.notes.drain(5.0)
    clock.now += KEEP
    await second.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, receipt_for=stanza_id))
    assert second.sip.sent == []
    assert await second.notes.expire_stored() == 1
    assert await second.notes.expire_stored() == 0


async def test_the_sweep_deletes_what_expired(memory_store: MemoryStore) -> None:
    clock = Clock()
    gw = _gateway(memory_store, clock)
    gw.answer(SipText(ALICE, BOB_URI, "old", imdn=ImdnAsk("imdn-6", 5.0)))
    await gw.notes.drain(5.0)
    clock.now += KEEP
    swept = asyncio.Event()
    expire = memory_store.expire_message_identities

    async def counted(now: float) -> int:
        removed = await expire(now)
        swept.set()
        return removed

    memory_store.expire_message_identities = counted  # type: ignore[method-assign]
    sweeper = asyncio.create_task(sweep_message_identities(gw.notes, interval=3600))
    try:
        await asyncio.wait_for(swept.wait(), 5)
    finally:
        sweeper.cancel()
    assert memory_store.database.identities.select() == []


async def test_only_messages_asking_are_written_in_batches(memory_store: MemoryStore) -> None:
    gw = _gateway(memory_store, Clock())
    for n in range(200):
        gw.answer(SipText(ALICE, BOB_URI, f"plain {n}"))
        await gw.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, f"plain {n}", id=f"p{n}"))
    await gw.notes.drain(5.0)
    assert gw.store.writes == []  # no notification asked: no database work at all
    for n in range(50):  # asked within one turn of the event loop: one batch
        gw.answer(SipText(ALICE, BOB_URI, f"ask {n}", imdn=ImdnAsk(f"imdn-{n}", 5.0)))
    await gw.notes.drain(5.0)
    assert gw.store.writes == [(50, 0)]
    assert len(memory_store.database.identities.select()) == 50


async def test_database_outage_keeps_memory_and_the_message(memory_store: MemoryStore) -> None:
    gw = _gateway(memory_store, Clock())
    memory_store.unavailable = True
    with capture_logs() as logs:
        for n in (1, 2):
            ask = ImdnAsk(f"imdn-{n}", 5.0)
            assert gw.answer(SipText(ALICE, BOB_URI, f"m{n}", imdn=ask)) == 202
            await gw.notes.drain(5.0)
    # logged once for the outage, counted for each identity
    assert [e["event"] for e in logs].count("message_identities_not_stored") == 1
    assert gw.notes.counters["identities_unstored"] == 2
    # this instance still maps the receipt from memory
    await gw.router.on_xmpp_message(
        ChatMessage(BOB, ALICE_JID, None, receipt_for=gw.xmpp.sent[0].id)
    )
    assert _notifications(gw) == [(BOB_URI, ALICE, "imdn-1", ImdnStatus.DELIVERED)]
    # a miss while the database is down is an unmatched marker, not an exception
    await gw.router.on_xmpp_message(ChatMessage(BOB, ALICE_JID, None, receipt_for="unknown"))
    memory_store.unavailable = False
    with capture_logs() as logs:
        gw.answer(SipText(ALICE, BOB_URI, "m3", imdn=ImdnAsk("imdn-3", 5.0)))
        await gw.notes.drain(5.0)
    assert "message_identities_stored_again" in [e["event"] for e in logs]
    assert len(memory_store.database.identities.select()) == 1
