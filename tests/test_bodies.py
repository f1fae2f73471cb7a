"""Message bodies: CPIM (RFC 3862), isComposing (RFC 3994), IMDN (RFC 5438), media types."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sipside import cpim, imdn, iscomposing, xmlsafe
from sipside.cpim import CpimMessage
from sipside.errors import PeerError
from sipside.imdn import Disposition, DispositionNotification, NotificationKind
from sipside.iscomposing import ComposingState, IsComposing
from tests.test_pidf import HOSTILE

# --- CPIM -----------------------------------------------------------------------------------

# RFC 3862 section 2 example, trimmed to what SIP clients send, with a second To.
RFC3862_EXAMPLE = (
    b"From: MR SANDERS <im:piglet@100akerwood.com>\r\n"
    b"To: Depressed Donkey <im:eeyore@100akerwood.com>\r\n"
    b"To: <im:pooh@100akerwood.com>\r\n"
    b"DateTime: 2000-12-13T13:40:00-08:00\r\n"
    b"Subject: the weather will be fine today\r\n"
    b"NS: MyFeatures <mid:MessageFeatures@id.foo.com>\r\n"
    b"Require: MyFeatures.VitalMessageOption\r\n"
    b"MyFeatures.VitalMessageOption: Confirmation-requested\r\n"
    b"\r\n"
    b"Content-type: text/xml; charset=utf-8\r\n"
    b"Content-ID: <1234567890@foo.com>\r\n"
    b"\r\n"
    b"<body>\r\nHere is the text of my message.\r\n</body>\r\n"
)

# RFC 5438 style request for a delivery notification, as a SIP client wraps a chat message.
IMDN_REQUEST = (
    "From: <sip:alice@sip.test>\r\n"
    "To: <sip:bob*xmpp.test@jabber.sip.test>\r\n"
    "NS: imdn <urn:ietf:params:imdn>\r\n"
    "imdn.Message-ID: 34jk324j\r\n"
    "DateTime: 2006-04-04T12:16:49-05:00\r\n"
    "imdn.Disposition-Notification: positive-delivery, negative-delivery\r\n"
    "\r\n"
    "Content-Type: text/plain; charset=UTF-8\r\n"
    "\r\n"
    "Grüße aus Köln"
).encode()


def test_cpim_rfc_example() -> None:
    msg = cpim.parse(RFC3862_EXAMPLE)
    assert msg.sender() == "im:piglet@100akerwood.com"
    assert msg.recipients() == ("im:eeyore@100akerwood.com", "im:pooh@100akerwood.com")
    assert msg.date_time() == datetime(2000, 12, 13, 13, 40, tzinfo=timezone(timedelta(hours=-8)))
    assert msg.header("subject") == "the weather will be fine today"
    assert msg.namespaces() == {"MyFeatures": "mid:MessageFeatures@id.foo.com"}
    assert msg.ns_header("mid:MessageFeatures@id.foo.com", "VitalMessageOption") == (
        "Confirmation-requested"
    )
    assert msg.media_type().essence == "text/xml"
    assert msg.content_header("content-id") == "<1234567890@foo.com>"
    assert msg.body.startswith(b"<body>\r\n") and msg.body.endswith(b"</body>\r\n")


def test_cpim_with_lf_only_and_unicode_body() -> None:
    msg = cpim.parse(IMDN_REQUEST.replace(b"\r\n", b"\n"))
    assert msg.text() == "Grüße aus Köln"
    assert msg.sender() == "sip:alice@sip.test"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (b"From: <sip:a@b>\r\n", 400),  # no blank line at all
        (b"From: <sip:a@b>\r\n\r\nContent-Type: text/plain\r\n", 400),  # content not ended
        (b"\r\n\r\nContent-Type: text/plain\r\n\r\nhi", 400),  # no message headers
        (b"From: <sip:a@b>\r\n\r\nContent-Length: 2\r\n\r\nhi", 400),  # no Content-Type
        (b"From <sip:a@b>\r\n\r\nContent-Type: text/plain\r\n\r\nhi", 400),  # no colon
        (b"Fr om: <sip:a@b>\r\n\r\nContent-Type: text/plain\r\n\r\nhi", 400),  # bad name
        (b"From: \xff\r\n\r\nContent-Type: text/plain\r\n\r\nhi", 400),  # not UTF-8
        (b"From: <sip:a@b>\r\n\r\nContent-Type: nonsense\r\n\r\nhi", 400),
        (b"X: y\r\n" * 100 + b"\r\nContent-Type: text/plain\r\n\r\nhi", 400),  # too many
        (b"From: <sip:a@b>\r\n\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 300_000, 413),
    ],
)
def test_cpim_malformed(data: bytes, status: int) -> None:
    with pytest.raises(PeerError) as info:
        cpim.parse(data)
    assert info.value.status == status


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("<sip:a@b>", (None, "sip:a@b")),
        ("Alice <sip:a@b>", ("Alice", "sip:a@b")),
        ('"Alice \\"A\\" Smith" <sip:a@b>', ('Alice "A" Smith', "sip:a@b")),
        ("  sip:a@b  ", (None, "sip:a@b")),
        ("Alice sip:a@b", None),
        ("<>", None),
        ("", None),
    ],
)
def test_cpim_addresses(value: str, expected: tuple[str | None, str] | None) -> None:
    if expected is None:
        with pytest.raises(PeerError):
            cpim.parse_address(value)
    else:
        assert cpim.parse_address(value) == expected


def test_cpim_bad_datetime_and_charset() -> None:
    msg = cpim.parse(b"DateTime: noon\r\n\r\nContent-Type: text/plain;charset=utf-8\r\n\r\n\xff")
    with pytest.raises(PeerError):
        msg.date_time()
    with pytest.raises(PeerError):
        msg.text()


@pytest.mark.parametrize(
    "header", [("Subject", "x\r\nTo: <e>"), ("Subject", "x\n"), ("Sub ject", "x"), ("X\n", "y")]
)
def test_cpim_build_refuses_header_injection(header: tuple[str, str]) -> None:
    msg = cpim.wrap("sip:a@b", "sip:c@d", b"hi", extra_headers=(header,))
    with pytest.raises(ValueError):
        cpim.build(msg)


@pytest.mark.parametrize("message_id", ["", "a b", "x" * 257, "ok\n"])
def test_imdn_request_headers_refuse_bad_ids(message_id: str) -> None:
    with pytest.raises(ValueError):
        imdn.request_headers(message_id, datetime(2024, 1, 1, tzinfo=UTC))


_header_value = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20).map(
    str.strip
)
_header_name = st.from_regex(
    r"[A-Za-z][A-Za-z0-9-]{0,10}(\.[A-Za-z][A-Za-z0-9-]{0,10})?", fullmatch=True
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_header_name, _header_value), min_size=1, max_size=5),
    st.lists(st.tuples(_header_name, _header_value), max_size=3),
    st.binary(max_size=100),
    st.sampled_from(["text/plain", "text/plain;charset=UTF-8", "message/imdn+xml"]),
)
def test_cpim_round_trip(
    headers: list[tuple[str, str]],
    content_headers: list[tuple[str, str]],
    body: bytes,
    content_type: str,
) -> None:
    content = (("Content-Type", content_type), *content_headers)
    msg = CpimMessage(tuple(headers), content, body)
    assert cpim.parse(cpim.build(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_cpim_random_bytes_only_peer_error(data: bytes) -> None:
    try:
        cpim.parse(data)
    except PeerError as exc:
        assert exc.status == 400


# --- isComposing ------------------------------------------------------------------------------

ISCOMPOSING_CT = iscomposing.ISCOMPOSING_CONTENT_TYPE

# RFC 3994 section 6 style example.
RFC3994_ACTIVE = b"""<?xml version="1.0" encoding="UTF-8"?>
<isComposing xmlns="urn:ietf:params:xml:ns:im-iscomposing"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xsi:schemaLocation="urn:ietf:params:xml:ns:im-composing iscomposing.xsd">
  <state>active</state>
  <contenttype>text/plain</contenttype>
  <refresh>90</refresh>
</isComposing>
"""

RFC3994_IDLE = b"""<?xml version="1.0" encoding="UTF-8"?>
<isComposing xmlns="urn:ietf:params:xml:ns:im-iscomposing">
  <state>idle</state>
  <lastactive>2003-01-27T10:43:00Z</lastactive>
  <contenttype>audio</contenttype>
</isComposing>
"""


ACTIVE, IDLE = ComposingState.ACTIVE, ComposingState.IDLE
_TYPING_NO_REFRESH = IsComposing(ACTIVE, None, "text/plain")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (RFC3994_ACTIVE, IsComposing(ACTIVE, 90, "text/plain")),
        (
            RFC3994_IDLE,
            IsComposing(IDLE, None, "audio", datetime(2003, 1, 27, 10, 43, tzinfo=UTC)),
        ),
        # A refresh that is not a small positive ASCII integer is ignored, not fatal.
        (RFC3994_ACTIVE.replace(b"90", b"-5"), _TYPING_NO_REFRESH),
        (RFC3994_ACTIVE.replace(b"90", b"\xc2\xb2"), _TYPING_NO_REFRESH),
        (RFC3994_ACTIVE.replace(b"90", b"9" * 5000), _TYPING_NO_REFRESH),
    ],
)  # fmt: skip
def test_iscomposing_samples(body: bytes, expected: IsComposing) -> None:
    assert iscomposing.decode(body, ISCOMPOSING_CT) == expected


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (RFC3994_ACTIVE.replace(b"active", b"typing"), ISCOMPOSING_CT, 400),
        (RFC3994_ACTIVE.replace(b"<state>active</state>", b""), ISCOMPOSING_CT, 400),
        (RFC3994_ACTIVE.replace(b'im-iscomposing"', b'im-composing"'), ISCOMPOSING_CT, 400),
        (RFC3994_ACTIVE, "application/xml", 415),
        (RFC3994_ACTIVE, None, 415),
    ],
)
def test_iscomposing_errors(body: bytes, content_type: str | None, status: int) -> None:
    with pytest.raises(PeerError) as info:
        iscomposing.decode(body, content_type)
    assert info.value.status == status


def test_iscomposing_expiry_uses_refresh_or_default() -> None:
    now = 1000.0
    assert IsComposing(ComposingState.ACTIVE, 60).expires_at(now) == 1060.0
    assert IsComposing(ComposingState.ACTIVE).expires_at(now) == now + iscomposing.ACTIVE_TIMEOUT
    assert IsComposing(ComposingState.IDLE, 60).expires_at(now) is None
    with pytest.raises(ValueError):
        iscomposing.encode(IsComposing(ComposingState.ACTIVE, 0))


_times = st.none() | st.datetimes(
    min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=200, deadline=None)
@given(
    st.builds(
        IsComposing,
        st.sampled_from(ComposingState),
        st.none() | st.integers(1, 99999),
        st.none() | st.from_regex(r"[a-z]+/[a-z0-9.+-]+", fullmatch=True),
        _times,
    )
)
def test_iscomposing_round_trip(doc: IsComposing) -> None:
    assert iscomposing.decode(iscomposing.encode(doc), ISCOMPOSING_CT) == doc


# --- IMDN -------------------------------------------------------------------------------------

IMDN_CT = imdn.IMDN_CONTENT_TYPE
_MINUS_5 = timezone(timedelta(hours=-5))

RFC5438_DELIVERED = b"""<?xml version="1.0" encoding="UTF-8"?>
<imdn xmlns="urn:ietf:params:xml:ns:imdn">
  <message-id>34jk324j</message-id>
  <datetime>2008-04-04T12:16:49-05:00</datetime>
  <recipient-uri>im:bob@example.com</recipient-uri>
  <original-recipient-uri>im:bob@example.com</original-recipient-uri>
  <delivery-notification>
    <status>
      <delivered/>
    </status>
  </delivery-notification>
</imdn>
"""


def test_imdn_request_round_trip_through_cpim() -> None:
    msg = cpim.parse(IMDN_REQUEST)
    request = imdn.requested(msg)
    assert request is not None
    assert request.message_id == "34jk324j"
    assert request.notifications == {"positive-delivery", "negative-delivery"}
    assert request.wants_delivery
    assert request.date_time == datetime(
        2006, 4, 4, 12, 16, 49, tzinfo=timezone(timedelta(hours=-5))
    )

    when = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
    headers = imdn.request_headers("abc-123", when)
    built = cpim.parse(cpim.build(cpim.wrap("sip:a@b", "sip:c@d", b"hi", extra_headers=headers)))
    again = imdn.requested(built)
    assert again == imdn.ImdnRequest("abc-123", when, frozenset({"positive-delivery"}))


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        ((b"NS: imdn <urn:ietf:params:imdn>", b"NS: x <urn:ietf:params:imdn>"), None),  # prefix
        ((b"imdn.Message-ID: 34jk324j\r\n", b""), "none"),
        ((b"positive-delivery, negative-delivery", b"bogus"), "none"),
        ((b"NS: imdn <urn:ietf:params:imdn>", b"NS: imdn <urn:other>"), "none"),
        ((b"positive-delivery, negative-delivery", b"display"), "display-only"),
    ],
)
def test_imdn_request_variants(replace: tuple[bytes, bytes], expected: str | None) -> None:
    body = IMDN_REQUEST.replace(*replace)
    if replace[1].startswith(b"NS: x"):
        # Another prefix bound to the IMDN namespace: the headers are read under that prefix.
        body = body.replace(b"imdn.", b"x.")
    request = imdn.requested(cpim.parse(body))
    if expected == "none":
        assert request is None
    elif expected == "display-only":
        assert request is not None and not request.wants_delivery
    else:
        assert request is not None and request.wants_delivery


@pytest.mark.parametrize("bad", [b"has space", b"x" * 300, b"caf\xc3\xa9"])
def test_imdn_request_with_unusable_message_id_is_ignored(bad: bytes) -> None:
    # The message still goes through; only the receipt cannot be sent.
    assert imdn.requested(cpim.parse(IMDN_REQUEST.replace(b"34jk324j", bad))) is None


def test_imdn_delivered_sample() -> None:
    note = imdn.decode_notification(RFC5438_DELIVERED, IMDN_CT)
    assert note == DispositionNotification(
        "34jk324j",
        datetime(2008, 4, 4, 12, 16, 49, tzinfo=_MINUS_5),
        NotificationKind.DELIVERY,
        Disposition.DELIVERED,
        "im:bob@example.com",
        "im:bob@example.com",
    )


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (RFC5438_DELIVERED.replace(b"<delivered/>", b"<displayed/>"), IMDN_CT, 400),
        (RFC5438_DELIVERED.replace(b"<delivered/>", b"<exploded/>"), IMDN_CT, 400),
        (RFC5438_DELIVERED.replace(b"34jk324j", b""), IMDN_CT, 400),
        (RFC5438_DELIVERED.replace(b"2008-04-04T12:16:49-05:00", b"soon"), IMDN_CT, 400),
        (RFC5438_DELIVERED.replace(b"ns:imdn", b"ns:imdx"), IMDN_CT, 400),
        (RFC5438_DELIVERED, "application/xml", 415),
    ],
)
def test_imdn_errors(body: bytes, content_type: str, status: int) -> None:
    with pytest.raises(PeerError) as info:
        imdn.decode_notification(body, content_type)
    assert info.value.status == status


def test_notification_message_wraps_the_body() -> None:
    note = DispositionNotification(
        "34jk324j",
        datetime(2024, 1, 2, tzinfo=UTC),
        NotificationKind.DELIVERY,
        Disposition.DELIVERED,
    )
    now = datetime(2024, 1, 2, 0, 0, 5, tzinfo=UTC)
    wire = cpim.build(imdn.notification_message(note, "sip:bob@x", "sip:alice@y", "n-1", now))
    msg = cpim.parse(wire)
    assert msg.content_header("Content-Disposition") == "notification"
    assert msg.ns_header(imdn.IMDN_HEADER_NS, "Message-ID") == "n-1"
    assert imdn.requested(msg) is None  # a notification never asks for one itself
    assert imdn.decode_notification(msg.body, msg.content_type) == note


def test_disposition_must_fit_kind() -> None:
    with pytest.raises(ValueError):
        DispositionNotification(
            "x", datetime(2024, 1, 1, tzinfo=UTC), NotificationKind.DISPLAY, Disposition.DELIVERED
        )


_kind_status = st.sampled_from(
    [(k, d) for k in NotificationKind for d in Disposition if d in imdn._ALLOWED[k]]
)
_uri = st.none() | st.from_regex(r"sip:[a-z0-9*.]{1,12}@[a-z.]{1,12}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[\x21-\x7e]{1,40}", fullmatch=True),
    _times.filter(lambda t: t is not None),
    _kind_status,
    _uri,
    _uri,
    st.none() | st.text(st.characters(codec="utf-8"), max_size=20).map(xmlsafe.xml_safe_text),
)  # fmt: skip
def test_imdn_round_trip(
    message_id: str,
    when: datetime,
    kind_status: tuple[NotificationKind, Disposition],
    recipient: str | None,
    original: str | None,
    subject: str | None,
) -> None:
    note = DispositionNotification(message_id, when, *kind_status, recipient, original, subject)
    assert imdn.decode_notification(imdn.encode_notification(note), IMDN_CT) == note


# --- The same hostile bodies against every XML body parser ----------------------------------


@pytest.mark.parametrize(("name", "body", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_in_iscomposing_and_imdn(name: str, body: bytes, status: int) -> None:
    for decode, ct in ((iscomposing.decode, ISCOMPOSING_CT), (imdn.decode_notification, IMDN_CT)):
        with pytest.raises(PeerError) as info:
            decode(body, ct)
        # Bodies that parse but have the wrong root are refused as 400 by the format check.
        assert info.value.status in (status, 400)
        if status == 413:
            assert info.value.status == 413


# --- Media types and escaping ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "essence", "params"),
    [
        ("text/plain", "text/plain", ()),
        ("Text/Plain ; Charset=UTF-8", "text/plain", (("charset", "UTF-8"),)),
        ('message/cpim;a="b c";', "message/cpim", (("a", "b c"),)),
    ],
)
def test_media_types(value: str, essence: str, params: tuple[tuple[str, str], ...]) -> None:
    media = xmlsafe.parse_media_type(value)
    assert (media.essence, media.params) == (essence, params)


@pytest.mark.parametrize("value", ["", "text", "text/", "/plain", "text/plain; charset", "a b/c"])
def test_malformed_media_types(value: str) -> None:
    with pytest.raises(PeerError) as info:
        xmlsafe.parse_media_type(value)
    assert info.value.status == 400


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=40))
def test_escaping_round_trips_through_the_parser(text: str) -> None:
    safe = xmlsafe.xml_safe_text(text)
    body = f'<a b="{xmlsafe.attr_escape(text)}">{xmlsafe.text_escape(text)}</a>'.encode()
    root = xmlsafe.parse_xml(body)
    assert (root.get("b"), root.text or "") == (safe, safe)


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from([*"aZ0 @%/.-_'", *'&<>"']), max_size=40))
def test_escaping_of_printable_ascii_round_trips(text: str) -> None:
    # the common case (JIDs, ids, one-line bodies) takes a shorter path than other text
    body = f'<a b="{xmlsafe.attr_escape(text)}">{xmlsafe.text_escape(text)}</a>'.encode()
    root = xmlsafe.parse_xml(body)
    assert (root.get("b"), root.text or "") == (text, text)
