"""Presence at scale (DESIGN 12): a status change to many SIP watchers keeps a bounded number of
NOTIFYs in flight, sends the rest as answers come back, in the order the changes came, and
leaves idle subscriptions small."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Callable, Coroutine, Generator
from typing import Any, cast
from unittest.mock import ANY

import pytest

from component.runtime.presence_driver import MAX_IN_FLIGHT, Core
from component.sip import watch_dialogs
from component.sip.dialog_state import fresh
from component.store import ApprovalDirection, ApprovalState, RosterApproval
from component.store.memory import MemoryStore
from component.values import Presence
from sipside.endpoint import Final
from sipside.message import SipRequest, SipResponse
from sipside.peer import Peer
from tests.test_presence import (
    BOB,
    BOB_SIP,
    T0,
    FakeEndpoint,
    FakeIncoming,
    GatedEndpoint,
    answer,
    answer_all,
    approve_watchers,
    approved_watchers,
    build,
    deliver,
    notify_for,
    pidf_body,
    respond,
    runtime_world,
    sip,
    watched_by,
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
        await watched_by(store, side, count)
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
    await approve_watchers(store, count)
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


async def test_resumed_subscriptions_are_small_and_share_what_repeats(
    memory_store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart (DESIGN 8, 12) the dialogs of one watched entity share its PIDF body and
    the strings every dialog repeats; the Python memory a resumed subscription keeps stays
    bounded (the store's rows and the address book's bounded caches left out)."""
    monkeypatch.setattr(watch_dialogs, "RESTORE_PAGE", 7)  # read in pages: none is skipped
    first = memory_store
    w = build(first)
    sip_count, xmpp_count = 300, 100
    await approved_watchers(w, sip_count, [3600] * sip_count)
    for j in range(xmpp_count):
        sip_jid = f"s{j}@sip.xmpp.test"
        await w.core.on_presence(Presence(sender=BOB, recipient=sip_jid, type="subscribe"), T0)
        [(subscribe, _, reply)] = w.sip.take()
        await respond(reply, answer(subscribe, 200, [("Expires", "3600")]), T0)
        body = pidf_body("open")
        assert await deliver(w, notify_for(subscribe, "active;expires=3600", body), T0) == 200
    await first.close()
    second = MemoryStore(first.database)
    kept = [
        tracemalloc.Filter(True, "*/component/*"),
        tracemalloc.Filter(True, "*/sipside/*"),
        tracemalloc.Filter(False, "*/component/store/memory.py"),
        tracemalloc.Filter(False, "*/component/addresses.py"),
    ]
    try:
        n = build(second, seed=2)
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot().filter_traces(kept)
            assert await n.side.resume(T0 + 100) == (sip_count, xmpp_count, 0)
            after = tracemalloc.take_snapshot().filter_traces(kept)
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        print(f"{grown / (sip_count + xmpp_count):.0f} B per resumed subscription")
        assert grown / (sip_count + xmpp_count) < 1536
        snaps = [d.notifier.snapshot() for d in n.side.watches.dialogs.values()]
        assert len({id(s.body) for s in snaps}) == 1 and snaps[0].body  # one body for Bob
        assert len({id(s.local_uri) for s in snaps}) == 1  # Bob's SIP URI, once
        assert len({id(s.contact) for s in snaps}) == 1
        held = list(n.side.subscriptions.held.values())
        assert len({id(h.watcher_jid) for h in held}) == 1  # Bob's JID, once
        assert all(n.side.subscriptions.held[h.pair] is h for h in held)
    finally:
        await second.close()


async def test_resumed_dialogs_know_their_watchers_aor(memory_store: MemoryStore) -> None:
    """A dialog reads its watcher's AOR from its remote URI when that is ``<AOR>``, and keeps
    its own otherwise (a display name); both before and after a restart."""
    first = memory_store
    w = build(first)
    await approved_watchers(w, 2)
    await first.save_approval(
        RosterApproval(
            watcher_jid(7), BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
        )
    )
    named = sip(
        "SUBSCRIBE",
        BOB_SIP,
        [("Contact", "<sip:w7@127.0.0.1:5062>"), ("Event", "presence"), ("Expires", "600")],
        call_id="named",
        from_='"Seven" <sip:w7@sip.test>;tag=f7',
    )
    await w.request(FakeIncoming(named), T0)
    expected = {"sip:w0@sip.test", "sip:w1@sip.test", "sip:w7@sip.test"}
    kept = {d.watcher_aor: d.own_aor for d in w.side.watches.dialogs.values()}
    assert kept == {"sip:w0@sip.test": None, "sip:w1@sip.test": None, "sip:w7@sip.test": ANY}
    await first.close()
    second = MemoryStore(first.database)
    try:
        n = build(second, seed=2)
        assert (await n.side.resume(T0 + 100))[0] == 3
        dialogs = list(n.side.watches.dialogs.values())
        assert {d.watcher_aor for d in dialogs} == expected
        assert [d.own_aor for d in dialogs].count(None) == 2
        stored = await second.sip_watcher_subscriptions()
        assert {s.watcher_aor for s in stored} == expected
    finally:
        await second.close()


def test_fresh_copies_a_string() -> None:
    text = "sip:w1@sip.test"
    copy = fresh(text)
    assert copy == text and copy is not text
    assert fresh("") == ""


class CallbackEndpoint(FakeEndpoint):
    """An endpoint that answers by callback (``Endpoint.send``): NOTIFYs wait in ``held`` for
    the test to answer them with ``reply``; other requests are answered 200 in a later pass."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[SipRequest, Callable[[Final], None]]] = []

    def send(
        self, request: SipRequest, done: Callable[[Final], None], peer: Peer | None = None
    ) -> None:
        self.requests.append((request, peer))
        if request.method == "NOTIFY":
            self.held.append((request, done))
            return
        asyncio.get_running_loop().call_soon(done, answer(request, 200, [("Expires", "600")]))

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        raise AssertionError("presence's transactions are answered by callback")

    def reply(self, index: int, status: int = 200) -> None:
        request, done = self.held[index]
        done(answer(request, status))


class CountingTasks:
    """Counts the tasks made on the running loop while in use."""

    def __init__(self) -> None:
        self.count = 0

    def __enter__(self) -> CountingTasks:
        loop = asyncio.get_running_loop()
        self._old = loop.get_task_factory()

        def factory(
            loop: asyncio.AbstractEventLoop,
            coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
            **kw: Any,
        ) -> asyncio.Task[Any]:
            self.count += 1
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(factory)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.get_running_loop().set_task_factory(self._old)


async def test_a_fan_out_by_callback_keeps_the_window_and_the_order(
    memory_store: MemoryStore,
) -> None:
    store = memory_store
    count = MAX_IN_FLIGHT + 10
    endpoint = CallbackEndpoint()
    runtime, side, _ = runtime_world(store, endpoint)
    await runtime.start()
    try:
        await watched_by(store, side, count)
        await _idle()
        assert len(endpoint.held) == count  # the first NOTIFYs, one per dialog
        for i in range(count):
            endpoint.reply(i)
        await runtime.settle()
        with CountingTasks() as tasks:
            for i in range(count):
                runtime.on_presence(
                    Presence(sender=f"{BOB}/pc", recipient=watcher_jid(i), show="away")
                )
            await _idle()
            assert len(endpoint.held) == count + MAX_IN_FLIGHT  # the window, not more
            assert runtime.queued_presence == count - MAX_IN_FLIGHT
            endpoint.reply(count)  # one answer makes room for one more NOTIFY
            await _idle()
            assert len(endpoint.held) == count + MAX_IN_FLIGHT + 1
            answered = count + 1
            while answered < len(endpoint.held) or runtime.queued_presence:
                endpoint.reply(answered)
                answered += 1
                await _idle(2)
            await runtime.settle()
        assert len(endpoint.held) == 2 * count
        # No task per NOTIFY: the worker, and at most one to run queued outcomes at a time.
        assert tasks.count <= 3
        notified = [r.call_id for r, _ in endpoint.held[count:]]
        assert notified == [watcher_subscribe(i).call_id for i in range(count)]  # in order
    finally:
        await runtime.stop()


async def test_by_callback_one_notify_per_dialog_newest_state_and_481_ends(
    memory_store: MemoryStore,
) -> None:
    store = memory_store
    endpoint = CallbackEndpoint()
    runtime, side, _ = runtime_world(store, endpoint)
    await runtime.start()
    try:
        await watched_by(store, side, 2)
        await _idle()
        endpoint.reply(0)
        endpoint.reply(1)
        await runtime.settle()
        for show in ("away", "dnd", "xa"):  # while the first is unanswered: coalesced
            runtime.on_presence(Presence(sender=f"{BOB}/pc", recipient=watcher_jid(0), show=show))
        await _idle()
        assert len(endpoint.held) == 3  # one NOTIFY in flight in the dialog
        endpoint.reply(2)
        await _idle()
        assert len(endpoint.held) == 4  # the newest state, next in CSeq order
        first, latest = endpoint.held[2][0], endpoint.held[3][0]
        assert latest.cseq[0] == first.cseq[0] + 1
        assert b"xa" in latest.body and b"dnd" not in latest.body
        endpoint.reply(3, 481)  # the watcher is gone: the dialog ends (RFC 6665 4.2.2)
        await runtime.settle()
        assert side.counts()["sip_watchers"] == 1
        assert [s.watcher_aor for s in await store.sip_watcher_subscriptions()] == [
            "sip:w1@sip.test"
        ]
    finally:
        await runtime.stop()


class RecordingCore:
    """A presence core that only notes the recipient of each stanza it is handed."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_presence(self, presence: Presence, now: float) -> None:
        self.seen.append(presence.recipient)


async def test_every_queued_stanza_is_handled_once_in_order(memory_store: MemoryStore) -> None:
    runtime, _, _ = runtime_world(memory_store, CallbackEndpoint())
    core = RecordingCore()
    seen = core.seen
    runtime.core = cast(Core, core)  # the driver calls nothing else of it here
    await runtime.start()
    try:
        count = 500
        for i in range(count):
            runtime.on_presence(Presence(sender=f"{BOB}/pc", recipient=watcher_jid(i)))
        await runtime.settle()
        assert seen == [watcher_jid(i) for i in range(count)]
    finally:
        await runtime.stop()
