"""Property tests: hostile bytes never raise anything but PeerError; parse/serialize is stable."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sipside.errors import PeerError
from sipside.framing import FramingError, StreamFramer
from sipside.message import SipMessage, SipRequest, parse_message
from sipside.validate import validate_request, validate_response
from tests.rfc4475_expectations import EXPECTATIONS, EXPECTATIONS_5118, load

SEEDS = [load(name) for name in sorted(EXPECTATIONS) + sorted(EXPECTATIONS_5118)]
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A torture message with a few bytes replaced, inserted or deleted."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        pos = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        piece = draw(
            st.sampled_from(
                [
                    b"\r\n",
                    b" ",
                    b":",
                    b";",
                    b",",
                    b'"',
                    b"<",
                    b">",
                    b"\xff",
                    b"\x00",
                    b"\t",
                    b"\r\n ",
                ]
            )
        )
        if action == "insert" or pos >= len(data):
            data[pos:pos] = piece
        elif action == "replace":
            data[pos : pos + len(piece)] = piece
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
    return bytes(data)


def parse_or_none(data: bytes) -> SipMessage | None:
    try:
        return parse_message(data)
    except PeerError:
        return None


def check_everything(data: bytes) -> None:
    message = parse_or_none(data)
    if message is None:
        return
    # stable round trip
    assert parse_message(bytes(message)) == message
    # accessors and validation raise nothing but PeerError
    for accessor in ("call_id", "cseq", "from_tag", "to_tag", "vias"):
        with contextlib.suppress(PeerError):
            getattr(message, accessor)
    try:
        if isinstance(message, SipRequest):
            validate_request(message)
        else:
            validate_response(message)
    except PeerError:
        pass


@SETTINGS
@given(st.binary(max_size=600))
def test_arbitrary_bytes(data: bytes) -> None:
    check_everything(data)
    check_everything(b"OPTIONS sip:a@b SIP/2.0\r\n" + data)


@SETTINGS
@given(mutated())
def test_mutated_messages(data: bytes) -> None:
    check_everything(data)


@SETTINGS
@given(st.lists(st.one_of(mutated(), st.binary(max_size=50)), max_size=4), st.integers(1, 64))
def test_framer_never_raises(chunks: list[bytes], size: int) -> None:
    stream = b"".join(chunks)
    framer = StreamFramer(max_buffer=4096)
    whole = StreamFramer(max_buffer=4096).feed(stream)
    pieces = []
    for i in range(0, len(stream), size):
        pieces += framer.feed(stream[i : i + size])
        if pieces and isinstance(pieces[-1], FramingError):
            break

    # chunking never changes what comes out (errors compared by status)
    def key(events: list[object]) -> list[object]:
        return [e.error.status if isinstance(e, FramingError) else e for e in events]

    assert key(list(pieces)) == key(list(whole))
    for event in whole:
        if isinstance(event, bytes):
            parse_or_none(event)
