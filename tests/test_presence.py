"""The presence core (DESIGN 5, 8) with fake SIP and XMPP ports, a real SQLite store and a fake
clock: both directions of watching, online state, PUBLISH, commands, restart and resume."""

from __future__ import annotations

import random
import shutil
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from component.addresses import AddressBook
from component.events import Presence, SipAnswer, SipText
from component.presence import HELP_TEXT, MachineKind, PresenceCore, ReplyTo
from component.presence_map import xmpp_for_pidf
from component.presence_runtime import PresenceRuntime
from component.store import ApprovalDirection, ApprovalState, Store, migrate
from sipside import pidf
from sipside.message import SipRequest, SipResponse, make_response, parse_message
from sipside.peer import Peer

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
    """The SIP port: records what the core sends."""

    sent: list[tuple[SipRequest, Peer | None, ReplyTo]] = field(default_factory=list)

    def send_request(self, request: SipRequest, peer: Peer | None, reply: ReplyTo) -> None:
        self.sent.append((request, peer, reply))

    def contact_for(self, transport: str) -> str:
        return GW_CONTACT

    def take(self) -> list[tuple[SipRequest, Peer | None, ReplyTo]]:
        sent, self.sent = self.sent, []
        return sent


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


class FakeIncoming:
    """An incoming request as the endpoint hands it over."""

    def __init__(self, request: SipRequest, source: Peer = PHONE) -> None:
        self.request = request
        self.source = source
        self.responses: list[SipResponse] = []

    @property
    def answered(self) -> bool:
        return bool(self.responses)

    def send(self, response: SipResponse) -> None:
        self.responses.append(response)

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


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("presence-template") / "store.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def store_url(tmp_path: Path, sqlite_template: Path) -> str:
    path = tmp_path / "store.db"
    shutil.copyfile(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(store_url)
    yield opened
    await opened.close()


@dataclass
class World:
    core: PresenceCore
    sip: FakeSip
    xmpp: FakeXmpp
    store: Store
    online: list[str]


def build(store: Store, *, sip_server: bool = True, seed: int = 1) -> World:
    fake_sip, fake_xmpp = FakeSip(), FakeXmpp()
    core = PresenceCore(
        BOOK,
        sip=fake_sip,
        xmpp=fake_xmpp,
        store=store,
        sip_server=sip_server,
        priority=9,
        rng=random.Random(seed),
    )
    online: list[str] = []
    core.on_user_online = online.append
    return World(core, fake_sip, fake_xmpp, store, online)


@pytest.fixture
def w(store: Store) -> World:
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
    await w.core.on_sip_request(incoming, now)
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

    await w.core.on_sip_response(_reply_for(w, notify), answer(notify, 200), T0)
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribed"), T0 + 1)
    [(active, _, _)] = w.sip.take()
    state, seen = state_of(active)
    assert state.startswith("active") and seen is not None and seen.type == "unavailable"
    assert w.xmpp.take() == [Presence(sender=f"{ALICE_JID}/sip", recipient=BOB, type="probe")]

    # The active NOTIFY is unanswered: a change waits for it (one NOTIFY in flight).
    away = Presence(sender=f"{BOB}/pc", recipient=ALICE_JID, show="away", status="lunch")
    await w.core.on_presence(away, T0 + 2)
    assert w.sip.take() == []
    await w.core.on_sip_response(_reply_for(w, active), answer(active, 200), T0 + 2)
    [(changed, _, _)] = w.sip.take()
    _, seen = state_of(changed)
    assert seen is not None and (seen.type, seen.show, seen.status) == (None, "away", "lunch")

    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="unsubscribed"), T0 + 3)
    [(ended, _, _)] = w.sip.take()
    assert ended.header("Subscription-State") == "terminated;reason=rejected"
    assert await w.store.sip_watcher_subscriptions() == []
    assert w.core.counts()["sip_watchers"] == 0


def _reply_for(w: World, request: SipRequest) -> ReplyTo:
    key = next(k for k in w.core._watches if k.call_id == request.call_id)
    return ReplyTo(MachineKind.NOTIFIER, key, key.call_id)


async def test_sip_watcher_already_approved_gets_active_notify_with_last_presence(w: World) -> None:
    await w.store.set_approval(
        ALICE_JID, BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
    )
    await w.store.set_presence(BOB, "pc", available=True, now=T0, show="dnd", status="busy")
    incoming = await sip_watches(w)
    assert incoming.status == 202
    [(notify, _, _)] = w.sip.take()
    state, seen = state_of(notify)
    assert state.startswith("active")
    assert seen is not None and (seen.show, seen.status) == ("dnd", "busy")
    assert w.xmpp.take() == [Presence(sender=f"{ALICE_JID}/sip", recipient=BOB, type="probe")]


async def test_presence_change_notifies_one_tuple_per_resource(w: World) -> None:
    await w.store.set_approval(
        ALICE_JID, BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
    )
    await sip_watches(w)
    [(first, _, _)] = w.sip.take()
    await w.core.on_sip_response(_reply_for(w, first), answer(first, 200), T0)
    for n, resource in enumerate(("pc", "phone")):
        p = Presence(sender=f"{BOB}/{resource}", recipient=ALICE_JID, priority=5 - n)
        await w.core.on_presence(p, T0 + n)
        [(notify, _, _)] = w.sip.take()
        await w.core.on_sip_response(_reply_for(w, notify), answer(notify, 200), T0 + n)
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
    await w.store.set_approval(
        ALICE_JID, BOB, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, T0
    )
    first = await sip_watches(w)
    [(notify, _, _)] = w.sip.take()
    await w.core.on_sip_response(_reply_for(w, notify), answer(notify, 200), T0)
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
    await w.core.on_sip_request(incoming, T0 + 10)
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
    await w.core.on_sip_request(incoming, T0)
    assert incoming.status == status
    assert w.sip.take() == [] and w.xmpp.take() == []


async def test_unknown_dialog_gets_481(w: World) -> None:
    for method in ("SUBSCRIBE", "NOTIFY"):
        request = sip(method, GW_CONTACT, [("Event", "presence")], to=f"<{BOB_SIP}>;tag=nope")
        incoming = FakeIncoming(request)
        await w.core.on_sip_request(incoming, T0)
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
    await w.core.on_sip_request(FakeIncoming(request), T0)
    [(notify, peer, _)] = w.sip.take()
    assert peer == Peer("udp", "127.0.0.1", 5060)
    assert notify.header_values("Route") == ["<sip:127.0.0.1:5060;lr>"]
    assert w.core.next_deadline() == T0 + 120
    await w.core.handle_timer(T0 + 119)
    assert w.sip.take() == []
    await w.core.handle_timer(T0 + 120)
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
    await w.core.on_sip_request(incoming, now)
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
    body = pidf_body("open", "in a meeting", "meeting")
    assert await deliver(w, notify_for(subscribe, "active;expires=3500", body, 2), T0 + 2) == 200
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
    held = w.core._held[(BOB, ALICE_AOR)]
    reply = ReplyTo(MachineKind.SUBSCRIBER, (BOB, ALICE_AOR), held.subscriber.dialog.call_id)
    await w.core.on_sip_response(reply, answer(subscribe, status, [("Expires", "600")]), T0)


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
    held = w.core._held[(BOB, ALICE_AOR)]
    reply = ReplyTo(MachineKind.SUBSCRIBER, (BOB, ALICE_AOR), held.subscriber.dialog.call_id)
    headers = [("Retry-After", retry_after)] if retry_after else []
    await w.core.on_sip_response(reply, answer(subscribe, status, headers), T0)
    assert w.xmpp.take() == []
    assert w.core.next_deadline() == T0 + delay
    await w.core.handle_timer(T0 + delay)
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
    assert w.core.next_deadline() == T0 + 15
    await w.core.handle_timer(T0 + 15)
    [(again, peer, _)] = w.sip.take()
    assert again.method == "SUBSCRIBE" and peer is None and again.call_id != subscribe.call_id


async def test_xmpp_watcher_refreshes_before_expiry(w: World) -> None:
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe, 200)
    await deliver(w, notify_for(subscribe, "active;expires=600"), T0)
    deadline = w.core.next_deadline()
    assert deadline is not None and T0 + 150 <= deadline < T0 + 600
    await w.core.handle_timer(deadline)
    [(refresh, peer, _)] = w.sip.take()
    assert refresh.call_id == subscribe.call_id and refresh.to_tag == "ps"
    assert refresh.header("Expires") == "3600" and peer == Peer("udp", "127.0.0.1", 5060)


@pytest.mark.parametrize(
    ("registered", "expected"),
    [(False, "unavailable"), (True, None)],
)
async def test_without_sip_presence_server_the_gateway_approves(
    store: Store, registered: bool, expected: str | None
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
    await w.store.set_approval(
        ALICE_JID, BOB, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.APPROVED, T0
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
    await w.core.on_sip_request(incoming, T0)
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
    await w.core.on_sip_request(FakeIncoming(register(headers, 2)), T0 + 60)
    assert w.xmpp.take() == []
    gone = register([("Contact", "*"), ("Expires", "0")], 3)
    await w.core.on_sip_request(FakeIncoming(gone), T0 + 70)
    assert [p.type for p in w.xmpp.take()] == ["unavailable"]


async def test_registration_expiry_sweep_makes_offline(w: World) -> None:
    await approve_bob(w)
    headers = [("Contact", "<sip:alice@127.0.0.1:5062>"), ("Expires", "60")]
    await w.core.on_sip_request(FakeIncoming(register(headers)), T0)
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
    await w.core.on_sip_request(incoming, T0)
    [ok] = incoming.responses
    etag = ok.header("SIP-ETag")
    assert ok.status == 200 and etag
    [p] = w.xmpp.take()
    assert (p.type, p.show, p.status) == (None, "away", "out")
    assert [pub.etag for pub in await w.store.publications_of(ALICE_AOR)] == [etag]
    # Removal: nothing published; the user was seen by the PUBLISH -> available.
    removal = FakeIncoming(
        publish(b"", [("SIP-If-Match", etag)], 2).replace_headers("Expires", ["0"])
    )
    await w.core.on_sip_request(removal, T0 + 1)
    assert removal.status == 200
    [p] = w.xmpp.take()
    assert (p.type, p.show) == (None, None)
    assert await w.store.publications_of(ALICE_AOR) == []


async def test_publication_expiry(w: World) -> None:
    await approve_bob(w)
    await w.core.on_sip_request(FakeIncoming(publish(pidf_body("open", None, "busy"), [])), T0)
    w.xmpp.take()
    assert w.core.next_deadline() == T0 + 600
    await w.core.handle_timer(T0 + 600)
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
    await w.core.on_sip_request(incoming, T0)
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
    await w.core.on_sip_request(incoming, T0)
    assert incoming.status == 200
    assert w.xmpp.take() == [] and await w.store.seen_user(ALICE_AOR) is None


async def test_presence_to_the_bare_component_domain_is_ignored(w: World) -> None:
    for kind in ("subscribe", "unsubscribe", "probe"):
        await w.core.on_presence(Presence(sender=BOB, recipient="sip.xmpp.test", type=kind), T0)
    assert w.sip.take() == [] and w.xmpp.take() == []


async def test_bounced_subscribe_ends_pending_watch(w: World) -> None:
    await sip_watches(w)
    [(pending, _, _)] = w.sip.take()
    await w.core.on_sip_response(_reply_for(w, pending), answer(pending, 200), T0)
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


async def test_restart_resumes_both_directions(store_url: str) -> None:
    first = await Store.open(store_url)
    w = build(first)
    # SIP watcher of Bob, approved and active.
    await sip_watches(w)
    [(pending, _, _)] = w.sip.take()
    await w.core.on_sip_response(_reply_for(w, pending), answer(pending, 200), T0)
    await w.core.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribed"), T0)
    [(active, _, _)] = w.sip.take()
    await w.core.on_sip_response(_reply_for(w, active), answer(active, 200), T0)
    # XMPP watcher of Alice, active.
    subscribe = await xmpp_watches(w)
    await _accepted(w, subscribe, 200)
    await deliver(w, notify_for(subscribe, "active;expires=600", pidf_body()), T0)
    await w.core.on_sip_request(
        FakeIncoming(register([("Contact", "<sip:alice@127.0.0.1:5062>"), ("Expires", "3600")])),
        T0,
    )
    await first.close()

    # A new process on the same database.
    second = await Store.open(store_url)
    try:
        n = build(second, seed=2)
        assert await n.core.resume(T0 + 100) == (1, 1, 0)
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
        assert n.core.next_deadline() is not None
        await n.core.on_link_up(T0 + 103)
        sent = n.xmpp.take()
        assert Presence(sender=f"{ALICE_JID}/sip", recipient=BOB, type="probe") in sent
        assert any(s.sender == f"{ALICE_JID}/sip" and s.recipient == BOB for s in sent)
    finally:
        await second.close()


async def test_restore_spreads_overdue_refreshes(store_url: str) -> None:
    first = await Store.open(store_url)
    w = build(first)
    for n in range(20):
        bob = f"bob{n}@xmpp.test"
        await w.core.on_presence(Presence(sender=bob, recipient=ALICE_JID, type="subscribe"), T0)
        [(subscribe, _, reply)] = w.sip.take()
        await w.core.on_sip_response(reply, answer(subscribe, 200, [("Expires", "600")]), T0)
    await first.close()
    second = await Store.open(store_url)
    try:
        n2 = build(second, seed=3)
        later = T0 + 10_000  # every refresh is overdue
        await n2.core.resume(later)
        dues = sorted(h.subscriber.next_deadline() or 0 for h in n2.core._held.values())
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


async def test_runtime_drives_transactions_and_commands(store: Store) -> None:
    endpoint = FakeEndpoint()
    now = [T0]
    runtime = PresenceRuntime(endpoint, clock=lambda: now[0], sweep_interval=3600)
    xmpp = FakeXmpp()
    core = PresenceCore(BOOK, sip=runtime, xmpp=xmpp, store=store, rng=random.Random(4))
    runtime.attach(core)
    flushed: list[str] = []

    async def flush(aor: str) -> None:
        flushed.append(aor)

    runtime.on_user_online = flush
    await runtime.start()
    try:
        incoming = FakeIncoming(subscribe_request())
        answer_ = await runtime.handle_request(incoming)
        assert incoming.status == 202 and isinstance(answer_, SipAnswer)
        runtime.on_presence(Presence(sender=BOB, recipient=ALICE_JID, type="subscribe"))
        msg = SipText(from_uri=ALICE_AOR, to_uri="sip:jabber_gateway@sip.test", body="online")
        assert "online" in (await runtime.command(msg) or "")
        await runtime.settle()
        methods = sorted(r.method for r, _ in endpoint.requests)
        assert methods == ["NOTIFY", "SUBSCRIBE"]
        assert flushed == [ALICE_AOR]
        [stored] = await store.xmpp_watcher_subscriptions()
        assert stored.dialog is not None and stored.expires_at == T0 + 600
    finally:
        await runtime.stop()
