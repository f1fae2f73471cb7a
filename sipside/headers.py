"""Header names and values: canonical names and compact forms, comma lists, parameters,
the header block split into lines with its index, and the Via and name-addr values.

Everything here is a pure function of header text (RFC 3261 7.3, 20, 25.1). Values are parsed
on demand by the accessors of ``sipside.message``; Via and name-addr parses are memoised
(``sipside.fastpath``) because several layers parse the same values of one message. Malformed
input raises :class:`PeerError` 400.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field, replace

from sipside.errors import PeerError
from sipside.fastpath import fast_frozen_init, remember, slot_setter

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
KNOWN_HEADERS = frozenset(_KNOWN_NAMES)
LONGEST_HEADER_NAME = max(map(len, _KNOWN_NAMES))
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

# RFC 3261 25.1: token, and the scheme-and-rest shape every URI we accept has
TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"]+")
_VIA = re.compile(
    r"SIP[ \t]*/[ \t]*2\.0[ \t]*/[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]+"
    r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-.]+)(?:[ \t]*:[ \t]*([0-9]{1,5}))?[ \t]*(;.*)?",
    re.IGNORECASE | re.DOTALL,
)
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
# Lookup key of a header name (see header_key) -> position of its first value in ``headers``
HeaderIndex = dict[str, int]
# Lookup key -> positions of all its values, in wire order, for the names that occur twice or more
HeaderRepeats = dict[str, list[int]]


def bad_request(warning: str) -> PeerError:
    """The error for malformed header text: 400 with ``warning`` as the explanation."""
    return PeerError(400, "Bad Request", warning)


def quote_warning(text: str) -> str:
    """Text made safe for the quoted warn-text of a Warning header (RFC 3261 20.43)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


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
        raise bad_request("unterminated quoted string")
    items.append(value[start:])
    return items


def parse_params(text: str) -> Params:
    """Parse ``;name=value;flag`` (LWS tolerated around ``;`` and ``=``, RFC 3261 25.1)."""
    text = text.strip()
    if not text:
        return ()
    if not text.startswith(";"):
        raise bad_request(f"garbage before parameters: {text[:40]!r}")
    parts = text[1:].split(";") if '"' not in text else _split_outside(text[1:], ";")
    params: list[tuple[str, str | None]] = []
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip()
        # isalnum() is the common case (branch, tag, rport...) and far cheaper than the regex
        if not (name.isalnum() and name.isascii()) and not TOKEN.fullmatch(name):
            raise bad_request(f"bad parameter name {name!r}")
        if not eq:
            params.append((name, None))
            continue
        value = value.strip()
        if not value:
            raise bad_request(f"empty value for parameter {name!r}")
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
        if not (name.isalnum() and name.isascii()) and not TOKEN.fullmatch(name):
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


@dataclass(frozen=True, slots=True, init=False)
class Via:
    """One Via value (RFC 3261 20.42): sent-protocol transport, sent-by, parameters."""

    transport: str
    host: str
    port: int | None
    params: Params = ()
    branch: str | None = field(default=None, compare=False, init=False)  # from params

    # Written out (not generated) so that compiled it is native: see fast_frozen_init.
    def __init__(self, transport: str, host: str, port: int | None, params: Params = ()) -> None:
        self.transport = transport  # type: ignore[misc]
        self.host = host  # type: ignore[misc]
        self.port = port  # type: ignore[misc]
        self.params = params  # type: ignore[misc]
        self.branch = _param(params, "branch")  # type: ignore[misc]

    def __post_init__(self) -> None:
        # pure Python: fast_frozen_init's __init__ sets the fields, then this
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
                remember(_VIAS, value, via)
        return via

    @classmethod
    def _parse(cls, value: str) -> Via:
        if cls is not Via:
            return cls._parse_general(value)
        # The branch is what tells one Via of a peer from its next: the same text with
        # another branch is the same Via with that branch (see _VIA_SHAPES).
        cut = value.find(";branch=")
        if cut > 0:
            start = cut + 8
            end = value.find(";", start)
            if end < 0:
                end = len(value)
            shape = value[:start] + value[end:]
            known = _VIA_SHAPES.get(shape)
            if known is not None:
                branch = value[start:end]
                if _plain_value(branch):
                    template, at = known
                    kept = template.params
                    return Via(
                        template.transport,
                        template.host,
                        template.port,
                        (*kept[:at], ("branch", branch), *kept[at + 1 :]),
                    )
        simple = _VIA_SIMPLE.fullmatch(value)
        if simple is not None:
            # The usual shape (upper-case transport, no LWS, plain parameters): what the
            # general path below would make of it, in fewer steps.
            transport, host, port, rest = simple.groups()
            port_number = int(port) if port else None
            params = _plain_params(rest)
            if params is not None and (port_number is None or port_number <= 65535):
                via = Via(transport, host, port_number, params)
                if cut > 0:
                    # Neither sent-protocol nor sent-by holds a ';': the ';' before the cut
                    # count the parameters before the branch.
                    at = value.count(";", 0, cut)
                    if params[at][0] == "branch":
                        remember(_VIA_SHAPES, shape, (via, at), _SHAPES_SIZE)
                return via
        return cls._parse_general(value)

    @classmethod
    def _parse_general(cls, value: str) -> Via:
        match = _VIA.fullmatch(value.strip())
        if match is None:
            raise bad_request(f"bad Via {value[:60]!r}")
        transport, host, port, rest = match.groups()
        port_number = int(port) if port else None
        if port_number is not None and port_number > 65535:
            raise bad_request(f"bad Via port {port}")
        return cls(transport.upper(), host, port_number, parse_params(rest or ""))


fast_frozen_init(Via)


_VIAS: dict[str, Via] = {}
# A Via text with its branch value cut out -> the Via parsed from one such text by the simple
# path and the position of its branch parameter. A peer's (or a proxy's) Via differs from one
# request to the next only in its branch: a text of a known shape whose new branch value the
# simple path would take as it is (_plain_value) parses to the known Via with that branch,
# without the regex and the parameter split.
_VIA_SHAPES: dict[str, tuple[Via, int]] = {}
# One shape per peer and transport (not per message), so a proxy relaying from many user agents
# keeps theirs; bounded like every memo table (emptied when full).
_SHAPES_SIZE = 1024
_set_via_branch = slot_setter(Via, "branch")


def _plain_value(value: str) -> bool:
    """A parameter value the simple paths take as it is: not empty, printable ASCII without
    space or quote (within what _SIMPLE_PARAMS and _plain_params accept)."""
    return (
        value.isascii()
        and value.isprintable()
        and " " not in value
        and '"' not in value
        and value != ""
    )


def remember_via(value: str, via: Via) -> None:
    """Record that ``Via.parse(value)`` is ``via``, for a value just formatted from a parsed Via
    (``str(via)`` round-trips), so that the next parse of it is a lookup."""
    remember(_VIAS, value, via)


@dataclass(frozen=True, slots=True, init=False)
class NameAddr:
    """An address header value (To, From, Contact, Route...): display name, URI, parameters."""

    display: str | None
    uri: str
    params: Params = ()

    def __init__(self, display: str | None, uri: str, params: Params = ()) -> None:
        self.display = display  # type: ignore[misc]
        self.uri = uri  # type: ignore[misc]
        self.params = params  # type: ignore[misc]

    def param(self, name: str) -> str | None:
        """Value of a header parameter (None if absent, "" for a flag)."""
        return _param(self.params, name)

    @property
    def tag(self) -> str | None:
        """The ``tag`` parameter (RFC 3261 19.3)."""
        return _param(self.params, "tag")


fast_frozen_init(NameAddr)


_ADDRESSES: dict[str, NameAddr] = {}


def parse_name_addr(value: str) -> NameAddr:
    """Parse ``name-addr / addr-spec`` with parameters (RFC 3261 20.10); PeerError 400 if bad."""
    address = _ADDRESSES.get(value)
    if address is None:
        address = _parse_name_addr(value)
        remember(_ADDRESSES, value, address)
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
            raise bad_request("display name without <URI>")
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
            raise bad_request("unterminated quoted display name")
        display = "".join(chars)
        text = text[i + 1 :].lstrip(" \t")
        if not text.startswith("<"):
            raise bad_request("display name without <URI>")
    lt = text.find("<")
    if lt >= 0:
        if display is None and lt:
            words = text[:lt].split()
            # RFC 3261 25.1: an unquoted display name is a sequence of tokens (RFC 4475 baddn)
            if not all(TOKEN.fullmatch(w) for w in words):
                raise bad_request(f"unquoted display name with non-token characters {text[:lt]!r}")
            display = " ".join(words)
        gt = text.find(">", lt)
        if gt < 0:
            raise bad_request("unterminated <URI>")
        uri = text[lt + 1 : gt]
        rest = text[gt + 1 :]
    else:
        # addr-spec: parameters after the URI belong to the header (RFC 3261 20.10), so the
        # URI cannot carry ';', '?' or ',' of its own (RFC 4475 regbadct)
        uri, semi, params = text.partition(";")
        uri = uri.rstrip(" \t")
        rest = semi + params
        if "?" in uri or "," in uri:
            raise bad_request(f"URI with headers must be in <>: {uri[:60]!r}")
    if not URI_START.fullmatch(uri):
        raise bad_request(f"bad URI {uri[:60]!r}")
    return NameAddr(display, uri, parse_params(rest))


def add_repeat(
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


# query name -> index key; filled by the names the code asks for, a small fixed set
_LOOKUP_KEYS: dict[str, str] = {}


def header_key(name: str) -> str:
    """The index key of a header name: the canonical name if known, else the lower-case name."""
    key = _LOOKUP_KEYS.get(name)
    if key is None:
        canon = canonical_name(name)
        key = canon if canon in KNOWN_HEADERS else canon.lower()
        remember(_LOOKUP_KEYS, name, key, 1024)
    return key


class FoldedLines(Exception):
    """A header line starts with whitespace: the block has folded lines to join first."""


def split_header_lines(
    lines: list[str],
) -> tuple[tuple[tuple[str, str], ...], HeaderIndex, HeaderRepeats | None, str | None]:
    """The headers of the block (``lines[1:]``, the start line being ``lines[0]``), their index,
    and the Content-Length value; raises FoldedLines at a continuation line."""
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
                raise FoldedLines
            if not colon:
                raise bad_request(f"header line without colon {line[:40]!r}")
            name = name.rstrip(" \t")
            canon = _CANON.get(name.lower())
            if canon is None:
                if not TOKEN.fullmatch(name):
                    raise bad_request(f"bad header name {name[:40]!r}")
                canon = name
                key = name.lower()  # the index key of an unknown name, as header_key
            else:
                key = canon
        else:
            key = canon
        value = value.strip(" \t")
        if canon == "Content-Length":
            # RFC 4475 mcl01: two different lengths leave the framing unknowable
            if length is not None and value != length:
                raise bad_request("conflicting Content-Length values")
            length = value
            continue
        if key in index:
            repeats = add_repeat(repeats, index, key, len(headers))
        else:
            index[key] = len(headers)
        headers.append((canon, value))
    return tuple(headers), index, repeats, length
