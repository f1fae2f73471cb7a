"""Instant Message Disposition Notification (RFC 5438), the SIP side of XEP-0184 receipts.

A sender asks for notifications in the CPIM wrapper of its message (RFC 5438 header fields):
``NS: imdn <urn:ietf:params:imdn>``, ``imdn.Message-ID``, ``DateTime`` and
``imdn.Disposition-Notification: positive-delivery``. The recipient answers with its own
``MESSAGE`` whose CPIM wrapper carries a ``message/imdn+xml`` body (the RFC 5438 IMDN format)
naming the original Message-ID and DateTime and saying delivered, failed, displayed and so on.

This module builds and reads those headers and bodies; it holds no state. Decoding raises only
:class:`~sipside.errors.PeerError`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

from sipside.cpim import CpimMessage, format_address, format_datetime
from sipside.errors import bad_body
from sipside.xmlsafe import (
    DEFAULT_LIMITS,
    XmlLimits,
    parse_document,
    text_escape,
)

__all__ = [
    "IMDN_CONTENT_TYPE",
    "IMDN_HEADER_NS",
    "IMDN_NS",
    "Disposition",
    "DispositionNotification",
    "ImdnRequest",
    "NotificationKind",
    "decode_notification",
    "encode_notification",
    "notification_message",
    "request_headers",
    "requested",
]

IMDN_CONTENT_TYPE = "message/imdn+xml"
IMDN_NS = "urn:ietf:params:xml:ns:imdn"
IMDN_HEADER_NS = "urn:ietf:params:imdn"
_ACCEPTED = frozenset({IMDN_CONTENT_TYPE})
_PREFIX = "imdn"

# RFC 5438 Disposition-Notification header: the values this gateway understands.
_REQUEST_VALUES = frozenset({"positive-delivery", "negative-delivery", "display", "processing"})
_MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,256}")


class NotificationKind(enum.Enum):
    """RFC 5438: which notification a document carries; the value is its element name."""

    DELIVERY = "delivery-notification"
    DISPLAY = "display-notification"
    PROCESSING = "processing-notification"


class Disposition(enum.Enum):
    """RFC 5438: the status element inside a notification."""

    DELIVERED = "delivered"
    FAILED = "failed"
    DISPLAYED = "displayed"
    PROCESSED = "processed"
    STORED = "stored"
    FORBIDDEN = "forbidden"
    ERROR = "error"


# RFC 5438 XML schema: which statuses each kind of notification may carry.
_ALLOWED = {
    NotificationKind.DELIVERY: frozenset(
        {Disposition.DELIVERED, Disposition.FAILED, Disposition.FORBIDDEN, Disposition.ERROR}
    ),
    NotificationKind.DISPLAY: frozenset(
        {Disposition.DISPLAYED, Disposition.FORBIDDEN, Disposition.ERROR}
    ),
    NotificationKind.PROCESSING: frozenset(
        {Disposition.PROCESSED, Disposition.STORED, Disposition.FORBIDDEN, Disposition.ERROR}
    ),
}


@dataclass(frozen=True, slots=True)
class ImdnRequest:
    """What a received CPIM message asked for: its Message-ID, DateTime and notifications."""

    message_id: str
    date_time: datetime | None
    notifications: frozenset[str]

    @property
    def wants_delivery(self) -> bool:
        """True when the sender asked to hear of successful delivery (XEP-0184 request)."""
        return "positive-delivery" in self.notifications


def request_headers(
    message_id: str,
    date_time: datetime,
    notifications: tuple[str, ...] = ("positive-delivery",),
) -> tuple[tuple[str, str], ...]:
    """The CPIM message headers that ask for notifications (RFC 5438 header fields)."""
    if not _MESSAGE_ID.fullmatch(message_id):
        raise ValueError(f"IMDN Message-ID must be 1-256 visible ASCII characters: {message_id!r}")
    unknown = set(notifications) - _REQUEST_VALUES
    if unknown:
        raise ValueError(f"unknown Disposition-Notification values {sorted(unknown)}")
    return (
        ("NS", f"{_PREFIX} <{IMDN_HEADER_NS}>"),
        (f"{_PREFIX}.Message-ID", message_id),
        ("DateTime", format_datetime(date_time)),
        (f"{_PREFIX}.Disposition-Notification", ", ".join(notifications)),
    )


def requested(message: CpimMessage) -> ImdnRequest | None:
    """The notification request carried by ``message``, or None if it asks for none.

    RFC 5438: without a usable imdn.Message-ID the request cannot be answered, so it is
    ignored; the message itself is still delivered.
    """
    value = message.ns_header(IMDN_HEADER_NS, "Disposition-Notification")
    message_id = message.ns_header(IMDN_HEADER_NS, "Message-ID")
    if value is None or message_id is None:
        return None
    message_id = message_id.strip()
    if not _MESSAGE_ID.fullmatch(message_id):
        return None
    wanted = frozenset(v.strip().lower() for v in value.split(",")) & _REQUEST_VALUES
    if not wanted:
        return None
    return ImdnRequest(message_id, message.date_time(), wanted)


@dataclass(frozen=True, slots=True)
class DispositionNotification:
    """An IMDN document (RFC 5438) about the message ``message_id`` sent at ``date_time``."""

    message_id: str
    date_time: datetime
    kind: NotificationKind
    status: Disposition
    recipient_uri: str | None = None
    original_recipient_uri: str | None = None
    subject: str | None = None

    def __post_init__(self) -> None:
        if self.status not in _ALLOWED[self.kind]:
            raise ValueError(f"{self.status.value} is not a {self.kind.value} status")


def encode_notification(note: DispositionNotification) -> bytes:
    """Serialise ``note`` as a ``message/imdn+xml`` body."""
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<imdn xmlns="{IMDN_NS}">\n',
        f"  <message-id>{text_escape(note.message_id)}</message-id>\n",
        f"  <datetime>{format_datetime(note.date_time)}</datetime>\n",
    ]
    if note.recipient_uri is not None:
        out.append(f"  <recipient-uri>{text_escape(note.recipient_uri)}</recipient-uri>\n")
    if note.original_recipient_uri is not None:
        uri = text_escape(note.original_recipient_uri)
        out.append(f"  <original-recipient-uri>{uri}</original-recipient-uri>\n")
    if note.subject is not None:
        out.append(f"  <subject>{text_escape(note.subject)}</subject>\n")
    kind = note.kind.value
    out.append(f"  <{kind}>\n    <status><{note.status.value}/></status>\n  </{kind}>\n")
    out.append("</imdn>\n")
    return "".join(out).encode("utf-8")


def _q(name: str) -> str:
    return f"{{{IMDN_NS}}}{name}"


_ROOT = _q("imdn")
_KIND_BY_TAG = {_q(k.value): k for k in NotificationKind}
_STATUS = _q("status")
_DISPOSITION_BY_TAG = {_q(d.value): d for d in Disposition}


def decode_notification(
    body: bytes, content_type: str | None, limits: XmlLimits = DEFAULT_LIMITS
) -> DispositionNotification:
    """Parse a ``message/imdn+xml`` body; PeerError(415) for another type, 400/413 if bad."""
    root = parse_document(body, content_type, _ACCEPTED, _ROOT, "IMDN", limits)
    fields: dict[str, str] = {}
    kind: NotificationKind | None = None
    status: Disposition | None = None
    for child in root:
        found = _KIND_BY_TAG.get(child.tag)
        if found is not None:
            kind = found
            for sub in child:
                if sub.tag == _STATUS:
                    status = next(
                        (_DISPOSITION_BY_TAG[s.tag] for s in sub if s.tag in _DISPOSITION_BY_TAG),
                        None,
                    )
        elif child.tag[: len(IMDN_NS) + 2] == f"{{{IMDN_NS}}}":
            fields[child.tag[len(IMDN_NS) + 2 :]] = child.text or ""
    message_id = fields.get("message-id", "").strip()
    if not message_id:
        raise bad_body("IMDN", "no message-id")
    try:
        date_time = datetime.fromisoformat(fields.get("datetime", "").strip())
    except ValueError:
        # RFC 5438: datetime is mandatory; it pairs the notification with the message.
        raise bad_body("IMDN", "missing or malformed datetime") from None
    if kind is None or status is None:
        raise bad_body("IMDN", "no notification status")
    if status not in _ALLOWED[kind]:
        raise bad_body("IMDN", f"{status.value} in a {kind.value}")
    return DispositionNotification(
        message_id,
        date_time,
        kind,
        status,
        fields.get("recipient-uri"),
        fields.get("original-recipient-uri"),
        fields.get("subject"),
    )


def notification_message(
    note: DispositionNotification,
    sender: str,
    recipient: str,
    message_id: str,
    now: datetime,
) -> CpimMessage:
    """The CPIM message that carries ``note`` from ``sender`` back to ``recipient``.

    RFC 5438: it has its own Message-ID and DateTime, asks for no notification itself, and
    marks its content ``Content-Disposition: notification``.
    """
    headers = (
        ("From", format_address(sender)),
        ("To", format_address(recipient)),
        ("NS", f"{_PREFIX} <{IMDN_HEADER_NS}>"),
        (f"{_PREFIX}.Message-ID", message_id),
        ("DateTime", format_datetime(now)),
    )
    content = (
        ("Content-Type", f"{IMDN_CONTENT_TYPE}; charset=UTF-8"),
        ("Content-Disposition", "notification"),
    )
    return CpimMessage(headers, content, encode_notification(note))
