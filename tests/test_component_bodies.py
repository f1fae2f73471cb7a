"""MESSAGE bodies to text (DESIGN 4.1) and SIP status -> XMPP condition."""

from __future__ import annotations

import pytest

from component.sip.bodies import UnsupportedMediaType, decode_body
from sipside.errors import PeerError

CPIM = (
    b"From: <sip:alice@sip.test>\r\nTo: <sip:bob@xmpp.test>\r\n\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nhello \xc3\xa9"
)


@pytest.mark.parametrize(
    ("content_type", "body", "text", "html"),
    [
        (None, b"plain", "plain", None),
        ("text/plain; charset=UTF-8", "äöü <&>".encode(), "äöü <&>", None),
        ("text/plain;charset=iso-8859-1", "é".encode("latin-1"), "é", None),
        ("message/cpim", CPIM, "hello é", None),
        ("text/html", b"<p>Hi <b>there</b></p><script>x()</script>", "Hi there", "Hi there"),
        ("text/html", b"a<br>b &amp; c", "a\nb & c", "a<br/>b &amp; c"),
    ],
)
def test_decoded(content_type: str | None, body: bytes, text: str, html: str | None) -> None:
    decoded = decode_body(content_type, body)
    assert decoded.text == text
    assert decoded.html == html


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("image/png", b"\x89PNG", 415),
        ("application/pidf+xml", b"<x/>", 415),
        ("text/plain", b"\xff\xfe bad", 400),
        ("text/plain; charset=no-such-charset", b"x", 400),
        ("message/cpim", b"garbage without blank lines", 400),
        ("text/plain", b"x" * 70000, 413),
    ],
)
def test_refused(content_type: str, body: bytes, status: int) -> None:
    with pytest.raises(PeerError) as info:
        decode_body(content_type, body)
    assert info.value.status == status


def test_nested_cpim_is_refused_not_followed() -> None:
    layer = b"From: <sip:a@b>\r\n\r\nContent-Type: message/cpim\r\n\r\n"
    body = layer * 1500 + b"Content-Type: text/plain\r\n\r\nx"
    with pytest.raises(UnsupportedMediaType):
        decode_body("message/cpim", body[:60000])
