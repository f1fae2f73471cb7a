"""The admin commands (DESIGN 9): the core with fakes on the in-memory store, the retry queue's
operator actions, and the XEP-0050 stanzas of the XMPP adapter."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from component.addresses import parse_jid
from component.admin.commands import ANNOUNCE, DROPPED, QUEUE, STATS, USER, AdminDesk
from component.admin.model import Ask, Done, Form, GatewayStats, TransportInfo
from component.errors import Refusal
from component.messaging.router import MessageRouter
from component.ports import Outcome, Way
from component.store import (
    MembershipState,
    MessageDirection,
    NewMessage,
    StorePort,
    StoreUnavailable,
    SubscriptionState,
    XmppWatcherSubscription,
    upgrade,
)
from component.store.memory import MemoryStore
from component.store.records import RoomMembership, SipWatcherSubscription
from component.store.store import Store
from component.values import ChatMessage, SipText
from component.xmpp.adhoc import NS_COMMANDS, NS_DATA, SESSION_LIFE, AdhocCommands
from component.xmpp.iq import NS_DISCO_INFO, NS_DISCO_ITEMS
from component.xmpp.stanzas import Rejected
from tests.test_messaging import BOOK, Clock, FakeCommands, FakeSip, FakeXmpp, _answer

ADMIN = "boss@xmpp.test"
ALICE = "sip:alice@sip.test"
T0 = 1_700_000_000.0


class FakeStats:
    def __init__(self, stats: GatewayStats) -> None:
        self.stats = stats

    async def snapshot(self) -> GatewayStats:
        return self.stats


class FakeQueue:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def retry_now(self, message_id: int) -> bool:
        self.calls.append(("retry", message_id))
        return message_id != 404

    async def drop(self, message_id: int, reason: str) -> bool:
        self.calls.append(("drop", message_id))
        return True


class FakeNotices:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def notice(self, aor: str, text: str) -> None:
        self.sent.append((aor, text))


def _desk(
    store: StorePort,
    stats: GatewayStats | None = None,
    queue: FakeQueue | None = None,
    notices: FakeNotices | None = None,
) -> AdminDesk:
    return AdminDesk(
        [ADMIN],
        book=BOOK,
        stats=FakeStats(stats or GatewayStats(now=T0)),
        store=store,
        queue=queue or FakeQueue(),
        notices=notices or FakeNotices(),
        clock=lambda: T0 + 100,
    )


def _values(form: Form) -> dict[str | None, tuple[str, ...]]:
    return {field.var: field.values for field in form.fields}


async def _enqueue(store: StorePort, sender: str, recipient: str, created: float) -> int:
    direction = (
        MessageDirection.SIP_TO_XMPP if sender.startswith("sip:") else MessageDirection.XMPP_TO_SIP
    )
    queued = await store.enqueue_message(
        NewMessage(direction, sender, recipient, "hi", "text/plain", created, created + 90, created)
    )
    return queued.id


# --- the core -----------------------------------------------------------------------------------


async def test_only_admins_may_run_the_commands(memory_store: MemoryStore) -> None:
    desk = _desk(memory_store)
    assert desk.allowed(f"{ADMIN}/laptop") and desk.allowed("Boss@xmpp.test")
    assert not desk.allowed("mallory@xmpp.test/boss@xmpp.test")
    for node in (STATS, USER, QUEUE, ANNOUNCE):
        with pytest.raises(Refusal) as refused:
            await desk.start(node, "mallory@xmpp.test/x")
        assert refused.value.xmpp_condition == "forbidden"
    with pytest.raises(Refusal) as refused:
        await desk.submit(ANNOUNCE, "mallory@xmpp.test/x", {"body": ["pwned"]})
    assert refused.value.xmpp_condition == "forbidden"


async def test_statistics_show_each_figure(memory_store: MemoryStore) -> None:
    stats = GatewayStats(
        now=T0 + 3725,
        messages={(Way.TO_XMPP, Outcome.DELIVERED): 7, (Way.TO_SIP, Outcome.QUEUED): 2},
        xmpp_errors={"service-unavailable": 3},
        queue_depth=4,
        queue_oldest_age=65.0,
        sip_watchers=5,
        xmpp_watchers=6,
        rooms=2,
        occupants=3,
        transports=(TransportInfo("irc.xmpp.test", "down", T0, "remote-server-timeout"),),
        link_state="up",
        link_up_since=T0,
        link_reconnects=1,
    )
    step = await _desk(memory_store, stats).start(STATS, ADMIN)
    assert isinstance(step, Done) and step.form is not None and step.form.result
    values = _values(step.form)
    assert values["messages_sip_to_xmpp"] == ("delivered 7, queued 0, failed 0, refused 0",)
    assert values["messages_xmpp_to_sip"] == ("delivered 0, queued 2, failed 0, refused 0",)
    assert values["xmpp_errors"] == ("service-unavailable 3",)
    assert values["queue"] == ("4 waiting, oldest 1 min 5 s",)
    assert values["subscriptions"] == ("SIP -> XMPP 5, XMPP -> SIP 6",)
    assert values["rooms"] == ("2 rooms, 3 SIP users seated",)
    [transport] = values["transports"]
    assert transport.startswith("irc.xmpp.test down since 2023-11-14")
    assert transport.endswith("(remote-server-timeout)")
    assert values["xmpp_link"] == ("up for 1 h 2 min, 1 reconnects",)


async def test_one_users_subscriptions_rooms_and_queue(memory_store: MemoryStore) -> None:
    store = memory_store
    await store.mark_user_seen(ALICE, T0)
    await store.save_sip_watcher_subscription(
        SipWatcherSubscription("d1", ALICE, "bob@xmpp.test", SubscriptionState.ACTIVE, {}, T0 + 60)
    )
    await store.save_sip_watcher_subscription(
        SipWatcherSubscription(
            "d2", "sip:carol@sip.test", "bob@xmpp.test", SubscriptionState.ACTIVE, {}, T0
        )
    )
    await store.save_xmpp_watcher_subscription(
        XmppWatcherSubscription("dave@xmpp.test", ALICE, SubscriptionState.PENDING)
    )
    await store.save_membership(
        RoomMembership(ALICE, "room@conference.xmpp.test", "alice", MembershipState.JOINED)
    )
    first = await _enqueue(store, "bob@xmpp.test/pc", ALICE, T0)
    await _enqueue(store, "bob@xmpp.test/pc", "sip:carol@sip.test", T0)
    desk = _desk(store)
    ask = await desk.start(USER, ADMIN)
    assert isinstance(ask, Ask)
    assert [f.var for f in ask.form.fields] == ["address"] and ask.form.fields[0].required
    done = await desk.submit(USER, ADMIN, {"address": ["alice@sip.test"]})
    assert isinstance(done, Done) and done.form is not None
    values = _values(done.form)
    assert values["address"] == (ALICE,)
    assert values["jid"] == ("alice@sip.xmpp.test",)
    assert values["state"] == ("online",)
    assert values["watching"] == ("bob@xmpp.test (active)",)
    assert values["watched_by"] == ("dave@xmpp.test (pending)",)
    assert values["rooms"] == ("room@conference.xmpp.test as alice (joined)",)
    [queued] = values["queued"]
    assert queued.startswith(f"#{first} 1 min 40 s old: bob@xmpp.test/pc -> {ALICE}")


@pytest.mark.parametrize("address", ["", "bob*xmpp.test@jabber.sip.test", "sip:x@elsewhere.test"])
async def test_user_command_refuses_what_is_no_home_user(
    memory_store: MemoryStore, address: str
) -> None:
    with pytest.raises(Refusal) as refused:
        await _desk(memory_store).submit(USER, ADMIN, {"address": [address]})
    assert refused.value.xmpp_condition in ("jid-malformed", "forbidden")


async def test_queue_lists_oldest_first_and_acts_on_one(memory_store: MemoryStore) -> None:
    queue = FakeQueue()
    desk = _desk(memory_store, queue=queue)
    empty = await desk.start(QUEUE, ADMIN)
    assert empty == Done(note="The queue is empty.")
    newer = await _enqueue(memory_store, ALICE, "bob@xmpp.test", T0 + 50)
    older = await _enqueue(memory_store, "bob@xmpp.test/pc", ALICE, T0)
    ask = await desk.start(QUEUE, ADMIN)
    assert isinstance(ask, Ask)
    message, action = ask.form.fields
    assert [value for _, value in message.options] == [str(older), str(newer)]
    assert [value for _, value in action.options] == ["retry", "drop"]
    retried = await desk.submit(QUEUE, ADMIN, {"message": [str(older)], "action": ["retry"]})
    dropped = await desk.submit(QUEUE, ADMIN, {"message": [str(newer)], "action": ["drop"]})
    gone = await desk.submit(QUEUE, ADMIN, {"message": ["404"], "action": ["retry"]})
    assert queue.calls == [("retry", older), ("drop", newer), ("retry", 404)]
    assert isinstance(retried, Done) and retried.note == f"Message {older} retried."
    assert isinstance(dropped, Done) and "dropped" in (dropped.note or "")
    assert isinstance(gone, Done) and "waits no more" in (gone.note or "")
    for bad in ({"message": ["x"], "action": ["drop"]}, {"message": ["1"], "action": ["burn"]}):
        with pytest.raises(Refusal):
            await desk.submit(QUEUE, ADMIN, bad)


async def test_announcement_goes_to_every_user_online(memory_store: MemoryStore) -> None:
    notices = FakeNotices()
    await memory_store.mark_user_seen(ALICE, T0)
    await memory_store.mark_user_seen("sip:carol@sip.test", T0)
    await memory_store.mark_user_seen("sip:dave@sip.test", T0)
    await memory_store.set_user_offline("sip:dave@sip.test")
    desk = _desk(memory_store, notices=notices)
    assert isinstance(await desk.start(ANNOUNCE, ADMIN), Ask)
    done = await desk.submit(ANNOUNCE, ADMIN, {"body": ["Maintenance at 22:00.", "Sorry."]})
    assert done == Done(note="Announcement sent to 2 SIP users online.")
    assert sorted(notices.sent) == [
        (ALICE, "Maintenance at 22:00.\nSorry."),
        ("sip:carol@sip.test", "Maintenance at 22:00.\nSorry."),
    ]
    with pytest.raises(Refusal):
        await desk.submit(ANNOUNCE, ADMIN, {"body": ["  "]})


# --- the retry queue's operator actions ---------------------------------------------------------


def _router(store: MemoryStore, sip: FakeSip, xmpp: FakeXmpp, clock: Clock) -> MessageRouter:
    return MessageRouter(BOOK, xmpp, sip, store, FakeCommands(), clock=clock, delay_time=90.0)


async def test_drop_tells_the_sender_and_frees_the_conversation(memory_store: MemoryStore) -> None:
    xmpp, sip, clock = FakeXmpp(), FakeSip(), Clock()
    xmpp.connected = False
    router = _router(memory_store, sip, xmpp, clock)
    to_bob = SipText(ALICE, "sip:bob*xmpp.test@jabber.sip.test", "one")
    assert (await _answer(router, to_bob)).status == 202
    [stored] = await memory_store.waiting_messages()
    assert router.queue.holds((ALICE, "bob@xmpp.test"))
    assert await router.queue.drop(stored.id, DROPPED)
    assert not router.queue.holds((ALICE, "bob@xmpp.test"))
    assert await memory_store.waiting_messages() == []
    [(sender, to, text, _)] = sip.sent
    assert (sender, to) == (BOOK.registrar, ALICE)
    assert text == f"Your message to bob@xmpp.test was not delivered: {DROPPED}."
    assert not await router.queue.drop(stored.id, DROPPED)  # it waits no more
    # An XMPP sender gets an error stanza instead.
    sip.statuses = [480]
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/pc", "alice@sip.xmpp.test", "hi", id="m1")
    )
    [queued] = await memory_store.waiting_messages()  # 480: out of reach, stored
    assert xmpp.errors == []
    assert await router.queue.drop(queued.id, DROPPED)
    [error] = xmpp.errors
    assert error.condition == "recipient-unavailable" and DROPPED in (error.text or "")


async def test_retry_now_delivers_at_once(memory_store: MemoryStore) -> None:
    xmpp, sip, clock = FakeXmpp(), FakeSip(), Clock()
    xmpp.connected = False
    router = _router(memory_store, sip, xmpp, clock)
    await _answer(router, SipText(ALICE, "sip:bob*xmpp.test@jabber.sip.test", "late"))
    [stored] = await memory_store.waiting_messages()
    xmpp.connected = True
    await memory_store.reschedule(stored.id, clock.now + 60)  # not due for a minute
    assert await router.queue.retry_now(stored.id)
    assert [m.body for m in xmpp.sent] == ["late"]
    assert await memory_store.waiting_messages() == []
    assert not await router.queue.retry_now(stored.id)


async def test_waiting_messages_oldest_first_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    upgrade(url)
    for store in (await Store.open(url), MemoryStore()):
        try:
            late = await _enqueue(store, ALICE, "bob@xmpp.test", T0 + 5)
            early = await _enqueue(store, "bob@xmpp.test/pc", ALICE, T0)
            done = await _enqueue(store, ALICE, "carol@xmpp.test", T0 - 5)
            await store.mark_delivered(done, T0)
            assert [m.id for m in await store.waiting_messages()] == [early, late]
            assert [m.id for m in await store.waiting_messages(1)] == [early]
        finally:
            await store.close()


# --- XEP-0050 on the component domain -----------------------------------------------------------


class Written:
    def __init__(self) -> None:
        self.stanzas: list[ET.Element] = []

    def __call__(self, text: str) -> bool:
        self.stanzas.append(ET.fromstring(text))
        return True


def _iq(type_: str, payload: str, sender: str = f"{ADMIN}/pc", iq_id: str = "q1") -> ET.Element:
    return ET.fromstring(
        f'<iq xmlns="jabber:component:accept" type="{type_}" id="{iq_id}" from="{sender}"'
        f' to="sip.xmpp.test">{payload}</iq>'
    )


async def _take(adhoc: AdhocCommands, iq: ET.Element, written: Written) -> ET.Element:
    before = len(written.stanzas)
    assert adhoc.take(iq, iq.get("type"), iq.get("from", ""), parse_jid("sip.xmpp.test"), written)
    await adhoc.drain(5.0)
    assert len(written.stanzas) == before + 1
    return written.stanzas[-1]


def _adhoc(store: MemoryStore, notices: FakeNotices | None = None) -> AdhocCommands:
    return AdhocCommands(_desk(store, notices=notices))


def _command(reply: ET.Element) -> ET.Element:
    command = reply.find(f"{{{NS_COMMANDS}}}command")
    assert command is not None, ET.tostring(reply)
    return command


async def test_commands_are_listed_for_admins_only(memory_store: MemoryStore) -> None:
    adhoc, written = _adhoc(memory_store), Written()
    items = f'<query xmlns="{NS_DISCO_ITEMS}" node="{NS_COMMANDS}"/>'
    listed = await _take(adhoc, _iq("get", items), written)
    nodes = [i.get("node") for i in listed.iter(f"{{{NS_DISCO_ITEMS}}}item")]
    assert nodes == [STATS, USER, QUEUE, ANNOUNCE]
    hidden = await _take(adhoc, _iq("get", items, sender="eve@xmpp.test/pc"), written)
    assert hidden.get("type") == "result"
    assert list(hidden.iter(f"{{{NS_DISCO_ITEMS}}}item")) == []
    info = await _take(
        adhoc, _iq("get", f'<query xmlns="{NS_DISCO_INFO}" node="{STATS}"/>'), written
    )
    identity = info.find(f".//{{{NS_DISCO_INFO}}}identity")
    assert identity is not None and identity.get("type") == "command-node"
    # Other iqs, and iqs to a user's JID, are not the commands'.
    plain = _iq("get", f'<query xmlns="{NS_DISCO_ITEMS}"/>')
    assert not adhoc.take(plain, "get", ADMIN, parse_jid("sip.xmpp.test"), written)
    assert not adhoc.take(
        _iq("get", items), "get", ADMIN, parse_jid("alice@sip.xmpp.test"), written
    )


async def test_a_stranger_is_forbidden(memory_store: MemoryStore) -> None:
    adhoc, written = _adhoc(memory_store), Written()
    execute = _iq("set", f'<command xmlns="{NS_COMMANDS}" node="{STATS}" action="execute"/>')
    for iq in (execute, _iq("get", f'<query xmlns="{NS_DISCO_INFO}" node="{STATS}"/>')):
        with pytest.raises(Rejected) as refused:
            adhoc.take(iq, iq.get("type"), "eve@xmpp.test/pc", parse_jid("sip.xmpp.test"), written)
        assert refused.value.xmpp_condition == "forbidden"
    assert written.stanzas == []


async def test_statistics_in_one_step(memory_store: MemoryStore) -> None:
    adhoc, written = _adhoc(memory_store), Written()
    reply = await _take(
        adhoc,
        _iq("set", f'<command xmlns="{NS_COMMANDS}" node="{STATS}" action="execute"/>'),
        written,
    )
    assert (reply.get("type"), reply.get("id"), reply.get("to")) == ("result", "q1", f"{ADMIN}/pc")
    command = _command(reply)
    assert command.get("status") == "completed"
    form = command.find(f"{{{NS_DATA}}}x")
    assert form is not None and form.get("type") == "result"
    assert "messages_sip_to_xmpp" in [f.get("var") for f in form.iter(f"{{{NS_DATA}}}field")]


async def test_announcement_form_then_submit(memory_store: MemoryStore) -> None:
    notices = FakeNotices()
    await memory_store.mark_user_seen(ALICE, T0)
    adhoc, written = _adhoc(memory_store, notices), Written()
    first = _command(
        await _take(
            adhoc, _iq("set", f'<command xmlns="{NS_COMMANDS}" node="{ANNOUNCE}"/>'), written
        )
    )
    assert first.get("status") == "executing"
    session = first.get("sessionid")
    assert session and first.find(f"{{{NS_COMMANDS}}}actions") is not None
    [body] = first.iter(f"{{{NS_DATA}}}field")
    assert (body.get("var"), body.get("type")) == ("body", "text-multi")
    submit = (
        f'<command xmlns="{NS_COMMANDS}" node="{ANNOUNCE}" sessionid="{session}"'
        f' action="complete"><x xmlns="{NS_DATA}" type="submit"><field var="body">'
        "<value>Back at 6 &amp; 7</value></field></x></command>"
    )
    done = _command(await _take(adhoc, _iq("set", submit, iq_id="q2"), written))
    assert done.get("status") == "completed"
    note = done.find(f"{{{NS_COMMANDS}}}note")
    assert note is not None and note.text == "Announcement sent to 1 SIP users online."
    assert notices.sent == [(ALICE, "Back at 6 & 7")]
    # The session is over: submitting again is refused, and so is a made-up session.
    for again in (submit, submit.replace(session, "nosuch")):
        reply = await _take(adhoc, _iq("set", again, iq_id="q3"), written)
        assert reply.get("type") == "error"
        assert reply.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}bad-request") is not None


async def test_a_form_is_submitted_to_any_instance_sharing_the_key(
    memory_store: MemoryStore,
) -> None:
    """DESIGN 9: ejabberd hands the submit to any instance; the signed session id holds."""
    now = [T0]
    notices = FakeNotices()
    await memory_store.mark_user_seen(ALICE, T0)

    def instance(key: bytes) -> AdhocCommands:
        return AdhocCommands(_desk(memory_store, notices=notices), key=key, clock=lambda: now[0])

    a, b, stranger, written = (
        instance(b"k" * 32),
        instance(b"k" * 32),
        instance(b"x" * 32),
        Written(),
    )
    start = _iq("set", f'<command xmlns="{NS_COMMANDS}" node="{ANNOUNCE}"/>')

    def submit(session: str | None) -> ET.Element:
        return _iq(
            "set",
            f'<command xmlns="{NS_COMMANDS}" node="{ANNOUNCE}" sessionid="{session}"'
            f' action="complete"><x xmlns="{NS_DATA}" type="submit"><field var="body">'
            "<value>hello</value></field></x></command>",
        )

    session = _command(await _take(a, start, written)).get("sessionid")
    assert (await _take(stranger, submit(session), written)).get("type") == "error"
    done = _command(await _take(b, submit(session), written))
    assert done.get("status") == "completed" and notices.sent == [(ALICE, "hello")]
    assert (await _take(b, submit(session), written)).get("type") == "error"  # ended there
    late = _command(await _take(a, start, written)).get("sessionid")
    now[0] += SESSION_LIFE + 1
    assert (await _take(b, submit(late), written)).get("type") == "error"  # expired
    forged = (late or "").rsplit("-", 1)[0] + "-" + "0" * 32
    now[0] = T0
    assert (await _take(b, submit(forged), written)).get("type") == "error"


async def test_cancel_and_refusals_become_errors(memory_store: MemoryStore) -> None:
    adhoc, written = _adhoc(memory_store), Written()
    first = _command(
        await _take(adhoc, _iq("set", f'<command xmlns="{NS_COMMANDS}" node="{USER}"/>'), written)
    )
    session = first.get("sessionid")
    bad = (
        f'<command xmlns="{NS_COMMANDS}" node="{USER}" sessionid="{session}">'
        f'<x xmlns="{NS_DATA}" type="submit"><field var="address"><value>x@elsewhere.test'
        "</value></field></x></command>"
    )
    refused = await _take(adhoc, _iq("set", bad), written)
    assert refused.get("type") == "error"
    again = _command(
        await _take(adhoc, _iq("set", f'<command xmlns="{NS_COMMANDS}" node="{USER}"/>'), written)
    )
    cancel = (
        f'<command xmlns="{NS_COMMANDS}" node="{USER}" sessionid="{again.get("sessionid")}"'
        ' action="cancel"/>'
    )
    assert _command(await _take(adhoc, _iq("set", cancel), written)).get("status") == "canceled"
    with pytest.raises(Rejected) as unknown:
        iq = _iq("set", f'<command xmlns="{NS_COMMANDS}" node="nosuch"/>')
        adhoc.take(iq, "set", ADMIN, parse_jid("sip.xmpp.test"), written)
    assert unknown.value.xmpp_condition == "item-not-found"


class BrokenStats:
    def __init__(self, error: Exception) -> None:
        self.error = error

    async def snapshot(self) -> GatewayStats:
        raise self.error


@pytest.mark.parametrize(
    ("error", "condition"),
    [
        (StoreUnavailable("database down"), "resource-constraint"),
        (RuntimeError("our bug"), "internal-server-error"),
    ],
)
async def test_a_failing_command_still_gets_an_answer(
    memory_store: MemoryStore, error: Exception, condition: str
) -> None:
    desk = AdminDesk(
        [ADMIN],
        book=BOOK,
        stats=BrokenStats(error),
        store=memory_store,
        queue=FakeQueue(),
        notices=FakeNotices(),
        clock=lambda: T0,
    )
    adhoc, written = AdhocCommands(desk), Written()
    reply = await _take(
        adhoc, _iq("set", f'<command xmlns="{NS_COMMANDS}" node="{STATS}"/>'), written
    )
    assert reply.get("type") == "error"
    assert reply.find(f".//{{urn:ietf:params:xml:ns:xmpp-stanzas}}{condition}") is not None
