"""The SIP adapter's edge: what it answers itself, and what reaches the core."""

from __future__ import annotations

from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from component.addresses import AddressBook
from component.errors import Refusal, not_found
from component.ratelimit import SourceBuckets
from component.settings import Settings
from component.sip.gate import SipGate
from component.store import StoreUnavailable
from component.values import SipAnswer, SipText
from sipside.errors import PeerError
from sipside.message import SipRequest
from sipside.peer import Peer

BOOK = AddressBook.from_settings(Settings())
SOURCE = Peer("udp", "127.0.0.1", 5060)


class FakeIncoming:
    def __init__(self, request: SipRequest, source: Peer = SOURCE) -> None:
        self.request = request
        self.source = source
        self.answered = False
        self.responses: list[tuple[int, dict[str, str]]] = []

    def respond(self, status: int, reason: str | None = None, *, headers: Any = ()) -> None:
        self.answered = True
        self.responses.append((status, dict(headers)))


class Core:
    """A message core: answers at once, or later with ``later`` (or raising it)."""

    def __init__(self) -> None:
        self.seen: list[SipText] = []
        self.now: SipAnswer | Exception | None = SipAnswer(202, "Accepted")
        self.later: SipAnswer | Exception = SipAnswer(202, "Accepted")

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        self.seen.append(msg)
        if isinstance(self.now, Exception):
            raise self.now
        return self.now

    async def answer_later(self, msg: SipText) -> SipAnswer:
        if isinstance(self.later, Exception):
            raise self.later
        return self.later


class Presence:
    """A presence handler: answers 200 itself, or raises ``error`` before answering."""

    def __init__(self) -> None:
        self.handled: list[FakeIncoming] = []
        self.error: Exception | None = None
        self.answers = True

    async def handle_request(self, incoming: Any) -> None:
        self.handled.append(incoming)
        if self.error is not None:
            raise self.error
        if self.answers:
            incoming.respond(200)


def _request(
    method: str,
    *,
    to_tag: str | None = None,
    ctype: str = "text/plain",
    body: bytes = b"hi",
    uri: str = "sip:bob*xmpp.test@jabber.sip.test",
    sender: str = "alice",
) -> SipRequest:
    to = f"<{uri}>" + (f";tag={to_tag}" if to_tag else "")
    return SipRequest(
        method,
        uri,
        (
            ("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1"),
            ("From", f'"Alice" <sip:{sender}@sip.test>;tag=a'),
            ("To", to),
            ("Call-ID", "c1"),
            ("CSeq", f"1 {method}"),
            ("Content-Type", ctype),
        ),
        body,
    )


def _gate() -> tuple[SipGate, Core, Presence]:
    core, presence = Core(), Presence()
    return SipGate(core, presence, book=BOOK), core, presence


def test_message_reaches_core_with_decoded_text() -> None:
    gate, core, _ = _gate()
    incoming = FakeIncoming(_request("MESSAGE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == 202
    [text] = core.seen
    assert (text.from_uri, text.from_display, text.body) == ("sip:alice@sip.test", "Alice", "hi")


@pytest.mark.parametrize(
    ("ctype", "status", "header"),
    [("image/png", 415, "Accept"), ("text/plain; charset=nope", 400, None)],
)
def test_bad_bodies_answered_at_the_edge(ctype: str, status: int, header: str | None) -> None:
    gate, core, _ = _gate()
    incoming = FakeIncoming(_request("MESSAGE", ctype=ctype))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == status
    if header:
        assert header in incoming.responses[0][1]
    assert core.seen == []


async def test_stopping_refuses_new_work_but_lets_in_dialog_requests_through() -> None:
    gate, core, presence = _gate()
    gate.accepting = False
    message = FakeIncoming(_request("MESSAGE"))
    gate.handle(message)  # type: ignore[arg-type]
    assert message.responses == [(503, {"Retry-After": "30"})]
    assert core.seen == []
    notify = FakeIncoming(_request("NOTIFY", to_tag="t1"))
    gate.handle(notify)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert notify.responses[0][0] == 200 and presence.handled == [notify]
    out_of_dialog = FakeIncoming(_request("NOTIFY"))
    gate.handle(out_of_dialog)  # type: ignore[arg-type]
    assert out_of_dialog.responses[0][0] == 503


@pytest.mark.parametrize(("method", "status"), [("PUBLISH", 489), ("REGISTER", 405)])
def test_presence_methods_without_presence(method: str, status: int) -> None:
    gate = SipGate(Core(), book=BOOK)
    incoming = FakeIncoming(_request(method))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == status


def test_other_methods_not_allowed() -> None:
    gate, core, presence = _gate()
    incoming = FakeIncoming(_request("INFO"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses[0][0] == 405
    assert core.seen == [] and presence.handled == []


@pytest.mark.parametrize("method", ["SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER"])
async def test_presence_methods_reach_the_presence_handler(method: str) -> None:
    gate, core, presence = _gate()
    incoming = FakeIncoming(_request(method))
    gate.handle(incoming)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert presence.handled == [incoming] and incoming.responses == [(200, {})]
    assert core.seen == []


@pytest.mark.parametrize(
    ("error", "status", "headers"),
    [
        (not_found("no such user"), 404, {"Warning": '399 sipxmpp "no such user"'}),
        (
            PeerError(481, "Call/Transaction Does Not Exist", 'no "dialog"'),
            481,
            {"Warning": '399 sipxmpp "no \\"dialog\\""'},
        ),
        (StoreUnavailable("down"), 503, {"Retry-After": "30"}),
        (RuntimeError("bug"), 500, {}),
    ],
)
async def test_presence_errors_become_responses(
    error: Exception, status: int, headers: dict[str, str]
) -> None:
    gate, _, presence = _gate()
    presence.error = error
    incoming = FakeIncoming(_request("SUBSCRIBE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert incoming.responses == [(status, headers)]


async def test_presence_handler_that_does_not_answer_gets_500() -> None:
    gate, _, presence = _gate()
    presence.answers = False
    incoming = FakeIncoming(_request("NOTIFY"))
    gate.handle(incoming)  # type: ignore[arg-type]
    await gate.drain(5.0)
    assert incoming.responses == [(500, {})]


def test_refusal_on_the_hot_path_is_answered_at_once() -> None:
    gate, core, _ = _gate()
    core.now = Refusal(403, "Forbidden", "forbidden", "no relaying")
    incoming = FakeIncoming(_request("MESSAGE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses == [(403, {"Warning": '399 sipxmpp "no relaying"'})]


@pytest.mark.parametrize(
    ("later", "status", "headers"),
    [
        (SipAnswer(202, "Accepted"), 202, {}),
        (Refusal(503, "Service Unavailable", "x", retry_after=30), 503, {"Retry-After": "30"}),
    ],
)
async def test_slow_path_answers_when_done(
    later: SipAnswer | Exception, status: int, headers: dict[str, str]
) -> None:
    gate, core, _ = _gate()
    core.now, core.later = None, later
    incoming = FakeIncoming(_request("MESSAGE"))
    gate.handle(incoming)  # type: ignore[arg-type]
    assert incoming.responses == []
    await gate.drain(5.0)
    assert incoming.responses == [(status, headers)]


async def test_overload_refuses_before_starting_work() -> None:
    core, presence = Core(), Presence()
    gate = SipGate(core, presence, book=BOOK, max_pending=1)
    core.now = None
    first, second = FakeIncoming(_request("MESSAGE")), FakeIncoming(_request("MESSAGE"))
    gate.handle(first)  # type: ignore[arg-type]
    gate.handle(second)  # type: ignore[arg-type]
    assert second.responses == [(503, {"Retry-After": "5"})]
    await gate.drain(5.0)
    assert first.responses == [(202, {})]


# --- OPTIONS (RFC 3261 11.2) and 405 (21.4.6) ---------------------------------------------------

OPTIONS_CASES = [
    # the gateway itself: keep-alive probes name no user
    ("sip:jabber.sip.test", 200),
    ("sip:127.0.0.1:5070", 200),
    # addresses it serves: jdomain, occupant, alias, registrar
    ("sip:alice*xmpp.test@jabber.sip.test", 200),
    ("sip:nick*room*conference.xmpp.test@jabber.sip.test", 200),
    ("sip:%23chan*irc.example.net@irc.xmpp.test", 200),
    ("sip:jabber_gateway@sip.test", 200),
    ("sip:" + "a" * 1000 + "*xmpp.test@jabber.sip.test", 200),
    # invalid addresses of its domains (hostile ones too): not found here
    ("sip:*xmpp.test@jabber.sip.test", 404),
    ("sip:al%22ice*xmpp.test@jabber.sip.test", 404),
    ("sip:a%00b*xmpp.test@jabber.sip.test", 404),
    ("sip:bob%07*xmpp.test@jabber.sip.test", 404),
    ("sip:bob%E2%80%AE*xmpp.test@jabber.sip.test", 404),
    ("sip:bob%ff*xmpp.test@jabber.sip.test", 404),
    ("sip:" + "a" * 1100 + "*xmpp.test@jabber.sip.test", 404),
    ("sip:alice*xmpp..test@jabber.sip.test", 404),
    # home users are the proxy's; other domains are not relayed (DESIGN 3.4)
    ("sip:alice@sip.test", 404),
    ("sip:alice@elsewhere.example", 403),
]


@pytest.mark.parametrize(("uri", "status"), OPTIONS_CASES)
def test_options_answers_for_what_the_uri_addresses(uri: str, status: int) -> None:
    gate, core, presence = _gate()
    incoming = FakeIncoming(_request("OPTIONS", uri=uri, body=b""))
    gate.handle(incoming)  # type: ignore[arg-type]
    [(answered, headers)] = incoming.responses
    assert answered == status
    if status == 200:
        assert headers["Allow"] == "MESSAGE, SUBSCRIBE, NOTIFY, PUBLISH, REGISTER, OPTIONS"
        assert headers["Accept"] == (
            "text/plain, message/cpim, text/html, application/im-iscomposing+xml"
        )
    else:
        assert "Warning" in headers
    assert core.seen == [] and presence.handled == []


@pytest.mark.parametrize(
    ("method", "presence"), [("NOTIFY", False), ("REGISTER", False), ("INFO", True)]
)
def test_every_405_carries_allow(method: str, presence: bool) -> None:
    gate = _gate()[0] if presence else SipGate(Core(), book=BOOK)
    incoming = FakeIncoming(_request(method))
    gate.handle(incoming)  # type: ignore[arg-type]
    [(status, headers)] = incoming.responses
    assert status == 405
    assert headers["Allow"] == gate.allow
    assert method not in headers["Allow"].split(", ")


def test_without_presence_options_allows_what_is_not_405() -> None:
    bare = SipGate(Core(), book=BOOK)
    options = FakeIncoming(_request("OPTIONS", body=b""))
    bare.handle(options)  # type: ignore[arg-type]
    assert options.responses[0][1]["Allow"] == "MESSAGE, SUBSCRIBE, PUBLISH, OPTIONS"


# --- per-source rate limit (DESIGN 8) -----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _limited_gate(rate: float = 1.0, burst: int = 2) -> tuple[SipGate, Core, Clock]:
    clock = Clock()
    gate = SipGate(
        Core(),
        Presence(),
        book=BOOK,
        rate=SourceBuckets(rate, burst, log_every=5),
        proxies=frozenset({"10.0.0.1"}),
        clock=clock,
    )
    return gate, cast(Core, gate.messages), clock


def _send(gate: SipGate, source: str, *, sender: str = "alice", to_tag: str | None = None) -> int:
    request = _request("MESSAGE", to_tag=to_tag, sender=sender)
    incoming = FakeIncoming(request, Peer("udp", source, 5060))
    gate.handle(incoming)  # type: ignore[arg-type]
    return incoming.responses[0][0] if incoming.responses else 0


def test_flooding_address_is_refused_before_parsing_and_others_are_not() -> None:
    gate, _, _ = _limited_gate()
    with capture_logs() as logs:
        flood = [gate.admit_source("192.0.2.7", 0.0) for _ in range(12)]
        other = [gate.admit_source("192.0.2.8", 0.0) for _ in range(2)]
    assert flood == [None, None] + [1] * 10  # 1 request/s: a token back within a second
    assert other == [None, None]
    assert gate.refusals["rate_limited"] == 10
    lines = [e for e in logs if e["event"] == "sip_request_rate_limited"]
    assert [e["refused"] for e in lines] == [1, 6]  # one line per 5 refusals
    assert {e["source"] for e in lines} == {"192.0.2.7"}
    assert [gate.admit_source("192.0.2.7", 1.0) for _ in range(2)] == [None, 1]
    # the proxy's address is never refused here: its senders are limited one by one
    assert {gate.admit_source("10.0.0.1", 0.0) for _ in range(10)} == {None}
    assert SipGate(Core(), book=BOOK).admit_source("192.0.2.7", 0.0) is None  # no limit set


def test_sender_behind_the_proxy_gets_503_with_retry_after() -> None:
    gate, core, clock = _limited_gate(rate=0.25, burst=1)
    with capture_logs() as logs:
        assert _send(gate, "10.0.0.1") == 202
        incoming = FakeIncoming(_request("MESSAGE"), Peer("udp", "10.0.0.1", 5060))
        gate.handle(incoming)  # type: ignore[arg-type]
    [(status, headers)] = incoming.responses
    assert (status, headers["Retry-After"]) == (503, "4")
    assert "too many requests" in headers["Warning"]
    assert len(core.seen) == 1 and gate.refusals["rate_limited"] == 1
    [line] = [e for e in logs if e["event"] == "sip_request_rate_limited"]
    assert (line["source"], line["call_id"]) == ("sip:alice@sip.test", "c1")
    clock.now = 4.0
    assert _send(gate, "10.0.0.1") == 202


def test_behind_the_proxy_each_sender_has_its_own_bucket() -> None:
    gate, _, _ = _limited_gate(burst=1)
    assert [_send(gate, "10.0.0.1", sender="alice") for _ in range(2)] == [202, 503]
    assert _send(gate, "10.0.0.1", sender="bob") == 202


async def test_in_dialog_requests_are_not_limited() -> None:
    gate, _, _ = _limited_gate(burst=1)
    statuses = [_send(gate, "10.0.0.1", to_tag="t1") for _ in range(5)]
    await gate.drain(5.0)
    assert gate.refusals["rate_limited"] == 0
    assert statuses.count(503) == 0
