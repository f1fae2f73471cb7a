"""RFC 4475 and RFC 5118 torture messages through parse_message, validation and framing."""

from __future__ import annotations

import pytest

from sipside.errors import PeerError
from sipside.framing import FrameEvent, FramingError, StreamFramer
from sipside.message import SipRequest, parse_message
from sipside.validate import UnsupportedExtension, validate_request, validate_response
from tests.rfc4475_expectations import (
    EXPECTATIONS,
    EXPECTATIONS_5118,
    RFC4475_DIR,
    RFC5118_DIR,
    Expectation,
    load,
    rewrite_to_message,
)

ALL: dict[str, Expectation] = {**EXPECTATIONS, **EXPECTATIONS_5118}


def outcome(raw: bytes) -> int | None:
    """None if the stack accepts ``raw``, else the status of the PeerError it raises."""
    try:
        message = parse_message(raw)
        if isinstance(message, SipRequest):
            validate_request(message)
        else:
            validate_response(message)
    except PeerError as error:
        return error.status
    return None


def test_one_row_per_file() -> None:
    assert sorted(EXPECTATIONS) == sorted(p.stem for p in RFC4475_DIR.glob("*.dat"))
    assert len(EXPECTATIONS) == 49
    files_5118 = [p.name for p in RFC5118_DIR.iterdir() if not p.name.endswith(".md")]
    assert sorted(EXPECTATIONS_5118) == sorted(files_5118)


@pytest.mark.parametrize("name", sorted(ALL))
def test_outcome(name: str) -> None:
    assert outcome(load(name)) == ALL[name].status, ALL[name].note


# Rows whose point does not survive the MESSAGE rewrite are marked "n/a" and not generated.
@pytest.mark.parametrize("name", sorted(n for n in ALL if ALL[n].as_message_status != "n/a"))
def test_outcome_as_message(name: str) -> None:
    expected = ALL[name].as_message_status
    rewritten = rewrite_to_message(load(name))
    assert outcome(rewritten) == expected, ALL[name].note
    if expected is None:
        message = parse_message(rewritten)
        assert isinstance(message, SipRequest)
        assert message.method == "MESSAGE"
        assert message.cseq[1] == "MESSAGE"


@pytest.mark.parametrize("name", sorted(ALL))
def test_app_status_matches_method(name: str) -> None:
    row = ALL[name]
    raw = load(name)
    if row.status is not None or raw.startswith(b"SIP/"):
        assert row.app_status is None
        return
    message = parse_message(raw)
    assert isinstance(message, SipRequest)
    if message.method in ("INVITE", "BYE"):  # sessions are not ours: 405 with Allow (DESIGN 7)
        assert row.app_status == 405
    elif message.method not in {"OPTIONS", "REGISTER", "MESSAGE", "SUBSCRIBE", "NOTIFY"}:
        assert row.app_status == 501
    else:
        assert row.app_status is None
    # the MESSAGE application refuses a body type it cannot read with 415
    if row.as_message_app_status == 415:
        assert message.body
        assert message.header("Content-Type") != "text/plain"


def test_bext01_lists_the_require_options_only() -> None:
    message = parse_message(load("bext01"))
    assert isinstance(message, SipRequest)
    with pytest.raises(UnsupportedExtension) as caught:
        validate_request(message)
    assert caught.value.options == ("nothingSupportsThis", "nothingSupportsThisEither")
    validate_request(
        message, supported=frozenset({"nothingsupportsthis", "nothingSupportsThisEither"})
    )


def test_zeromf_is_483_only_for_a_proxy() -> None:
    message = parse_message(load("zeromf"))
    assert isinstance(message, SipRequest)
    validate_request(message)
    with pytest.raises(PeerError) as caught:
        validate_request(message, proxy=True)
    assert caught.value.status == 483


def test_wsinv_values() -> None:
    message = parse_message(load("wsinv"))
    assert isinstance(message, SipRequest)
    assert message.cseq == (9, "INVITE")
    assert message.to_tag == "1918181833n"
    assert message.from_tag == "98asjd8"
    assert [str(v) for v in message.vias] == [
        "SIP/2.0/UDP 192.0.2.2;branch=390skdjuw",
        "SIP/2.0/TCP spindle.example.com;branch=z9hG4bK9ikj8",
        "SIP/2.0/UDP 192.168.255.111;branch=z9hG4bK30239",
    ]
    assert message.header("NewFangledHeader") == "newfangled value continued newfangled value"
    assert message.header("Subject") == ""
    assert len(message.body) == 150


def test_dblreq_datagram_is_one_register_and_stream_is_two_requests() -> None:
    raw = load("dblreq")
    message = parse_message(raw)
    assert isinstance(message, SipRequest)
    assert (message.method, message.body) == ("REGISTER", b"")
    # on a stream the INVITE follows; its body is 4 bytes longer than its Content-Length, so
    # the stream then breaks (the RFC sends this over UDP only)
    *framed, last = StreamFramer().feed(raw)
    methods = [getattr(parse_message(m), "method", None) for m in framed if isinstance(m, bytes)]
    assert methods == ["REGISTER", "INVITE"]
    assert isinstance(last, FramingError)


def test_escnull_keeps_the_escape() -> None:
    message = parse_message(load("escnull"))
    assert message.header_values("Contact") == [
        "<sip:%00@host5.example.com>",
        "<sip:%00%00@host5.example.com>",
    ]


def test_longreq_compact_and_odd_case_vias() -> None:
    message = parse_message(load("longreq"))
    assert len(message.vias) == 34
    assert all(via.transport == "TCP" for via in message.vias)


def test_esc02_unknown_header_is_not_contact() -> None:
    message = parse_message(load("esc02"))
    assert len(message.header_values("Contact")) == 2
    assert message.header("C%6Fntact") == "<sip:alias2@host2.example.com>"


# Messages whose Content-Length frames them exactly on a stream (RFC 3261 18.3)
STREAMABLE = [
    name
    for name in sorted(ALL)
    if name not in {"clerr", "mcl01", "ncl", "inv2543", "baddn", "dblreq"}
    and name not in {"ipv6-in-sdp", "mult-ip-in-sdp", "ipv4-mapped-ipv6"}
]


@pytest.mark.parametrize("name", STREAMABLE)
def test_stream_framing_yields_the_same_message(name: str) -> None:
    raw = load(name)
    framer = StreamFramer()
    events: list[FrameEvent] = []
    for i in range(0, len(raw), 7):
        events += framer.feed(raw[i : i + 7])
    assert events == [raw]
    assert framer.pending == 0


@pytest.mark.parametrize(("name", "status"), [("mcl01", 400), ("ncl", 400), ("inv2543", 400)])
def test_stream_framing_errors(name: str, status: int) -> None:
    (event,) = StreamFramer().feed(load(name))
    assert isinstance(event, FramingError)
    assert event.error.status == status


def test_clerr_on_a_stream_waits_for_the_body() -> None:
    framer = StreamFramer()
    assert framer.feed(load("clerr")) == []
    assert framer.pending == len(load("clerr"))
