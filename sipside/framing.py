"""Sans-IO framing of SIP over a byte stream (TCP, TLS): RFC 3261 18.3 and RFC 5626 3.5.1.

A stream carries messages back to back; each ends after its header block plus Content-Length
bytes of body, so Content-Length is mandatory on streams. Between messages a peer may send CRLF
keep-alives: a double CRLF is a ping the receiver answers with a single CRLF (the pong), and
lone CRLFs are ignored (RFC 3261 7.5). The framer returns complete raw messages, to be given to
``parse_message``, and :class:`KeepAlive` events; it keeps no more than ``max_buffer`` bytes.
When the peer breaks the framing it returns a final :class:`FramingError` (after the messages
completed before the fault, which are still good), and the adapter answers if it can and closes
the connection: a stream whose framing is lost cannot be resynchronised.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from sipside.errors import LocalError, PeerError

# Content-Length (or compact "l") at the start of a header line, folded value tolerated
_CONTENT_LENGTH = re.compile(
    rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(?:\r\n[ \t]+)?([^\r\n]*)", re.IGNORECASE
)

PONG = b"\r\n"


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """A CRLFCRLF ping between messages (RFC 5626 3.5.1): answer it by writing ``PONG``."""


@dataclass(frozen=True, slots=True)
class FramingError:
    """The framing broke: always the last event; answer ``error.status`` if useful, then close."""

    error: PeerError


FrameEvent = bytes | KeepAlive | FramingError


class FramerState(enum.Enum):
    """Where the framer is in the stream."""

    BETWEEN = "between"  # before a start line: CRLF keep-alives may come
    HEADERS = "headers"  # inside a header block, looking for the empty line
    BODY = "body"  # header block complete, waiting for Content-Length bytes
    FAILED = "failed"  # framing lost; the connection must be closed


class StreamFramer:
    """Cut a byte stream into SIP messages and keep-alives, with a bounded read buffer."""

    def __init__(self, max_buffer: int = 65536) -> None:
        self.max_buffer = max_buffer
        self.state = FramerState.BETWEEN
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the header block already searched for the empty line
        self._message_size = 0  # header block + body, once known
        self._crlfs = 0  # CRLFs seen since the last message or ping

    @property
    def pending(self) -> int:
        """Bytes buffered towards the next message."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[FrameEvent]:
        """Add received bytes; return the messages and pings they complete, in stream order.

        A FramingError ends the list when the stream broke (400 no or bad Content-Length, 513
        header block over the cap, 413 body over the cap); the framer is then FAILED and any
        further feed is a LocalError.
        """
        if self.state is FramerState.FAILED:
            raise LocalError("feed() after a framing error: the connection must be closed")
        self._buffer += data
        events: list[FrameEvent] = []
        try:
            while self._step(events):
                pass
        except PeerError as error:
            self.state = FramerState.FAILED
            self._buffer.clear()
            events.append(FramingError(error))
        return events

    def _step(self, events: list[FrameEvent]) -> bool:
        """Advance by one unit (a CRLF, a header block or a body); False when data runs out."""
        buffer = self._buffer
        match self.state:
            case FramerState.BETWEEN:
                if not buffer:
                    return False
                if buffer[0] == 0x0D:
                    if len(buffer) < 2:
                        return False
                    if buffer[1] != 0x0A:
                        raise PeerError(400, "Bad Request", "CR without LF between messages")
                    del buffer[:2]
                    self._crlfs += 1
                    if self._crlfs == 2:
                        # RFC 5626 3.5.1: CRLFCRLF is a ping; lone CRLFs are skipped (RFC 3261 7.5)
                        self._crlfs = 0
                        events.append(KeepAlive())
                    return True
                self._crlfs = 0
                self._scanned = 0
                self.state = FramerState.HEADERS
                return True
            case FramerState.HEADERS:
                end = buffer.find(b"\r\n\r\n", max(self._scanned - 3, 0))
                if end < 0:
                    self._scanned = len(buffer)
                    if len(buffer) > self.max_buffer:
                        raise PeerError(513, "Message Too Large", "header block over the limit")
                    return False
                head_size = end + 4
                if head_size > self.max_buffer:
                    raise PeerError(513, "Message Too Large", "header block over the limit")
                self._message_size = head_size + self._content_length(bytes(buffer[:end]))
                if self._message_size > self.max_buffer:
                    raise PeerError(413, "Request Entity Too Large", "body over the limit")
                self.state = FramerState.BODY
                return True
            case FramerState.BODY:
                if len(buffer) < self._message_size:
                    return False
                events.append(bytes(buffer[: self._message_size]))
                del buffer[: self._message_size]
                self.state = FramerState.BETWEEN
                return True
            case FramerState.FAILED:
                return False

    @staticmethod
    def _content_length(head: bytes) -> int:
        # the start line has no Content-Length, so searching from its CRLF is enough
        values = {m[1].strip(b" \t") for m in _CONTENT_LENGTH.finditer(head)}
        if not values:
            # RFC 3261 18.3: "MUST be used with stream oriented transports"
            raise PeerError(400, "Bad Request", "no Content-Length on a stream")
        if len(values) > 1:
            # RFC 4475 mcl01: over TCP "the framing error is not recoverable"
            raise PeerError(400, "Bad Request", "conflicting Content-Length values")
        value = values.pop()
        if not value.isdigit() or len(value) > 10:
            raise PeerError(400, "Bad Request", "bad Content-Length")
        return int(value)
