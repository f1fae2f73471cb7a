"""XMPP -> SIP chat without a task per message: ``Endpoint.send`` with a callback,
``SipSender.start_text`` and the router's use of them agree with the general, awaited path."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.gateway_path import FakeUdp, fake_udp
from bench.hotpath import answer_200
from component.messaging.router import MessageRouter
from component.sip.sender import SipSender
from component.store.memory import MemoryStore
from component.values import ChatMessage
from sipside.digest import Credentials, DigestClient
from sipside.endpoint import Endpoint, Final, make_request
from sipside.errors import LocalError, TransactionTimeout, TransportError
from sipside.headers import Via
from sipside.message import SipResponse, _serialize, new_call_id
from sipside.peer import Peer
from tests.test_messaging import BOOK, Clock, FakeCommands, FakeXmpp
from tests.test_messaging_order import ScriptedSip

PROXY = Peer("udp", "127.0.0.1", 5060)
FROM, TO = "sip:carol*xmpp.test@jabber.sip.test", "sip:alice@sip.test"


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[Endpoint, FakeUdp]]:
    """An endpoint whose UDP socket is a fake that keeps what is sent."""
    ep = Endpoint(["udp:127.0.0.1:0"], outbound_proxy="sip:127.0.0.1:5060")
    await ep.start(lambda incoming: None)
    fake = fake_udp(ep)
    yield ep, fake
    await ep.close()


def _unique(data: bytes) -> bytes:
    """A request with what is new each time (branch, tag, Call-ID) blanked out."""
    data = re.sub(rb"branch=z9hG4bK[0-9a-f]+", b"branch=z9hG4bK-", data)
    data = re.sub(rb";tag=[0-9a-f]+", b";tag=-", data)
    return re.sub(rb"Call-ID: \S+", b"Call-ID: -", data)


# --- the endpoint ------------------------------------------------------------------------------


async def test_send_hands_the_final_response_to_the_callback(
    endpoint: tuple[Endpoint, FakeUdp],
) -> None:
    ep, udp = endpoint
    finals: list[Final] = []
    request = make_request(
        "MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id=new_call_id(), body=b"hi"
    )
    ep.send(request, finals.append)
    [sent] = udp.sent
    assert finals == []
    ep._on_datagram(answer_200(sent).replace(b"200 OK", b"180 Ringing"), PROXY)
    assert finals == []  # provisional: not final
    ep._on_datagram(answer_200(sent), PROXY)
    ep._on_datagram(answer_200(sent), PROXY)  # a retransmitted 200 is absorbed
    [final] = finals
    assert isinstance(final, SipResponse) and final.status == 200


async def test_send_and_request_write_the_same_request(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, udp = endpoint
    request = make_request(
        "MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id="c1", body=b"hi"
    )
    ep.send(request, lambda final: None)
    waiting = asyncio.ensure_future(ep.request(request))
    await asyncio.sleep(0)
    first, second = udp.sent
    assert _unique(first) == _unique(second)
    ep._on_datagram(answer_200(second), PROXY)
    assert (await waiting).status == 200


async def test_send_reports_the_timeout(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, udp = endpoint
    finals: list[Final] = []
    request = make_request("MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id="c2")
    ep.send(request, finals.append)
    loop_now = asyncio.get_running_loop().time()
    # RFC 3261 17.1.2.2: Timer E retransmits, Timer F (64*T1) ends it with a timeout.
    ep._run(ep._layer.handle_timer(loop_now + 1.0))
    assert len(udp.sent) >= 2 and finals == []
    ep._run(ep._layer.handle_timer(loop_now + 64 * 0.5 + 1))
    [final] = finals
    assert isinstance(final, TransactionTimeout)


async def test_send_never_calls_back_before_it_returns(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, _ = endpoint
    ep._udp[socket.AF_INET].transport = None  # the request cannot be written at all
    finals: list[Final] = []

    def done(final: Final) -> None:
        assert sending is False
        finals.append(final)

    request = make_request("MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id="c3")
    sending = True
    ep.send(request, done)
    sending = False
    assert finals == []
    await asyncio.sleep(0)
    [final] = finals
    assert isinstance(final, TransportError)


async def test_close_fails_what_is_pending(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, _ = endpoint
    finals: list[Final] = []
    request = make_request("MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id="c4")
    ep.send(request, finals.append)
    await ep.close()
    [final] = finals
    assert isinstance(final, TransportError)
    with pytest.raises(TransportError):
        ep.send(request, finals.append)


async def test_a_failing_callback_leaves_the_transaction_layer_whole(
    endpoint: tuple[Endpoint, FakeUdp],
) -> None:
    ep, udp = endpoint

    def broken(final: Final) -> None:
        raise RuntimeError("the caller's bug")

    request = make_request("MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id="c5")
    ep.send(request, broken)
    ep._on_datagram(answer_200(udp.sent[0]), PROXY)
    assert ep._pending == {}
    assert ep.transactions == (1, 0)  # Completed, absorbing retransmissions until Timer K


# --- the sender --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", ["Hello Alice", 'héllo <&> "quoted"\r\nline two', "", "long " * 400]
)
async def test_start_text_writes_what_send_text_writes(
    endpoint: tuple[Endpoint, FakeUdp], body: str
) -> None:
    ep, udp = endpoint
    sender = SipSender(ep)
    statuses: list[int] = []
    assert sender.start_text(from_uri=FROM, to_uri=TO, body=body, done=statuses.append)
    waiting = asyncio.ensure_future(sender.send_text(from_uri=FROM, to_uri=TO, body=body))
    await asyncio.sleep(0)
    fast, general = udp.sent
    assert _unique(fast) == _unique(general)
    ep._on_datagram(answer_200(fast).replace(b"200 OK", b"486 Busy Here"), PROXY)
    ep._on_datagram(answer_200(general).replace(b"200 OK", b"486 Busy Here"), PROXY)
    assert statuses == [await waiting] == [486]


async def test_a_templated_request_is_retransmitted_as_written(
    endpoint: tuple[Endpoint, FakeUdp],
) -> None:
    ep, udp = endpoint
    statuses: list[int] = []
    sender = SipSender(ep)
    for body in ("one", "two"):  # the second from the conversation's template, kept
        assert sender.start_text(from_uri=FROM, to_uri=TO, body=body, done=statuses.append)
    first, second = udp.sent
    assert _unique(first) == _unique(second).replace(b"two", b"one")
    assert first.split(b"\r\n")[1] != second.split(b"\r\n")[1]  # a branch each
    # RFC 3261 17.1.2.2: Timer E resends the very same bytes
    ep._run(ep._layer.handle_timer(asyncio.get_running_loop().time() + 0.6))
    assert udp.sent[2:] == [first, second]
    ep._on_datagram(answer_200(second), PROXY)
    ep._on_datagram(answer_200(first), PROXY)
    assert statuses == [200, 200]


async def test_with_digest_credentials_no_template_is_made() -> None:
    ep = Endpoint(
        ["udp:127.0.0.1:0"],
        outbound_proxy="sip:127.0.0.1:5060",
        digest=DigestClient(Credentials("gw", "secret")),
    )
    await ep.start(lambda incoming: None)
    fake = fake_udp(ep)
    try:
        statuses: list[int] = []
        sender = SipSender(ep)
        assert sender.start_text(from_uri=FROM, to_uri=TO, body="x", done=statuses.append)
        assert sender._templates == {(FROM, TO): None}
        [sent] = fake.sent
        ep._on_datagram(answer_200(sent), PROXY)
        assert statuses == [200]
    finally:
        await ep.close()


async def test_a_template_needs_its_marks(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, _ = endpoint
    unmarked = make_request("MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id="c7")
    with pytest.raises(LocalError):
        ep.template(unmarked)


async def test_start_text_maps_a_timeout_to_408(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, _ = endpoint
    statuses: list[int] = []
    assert SipSender(ep).start_text(from_uri=FROM, to_uri=TO, body="x", done=statuses.append)
    ep._run(ep._layer.handle_timer(asyncio.get_running_loop().time() + 100))
    assert statuses == [408]


async def test_start_text_declines_while_closing(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, _ = endpoint
    await ep.close()
    statuses: list[int] = []
    assert not SipSender(ep).start_text(from_uri=FROM, to_uri=TO, body="x", done=statuses.append)
    assert statuses == []


# --- the router --------------------------------------------------------------------------------


class CallbackSip(ScriptedSip):
    """The scripted SIP side, plain text started with a callback: each answer comes from the
    event loop later, as the endpoint's do."""

    def __init__(self, status_for: dict[str, list[int]] | None = None) -> None:
        super().__init__(status_for)
        self.started = 0
        self._owner: set[asyncio.Task[None]] = set()

    def start_text(
        self, *, from_uri: str, to_uri: str, body: str, done: Callable[[int], None]
    ) -> bool:
        self.started += 1

        async def answer() -> None:
            done(await self.send_text(from_uri=from_uri, to_uri=to_uri, body=body))

        task = asyncio.ensure_future(answer())
        self._owner.add(task)
        task.add_done_callback(self._owner.discard)
        return True


SCRIPT = {
    "a2": [480],  # offline: stored, and the rest of the conversation behind it
    "b0": [404],  # a user never seen: refused
    "b3": [500],  # refused
    "c1": [408],
}


def _burst() -> list[ChatMessage]:
    messages = []
    for i in range(5):
        for who in ("a", "b", "c"):
            to = f"{who}{'lice' if who == 'a' else 'ob'}@sip.xmpp.test"
            messages.append(ChatMessage(f"{who}x@xmpp.test/r", to, f"{who}{i}", id=f"{who}{i}"))
    return messages


@pytest.mark.parametrize("max_inflight", [1, 2, 20])
async def test_callbacks_route_as_the_awaited_path_does(max_inflight: int) -> None:
    outcomes = []
    for sip in (ScriptedSip(SCRIPT), CallbackSip(SCRIPT)):
        store, xmpp = MemoryStore(), FakeXmpp()
        router = MessageRouter(
            BOOK,
            xmpp,
            sip,
            store,
            FakeCommands(),
            clock=Clock(),
            delay_time=90.0,
            max_inflight=max_inflight,
        )
        await router.resume()
        for msg in _burst():
            work = router.take_xmpp_message(msg)
            if work is not None:
                router._tasks.own(work)
        await router.settle(30)
        queued = await store.waiting_messages()
        assert sip.most_pair_inflight == 1
        outcomes.append(
            (
                {to: sip.bodies_to(to) for to in {t for _, t, _ in sip.sent}},
                dict(router.counters),
                sorted((m.direction, m.recipient, m.body) for m in queued),
                sorted((e.id or "", e.condition) for e in xmpp.errors),
            )
        )
    assert outcomes[0] == outcomes[1]
    assert isinstance(sip, CallbackSip) and sip.started > 0  # the callback path was taken
    assert outcomes[0][1]["xmpp_to_sip"] > 0 and outcomes[0][2] and outcomes[0][3]


async def test_the_next_message_goes_from_the_answer_itself() -> None:
    """No task and no event-loop turn between a final answer and the next MESSAGE."""
    waiting: list[Callable[[int], None]] = []

    class Held(ScriptedSip):
        def start_text(
            self, *, from_uri: str, to_uri: str, body: str, done: Callable[[int], None]
        ) -> bool:
            self.sent.append((from_uri, to_uri, body))
            waiting.append(done)
            return True

    sip, store = Held(), MemoryStore()
    router = MessageRouter(
        BOOK, FakeXmpp(), sip, store, FakeCommands(), clock=Clock(), delay_time=90.0
    )
    await router.resume()
    await router.queue.saw_user(TO)  # recorded once, in the store: not on every message
    for i in range(3):
        msg = ChatMessage("carol@xmpp.test/r", "alice@sip.xmpp.test", f"m{i}", id=f"m{i}")
        assert router.take_xmpp_message(msg) is None  # nothing to await, no task
    assert [body for _, _, body in sip.sent] == ["m0"]  # one in flight per conversation
    waiting.pop()(200)
    assert [body for _, _, body in sip.sent] == ["m0", "m1"]
    waiting.pop()(200)
    waiting.pop()(200)
    assert [body for _, _, body in sip.sent] == ["m0", "m1", "m2"]
    assert router.counters["xmpp_to_sip"] == 3 and len(router._tasks) == 0
    assert router.conversations.inflight == 0 and router._idle.is_set()


# --- the request as written ---------------------------------------------------------------------


async def test_the_top_via_written_is_the_via_formatted(endpoint: tuple[Endpoint, FakeUdp]) -> None:
    ep, udp = endpoint
    request = make_request("MESSAGE", TO, from_=f"<{FROM}>;tag=t1", to=f"<{TO}>", call_id="c6")
    ep.send(request, lambda final: None)
    [sent] = udp.sent
    value = sent.split(b"\r\n")[1].decode().removeprefix("Via: ")
    via = Via._parse(value)  # not the remembered object: parsed afresh
    assert str(via) == value and via.param("rport") == "" and via.branch is not None


@given(
    st.lists(st.tuples(st.sampled_from(["To", "X-a", "Via"]), st.text(max_size=8)), max_size=6),
    st.binary(max_size=8),
)
def test_serialize_writes_each_header_as_name_colon_value(
    headers: list[tuple[str, str]], body: bytes
) -> None:
    lines = ["START", *[f"{name}: {value}" for name, value in headers]]
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    expected = "\r\n".join(lines).encode() + body
    assert _serialize("START", tuple(headers), body) == expected
