"""RFC 4475 and RFC 5118 torture messages sent to a running Endpoint over UDP and over TCP.

Every row of ``tests/rfc4475_expectations.py`` is sent as it is and, where the table says the
copy keeps the point of the test, rewritten to MESSAGE. One fresh Endpoint per case (the RFC
messages share branches and sent-by values, so on one endpoint a later message would be taken
for a retransmission of an earlier one, RFC 3261 17.2.3). After each message a valid OPTIONS
must still get 200 from the application: the endpoint is alive and its handler still runs.

How the messages are adapted, and nothing else is touched:

- UDP: the datagram comes from a raw socket on 127.0.0.1 whose port is not the Via sent-by port,
  so ``;rport`` is appended to the first value of the top Via (RFC 3581: answer to the source
  port). Messages rejected at parse time are answered to the source address anyway (RFC 3261
  18.2.2 cannot be followed for them); for the others rport is the only way back to the socket.
- TCP: the bytes are sent unchanged on a connection; responses come back on it (18.2.2).

The probe shows order without sleeping: the endpoint handles one socket's input in order, so
whatever the torture message caused has been sent before the probe's response.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import pytest

from sipside.endpoint import Endpoint, IncomingRequest
from sipside.framing import StreamFramer
from sipside.message import SipRequest, SipResponse, parse_message
from tests.rfc4475_expectations import (
    EXPECTATIONS,
    EXPECTATIONS_5118,
    Expectation,
    load,
    rewrite_to_message,
)

ALL: dict[str, Expectation] = {**EXPECTATIONS, **EXPECTATIONS_5118}
TIMEOUT = 3.0

# Rows whose accepted request the endpoint itself answers though the table leaves it to the
# application (app_status None): BYE is a method the gateway knows but does not serve, so
# DESIGN 7 has the endpoint answer 405 with Allow before any handler runs. Reported to the
# table's owner; kept here rather than edited into the table.
TABLE_DISPUTES: dict[str, int] = {}

# Media types the test application reads in a MESSAGE (DESIGN 4.1); others get 415. multipart
# bodies are left to the routing code (it looks for a readable part): the table says so too.
READABLE_TYPES = frozenset({"text/plain", "text/html", "message/cpim"})


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    """What a stream does with a message that Content-Length does not frame exactly (RFC 3261
    18.3: on a stream, Content-Length alone delimits a message)."""

    answered: bool  # the first message is framed and answered as on UDP
    then: tuple[int, ...]  # statuses of further requests the bytes hold, in order
    closes: bool  # framing is lost: the endpoint closes the connection without a response


STREAM_OUTCOMES: dict[str, StreamOutcome] = {
    # Content-Length larger than what was sent: the stream waits for the rest.
    "baddn": StreamOutcome(False, (), False),
    "clerr": StreamOutcome(False, (), False),
    # No usable Content-Length (missing, negative, two values): framing is lost at once.
    "inv2543": StreamOutcome(False, (), True),
    "mcl01": StreamOutcome(False, (), True),
    "ncl": StreamOutcome(False, (), True),
    # A REGISTER, then an INVITE (answered 405) whose body runs past its Content-Length: the
    # leftover bytes have no Content-Length, so the connection is closed after both answers.
    "dblreq": StreamOutcome(True, (405,), True),
    # Content-Length short of the body: the message is framed and answered; the leftover
    # bytes are the start of a next message that never completes.
    "ipv6-in-sdp": StreamOutcome(True, (), False),
    "mult-ip-in-sdp": StreamOutcome(True, (), False),
    "ipv4-mapped-ipv6": StreamOutcome(True, (), False),
}


def application(incoming: IncomingRequest) -> None:
    """The trivial gateway application: 200 to everything, 415 to a MESSAGE it cannot read."""
    request = incoming.request
    if request.method == "MESSAGE" and request.body:
        media = (request.header("Content-Type") or "").split(";")[0].strip().lower()
        if media not in READABLE_TYPES and not media.startswith("multipart/"):
            incoming.respond(415, headers=[("Accept", ", ".join(sorted(READABLE_TYPES)))])
            return
    incoming.respond(200)


@dataclass(frozen=True, slots=True)
class Case:
    """One message to send: a table row, as it is or rewritten to MESSAGE."""

    name: str
    as_message: bool

    @property
    def raw(self) -> bytes:
        """The bytes of the message (before the UDP adaptation)."""
        raw = load(self.name)
        return rewrite_to_message(raw) if self.as_message else raw

    @property
    def expected(self) -> int | None:
        """The status the endpoint answers with; None for no response at all."""
        row = ALL[self.name]
        if self.raw.startswith(b"SIP/"):
            return None  # a response matching no transaction is dropped (RFC 3261 18.1.2)
        status = row.as_message_status if self.as_message else row.status
        assert status != "n/a"
        if status is not None:
            return status
        app = row.as_message_app_status if self.as_message else row.app_status
        if app is None and not self.as_message:
            app = TABLE_DISPUTES.get(self.name)
        return app if app is not None else 200


CASES = [Case(name, False) for name in sorted(ALL)] + [
    Case(name, True) for name in sorted(ALL) if ALL[name].as_message_status != "n/a"
]
IDS = [f"{c.name}{'-as-message' if c.as_message else ''}" for c in CASES]

_VIA_NAME = re.compile(rb"(?im)^(?:via|v)[ \t]*:")


def with_rport(raw: bytes) -> bytes:
    """``raw`` with ``;rport`` at the end of the first value of the top Via field.

    The field may be folded over several lines and hold several values; every other byte,
    including the odd whitespace and the parameters under test, is kept.
    """
    end = raw.find(b"\r\n\r\n")
    match = _VIA_NAME.search(raw, 0, end if end >= 0 else len(raw))
    assert match is not None, "every torture request has a Via"
    start = stop = match.end()
    while True:  # the field ends at a line break not followed by whitespace (folding)
        stop = raw.find(b"\r\n", stop)
        if stop < 0:
            stop = len(raw)
            break
        if raw[stop + 2 : stop + 3] not in (b" ", b"\t"):
            break
        stop += 2
    comma = raw.find(b",", start, stop)
    at = comma if comma >= 0 else stop
    return raw[:at] + b";rport" + raw[at:]


def probe(port: int, transport: str, number: int) -> tuple[bytes, str]:
    """A valid OPTIONS for the application, and its Call-ID."""
    call_id = f"probe-{number}@torture.test"
    via_transport = transport.upper()
    data = (
        f"OPTIONS sip:probe@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{via_transport} 127.0.0.1:9;branch=z9hG4bKprobe{number};rport\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:tester@torture.test>;tag=probe\r\n"
        "To: <sip:probe@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {number} OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()
    return data, call_id


def _response(data: bytes) -> SipResponse:
    message = parse_message(data)
    assert isinstance(message, SipResponse), data[:80]
    return message


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    ep = Endpoint(("udp:127.0.0.1:0", "tcp:127.0.0.1:0"), application)
    await ep.start()
    yield ep
    await ep.close()


def check_headers(case: Case, response: SipResponse) -> None:
    """The fields a status promises (RFC 3261 21.4.6, 21.4.15, 8.2.2.3)."""
    if response.status == 405:
        assert "MESSAGE" in (response.header("Allow") or "")
    if response.status == 420:
        unsupported = response.header("Unsupported") or ""
        assert unsupported, "420 without Unsupported"
        request = parse_message(case.raw)
        assert isinstance(request, SipRequest)
        assert set(unsupported.replace(" ", "").split(",")) <= set(
            ",".join(request.header_values("Require")).replace(" ", "").split(",")
        )


async def _udp_exchange(port: int, data: bytes, number: int) -> list[SipResponse]:
    """Send ``data`` and a probe from one socket; the responses before the probe's, in order."""
    loop = asyncio.get_running_loop()
    probe_data, probe_call = probe(port, "udp", number)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.bind(("127.0.0.1", 0))
        await loop.sock_sendto(sock, data, ("127.0.0.1", port))
        await loop.sock_sendto(sock, probe_data, ("127.0.0.1", port))
        before: list[SipResponse] = []
        while True:
            raw = await asyncio.wait_for(loop.sock_recv(sock, 65535), TIMEOUT)
            response = _response(raw)
            if response.header("Call-ID") == probe_call:
                assert response.status == 200, "the endpoint stopped serving after the message"
                return before
            before.append(response)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_udp(endpoint: Endpoint, case: Case) -> None:
    port = endpoint.local_peers["udp"].port
    responses = await _udp_exchange(port, with_rport(case.raw), 1)
    statuses = [r.status for r in responses]
    expected = case.expected
    assert statuses == ([] if expected is None else [expected]), ALL[case.name].note
    for response in responses:
        check_headers(case, response)
    # the second message of dblreq's datagram is never looked at (RFC 3261 18.3: UDP carries
    # one message), so one answer only, checked above


class _Stream(asyncio.Protocol):
    """A TCP connection to the endpoint, with responses framed by Content-Length."""

    def __init__(self) -> None:
        self.framer = StreamFramer()
        self.ready: list[bytes] = []
        self.closed = False
        self.changed = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, port: int) -> _Stream:
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_connection(cls, "127.0.0.1", port)
        return stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        for event in self.framer.feed(data):
            assert isinstance(event, bytes), event
            self.ready.append(event)
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.changed.set()

    async def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def next(self) -> SipResponse | None:
        """The next response, or None when the endpoint closed the connection."""
        while not self.ready:
            if self.closed:
                return None
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), TIMEOUT)
        return _response(self.ready.pop(0))

    def idle(self) -> bool:
        """True when nothing was received (not even part of a message) and it is still open."""
        return not self.ready and self.framer.pending == 0 and not self.closed

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def _tcp_probe(stream: _Stream, port: int, number: int) -> None:
    data, call_id = probe(port, "tcp", number)
    await stream.send(data)
    response = await stream.next()
    assert response is not None, "connection closed instead of answering the probe"
    assert (response.header("Call-ID"), response.status) == (call_id, 200)


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_tcp(endpoint: Endpoint, case: Case) -> None:
    port = endpoint.local_peers["tcp"].port
    outcome = STREAM_OUTCOMES.get(case.name, StreamOutcome(True, (), False))
    stream = await _Stream.open(port)
    try:
        await stream.send(case.raw)
        expected = case.expected
        statuses: list[int] = []
        if outcome.answered and expected is not None:
            first = await stream.next()
            assert first is not None, "connection closed instead of answering"
            check_headers(case, first)
            statuses.append(first.status)
        for _ in outcome.then:
            further = await stream.next()
            assert further is not None, "connection closed before the second request's answer"
            statuses.append(further.status)
        wanted = ([expected] if outcome.answered and expected is not None else []) + list(
            outcome.then
        )
        assert statuses == wanted, ALL[case.name].note
        if outcome.closes:
            assert await stream.next() is None, "framing is lost: the connection must close"
        if case.name not in STREAM_OUTCOMES:
            # the connection is still in step: the probe follows on it, and nothing was sent
            # in between (a response to a discarded message would come first)
            await _tcp_probe(stream, port, 2)
            return
        # the stream is waiting for bytes or closed: probe on a new connection, which the
        # endpoint handles after the torture bytes it already has
        other = await _Stream.open(port)
        try:
            await _tcp_probe(other, port, 3)
        finally:
            await other.close()
        if not outcome.closes:
            assert stream.idle(), "the endpoint answered bytes it should still be waiting on"
    finally:
        await stream.close()


def test_rport_is_added_to_the_first_via_value_only() -> None:
    folded = (
        b"INVITE sip:a@b SIP/2.0\r\n"
        b"Via  : SIP  /   2.0\r\n /UDP\r\n    h;branch=x, v2\r\n"
        b"X: 1\r\n\r\n"
    )
    assert with_rport(folded) == folded.replace(b"branch=x,", b"branch=x;rport,")
    compact = b"OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/TCP h2\r\nVia: SIP/2.0/UDP h3\r\n\r\n"
    assert with_rport(compact) == compact.replace(b"h2", b"h2;rport")


def test_every_row_is_sent() -> None:
    assert {c.name for c in CASES} == set(ALL)
    assert set(TABLE_DISPUTES) <= set(ALL)
    assert set(STREAM_OUTCOMES) <= set(ALL)
