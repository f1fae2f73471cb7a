"""The store on SQLite, on PostgreSQL (127.0.0.1:5432, which these tests require) and in memory.

The behavioural tests go through ``StorePort`` and run on all three backends, so the in-memory
store core tests use is held to the real store's semantics; tests of SQL specifics (error
translation, connection settings, column types) run on the two SQL backends.

Each test session makes its own PostgreSQL database and drops it at the end; other users of
the server are never touched. Times are fixed POSIX seconds: nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Column, MetaData, Table, create_engine, exc, insert, select, text
from sqlalchemy.pool import NullPool

from component.store import (
    ApprovalDirection,
    ApprovalState,
    MembershipState,
    MessageDirection,
    MessageState,
    NewMessage,
    PresenceRecord,
    Publication,
    RecordNotFound,
    RoomMembership,
    RosterApproval,
    SipWatcherSubscription,
    Store,
    StoreError,
    StorePort,
    StoreUnavailable,
    SubscriptionState,
    TransportStatus,
    XmppWatcherSubscription,
    migrate,
)
from component.store.memory import MemoryDatabase, MemoryStore
from component.store.migrate import engine_url
from component.store.models import JsonText, UTCDateTime, metadata
from component.store.store import create_store_engine

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
T0 = 1_700_000_000.0
ALICE = "sip:alice@sip.test"
BOB = "bob@xmpp.test"


@contextmanager
def scratch_postgres_database(prefix: str = "sipxmpp_test") -> Iterator[str]:
    """A new, empty PostgreSQL database of our own, dropped afterwards; fails if unreachable."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin_url = engine_url(f"{PG_SERVER}/test")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except exc.OperationalError as error:
        admin.dispose()
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is required (CI has it): {error}")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the session; tests empty its tables first."""
    with scratch_postgres_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test (cheaper than migrating each time)."""
    path = tmp_path_factory.mktemp("template") / "store.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


def _empty_tables(url: str) -> None:
    engine = create_engine(engine_url(url), poolclass=NullPool)
    names = ", ".join(t.name for t in metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY"))
    engine.dispose()


def _empty_database(backend: str, request: pytest.FixtureRequest) -> str:
    """The URL of a migrated, empty database on a SQL backend."""
    if backend == "sqlite":
        path = request.getfixturevalue("tmp_path") / "store.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("pg_url")
    _empty_tables(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of a migrated, empty database on each SQL backend (for SQL specifics)."""
    return _empty_database(request.param, request)


@pytest.fixture(params=["sqlite", "postgresql", "memory"])
def database(request: pytest.FixtureRequest) -> str | MemoryDatabase:
    """An empty database on each backend: a URL, or the in-memory store's tables."""
    if request.param == "memory":
        return MemoryDatabase()
    return _empty_database(request.param, request)


AnyStore = Store | MemoryStore


@pytest.fixture
async def open_store(
    database: str | MemoryDatabase,
) -> AsyncIterator[Callable[[], Awaitable[AnyStore]]]:
    """Open a store on ``database``; a second one is a second process on the same database."""
    opened: list[AnyStore] = []

    async def open_one() -> AnyStore:
        store: AnyStore
        if isinstance(database, MemoryDatabase):
            store = MemoryStore(database)
        else:
            store = await Store.open(database)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: Callable[[], Awaitable[AnyStore]]) -> StorePort:
    """The store port on each backend: the behavioural tests run on all three."""
    return await open_store()


@pytest.fixture
async def sql_store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


async def _enqueue(
    store: StorePort,
    recipient: str = ALICE,
    *,
    now: float = T0,
    delay: float = 90.0,
    next_attempt_at: float | None = None,
) -> int:
    message = await store.enqueue_message(
        NewMessage(
            MessageDirection.XMPP_TO_SIP,
            BOB,
            recipient,
            "hello",
            "text/plain; charset=UTF-8",
            created_at=now,
            deliver_by=now + delay,
            next_attempt_at=now if next_attempt_at is None else next_attempt_at,
        )
    )
    return message.id


# --- the message queue ----------------------------------------------------------------------


async def test_enqueue_is_durable_and_round_trips(
    store: StorePort, open_store: Callable[[], Awaitable[AnyStore]]
) -> None:
    extra = {"xmpp_id": "m1", "receipt": True, "thread": "Ünïcode ✓", "n": [1, 2]}
    message = await store.enqueue_message(
        NewMessage(
            MessageDirection.SIP_TO_XMPP,
            ALICE,
            BOB,
            "hi ✓",
            "text/plain",
            created_at=T0,
            deliver_by=T0 + 90,
            next_attempt_at=T0,
            extra=extra,
        )
    )
    assert (message.sender, message.recipient, message.body) == (ALICE, BOB, "hi ✓")
    assert message.direction is MessageDirection.SIP_TO_XMPP
    assert (message.created_at, message.deliver_by, message.next_attempt_at) == (T0, T0 + 90, T0)
    assert (message.state, message.attempts, message.owner) == (MessageState.QUEUED, 0, None)
    # A second store on the same database sees it: it was committed before enqueue returned.
    other = await open_store()
    assert await other.messages_for_recipient(BOB) == [message]


CLAIM_CASES = [
    # (next_attempt_at offset, deliver_by delay, claimable at T0 + 10)
    pytest.param(0.0, 90.0, True, id="due"),
    pytest.param(10.0, 90.0, True, id="due-exactly-now"),
    pytest.param(30.0, 90.0, False, id="not-yet-due"),
    pytest.param(0.0, 10.0, False, id="past-deliver-by"),
]


@pytest.mark.parametrize(("offset", "delay", "claimable"), CLAIM_CASES)
async def test_claim_due_messages_picks_due_rows(
    store: StorePort, offset: float, delay: float, claimable: bool
) -> None:
    mid = await _enqueue(store, delay=delay, next_attempt_at=T0 + offset)
    claimed = await store.claim_due_messages(T0 + 10, 10, "gw-1", lease=60)
    assert [m.id for m in claimed] == ([mid] if claimable else [])
    if claimable:
        (message,) = claimed
        assert (message.state, message.owner, message.attempts) == (
            MessageState.INFLIGHT,
            "gw-1",
            1,
        )
        assert message.next_attempt_at == T0 + 70  # the lease end


async def test_claim_respects_limit_order_and_lease(store: StorePort) -> None:
    ids = [await _enqueue(store, next_attempt_at=T0 + i) for i in (3, 1, 2)]
    first = await store.claim_due_messages(T0 + 5, 2, "gw-1", lease=30)
    assert sorted(m.id for m in first) == sorted([ids[1], ids[2]])  # the two due earliest
    second = await store.claim_due_messages(T0 + 10, 10, "gw-2", lease=30)
    assert [m.id for m in second] == [ids[0]]
    # Within the lease nobody else gets them; after it, another instance takes over.
    assert await store.claim_due_messages(T0 + 20, 10, "gw-2", lease=30) == []
    taken = await store.claim_due_messages(T0 + 36, 10, "gw-2", lease=30)
    assert sorted(m.id for m in taken) == sorted(m.id for m in first)
    assert {(m.owner, m.attempts) for m in taken} == {("gw-2", 2)}


async def test_concurrent_instances_never_claim_the_same_message(
    open_store: Callable[[], Awaitable[AnyStore]],
) -> None:
    stores = [await open_store() for _ in range(3)]
    ids = {await _enqueue(stores[0]) for _ in range(60)}
    batches = await asyncio.gather(
        *(s.claim_due_messages(T0, 7, f"gw-{n}") for n, s in enumerate(stores) for _ in range(4))
    )
    claimed = [m.id for batch in batches for m in batch]
    assert len(claimed) == len(set(claimed))  # no message twice
    assert set(claimed) <= ids
    rest = await stores[0].claim_due_messages(T0, 100, "gw-0")
    assert set(claimed) | {m.id for m in rest} == ids


async def test_finishing_a_message(store: StorePort) -> None:
    delivered, failed, retried = [await _enqueue(store) for _ in range(3)]
    await store.claim_due_messages(T0, 10, "gw-1")
    await store.mark_delivered(delivered, T0 + 1)
    await store.mark_failed(failed, "404 Not Found", T0 + 1)
    await store.reschedule(retried, T0 + 30, "480 Temporarily Unavailable")
    (waiting,) = await store.messages_for_recipient(ALICE)
    assert (waiting.id, waiting.state, waiting.owner) == (retried, MessageState.QUEUED, None)
    assert (waiting.next_attempt_at, waiting.last_error) == (T0 + 30, "480 Temporarily Unavailable")
    assert await store.claim_due_messages(T0 + 29, 10, "gw-1") == []
    assert [m.id for m in await store.claim_due_messages(T0 + 30, 10, "gw-1")] == [retried]
    counts = await store.counts()
    assert (counts.delivered, counts.failed, counts.inflight, counts.queued) == (1, 1, 1, 0)


@pytest.mark.parametrize("method", ["mark_delivered", "mark_failed", "reschedule"])
async def test_finishing_an_unknown_message_raises(store: StorePort, method: str) -> None:
    calls = {
        "mark_delivered": lambda: store.mark_delivered(4242, T0),
        "mark_failed": lambda: store.mark_failed(4242, "x", T0),
        "reschedule": lambda: store.reschedule(4242, T0),
    }
    with pytest.raises(RecordNotFound):
        await calls[method]()


async def test_claim_messages_for_recipient_when_user_comes_online(store: StorePort) -> None:
    later = await _enqueue(store, next_attempt_at=T0 + 60)
    now_due = await _enqueue(store)
    other = await _enqueue(store, recipient="sip:carol@sip.test")
    done = await _enqueue(store)
    await store.mark_delivered(done, T0)
    expired = await _enqueue(store, delay=5)
    claimed = await store.claim_messages_for_recipient(ALICE, T0 + 10, "gw-1")
    assert [m.id for m in claimed] == [later, now_due]
    assert {m.state for m in claimed} == {MessageState.INFLIGHT}
    assert other not in [m.id for m in claimed] and expired not in [m.id for m in claimed]
    assert await store.claim_messages_for_recipient(ALICE, T0 + 10, "gw-2") == []


EXPIRY_CASES = [
    # (state to put the message in, deliver_by delay, expired at T0 + 100)
    pytest.param("queued", 90.0, True, id="queued-past-deadline"),
    pytest.param("queued", 200.0, False, id="queued-before-deadline"),
    pytest.param("inflight-in-lease", 90.0, False, id="inflight-left-to-its-deliverer"),
    pytest.param("inflight-lease-over", 90.0, True, id="inflight-of-a-dead-instance"),
    pytest.param("delivered", 90.0, False, id="delivered"),
]


@pytest.mark.parametrize(("state", "delay", "expired"), EXPIRY_CASES)
async def test_expire_messages(store: StorePort, state: str, delay: float, expired: bool) -> None:
    mid = await _enqueue(store, delay=delay)
    if state == "inflight-in-lease":
        await store.claim_due_messages(T0 + 80, 1, "gw-1", lease=60)
    elif state == "inflight-lease-over":
        await store.claim_due_messages(T0 + 10, 1, "gw-1", lease=60)
    elif state == "delivered":
        await store.mark_delivered(mid, T0)
    result = await store.expire_messages(T0 + 100)
    assert [m.id for m in result] == ([mid] if expired else [])
    if expired:
        assert (result[0].state, result[0].last_error) == (MessageState.FAILED, "expired")
        assert await store.expire_messages(T0 + 100) == []  # told once, not on every sweep


async def test_release_claims_and_purge(store: StorePort) -> None:
    mine, theirs = await _enqueue(store), await _enqueue(store, recipient="sip:c@sip.test")
    await store.claim_messages_for_recipient(ALICE, T0, "gw-1")
    await store.claim_messages_for_recipient("sip:c@sip.test", T0, "gw-2")
    assert await store.release_claims("gw-1", T0 + 1) == 1
    (message,) = await store.messages_for_recipient(ALICE)
    assert (message.id, message.state, message.next_attempt_at) == (
        mine,
        MessageState.QUEUED,
        T0 + 1,
    )
    await store.mark_delivered(mine, T0 + 2)
    await store.mark_failed(theirs, "gone", T0 + 5)
    assert await store.purge_finished(T0 + 3) == 1
    assert await store.purge_finished(T0 + 6) == 1
    assert (await store.counts()).delivered == 0


# --- users, subscriptions, presence, rooms, transports -----------------------------------


async def test_users_seen_online(store: StorePort) -> None:
    assert not await store.user_seen_before(ALICE)
    assert not await store.set_user_offline(ALICE)
    seen = await store.mark_user_seen(ALICE, T0, contact="sip:alice@127.0.0.1:5062", expires=3600)
    assert (seen.online, seen.contact, seen.expires_at) == (
        True,
        "sip:alice@127.0.0.1:5062",
        T0 + 3600,
    )
    # A sighting without contact (a PUBLISH) keeps what the REGISTER told us.
    again = await store.mark_user_seen(ALICE, T0 + 5)
    assert (again.last_seen, again.contact, again.expires_at) == (T0 + 5, seen.contact, T0 + 3600)
    await store.mark_user_seen("sip:bob@sip.test", T0, expires=60)
    assert [u.aor for u in await store.online_users()] == [ALICE, "sip:bob@sip.test"]
    assert [u.aor for u in await store.expire_registrations(T0 + 60)] == ["sip:bob@sip.test"]
    assert await store.set_user_offline(ALICE)
    assert await store.online_users() == []
    assert await store.user_seen_before(ALICE)  # offline, but seen: a 404 means offline
    user = await store.seen_user(ALICE)
    assert user is not None and (user.online, user.expires_at) == (False, None)
    counts = await store.counts()
    assert (counts.users_seen, counts.users_online) == (2, 0)


async def test_sip_watcher_subscriptions(store: StorePort) -> None:
    dialog = {"call_id": "c1@h", "local_tag": "a", "remote_tag": "b", "cseq": 3, "route": ["x"]}
    sub = SipWatcherSubscription("d1", ALICE, BOB, SubscriptionState.PENDING, dialog, T0 + 600)
    other = SipWatcherSubscription(
        "d2", ALICE, "eve@xmpp.test", SubscriptionState.ACTIVE, {}, T0 + 60
    )
    await store.save_sip_watcher_subscription(sub)
    await store.save_sip_watcher_subscription(other)
    assert await store.sip_watcher_subscription("d1") == sub
    active = replace(sub, state=SubscriptionState.ACTIVE, expires_at=T0 + 1200)
    await store.save_sip_watcher_subscription(active)  # refresh replaces
    assert await store.sip_watcher_subscriptions(BOB) == [active]
    assert await store.sip_watcher_subscriptions() == [active, other]
    assert await store.sip_watcher_subscriptions(expired_at=T0 + 60) == [other]
    assert (await store.counts()).sip_watchers == 2
    # A restart reads them a page at a time, by dialog id.
    assert await store.sip_watcher_page(None, 1) == [active]
    assert await store.sip_watcher_page("d1", 5) == [other]
    assert await store.sip_watcher_page("d2", 5) == []
    assert await store.delete_sip_watcher_subscription("d2")
    assert not await store.delete_sip_watcher_subscription("d2")
    assert await store.sip_watcher_subscription("d2") is None


async def test_xmpp_watcher_subscriptions(store: StorePort) -> None:
    fresh = XmppWatcherSubscription(BOB, ALICE, SubscriptionState.PENDING)
    await store.save_xmpp_watcher_subscription(fresh)
    assert await store.xmpp_watcher_subscription(BOB, ALICE) == fresh
    answered = replace(
        fresh, state=SubscriptionState.ACTIVE, dialog={"call_id": "z"}, expires_at=T0
    )
    await store.save_xmpp_watcher_subscription(answered)
    carol = XmppWatcherSubscription(
        "carol@xmpp.test", ALICE, SubscriptionState.ACTIVE, {}, T0 + 900
    )
    await store.save_xmpp_watcher_subscription(carol)
    assert await store.xmpp_watcher_subscriptions(ALICE) == [answered, carol]
    assert await store.xmpp_watcher_subscriptions("sip:nobody@sip.test") == []
    assert await store.xmpp_watcher_subscriptions(expiring_before=T0 + 100) == [answered]
    assert await store.delete_xmpp_watcher_subscription(BOB, ALICE)
    assert await store.xmpp_watcher_subscriptions() == [carol]
    assert (await store.counts()).xmpp_watchers == 1


async def test_publications(store: StorePort) -> None:
    pidf = "<presence xmlns='urn:ietf:params:xml:ns:pidf' entity='sip:alice@sip.test'/>"
    pub = Publication("etag-1", ALICE, pidf, "application/pidf+xml", T0 + 3600)
    short = Publication("etag-2", ALICE, pidf, "application/pidf+xml", T0 + 10)
    await store.save_publication(pub)
    await store.save_publication(short)
    assert await store.publication("etag-1") == pub
    assert await store.publications_of(ALICE) == [pub, short]
    other = Publication("etag-0", BOB, pidf, "application/pidf+xml", T0 + 60)
    await store.save_publication(other)
    assert await store.all_publications() == sorted(
        [pub, short, other], key=lambda p: (p.entity, p.etag)
    )
    assert await store.delete_publication("etag-0")
    assert await store.expire_publications(T0 + 10) == [short]
    assert await store.publications_of(ALICE) == [pub]
    assert await store.delete_publication("etag-1")
    assert await store.publication("etag-1") is None
    assert (await store.counts()).publications == 0


async def test_presence(store: StorePort) -> None:
    phone = PresenceRecord(BOB, "phone", True, "away", None, 5, T0)
    pc = PresenceRecord(BOB, "pc", True, "dnd", "meeting", 0, T0, pidf="<presence/>")
    await store.save_presence(phone)
    await store.save_presence(pc)
    assert await store.presence_of(BOB) == [pc, phone]
    gone = PresenceRecord(BOB, "pc", False, None, None, 0, T0 + 1)
    await store.save_presence(gone)
    assert await store.presence_of(BOB) == [gone, phone]  # a new presence replaces the old fully
    assert await store.clear_presence(BOB, "phone") == 1
    assert await store.clear_presence(BOB) == 1
    assert await store.presence_of(BOB) == []


async def test_roster_approvals(store: StorePort) -> None:
    alice_jid = "alice@sip.xmpp.test"
    out = ApprovalDirection.SIP_WATCHES_XMPP
    assert await store.approval(alice_jid, BOB, out) is None
    await store.save_approval(RosterApproval(alice_jid, BOB, out, ApprovalState.PENDING, T0))
    approved = RosterApproval(alice_jid, BOB, out, ApprovalState.APPROVED, T0 + 1)
    back = RosterApproval(
        alice_jid, BOB, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.REFUSED, T0 + 2
    )
    await store.save_approval(approved)  # replaces the pending one
    await store.save_approval(back)
    assert await store.approval(alice_jid, BOB, out) == approved
    assert await store.approvals(alice_jid) == [approved, back]
    assert await store.approvals(xmpp_jid="nobody@xmpp.test") == []
    assert await store.delete_approval(alice_jid, BOB, out)
    assert await store.approvals() == [back]


async def test_room_memberships(store: StorePort) -> None:
    room = "room@conference.xmpp.test"
    joining = RoomMembership(ALICE, room, "alice", MembershipState.JOINING)
    await store.save_membership(joining)
    joined = replace(joining, state=MembershipState.JOINED, nick="al")
    await store.save_membership(joined)
    carol = RoomMembership("sip:carol@sip.test", room, "carol", MembershipState.JOINED)
    await store.save_membership(carol)
    assert await store.memberships(ALICE) == [joined]
    assert await store.memberships(room_jid=room) == [joined, carol]
    assert (await store.counts()).memberships == 2
    assert await store.remove_membership(ALICE, room)
    assert not await store.remove_membership(ALICE, room)
    assert await store.memberships() == [carol]


async def test_transport_status(store: StorePort) -> None:
    assert await store.transport_status("irc.xmpp.test") is None
    await store.save_transport_status(TransportStatus("irc.xmpp.test", True, T0))
    down = TransportStatus("irc.xmpp.test", False, T0 + 20, "remote-server-timeout")
    other = TransportStatus("slidge.xmpp.test", True, T0)
    await store.save_transport_status(down)  # replaces the first probe's result
    await store.save_transport_status(other)
    assert await store.transport_status("irc.xmpp.test") == down
    assert await store.transport_statuses() == [down, other]
    assert (await store.counts()).transports_down == 1


# --- the edges: errors, connection settings, column types --------------------------------


async def test_errors_are_translated(sql_store: Store, store_url: str) -> None:
    # Take a table away behind the store's back: the database error must arrive as ours.
    engine = create_engine(engine_url(store_url), poolclass=NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE transport_status RENAME TO transport_status_away")
    try:
        with pytest.raises(StoreError) as caught:
            await sql_store.transport_statuses()
        assert isinstance(caught.value.__cause__, exc.SQLAlchemyError)
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(
                "ALTER TABLE transport_status_away RENAME TO transport_status"
            )
        engine.dispose()


async def test_a_closed_store_is_unavailable(open_store: Callable[[], Awaitable[AnyStore]]) -> None:
    store = await open_store()
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.counts()
    await store.close()  # closing twice is harmless


async def test_json_fields_are_values_not_shared_objects(store: StorePort) -> None:
    dialog: dict[str, object] = {"cseq": 1, "route": ["a"]}
    sub = SipWatcherSubscription("d1", ALICE, BOB, SubscriptionState.ACTIVE, dialog, T0)
    await store.save_sip_watcher_subscription(sub)
    dialog["cseq"] = 2
    stored = await store.sip_watcher_subscription("d1")
    assert stored is not None and stored.dialog == {"cseq": 1, "route": ["a"]}
    stored.dialog["route"].append("b")
    assert await store.sip_watcher_subscriptions() == [
        replace(sub, dialog={"cseq": 1, "route": ["a"]})
    ]


async def test_a_value_json_cannot_hold_is_a_store_error(store: StorePort) -> None:
    sub = SipWatcherSubscription("d1", ALICE, BOB, SubscriptionState.ACTIVE, {"x": {1, 2}}, T0)
    with pytest.raises(StoreError):
        await store.save_sip_watcher_subscription(sub)
    assert await store.sip_watcher_subscriptions() == []


async def test_unreachable_database_is_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        await Store.open("postgresql://postgres@127.0.0.1:1/nothing", busy_timeout=1)


def test_sqlite_connections_are_durable(tmp_path: Path) -> None:
    engine = create_store_engine(f"sqlite:///{tmp_path / 'x.db'}", 1, 2.5)
    with engine.connect() as connection:
        pragmas = [
            connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "busy_timeout")
        ]
    engine.dispose()
    assert pragmas == ["wal", 2, 2500]  # synchronous 2 is FULL


async def test_sqlite_store_refuses_more_threads(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one worker thread"):
        await Store.open(f"sqlite:///{tmp_path / 'x.db'}", threads=2)


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2024, 3, 1, 1, 0, 0, 5, tzinfo=timezone(timedelta(hours=2))),
    ],
)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_custom_columns_round_trip(
    backend: str, moment: datetime, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'c.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    table = Table(
        f"columns_{secrets.token_hex(4)}",
        MetaData(),
        Column("at", UTCDateTime()),
        Column("doc", JsonText()),
    )
    engine = create_engine(engine_url(url), poolclass=NullPool)
    doc = {"a": [1, "ü"], "b": None}
    try:
        table.create(engine)
        with engine.begin() as connection:
            connection.execute(insert(table).values(at=moment, doc=doc))
            at, loaded = connection.execute(select(table.c.at, table.c.doc)).one()
        assert at == moment and at.tzinfo is UTC
        assert loaded == doc
        with pytest.raises(exc.StatementError, match="naive"), engine.begin() as connection:
            connection.execute(insert(table).values(at=datetime(2024, 1, 1), doc={}))
    finally:
        table.drop(engine)
        engine.dispose()
