"""Our SIP stack against real SIP elements: Kamailio (proxy, registrar, presence server) and
PJSIP user agents, all on loopback, started by the harness in ``tests/harness``.

Our Endpoint stands where the gateway stands: Kamailio relays ``jabber.sip.test`` to it (the
repository's ``kamailio/sipxmpp.cfg``), and it sends through Kamailio as its outbound proxy.
The sans-IO cores (Notifier, Subscriber, Publisher) are driven by a small adapter in this file,
``Gateway``, that does what the component's SIP adapter does: it runs their effects on the
Endpoint and feeds responses, timeouts and in-dialog requests back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from sipside import pidf
from sipside.digest import Credentials, DigestClient
from sipside.endpoint import Endpoint, IncomingRequest, make_request
from sipside.errors import SipError
from sipside.message import SipRequest, SipResponse, new_call_id
from sipside.notifier import Notifier, NotifierState
from sipside.publication import PublicationEffect, Published, Publisher
from sipside.subscription import (
    SendRequest,
    SendResponse,
    StateChanged,
    Subscriber,
    SubscriptionEffect,
    SubscriptionEnded,
    SubscriptionState,
)
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import BuddyState, PjsipAgent, SipAccount
from tests.harness.ports import free_port
from tests.harness.values import (
    GATEWAY_AUTH_PASSWORD,
    GATEWAY_AUTH_REALM,
    GATEWAY_AUTH_USER,
    JDOMAIN,
    LOOPBACK,
    SIP_DOMAIN,
)

pytestmark = pytest.mark.slow

AgentFactory = Callable[[], Awaitable[PjsipAgent]]
KamailioFactory = Callable[..., KamailioServer]

XMPP_BOB = f"sip:bob*xmpp.test@{JDOMAIN}"  # an XMPP user as SIP users address it (DESIGN 3.2)
PIDF_TYPE = "application/pidf+xml"
TIMEOUT = 10.0

Core = Notifier | Subscriber | Publisher
Effect = SubscriptionEffect | PublicationEffect


@dataclass(slots=True)
class Gateway:
    """Our Endpoint behind Kamailio, with the cores it serves (a stand-in for the component)."""

    endpoint: Endpoint
    messages: asyncio.Queue[IncomingRequest] = field(default_factory=asyncio.Queue)
    notifiers: list[Notifier] = field(default_factory=list)
    subscribers: list[Subscriber] = field(default_factory=list)
    states: asyncio.Queue[StateChanged] = field(default_factory=asyncio.Queue)
    published: asyncio.Queue[Published] = field(default_factory=asyncio.Queue)
    ended: list[str] = field(default_factory=list)
    sent: list[SipRequest] = field(default_factory=list)
    responses: list[SipResponse] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    notify_body: bytes = b""

    @property
    def now(self) -> float:
        """The clock the cores run on: the event loop's."""
        return asyncio.get_running_loop().time()

    def contact(self) -> str:
        """Our Contact: an IP literal, since Kamailio's presence server sends NOTIFYs to it."""
        return self.endpoint.contact_for("udp")

    # --- incoming requests ---------------------------------------------------------------------

    def on_request(self, incoming: IncomingRequest) -> None:
        """The Endpoint's handler: MESSAGE is kept, SUBSCRIBE/NOTIFY go to their cores."""
        request = incoming.request
        match request.method:
            case "MESSAGE":
                self.messages.put_nowait(incoming)
                incoming.respond(200)
            case "SUBSCRIBE" if request.to_tag is None:
                notifier, effects = Notifier.accept(
                    request,
                    self.now,
                    events=["presence"],
                    contact=self.contact(),
                    state=NotifierState.ACTIVE,
                    body=self.notify_body,
                    content_type=PIDF_TYPE,
                )
                if notifier is not None:
                    self.notifiers.append(notifier)
                self.run(notifier, effects, incoming)
            case "SUBSCRIBE":
                for notifier in self.notifiers:
                    if notifier.dialog.matches(request):
                        self.run(notifier, notifier.handle_subscribe(request, self.now), incoming)
                        return
                incoming.respond(481)
            case "NOTIFY":
                for subscriber in self.subscribers:
                    dialog = subscriber.dialog
                    if (request.call_id, request.to_tag) == (dialog.call_id, dialog.local_tag):
                        effects = subscriber.handle_notify(request, self.now)
                        self.run(subscriber, effects, incoming)
                        return
                incoming.respond(481)
            case _:
                incoming.respond(200)

    # --- effects -------------------------------------------------------------------------------

    def run(
        self, core: Core | None, effects: Sequence[Effect], incoming: IncomingRequest | None = None
    ) -> None:
        """Carry out a core's effects on the Endpoint."""
        for effect in effects:
            match effect:
                case SendResponse(response=response):
                    assert incoming is not None, "a response effect needs the request"
                    incoming.send(response)
                case SendRequest(request=request):
                    assert core is not None
                    self.sent.append(request)
                    task = asyncio.get_running_loop().create_task(self._transact(core, request))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                case StateChanged():
                    self.states.put_nowait(effect)
                case SubscriptionEnded(reason=reason):
                    self.ended.append(reason)
                case Published():
                    self.published.put_nowait(effect)
                case _:
                    self.failures.append(AssertionError(f"unexpected effect {effect!r}"))

    async def _transact(self, core: Core, request: SipRequest) -> None:
        try:
            response = await self.endpoint.request(request)
        except SipError as exc:
            self.failures.append(exc)
            self.run(core, core.handle_timeout(request.cseq[0], self.now))
            return
        self.responses.append(response)
        self.run(core, core.handle_response(response, self.now))

    async def settle(self) -> None:
        """Wait until every request a core sent has its outcome fed back."""
        while self.tasks:
            done, _ = await asyncio.wait(list(self.tasks), timeout=TIMEOUT)
            assert done, f"requests still without an outcome: {self.tasks}"

    async def close(self) -> None:
        """Stop the Endpoint; a core's request that failed is a test failure."""
        for task in list(self.tasks):
            task.cancel()
        await self.endpoint.close()


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    """Start our Endpoint on UDP and TCP of one free port, Kamailio as its outbound proxy."""
    gateways: list[Gateway] = []

    async def make(
        port: int, kamailio: KamailioServer, transport: str = "udp", **kw: object
    ) -> Gateway:
        proxy = kamailio.uri + (";transport=tcp" if transport == "tcp" else "")
        holder: list[Gateway] = []
        endpoint = Endpoint(
            (f"udp:{LOOPBACK}:{port}", f"tcp:{LOOPBACK}:{port}"),
            lambda incoming: holder[0].on_request(incoming),
            outbound_proxy=proxy,
            **kw,  # type: ignore[arg-type]
        )
        gateway = Gateway(endpoint)
        holder.append(gateway)
        await endpoint.start()
        gateways.append(gateway)
        return gateway

    yield make
    for gateway in gateways:
        await gateway.close()


GatewayFactory = Callable[..., Awaitable[Gateway]]


async def _setup(
    kamailio_factory: KamailioFactory, gateway_factory: GatewayFactory, **modes: object
) -> tuple[KamailioServer, Gateway]:
    port = free_port()
    kamailio = kamailio_factory(port, **modes)
    return kamailio, await gateway_factory(port, kamailio)


def _message(to: str, body: str, sender: str = XMPP_BOB) -> SipRequest:
    return make_request(
        "MESSAGE",
        to,
        from_=f"<{sender}>;tag={new_call_id()[:8]}",
        to=f"<{to}>",
        call_id=new_call_id(),
        headers=[("Content-Type", "text/plain;charset=UTF-8")],
        body=body.encode(),
    )


def _presence(entity: str, activity: pidf.Activity | None, note: str) -> bytes:
    person = pidf.Person(
        "p1",
        activities=(activity,) if activity else (),
        notes=(pidf.Note(note),) if note else (),
    )
    doc = pidf.PresenceDocument(
        entity, tuples=(pidf.PresenceTuple("t1", pidf.Basic.OPEN),), persons=(person,)
    )
    return pidf.encode(doc)


async def _buddy_until(
    account: SipAccount, wanted: Callable[[BuddyState], bool], what: str
) -> BuddyState:
    """Buddy states until one is ``wanted``; PJSIP reports each NOTIFY and sub-state change."""
    seen: list[BuddyState] = []
    try:
        while True:
            state = await account.next_buddy_state(TIMEOUT)
            seen.append(state)
            if wanted(state):
                return state
    except TimeoutError:
        raise AssertionError(f"PJSIP never showed {what}; it showed {seen}") from None


async def _state_until(gateway: Gateway, wanted: Callable[[StateChanged], bool]) -> StateChanged:
    seen: list[StateChanged] = []
    try:
        while True:
            state = await asyncio.wait_for(gateway.states.get(), TIMEOUT)
            seen.append(state)
            if wanted(state):
                return state
    except TimeoutError:
        raise AssertionError(
            f"no wanted subscription state; saw {seen}, failures {gateway.failures}"
        ) from None


# --- MESSAGE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_message_from_pjsip_reaches_the_endpoint(
    kamailio_factory: KamailioFactory,
    gateway_factory: GatewayFactory,
    pjsip_agent: PjsipAgent,
    transport: str,
) -> None:
    kamailio, gateway = await _setup(kamailio_factory, gateway_factory)
    alice = await pjsip_agent.add_account("alice", kamailio, transport=transport)
    status = await alice.send_message(XMPP_BOB, "héllo bob", "text/plain; charset=UTF-8")
    assert (status.code, status.to) == (200, XMPP_BOB)
    incoming = await asyncio.wait_for(gateway.messages.get(), TIMEOUT)
    request = incoming.request
    assert request.uri == XMPP_BOB  # RFC 3261 16.6: the proxy keeps the Request-URI
    assert request.body == "héllo bob".encode()
    assert alice.uri in (request.header("From") or "")
    assert XMPP_BOB in (request.header("To") or "")
    # the bottom Via is PJSIP's, on the account's transport; Kamailio's is on top
    vias = request.vias
    assert len(vias) == 2
    assert vias[-1].transport == transport.upper()
    assert incoming.source.host == LOOPBACK and incoming.source.port == kamailio.port


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_message_from_the_endpoint_reaches_pjsip(
    kamailio_factory: KamailioFactory,
    gateway_factory: GatewayFactory,
    pjsip_agent: PjsipAgent,
    transport: str,
) -> None:
    port = free_port()
    kamailio = kamailio_factory(port)
    gateway = await gateway_factory(port, kamailio, transport)
    alice = await pjsip_agent.add_account("alice", kamailio)
    response = await gateway.endpoint.request(_message(alice.uri, "hello alice ✓"))
    assert response.status == 200
    received = await alice.next_message(TIMEOUT)
    assert received.body == "hello alice ✓"
    assert received.content_type.startswith("text/plain")
    assert XMPP_BOB in received.from_uri
    assert alice.uri in received.to_uri
    vias = [v for n, v in received.headers if n.lower() in ("via", "v")]
    assert vias and vias[-1].startswith(f"SIP/2.0/{transport.upper()} {LOOPBACK}:{port}")


# --- SUBSCRIBE / NOTIFY -----------------------------------------------------------------------


async def test_pjsip_watches_an_xmpp_user_through_our_notifier(
    kamailio_factory: KamailioFactory, gateway_factory: GatewayFactory, pjsip_agent: PjsipAgent
) -> None:
    kamailio, gateway = await _setup(kamailio_factory, gateway_factory)
    gateway.notify_body = _presence(XMPP_BOB, None, "at my desk")
    alice = await pjsip_agent.add_account("alice", kamailio)
    await alice.subscribe(XMPP_BOB)

    first = await _buddy_until(alice, lambda s: s.online, "bob online")
    assert first.sub_state == "ACTIVE"
    assert first.note == "at my desk"
    assert len(gateway.notifiers) == 1
    notifier = gateway.notifiers[0]
    # the NOTIFY went through Kamailio: the dialog's route set is its Record-Route
    assert (
        notifier.dialog.route_set and f"{LOOPBACK}:{kamailio.port}" in notifier.dialog.route_set[0]
    )

    away = _presence(XMPP_BOB, pidf.Activity.AWAY, "gone fishing")
    gateway.run(notifier, notifier.notify(gateway.now, away, PIDF_TYPE))
    second = await _buddy_until(alice, lambda s: s.activity == "away", "bob away")
    assert (second.online, second.note) == (True, "gone fishing")
    await gateway.settle()
    notifies = [r for r in gateway.sent if r.method == "NOTIFY"]
    assert [r.body for r in notifies] == [gateway.notify_body, away]
    assert all((r.header("Subscription-State") or "").startswith("active") for r in notifies)
    assert [resp.status for resp in gateway.responses] == [200, 200]

    await alice.unsubscribe(XMPP_BOB)
    await _buddy_until(alice, lambda s: s.sub_state == "TERMINATED", "the subscription ended")
    assert notifier.state is NotifierState.TERMINATED
    assert not gateway.failures


async def _subscribe(gateway: Gateway, target: str) -> Subscriber:
    subscriber = Subscriber(
        local_uri=f"<{XMPP_BOB}>",
        remote_uri=f"<{target}>",
        contact=gateway.contact(),
        event="presence",
        expires=120,
        accept=[PIDF_TYPE],
    )
    gateway.subscribers.append(subscriber)
    gateway.run(subscriber, subscriber.start(gateway.now))
    return subscriber


def _decoded(state: StateChanged) -> pidf.PresenceDocument | None:
    if not state.body:
        return None
    return pidf.decode(state.body, state.content_type)


def _shows(state: StateChanged, activity: pidf.Activity, note: str) -> bool:
    doc = _decoded(state)
    if doc is None or state.state is not SubscriptionState.ACTIVE:
        return False
    person = doc.persons[0] if doc.persons else None
    notes = [n.text for n in (person.notes if person else ())] + [
        n.text for t in doc.tuples for n in t.notes
    ]
    return person is not None and activity in person.activities and note in notes


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
async def test_our_subscriber_watches_a_pjsip_user_at_kamailios_presence_server(
    kamailio_factory: KamailioFactory,
    gateway_factory: GatewayFactory,
    pjsip_agent: PjsipAgent,
    auth: bool,
) -> None:
    port = free_port()
    kamailio = kamailio_factory(port, presence=True, auth_gateway=auth)
    digest = DigestClient(Credentials(GATEWAY_AUTH_USER, GATEWAY_AUTH_PASSWORD, GATEWAY_AUTH_REALM))
    gateway = await gateway_factory(port, kamailio, digest=digest)
    alice = await pjsip_agent.add_account("alice", kamailio, publish=True)
    await alice.publish("busy", "in a meeting")

    subscriber = await _subscribe(gateway, alice.uri)
    busy = await _state_until(gateway, lambda s: _shows(s, pidf.Activity.BUSY, "in a meeting"))
    assert busy.content_type is not None and busy.content_type.startswith(PIDF_TYPE)

    await alice.publish("away", "back soon")
    await _state_until(gateway, lambda s: _shows(s, pidf.Activity.AWAY, "back soon"))

    await gateway.settle()
    # every NOTIFY was answered 200 (the Endpoint's response stats)
    assert gateway.endpoint.stats.by_status.get(200, 0) >= 2
    subscribes = [r for r in gateway.sent if r.method == "SUBSCRIBE"]
    assert len(subscribes) == 1
    statuses = [r.status for r in gateway.responses]
    assert statuses == [200], statuses  # Kamailio answers 200 (SERVERS.md), after any 407
    if auth:
        assert gateway.endpoint.stats.responses_in >= 2  # the 407, then the 200

    gateway.run(subscriber, subscriber.unsubscribe(gateway.now))
    ended = await _state_until(gateway, lambda s: s.state is SubscriptionState.TERMINATED)
    assert ended.state is SubscriptionState.TERMINATED
    assert not gateway.failures


async def test_our_subscriber_watches_a_pjsip_agent_directly(
    kamailio_factory: KamailioFactory, gateway_factory: GatewayFactory, pjsip_agent: PjsipAgent
) -> None:
    # Without a presence server, Kamailio forwards the SUBSCRIBE to alice's registered
    # contact and PJSIP is the notifier itself (with its own online/offline PIDF).
    kamailio, gateway = await _setup(kamailio_factory, gateway_factory)
    alice = await pjsip_agent.add_account("alice", kamailio)
    await alice.publish("busy", "on the phone")
    subscriber = await _subscribe(gateway, alice.uri)
    state = await _state_until(gateway, lambda s: _decoded(s) is not None)
    doc = _decoded(state)
    assert doc is not None
    assert state.state in (SubscriptionState.ACTIVE, SubscriptionState.PENDING)
    assert doc.tuples and doc.tuples[0].basic is pidf.Basic.OPEN
    assert subscriber.dialog.confirmed
    gateway.run(subscriber, subscriber.unsubscribe(gateway.now))
    await _state_until(gateway, lambda s: s.state is SubscriptionState.TERMINATED)
    assert not gateway.failures


# --- PUBLISH ----------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", [False, True], ids=["open", "digest"])
async def test_publish_to_kamailio_is_seen_by_a_pjsip_watcher(
    kamailio_factory: KamailioFactory,
    gateway_factory: GatewayFactory,
    pjsip_agent: PjsipAgent,
    auth: bool,
) -> None:
    port = free_port()
    kamailio = kamailio_factory(port, presence=True, auth_gateway=auth)
    digest = DigestClient(Credentials(GATEWAY_AUTH_USER, GATEWAY_AUTH_PASSWORD, GATEWAY_AUTH_REALM))
    gateway = await gateway_factory(port, kamailio, digest=digest)
    # The gateway publishes for an entity of sip.test; in auth mode it is challenged because
    # its From is in its own domain, as for everything it sends (DESIGN 4.2).
    entity = f"sip:carol@{SIP_DOMAIN}"
    publisher = Publisher(local_uri=f"<{XMPP_BOB}>", remote_uri=f"<{entity}>", expires=120)
    body = _presence(entity, pidf.Activity.BUSY, "publishing")
    gateway.run(publisher, publisher.publish(body, PIDF_TYPE, gateway.now))
    first = await asyncio.wait_for(gateway.published.get(), TIMEOUT)
    assert first.etag and first.expires > 0
    initial = gateway.responses[-1]
    assert (initial.status, initial.header("SIP-ETag")) == (200, first.etag)

    bob = await pjsip_agent.add_account("bob", kamailio)
    await bob.subscribe(entity)
    seen = await _buddy_until(bob, lambda s: s.activity == "busy", "carol busy")
    assert (seen.online, seen.note) == (True, "publishing")

    # Refresh before expiry: drive the core's timer to its deadline (the core takes `now`).
    deadline = publisher.next_deadline()
    assert deadline is not None
    gateway.run(publisher, publisher.handle_timer(deadline))
    refreshed = await asyncio.wait_for(gateway.published.get(), TIMEOUT)
    refresh = gateway.sent[-1]
    assert refresh.method == "PUBLISH"
    assert refresh.header("SIP-If-Match") == first.etag
    assert refresh.body == b""
    assert gateway.responses[-1].status == 200
    assert refreshed.etag == gateway.responses[-1].header("SIP-ETag")
    assert publisher.etag == refreshed.etag
    if auth:
        assert all(
            r.header("Proxy-Authorization") is None for r in gateway.sent
        )  # the cores never see credentials: the Endpoint adds them on the retry
    assert not gateway.failures


# --- Digest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_endpoint_answers_kamailios_challenge(
    kamailio_factory: KamailioFactory,
    gateway_factory: GatewayFactory,
    pjsip_agent: PjsipAgent,
    algorithm: str,
) -> None:
    port = free_port()
    kamailio = kamailio_factory(port, auth_gateway=True, auth_algorithm=algorithm)
    digest = DigestClient(Credentials(GATEWAY_AUTH_USER, GATEWAY_AUTH_PASSWORD, GATEWAY_AUTH_REALM))
    gateway = await gateway_factory(port, kamailio, digest=digest)
    alice = await pjsip_agent.add_account("alice", kamailio)
    before = gateway.endpoint.stats.responses_in
    response = await gateway.endpoint.request(_message(alice.uri, "authenticated"))
    assert response.status == 200
    assert gateway.endpoint.stats.responses_in - before == 2  # 407, then 200
    received = await alice.next_message(TIMEOUT)
    assert received.body == "authenticated"
    assert received.header("Proxy-Authorization") is None

    # without credentials the 407 is the final answer
    plain = await gateway_factory(free_port(), kamailio)
    refused = await plain.endpoint.request(_message(alice.uri, "anonymous"))
    assert refused.status == 407
    assert f"algorithm={algorithm}" in (refused.header("Proxy-Authenticate") or "")
