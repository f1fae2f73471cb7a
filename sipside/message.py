"""SIP messages: parsing, serialization and cheap structured accessors (RFC 3261 7, 20, 25).

The parser is on the hot path of the gateway. It splits the header block once into a tuple of
``(canonical name, value)`` pairs and leaves every structured value (Via, CSeq, addresses) to be
parsed on demand. It is tolerant where RFC 3261 asks for tolerance (line folding, compact forms,
case-insensitive names, whitespace around the colon) and strict where the RFC 4475 torture
messages show that leniency is dangerous (start line, Content-Length). Malformed input always
raises :class:`PeerError` with status 400 (or 505 for a request of another SIP version), never
any other exception type. Semantic checks live in ``sipside.validate``.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self

from sipside.errors import LocalError, PeerError
from sipside.fastpath import fast_frozen_init, remember, slot_setter
from sipside.headers import (
    COMPACT_FORMS,
    KNOWN_HEADERS,
    LIST_HEADERS,
    LONGEST_HEADER_NAME,
    TOKEN,
    URI_START,
    FoldedLines,
    HeaderIndex,
    HeaderRepeats,
    NameAddr,
    Params,
    Via,
    add_repeat,
    bad_request,
    canonical_name,
    header_key,
    parse_name_addr,
    parse_params,
    remember_via,
    split_header_lines,
    split_list,
)

# The header-level names lived here before sipside.headers and sipside.fastpath were split
# out; they stay importable from this module, which callers think of as "the SIP message API".
__all__ = [
    "COMPACT_FORMS",
    "LIST_HEADERS",
    "NameAddr",
    "Params",
    "SipMessage",
    "SipRequest",
    "SipResponse",
    "Via",
    "canonical_name",
    "fast_frozen_init",
    "make_request",
    "make_response",
    "new_branch",
    "new_call_id",
    "new_tag",
    "parse_message",
    "parse_name_addr",
    "parse_params",
    "reason_phrase",
    "remember_via",
    "split_list",
]

_METHOD = TOKEN
# methods that need no regex to be known to be tokens
_COMMON_METHODS = frozenset(
    ["MESSAGE", "SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER", "OPTIONS", "INVITE", "ACK", "BYE"]
)
_VERSION = re.compile(r"SIP/\d+\.\d+", re.IGNORECASE)
_FOLD = re.compile(r"\r\n[ \t]+")
_CSEQ = re.compile(r"([0-9]{1,10})[ \t]+([A-Za-z0-9\-.!%*_+`'~]+)")


class _Headers:
    """Accessors shared by requests and responses (a mixin over ``headers`` and ``body``).

    Lookups go through an index of header positions by name, built once per message (by the
    parser, or on first use for a message made in code) and kept in two private slots that are
    not dataclass fields (not compared, hashed or copied): every constructor sets them to
    None, so copies start without them.
    """

    __slots__ = ("_index", "_repeats", "_wire_size")
    headers: tuple[tuple[str, str], ...]
    body: bytes
    _index: HeaderIndex | None
    _repeats: HeaderRepeats | None
    _wire_size: int | None  # bytes of the start line and header block as received

    def header_bytes_at_most(self) -> int | None:
        """An upper bound of the header block's size as ``validate`` counts it (names, ": ",
        values in UTF-8, CRLF), known without encoding anything for a parsed message; None
        for one made in code. Each stored line is at most its wire line plus the growth of a
        compact or case-folded name to its canonical spelling and the ": " and CRLF."""
        try:
            size = self._wire_size
        except AttributeError:
            return None
        return None if size is None else size + (LONGEST_HEADER_NAME + 4) * len(self.headers)

    def _header_index(self) -> HeaderIndex:
        """Position of each header's first value (building the index if need be)."""
        try:
            known = self._index
        except AttributeError:
            known = None  # copy.copy() and pickle fill in the fields only
        if known is not None:
            return known
        repeats: HeaderRepeats | None = None
        index: HeaderIndex = {}
        for position, (name, _value) in enumerate(self.headers):
            key = name if name in KNOWN_HEADERS else name.lower()
            if key in index:
                repeats = add_repeat(repeats, index, key, position)
            else:
                index[key] = position
        _set_index(self, index)
        _set_repeats(self, repeats)
        return index

    def _positions(self, key: str) -> list[int]:
        """Positions of all values of the header with index key ``key``."""
        index = self._header_index()
        repeats = self._repeats
        if repeats is not None:
            found = repeats.get(key)
            if found is not None:
                return found
        first = index.get(key)
        return [] if first is None else [first]

    def header(self, name: str) -> str | None:
        """First value of a header; name case-insensitive, compact forms accepted."""
        key = header_key(name)
        if key == "Content-Length":
            return str(len(self.body))
        return self._first(key)

    def _first(self, key: str) -> str | None:
        """First value of the header with index key ``key`` (the accessors' short way)."""
        try:
            index = self._index
        except AttributeError:
            index = None
        if index is None:
            index = self._header_index()
        position = index.get(key)
        return None if position is None else self.headers[position][1]

    def header_values(self, name: str) -> list[str]:
        """All values of a header; list headers are split on commas (empty items dropped)."""
        key = header_key(name)
        if key == "Content-Length":
            return [str(len(self.body))]
        headers = self.headers
        values = [headers[position][1] for position in self._positions(key)]
        if key not in LIST_HEADERS:
            return values
        return [item for value in values for item in split_list(value) if item]

    def header_count(self, name: str) -> int:
        """How many times a header occurs (lines, not comma-separated items)."""
        key = header_key(name)
        if key == "Content-Length":
            return 1
        return len(self._positions(key))

    @property
    def call_id(self) -> str:
        """The Call-ID; PeerError 400 if missing."""
        value = self._first("Call-ID")
        if not value:
            raise bad_request("missing Call-ID")
        return value

    @property
    def cseq(self) -> tuple[int, str]:
        """``(number, method)`` from CSeq (RFC 3261 20.16); PeerError 400 if missing or bad."""
        value = self._first("CSeq")
        if value is not None:
            cached = _CSEQS.get(value)
            if cached is not None:
                return cached
        match = _CSEQ.fullmatch(value.strip()) if value else None
        if match is None:
            raise bad_request(f"bad or missing CSeq {value!r}")
        number = int(match[1])
        if number >= 2**32:  # RFC 3261 8.1.1.5: a 32-bit unsigned integer (RFC 4475 scalar02)
            raise bad_request(f"CSeq number out of range {match[1]}")
        assert value is not None
        result = number, match[2]
        remember(_CSEQS, value, result)
        return result

    @property
    def from_tag(self) -> str | None:
        """The From tag, None if there is none (RFC 2543 peers)."""
        value = self._first("From")
        return parse_name_addr(value).tag if value is not None else None

    @property
    def to_tag(self) -> str | None:
        """The To tag, None outside a dialog."""
        value = self._first("To")
        return parse_name_addr(value).tag if value is not None else None

    @property
    def vias(self) -> list[Via]:
        """All Via values, top first; PeerError 400 if one is malformed."""
        headers = self.headers
        return [
            Via.parse(item)
            for position in self._positions("Via")
            for item in split_list(headers[position][1])
        ]

    @property
    def top_via(self) -> Via | None:
        """The first Via value, parsing no other; PeerError 400 if it is malformed."""
        value = self._first("Via")
        if value is None:
            return None
        return Via.parse(value if "," not in value else split_list(value)[0])

    def replace_headers(self, name: str, values: Iterable[str]) -> Self:
        """A copy where ``values`` replace every ``name`` header (appended at the end)."""
        canon = _settable(name)
        lname = canon.lower()
        kept = tuple((k, v) for k, v in self.headers if k.lower() != lname)
        return self._with_headers(kept + tuple((canon, v) for v in values))

    def add_header(self, name: str, value: str, *, first: bool = False) -> Self:
        """A copy with one more header, at the end or (``first``) before all others."""
        entry = ((_settable(name), value),)
        headers = entry + self.headers if first else self.headers + entry
        return self._with_headers(headers)

    def replace_first(self, name: str, value: str) -> Self:
        """A copy whose first ``name`` header has ``value``, in place; LocalError if none."""
        position = self._header_index().get(header_key(_settable(name)))
        if position is None:
            raise LocalError(f"no {name} header to replace")
        return self._replace_at(position, value)

    def with_top_via(self, value: str) -> Self:
        """A copy whose first Via value (the first item of the first Via header) is ``value``,
        everything else untouched (RFC 3261 18.2.1 stamping); LocalError if there is no Via."""
        position = self._header_index().get("Via")
        if position is None:
            raise LocalError("no Via header to replace")
        current = self.headers[position][1]
        if "," in current:
            items = split_list(current)
            items[0] = value
            value = ", ".join(items)
        return self._replace_at(position, value)

    def _replace_at(self, position: int, value: str) -> Self:
        headers = list(self.headers)
        headers[position] = (headers[position][0], value)
        copy = self._with_headers(tuple(headers))
        # same names at the same positions: the index still holds
        _set_index(copy, self._header_index())
        _set_repeats(copy, self._repeats)
        try:
            size = self._wire_size
        except AttributeError:
            size = None
        if size is not None:
            # still an upper bound (header_bytes_at_most) with the whole new value added
            _set_wire_size(copy, size + len(value.encode()))
        return copy

    def _with_headers(self, headers: tuple[tuple[str, str], ...]) -> Self:
        raise NotImplementedError  # pragma: no cover


_CSEQS: dict[str, tuple[int, str]] = {}


def _settable(name: str) -> str:
    canon = canonical_name(name)
    if canon == "Content-Length":
        raise LocalError("Content-Length is computed from the body when serializing")
    return canon


def _serialize(start: str, headers: tuple[tuple[str, str], ...], body: bytes) -> bytes:
    # ": ".join of each (name, value) pair runs in C: no Python-level loop over the headers
    lines = [start, *map(": ".join, headers), f"Content-Length: {len(body)}\r\n\r\n"]
    head = "\r\n".join(lines).encode()
    return head + body if body else head


@dataclass(frozen=True, slots=True, init=False)
class SipRequest(_Headers):
    """A SIP request; ``headers`` in wire order without Content-Length (derived from body)."""

    method: str
    uri: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    # Written out (not generated) so that compiled it is native: see fast_frozen_init.
    def __init__(
        self, method: str, uri: str, headers: tuple[tuple[str, str], ...], body: bytes = b""
    ) -> None:
        self.method = method  # type: ignore[misc]
        self.uri = uri  # type: ignore[misc]
        self.headers = headers  # type: ignore[misc]
        self.body = body  # type: ignore[misc]
        # Set, not left out: compiled, reading a slot never set raises, and a raise through
        # native code costs as much as building the index (two per NOTIFY, callgrind).
        self._index = None  # type: ignore[misc]
        self._repeats = None  # type: ignore[misc]
        self._wire_size = None  # type: ignore[misc]

    def __bytes__(self) -> bytes:
        return _serialize(f"{self.method} {self.uri} SIP/2.0", self.headers, self.body)

    def _with_headers(self, headers: tuple[tuple[str, str], ...]) -> Self:
        return type(self)(self.method, self.uri, headers, self.body)

    def __reduce__(
        self,
    ) -> tuple[type[SipRequest], tuple[str, str, tuple[tuple[str, str], ...], bytes]]:
        # copy and pickle through the constructor: the private slots start afresh, and a
        # compiled frozen class takes no state set after construction
        return (type(self), (self.method, self.uri, self.headers, self.body))


fast_frozen_init(SipRequest)


@dataclass(frozen=True, slots=True, init=False)
class SipResponse(_Headers):
    """A SIP response; ``headers`` in wire order without Content-Length (derived from body)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def __init__(
        self, status: int, reason: str, headers: tuple[tuple[str, str], ...], body: bytes = b""
    ) -> None:
        self.status = status  # type: ignore[misc]
        self.reason = reason  # type: ignore[misc]
        self.headers = headers  # type: ignore[misc]
        self.body = body  # type: ignore[misc]
        # Set, not left out: compiled, reading a slot never set raises, and a raise through
        # native code costs as much as building the index (two per NOTIFY, callgrind).
        self._index = None  # type: ignore[misc]
        self._repeats = None  # type: ignore[misc]
        self._wire_size = None  # type: ignore[misc]

    def __bytes__(self) -> bytes:
        return _serialize(f"SIP/2.0 {self.status} {self.reason}", self.headers, self.body)

    def _with_headers(self, headers: tuple[tuple[str, str], ...]) -> Self:
        return type(self)(self.status, self.reason, headers, self.body)

    def __reduce__(
        self,
    ) -> tuple[type[SipResponse], tuple[int, str, tuple[tuple[str, str], ...], bytes]]:
        return (type(self), (self.status, self.reason, self.headers, self.body))


fast_frozen_init(SipResponse)


SipMessage = SipRequest | SipResponse

_set_index = slot_setter(_Headers, "_index")
_set_repeats = slot_setter(_Headers, "_repeats")
_set_wire_size = slot_setter(_Headers, "_wire_size")


def parse_message(data: bytes) -> SipMessage:
    """Parse one complete message; PeerError 400 for malformed input, 505 for another version."""
    try:
        return _parse(data)
    except PeerError:
        raise
    except Exception as exc:  # the contract: nothing but PeerError escapes the parser
        raise bad_request(f"unparsable message ({type(exc).__name__})") from None


def _parse(data: bytes) -> SipMessage:
    # RFC 3261 7.5: CRLFs before the start line are ignored
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end >= 0:
        head, rest = data[start:end], data[end + 4 :]
    else:
        # a datagram whose header block is not closed by an empty line: take it all as headers
        head = data[start:-2] if data.endswith(b"\r\n") else data[start:]
        rest = b""
    if not head:
        raise bad_request("empty message")
    try:
        text = head.decode()
    except UnicodeDecodeError:
        raise bad_request("header block is not UTF-8") from None
    lines = text.split("\r\n")
    breaks = len(lines) - 1  # CRLF pairs cannot overlap, so this is how many there are
    if text.count("\r") != breaks or text.count("\n") != breaks:
        raise bad_request("bare CR or LF in header block")
    if breaks and lines[1][:1] in (" ", "\t"):
        raise bad_request("start line continued on the next line")
    try:
        headers, index, repeats, length = split_header_lines(lines)
    except (PeerError, FoldedLines):
        # RFC 3261 7.3.1: folded LWS is one SP. Looking for folds costs a scan of the whole
        # block, so it is only done once a line looks odd (a continuation line always does).
        if not _FOLD.search(text):
            raise
        headers, index, repeats, length = split_header_lines(_FOLD.sub(" ", text).split("\r\n"))
    if length is not None:
        if not length.isascii() or not length.isdigit():
            raise bad_request(f"bad Content-Length {length[:20]!r}")  # RFC 4475 ncl
        size = int(length)
        if size > len(rest):
            # RFC 3261 18.3: a datagram that ends before its body is an error (RFC 4475 clerr)
            raise bad_request(f"body shorter than Content-Length {size}")
        body = rest[:size]  # RFC 3261 18.3: bytes past Content-Length are dropped
    else:
        body = rest
    return _start_line(lines[0], headers, body, index, repeats, len(head))


def _start_line(
    first: str,
    headers: tuple[tuple[str, str], ...],
    body: bytes,
    index: HeaderIndex,
    repeats: HeaderRepeats | None,
    wire_size: int,
) -> SipMessage:
    if first[:4].upper() == "SIP/":
        parts = first.split(" ", 2)
        if parts[0].upper() != "SIP/2.0":
            raise bad_request(f"response of another SIP version {parts[0][:20]!r}")
        code = parts[1] if len(parts) > 1 else ""
        # RFC 3261 25.1: Status-Code is 3DIGIT; RFC 4475 bigcode has more
        if len(code) != 3 or not code.isascii() or not code.isdigit() or code[0] not in "123456":
            raise bad_request(f"bad status code {code[:20]!r}")
        reason = parts[2] if len(parts) > 2 else ""
        response = SipResponse(int(code), reason, headers, body)
        _set_index(response, index)
        _set_repeats(response, repeats)
        _set_wire_size(response, wire_size)
        return response
    parts = first.split(" ")
    # RFC 3261 7.1: exactly one SP between the elements (RFC 4475 lwsstart, lwsruri, trws)
    if len(parts) != 3:
        raise bad_request("request line is not Method SP Request-URI SP SIP-Version")
    method, uri, version = parts
    if method not in _COMMON_METHODS and not _METHOD.fullmatch(method):
        raise bad_request(f"bad method {method[:40]!r}")
    if not URI_START.fullmatch(uri):
        raise bad_request(f"bad Request-URI {uri[:60]!r}")  # RFC 4475 ltgtruri
    if version != "SIP/2.0" and version.upper() != "SIP/2.0":
        if _VERSION.fullmatch(version):
            # RFC 3261 8.2.1 and 21.5.7 (RFC 4475 badvers)
            raise PeerError(505, "Version Not Supported", version)
        raise bad_request(f"bad SIP version {version[:20]!r}")
    request = SipRequest(method, uri, headers, body)
    _set_index(request, index)
    _set_repeats(request, repeats)
    _set_wire_size(request, wire_size)
    return request


_REASONS: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated", 200: "OK", 202: "Accepted",
    204: "No Notification", 300: "Multiple Choices", 301: "Moved Permanently",
    302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service", 400: "Bad Request",
    401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 407: "Proxy Authentication Required",
    408: "Request Timeout", 410: "Gone", 412: "Conditional Request Failed",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 417: "Unknown Resource-Priority", 420: "Bad Extension",
    421: "Extension Required", 423: "Interval Too Brief", 428: "Use Identity Header",
    429: "Provide Referrer Identity", 430: "Flow Failed", 433: "Anonymity Disallowed",
    436: "Bad Identity-Info", 437: "Unsupported Certificate", 438: "Invalid Identity Header",
    439: "First Hop Lacks Outbound Support", 440: "Max-Breadth Exceeded",
    469: "Bad Info Package", 470: "Consent Needed", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 489: "Bad Event", 491: "Request Pending",
    493: "Undecipherable", 494: "Security Agreement Required", 500: "Server Internal Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    555: "Push Notification Service Not Supported", 580: "Precondition Failure",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable", 607: "Unwanted", 608: "Rejected",
}  # fmt: skip

_CLASS_REASONS = {1: "Trying", 2: "OK", 3: "Redirection", 4: "Client Error", 5: "Server Error"}


def make_request(
    method: str,
    uri: str,
    *,
    from_: str,
    to: str,
    call_id: str,
    cseq: int = 1,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> SipRequest:
    """A new out-of-dialog request without Via (the endpoint adds it)."""
    base = (
        ("From", from_),
        ("To", to),
        ("Call-ID", call_id),
        ("CSeq", f"{cseq} {method}"),
    )
    return SipRequest(method, uri, base + tuple(headers), body)


def reason_phrase(status: int) -> str:
    """The usual reason phrase for a status code (RFC 3261 21), or one for its class."""
    return _REASONS.get(status) or _CLASS_REASONS.get(status // 100, "Global Failure")


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
) -> SipResponse:
    """A response copying Via, From, To (plus ``to_tag``), Call-ID and CSeq (RFC 3261 8.2.6.2).

    Works on requests missing some of those headers, so that a 400 can still be sent.
    """
    if not 100 <= status <= 699:
        raise LocalError(f"status {status} out of range")
    copied: list[tuple[str, str]] = []
    for header in request.headers:
        name = header[0]
        if name not in _COPIED:
            if name == "Timestamp" and status == 100:
                copied.append(header)  # RFC 3261 8.2.6.1: a 100 copies the Timestamp
        elif name == "To" and to_tag is not None and _lacks_tag(header[1]):
            copied.append((name, f"{header[1]};tag={to_tag}"))
        else:
            copied.append(header)
    if headers:
        copied.extend([(canonical_name(n), v) for n, v in headers])
    if reason is None:
        reason = _REASONS.get(status) or reason_phrase(status)
    return SipResponse(status, reason, tuple(copied), body)


_COPIED = frozenset(["Via", "From", "To", "Call-ID", "CSeq"])  # RFC 3261 8.2.6.2


def _lacks_tag(to: str) -> bool:
    try:
        return parse_name_addr(to).tag is None
    except PeerError:
        return False  # a malformed To is echoed untouched in the error response


class _RandomPool:
    """Bytes from os.urandom (what secrets uses), read a block at a time: one system call per
    few hundred identifiers instead of one each. Each byte is handed out once; a forked child
    starts with an empty pool so that it never repeats its parent's identifiers."""

    __slots__ = ("_data", "_offset")
    BLOCK = 4096

    def __init__(self) -> None:
        self._data = b""
        self._offset = 0

    def reset(self) -> None:
        """Forget the bytes read so far (after fork)."""
        self._data = b""
        self._offset = 0

    def token_hex(self, nbytes: int) -> str:
        """Like secrets.token_hex(nbytes)."""
        start = self._offset
        end = start + nbytes
        if end > len(self._data):
            self._data = secrets.token_bytes(max(self.BLOCK, nbytes))
            start, end = 0, nbytes
        self._offset = end
        return self._data[start:end].hex()


_random = _RandomPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_random.reset)


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie plus 80 random bits."""
    return "z9hG4bK" + _random.token_hex(10)


def new_tag() -> str:
    """A fresh From/To tag (RFC 3261 19.3: at least 32 random bits)."""
    return _random.token_hex(8)


def new_call_id() -> str:
    """A fresh, globally unique Call-ID (RFC 3261 8.1.1.4)."""
    return _random.token_hex(16)
