"""Common Presence and Instant Messaging message format, ``message/cpim`` (RFC 3862).

A CPIM body is three parts separated by blank lines: message headers (From, To, DateTime,
Subject, NS, Require and namespaced extensions such as ``imdn.Message-ID``), the MIME headers of
the encapsulated content (Content-Type first of all), and the content itself. SIP clients wrap
text in it when they ask for IMDN (RFC 5438); DESIGN 4.1 unwraps it.

:func:`parse` takes bytes from anyone and raises only :class:`~sipside.errors.PeerError` (400
malformed, 413 too large); :func:`build` writes the canonical form with CRLF line ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from sipside.errors import PeerError, bad_body
from sipside.xmlsafe import MediaType, parse_media_type

__all__ = [
    "CPIM_CONTENT_TYPE",
    "CpimMessage",
    "build",
    "format_address",
    "format_datetime",
    "parse",
    "parse_address",
    "wrap",
]

CPIM_CONTENT_TYPE = "message/cpim"
MAX_CPIM_BYTES = 256 * 1024
MAX_HEADERS = 64

# RFC 3862 3.1, 3.4: header names are tokens, optionally "Prefix." qualified; values run to
# CRLF and are never folded.
_HEADER_NAME = re.compile(r"[!#$%&'*+^_`|~0-9A-Za-z-]+(?:\.[!#$%&'*+^_`|~0-9A-Za-z-]+)?")
_NS_VALUE = re.compile(r'^\s*(?:("?)([^<"]*)\1\s*)?<([^<>]+)>\s*$')
_ADDRESS = re.compile(r'^\s*(?:"((?:[^"\\]|\\.)*)"|([^<"]*?))\s*<([^<>\s]+)>\s*$')


@dataclass(frozen=True, slots=True)
class CpimMessage:
    """A parsed CPIM message: message headers, content headers and the inner body bytes.

    Headers are ``(name, value)`` pairs in wire order; names keep their spelling and prefix.
    """

    headers: tuple[tuple[str, str], ...]
    content_headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first message header called ``name`` (compared without case), if any."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def header_values(self, name: str) -> tuple[str, ...]:
        """Every message header called ``name``, in order (To and cc may repeat)."""
        wanted = name.lower()
        return tuple(v for k, v in self.headers if k.lower() == wanted)

    def namespaces(self) -> dict[str, str]:
        """RFC 3862 4.6 NS headers: prefix -> namespace URI."""
        result: dict[str, str] = {}
        for value in self.header_values("NS"):
            match = _NS_VALUE.match(value)
            if match is not None:
                result[(match.group(2) or "").strip()] = match.group(3)
        return result

    def ns_header(self, namespace: str, name: str) -> str | None:
        """The header ``name`` of ``namespace`` under whatever prefix the sender bound to it."""
        for prefix, uri in self.namespaces().items():
            if uri == namespace:
                value = self.header(f"{prefix}.{name}" if prefix else name)
                if value is not None:
                    return value
        return None

    def content_header(self, name: str) -> str | None:
        """The first content (MIME) header called ``name``, if any."""
        wanted = name.lower()
        return next((v for k, v in self.content_headers if k.lower() == wanted), None)

    @property
    def content_type(self) -> str:
        """The Content-Type of the inner body; parsing guaranteed it is present."""
        value = self.content_header("Content-Type")
        return value if value is not None else "text/plain"

    def media_type(self) -> MediaType:
        """The inner Content-Type parsed (PeerError(400) when it is malformed)."""
        return parse_media_type(self.content_type)

    def sender(self) -> str | None:
        """The URI in the From header (RFC 3862 4.1), without display name."""
        value = self.header("From")
        return parse_address(value)[1] if value is not None else None

    def recipients(self) -> tuple[str, ...]:
        """The URIs of the To headers (RFC 3862 4.2)."""
        return tuple(parse_address(v)[1] for v in self.header_values("To"))

    def date_time(self) -> datetime | None:
        """The DateTime header (RFC 3862 4.4, RFC 3339); PeerError(400) when malformed."""
        value = self.header("DateTime")
        if value is None:
            return None
        try:
            return datetime.fromisoformat(value.strip())
        except ValueError:
            raise bad_body("CPIM", f"DateTime {value[:40]!r}") from None

    def text(self) -> str:
        """The inner body as text, decoded with its charset (UTF-8 by default); 400 if it is not."""
        charset = self.media_type().charset or "utf-8"
        try:
            return self.body.decode(charset)
        except (LookupError, UnicodeDecodeError):
            raise bad_body("CPIM", f"inner body is not {charset}") from None


def _split_headers(block: str, where: str) -> tuple[tuple[str, str], ...]:
    headers: list[tuple[str, str]] = []
    for line in block.split("\n"):
        line = line.removesuffix("\r")
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise bad_body("CPIM", f"malformed {where} header line {line[:60]!r}")
        headers.append((name, value.strip()))
        if len(headers) > MAX_HEADERS:
            raise bad_body("CPIM", f"more than {MAX_HEADERS} {where} headers")
    return tuple(headers)


def _next_blank_line(data: bytes, start: int) -> tuple[int, int]:
    """Where the header block starting at ``start`` ends, and where the next part begins."""
    crlf = data.find(b"\r\n\r\n", start)
    lf = data.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    raise bad_body("CPIM", "missing blank line after headers")


def parse(data: bytes, max_bytes: int = MAX_CPIM_BYTES) -> CpimMessage:
    """Parse a ``message/cpim`` body; PeerError(400) if malformed, 413 if over ``max_bytes``."""
    if len(data) > max_bytes:
        raise PeerError(413, "Request Entity Too Large", f"CPIM body over {max_bytes} bytes")
    end, content_start = _next_blank_line(data, 0)
    head_end, body_start = _next_blank_line(data, content_start)
    try:
        message_block = data[:end].decode("utf-8")
        content_block = data[content_start:head_end].decode("utf-8")
    except UnicodeDecodeError:
        # RFC 3862 3.2: header values are UTF-8.
        raise bad_body("CPIM", "headers are not UTF-8") from None
    headers = _split_headers(message_block, "message")
    if not headers:
        raise bad_body("CPIM", "no message headers")
    content_headers = _split_headers(content_block, "content")
    if not any(name.lower() == "content-type" for name, _ in content_headers):
        raise bad_body("CPIM", "encapsulated content without Content-Type")
    message = CpimMessage(headers, content_headers, data[body_start:])
    message.media_type()  # a malformed inner Content-Type is the sender's fault: 400 now
    return message


def _check_value(name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"not a CPIM header name: {name!r}")
    if "\r" in value or "\n" in value:
        raise ValueError(f"line break in CPIM header {name}")


def build(message: CpimMessage) -> bytes:
    """Serialise ``message`` with CRLF line ends; ValueError for headers that cannot be written."""
    lines: list[str] = []
    for name, value in message.headers:
        _check_value(name, value)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    for name, value in message.content_headers:
        _check_value(name, value)
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8") + message.body


def parse_address(value: str) -> tuple[str | None, str]:
    """Split a CPIM address ``"Name" <uri>`` / ``Name <uri>`` / ``<uri>`` into (name, uri).

    A bare URI without angle brackets is tolerated; PeerError(400) for anything else.
    """
    match = _ADDRESS.match(value)
    if match is None:
        bare = value.strip()
        if bare and not any(c in bare for c in ' <>"'):
            return None, bare
        raise bad_body("CPIM", f"malformed address {value[:60]!r}")
    quoted, plain, uri = match.groups()
    if quoted is not None:
        name: str | None = re.sub(r"\\(.)", r"\1", quoted)
    else:
        name = plain or None
    return name, uri


def format_address(uri: str, display_name: str | None = None) -> str:
    """The CPIM form of an address: ``"Name" <uri>`` or ``<uri>``."""
    if not display_name:
        return f"<{uri}>"
    escaped = display_name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}" <{uri}>'


def format_datetime(value: datetime) -> str:
    """RFC 3339 text for a DateTime header, ``Z`` for UTC."""
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def wrap(
    sender: str,
    recipient: str,
    body: bytes,
    content_type: str = "text/plain;charset=UTF-8",
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> CpimMessage:
    """A CPIM message from ``sender`` to ``recipient`` around ``body`` of ``content_type``."""
    headers = (("From", format_address(sender)), ("To", format_address(recipient)))
    return CpimMessage((*headers, *extra_headers), (("Content-Type", content_type),), body)
