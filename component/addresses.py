"""Address mapping between SIP URIs and JIDs (DESIGN 3): pure, total, cached.

Four forms, with ``xmpp.component = sip.xmpp.test``, ``sip.domain = sip.test``,
``sip.jdomain = jabber.sip.test``, ``sip.delimiter = *``, ``sip.aliases = {irc.xmpp.test: %}``:

- SIP user -> component JID (3.1): ``sip:alice@sip.test`` is ``alice@sip.xmpp.test``,
  ``sip:alice@other.org`` is ``alice%other.org@sip.xmpp.test`` (``alice\\40other.org`` accepted).
- XMPP entity -> jdomain URI (3.2): ``bob@xmpp.test`` is ``sip:bob*xmpp.test@jabber.sip.test``;
  the occupant ``room@conf.xmpp.test/nick`` is ``sip:nick*room*conf.xmpp.test@jabber.sip.test``.
- Transport JID -> alias URI (3.3): ``#chan%irc.example.net@irc.xmpp.test`` is
  ``sip:%23chan*irc.example.net@irc.xmpp.test`` (``#`` is not a SIP user character, RFC 3261
  25.1; the unescaped ``#`` form is accepted on input, RFC 3261 19.1.4 makes them equal).

SIP user parts are percent-decoded before they are split on the delimiter, as RFC 3261 19.1.4
says escaped and unescaped unreserved characters are the same URI; proxies and user agents
(PJSIP) re-escape freely, so an escaped delimiter could never survive a reply anyway. A JID
localpart that contains the delimiter therefore has no SIP form and is refused. A nick may contain
it: the occupant form is split from the right, and domains never contain the delimiter.

JID localparts are case-insensitive (nodeprep), so SIP user names are folded the same way.
Invalid input raises :class:`AddressError`, which carries the SIP status and XMPP condition to
answer with; no other exception escapes these functions.
"""

from __future__ import annotations

import ipaddress
import re
import string
import unicodedata
import urllib.parse
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from slixmpp.jid import JID, InvalidJID, unescape_node

from component.errors import Refusal
from sipside.xmlsafe import xml_safe_text

if TYPE_CHECKING:
    from component.settings import Settings

#: Allowed as ``sip.delimiter``: legal unescaped in a SIP user part (RFC 3261 25.1
#: unreserved/user-unreserved) and never part of a DNS name.
SIP_DELIMITERS = "*!~'()&=+$,;?/"
#: Left unescaped in the user parts we write, RFC 3261 25.1: user = 1*( unreserved / escaped /
#: user-unreserved ); unreserved = alphanum / mark (``-_.!~*'()``); user-unreserved = ``&=+$,;?/``.
_USER_SAFE = string.ascii_letters + string.digits + "-_.!~*'()" + "&=+$,;?/"
#: Allowed as an alias delimiter: printable, legal in a JID localpart (RFC 7622 3.3.1), never part
#: of a DNS name, and not the XEP-0106 escape character.
ALIAS_DELIMITERS = "".join(c for c in string.punctuation if c not in "-._\"&'/:<>@\\")
#: Characters nodeprep forbids in a localpart, named in error texts (RFC 7622 3.3.1).
_LOCALPART_FORBIDDEN = frozenset("\"&'/:<>@ ")
_MAX_PART = 1023  # bytes, RFC 7622 3.1
_CACHE = 4096
_JID_CACHE = 8192  # the same few thousand JIDs recur on every stanza; stringprep is slow
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_TOPLABEL = re.compile(r"[a-z]+(?:-+[a-z0-9]+)*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


class AddressError(Refusal):
    """An address that cannot be mapped: the refusal to answer it with on each side (DESIGN 3.4).

    The XMPP type is always ``modify``: the sender can correct the address and try again.
    """

    def __init__(self, sip_status: int, sip_reason: str, xmpp_condition: str, text: str) -> None:
        super().__init__(sip_status, sip_reason, xmpp_condition, text, xmpp_type="modify")


def _malformed(text: str) -> AddressError:
    return AddressError(400, "Bad Request", "jid-malformed", text)


def _not_found(text: str) -> AddressError:
    return AddressError(404, "Not Found", "item-not-found", text)


def _forbidden(text: str) -> AddressError:
    # DESIGN 3.4: the gateway is not an open relay.
    return AddressError(403, "Forbidden", "forbidden", text)


def is_dns_name(name: str) -> bool:
    """True for a lower-case ASCII host name: LDH labels of 1-63 characters, 253 at most,
    the last one alphabetic up to its first hyphen."""
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    # RFC 3261 25.1 toplabel starts with a letter; we are stricter still (letters, then digits
    # only after a hyphen), the reading strict SIP parsers take, so every URI we make passes.
    return bool(_TOPLABEL.fullmatch(labels[-1])) and all(_LABEL.fullmatch(x) for x in labels)


# --- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HomeUser:
    """A request-URI for a user of ``sip.domain``; ``jid`` is the user's component JID."""

    uri: str
    jid: str


@dataclass(frozen=True, slots=True)
class Registrar:
    """The request-URI is ``sip.registrar``: a command message (DESIGN 5.4)."""

    uri: str


@dataclass(frozen=True, slots=True)
class XmppTarget:
    """An XMPP entity addressed through the jdomain or an alias domain.

    ``nick`` is set for the three-part occupant form; ``""`` means "no nick given, use the
    sender's" (DESIGN 6). Whether a bare ``jid`` is a room is for the caller to know (disco).
    """

    jid: str
    nick: str | None = None
    transport: str | None = None

    @property
    def full_jid(self) -> str:
        """The occupant JID ``room@service/nick``, or the bare JID."""
        return f"{self.jid}/{self.nick}" if self.nick else self.jid


Target = HomeUser | Registrar | XmppTarget


# --- URI and JID plumbing -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _SipParts:
    user: str | None  # percent-decoded
    host: str  # lower case, no port


@lru_cache(maxsize=_CACHE)
def _split_sip_uri(uri: str) -> _SipParts:
    """Take user and host from a sip:/sips: URI or name-addr; lenient about ``#``."""
    text = uri.strip()
    if "<" in text:
        # A name-addr (RFC 3261 20.10) such as a From value: the URI is inside the brackets.
        text = text[text.index("<") + 1 :].partition(">")[0]
    scheme, colon, rest = text.partition(":")
    if not colon or not scheme:
        raise _malformed(f"{uri!r} is not a URI")
    if scheme.lower() not in ("sip", "sips"):
        raise AddressError(416, "Unsupported URI Scheme", "jid-malformed", f"{scheme}: URI")
    # Parameters and headers cannot contain "@" (RFC 3261 25.1), a user part can contain ";?".
    userinfo, at, hostpart = rest.rpartition("@")
    hostport = re.split(r"[;?]", hostpart, maxsplit=1)[0]
    if hostport.startswith("["):
        host = hostport[: hostport.find("]") + 1]
    else:
        host = hostport.partition(":")[0]
    host = host.lower().rstrip(".")
    if not (is_dns_name(host) or _IPV4.fullmatch(host) or _is_ipv6_reference(host)):
        raise _malformed(f"{uri!r}: bad host part")
    if not at:
        return _SipParts(None, host)
    return _SipParts(_decode(userinfo.partition(":")[0], uri), host)


def sip_user_and_host(uri: str) -> tuple[str | None, str]:
    """The percent-decoded user part (None if absent) and lower-case host of a SIP URI.

    Also takes a name-addr (``"Alice" <sip:alice@sip.test>;tag=1``); raises AddressError."""
    parts = _split_sip_uri(uri)
    return parts.user, parts.host


def _is_ipv6_reference(host: str) -> bool:
    if not (host.startswith("[") and host.endswith("]")):
        return False
    try:
        ipaddress.IPv6Address(host[1:-1])
    except ValueError:
        return False
    return True


def _decode(raw: str, uri: str) -> str:
    if _BAD_ESCAPE.search(raw):
        raise _malformed(f"{uri!r}: bad %-escape in the user part")
    try:
        text = urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{uri!r}: user part is not UTF-8") from None
    if "\x00" in text:
        raise _malformed(f"{uri!r}: %00 in the user part")
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise _malformed(f"{uri!r}: control character in the user part")
    return text


def _encode(text: str) -> str:
    return urllib.parse.quote(text, safe=_USER_SAFE)


def _check_length(part: str, what: str) -> None:
    if not part:
        raise _malformed(f"empty {what}")
    if len(part.encode("utf-8")) > _MAX_PART:
        raise _malformed(f"{what} longer than {_MAX_PART} bytes")


@dataclass(frozen=True, slots=True)
class Jid:
    """A JID valid per RFC 7622, in canonical (prepped) form."""

    local: str
    domain: str
    resource: str

    @property
    def bare(self) -> str:
        """``local@domain`` (or the domain alone)."""
        return f"{self.local}@{self.domain}" if self.local else self.domain

    @property
    def full(self) -> str:
        """The whole JID as text."""
        return f"{self.bare}/{self.resource}" if self.resource else self.bare


def bare_jid(jid: str) -> str:
    """``jid`` without its resource (no validation: for JIDs already checked)."""
    return jid.partition("/")[0]


@lru_cache(maxsize=_JID_CACHE)
def parse_jid(text: str) -> Jid:
    """Validate and canonicalise a JID (RFC 7622); AddressError (jid-malformed) if it is none.

    The one JID validator: the XMPP adapter checks every inbound and outbound JID with it.
    """
    if not text:  # slixmpp turns "" into an empty JID instead of refusing it
        raise _malformed("empty JID")
    if len(text.encode("utf-8")) > 3 * _MAX_PART + 2:
        raise _malformed("JID too long")
    try:
        jid = JID(text)
    except (InvalidJID, ValueError, UnicodeError) as exc:
        raise _malformed(f"{text!r} is not a valid JID: {exc}") from None
    if not jid.domain:
        raise _malformed("empty JID")
    for part, what in ((jid.user, "localpart"), (jid.domain, "domain"), (jid.resource, "nick")):
        if len(part.encode("utf-8")) > _MAX_PART:
            raise _malformed(f"{what} longer than {_MAX_PART} bytes")
        # RFC 7622 3.3: the prepped parts must still be free of controls XML cannot carry.
        if xml_safe_text(part) != part:
            raise _malformed(f"{what} of {text!r} has characters XML cannot carry")
    return Jid(jid.user, jid.domain, jid.resource)


def _make_jid(local: str | None, domain: str, resource: str | None = None) -> Jid:
    """Validate and canonicalise the parts of a JID (RFC 7622), or raise AddressError."""
    if local is not None:
        _check_length(local, "localpart")
        if bad := sorted(set(local) & _LOCALPART_FORBIDDEN):
            raise _malformed(f"{local!r}: a JID localpart may not contain {''.join(bad)!r}")
    _check_length(domain, "domain")
    if "/" in domain or "@" in domain:
        # Would shift the parts: "a/b" is the domain "a" with the resource "b".
        raise _malformed(f"{domain!r} is not a valid domain")
    if resource is not None:
        _check_length(resource, "nick" if local else "resource")
    text = (f"{local}@" if local is not None else "") + domain
    text += f"/{resource}" if resource is not None else ""
    jid = parse_jid(text)
    _check_jid_domain(jid.domain)
    return jid


def _check_jid_domain(domain: str) -> None:
    # slixmpp lets "*" and friends through in domains; a host name (IDN allowed) or an IP
    # literal is what servers federate with, and it can never contain our delimiters.
    if _IPV4.fullmatch(domain) or (domain.startswith("[") and domain.endswith("]")):
        return
    try:
        ascii_name = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise _malformed(f"{domain!r} is not a valid domain") from None
    if not is_dns_name(ascii_name):
        raise _malformed(f"{domain!r} is not a valid domain")


@lru_cache(maxsize=_CACHE)
def _parse_jid(jid: str) -> Jid:
    """A JID the address book maps: valid, with a domain servers can federate with."""
    parsed = parse_jid(jid)
    _check_jid_domain(parsed.domain)
    return parsed


# --- the address book ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddressBook:
    """The domains and delimiters of DESIGN 3; every mapping of the gateway goes through it."""

    component: str
    sip_domain: str
    jdomain: str
    delimiter: str = "*"
    aliases: tuple[tuple[str, str], ...] = ()
    registrar: str = ""
    _alias_map: dict[str, str] = field(init=False, repr=False, compare=False, hash=False)
    _registrar_key: tuple[str | None, str] | None = field(
        init=False, repr=False, compare=False, hash=False
    )
    _hash: int = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_alias_map", dict(self.aliases))
        key = sip_user_and_host(self.registrar) if self.registrar else None
        object.__setattr__(self, "_registrar_key", key)
        fields = (
            self.component,
            self.sip_domain,
            self.jdomain,
            self.delimiter,
            self.aliases,
            self.registrar,
        )
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        # Kept, not generated: the mapping caches below are keyed by the book, so it is hashed
        # a few times per message (a generated __hash__ runs interpreted even compiled).
        return self._hash

    @classmethod
    def from_settings(cls, settings: Settings) -> AddressBook:
        """Build the book from ``xmpp.component`` and the ``[sip]`` section."""
        sip = settings.sip
        return cls(
            component=settings.xmpp.component,
            sip_domain=sip.domain,
            jdomain=sip.jdomain,
            delimiter=sip.delimiter,
            aliases=tuple(sorted(sip.aliases.items())),
            registrar=sip.registrar,
        )

    def jid_for_sip_uri(self, uri: str) -> str:
        """SIP user -> its bare component JID (DESIGN 3.1)."""
        return _jid_for_sip_uri(self, uri)

    def jid_for_sip_uri_once(self, uri: str) -> str:
        """:meth:`jid_for_sip_uri` without adding to the caches, for bulk work on addresses seen
        once: a restart's thousands of stored subscriptions would fill them with entries used
        once, and keep them (bench.presence_resume: 317 bytes per subscription at 20,000)."""
        names = _CACHED_ON_THE_WAY
        module = globals()
        cached = {name: module[name] for name in names}
        # The same functions undecorated, for this one call: the results are the same, so a
        # caller elsewhere that meets them meanwhile only misses the cache.
        module.update({name: function.__wrapped__ for name, function in cached.items()})
        try:
            return _jid_for_sip_uri(self, uri)
        finally:
            module.update(cached)

    def sip_uri_for_component_jid(self, jid: str) -> str:
        """Component JID -> the SIP user's AOR; the reverse of :meth:`jid_for_sip_uri`."""
        return _sip_uri_for_component_jid(self, jid)

    def sip_uri_for_jid(self, jid: str, *, occupant: bool = False) -> str:
        """XMPP entity -> the SIP URI it has on the SIP side (DESIGN 3.2, 3.3).

        With ``occupant``, ``jid`` is ``room@service/nick`` and maps to the three-part form.
        A component JID maps to its SIP user, so replies never loop through the gateway.
        """
        return _sip_uri_for_jid(self, jid, occupant)

    def xmpp_target_for_sip_uri(self, uri: str) -> XmppTarget:
        """A request-URI on the jdomain or an alias domain -> the XMPP entity it addresses."""
        return _xmpp_target_for_sip_uri(self, uri)

    def classify_request_uri(self, uri: str) -> Target:
        """What a request-URI addresses; foreign domains raise 403 (not an open relay)."""
        return _classify_request_uri(self, uri)

    def is_gateway_host(self, host: str) -> bool:
        """True if ``host`` is the jdomain or an alias domain (an address of the XMPP side)."""
        return host == self.jdomain or host in self._alias_map


# The cached functions a SIP URI -> JID mapping calls (``AddressBook.jid_for_sip_uri_once``).
_CACHED_ON_THE_WAY = (
    "_split_sip_uri",
    "parse_jid",
    "_parse_jid",
    "_jid_for_sip_uri",
    "_sip_uri_for_component_jid",
)


@lru_cache(maxsize=_CACHE)
def _jid_for_sip_uri(book: AddressBook, uri: str) -> str:
    parts = _split_sip_uri(uri)
    if parts.user is None:
        raise _malformed(f"{uri!r} has no user part")
    if book.is_gateway_host(parts.host):
        raise _forbidden(f"{uri!r} is an XMPP address of this gateway, not a SIP user")
    if "\\" in parts.user:
        # A backslash would make the localpart ambiguous with XEP-0106 escapes.
        raise _malformed(f"{uri!r}: backslash in a SIP user name")
    if parts.host.startswith("["):
        raise _malformed(f"{uri!r}: IPv6 hosts cannot appear in a JID localpart")
    local = parts.user
    if parts.host != book.sip_domain or "%" in local:
        # The last "%" splits user and domain on the way back, so a home user whose name
        # contains "%" keeps its domain explicit.
        local = f"{local}%{parts.host}"
    jid = _make_jid(local, book.component).bare
    # nodeprep may map characters to nothing (RFC 3454 B.1); the JID must still map back.
    _sip_uri_for_component_jid(book, jid)
    return jid


@lru_cache(maxsize=_CACHE)
def _sip_uri_for_component_jid(book: AddressBook, jid: str) -> str:
    parsed = _parse_jid(jid)
    if parsed.domain != book.component:
        raise _not_found(f"{jid!r} is not in {book.component}")
    if not parsed.local:
        raise _not_found(f"{jid!r} is the gateway itself, not a SIP user")
    if "\\40" in parsed.local:
        # XEP-0106 form: alice\40other.org is alice%other.org (DESIGN 3.1).
        user, at, host = unescape_node(parsed.local).rpartition("@")
    else:
        user, at, host = parsed.local.rpartition("%")
    if not at:
        user, host = parsed.local, book.sip_domain
    if not user:
        raise _malformed(f"{jid!r}: empty SIP user name")
    if not (is_dns_name(host) or _IPV4.fullmatch(host)):
        raise _not_found(f"{jid!r}: {host!r} is not a SIP domain")
    if book.is_gateway_host(host):
        raise _forbidden(f"{jid!r} points back into the gateway")
    if "\\" in user or any(c in _LOCALPART_FORBIDDEN for c in user):
        raise _malformed(f"{jid!r}: not a SIP user this gateway hands out")
    return f"sip:{_encode(user)}@{host}"


@lru_cache(maxsize=_CACHE)
def _sip_uri_for_jid(book: AddressBook, jid: str, occupant: bool) -> str:
    parsed = _parse_jid(jid)
    if parsed.domain == book.component and not occupant:
        return _sip_uri_for_component_jid(book, jid)
    uri = _sip_form(book, parsed, jid, occupant)
    # DESIGN 3.4: hand out only addresses that reach the original when replied to.
    expected = parsed.full if occupant else parsed.bare
    try:
        back = _xmpp_target_for_sip_uri(book, uri).full_jid
    except AddressError:
        back = None
    if back != expected:
        raise _malformed(f"{jid!r} has no SIP form that maps back to it")
    return uri


def _sip_form(book: AddressBook, parsed: Jid, jid: str, occupant: bool) -> str:
    delim = book.delimiter
    if occupant:
        # DESIGN 3.2: nickname<delim>room<delim>conference_server@jdomain.
        if not parsed.local or not parsed.resource:
            raise _malformed(f"{jid!r} is not an occupant JID room@service/nick")
        _refuse_delimiter(parsed.local, delim, jid)
        parts = [parsed.resource, parsed.local, parsed.domain]
        return f"sip:{delim.join(_encode(p) for p in parts)}@{book.jdomain}"
    alias_delim = book._alias_map.get(parsed.domain)
    if alias_delim is not None and parsed.local and delim not in parsed.local:
        # DESIGN 3.3: the transport's delimiter becomes ours on the SIP side. A localpart with
        # empty pieces has no alias form; the jdomain form below still reaches it.
        pieces = parsed.local.split(alias_delim)
        if all(pieces):
            return f"sip:{delim.join(_encode(p) for p in pieces)}@{parsed.domain}"
    if not parsed.local:
        return f"sip:{_encode(parsed.domain)}@{book.jdomain}"
    _refuse_delimiter(parsed.local, delim, jid)
    return f"sip:{_encode(parsed.local)}{delim}{_encode(parsed.domain)}@{book.jdomain}"


def _refuse_delimiter(local: str, delim: str, jid: str) -> None:
    if delim in local:
        raise _malformed(f"{jid!r}: the localpart contains {delim!r}, which has no SIP form here")


@lru_cache(maxsize=_CACHE)
def _xmpp_target_for_sip_uri(book: AddressBook, uri: str) -> XmppTarget:
    parts = _split_sip_uri(uri)
    if not book.is_gateway_host(parts.host):
        raise _not_found(f"{uri!r} is not on {book.jdomain} or an alias domain")
    if parts.user is None:
        raise _not_found(f"{uri!r} has no user part")
    pieces = parts.user.split(book.delimiter)
    if parts.host != book.jdomain:
        alias_delim = book._alias_map[parts.host]
        if any(not piece or alias_delim in piece for piece in pieces):
            # Either would give a JID whose replies cannot come back to this URI.
            raise _malformed(f"{uri!r}: empty part or {alias_delim!r} between delimiters")
        local = alias_delim.join(pieces)
        return XmppTarget(jid=_make_jid(local, parts.host).bare, transport=parts.host)
    nick: str | None = None
    match pieces:
        case [domain]:
            entity = _make_jid(None, domain)
        case [local, domain]:
            entity = _make_jid(local, domain)
        case [*nick_pieces, room, service]:
            nick = book.delimiter.join(nick_pieces)
            if nick == "":
                # DESIGN 6: "*room*service" joins under the sender's own name.
                entity = _make_jid(room, service)
            else:
                entity = _make_jid(room, service, nick)
                nick = entity.resource
        case _:  # pragma: no cover - str.split never returns []
            raise _malformed(f"{uri!r}: empty user part")
    if entity.domain == book.component:
        raise _forbidden(f"{uri!r} is a SIP user of this gateway; address it directly")
    return XmppTarget(jid=entity.bare, nick=nick)


@lru_cache(maxsize=_CACHE)
def _classify_request_uri(book: AddressBook, uri: str) -> Target:
    parts = _split_sip_uri(uri)
    if (parts.user, parts.host) == book._registrar_key:
        return Registrar(uri=book.registrar)
    if book.is_gateway_host(parts.host):
        return _xmpp_target_for_sip_uri(book, uri)
    if parts.host == book.sip_domain:
        if parts.user is None:
            raise _not_found(f"{uri!r} has no user part")
        jid = _jid_for_sip_uri(book, uri)
        return HomeUser(uri=_sip_uri_for_component_jid(book, jid), jid=jid)
    raise _forbidden(f"{parts.host!r} is not a domain of this gateway (no relaying)")
