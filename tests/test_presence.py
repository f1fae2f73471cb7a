"""Presence (DESIGN 5, 8) through its SIP entry point: the SIP side's dialogs and the presence
core together, with fake transactions and XMPP port, the in-memory store and a fake clock: both
directions of watching, online state, PUBLISH, commands, restart and resume, and the driver."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from component.addresses import AddressBook
from component.errors import Refusal
from component.ports import SipPort
from component.presence.core import HELP_TEXT, PresenceCore
from component.presence.translate import xmpp_for_pidf
from component.runtime.presence_driver import CoreSerial, PresenceDriver
from component.runtime.signal import UserStateSignal
from component.sip.answers import refuse
from component.sip.deadlines import DeadlineHeap
from component.sip.dialog_state import CSEQ_RESERVE
from component.sip.presence_subscriptions import RESTORE_RATE
from component.sip.side import TIMER_BATCH, SipSide
from component.sip.transactions import ClientTransactions, Deliver, RequestSender, Sends
from component.store import (
    ApprovalDirection,
    ApprovalState,
    PresenceRecord,
    RosterApproval,
    StorePort,
)
from component.store.memory import MemoryStore
from component.values import ChatMessage, ImdnAsk, Presence, SipText
from sipside import pidf
from sipside.errors import PeerError, TransportError
from sipside.message import SipRequest, SipResponse, make_response, parse_message
from sipside.peer import Peer
from tests.fakes import UnusedSip

T0 = 1_700_000_000.0
GW_CONTACT = "sip:127.0.0.1:5070"
ALICE_AOR = "sip:alice@sip.test"
ALICE_JID = "alice@sip.xmpp.test"
BOB = "bob@xmpp.test"
BOB_SIP = "sip:bob*xmpp.test@jabber.sip.test"
PHONE = Peer("udp", "127.0.0.1", 5062)
BOOK = AddressBook(
    component="sip.xmpp.test",
    sip_domain="sip.test",
    jdomain="jabber.sip.test",
    registrar="sip:jabber_gateway@sip.test",
)


# --- fakes -----------------------------------------------------------------------------------


@dataclass
class FakeSip:
    """The transactions: records what the SIP side sends, with where its outcome goes."""

    sent: list[tuple[SipRequest, Peer | None, Deliver]] = field(default_factory=list)
    delivers: dict[tuple[str, int], Deliver] = field(default_factory=dict)

    def send(self, request: SipRequest, peer: Peer | None, deliver: Deliver) -> None:
        self.sent.append((request, peer, deliver))
        self.delivers[(request.call_id, request.cseq[0])] = deliver

    def contact_for(self, transport: str) -> str:
        return GW_CONTACT

    def take(self) -> list[tuple[SipRequest, Peer | None, Deliver]]:
        sent, self.sent = self.sent, []
        return sent

    def deliver_for(self, request: SipRequest) -> Deliver:
        return self.delivers[(request.call_id, request.cseq[0])]


@dataclass
class FakeOnline:
    """The ``UserOnline`` port: records who came online."""

    aors: list[str] = field(default_factory=list)

    def user_online(self, aor: str) -> None:
        self.aors.append(aor)


async def respond(deliver: Deliver, response: SipResponse | None, now: float) -> None:
    """The outcome of a request the SIP side sent (None: no final response)."""
    await deliver(response, now)


@dataclass
class FakeXmpp:
    connected: bool = True
    sent: list[Presence] = field(default_factory=list)

    def send_presence(self, presence: Presence) -> bool:
        if self.connected:
            self.sent.append(presence)
        return self.connected

    def take(self) -> list[Presence]:
        sent, self.sent = self.sent, []
        return sent

    def send_message(self, msg: ChatMessage) -> bool:
        raise AssertionError(f"presence sent a chat message to {msg.recipient}")

    def refuse(self, stanza: ChatMessage | Presence, refusal: Refusal) -> bool:
        raise AssertionError(f"presence refused a stanza from {stanza.sender}: {refusal}")


class FakeIncoming:
    """An incoming request as the endpoint hands it over."""

    def __init__(self, request: SipRequest, source: Peer = PHONE) -> None:
        self.request = request
        self.source = source
        self.responses: list[SipResponse] = []
        self.answered = False

    def send(self, response: SipResponse) -> None:
        self.responses.append(response)
        self.answered = True

    def respond(
        self, status: int, reason: str | None = None, *, headers: Iterable[tuple[str, str]] = ()
    ) -> SipResponse:
        response = make_response(self.request, status, reason, headers=headers)
        self.send(response)
        return response

    @property
    def status(self) -> int:
        assert len(self.responses) == 1, self.responses
        return self.responses[0].status


def sip(
    method: str,
    uri: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    *,
    call_id: str = "c1",
    from_: str = f"<{ALICE_AOR}>;tag=ft",
    to: str | None = None,
    cseq: int = 1,
) -> SipRequest:
    """A request as it arrives from a phone, through bytes."""
    lines = [
        f"{method} {uri} SIP/2.0",
        "Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK" + call_id + str(cseq),
        f"From: {from_}",
        f"To: {to or f'<{uri}>'}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        "Max-Forwards: 70",
    ]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(body)}")
    message = parse_message(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    assert isinstance(message, SipRequest)
    return message


def answer(
    request: SipRequest, status: int, headers: Sequence[tuple[str, str]] = ()
) -> SipResponse:
    with_via = request.add_header("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx", first=True)
    response = parse_message(bytes(make_response(with_via, status, to_tag="ps", headers=headers)))
    assert isinstance(response, SipResponse)
    return response


def pidf_body(basic: str = "open", note: str | None = None, activity: str | None = None) -> bytes:
    doc = pidf.PresenceDocument(
        ALICE_AOR,
        (pidf.PresenceTuple("t1", pidf.Basic(basic), ALICE_AOR),),
        (
            pidf.Person(
                "p1",
                (pidf.Activity(activity),) if activity else (),
                notes=(pidf.Note(note),) if note else (),
            ),
        )
        if activity or note
        else (),
    )
    return pidf.encode(doc)


def state_of(request: SipRequest) -> tuple[str, Presence | None]:
    """Subscription-State of a NOTIFY and its PIDF read back as XMPP show/status."""
    state = request.header("Subscription-State") or ""
    if not request.body:
        return state, None
    doc = pidf.decode(request.body, request.header("Content-Type"))
    xp = xmpp_for_pidf(doc)
    kind = None if xp.available else "unavailable"
    return state, Presence(
        sender=doc.entity, recipient="", type=kind, show=xp.show, status=xp.status
    )


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def store(memory_store: MemoryStore) -> MemoryStore:
    """The core's store port: the in-memory fake (restart tests open a second on its database)."""
    return memory_store


async def through_gate(side: SipSide, incoming: FakeIncoming) -> None:
    """What the SIP gate does with a presence request: refusals become responses."""
    try:
        await side.handle_request(incoming)
    except (Refusal, PeerError) as exc:
        refuse(incoming, exc)


@dataclass
class World:
    core: PresenceCore
    side: SipSide
    sip: FakeSip
    xmpp: FakeXmpp
    store: MemoryStore
    online: list[str]

    async def request(self, incoming: FakeIncoming, now: float) -> None:
        """A request through the SIP side, refusals answered as the gate does."""
        try:
            await self.side.on_request(incoming, now)
        except (Refusal, PeerError) as exc:
            refuse(incoming, exc)


def presence_side(
    store: MemoryStore,
    transactions: Sends,
    xmpp: FakeXmpp,
    online: FakeOnline,
    *,
    driver: CoreSerial | None = None,
    sip_server: bool = True,
    seed: int = 1,
    restore_spread: float = 30.0,
    max_waiting: int = 500,
) -> SipSide:
    """The SIP side with the presence core it builds, as ``app.py`` wires them."""

    def core(port: SipPort) -> PresenceCore:
        return PresenceCore(
            BOOK,
            sip=port,
            xmpp=xmpp,
            store=store,
            user_online=online,
            user_state=UserStateSignal(),
            sip_server=sip_server,
            priority=9,
        )

    return SipSide(
        BOOK,
        driver=driver or CoreSerial(clock=lambda: T0),
        transactions=transactions,
        sender=NoTexts(),
        store=store,
        presence=core,
        max_waiting=max_waiting,
        restore_spread=restore_spread,
        rng=random.Random(seed),
    )


class NoTexts(UnusedSip):
    """The SIP side's MESSAGE sender: presence sends none."""

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
        raise AssertionError(f"presence sent a MESSAGE to {to_uri}")


def build(
    store: MemoryStore, *, sip_server: bool = True, seed: int = 1, restore_spread: float = 30.0
) -> World:
    fake_sip, fake_xmpp, online = FakeSip(), FakeXmpp(), FakeOnline()
    side = presence_side(
        store,
        fake_sip,
        fake_xmpp,
        online,
        sip_server=sip_server,
        seed=seed,
        restore_spread=restore_spread,
    )
    return World(side.presence, side, fake_sip, fake_xmpp, store, online.aors)


@pytest.fixture
def w(store: MemoryStore) -> World:
    return build(store)


# --- 5.2: a SIP user watches an XMPP user --------------------------------------------------------


def subscribe_request(expires: int = 600, call_id: str = "c1") -> SipRequest:
    return sip(
        "SUBSCRIBE",
        BOB_SIP,
        [
            ("Contact", "<sip:alice@127.0.0.1:5062>"),
            ("Event", "presence"),
            ("Expires", str(expires)),
            ("Accept", "application/pidf+xml"),
        ],
        call_id=call_id,
    )


async def sip_watches(w: World, now: float = T0, call_id: str = "c1") -> FakeIncoming:
    incoming = FakeIncoming(subscribe_request(call_id=call_id))
    await w.request(incoming, now)
    return incoming


async def test_sip_watcher_pending_then_approved_then_presence_then_refused(w: World) -> None:
    incoming = await sip_watches(w)
    assert incoming.status == 202
    [(notify, peer, _)] = w.sip.take()
    assert notify.method == "NOTIFY" and peer == PHONE
    assert notify.uri == "sip:alice@127.0.0.1:5062"
    assert state_of(notify) == ("pending;expires=600", None)
    assert w.xmpp.take() == [Presence(sender=ALICE_JID, recipient=BOB, type="subscribe")]
    approval = await w.store.approval(ALICE_JID, BOB, ApprovalDirection.SIP_WATCHES_XMPP)
    assert approval is not None and approval.state is ApprovalState.PENDING

    await respond(_reply_for(w, notify), answer(notify, 200), T0)
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribed"), T0 + 1)
    [(active, _, _)] = w.sip.take()
    state, seen = state_of(active)
    assert state.startswith("active") and seen is not None and seen.type == "unavailable"
    assert w.xmpp.take() == [Presence(sender=f"{ALICE_JID}/sip", recipient=BOB, type="probe")]

    # The active NOTIFY is unanswered: a change waits for it (one NOTIFY in flight).
    away = Presence(sender=f"{BOB}/pc", recipient=ALICE_JID, show="away", status="lunch")
    await w.core.on_presence(away, T0 + 2)
    assert w.sip.take() == []
    await respond(_reply_for(w, active), answer(active, 200), T0 + 2)
    [(changed, _, _)] = w.sip.take()
    _, seen = state_of(changed)
    assert seen is not None and (seen.type, seen.show, seen.status) == (None, "away", "lunch")

    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="unsubscribed"), T0 + 3)
    [(ended, _, _)] = w.sip.take()
    assert ended.header("Subscription-State") == "terminated;reason=rejected"
    assert await w.store.sip_watcher_subscriptions() == []
    assert w.side.counts()["sip_watchers"] == 0


def _reply_for(w: World, request: SipRequest) -> Deliver:
    return w.sip.deliver_for(request)


async def test_sip_watcher_already_approved_gets_active_notify_with_last_presence(w: World) -> None:
    await w.store.save_approval(
        RosterApproval(
            ALICE_JID, BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
        )
    )
    await w.store.save_presence(
        PresenceRecord(BOB, "pc", True, show="dnd", status="busy", priority=0, updated_at=T0)
    )
    incoming = await sip_watches(w)
    assert incoming.status == 202
    [(notify, _, _)] = w.sip.take()
    state, seen = state_of(notify)
    assert state.startswith("active")
    assert seen is not None and (seen.show, seen.status) == ("dnd", "busy")
    assert w.xmpp.take() == [Presence(sender=f"{ALICE_JID}/sip", recipient=BOB, type="probe")]


async def test_presence_change_notifies_one_tuple_per_resource(w: World) -> None:
    await w.store.save_approval(
        RosterApproval(
            ALICE_JID, BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
        )
    )
    await sip_watches(w)
    [(first, _, _)] = w.sip.take()
    await respond(_reply_for(w, first), answer(first, 200), T0)
    for n, resource in enumerate(("pc", "phone")):
        p = Presence(sender=f"{BOB}/{resource}", recipient=ALICE_JID, priority=5 - n)
        await w.core.on_presence(p, T0 + n)
        [(notify, _, _)] = w.sip.take()
        await respond(_reply_for(w, notify), answer(notify, 200), T0 + n)
    doc = pidf.decode(notify.body, notify.header("Content-Type"))
    assert len(doc.tuples) == 2 and all(t.basic is pidf.Basic.OPEN for t in doc.tuples)
    assert notify.header("Content-Type") == "application/pidf+xml"
    assert [r.resource for r in await w.store.presence_of(BOB)] == ["pc", "phone"]


@pytest.mark.parametrize(
    ("expires", "status", "state"),
    [
        (0, 200, "terminated;reason=timeout"),
        (900, 200, "active;expires=900"),
    ],
)
async def test_in_dialog_subscribe_refreshes_or_ends(
    w: World, expires: int, status: int, state: str
) -> None:
    await w.store.save_approval(
        RosterApproval(
            ALICE_JID, BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
        )
    )
    first = await sip_watches(w)
    [(notify, _, _)] = w.sip.take()
    await respond(_reply_for(w, notify), answer(notify, 200), T0)
    w.xmpp.take()
    tag = first.responses[0].to_tag
    refresh = sip(
        "SUBSCRIBE",
        "sip:alice@127.0.0.1:5070",
        [
            ("Contact", "<sip:alice@127.0.0.1:5062>"),
            ("Event", "presence"),
            ("Expires", str(expires)),
        ],
        to=f"<{BOB_SIP}>;tag={tag}",
        cseq=2,
    )
    incoming = FakeIncoming(refresh)
    await w.request(incoming, T0 + 10)
    assert incoming.status == status
    [(again, _, _)] = w.sip.take()
    assert again.header("Subscription-State") == state
    stored = await w.store.sip_watcher_subscriptions()
    if expires == 0:
        assert stored == []
        assert w.xmpp.take() == [Presence(sender=ALICE_JID, recipient=BOB, type="unsubscribe")]
    else:
        assert [s.expires_at for s in stored] == [T0 + 10 + expires]
        assert w.xmpp.take() == []


@pytest.mark.parametrize(
    ("uri", "headers", "status"),
    [
        (BOB_SIP, [("Event", "dialog")], 489),
        (BOB_SIP, [], 489),
        ("sip:carol@sip.test", [("Event", "presence")], 404),
        ("sip:bob@elsewhere.org", [("Event", "presence")], 403),
        ("sip:alice@127.0.0.1:5070", [("Event", "presence")], 403),
    ],
)
async def test_subscribe_refusals(
    w: World, uri: str, headers: list[tuple[str, str]], status: int
) -> None:
    request = sip("SUBSCRIBE", uri, [("Contact", "<sip:alice@127.0.0.1:5062>"), *headers])
    incoming = FakeIncoming(request)
    await w.request(incoming, T0)
    assert incoming.status == status
    assert w.sip.take() == [] and w.xmpp.take() == []


async def test_unknown_dialog_gets_481(w: World) -> None:
    for method in ("SUBSCRIBE", "NOTIFY"):
        request = sip(method, GW_CONTACT, [("Event", "presence")], to=f"<{BOB_SIP}>;tag=nope")
        incoming = FakeIncoming(request)
        await w.request(incoming, T0)
        assert incoming.status == 481


async def test_sip_watcher_expires_and_notify_follows_record_route(w: World) -> None:
    request = sip(
        "SUBSCRIBE",
        BOB_SIP,
        [
            ("Record-Route", "<sip:127.0.0.1:5060;lr>"),
            ("Contact", "<sip:alice@127.0.0.1:5062>"),
            ("Event", "presence"),
            ("Expires", "120"),
        ],
    )
    await w.request(FakeIncoming(request), T0)
    [(notify, peer, _)] = w.sip.take()
    assert peer == Peer("udp", "127.0.0.1", 5060)
    assert notify.header_values("Route") == ["<sip:127.0.0.1:5060;lr>"]
    assert w.side.next_deadline() == T0 + 120
    await w.side.handle_timer(T0 + 119)
    assert w.sip.take() == []
    await w.side.handle_timer(T0 + 120)
    [(ended, _, _)] = w.sip.take()
    assert ended.header("Subscription-State") == "terminated;reason=timeout"
    assert await w.store.sip_watcher_subscriptions() == []


# --- 5.3: an XMPP user watches a SIP user --------------------------------------------------------


async def xmpp_watches(w: World, now: float = T0) -> SipRequest:
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribe"), now)
    [(subscribe, peer, _)] = w.sip.take()
    assert peer is None  # through the proxy
    return subscribe


def notify_for(subscribe: SipRequest, state: str, body: bytes = b"", cseq: int = 1) -> SipRequest:
    headers = [
        ("Contact", "<sip:ps@127.0.0.1:5060>"),
        ("Event", "presence"),
        ("Subscription-State", state),
    ]
    if body:
        headers.append(("Content-Type", "application/pidf+xml"))
    return sip(
        "NOTIFY",
        GW_CONTACT,
        headers,
        body,
        call_id=subscribe.call_id,
        from_=f"<{ALICE_AOR}>;tag=ps",
        to=f"<{BOB_SIP}>;tag={subscribe.from_tag}",
        cseq=cseq,
    )


async def deliver(w: World, request: SipRequest, now: float) -> int:
    incoming = FakeIncoming(request, Peer("udp", "127.0.0.1", 5060))
    await w.request(incoming, now)
    return incoming.status


async def test_xmpp_watcher_kamailio_flow(w: World) -> None:
    subscribe = await xmpp_watches(w)
    assert subscribe.method == "SUBSCRIBE" and subscribe.uri == ALICE_AOR
    assert (subscribe.header("From") or "").startswith(f"<{BOB_SIP}>")
    assert subscribe.header("Contact") == f"<{GW_CONTACT}>"
    assert w.xmpp.take() == []
    # Kamailio answers 200, then a NOTIFY without body before anything is published.
    await _accepted(w, subscribe, 200)
    assert await deliver(w, notify_for(subscribe, "active;expires=3600"), T0 + 1) == 200
    assert w.xmpp.take() == [
        Presence(sender=ALICE_JID, recipient=BOB, type="subscribed"),
        Presence(sender=f"{ALICE_JID}/sip", recipient=BOB, type="unavailable", priority=9),
    ]
    assert w.online == []  # unavailable: nothing to tell messaging
    body = pidf_body("open", "in a meeting", "meeting")
    assert await deliver(w, notify_for(subscribe, "active;expires=3500", body, 2), T0 + 2) == 200
    # DESIGN 4.2: shown online by the presence server, so seen (a later 404 means offline).
    assert w.online == [ALICE_AOR]
    [presence] = w.xmpp.take()
    assert (presence.type, presence.show, presence.status, presence.priority) == (
        None,
        "dnd",
        "in a meeting",
        9,
    )
    # A probe is answered from the last known state.
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="probe"), T0 + 3)
    assert [(p.show, p.status) for p in w.xmpp.take()] == [("dnd", "in a meeting")]
    [stored] = await w.store.xmpp_watcher_subscriptions()
    assert stored.state.value == "active" and stored.dialog is not None

    # Unsubscribe from XMPP: SUBSCRIBE Expires 0 in the dialog, straight to the notifier.
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="unsubscribe"), T0 + 4)
    [(unsub, peer, _)] = w.sip.take()
    assert unsub.header("Expires") == "0" and peer == Peer("udp", "127.0.0.1", 5060)
    final = notify_for(subscribe, "terminated;reason=timeout", cseq=3)
    assert await deliver(w, final, T0 + 5) == 200
    assert w.xmpp.take() == []
    assert await w.store.xmpp_watcher_subscriptions() == []


async def _accepted(w: World, subscribe: SipRequest, status: int = 202) -> None:
    reply = w.sip.deliver_for(subscribe)
    await respond(reply, answer(subscribe, status, [("Expires", "600")]), T0)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("pending;expires=600", []),
        ("terminated;reason=rejected", ["unsubscribed"]),
        ("terminated;reason=noresource", ["unsubscribed"]),
    ],
)
async def test_xmpp_watcher_pending_and_refusal(w: World, state: str, expected: list[str]) -> None:
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe)
    assert await deliver(w, notify_for(subscribe, state), T0 + 1) == 200
    assert [p.type for p in w.xmpp.take()] == expected
    if expected:
        approval = await w.store.approval(ALICE_JID, BOB, ApprovalDirection.XMPP_WATCHES_SIP)
        assert approval is not None and approval.state is ApprovalState.REFUSED


@pytest.mark.parametrize("status", [403, 404, 489, 603])
async def test_xmpp_watcher_subscribe_failing_is_unsubscribed(w: World, status: int) -> None:
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe, status)
    assert [p.type for p in w.xmpp.take()] == ["unsubscribed"]
    assert await w.store.xmpp_watcher_subscriptions() == []


@pytest.mark.parametrize(("status", "retry_after", "delay"), [(503, "7", 7), (408, None, 30)])
async def test_xmpp_watcher_transient_failure_retries(
    w: World, status: int, retry_after: str | None, delay: int
) -> None:
    subscribe = await xmpp_watches(w)
    reply = w.sip.deliver_for(subscribe)
    headers = [("Retry-After", retry_after)] if retry_after else []
    await respond(reply, answer(subscribe, status, headers), T0)
    assert w.xmpp.take() == []
    assert w.side.next_deadline() == T0 + delay
    await w.side.handle_timer(T0 + delay)
    [(again, _, _)] = w.sip.take()
    assert again.method == "SUBSCRIBE" and again.call_id != subscribe.call_id


async def test_xmpp_watcher_deactivated_resubscribes_after_delay(w: World) -> None:
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe, 200)
    await deliver(w, notify_for(subscribe, "active;expires=600"), T0)
    w.xmpp.take()
    ended = notify_for(subscribe, "terminated;reason=deactivated;retry-after=5", cseq=2)
    assert await deliver(w, ended, T0 + 10) == 200
    assert w.xmpp.take() == []
    assert w.side.next_deadline() == T0 + 15
    await w.side.handle_timer(T0 + 15)
    [(again, peer, _)] = w.sip.take()
    assert again.method == "SUBSCRIBE" and peer is None and again.call_id != subscribe.call_id


async def test_xmpp_watcher_refreshes_before_expiry(w: World) -> None:
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe, 200)
    await deliver(w, notify_for(subscribe, "active;expires=600"), T0)
    deadline = w.side.next_deadline()
    assert deadline is not None and T0 + 150 <= deadline < T0 + 600
    await w.side.handle_timer(deadline)
    [(refresh, peer, _)] = w.sip.take()
    assert refresh.call_id == subscribe.call_id and refresh.to_tag == "ps"
    assert refresh.header("Expires") == "3600" and peer == Peer("udp", "127.0.0.1", 5060)


@pytest.mark.parametrize(
    ("registered", "expected"),
    [(False, "unavailable"), (True, None)],
)
async def test_without_sip_presence_server_the_gateway_approves(
    store: MemoryStore, registered: bool, expected: str | None
) -> None:
    w = build(store, sip_server=False)
    if registered:
        await w.store.mark_user_seen(ALICE_AOR, T0, "sip:alice@127.0.0.1:5062", 600)
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribe"), T0)
    assert w.sip.take() == []
    [subscribed, state] = w.xmpp.take()
    assert subscribed == Presence(sender=ALICE_JID, recipient=BOB, type="subscribed")
    assert (state.sender, state.type) == (f"{ALICE_JID}/sip", expected)


# --- 5.4: online, offline, PUBLISH, commands -----------------------------------------------------


async def approve_bob(w: World) -> None:
    await w.store.save_approval(
        RosterApproval(
            ALICE_JID, BOB, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.APPROVED, T0
        )
    )


def register(headers: list[tuple[str, str]], cseq: int = 1) -> SipRequest:
    return sip(
        "REGISTER",
        "sip:sip.test",
        headers,
        from_=f"<{ALICE_AOR}>;tag=r",
        to=f"<{ALICE_AOR}>",
        call_id="reg",
        cseq=cseq,
    )


@pytest.mark.parametrize(
    ("headers", "expires"),
    [
        ([("Contact", "<sip:alice@127.0.0.1:5062>"), ("Expires", "300")], 300),
        ([("Contact", "<sip:alice@127.0.0.1:5062>;expires=120"), ("Expires", "300")], 120),
        ([("Contact", "<sip:alice@127.0.0.1:5062>")], 3600),
    ],
)
async def test_register_makes_online_then_zero_offline(
    w: World, headers: list[tuple[str, str]], expires: int
) -> None:
    await approve_bob(w)
    incoming = FakeIncoming(register(headers))
    await w.request(incoming, T0)
    [ok] = incoming.responses
    assert ok.status == 200 and ok.header("Expires") == str(expires)
    assert ok.header("Contact") == f"<sip:alice@127.0.0.1:5062>;expires={expires}"
    [online] = w.xmpp.take()
    assert (online.sender, online.recipient, online.type, online.priority) == (
        f"{ALICE_JID}/sip",
        BOB,
        None,
        9,
    )
    assert w.online == [ALICE_AOR]
    seen = await w.store.seen_user(ALICE_AOR)
    assert seen is not None and seen.online and seen.expires_at == T0 + expires
    # A re-registration is not news.
    await w.request(FakeIncoming(register(headers, 2)), T0 + 60)
    assert w.xmpp.take() == []
    gone = register([("Contact", "*"), ("Expires", "0")], 3)
    await w.request(FakeIncoming(gone), T0 + 70)
    assert [p.type for p in w.xmpp.take()] == ["unavailable"]


async def test_registration_expiry_sweep_makes_offline(w: World) -> None:
    await approve_bob(w)
    headers = [("Contact", "<sip:alice@127.0.0.1:5062>"), ("Expires", "60")]
    await w.request(FakeIncoming(register(headers)), T0)
    w.xmpp.take()
    await w.core.sweep(T0 + 59)
    assert w.xmpp.take() == []
    await w.core.sweep(T0 + 61)
    assert [p.type for p in w.xmpp.take()] == ["unavailable"]


def publish(body: bytes, headers: list[tuple[str, str]], cseq: int = 1) -> SipRequest:
    base = [("Event", "presence"), ("Expires", "600")]
    if body:
        base.append(("Content-Type", "application/pidf+xml"))
    return sip("PUBLISH", ALICE_AOR, base + headers, body, call_id="pub", cseq=cseq)


async def test_publish_sets_state_and_removal_falls_back(w: World) -> None:
    await approve_bob(w)
    incoming = FakeIncoming(publish(pidf_body("open", "out", "away"), []))
    await w.request(incoming, T0)
    [ok] = incoming.responses
    etag = ok.header("SIP-ETag")
    assert ok.status == 200 and etag
    [p] = w.xmpp.take()
    assert (p.type, p.show, p.status) == (None, "away", "out")
    assert w.online == [ALICE_AOR]  # seen by messaging too, and its queue retried
    assert [pub.etag for pub in await w.store.publications_of(ALICE_AOR)] == [etag]
    # Removal: nothing published; the user was seen by the PUBLISH -> available.
    removal = FakeIncoming(
        publish(b"", [("SIP-If-Match", etag)], 2).replace_headers("Expires", ["0"])
    )
    await w.request(removal, T0 + 1)
    assert removal.status == 200
    [p] = w.xmpp.take()
    assert (p.type, p.show) == (None, None)
    assert await w.store.publications_of(ALICE_AOR) == []


async def test_publication_expiry(w: World) -> None:
    await approve_bob(w)
    await w.request(FakeIncoming(publish(pidf_body("open", None, "busy"), [])), T0)
    w.xmpp.take()
    assert w.side.next_deadline() == T0 + 600
    await w.side.handle_timer(T0 + 600)
    assert [p.show for p in w.xmpp.take()] == [None]
    assert await w.store.publications_of(ALICE_AOR) == []


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"<presence", "application/pidf+xml", 400),
        (b"hello", "text/plain", 415),
        (b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', "application/pidf+xml", 400),
    ],
)
async def test_bad_publish_bodies(w: World, body: bytes, content_type: str, status: int) -> None:
    request = sip(
        "PUBLISH",
        ALICE_AOR,
        [("Event", "presence"), ("Content-Type", content_type)],
        body,
    )
    incoming = FakeIncoming(request)
    await w.request(incoming, T0)
    assert incoming.status == status
    assert await w.store.publications_of(ALICE_AOR) == []


@pytest.mark.parametrize(
    ("text", "reply", "presence"),
    [
        ("online", "online", (None, None, None)),
        ("away gone fishing", "away", (None, "away", "gone fishing")),
        ("DND", "busy", (None, "dnd", None)),
        ("offline", "offline", ("unavailable", None, None)),
        ("help", None, None),
        ("dance", None, None),
    ],
)
async def test_commands(
    w: World, text: str, reply: str | None, presence: tuple[str | None, ...] | None
) -> None:
    await approve_bob(w)
    msg = SipText(from_uri=ALICE_AOR, to_uri="sip:jabber_gateway@sip.test", body=text)
    answer_text = await w.core.command(msg, T0)
    sent = w.xmpp.take()
    if presence is None:
        assert sent == []
        assert answer_text == (HELP_TEXT if text == "help" else None)
        return
    assert answer_text is not None and reply is not None and reply in answer_text
    [p] = sent
    assert (p.type, p.show, p.status) == presence


async def test_register_without_contact_is_only_a_query(w: World) -> None:
    await approve_bob(w)
    incoming = FakeIncoming(register([("Expires", "300")]))
    await w.request(incoming, T0)
    assert incoming.status == 200
    assert w.xmpp.take() == [] and await w.store.seen_user(ALICE_AOR) is None


async def test_presence_to_the_bare_component_domain_is_ignored(w: World) -> None:
    for kind in ("subscribe", "unsubscribe", "probe"):
        await w.core.on_presence(Presence(sender=BOB, recipient="sip.xmpp.test", type=kind), T0)
    assert w.sip.take() == [] and w.xmpp.take() == []


async def test_bounced_subscribe_ends_pending_watch(w: World) -> None:
    await sip_watches(w)
    [(pending, _, _)] = w.sip.take()
    await respond(_reply_for(w, pending), answer(pending, 200), T0)
    bounce = Presence(
        sender=BOB, recipient=ALICE_JID, type="error", error_condition="item-not-found"
    )
    await w.core.on_presence(bounce, T0 + 1)
    [(ended, _, _)] = w.sip.take()
    assert ended.header("Subscription-State") == "terminated;reason=noresource"
    assert await w.store.sip_watcher_subscriptions() == []


async def test_probe_unapproved_is_ignored(w: World) -> None:
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="probe"), T0)
    assert w.xmpp.take() == []


# --- DESIGN 8: restart and reconnect -------------------------------------------------------------


async def test_restart_resumes_both_directions(memory_store: MemoryStore) -> None:
    first = memory_store
    w = build(first)
    # SIP watcher of Bob, approved and active.
    await sip_watches(w)
    [(pending, _, _)] = w.sip.take()
    await respond(_reply_for(w, pending), answer(pending, 200), T0)
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribed"), T0)
    [(active, _, _)] = w.sip.take()
    await respond(_reply_for(w, active), answer(active, 200), T0)
    # XMPP watcher of Alice, active.
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe, 200)
    await deliver(w, notify_for(subscribe, "active;expires=600", pidf_body()), T0)
    await w.request(
        FakeIncoming(register([("Contact", "<sip:alice@127.0.0.1:5062>"), ("Expires", "3600")])),
        T0,
    )
    await first.close()

    # A new process on the same database.
    second = MemoryStore(first.database)
    try:
        n = build(second, seed=2)
        assert await n.side.resume(T0 + 100) == (1, 1, 0)
        # Bob's presence still reaches Alice's phone, in the same dialog, CSeq going up.
        await n.core.on_presence(Presence(sender=f"{BOB}/pc", recipient=ALICE_JID), T0 + 101)
        [(notify, peer, _)] = n.sip.take()
        assert notify.call_id == active.call_id and notify.cseq[0] > active.cseq[0]
        assert peer == PHONE and state_of(notify)[1] is not None
        # Alice's presence server still reaches Bob through the restored subscriber.
        body = pidf_body("open", "on the phone", "on-the-phone")
        status = await deliver(n, notify_for(subscribe, "active;expires=500", body, 5), T0 + 102)
        assert status == 200
        [p] = n.xmpp.take()
        assert (p.recipient, p.show, p.status) == (BOB, "dnd", "on the phone")
        # The refresh is scheduled, not lost; link up re-announces online SIP users.
        assert n.side.next_deadline() is not None
        await n.core.on_link_up(T0 + 103)
        sent = n.xmpp.take()
        assert Presence(sender=f"{ALICE_JID}/sip", recipient=BOB, type="probe") in sent
        assert any(s.sender == f"{ALICE_JID}/sip" and s.recipient == BOB for s in sent)
    finally:
        await second.close()


async def test_restore_spreads_overdue_refreshes(memory_store: MemoryStore) -> None:
    first = memory_store
    w = build(first)
    for n in range(20):
        bob = f"bob{n}@xmpp.test"
        await w.core.on_presence(Presence(sender=bob, recipient=ALICE_JID, type="subscribe"), T0)
        [(subscribe, _, reply)] = w.sip.take()
        await respond(reply, answer(subscribe, 200, [("Expires", "600")]), T0)
    await first.close()
    second = MemoryStore(first.database)
    try:
        n2 = build(second, seed=3)
        later = T0 + 10_000  # every refresh is overdue
        await n2.side.resume(later)
        dues = sorted(
            h.subscriber.next_deadline() or 0 for h in n2.side.subscriptions.held.values()
        )
        assert all(later <= d <= later + 30 + 32 for d in dues)
        assert dues[-1] - dues[0] > 5  # spread, not one burst
    finally:
        await second.close()


# --- the runtime ------------------------------------------------------------------------------


class FakeEndpoint:
    """Answers every request 200 at once."""

    def __init__(self) -> None:
        self.requests: list[tuple[SipRequest, Peer | None]] = []

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        self.requests.append((request, peer))
        return answer(request, 200, [("Expires", "600")])

    def contact_for(self, transport: str = "udp", user: str | None = None) -> str:
        return GW_CONTACT


@dataclass
class Running:
    """The driven stack as ``app.py`` builds it, on a fake endpoint."""

    serial: CoreSerial
    side: SipSide
    runtime: PresenceDriver
    online: FakeOnline


def running(
    store: MemoryStore,
    endpoint: RequestSender,
    now: list[float],
    *,
    max_waiting: int = 500,
    max_queued_presence: int = 50_000,
    restore_spread: float = 30.0,
    seed: int = 4,
) -> Running:
    serial = CoreSerial(clock=lambda: now[0])
    online = FakeOnline()
    side = presence_side(
        store,
        ClientTransactions(endpoint, serial),
        FakeXmpp(),
        online,
        driver=serial,
        seed=seed,
        restore_spread=restore_spread,
        max_waiting=max_waiting,
    )
    runtime = PresenceDriver(
        serial,
        core=side.presence,
        sip=side,
        sweep_interval=3600,
        max_queued_presence=max_queued_presence,
    )
    return Running(serial, side, runtime, online)


async def test_runtime_drives_transactions_and_commands(store: MemoryStore) -> None:
    endpoint = FakeEndpoint()
    r = running(store, endpoint, [T0])
    runtime = r.runtime
    await runtime.start()
    try:
        incoming = FakeIncoming(subscribe_request())
        await through_gate(r.side, incoming)
        assert incoming.status == 202
        runtime.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribe"))
        msg = SipText(from_uri=ALICE_AOR, to_uri="sip:jabber_gateway@sip.test", body="online")
        assert "online" in (await runtime.command(msg) or "")
        await runtime.settle()
        methods = sorted(r.method for r, _ in endpoint.requests)
        assert methods == ["NOTIFY", "SUBSCRIBE"]
        assert r.online.aors == [ALICE_AOR]
        [stored] = await store.xmpp_watcher_subscriptions()
        assert stored.dialog is not None and stored.expires_at == T0 + 600
    finally:
        await runtime.stop()


# --- scale: deadline heap, indexes, write skipping, bounded queues, shutdown ----------------------


def watcher_subscribe(i: int, expires: int = 600, target: str = BOB_SIP) -> SipRequest:
    """A SUBSCRIBE from SIP user ``w<i>`` to ``target``."""
    return sip(
        "SUBSCRIBE",
        target,
        [
            ("Contact", f"<sip:w{i}@127.0.0.1:5062>"),
            ("Event", "presence"),
            ("Expires", str(expires)),
        ],
        call_id=f"w{i}-{target}",
        from_=f"<sip:w{i}@sip.test>;tag=ft{i}",
    )


def watcher_jid(i: int) -> str:
    return f"w{i}@sip.xmpp.test"


async def approve_watchers(store: StorePort, count: int) -> None:
    """Bob approves SIP users ``w0`` .. ``w<count-1>`` watching him."""
    for i in range(count):
        await store.save_approval(
            RosterApproval(
                watcher_jid(i), BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
            )
        )


async def watched_by(store: StorePort, side: SipSide, count: int, expires: int = 600) -> None:
    """``count`` approved SIP users subscribe to Bob through the gate, each answered 202."""
    await approve_watchers(store, count)
    for i in range(count):
        incoming = FakeIncoming(watcher_subscribe(i, expires))
        await through_gate(side, incoming)
        if incoming.status != 202:
            raise AssertionError(f"SUBSCRIBE {i} answered {incoming.status}")


async def approved_watchers(w: World, count: int, expires: list[int] | None = None) -> None:
    """``count`` SIP users watch Bob, approved and with every NOTIFY answered."""
    await approve_watchers(w.store, count)
    for i in range(count):
        incoming = FakeIncoming(watcher_subscribe(i, expires[i] if expires else 600))
        await w.request(incoming, T0)
        assert incoming.status == 202
    await answer_all(w, T0)
    w.xmpp.take()


async def answer_all(w: World, now: float, status: int = 200) -> list[SipRequest]:
    """Answer every request the core sent, until it sends no more; returns them."""
    answered: list[SipRequest] = []
    while sent := w.sip.take():
        for request, _, reply in sent:
            answered.append(request)
            await respond(reply, answer(request, status), now)
    return answered


def brute_deadline(side: SipSide) -> float | None:
    """The earliest deadline by looking at every machine (what the heap must agree with)."""
    times = [w.notifier.next_deadline() for w in side.watches.dialogs.values()]
    times += [
        h.retry_at if h.retry_at is not None else h.subscriber.next_deadline()
        for h in side.subscriptions.held.values()
    ]
    times.append(side.publications.next_deadline())
    return min((t for t in times if t is not None), default=None)


@pytest.mark.parametrize(
    ("ops", "due_at", "expected_earliest"),
    [
        # set, move later, remove: the stale entries must not surface.
        ([("a", 5.0), ("a", 9.0), ("b", 7.0)], 8.0, 7.0),
        ([("a", 5.0), ("a", None), ("b", 7.0)], 6.0, 7.0),
        ([("a", 5.0), ("b", 5.0), ("a", 1.0)], 0.5, 1.0),
        ([("a", None)], 100.0, None),
    ],
)
def test_deadline_heap_table(
    ops: list[tuple[str, float | None]], due_at: float, expected_earliest: float | None
) -> None:
    heap: DeadlineHeap[str] = DeadlineHeap()
    model: dict[str, float] = {}
    for key, when in ops:
        heap.set(key, when)
        if when is None:
            model.pop(key, None)
        else:
            model[key] = when
    assert heap.earliest() == expected_earliest
    assert sorted(heap.pop_due(due_at)) == sorted(k for k, t in model.items() if t <= due_at)
    assert len(heap) == sum(1 for t in model.values() if t > due_at)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["set", "pop"]),
            st.integers(0, 40),
            st.one_of(st.none(), st.integers(0, 100).map(float)),
            st.integers(1, 5),
        ),
        max_size=300,
    )
)
def test_deadline_heap_agrees_with_a_dict(ops: list[tuple[str, int, float | None, int]]) -> None:
    heap: DeadlineHeap[int] = DeadlineHeap()
    model: dict[int, float] = {}
    for op, key, when, limit in ops:
        if op == "set":
            heap.set(key, when)
            if when is None:
                model.pop(key, None)
            else:
                model[key] = when
        else:
            now = when if when is not None else 50.0
            due = heap.pop_due(now, limit)
            was_due = {k: t for k, t in model.items() if t <= now}
            assert len(due) == min(limit, len(was_due)) and len(set(due)) == len(due)
            assert all(k in was_due for k in due)
            # The earliest come first: nothing left behind is due before what was taken.
            left = [t for k, t in was_due.items() if k not in due]
            assert not due or not left or min(left) >= max(was_due[k] for k in due)
            for k in due:
                del model[k]
        assert heap.earliest() == min(model.values(), default=None)
        assert heap.entries <= 2 * len(model) + 65  # stale entries are compacted away


async def test_deadline_heap_follows_many_subscriptions(w: World) -> None:
    rng = random.Random(7)
    expires = [rng.randint(60, 3600) for _ in range(150)]
    await approved_watchers(w, len(expires), expires)
    for i in range(40):
        await w.core.on_presence(
            Presence(sender=f"xmpp{i}@xmpp.test", recipient=ALICE_JID, type="subscribe"), T0
        )
    for request, _, reply in w.sip.take():
        response = answer(request, 200, [("Expires", str(rng.randint(120, 3600)))])
        await respond(reply, response, T0)
    assert w.side.next_deadline() == brute_deadline(w.side)
    # Fire in steps; at each step exactly the expired notifiers end, and the heap agrees.
    for now in (T0 + 600, T0 + 1800, T0 + 3601):
        while (due := w.side.next_deadline()) is not None and due <= now:
            await w.side.handle_timer(now)
            await answer_all(w, now)
        alive = len(w.side.watches.dialogs)
        assert alive == sum(1 for e in expires if T0 + e > now)
        assert w.side.next_deadline() == brute_deadline(w.side)
        assert w.side.next_deadline() is None or w.side.next_deadline() > now  # type: ignore[operator]
    assert len(await w.store.sip_watcher_subscriptions()) == 0


async def test_handle_timer_fires_a_bounded_batch(w: World) -> None:
    count = TIMER_BATCH + 50
    await approved_watchers(w, count, [60] * count)
    now = T0 + 61
    await w.side.handle_timer(now)
    ended = [
        r for r, _, _ in w.sip.take() if "terminated" in (r.header("Subscription-State") or "")
    ]
    assert len(ended) == TIMER_BATCH
    assert w.side.next_deadline() == T0 + 60  # the rest is still due: the runtime calls again
    await w.side.handle_timer(now)
    assert len(w.sip.take()) == 50 and w.side.next_deadline() is None


@pytest.mark.parametrize("recipient", [0, 1, 2])
async def test_presence_reaches_only_the_addressed_watchers_dialogs(
    w: World, recipient: int
) -> None:
    await approved_watchers(w, 3)
    # A second target, watched by the same users: it must not be notified for Bob.
    carol = "sip:carol*xmpp.test@jabber.sip.test"
    for i in range(3):
        await w.store.save_approval(
            RosterApproval(
                watcher_jid(i),
                "carol@xmpp.test",
                ApprovalDirection.SIP_WATCHES_XMPP,
                ApprovalState.APPROVED,
                T0,
            )
        )
        await w.request(FakeIncoming(watcher_subscribe(i, target=carol)), T0)
    await answer_all(w, T0)
    await w.core.on_presence(
        Presence(sender=f"{BOB}/pc", recipient=watcher_jid(recipient), show="away"), T0 + 1
    )
    [(notify, _, _)] = w.sip.take()
    assert notify.call_id == f"w{recipient}-{BOB_SIP}"
    assert state_of(notify)[1] is not None and state_of(notify)[1].show == "away"  # type: ignore[union-attr]
    # A dialog that ended leaves the index: Bob's next change reaches nobody there.
    ended = FakeIncoming(
        sip(
            "SUBSCRIBE",
            BOB_SIP,
            [("Event", "presence"), ("Expires", "0")],
            call_id=f"w{recipient}-{BOB_SIP}",
            from_=f"<sip:w{recipient}@sip.test>;tag=ft{recipient}",
            to=f"<{BOB_SIP}>;tag={notify.from_tag}",
            cseq=2,
        )
    )
    await w.request(ended, T0 + 2)
    assert ended.status == 200
    w.sip.take()
    await w.core.on_presence(
        Presence(sender=f"{BOB}/pc", recipient=watcher_jid(recipient), show="dnd"), T0 + 3
    )
    assert w.sip.take() == []
    assert w.side.counts()["sip_watchers"] == 5


def count_calls(
    monkeypatch: pytest.MonkeyPatch, store: MemoryStore, names: Sequence[str]
) -> Counter[str]:
    """Count calls of the store's ``names`` (they still run)."""
    counts: Counter[str] = Counter()
    for name in names:
        method = getattr(store, name)

        def counting(*args: Any, _name: str = name, _method: Any = method, **kw: Any) -> Any:
            counts[_name] += 1
            return _method(*args, **kw)

        monkeypatch.setattr(store, name, counting)
    return counts


async def test_fanout_skips_writes_that_change_nothing(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await approved_watchers(w, 5)
    writes = count_calls(
        monkeypatch, w.store, ["save_presence", "clear_presence", "save_sip_watcher_subscription"]
    )
    # The XMPP server sends Bob's change once per watcher JID: one presence write in all.
    for i in range(5):
        await w.core.on_presence(
            Presence(sender=f"{BOB}/pc", recipient=watcher_jid(i), show="away"), T0 + 1
        )
    notifies = await answer_all(w, T0 + 1)
    assert len(notifies) == 5
    assert writes["save_presence"] == 1
    # Neither the NOTIFYs (within the CSeq reserve) nor their 2xx rewrote the dialogs.
    assert writes["save_sip_watcher_subscription"] == 0
    for i in range(5):
        await w.core.on_presence(
            Presence(sender=f"{BOB}/pc", recipient=watcher_jid(i), type="unavailable"), T0 + 2
        )
    await answer_all(w, T0 + 2)
    assert (writes["save_presence"], writes["clear_presence"]) == (1, 1)


async def test_stored_cseq_stays_ahead_across_many_notifies(memory_store: MemoryStore) -> None:
    first = memory_store
    w = build(first)
    await approved_watchers(w, 1)
    used = 0
    for n in range(CSEQ_RESERVE * 2 + 5):  # past the reserve twice: it must be renewed
        show = ("away", "dnd")[n % 2]
        await w.core.on_presence(
            Presence(sender=f"{BOB}/pc", recipient=watcher_jid(0), show=show), T0 + n
        )
        for request in await answer_all(w, T0 + n):
            used = max(used, request.cseq[0])
    await first.close()
    second = MemoryStore(first.database)
    try:
        n2 = build(second, seed=5)
        assert await n2.side.resume(T0 + 500) == (1, 0, 0)
        # The watcher refreshes: the NOTIFY continues the dialog above every CSeq used, and
        # carries Bob's last presence (from the store, not an older body kept with the dialog).
        [key] = n2.side.watches.dialogs
        refresh = FakeIncoming(
            sip(
                "SUBSCRIBE",
                BOB_SIP,
                [("Event", "presence"), ("Expires", "600")],
                call_id=key.call_id,
                from_="<sip:w0@sip.test>;tag=ft0",
                to=f"<{BOB_SIP}>;tag={key.local_tag}",
                cseq=2,
            )
        )
        await n2.request(refresh, T0 + 501)
        assert refresh.status == 200
        [(notify, _, _)] = n2.sip.take()
        assert notify.cseq[0] > used
        seen = state_of(notify)[1]
        assert seen is not None and seen.show == "away"  # the last of the changes above
    finally:
        await second.close()


async def test_xmpp_watcher_repeated_notify_writes_nothing(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe, 200)
    assert await deliver(w, notify_for(subscribe, "active;expires=600", pidf_body()), T0) == 200
    writes = count_calls(monkeypatch, w.store, ["save_presence", "save_xmpp_watcher_subscription"])
    for cseq in range(2, 6):  # the presence server repeats the state; expires counts down
        request = notify_for(subscribe, f"active;expires={600 - cseq}", pidf_body(), cseq)
        assert await deliver(w, request, T0 + cseq) == 200
    assert writes == Counter()
    assert w.online == [ALICE_AOR]  # told once, not on every repeat
    changed = notify_for(subscribe, "active;expires=590", pidf_body("closed"), 9)
    assert await deliver(w, changed, T0 + 10) == 200
    assert writes["save_presence"] == 1


async def test_restore_rate_is_bounded_for_many_overdue(memory_store: MemoryStore) -> None:
    first = memory_store
    w = build(first)
    count = 300
    for n in range(count):
        await w.core.on_presence(
            Presence(sender=f"x{n}@xmpp.test", recipient=ALICE_JID, type="subscribe"), T0
        )
        [(subscribe, _, reply)] = w.sip.take()
        await respond(reply, answer(subscribe, 200, [("Expires", "600")]), T0)
    await first.close()
    second = MemoryStore(first.database)
    try:
        side = build(second, seed=9, restore_spread=1.0).side
        later = T0 + 10_000
        await side.resume(later)
        dues = sorted(h.subscriber.next_deadline() or 0.0 for h in side.subscriptions.held.values())
        window = count / RESTORE_RATE
        assert later <= dues[0] and dues[-1] <= later + window
        per_second = Counter(int(d - later) for d in dues)
        assert max(per_second.values()) <= RESTORE_RATE + 1
        assert dues[-1] - dues[0] > window * 0.9  # the whole window is used
    finally:
        await second.close()


class GatedEndpoint(FakeEndpoint):
    """Holds NOTIFYs until ``release``; ``close`` fails what is held, as Endpoint.close does."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[asyncio.Future[None]] = []

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        if request.method == "NOTIFY":
            gate = asyncio.get_running_loop().create_future()
            self.held.append(gate)
            await gate
        return await super().request(request, peer)

    def close(self) -> None:
        for gate in self.held:
            if not gate.done():
                gate.set_exception(TransportError("endpoint closed"))


def runtime_world(
    store: MemoryStore, endpoint: FakeEndpoint, **limits: int
) -> tuple[PresenceDriver, SipSide, list[float]]:
    now = [T0]
    r = running(store, endpoint, now, **limits)
    return r.runtime, r.side, now


@pytest.mark.parametrize("endpoint_closes_first", [False, True])
async def test_shutdown_with_notifies_in_flight_keeps_subscriptions(
    store: MemoryStore, endpoint_closes_first: bool
) -> None:
    endpoint = GatedEndpoint()
    runtime, side, _ = runtime_world(store, endpoint)
    await runtime.start()
    for i in range(3):
        await store.save_approval(
            RosterApproval(
                watcher_jid(i), BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
            )
        )
        incoming = FakeIncoming(watcher_subscribe(i))
        await through_gate(side, incoming)
        assert incoming.status == 202
    await asyncio.sleep(0)
    assert len(endpoint.held) == 3  # every first NOTIFY is in flight
    stopping = asyncio.create_task(runtime.stop(timeout=0.5))
    await asyncio.sleep(0)
    if endpoint_closes_first:
        endpoint.close()  # the transactions fail with "endpoint closed" while stop waits
    await stopping
    endpoint.close()
    await asyncio.sleep(0)
    assert len(await store.sip_watcher_subscriptions()) == 3
    assert side.counts()["sip_watchers"] == 3
    # Stopped: new work is refused and the core (and the store) are left alone.
    late = FakeIncoming(watcher_subscribe(7))
    await through_gate(side, late)
    assert late.status == 503 and late.responses[0].header("Retry-After") == "5"
    runtime.on_presence(Presence(sender=f"{BOB}/pc", recipient=watcher_jid(0)))
    await runtime.settle()
    assert side.counts()["sip_watchers"] == 3 and len(late.responses) == 1


async def test_stop_waits_for_transactions_started_meanwhile(store: MemoryStore) -> None:
    endpoint = GatedEndpoint()
    runtime, side, _ = runtime_world(store, endpoint)
    await runtime.start()
    await store.save_approval(
        RosterApproval(
            watcher_jid(0), BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
        )
    )
    await through_gate(side, FakeIncoming(watcher_subscribe(0)))
    runtime.on_presence(Presence(sender=f"{BOB}/pc", recipient=watcher_jid(0), show="away"))
    while runtime.queued_presence or runtime.serial.waiting:
        await asyncio.sleep(0)
    stopping = asyncio.create_task(runtime.stop(timeout=5.0))
    # The first NOTIFY's 2xx comes during stop; the change queued behind it goes out then.
    endpoint.held[0].set_result(None)
    while len(endpoint.held) < 2:
        await asyncio.sleep(0)
    endpoint.held[1].set_result(None)
    await stopping
    assert [r.method for r, _ in endpoint.requests] == ["NOTIFY", "NOTIFY"]
    assert side.counts()["sip_watchers"] == 1
    assert len(await store.sip_watcher_subscriptions()) == 1


async def test_overload_refuses_new_subscriptions_with_503(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = FakeEndpoint()
    runtime, side, _ = runtime_world(store, endpoint, max_waiting=2, max_queued_presence=2)
    await runtime.start()
    gate = asyncio.Event()
    seen = store.mark_user_seen

    async def slow_mark(*args: Any, **kw: Any) -> Any:
        await gate.wait()
        return await seen(*args, **kw)

    monkeypatch.setattr(store, "mark_user_seen", slow_mark)
    try:
        msg = SipText(from_uri=ALICE_AOR, to_uri="sip:jabber_gateway@sip.test", body="online")
        blocker = asyncio.create_task(runtime.command(msg))  # holds the lock
        queued = [FakeIncoming(watcher_subscribe(i)) for i in range(2)]
        tasks = [asyncio.create_task(through_gate(side, q)) for q in queued]
        for n in range(5):  # two fit the queue, three are dropped
            runtime.on_presence(
                Presence(sender=f"x{n}@xmpp.test", recipient=ALICE_JID, type="subscribe")
            )
        await asyncio.sleep(0.01)
        # The worker took one and waits for the lock with the command and two SUBSCRIBEs.
        assert runtime.serial.waiting == 4 and runtime.queued_presence == 1
        assert side.requests_waiting == 2
        table = [
            (watcher_subscribe(5), 503),  # a new subscription: refused
            (publish(pidf_body(), [("Event", "presence"), ("Expires", "60")]), 503),
        ]
        for request, status in table:
            refused = FakeIncoming(request)
            await through_gate(side, refused)
            assert refused.status == status and refused.responses[0].header("Retry-After") == "5"
        # A request about existing state (here an unknown dialog) still queues and is answered.
        stray = FakeIncoming(
            sip(
                "SUBSCRIBE", BOB_SIP, [("Event", "presence")], call_id="zz", to=f"<{BOB_SIP}>;tag=x"
            )
        )
        stray_task = asyncio.create_task(through_gate(side, stray))
        await asyncio.sleep(0.01)
        assert not stray.answered
        gate.set()
        await asyncio.gather(blocker, stray_task, *tasks)
        await runtime.settle()
        assert stray.status == 481 and [q.status for q in queued] == [202, 202]
        subscribes = [r for r, _ in endpoint.requests if r.method == "SUBSCRIBE"]
        assert len(subscribes) == 2  # the three dropped stanzas made no subscription
        assert runtime.serial.waiting == 0 and runtime.queued_presence == 0
        # Below the bound again: accepted.
        later = FakeIncoming(watcher_subscribe(6))
        await through_gate(side, later)
        assert later.status == 202
    finally:
        gate.set()
        await runtime.stop()


async def test_runtime_spreads_refreshes_from_after_a_slow_resume(
    memory_store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = memory_store
    w = build(first)
    for n in range(10):
        await w.core.on_presence(
            Presence(sender=f"x{n}@xmpp.test", recipient=ALICE_JID, type="subscribe"), T0
        )
        [(subscribe, _, reply)] = w.sip.take()
        await respond(reply, answer(subscribe, 200, [("Expires", "600")]), T0)
    await first.close()
    second = MemoryStore(first.database)
    try:
        now = [T0 + 10_000]  # every refresh is overdue
        r = running(second, FakeEndpoint(), now, restore_spread=5)
        runtime = r.runtime
        reading = second.all_publications

        async def slow_read() -> Any:
            now[0] += 100.0  # the first part of the resume takes long
            return await reading()

        monkeypatch.setattr(second, "all_publications", slow_read)
        await runtime.start()
        await runtime.stop()
        dues = [h.subscriber.next_deadline() or 0.0 for h in r.side.subscriptions.held.values()]
        assert len(dues) == 10 and min(dues) >= now[0]  # spread from after the slow part
        assert max(dues) <= now[0] + 5
    finally:
        await second.close()
