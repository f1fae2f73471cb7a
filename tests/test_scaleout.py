"""Several instances on one database (DESIGN 9): owners, heartbeats, takeover, queue claims.

The store behaviour runs on SQLite, PostgreSQL and the in-memory store; the heartbeat and
takeover logic runs on the in-memory store with a fake clock. Two stores on one database are
two instances.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from component.runtime.instances import (
    Instances,
    SharedSqlite,
    dead_instances,
    live_instances,
)
from component.settings import load_settings
from component.store import (
    GatewayInstance,
    MembershipState,
    MessageDirection,
    NewMessage,
    Publication,
    RoomMembership,
    Store,
    StorePort,
    SubscriptionState,
    Takeover,
    XmppWatcherSubscription,
    migrate,
)
from component.store.memory import MemoryDatabase, MemoryStore
from tests.harness.ports import free_port
from tests.test_store import database, pg_url, sqlite_template  # noqa: F401 (fixtures)

T0 = 1_700_000_000.0
CHECK = 20.0
ROOM = "room@conference.xmpp.test"
ALICE = "sip:alice@sip.test"
BOB = "bob@xmpp.test"

OpenAs = Callable[[str], Awaitable[StorePort]]


@pytest.fixture
async def open_as(database: str | MemoryDatabase) -> AsyncIterator[OpenAs]:  # noqa: F811
    """Open a store for instance ``name`` on the test's database."""
    opened: list[Store | MemoryStore] = []

    async def open_one(name: str) -> StorePort:
        store: Store | MemoryStore
        if isinstance(database, MemoryDatabase):
            store = MemoryStore(database, instance=name)
        else:
            store = await Store.open(database, instance=name)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


def _message(recipient: str, now: float = T0) -> NewMessage:
    return NewMessage(
        MessageDirection.XMPP_TO_SIP,
        BOB,
        recipient,
        "hello",
        "text/plain",
        created_at=now,
        deliver_by=now + 90.0,
        next_attempt_at=now,
    )


async def _own_some(store: StorePort, aor: str) -> None:
    await store.save_membership(RoomMembership(aor, ROOM, "nick", MembershipState.JOINED))
    await store.save_xmpp_watcher_subscription(
        XmppWatcherSubscription(BOB, aor, SubscriptionState.ACTIVE, {"x": 1}, T0 + 600)
    )
    await store.save_publication(
        Publication(f"etag-{aor}", aor, "<p/>", "application/pidf+xml", T0 + 600)
    )


# --- the store: owners, scoped listings, takeover --------------------------------------------


async def test_each_instance_lists_only_what_it_owns(open_as: OpenAs) -> None:
    a, b = await open_as("a"), await open_as("b")
    await _own_some(a, ALICE)
    await _own_some(b, "sip:carol@sip.test")
    assert [m.sip_aor for m in await a.memberships()] == [ALICE]
    assert [s.sip_aor for s in await a.xmpp_watcher_subscriptions()] == [ALICE]
    assert [p.entity for p in await b.all_publications()] == ["sip:carol@sip.test"]
    # A filtered lookup sees every instance's rows: any instance answers any request.
    assert len(await b.memberships(room_jid=ROOM)) == 2
    assert len(await a.xmpp_watcher_subscriptions(ALICE)) == 1


async def test_take_over_moves_rows_and_claims_once(open_as: OpenAs) -> None:
    a, b = await open_as("a"), await open_as("b")
    await a.join_instances("a", T0)
    await b.join_instances("b", T0)
    await _own_some(a, ALICE)
    await a.enqueue_message(_message(ALICE))
    [claimed] = await a.claim_due_messages(T0, 10, "a")
    moved = await b.take_over("a", "b", T0 + 50)
    assert moved == Takeover(
        sip_watchers=0, xmpp_watchers=1, publications=1, memberships=1, messages=1
    )
    assert [m.sip_aor for m in await b.memberships()] == [ALICE]
    assert await a.memberships() == []
    assert [row.name for row in await b.instances()] == ["b"]
    assert not await a.beat("a", T0 + 51)  # a stalled instance learns it was taken over
    again = await b.claim_due_messages(T0 + 50, 10, "b")
    assert [m.id for m in again] == [claimed.id]
    assert (await a.take_over("a", "b", T0 + 60)).total == 0  # a second survivor finds nothing


async def test_heartbeats_and_leaving(open_as: OpenAs) -> None:
    a = await open_as("a")
    await a.join_instances("a", T0)
    assert await a.beat("a", T0 + 5)
    [row] = await a.instances()
    assert (row.name, row.heartbeat_at, row.gone) == ("a", T0 + 5, False)
    await a.leave_instances("a", T0 + 6)
    [row] = await a.instances()
    assert row.gone and not await a.beat("a", T0 + 7)
    await a.join_instances("a", T0 + 8)  # a restart under the same name
    assert await a.beat("a", T0 + 9)


async def test_concurrent_claims_deliver_each_message_once(open_as: OpenAs) -> None:
    a, b = await open_as("a"), await open_as("b")
    for n in range(60):
        await a.enqueue_message(_message(f"sip:u{n}@sip.test"))

    async def drain(store: StorePort, name: str) -> list[int]:
        got: list[int] = []
        while batch := await store.claim_due_messages(T0, 5, name):
            got += [m.id for m in batch]
            await asyncio.sleep(0)
        return got

    got_a, got_b = await asyncio.gather(drain(a, "a"), drain(b, "b"))
    assert sorted(got_a + got_b) == sorted(set(got_a + got_b))  # no message claimed twice
    assert len(got_a) + len(got_b) == 60


# --- the heartbeat and takeover logic (fake clock) -------------------------------------------


def _row(name: str, beat: float, gone: bool = False) -> GatewayInstance:
    return GatewayInstance(name, T0, beat, gone)


@pytest.mark.parametrize(
    ("rows", "dead", "live"),
    [
        ([_row("me", T0)], [], []),
        ([_row("me", T0), _row("b", T0 - 39)], [], ["b"]),
        ([_row("me", T0), _row("b", T0 - 41)], ["b"], []),
        ([_row("me", T0), _row("b", T0, gone=True)], ["b"], []),
        ([_row("me", T0 - 100), _row("b", T0)], [], ["b"]),  # never itself
    ],
)
def test_who_is_dead(rows: list[GatewayInstance], dead: list[str], live: list[str]) -> None:
    assert dead_instances(rows, "me", T0, CHECK) == dead
    assert live_instances(rows, "me", T0, CHECK) == live


class _Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _instances(
    db: MemoryDatabase, name: str, clock: _Clock, resumed: list[Takeover], lost: list[str]
) -> Instances:
    async def resume(moved: Takeover, lost: list[str]) -> None:
        assert set(lost) <= {"a", "b"}
        resumed.append(moved)

    return Instances(
        MemoryStore(db, instance=name),
        name,
        check_time=CHECK,
        clock=clock,
        resume=resume,
        lost=lambda: lost.append(name),
    )


async def test_a_survivor_takes_over_after_two_check_times() -> None:
    db, clock = MemoryDatabase(), _Clock()
    resumed: list[Takeover] = []
    lost: list[str] = []
    a = _instances(db, "a", clock, resumed, lost)
    b = _instances(db, "b", clock, resumed, lost)
    await a.join()
    await b.join()
    await _own_some(a.store, ALICE)
    await a.store.enqueue_message(_message(ALICE))
    await a.store.claim_due_messages(T0, 10, "a")
    clock.now = T0 + 2 * CHECK  # a's last beat is exactly at the limit: still alive
    assert (await b.check()).total == 0 and resumed == []
    clock.now = T0 + 2 * CHECK + 1
    moved = await b.check()
    assert (moved.memberships, moved.xmpp_watchers, moved.messages) == (1, 1, 1)
    assert resumed == [moved] and b.taken == ["a"]
    assert [m.sip_aor for m in await b.store.memberships()] == [ALICE]
    await a.check()  # a wakes up from its stall: it stops instead of serving b's state
    assert lost == ["a"]


async def test_a_stopped_instance_hands_over_at_once() -> None:
    db, clock = MemoryDatabase(), _Clock()
    resumed: list[Takeover] = []
    a = _instances(db, "a", clock, resumed, [])
    b = _instances(db, "b", clock, resumed, [])
    await a.join()
    await b.join()
    await _own_some(a.store, ALICE)
    await a.leave()
    moved = await b.check()  # no time passed
    assert moved.memberships == 1 and resumed == [moved]


async def test_join_adopts_unowned_rows_and_dead_instances() -> None:
    db, clock = MemoryDatabase(), _Clock()
    await MemoryStore(db, instance="old").join_instances("old", T0)
    await _own_some(MemoryStore(db, instance="old"), ALICE)
    # A row without owner, as stored before revision 0003:
    db.memberships.put(RoomMembership("sip:x@sip.test", ROOM, "x", MembershipState.JOINED))
    clock.now = T0 + 3 * CHECK
    new = _instances(db, "new", clock, [], [])
    moved = await new.join()
    assert moved.memberships == 2 and new.taken == ["old"]


async def test_sqlite_refuses_a_second_live_instance() -> None:
    db, clock = MemoryDatabase(), _Clock()
    first = _instances(db, "first", clock, [], [])
    await first.join(sqlite=True)
    second = _instances(db, "second", clock, [], [])
    with pytest.raises(SharedSqlite, match="PostgreSQL"):
        await second.join(sqlite=True)
    await _instances(db, "first", clock, [], []).join(sqlite=True)  # its own restart: fine
    await first.leave()
    await second.join(sqlite=True)  # the first one stopped


def test_instance_name_defaults_to_host_and_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    assert load_settings(None).gateway.name == f"{socket.gethostname()}-{os.getpid()}"
    monkeypatch.setenv("SIPXMPP_GATEWAY__INSTANCE", "gw-b")
    assert load_settings(None).gateway.name == "gw-b"


def test_sipxmpp_run_refuses_a_second_instance_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    migrate.upgrade(url)

    async def first_is_beating() -> None:
        store = await Store.open(url, instance="first")
        await store.join_instances("first", time.time())
        await store.close()

    asyncio.run(first_is_beating())
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\ninstance = "second"\n[database]\nurl = "{url}"\n'
        f'[sip]\nlisten = ["udp:127.0.0.1:{free_port()}"]\n'
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIPXMPP_")}
    result = subprocess.run(
        [sys.executable, "-m", "component", "run", "-c", str(config)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "'first' is running on this SQLite database" in result.stderr
    assert "PostgreSQL" in result.stderr
