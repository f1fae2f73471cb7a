"""Presence at scale (DESIGN 12): a status change to many SIP watchers keeps a bounded number of
NOTIFYs in flight, sends the rest as answers come back, in the order the changes came, and
leaves idle subscriptions small."""

from __future__ import annotations

import asyncio
import tracemalloc

from component.runtime.presence_driver import MAX_IN_FLIGHT
from component.store import ApprovalDirection, ApprovalState, RosterApproval
from component.store.memory import MemoryStore
from component.values import Presence
from tests.test_presence import (
    BOB,
    T0,
    FakeIncoming,
    GatedEndpoint,
    answer_all,
    build,
    runtime_world,
    through_gate,
    watcher_jid,
    watcher_subscribe,
)


async def _idle(rounds: int = 200) -> None:
    """Let every ready task run (the fakes never wait on anything else)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def test_a_fan_out_keeps_at_most_max_in_flight_notifies_unanswered(
    memory_store: MemoryStore,
) -> None:
    store = memory_store
    count = MAX_IN_FLIGHT + 10
    endpoint = GatedEndpoint()
    runtime, side, _ = runtime_world(store, endpoint)
    await runtime.start()
    try:
        for i in range(count):
            await store.save_approval(
                RosterApproval(
                    watcher_jid(i),
                    BOB,
                    ApprovalDirection.SIP_WATCHES_XMPP,
                    ApprovalState.APPROVED,
                    T0,
                )
            )
            incoming = FakeIncoming(watcher_subscribe(i))
            await through_gate(side, incoming)
            assert incoming.status == 202
        while len(endpoint.held) < count:  # the first NOTIFYs, one per dialog
            await asyncio.sleep(0)
        for gate in endpoint.held:
            gate.set_result(None)
        await runtime.settle()
        first = len(endpoint.requests)
        # Bob goes away: the server sends one stanza per watcher, all at once.
        for i in range(count):
            runtime.on_presence(Presence(sender=f"{BOB}/pc", recipient=watcher_jid(i), show="away"))
        await _idle()
        held = endpoint.held[count:]
        assert len(held) == MAX_IN_FLIGHT  # the rest wait for answers, not for a timer
        assert runtime.queued_presence == count - MAX_IN_FLIGHT
        held[0].set_result(None)
        await _idle()
        assert len(endpoint.held) == count + MAX_IN_FLIGHT + 1
        for gate in endpoint.held[count:]:
            if not gate.done():
                gate.set_result(None)
        while len(endpoint.held) < 2 * count:
            await _idle(1)
            for gate in endpoint.held[count:]:
                if not gate.done():
                    gate.set_result(None)
        await runtime.settle()
        notified = [r.call_id for r, _ in endpoint.requests[first:]]
        assert notified == [watcher_subscribe(i).call_id for i in range(count)]  # in order
        assert runtime.queued_presence == 0
    finally:
        await runtime.stop()


async def test_an_idle_sip_watcher_subscription_is_small(memory_store: MemoryStore) -> None:
    """Python memory our code keeps per approved, idle SIP watcher (DESIGN 12 allows 2 KB of
    RSS per stored subscription; this is the part the dialogs and their indexes hold)."""
    store = memory_store
    count = 400
    w = build(store)
    for i in range(count):
        await store.save_approval(
            RosterApproval(
                watcher_jid(i), BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
            )
        )
    requests = [watcher_subscribe(i) for i in range(count)]
    # Our code's allocations, without the store fake's rows (the gateway's are in its database)
    # and the address book's caches (bounded, so constant at scale).
    kept = [
        tracemalloc.Filter(True, "*/component/*"),
        tracemalloc.Filter(True, "*/sipside/*"),
        tracemalloc.Filter(False, "*/component/store/memory.py", all_frames=True),
        tracemalloc.Filter(False, "*/component/addresses.py"),
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(kept)
        for request in requests:
            await w.request(FakeIncoming(request), T0)
        await answer_all(w, T0)
        w.sip.delivers.clear()  # the fake keeps every outcome callback; the gateway does not
        w.xmpp.take()
        after = tracemalloc.take_snapshot().filter_traces(kept)
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert len(w.side.watches.dialogs) == count
    print(f"{grown / count:.0f} B per idle SIP watcher")
    assert grown / count < 2048
