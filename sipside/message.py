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

import itertools
import os
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Self, TypeVar

from sipside.errors import LocalError, PeerError

# RFC 3261 7.3.3 and the IANA registry: compact form -> full name
COMPACT_FORMS: dict[str, str] = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "n": "Identity-Info",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}

# fmt: off
_KNOWN_NAMES = [
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
    "Allow-Events", "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
    "Content-Disposition", "Content-Encoding", "Content-ID", "Content-Language",
    "Content-Length", "Content-Transfer-Encoding", "Content-Type", "CSeq", "Date",
    "Error-Info", "Event", "Expires", "From", "History-Info", "Identity", "Identity-Info",
    "In-Reply-To", "Max-Forwards", "MIME-Version", "Min-Expires", "Min-SE", "Organization",
    "P-Asserted-Identity", "P-Preferred-Identity", "Path", "Priority", "Privacy",
    "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require", "RAck", "Reason",
    "Record-Route", "Refer-To", "Referred-By", "Reject-Contact", "Replaces", "Reply-To",
    "Request-Disposition", "Require", "Retry-After", "Route", "RSeq", "Server",
    "Service-Route", "Session-Expires", "SIP-ETag", "SIP-If-Match", "Subject",
    "Subscription-State", "Supported", "Timestamp", "To", "Unsupported", "User-Agent", "Via",
    "Warning", "WWW-Authenticate",
]
# fmt: on

# lower-case name (full or compact) -> canonical spelling
_CANON: dict[str, str] = {name.lower(): name for name in _KNOWN_NAMES}
_CANON.update(COMPACT_FORMS)
_KNOWN = frozenset(_KNOWN_NAMES)
_LONGEST_NAME = max(map(len, _KNOWN_NAMES))
# The parser's first try: names exactly as well-behaved peers write them (canonical, lower-case
# or compact), which saves a lower() per header line; anything else goes through _CANON.
_EXACT: dict[str, str] = {**_CANON, **{name: name for name in _KNOWN_NAMES}}

# Headers whose values are comma-separated lists (RFC 3261 7.3.1); the others are never split
# fmt: off
LIST_HEADERS = frozenset([
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
    "Allow-Events", "Call-Info", "Contact", "Content-Encoding", "Content-Language",
    "Error-Info", "History-Info", "In-Reply-To", "P-Asserted-Identity",
    "P-Preferred-Identity", "Path", "Proxy-Require", "Reason", "Record-Route",
    "Reject-Contact", "Request-Disposition", "Require", "Route", "Service-Route", "Supported",
    "Unsupported", "Via", "Warning",
])
# fmt: on

_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_METHOD = _TOKEN
# methods that need no regex to be known to be tokens
_COMMON_METHODS = frozenset(
    ["MESSAGE", "SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER", "OPTIONS", "INVITE", "ACK", "BYE"]
)
_URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"]+")
_VERSION = re.compile(r"SIP/\d+\.\d+", re.IGNORECASE)
_FOLD = re.compile(r"\r\n[ \t]+")
_VIA = re.compile(
    r"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*(;.*)?",
    re.IGNORECASE | re.DOTALL,
)
_CSEQ = re.compile(r"([0-9]{1,10})[ \t]+([A-Za-z0-9\-.!%*_+`'~]+)")
# Parameters with nothing to strip or unquote (names and values are checked by _plain_params)
_SIMPLE_PARAMS = r"((?:;[^\s\"]*)?)"
# A subset of _VIA whose parse needs no stripping, upper-casing or quote handling
_VIA_SIMPLE = re.compile(
    r"SIP/2\.0/([A-Z]+) (\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?::([0-9]{1,5}))?" + _SIMPLE_PARAMS
)
# A subset of name-addr: optional quoted display name without escapes, <URI>, plain parameters
_NAME_ADDR_SIMPLE = re.compile(
    r'(?:"([^"\\]*)"[ \t]*)?<([A-Za-z][A-Za-z0-9+.\-]*:[^\s<>"]+)>' + _SIMPLE_PARAMS
)

Params = tuple[tuple[str, str | None], ...]
# Lookup key of a header name (see _lookup_key) -> position of its first value in ``headers``
HeaderIndex = dict[str, int]
# Lookup key -> positions of all its values, in wire order, for the names that occur twice or more
HeaderRepeats = dict[str, list[int]]

_T = TypeVar("_T")
_C = TypeVar("_C")

# Bounded memo tables for the pure value parsers below (Via, name-addr, CSeq), keyed by the
# header value. One message is looked at by several layers (transactions, validation, the
# application) that each parse the same Via, From and To; a str caches its own hash, so a hit
# costs one dict lookup. Long values are not kept and a full table is simply emptied, so the
# memory stays bounded whatever peers send. Parse errors are never cached: they raise each time.
# The tables are small on purpose: the hits that matter come while one message goes through the
# layers, and a large table keeps thousands of parsed objects alive for the garbage collector
# to walk (measured: 32 entries beat both 512 and 4096 by several microseconds a message).
_MEMO_SIZE = 32
_MEMO_MAX_VALUE = 512


def _remember(table: dict[str, _T], key: str, value: _T, size: int = _MEMO_SIZE) -> None:
    if len(key) <= _MEMO_MAX_VALUE:
        if len(table) >= size:
            table.clear()
        table[key] = value


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    """The slot's own setter: what object.__setattr__ ends up calling, without its checks."""
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


def fast_frozen_init(cls: type[_C]) -> type[_C]:
    """Give a frozen, slotted dataclass an ``__init__`` that stores into the slots directly.

    The generated ``__init__`` of a frozen dataclass goes through ``object.__setattr__`` for
    every field, which costs several times a plain slot store; the SIP hot path builds a dozen
    such objects per message. The replacement has the same signature and defaults and calls
    ``__post_init__`` the same way; fields with a default_factory or kw_only (and InitVars) are
    not supported. Slots of base classes that are not fields (private caches) start as None.
    """
    params: list[str] = []
    lines: list[str] = []
    namespace: dict[str, object] = {}
    specs = fields(cls)  # type: ignore[arg-type]
    names = {spec.name for spec in specs}
    for base in cls.__mro__[1:]:
        for name in base.__dict__.get("__slots__", ()):
            if name not in names and not name.startswith("__"):
                namespace[f"_set_{name}"] = _slot_setter(base, name)
                lines.append(f"    _set_{name}(self, None)")
    for spec in specs:
        name = spec.name
        if spec.default_factory is not MISSING or spec.kw_only is True:
            raise LocalError(
                f"{cls.__name__}.{name}: default_factory and kw_only are not supported"
            )
        namespace[f"_set_{name}"] = _slot_setter(cls, name)
        if spec.default is not MISSING:
            namespace[f"_default_{name}"] = spec.default
        if spec.init:
            params.append(name if spec.default is MISSING else f"{name}=_default_{name}")
            lines.append(f"    _set_{name}(self, {name})")
        elif spec.default is not MISSING:
            lines.append(f"    _set_{name}(self, _default_{name})")
    if hasattr(cls, "__post_init__"):
        lines.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(lines or ["    pass"])
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    setattr(cls, "__init__", init)  # noqa: B010 - mypy forbids assigning to a method
    return cls


def _bad(warning: str) -> PeerError:
    return PeerError(400, "Bad Request", warning)


def canonical_name(name: str) -> str:
    """The canonical spelling of a header name; compact forms expanded, unknown names kept."""
    return _CANON.get(name.lower(), name)


def split_list(value: str) -> list[str]:
    """Split a comma-separated header value, ignoring commas in quotes and <...>; keeps empties."""
    if "," not in value:
        return [value.strip()]
    if '"' not in value and "<" not in value:
        return [item.strip() for item in value.split(",")]
    return [item.strip() for item in _split_outside(value, ",")]


def _split_outside(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside quoted strings (with backslash escapes) and angle brackets."""
    items: list[str] = []
    start = 0
    quoted = escaped = False
    angle = 0
    for i, ch in enumerate(value):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            angle += 1
        elif ch == ">" and angle:
            angle -= 1
        elif ch == sep and not angle:
            items.append(value[start:i])
            start = i + 1
    if quoted:
        raise _bad("unterminated quoted string")
    items.append(value[start:])
    return items


def parse_params(text: str) -> Params:
    """Parse ``;name=value;flag`` (LWS tolerated around ``;`` and ``=``, RFC 3261 25.1)."""
    text = text.strip()
    if not text:
        return ()
    if not text.startswith(";"):
        raise _bad(f"garbage before parameters: {text[:40]!r}")
    parts = text[1:].split(";") if '"' not in text else _split_outside(text[1:], ";")
    params: list[tuple[str, str | None]] = []
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip()
        # isalnum() is the common case (branch, tag, rport...) and far cheaper than the regex
        if not (name.isalnum() and name.isascii()) and not _TOKEN.fullmatch(name):
            raise _bad(f"bad parameter name {name!r}")
        if not eq:
            params.append((name, None))
            continue
        value = value.strip()
        if not value:
            raise _bad(f"empty value for parameter {name!r}")
        params.append((name, value))
    return tuple(params)


def _plain_params(text: str) -> Params | None:
    """parse_params of a text that _SIMPLE_PARAMS matched (no LWS, no quotes), or None if it
    is not that simple after all and parse_params must have its say."""
    if not text:
        return ()
    params: list[tuple[str, str | None]] = []
    for part in text[1:].split(";"):
        name, eq, value = part.partition("=")
        if not (name.isalnum() and name.isascii()) and not _TOKEN.fullmatch(name):
            return None
        if eq:
            if not value:
                return None
            params.append((name, value))
        else:
            params.append((name, None))
    return tuple(params)


def _param(params: Params, name: str) -> str | None:
    lname = name.lower()
    for key, value in params:
        if key.lower() == lname:
            return "" if value is None else value
    return None


def _format_params(params: Params) -> str:
    return "".join([f";{k}" if v is None else f";{k}={v}" for k, v in params])


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class Via:
    """One Via value (RFC 3261 20.42): sent-protocol transport, sent-by, parameters."""

    transport: str
    host: str
    port: int | None
    params: Params = ()
    branch: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _set_via_branch(self, _param(self.params, "branch"))

    def param(self, name: str) -> str | None:
        """Value of a parameter: None if absent, "" for a flag such as ``rport``."""
        return _param(self.params, name)

    def with_param(self, name: str, value: str | None) -> Via:
        """A copy with ``name`` set (replacing it in place, or appended)."""
        lname = name.lower()
        kept = [(k, value if k.lower() == lname else v) for k, v in self.params]
        if not any(k.lower() == lname for k, _ in self.params):
            kept.append((name, value))
        return replace(self, params=tuple(kept))

    def __str__(self) -> str:
        port = "" if self.port is None else f":{self.port}"
        return f"SIP/2.0/{self.transport} {self.host}{port}{_format_params(self.params)}"

    @classmethod
    def parse(cls, value: str) -> Via:
        """Parse one Via value (not a comma list); PeerError 400 if malformed."""
        via = _VIAS.get(value)
        if via is None or cls is not Via:
            via = cls._parse(value)
            if cls is Via:
                _remember(_VIAS, value, via)
        return via

    @classmethod
    def _parse(cls, value: str) -> Via:
        simple = _VIA_SIMPLE.fullmatch(value) if cls is Via else None
        if simple is not None:
            # The usual shape (upper-case transport, no LWS, plain parameters): what the
            # general path below would make of it, in fewer steps.
            transport, host, port, rest = simple.groups()
            port_number = int(port) if port else None
            params = _plain_params(rest)
            if params is not None and (port_number is None or port_number <= 65535):
                return Via(transport, host, port_number, params)
        return cls._parse_general(value)

    @classmethod
    def _parse_general(cls, value: str) -> Via:
        match = _VIA.fullmatch(value.strip())
        if match is None:
            raise _bad(f"bad Via {value[:60]!r}")
        transport, host, port, rest = match.groups()
        port_number = int(port) if port else None
        if port_number is not None and port_number > 65535:
            raise _bad(f"bad Via port {port}")
        return cls(transport.upper(), host, port_number, parse_params(rest or ""))


_VIAS: dict[str, Via] = {}
_set_via_branch = _slot_setter(Via, "branch")


def remember_via(value: str, via: Via) -> None:
    """Record that ``Via.parse(value)`` is ``via``, for a value just formatted from a parsed Via
    (``str(via)`` round-trips), so that the next parse of it is a lookup."""
    _remember(_VIAS, value, via)


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class NameAddr:
    """An address header value (To, From, Contact, Route...): display name, URI, parameters."""

    display: str | None
    uri: str
    params: Params = ()

    def param(self, name: str) -> str | None:
        """Value of a header parameter (None if absent, "" for a flag)."""
        return _param(self.params, name)

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (RFC 3261 19.3)."""
        return _param(self.params, "tag")


_ADDRESSES: dict[str, NameAddr] = {}


def parse_name_addr(value: str) -> NameAddr:
    """Parse ``name-addr / addr-spec`` with parameters (RFC 3261 20.10); PeerError 400 if bad."""
    address = _ADDRESSES.get(value)
    if address is None:
        address = _parse_name_addr(value)
        _remember(_ADDRESSES, value, address)
    return address


def _parse_name_addr(value: str) -> NameAddr:
    text = value.strip()
    simple = _NAME_ADDR_SIMPLE.fullmatch(text)
    if simple is not None:
        # the usual shape: what the general path below would make of it, in fewer steps
        plain = _plain_params(simple[3])
        if plain is not None:
            return NameAddr(simple[1], simple[2], plain)
    return _parse_name_addr_general(text)


def _parse_name_addr_general(text: str) -> NameAddr:
    display: str | None = None
    close = text.find('"', 1) if text.startswith('"') else -1
    if close > 0 and "\\" not in text[1:close]:
        # the common quoted display name, without escapes: its end is the next quote
        display = text[1:close]
        text = text[close + 1 :].lstrip(" \t")
        if not text.startswith("<"):
            raise _bad("display name without <URI>")
    elif text.startswith('"'):
        i, escaped, chars = 1, False, []
        while i < len(text):
            ch = text[i]
            if escaped:
                chars.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                break
            else:
                chars.append(ch)
            i += 1
        else:
            raise _bad("unterminated quoted display name")
        display = "".join(chars)
        text = text[i + 1 :].lstrip(" \t")
        if not text.startswith("<"):
            raise _bad("display name without <URI>")
    lt = text.find("<")
    if lt >= 0:
        if display is None and lt:
            words = text[:lt].split()
            # RFC 3261 25.1: an unquoted display name is a sequence of tokens (RFC 4475 baddn)
            if not all(_TOKEN.fullmatch(w) for w in words):
                raise _bad(f"unquoted display name with non-token characters {text[:lt]!r}")
            display = " ".join(words)
        gt = text.find(">", lt)
        if gt < 0:
            raise _bad("unterminated <URI>")
        uri = text[lt + 1 : gt]
        rest = text[gt + 1 :]
    else:
        # addr-spec: parameters after the URI belong to the header (RFC 3261 20.10), so the
        # URI cannot carry ';', '?' or ',' of its own (RFC 4475 regbadct)
        uri, semi, params = text.partition(";")
        uri = uri.rstrip(" \t")
        rest = semi + params
        if "?" in uri or "," in uri:
            raise _bad(f"URI with headers must be in <>: {uri[:60]!r}")
    if not _URI_START.fullmatch(uri):
        raise _bad(f"bad URI {uri[:60]!r}")
    return NameAddr(display, uri, parse_params(rest))


class _Headers:
    """Accessors shared by requests and responses (a mixin over ``headers`` and ``body``).

    Lookups go through an index of header positions by name, built once per message (by the
    parser, or on first use for a message made in code) and kept in two private slots that are
    not dataclass fields (not compared, hashed or copied); copies made with
    ``dataclasses.replace`` start without them.
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
        return None if size is None else size + (_LONGEST_NAME + 4) * len(self.headers)

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
            key = name if name in _KNOWN else name.lower()
            if key in index:
                repeats = _add_repeat(repeats, index, key, position)
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
        key = _lookup_key(name)
        if key == "Content-Length":
            return str(len(self.body))
        position = self._header_index().get(key)
        return None if position is None else self.headers[position][1]

    def header_values(self, name: str) -> list[str]:
        """All values of a header; list headers are split on commas (empty items dropped)."""
        key = _lookup_key(name)
        if key == "Content-Length":
            return [str(len(self.body))]
        headers = self.headers
        values = [headers[position][1] for position in self._positions(key)]
        if key not in LIST_HEADERS:
            return values
        return [item for value in values for item in split_list(value) if item]

    def header_count(self, name: str) -> int:
        """How many times a header occurs (lines, not comma-separated items)."""
        key = _lookup_key(name)
        if key == "Content-Length":
            return 1
        return len(self._positions(key))

    @property
    def call_id(self) -> str:
        """The Call-ID; PeerError 400 if missing."""
        value = self.header("Call-ID")
        if not value:
            raise _bad("missing Call-ID")
        return value

    @property
    def cseq(self) -> tuple[int, str]:
        """``(number, method)`` from CSeq (RFC 3261 20.16); PeerError 400 if missing or bad."""
        value = self.header("CSeq")
        if value is not None:
            cached = _CSEQS.get(value)
            if cached is not None:
                return cached
        match = _CSEQ.fullmatch(value.strip()) if value else None
        if match is None:
            raise _bad(f"bad or missing CSeq {value!r}")
        number = int(match[1])
        if number >= 2**32:  # RFC 3261 8.1.1.5: a 32-bit unsigned integer (RFC 4475 scalar02)
            raise _bad(f"CSeq number out of range {match[1]}")
        assert value is not None
        result = number, match[2]
        _remember(_CSEQS, value, result)
        return result

    @property
    def from_tag(self) -> str | None:
        """The From tag, None if there is none (RFC 2543 peers)."""
        value = self.header("From")
        return parse_name_addr(value).tag if value is not None else None

    @property
    def to_tag(self) -> str | None:
        """The To tag, None outside a dialog."""
        value = self.header("To")
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
        position = self._header_index().get("Via")
        if position is None:
            return None
        value = self.headers[position][1]
        return Via.parse(value if "," not in value else split_list(value)[0])

    def replace_headers(self, name: str, values: Iterable[str]) -> Self:
        """A copy where ``values`` replace every ``name`` header (appended at the end)."""
        canon = _settable(name)
        lname = canon.lower()
        kept = tuple((k, v) for k, v in self.headers if k.lower() != lname)
        return replace(self, headers=kept + tuple((canon, v) for v in values))  # type: ignore[type-var]

    def add_header(self, name: str, value: str, *, first: bool = False) -> Self:
        """A copy with one more header, at the end or (``first``) before all others."""
        entry = ((_settable(name), value),)
        headers = entry + self.headers if first else self.headers + entry
        return replace(self, headers=headers)  # type: ignore[type-var]

    def replace_first(self, name: str, value: str) -> Self:
        """A copy whose first ``name`` header has ``value``, in place; LocalError if none."""
        position = self._header_index().get(_lookup_key(_settable(name)))
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


def _add_repeat(
    repeats: HeaderRepeats | None, index: HeaderIndex, key: str, position: int
) -> HeaderRepeats:
    """Record a second or later header of index key ``key`` at ``position``."""
    if repeats is None:
        repeats = {}
    positions = repeats.get(key)
    if positions is None:
        repeats[key] = [index[key], position]
    else:
        positions.append(position)
    return repeats


_CSEQS: dict[str, tuple[int, str]] = {}
# query name -> index key; filled by the names the code asks for, a small fixed set
_LOOKUP_KEYS: dict[str, str] = {}


def _lookup_key(name: str) -> str:
    """The index key of a header name: the canonical name if known, else the lower-case name."""
    key = _LOOKUP_KEYS.get(name)
    if key is None:
        canon = canonical_name(name)
        key = canon if canon in _KNOWN else canon.lower()
        _remember(_LOOKUP_KEYS, name, key, 1024)
    return key


def _settable(name: str) -> str:
    canon = canonical_name(name)
    if canon == "Content-Length":
        raise LocalError("Content-Length is computed from the body when serializing")
    return canon


def _serialize(start: str, headers: tuple[tuple[str, str], ...], body: bytes) -> bytes:
    lines = [start, *[f"{name}: {value}" for name, value in headers]]
    lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    head = "\r\n".join(lines).encode()
    return head + body if body else head


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class SipRequest(_Headers):
    """A SIP request; ``headers`` in wire order without Content-Length (derived from body)."""

    method: str
    uri: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def __bytes__(self) -> bytes:
        return _serialize(f"{self.method} {self.uri} SIP/2.0", self.headers, self.body)

    def _with_headers(self, headers: tuple[tuple[str, str], ...]) -> Self:
        return type(self)(self.method, self.uri, headers, self.body)


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class SipResponse(_Headers):
    """A SIP response; ``headers`` in wire order without Content-Length (derived from body)."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def __bytes__(self) -> bytes:
        return _serialize(f"SIP/2.0 {self.status} {self.reason}", self.headers, self.body)

    def _with_headers(self, headers: tuple[tuple[str, str], ...]) -> Self:
        return type(self)(self.status, self.reason, headers, self.body)


SipMessage = SipRequest | SipResponse

_set_index = _slot_setter(_Headers, "_index")
_set_repeats = _slot_setter(_Headers, "_repeats")
_set_wire_size = _slot_setter(_Headers, "_wire_size")


def parse_message(data: bytes) -> SipMessage:
    """Parse one complete message; PeerError 400 for malformed input, 505 for another version."""
    try:
        return _parse(data)
    except PeerError:
        raise
    except Exception as exc:  # the contract: nothing but PeerError escapes the parser
        raise _bad(f"unparsable message ({type(exc).__name__})") from None


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
        raise _bad("empty message")
    try:
        text = head.decode()
    except UnicodeDecodeError:
        raise _bad("header block is not UTF-8") from None
    lines = text.split("\r\n")
    breaks = len(lines) - 1  # CRLF pairs cannot overlap, so this is how many there are
    if text.count("\r") != breaks or text.count("\n") != breaks:
        raise _bad("bare CR or LF in header block")
    if breaks and lines[1][:1] in (" ", "\t"):
        raise _bad("start line continued on the next line")
    try:
        headers, index, repeats, length = _header_lines(lines)
    except (PeerError, _Folded):
        # RFC 3261 7.3.1: folded LWS is one SP. Looking for folds costs a scan of the whole
        # block, so it is only done once a line looks odd (a continuation line always does).
        if not _FOLD.search(text):
            raise
        headers, index, repeats, length = _header_lines(_FOLD.sub(" ", text).split("\r\n"))
    if length is not None:
        if not length.isascii() or not length.isdigit():
            raise _bad(f"bad Content-Length {length[:20]!r}")  # RFC 4475 ncl
        size = int(length)
        if size > len(rest):
            # RFC 3261 18.3: a datagram that ends before its body is an error (RFC 4475 clerr)
            raise _bad(f"body shorter than Content-Length {size}")
        body = rest[:size]  # RFC 3261 18.3: bytes past Content-Length are dropped
    else:
        body = rest
    return _start_line(lines[0], headers, body, index, repeats, len(head))


class _Folded(Exception):
    """A header line starts with whitespace: the block has folded lines to join first."""


def _header_lines(
    lines: list[str],
) -> tuple[tuple[tuple[str, str], ...], HeaderIndex, HeaderRepeats | None, str | None]:
    """The headers of the block (``lines[1:]``, the start line being ``lines[0]``), their index,
    and the Content-Length value; raises _Folded at a continuation line."""
    headers: list[tuple[str, str]] = []
    index: HeaderIndex = {}  # built here, where each name is looked at anyway
    repeats: HeaderRepeats | None = None
    length: str | None = None
    if len(lines) == 2 and not lines[1]:
        return (), index, repeats, length  # the start line and its CRLF only
    for line in itertools.islice(lines, 1, None):
        name, colon, value = line.partition(":")
        canon = _EXACT.get(name)
        if canon is None or not colon:
            if line[:1] in (" ", "\t"):
                raise _Folded
            if not colon:
                raise _bad(f"header line without colon {line[:40]!r}")
            name = name.rstrip(" \t")
            canon = _CANON.get(name.lower())
            if canon is None:
                if not _TOKEN.fullmatch(name):
                    raise _bad(f"bad header name {name[:40]!r}")
                canon = name
                key = name.lower()  # the index key of an unknown name, as _lookup_key
            else:
                key = canon
        else:
            key = canon
        value = value.strip(" \t")
        if canon == "Content-Length":
            # RFC 4475 mcl01: two different lengths leave the framing unknowable
            if length is not None and value != length:
                raise _bad("conflicting Content-Length values")
            length = value
            continue
        if key in index:
            repeats = _add_repeat(repeats, index, key, len(headers))
        else:
            index[key] = len(headers)
        headers.append((canon, value))
    return tuple(headers), index, repeats, length


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
            raise _bad(f"response of another SIP version {parts[0][:20]!r}")
        code = parts[1] if len(parts) > 1 else ""
        # RFC 3261 25.1: Status-Code is 3DIGIT; RFC 4475 bigcode has more
        if len(code) != 3 or not code.isascii() or not code.isdigit() or code[0] not in "123456":
            raise _bad(f"bad status code {code[:20]!r}")
        reason = parts[2] if len(parts) > 2 else ""
        response = SipResponse(int(code), reason, headers, body)
        _set_index(response, index)
        _set_repeats(response, repeats)
        _set_wire_size(response, wire_size)
        return response
    parts = first.split(" ")
    # RFC 3261 7.1: exactly one SP between the elements (RFC 4475 lwsstart, lwsruri, trws)
    if len(parts) != 3:
        raise _bad("request line is not Method SP Request-URI SP SIP-Version")
    method, uri, version = parts
    if method not in _COMMON_METHODS and not _METHOD.fullmatch(method):
        raise _bad(f"bad method {method[:40]!r}")
    if not _URI_START.fullmatch(uri):
        raise _bad(f"bad Request-URI {uri[:60]!r}")  # RFC 4475 ltgtruri
    if version != "SIP/2.0" and version.upper() != "SIP/2.0":
        if _VERSION.fullmatch(version):
            # RFC 3261 8.2.1 and 21.5.7 (RFC 4475 badvers)
            raise PeerError(505, "Version Not Supported", version)
        raise _bad(f"bad SIP version {version[:20]!r}")
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
