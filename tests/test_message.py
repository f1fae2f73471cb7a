"""Parsing, serialization and accessors of sipside.message, table-driven."""

from __future__ import annotations

import pytest

from sipside.errors import LocalError, PeerError
from sipside.message import (
    SipRequest,
    SipResponse,
    Via,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
    parse_name_addr,
    reason_phrase,
)

BASE = (
    b"MESSAGE sip:alice@sip.test SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:alice@sip.test>\r\n"
    b'From: "Bob" <sip:bob*xmpp.test@jabber.sip.test>;tag=1928\r\n'
    b"Call-ID: a84b4c76e66710@pc33\r\n"
    b"CSeq: 314159 MESSAGE\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 5\r\n\r\nhello"
)


def with_headers(*lines: bytes, body: bytes = b"") -> bytes:
    head = b"OPTIONS sip:a@b.test SIP/2.0\r\n" + b"".join(line + b"\r\n" for line in lines)
    return head + b"\r\n" + body


def test_parse_request() -> None:
    message = parse_message(BASE)
    assert isinstance(message, SipRequest)
    assert (message.method, message.uri, message.body) == (
        "MESSAGE",
        "sip:alice@sip.test",
        b"hello",
    )
    assert message.headers[0] == ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK776;rport")
    assert "Content-Length" not in dict(message.headers)
    assert message.header("content-length") == "5"
    assert message.call_id == "a84b4c76e66710@pc33"
    assert message.cseq == (314159, "MESSAGE")
    assert (message.from_tag, message.to_tag) == ("1928", None)
    (via,) = message.vias
    assert (via.transport, via.host, via.port, via.branch) == (
        "UDP",
        "192.0.2.1",
        5060,
        "z9hG4bK776",
    )
    assert via.param("rport") == ""
    assert via.param("received") is None


@pytest.mark.parametrize(
    ("line", "name", "value"),
    [
        (b"v: SIP/2.0/TCP h", "Via", "SIP/2.0/TCP h"),
        (b"i: abc", "Call-ID", "abc"),
        (b"f: <sip:x@y>", "From", "<sip:x@y>"),
        (b"t: <sip:x@y>", "To", "<sip:x@y>"),
        (b"m: <sip:x@y>", "Contact", "<sip:x@y>"),
        (b"c: text/plain", "Content-Type", "text/plain"),
        (b"k: path", "Supported", "path"),
        (b"o: presence", "Event", "presence"),
        (b"u: presence", "Allow-Events", "presence"),
        (b"CALL-ID: abc", "Call-ID", "abc"),
        (b"cseq: 1 OPTIONS", "CSeq", "1 OPTIONS"),
        (b"Via  :   SIP/2.0/UDP h  ", "Via", "SIP/2.0/UDP h"),
        (b"X-Custom:v", "X-Custom", "v"),
        (b"Subject:", "Subject", ""),
    ],
)
def test_header_names_canonical(line: bytes, name: str, value: str) -> None:
    message = parse_message(with_headers(line))
    assert message.headers == ((name, value),)
    assert message.header(name.lower()) == value
    assert message.header(line.split(b":")[0].strip().decode()) == value


@pytest.mark.parametrize(
    ("lines", "name", "value"),
    [
        ((b"Subject: a", b" b"), "Subject", "a b"),
        ((b"Subject: a", b"\t\t b"), "Subject", "a b"),
        ((b"Subject:", b"   a"), "Subject", "a"),
        ((b"Accept: a,", b"  b,", b"  c"), "Accept", "a, b, c"),
    ],
)
def test_line_folding(lines: tuple[bytes, ...], name: str, value: str) -> None:
    assert parse_message(with_headers(*lines)).header(name) == value


@pytest.mark.parametrize(
    ("header", "name", "values"),
    [
        (b"Allow: INVITE, ACK,MESSAGE", "Allow", ["INVITE", "ACK", "MESSAGE"]),
        (
            b'Contact: "a, b" <sip:x@y>, <sip:z@w;p=1,2>',
            "Contact",
            ['"a, b" <sip:x@y>', "<sip:z@w;p=1,2>"],
        ),
        (b"Route: <sip:a;lr>,<sip:b;lr>", "Route", ["<sip:a;lr>", "<sip:b;lr>"]),
        (b"Require: a,,b", "Require", ["a", "b"]),
        (b"Date: Sat, 13 Nov 2010 23:29:00 GMT", "Date", ["Sat, 13 Nov 2010 23:29:00 GMT"]),
        (b"Authorization: Digest a=1, b=2", "Authorization", ["Digest a=1, b=2"]),
        (b"k: a, b", "Supported", ["a", "b"]),
    ],
)
def test_header_values(header: bytes, name: str, values: list[str]) -> None:
    assert parse_message(with_headers(header)).header_values(name) == values


def test_header_values_over_several_lines() -> None:
    message = parse_message(
        with_headers(b"Via: SIP/2.0/UDP a, SIP/2.0/TCP b:5061", b"v: SIP/2.0/TLS c")
    )
    assert [(v.transport, v.host, v.port) for v in message.vias] == [
        ("UDP", "a", None),
        ("TCP", "b", 5061),
        ("TLS", "c", None),
    ]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (b"\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0 x\r\n\r\n", 400),
        (b"OPTIONS  sip:a SIP/2.0\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/3.0\r\n\r\n", 505),
        (b"OPTIONS sip:a HTTP/1.1\r\n\r\n", 400),
        (b"OPT@ONS sip:a SIP/2.0\r\n\r\n", 400),
        (b"OPTIONS <sip:a> SIP/2.0\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nNoColon\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nBad Name: x\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\n folded-start: x\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nX: a\rb\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nX: a\nb\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nX: \xff\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nContent-Length: 5\r\n\r\nabc", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nContent-Length: x\r\n\r\n", 400),
        (b"OPTIONS sip:a SIP/2.0\r\nl: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"SIP/2.0 99 Low\r\n\r\n", 400),
        (b"SIP/2.0 700 High\r\n\r\n", 400),
        (b"SIP/2.0 2000 OK\r\n\r\n", 400),
        (b"SIP/3.0 200 OK\r\n\r\n", 400),
    ],
)
def test_malformed(data: bytes, status: int) -> None:
    with pytest.raises(PeerError) as caught:
        parse_message(data)
    assert caught.value.status == status


@pytest.mark.parametrize(
    ("tail", "body"),
    [
        (b"Content-Length: 3\r\n\r\nabcdef", b"abc"),  # RFC 3261 18.3: extra bytes dropped
        (b"l: 0\r\n\r\nabc", b""),
        (b"\r\nabc", b"abc"),  # no Content-Length on a datagram: to the end
        (b"Content-Length: 2\r\ncontent-length: 2\r\n\r\nab", b"ab"),  # equal values agree
    ],
)
def test_body_length(tail: bytes, body: bytes) -> None:
    assert parse_message(b"OPTIONS sip:a SIP/2.0\r\n" + tail).body == body


def test_leading_crlf_and_missing_final_blank_line() -> None:
    message = parse_message(b"\r\n\r\nOPTIONS sip:a SIP/2.0\r\nXy: 1\r\n")
    assert isinstance(message, SipRequest)
    assert message.headers == (("Xy", "1"),)


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        (b"SIP/2.0 200 OK", 200, "OK"),
        (b"SIP/2.0 100 ", 100, ""),
        (b"SIP/2.0 180", 180, ""),
        (b"SIP/2.0 404 Not  Found here", 404, "Not  Found here"),
        ("SIP/2.0 603 Décliné".encode(), 603, "Décliné"),
    ],
)
def test_parse_response(line: bytes, status: int, reason: str) -> None:
    message = parse_message(line + b"\r\nCall-ID: x\r\n\r\n")
    assert isinstance(message, SipResponse)
    assert (message.status, message.reason) == (status, reason)


def test_serialize_request() -> None:
    request = SipRequest(
        "MESSAGE", "sip:a@b", (("Via", "SIP/2.0/UDP h;branch=z9hG4bKx"), ("To", "<sip:a@b>")), b"hi"
    )
    assert bytes(request) == (
        b"MESSAGE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKx\r\nTo: <sip:a@b>\r\n"
        b"Content-Length: 2\r\n\r\nhi"
    )
    assert parse_message(bytes(request)) == request


def test_serialize_response_and_round_trip() -> None:
    response = SipResponse(202, "Accepted", (("CSeq", "1 MESSAGE"),))
    assert (
        bytes(response) == b"SIP/2.0 202 Accepted\r\nCSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
    )
    assert parse_message(BASE) == parse_message(bytes(parse_message(BASE)))


def test_make_response() -> None:
    request = parse_message(BASE + b"")
    assert isinstance(request, SipRequest)
    request = request.add_header("Via", "SIP/2.0/UDP proxy;branch=z9hG4bKp", first=True)
    response = make_response(request, 202, to_tag="t1", headers=[("expires", "5")])
    assert (response.status, response.reason, response.body) == (202, "Accepted", b"")
    assert [name for name, _ in response.headers] == [
        "Via",
        "Via",
        "To",
        "From",
        "Call-ID",
        "CSeq",
        "Expires",
    ]
    assert response.header("To") == "<sip:alice@sip.test>;tag=t1"
    assert response.to_tag == "t1"
    assert [v.host for v in response.vias] == ["proxy", "192.0.2.1"]
    again = make_response(request.replace_headers("To", ["<sip:a@b>;tag=old"]), 200, to_tag="new")
    assert again.to_tag == "old"
    assert make_response(request, 488, "Nope").reason == "Nope"


def test_make_response_without_mandatory_headers() -> None:
    request = SipRequest("INVITE", "sip:a@b", (("CSeq", "1 INVITE"), ("Timestamp", "54")))
    assert make_response(request, 400, to_tag="x").headers == (("CSeq", "1 INVITE"),)
    assert make_response(request, 100).headers == (("CSeq", "1 INVITE"), ("Timestamp", "54"))
    with pytest.raises(LocalError):
        make_response(request, 99)


def test_replace_and_add_headers() -> None:
    request = parse_message(BASE)
    assert isinstance(request, SipRequest)
    replaced = request.replace_headers("v", ["SIP/2.0/TCP x"])
    assert replaced.headers[-1] == ("Via", "SIP/2.0/TCP x")
    assert replaced.header_values("Via") == ["SIP/2.0/TCP x"]
    removed = request.replace_headers("Max-Forwards", [])
    assert removed.header("Max-Forwards") is None
    assert len(removed.headers) == len(request.headers) - 1
    added = request.add_header("x-a", "1").add_header("Route", "<sip:p;lr>", first=True)
    assert added.headers[0] == ("Route", "<sip:p;lr>")
    assert added.headers[-1] == ("x-a", "1")
    assert added.header("X-A") == "1"
    with pytest.raises(LocalError):
        request.replace_headers("l", ["3"])


@pytest.mark.parametrize(
    ("value", "display", "uri", "tag"),
    [
        ('"Bob" <sip:b@x>;tag=1', "Bob", "sip:b@x", "1"),
        ('"a \\"q\\" \\\\" <sip:b@x>', 'a "q" \\', "sip:b@x", None),
        ("caller<sip:c@x>;tag=2", "caller", "sip:c@x", "2"),
        ("sip:b@x ; tag = 3", None, "sip:b@x", "3"),
        ("Two Words <sip:b@x;lr>;q=0.5", "Two Words", "sip:b@x;lr", None),
        ("<tel:+1234>", None, "tel:+1234", None),
    ],
)
def test_parse_name_addr(value: str, display: str | None, uri: str, tag: str | None) -> None:
    address = parse_name_addr(value)
    assert (address.display, address.uri, address.tag) == (display, uri, tag)


@pytest.mark.parametrize(
    "value",
    [
        '"open <sip:a@b>',
        "Bell, A <sip:a@b>",
        "< sip:a@b >",
        "sip:a@b?x=y",
        "<sip:a@b",
        "<sip:a@b>;;",
        "nouri",
    ],
)
def test_parse_name_addr_rejects(value: str) -> None:
    with pytest.raises(PeerError):
        parse_name_addr(value)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("SIP / 2.0 / udp host ; branch = z9hG4bKa", "SIP/2.0/UDP host;branch=z9hG4bKa"),
        (
            "SIP/2.0/TCP [2001:db8::1]:5061;received=[2001:db8::2]",
            "SIP/2.0/TCP [2001:db8::1]:5061;received=[2001:db8::2]",
        ),
        ("SIP/2.0/UDP h:5060;rport;branch=z9hG4bKb", "SIP/2.0/UDP h:5060;rport;branch=z9hG4bKb"),
    ],
)
def test_via_round_trip(value: str, wire: str) -> None:
    via = Via.parse(value)
    assert str(via) == wire
    assert Via.parse(str(via)) == via


@pytest.mark.parametrize(
    "value", ["SIP/2.0/UDP", "SIP/3.0/UDP h", "SIP/2.0/UDP h;", "SIP/2.0/UDP h:99999", "x"]
)
def test_via_rejects(value: str) -> None:
    with pytest.raises(PeerError):
        Via.parse(value)


def test_via_with_param() -> None:
    via = Via.parse("SIP/2.0/UDP h;rport;branch=z9hG4bKb")
    changed = via.with_param("rport", "5062").with_param("received", "192.0.2.9")
    assert str(changed) == "SIP/2.0/UDP h;rport=5062;branch=z9hG4bKb;received=192.0.2.9"
    assert changed.branch == "z9hG4bKb"


@pytest.mark.parametrize(
    ("cseq", "ok"),
    [
        ("1 MESSAGE", True),
        ("0009\t INVITE", True),
        ("4294967296 X", False),
        ("x MESSAGE", False),
        ("1", False),
    ],
)
def test_cseq(cseq: str, ok: bool) -> None:
    message = SipRequest("X", "sip:a", (("CSeq", cseq),))
    if ok:
        assert message.cseq[0] == int(cseq.split()[0])
    else:
        with pytest.raises(PeerError):
            _ = message.cseq


def test_reason_phrases_and_ids() -> None:
    assert reason_phrase(202) == "Accepted"
    assert reason_phrase(513) == "Message Too Large"
    assert reason_phrase(299) == "OK"
    assert reason_phrase(699) == "Global Failure"
    assert new_branch().startswith("z9hG4bK") and new_branch() != new_branch()
    assert new_tag() != new_tag() and new_call_id() != new_call_id()
    with pytest.raises(PeerError):
        _ = SipRequest("X", "sip:a", ()).call_id
