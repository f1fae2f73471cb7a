"""Bursts, per-conversation order and the durable queue's rules (DESIGN 4.2, 8), on fakes."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import TypedDict, Unpack

import pytest

from component.messaging.conversations import Conversations, QueueFull
from component.messaging.router import MessageRouter
from component.store.memory import MemoryStore
from component.values import ChatMessage, ImdnAsk, SipText
from tests.fakes import UnusedSip
from tests.test_messaging import BOOK, Clock, FakeCommands, FakeXmpp

ALICE = "sip:alice@sip.test"


@pytest.fixture
def store(memory_store: MemoryStore) -> MemoryStore:
    """The router's store port: the in-memory fake."""
    return memory_store


class ScriptedSip(UnusedSip):
    """A SIP side whose answers come late and out of order, like a proxy's workers.

    ``status_for(body, attempt)`` gives each MESSAGE's final status; ``gate`` (when set) holds
    every answer until it is opened. It records how many MESSAGEs were in flight at once, in
    total and per (From, To) pair.
    """

    def __init__(self, status_for: dict[str, list[int]] | None = None, seed: int = 7) -> None:
        self.script = {body: list(statuses) for body, statuses in (status_for or {}).items()}
        self.sent: list[tuple[str, str, str]] = []
        self.inflight = 0
        self.most_inflight = 0
        self.pair_inflight: dict[tuple[str, str], int] = defaultdict(int)
        self.most_pair_inflight = 0
        self.gate: asyncio.Event | None = None
        self._random = random.Random(seed)

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
        pair = (from_uri, to_uri)
        self.sent.append((from_uri, to_uri, body))
        self.inflight += 1
        self.pair_inflight[pair] += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        self.most_pair_inflight = max(self.most_pair_inflight, self.pair_inflight[pair])
        try:
            if self.gate is not None:
                await self.gate.wait()
            for _ in range(self._random.randrange(6)):  # answers overtake each other
                await asyncio.sleep(0)
        finally:
            self.inflight -= 1
            self.pair_inflight[pair] -= 1
        statuses = self.script.get(body)
        return statuses.pop(0) if statuses else 200

    def bodies_to(self, to_uri: str, from_uri: str | None = None) -> list[str]:
        return [b for f, t, b in self.sent if t == to_uri and from_uri in (None, f)]


class Limits(TypedDict, total=False):
    """The router's limits a test sets (the others keep the router's defaults)."""

    max_inflight: int
    queue: int
    per_recipient: int


def _router(
    store: MemoryStore, sip: ScriptedSip, xmpp: FakeXmpp, clock: Clock, **limits: Unpack[Limits]
) -> MessageRouter:
    return MessageRouter(
        BOOK, xmpp, sip, store, FakeCommands(), clock=clock, delay_time=90.0, **limits
    )


async def _burst(router: MessageRouter, messages: list[ChatMessage]) -> None:
    """As the XMPP adapter hands them over: one task per stanza, started in stream order."""
    tasks = [asyncio.ensure_future(router.on_xmpp_message(m)) for m in messages]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    await router.settle(30)


def _from_bob(to: str, *bodies: str, sender: str = "bob@xmpp.test/phone") -> list[ChatMessage]:
    return [ChatMessage(sender, to, body, id=f"id-{body}") for body in bodies]


# --- the core: one in flight per pair, a bound in total, a bounded wait ---------------------


def test_one_sender_takes_at_most_its_share_of_the_wait() -> None:
    conv: Conversations[str] = Conversations(max_inflight=1, capacity=10, per_sender=2)
    busy, calm = ("busy", "A"), ("calm", "B")
    assert conv.offer(busy, "b0") == [(busy, "b0")]  # in flight: not waiting
    conv.offer(busy, "b1")
    conv.offer(("busy", "C"), "c1")  # the same sender to someone else counts too
    with pytest.raises(QueueFull, match="of this sender"):
        conv.offer(busy, "b2")
    assert conv.offer(calm, "k1") == []  # another sender still waits for its turn
    assert conv.done(busy) == [(("busy", "C"), "c1")]  # waited longer than b1
    conv.offer(busy, "b2")  # a place of its own came free
    assert conv.waiting == 3
    assert [item for _, item in conv.take_waiting()] == ["b1", "b2", "k1"]
    conv.offer(busy, "b3")
    conv.offer(busy, "b4")  # nothing of it waits any more after take_waiting


def test_conversations_one_in_flight_per_pair_and_bounded_in_total() -> None:
    conv: Conversations[str] = Conversations(max_inflight=2, capacity=3)
    a, b, c = ("x", "A"), ("x", "B"), ("x", "C")
    assert conv.offer(a, "a1") == [(a, "a1")]
    assert conv.offer(a, "a2") == []  # behind a1
    assert conv.offer(b, "b1") == [(b, "b1")]
    assert conv.offer(c, "c1") == []  # no free slot
    assert conv.offer(a, "a3") == []
    with pytest.raises(QueueFull):
        conv.offer(b, "b2")
    assert (conv.inflight, conv.waiting) == (2, 3)
    assert conv.done(a) == [(c, "c1")]  # c waited longer than a's next
    assert conv.done(b) == [(a, "a2")]
    assert conv.done(c) == []  # a3 waits behind a2, not for a slot
    assert conv.done(a) == [(a, "a3")]
    assert conv.done(a) == []
    assert (conv.inflight, conv.waiting) == (0, 0)


# --- item 2 and 3: a burst is queued, in order, within the bound -----------------------------


async def test_burst_of_200_from_one_user_all_delivered_in_order(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), ScriptedSip()
    router = _router(store, sip, xmpp, Clock(), max_inflight=20)
    users = [f"u{n}@sip.xmpp.test" for n in range(25)]
    messages = [
        ChatMessage("bob@xmpp.test/phone", users[n % 25], f"{n:03}", id=f"m{n}") for n in range(200)
    ]
    await _burst(router, messages)
    assert xmpp.errors == []
    assert router.counters["refused"] == 0 and router.counters["xmpp_to_sip"] == 200
    for n, user in enumerate(users):
        to_uri = f"sip:{user.split('@')[0]}@sip.test"
        assert sip.bodies_to(to_uri) == [f"{k:03}" for k in range(n, 200, 25)]
    assert sip.most_pair_inflight == 1
    assert 1 < sip.most_inflight <= 20


async def test_burst_to_one_user_is_sent_one_at_a_time(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), ScriptedSip()
    router = _router(store, sip, xmpp, Clock(), max_inflight=20)
    bodies = [f"{n:03}" for n in range(200)]
    await _burst(router, _from_bob("alice@sip.xmpp.test", *bodies))
    assert sip.bodies_to(ALICE) == bodies
    assert sip.most_inflight == 1 and xmpp.errors == []


async def test_taken_synchronously_only_the_first_of_a_conversation_needs_a_task(
    store: MemoryStore,
) -> None:
    """As the gateway hands stanzas over: take_xmpp_message places each in line at once; only
    a MESSAGE that starts returns work (the sending chain), the others wait without a task."""
    xmpp, sip = FakeXmpp(), ScriptedSip()
    router = _router(store, sip, xmpp, Clock(), max_inflight=2)
    bodies = [f"{n:03}" for n in range(50)]
    to_carol = _from_bob("carol@sip.xmpp.test", "c0", "c1")
    works = [router.take_xmpp_message(m) for m in _from_bob("alice@sip.xmpp.test", *bodies)]
    works += [router.take_xmpp_message(m) for m in to_carol]
    started = [w for w in works if w is not None]
    assert len(started) == 2  # alice's first and carol's first; the rest queued behind them
    assert works[0] is not None and works[50] is not None
    await asyncio.wait_for(asyncio.gather(*started), timeout=30)
    await router.settle(30)
    assert sip.bodies_to(ALICE) == bodies
    assert sip.bodies_to("sip:carol@sip.test") == ["c0", "c1"]
    assert sip.most_pair_inflight == 1 and xmpp.errors == []
    assert router.counters["xmpp_to_sip"] == 52 and router.counters["refused"] == 0


async def test_only_a_full_queue_refuses_and_each_refusal_is_counted(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), ScriptedSip()
    sip.gate = asyncio.Event()
    router = _router(store, sip, xmpp, Clock(), max_inflight=1, queue=3)
    tasks = [
        asyncio.ensure_future(router.on_xmpp_message(m))
        for m in _from_bob("alice@sip.xmpp.test", *"abcdef")
    ]
    for _ in range(10):
        await asyncio.sleep(0)
    # one in flight, three waiting, two refused
    assert [(e.condition, e.type, e.id) for e in xmpp.errors] == [
        ("resource-constraint", "wait", "id-e"),
        ("resource-constraint", "wait", "id-f"),
    ]
    assert router.counters["refused"] == 2
    sip.gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    await router.settle(30)
    assert sip.bodies_to(ALICE) == list("abcd")


# --- item 3: order holds through the retry queue ---------------------------------------------


async def test_a_stored_message_is_not_overtaken_by_later_ones(store: MemoryStore) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    sip = ScriptedSip({"2": [480], "5": [403]})
    router = _router(store, sip, xmpp, clock)
    await _burst(router, _from_bob("alice@sip.xmpp.test", *"123456"))
    # 1 delivered, 2 stored on 480, 3..6 stored behind it without being sent
    assert sip.bodies_to(ALICE) == ["1", "2"]
    assert len(await store.messages_for_recipient(ALICE)) == 5
    # another conversation to the same user is not held up
    await _burst(router, _from_bob("alice@sip.xmpp.test", "c1", sender="carol@xmpp.test/x"))
    assert sip.bodies_to(ALICE, "sip:carol*xmpp.test@jabber.sip.test") == ["c1"]
    router.user_online(ALICE)
    await router.settle(30)
    assert sip.bodies_to(ALICE, "sip:bob*xmpp.test@jabber.sip.test") == list("1223456")
    # 5 got a final 403 on its retry: its sender is told, and 6 still went after it
    assert [(e.condition, e.id) for e in xmpp.errors] == [("forbidden", "id-5")]
    assert await store.messages_for_recipient(ALICE) == []
    # the conversation is free again: the next one goes at once
    await _burst(router, _from_bob("alice@sip.xmpp.test", "7"))
    assert sip.bodies_to(ALICE)[-1] == "7"


async def test_retry_waits_for_an_earlier_message_of_the_conversation(
    store: MemoryStore,
) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    sip = ScriptedSip({"a": [480, 480, 480]})
    router = _router(store, sip, xmpp, clock)
    await _burst(router, _from_bob("alice@sip.xmpp.test", "a"))
    clock.now += 1
    await _burst(router, _from_bob("alice@sip.xmpp.test", "b"))  # stored behind a, due later
    clock.now += 4.5  # a is due (5 s), b not yet (6 s)
    assert await router.retry_due() == 1  # a: 480 again, now due 10 s later
    clock.now += 1  # b is due, a is not
    await router.retry_due()
    assert sip.bodies_to(ALICE) == ["a", "a"]  # b was not sent ahead of a
    clock.now += 20
    await router.retry_due()
    clock.now += 30
    await router.retry_due()
    assert sip.bodies_to(ALICE) == ["a", "a", "a", "a", "b"]
    assert xmpp.errors == []


async def test_sip_to_xmpp_order_kept_through_the_store(store: MemoryStore) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    router = _router(store, ScriptedSip(), xmpp, clock)
    first = SipText(ALICE, "sip:bob*xmpp.test@jabber.sip.test", "first")
    second = SipText(ALICE, "sip:bob*xmpp.test@jabber.sip.test", "second")
    xmpp.connected = False
    assert (await router.answer_later(first)).status == 202
    xmpp.connected = True
    # the link is back, but "first" still waits in the store: "second" goes behind it
    assert router.answer_now(second) is None
    assert (await router.answer_later(second)).status == 202
    assert xmpp.sent == []
    await router.retry_due()
    assert [m.body for m in xmpp.sent] == ["first", "second"]
    assert all(m.delay_stamp for m in xmpp.sent)
    third = SipText(ALICE, "sip:bob*xmpp.test@jabber.sip.test", "third")
    assert router.answer_now(third) is not None  # nothing waits any more: the hot path


# --- item 4: the durable queue's rules --------------------------------------------------------


async def test_per_recipient_cap_refuses_with_a_clear_error(store: MemoryStore) -> None:
    xmpp = FakeXmpp()
    sip = ScriptedSip({body: [480] for body in "abcde"})
    router = _router(store, sip, xmpp, Clock(), per_recipient=3)
    await _burst(router, _from_bob("alice@sip.xmpp.test", *"abcde"))
    assert len(await store.messages_for_recipient(ALICE)) == 3
    assert [(e.condition, e.id) for e in xmpp.errors] == [
        ("resource-constraint", "id-d"),
        ("resource-constraint", "id-e"),
    ]
    text = xmpp.errors[0].text or ""
    assert "alice@sip.test" in text and "3 messages" in text
    assert router.counters["refused"] == 2


async def test_404_after_a_delivered_message_is_retried_not_final(store: MemoryStore) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    sip = ScriptedSip({"later": [404]})
    router = _router(store, sip, xmpp, clock)
    await _burst(router, _from_bob("alice@sip.xmpp.test", "first", "later"))
    assert xmpp.errors == []
    [waiting] = await store.messages_for_recipient(ALICE)
    assert waiting.body == "later"
    seen = await store.seen_user(ALICE)
    assert seen is not None and not seen.online  # seen, yet not taken for registered
    clock.now += 10
    await router.retry_due()
    assert sip.bodies_to(ALICE) == ["first", "later", "later"]
    assert await store.messages_for_recipient(ALICE) == []


async def test_404_for_a_user_never_seen_is_final(store: MemoryStore) -> None:
    xmpp = FakeXmpp()
    router = _router(store, ScriptedSip({"x": [404]}), xmpp, Clock())
    await _burst(router, _from_bob("alice@sip.xmpp.test", "x"))
    assert [e.condition for e in xmpp.errors] == ["item-not-found"]
    assert await store.user_seen_before(ALICE) is False


async def test_expiry_tells_the_xmpp_sender_why(store: MemoryStore) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    router = _router(store, ScriptedSip({"x": [480] * 10}), xmpp, clock)
    await _burst(router, _from_bob("alice@sip.xmpp.test", "x"))
    clock.now += 91
    await router.retry_due()
    [err] = xmpp.errors
    assert (err.condition, err.id) == ("recipient-unavailable", "id-x")
    assert "alice@sip.test" in (err.text or "") and "90 s" in (err.text or "")


async def test_drain_stores_what_still_waits(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), ScriptedSip()
    sip.gate = asyncio.Event()
    # The per-recipient cap is for new messages: what was taken in is stored whatever it says.
    router = _router(store, sip, xmpp, Clock(), max_inflight=1, per_recipient=1)
    first = asyncio.ensure_future(router.on_xmpp_message(_from_bob("alice@sip.xmpp.test", "a")[0]))
    await asyncio.sleep(0)  # "a" takes its place in line, and the one slot
    for msg in _from_bob("alice@sip.xmpp.test", "b", "c"):
        await router.on_xmpp_message(msg)  # waits behind "a": returns at once
    await router.drain(0.01)  # "a" has no answer: stored first (at-least-once), then b and c
    assert [m.body for m in await store.messages_for_recipient(ALICE)] == ["a", "b", "c"]
    sip.gate.set()
    await asyncio.wait_for(first, timeout=30)
    assert sip.bodies_to(ALICE) == ["a"]  # nothing more went: b and c wait for the next start
    assert xmpp.errors == [] and router.counters["queued"] == 3


async def test_drain_lets_what_is_in_flight_finish_first(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), ScriptedSip({"a": [480]})
    sip.gate = asyncio.Event()
    router = _router(store, sip, xmpp, Clock(), max_inflight=2)
    tasks = [
        asyncio.ensure_future(router.on_xmpp_message(m))
        for m in _from_bob("alice@sip.xmpp.test", *"abc")
        + _from_bob("carol@sip.xmpp.test", "x", "y")
    ]
    for _ in range(5):
        await asyncio.sleep(0)
    drained = asyncio.ensure_future(router.drain(30))
    await asyncio.sleep(0)
    sip.gate.set()  # a (480: stored) and x (200) answer; nothing new starts
    await asyncio.wait_for(drained, timeout=30)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert sip.bodies_to(ALICE) == ["a"] and sip.bodies_to("sip:carol@sip.test") == ["x"]
    # each conversation's order holds in the store: a (answered 480) before b and c
    stored = await store.messages_for_recipient(ALICE)
    assert [(m.body, m.extra["reason"]) for m in stored] == [
        ("a", "SIP 480"),
        ("b", "gateway stopping"),
        ("c", "gateway stopping"),
    ]
    assert [m.body for m in await store.messages_for_recipient("sip:carol@sip.test")] == ["y"]


async def test_after_a_restart_what_the_last_run_stored_goes_first(store: MemoryStore) -> None:
    xmpp, sip, clock = FakeXmpp(), ScriptedSip(), Clock()
    sip.gate = asyncio.Event()
    before = _router(store, sip, xmpp, clock, max_inflight=1)
    first = asyncio.ensure_future(before.on_xmpp_message(_from_bob("alice@sip.xmpp.test", "a")[0]))
    await asyncio.sleep(0)
    for msg in _from_bob("alice@sip.xmpp.test", "b", "c"):
        await before.on_xmpp_message(msg)
    sip.gate.set()
    await before.drain(5)  # a answered; b and c stored for the next run
    await asyncio.wait_for(first, timeout=30)
    # The same store, a new process, whose cap b and c fill: d is refused (the cap), and e,
    # refused too, does not overtake them either.
    after = _router(store, sip, xmpp, clock, per_recipient=2)
    await after.resume()
    await _burst(after, _from_bob("alice@sip.xmpp.test", "d", "e"))
    assert [(e.condition, e.id) for e in xmpp.errors] == [
        ("resource-constraint", "id-d"),
        ("resource-constraint", "id-e"),
    ]
    assert sip.bodies_to(ALICE) == ["a"]
    clock.now += 10
    await after.retry_due()
    await after.settle(5)
    assert sip.bodies_to(ALICE) == list("abc")
    # and once the store is empty, the conversation goes straight through again
    await _burst(after, _from_bob("alice@sip.xmpp.test", "g"))
    assert sip.bodies_to(ALICE)[-1] == "g" and await store.messages_for_recipient(ALICE) == []


async def test_after_a_restart_sip_to_xmpp_waits_behind_what_the_last_run_stored(
    store: MemoryStore,
) -> None:
    xmpp, clock = FakeXmpp(), Clock()
    bob = "sip:bob*xmpp.test@jabber.sip.test"
    before = _router(store, ScriptedSip(), xmpp, clock)
    xmpp.connected = False
    for body in ("a", "b"):
        assert (await before.answer_later(SipText(ALICE, bob, body))).status == 202
    # A new process with the link up at once: "c" must not overtake a and b.
    xmpp.connected = True
    after = _router(store, ScriptedSip(), xmpp, clock)
    await after.resume()
    c = SipText(ALICE, bob, "c")
    assert after.answer_now(c) is None  # not the hot path: the store is asked first
    assert (await after.answer_later(c)).status == 202
    assert xmpp.sent == []
    await after.retry_due()
    assert [m.body for m in xmpp.sent] == ["a", "b", "c"]
    # nothing waits now: the hot path again; another conversation is asked once
    assert after.answer_now(SipText(ALICE, bob, "d")) is not None
    e = SipText("sip:carol@sip.test", bob, "e")
    assert after.answer_now(e) is None
    assert (await after.answer_later(e)).status == 202
    assert after.answer_now(SipText("sip:carol@sip.test", bob, "f")) is not None
    assert [m.body for m in xmpp.sent] == list("abcdef")


async def test_a_fresh_start_keeps_the_hot_path(store: MemoryStore) -> None:
    xmpp = FakeXmpp()
    router = _router(store, ScriptedSip(), xmpp, Clock())
    await router.resume()  # nothing waits in the store: no conversation is asked
    assert router.answer_now(SipText(ALICE, "sip:bob*xmpp.test@jabber.sip.test", "x")) is not None


async def test_after_sigterm_new_messages_are_refused_and_counted(store: MemoryStore) -> None:
    xmpp, sip = FakeXmpp(), ScriptedSip()
    router = _router(store, sip, xmpp, Clock())
    router.stop_accepting()
    await router.on_xmpp_message(_from_bob("alice@sip.xmpp.test", "late")[0])
    assert [(e.condition, e.type, e.id) for e in xmpp.errors] == [
        ("resource-constraint", "wait", "id-late")
    ]
    assert "stopping" in (xmpp.errors[0].text or "")
    assert sip.sent == [] and router.counters["refused"] == 1


async def test_read_after_the_stream_end_went_out_a_message_is_kept_not_lost(
    store: MemoryStore,
) -> None:
    """DESIGN 8: the server wrote it before our ``</stream:stream>`` reached it and counts it
    delivered; no error can go any more, so it waits in the store for the next start."""
    xmpp, sip = FakeXmpp(), ScriptedSip()
    router = _router(store, sip, xmpp, Clock())
    router.stop_accepting()
    xmpp.connected = False  # the link writes nothing after the stream's end
    await router.on_xmpp_message(_from_bob("alice@sip.xmpp.test", "in the socket")[0])
    [kept] = await store.messages_for_recipient(ALICE)
    assert kept.body == "in the socket" and router.counters["refused"] == 0
    assert sip.sent == []


async def test_a_user_shown_online_is_seen_so_a_later_404_is_retried(store: MemoryStore) -> None:
    # DESIGN 4.2: the presence server's NOTIFY (or a PUBLISH) tells messaging the user is online.
    xmpp, clock = FakeXmpp(), Clock()
    sip = ScriptedSip({"x": [404]})
    router = _router(store, sip, xmpp, clock)
    router.user_online(ALICE)
    await router.settle(5)
    seen = await store.seen_user(ALICE)
    assert seen is not None and not seen.online  # seen, yet not taken for registered
    await _burst(router, _from_bob("alice@sip.xmpp.test", "x"))
    assert xmpp.errors == []
    [waiting] = await store.messages_for_recipient(ALICE)
    assert waiting.body == "x"


def test_bench_counts_per_conversation_inversions() -> None:
    from bench.message_table import inversions

    # conversations 0 and 1 (seq % 2): 4 overtook 2 in conversation 0; 1, 3, 5 are in order
    assert inversions([0, 1, 4, 3, 2, 5], 2) == 1
    assert inversions(list(range(10)), 3) == 0
