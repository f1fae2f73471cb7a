"""Hostile input at the gateway's SIP edge: the endpoint, the gate and the real message router.

Requests go in as bytes (``Endpoint._on_message``, no sockets) and their answers are read from
a fake UDP transport; the router's XMPP port records the stanzas instead of writing them. Each
case of DESIGN 3.4 and issue 10 item 9 has a row; the RFC 4475 and RFC 5118 torture messages
are sent rewritten to every method the gateway answers. Never a traceback: always a response,
or for what cannot be answered (a response, a request without Via) a drop.
"""

from __future__ import annotations

import asyncio
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from bench.gateway_path import FakeUdp, fake_udp
from component.addresses import AddressBook, parse_jid
from component.messaging.router import MessageRouter
from component.settings import Settings
from component.sip.gate import SipGate
from component.values import ChatMessage
from component.xmpp.stanzas import format_message, outbound_jids
from sipside.endpoint import ANSWERED_METHODS, Endpoint
from sipside.errors import LocalError
from sipside.message import SipResponse, parse_message
from sipside.peer import Peer
from tests.rfc4475_expectations import EXPECTATIONS, EXPECTATIONS_5118, load

SETTINGS = Settings()
BOOK = AddressBook.from_settings(SETTINGS)
COMPONENT = SETTINGS.xmpp.component
SOURCE = Peer("udp", "127.0.0.1", 5999)
FAILURES = {"sip_handler_failed", "sip_request_failed", "sip_request_task_failed"}


@dataclass
class RecordingXmpp:
    """The router's XMPP port: keeps each stanza as the link would write it."""

    stanzas: list[str] = field(default_factory=list)

    @property
    def connected(self) -> bool:
        return True

    def send_message(self, msg: ChatMessage) -> bool:
        outbound_jids(msg.sender, msg.recipient, COMPONENT)
        self.stanzas.append(format_message(msg))
        return True


class Presence:
    """Presence side of the test: answers 200 to whatever reaches it."""

    async def handle_request(self, incoming: Any) -> None:
        incoming.respond(200)


@dataclass
class Edge:
    endpoint: Endpoint
    gate: SipGate
    xmpp: RecordingXmpp
    udp: FakeUdp

    async def send(self, data: bytes) -> list[bytes]:
        """Feed ``data`` as one message from SOURCE; the answers it caused."""
        before = len(self.udp.sent)
        self.endpoint._on_message(data, SOURCE)
        await self.gate.drain(5.0)
        return self.udp.sent[before:]


@pytest.fixture
async def edge() -> AsyncIterator[Edge]:
    xmpp = RecordingXmpp()
    none = cast(Any, None)  # ports the SIP -> XMPP hot path never touches
    router = MessageRouter(
        BOOK, cast(Any, xmpp), none, none, none, clock=lambda: 0.0, delay_time=30
    )
    gate = SipGate(router, Presence(), book=BOOK)
    endpoint = Endpoint(["udp:127.0.0.1:0"], gate.handle)
    await endpoint.start()
    udp = fake_udp(endpoint)
    yield Edge(endpoint, gate, xmpp, udp)
    await endpoint.close()


def message(
    uri: str,
    body: bytes = b"hi",
    *,
    ctype: str = "text/plain",
    from_uri: str = "sip:alice@sip.test",
    n: int = 1,
) -> bytes:
    head = (
        f"MESSAGE {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKhostile{n}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <{from_uri}>;tag=h{n}\r\n"
        f"To: <{uri}>\r\n"
        f"Call-ID: hostile-{n}@test\r\n"
        "CSeq: 1 MESSAGE\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("utf-8", "surrogateescape") + body


def status_of(data: bytes) -> int:
    response = parse_message(data)
    assert isinstance(response, SipResponse)
    return response.status


JD = "*xmpp.test@jabber.sip.test"
# name: (request URI, body, expected status, whether a stanza leaves)
HOSTILE: dict[str, tuple[str, bytes, int, bool]] = {
    "plain": ("sip:bob" + JD, b"hi", 202, True),
    "quote in localpart": ("sip:bo%22b" + JD, b"hi", 400, False),
    "%00 in localpart": ("sip:bo%00b" + JD, b"hi", 400, False),
    "1000-character localpart": ("sip:" + "b" * 1000 + JD, b"hi", 202, True),
    "1100-character localpart": ("sip:" + "b" * 1100 + JD, b"hi", 400, False),
    "RTL override in localpart": ("sip:bob%E2%80%AE" + JD, b"hi", 400, False),
    "control character in localpart": ("sip:bob%07" + JD, b"hi", 400, False),
    "invalid UTF-8 in localpart": ("sip:bob%FF" + JD, b"hi", 400, False),
    "RTL override in body": ("sip:bob" + JD, "abc\u202edef".encode(), 202, True),
    "control characters in body": ("sip:bob" + JD, b"a\x00b\x07c\x1bd", 202, True),
    "invalid UTF-8 body": ("sip:bob" + JD, b"caf\xe9", 400, False),
    "200 kB body": ("sip:bob" + JD, b"x" * 200_000, 413, False),
    "markup in body": ("sip:bob" + JD, b"</body><message to='evil@x'/>", 202, True),
    "foreign domain": ("sip:bob@elsewhere.example", b"hi", 403, False),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_message(edge: Edge, name: str) -> None:
    uri, body, expected, relayed = HOSTILE[name]
    with capture_logs() as logs:
        [answer] = await edge.send(message(uri, body))
    assert status_of(answer) == expected
    assert len(edge.xmpp.stanzas) == (1 if relayed else 0)
    for stanza in edge.xmpp.stanzas:
        xml = ET.fromstring(stanza)  # well-formed whatever the body held
        assert [child.tag for child in xml].count("message") == 0
        assert parse_jid(xml.get("from", "")).domain == COMPONENT
    assert not [e for e in logs if e["event"] in FAILURES]


@pytest.mark.parametrize(
    "from_uri",
    ['sip:a"b@sip.test', "sip:a%00b@sip.test", "sip:a%E2%80%AEb@sip.test", "sip:a%FFb@sip.test"],
)
async def test_hostile_sender_is_refused_not_relayed(edge: Edge, from_uri: str) -> None:
    [answer] = await edge.send(message("sip:bob" + JD, from_uri=from_uri))
    assert status_of(answer) in (400, 403, 404)
    assert edge.xmpp.stanzas == []


# --- RFC 4475 / RFC 5118 messages, rewritten to each method ------------------------------------

_CSEQ = re.compile(
    rb"(?im)(^cseq[ \t]*:[ \t]*(?:\r\n[ \t]+)?[0-9]+(?:[ \t]|\r\n[ \t])+[ \t]*)[^ \t\r\n]+"
)


def rewrite(raw: bytes, method: str) -> bytes:
    """``raw`` with ``method`` in the start line and every CSeq (responses unchanged)."""
    if raw.startswith(b"SIP/"):
        return raw
    end = raw.find(b"\r\n\r\n")
    head, tail = (raw[:end], raw[end:]) if end >= 0 else (raw, b"")
    space = head.find(b" ")
    if space < 0:
        return raw
    head = method.encode() + head[space:]
    return _CSEQ.sub(rb"\1" + method.encode(), head) + tail


TORTURE = sorted({**EXPECTATIONS, **EXPECTATIONS_5118})


@pytest.mark.parametrize("method", ANSWERED_METHODS)
async def test_torture_messages_as_every_method(edge: Edge, method: str) -> None:
    unanswered = []
    with capture_logs() as logs:
        for name in TORTURE:
            data = rewrite(load(name), method)
            answers = await edge.send(data)
            if data.startswith(b"SIP/"):
                assert answers == [], name  # a response matching nothing is dropped
                continue
            if not answers:
                unanswered.append(name)
            for answer in answers:
                assert status_of(answer) >= 200, name
    assert not [e for e in logs if e["event"] in FAILURES]
    # Every request is answered (with rport-less Vias the answer goes to the Via's sent-by,
    # which the fake transport records as well): by the stack, the gate, or presence.
    assert unanswered == []


async def test_unbracketed_ipv6_request_uri_gets_400(edge: Edge) -> None:
    # RFC 5118 4.2: REGISTER sip:2001:db8::10 must be rejected; so must the same as OPTIONS.
    for method in ("REGISTER", "OPTIONS", "MESSAGE"):
        [answer] = await edge.send(rewrite(load("ipv6-bad"), method))
        assert status_of(answer) == 400, method


# --- no stanza ever leaves with a from outside the component domain ----------------------------


def pieces(alphabet: list[str], min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Strings made of ``alphabet``'s pieces (characters or longer)."""
    return st.lists(st.sampled_from(alphabet), min_size=min_size, max_size=max_size).map("".join)


hostile_text = pieces([*"ab@/.%*\"'<>& =\x00\x07\u202e\ud7ff", "sip.xmpp.test", COMPONENT], 0, 20)


@settings(max_examples=300, deadline=None)
@given(sender=hostile_text, recipient=hostile_text)
def test_checked_stanza_never_leaves_from_elsewhere(sender: str, recipient: str) -> None:
    try:
        outbound_jids(sender, recipient, COMPONENT)
    except LocalError:
        return
    stanza = format_message(ChatMessage(sender=sender, recipient=recipient, body="x", id="1"))
    # the from the server reads, by the one JID parser
    assert parse_jid(ET.fromstring(stanza).get("from", "")).domain == COMPONENT


user_part = pieces([*"ab*%.@;?:\"'<> ", "%00", "%40", "%2A", "%E2%80%AE", "%FF"], 1, 12)
host_part = st.sampled_from(["sip.test", "other.example", "jabber.sip.test", COMPONENT, "1.2.3.4"])


@settings(max_examples=150, deadline=None)
@given(user=user_part, host=host_part)
def test_sip_sender_never_becomes_a_foreign_from(user: str, host: str) -> None:
    asyncio.run(_sip_sender_never_becomes_a_foreign_from(user, host))


async def _sip_sender_never_becomes_a_foreign_from(user: str, host: str) -> None:
    xmpp = RecordingXmpp()
    none = cast(Any, None)
    router = MessageRouter(
        BOOK, cast(Any, xmpp), none, none, none, clock=lambda: 0.0, delay_time=30
    )
    gate = SipGate(router, book=BOOK)
    endpoint = Endpoint(["udp:127.0.0.1:0"], gate.handle)
    await endpoint.start()
    udp = fake_udp(endpoint)
    try:
        endpoint._on_message(message("sip:bob" + JD, from_uri=f"sip:{user}@{host}"), SOURCE)
        await gate.drain(5.0)
    finally:
        await endpoint.close()
    assert len(udp.sent) <= 1
    for stanza in xmpp.stanzas:
        assert parse_jid(ET.fromstring(stanza).get("from", "")).domain == COMPONENT
