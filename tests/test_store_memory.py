"""The in-memory store port: what it adds for core tests, and random runs against SQLite.

``tests/test_store.py`` runs every behavioural store test on it as well; here, seeded random
sequences of calls go to a SQLite store and to the memory store, and every answer (or error)
must be the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from component.store import (
    ApprovalDirection,
    ApprovalState,
    MembershipState,
    MessageDirection,
    NewMessage,
    PresenceRecord,
    Publication,
    QueuedMessage,
    RoomMembership,
    RosterApproval,
    SipWatcherSubscription,
    Store,
    StoreCounts,
    StoreError,
    StoreUnavailable,
    SubscriptionState,
    TransportStatus,
    XmppWatcherSubscription,
    migrate,
)
from component.store.memory import MemoryStore

T0 = 1_700_000_000.0
AORS = ["sip:alice@sip.test", "sip:bob@sip.test", "sip:carol@sip.test"]
JIDS = ["bob@xmpp.test", "eve@xmpp.test"]
INSTANCES = ["gw-1", "gw-2"]
STATES = list(SubscriptionState)


async def test_fixture_gives_an_empty_store(memory_store: MemoryStore) -> None:
    assert await memory_store.counts() == StoreCounts(*[0] * 11)
    assert await memory_store.online_users() == []


async def test_an_outage_refuses_every_call_until_it_ends(memory_store: MemoryStore) -> None:
    memory_store.unavailable = True
    with pytest.raises(StoreUnavailable):
        await memory_store.mark_user_seen(AORS[0], T0)
    with pytest.raises(StoreUnavailable):
        await memory_store.counts()
    memory_store.unavailable = False
    assert not await memory_store.user_seen_before(AORS[0])  # nothing was written meanwhile


async def test_a_second_store_on_the_database_is_a_restart(memory_store: MemoryStore) -> None:
    await memory_store.mark_user_seen(AORS[0], T0, expires=60)
    await memory_store.close()
    restarted = MemoryStore(memory_store.database)
    assert [u.aor for u in await restarted.online_users()] == [AORS[0]]
    with pytest.raises(StoreUnavailable, match="closed"):
        await memory_store.online_users()


Call = tuple[str, tuple[Any, ...], dict[str, Any]]


def _call(name: str, *args: Any, **kwargs: Any) -> Call:
    return name, args, kwargs


def _calls(rng: random.Random, now: float) -> list[Callable[[], Call]]:
    """One way to make each kind of call, with arguments from small pools so they collide."""
    aor, jid, other = rng.choice(AORS), rng.choice(JIDS), rng.choice([None, *AORS])
    t = now + rng.choice([-30.0, 0.0, 15.5, 60.0])
    tag = f"t{rng.randrange(4)}"
    direction = rng.choice(list(ApprovalDirection))
    return [
        lambda: _call(
            "enqueue_message",
            NewMessage(
                MessageDirection.XMPP_TO_SIP,
                jid,
                aor,
                "hi",
                "text/plain",
                created_at=now,
                deliver_by=now + rng.choice([10.0, 90.0]),
                next_attempt_at=rng.choice([now, t]),
                extra={"id": tag},
            ),
        ),
        lambda: _call(
            "claim_due_messages", now, rng.randrange(4), rng.choice(INSTANCES), rng.choice([5, 60])
        ),
        lambda: _call("claim_messages_for_recipient", aor, now, rng.choice(INSTANCES), 30.0),
        lambda: _call("messages_for_recipient", aor),
        lambda: _call("mark_delivered", MessageId(rng.randrange(1, 12)), now),
        lambda: _call("mark_failed", MessageId(rng.randrange(1, 12)), "480", now),
        lambda: _call("reschedule", MessageId(rng.randrange(1, 12)), t, rng.choice([None, "busy"])),
        lambda: _call("release_claims", rng.choice(INSTANCES), now),
        lambda: _call("expire_messages", now),
        lambda: _call("purge_finished", t),
        lambda: _call(
            "mark_user_seen", aor, now, rng.choice([None, "sip:c@h"]), rng.choice([None, 20.0])
        ),
        lambda: _call("set_user_offline", aor),
        lambda: _call("expire_registrations", now),
        lambda: _call("online_users"),
        lambda: _call("seen_user", aor),
        lambda: _call(
            "save_sip_watcher_subscription",
            SipWatcherSubscription(tag, aor, jid, rng.choice(STATES), {"cseq": 1}, t),
        ),
        lambda: _call("sip_watcher_subscriptions", rng.choice([None, jid]), expired_at=now),
        lambda: _call("delete_sip_watcher_subscription", tag),
        lambda: _call(
            "save_xmpp_watcher_subscription",
            XmppWatcherSubscription(
                jid, aor, rng.choice(STATES), rng.choice([None, {"a": [1]}]), rng.choice([None, t])
            ),
        ),
        lambda: _call("xmpp_watcher_subscriptions", other, expiring_before=rng.choice([None, t])),
        lambda: _call("delete_xmpp_watcher_subscription", jid, aor),
        lambda: _call("save_publication", Publication(tag, aor, "<pidf/>", "application/x", t)),
        lambda: _call("publications_of", aor),
        lambda: _call("all_publications"),
        lambda: _call("expire_publications", now),
        lambda: _call("delete_publication", tag),
        lambda: _call(
            "save_presence",
            PresenceRecord(
                jid,
                rng.choice(["", "pc"]),
                available=rng.random() < 0.5,
                show=rng.choice([None, "away"]),
                status=None,
                priority=0,
                updated_at=now,
            ),
        ),
        lambda: _call("presence_of", jid),
        lambda: _call("clear_presence", jid, rng.choice([None, "pc"])),
        lambda: _call(
            "save_approval",
            RosterApproval(aor, jid, direction, rng.choice(list(ApprovalState)), now),
        ),
        lambda: _call("approvals", other, rng.choice([None, jid])),
        lambda: _call("delete_approval", aor, jid, direction),
        lambda: _call(
            "save_membership",
            RoomMembership(aor, f"{tag}@rooms.test", tag, rng.choice(list(MembershipState))),
        ),
        lambda: _call("memberships", other),
        lambda: _call("remove_membership", aor, f"{tag}@rooms.test"),
        lambda: _call(
            "save_transport_status", TransportStatus(tag, rng.random() < 0.5, now, "probe")
        ),
        lambda: _call("transport_statuses"),
        lambda: _call("counts"),
    ]


@dataclass(frozen=True)
class MessageId:
    """A message id as SQLite numbers it; SQLite reuses the ids of purged messages (PostgreSQL
    and the memory store do not), so the memory store's ids are translated."""

    sql: int


async def _answer(store: Any, call: Call, translate: Callable[[Any], Any]) -> Any:
    name, args, kwargs = call
    try:
        return await getattr(store, name)(*(translate(a) for a in args), **kwargs)
    except StoreError as error:
        return type(error)


@pytest.mark.parametrize("seed", range(6))
async def test_random_calls_answer_as_on_sqlite(seed: int, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    migrate.upgrade(url)
    sql, memory = await Store.open(url), MemoryStore()
    rng, now = random.Random(seed), T0
    sql_ids: dict[int, int] = {}  # memory store id -> SQLite id of the same message

    def as_sql(answer: Any) -> Any:
        if isinstance(answer, list):
            return [as_sql(item) for item in answer]
        if isinstance(answer, QueuedMessage):
            return replace(answer, id=sql_ids[answer.id])
        return answer

    def for_memory(arg: Any) -> Any:
        if not isinstance(arg, MessageId):
            return arg
        ids = [mem for mem, sql_id in sql_ids.items() if sql_id == arg.sql]
        return max(ids, default=-arg.sql)

    try:
        for step in range(1000):
            now += rng.choice([0.0, 0.5, 7.0, 40.0])
            call = rng.choice(_calls(rng, now))()
            expected = await _answer(sql, call, lambda a: a.sql if isinstance(a, MessageId) else a)
            answer = await _answer(memory, call, for_memory)
            if call[0] == "enqueue_message":
                sql_ids[answer.id] = expected.id
            assert as_sql(answer) == expected, f"step {step}: {call}"
    finally:
        await sql.close()
