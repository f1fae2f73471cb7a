"""Validation of received SIP messages: the status a UAS answers a bad request with.

``parse_message`` only checks framing and the start line; this module checks what RFC 3261
section 8.2 (UAS behaviour) and 18.3 ask of a request before the application sees it, in the
RFC's order: limits first (so that nothing large is examined), then syntax and mandatory
headers (400), then the Request-URI scheme (416), then Require (420). Each check names the RFC
4475 torture message it answers. The application still owns 405/501 (method), 415 (body type),
401/403/404 (policy) and everything else with meaning.
"""

from __future__ import annotations

import ipaddress
import re

from sipside.errors import PeerError
from sipside.headers import NameAddr, Via, parse_name_addr
from sipside.message import SipRequest, SipResponse

# RFC 3261 20.14/20.16/20.10/20.39/20.20: at most one of each in a message (RFC 4475 multi01)
SINGLE_HEADERS = ("To", "From", "Call-ID", "CSeq", "Max-Forwards", "Content-Type")
MANDATORY_HEADERS = ("To", "From", "Call-ID", "CSeq", "Via")  # RFC 3261 8.1.1

DEFAULT_SCHEMES = frozenset({"sip", "sips"})

_CALL_ID = re.compile(
    r"[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+(?:@[A-Za-z0-9\-.!%*_+`'~()<>:\\\"/\[\]?{}]+)?"
)
_DIGITS = re.compile(r"[0-9]+")
_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)*[A-Za-z](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.?"
)
_IPV4 = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# RFC 3261 20.17 / RFC 1123: "Sat, 13 Nov 2010 23:29:00 GMT"; RFC 4475 baddate uses EST
_DATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} "
    r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT"
)


class UnsupportedExtension(PeerError):
    """420 Bad Extension: the response must list ``options`` in Unsupported (RFC 3261 8.2.2.3)."""

    def __init__(self, options: tuple[str, ...]) -> None:
        super().__init__(420, "Bad Extension", ", ".join(options))
        self.options = options


def _bad(warning: str) -> PeerError:
    return PeerError(400, "Bad Request", warning)


# Hosts and URIs that passed their check, so that the next check of the same text (the proxy's
# address in every Via, the same From and To URIs again and again) is one set lookup. The checks
# are pure functions of the text; failures are not kept (they raise each time), long texts are
# not kept, and a full set is emptied, so memory stays bounded whatever peers send.
_PASSED_SIZE = 4096
_PASSED_MAX_TEXT = 512
_good_hosts: set[str] = set()
_good_uris: set[str] = set()
_good_request_uris: set[str] = set()


def _passed(good: set[str], text: str) -> None:
    if len(text) <= _PASSED_MAX_TEXT:
        if len(good) >= _PASSED_SIZE:
            good.clear()
        good.add(text)


def check_host(host: str) -> None:
    """Check a URI or Via host: hostname, IPv4 or bracketed IPv6 (RFC 3261 25.1, RFC 5118)."""
    if host in _good_hosts:
        return
    _check_host(host)
    _passed(_good_hosts, host)


def _check_host(host: str) -> None:
    if host.startswith("["):
        if not host.endswith("]"):
            raise _bad(f"bad IPv6 reference {host!r}")
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            # RFC 5118 4.10: "2001:db8:::192.0.2.1" (three colons) is not an IPv6 address
            raise _bad(f"bad IPv6 address {host!r}") from None
    elif _IPV4.fullmatch(host):
        if any(int(part) > 255 for part in host.split(".")):
            raise _bad(f"bad IPv4 address {host!r}")
    elif not _HOSTNAME.fullmatch(host):
        raise _bad(f"bad host {host!r}")


def check_sip_uri(uri: str, *, request_uri: bool = False) -> None:
    """Check the shape of a sip:/sips: URI (RFC 3261 19.1.1); PeerError 400 if malformed.

    ``request_uri``: headers are not allowed there (19.1.1 table; RFC 4475 escruri).
    """
    good = _good_request_uris if request_uri else _good_uris
    if uri in good:
        return
    _check_sip_uri(uri, request_uri)
    _passed(good, uri)


def _check_sip_uri(uri: str, request_uri: bool) -> None:
    scheme, _, rest = uri.partition(":")
    if scheme.lower() not in DEFAULT_SCHEMES:
        return
    # the user part may hold '?' and ';' (user-unreserved, RFC 3261 25.1; RFC 4475 intmeth)
    at = rest.find("@")
    if at == 0:
        raise _bad("empty user part")
    hostport, question, _headers = rest[at + 1 :].partition("?")
    if question and request_uri:
        raise _bad("headers in the Request-URI")
    hostport = hostport.partition(";")[0]
    if hostport.startswith("["):
        end = hostport.find("]")
        host, port = hostport[: end + 1], hostport[end + 1 :]
        if end < 0 or (port and not port.startswith(":")):
            raise _bad(f"bad host in {uri[:60]!r}")
        port = port[1:]
        if hostport[end + 1 :] == ":":
            raise _bad(f"empty port in {uri[:60]!r}")
    else:
        # RFC 5118 4.2: "sip:2001:db8::10" gives host "2001" and port "db8::10": rejected
        host, colon, port = hostport.partition(":")
        if colon and not port:
            raise _bad(f"empty port in {uri[:60]!r}")
    check_host(host)
    if port and (not _is_digits(port) or int(port) > 65535):
        raise _bad(f"bad port in {uri[:60]!r}")


def _check_address(value: str) -> NameAddr:
    address = parse_name_addr(value)
    check_sip_uri(address.uri)
    return address


def _check_via(via: Via) -> None:
    check_host(via.host)
    if via.branch == "z9hG4bK":
        # RFC 4475 3.2.1 badbranch: the cookie alone identifies no transaction. The RFC allows
        # 400 or RFC 2543 matching; every such request from a host would collide, so refuse.
        raise _bad("branch is only the magic cookie")


def _is_digits(text: str) -> bool:
    """``[0-9]+`` without the regex: isdigit() alone also accepts other scripts' digits."""
    return text.isascii() and text.isdigit()


def _header_bytes(req: SipRequest) -> int:
    total = 0
    for name, value in req.headers:
        total += len(name) + 4 + (len(value) if value.isascii() else len(value.encode()))
    return total


def validate_request(
    req: SipRequest,
    *,
    supported: frozenset[str] = frozenset(),
    schemes: frozenset[str] = DEFAULT_SCHEMES,
    max_uri: int = 4096,
    max_header_bytes: int = 16384,
    max_body: int = 65536,
    proxy: bool = False,
) -> None:
    """Raise PeerError with the status a UAS answers ``req`` with, or return if it may proceed.

    ``supported``: option tags we implement (Require, RFC 3261 8.2.2.3); ``schemes``: Request-URI
    schemes we serve (416 otherwise); ``proxy``: answer Max-Forwards 0 with 483 (RFC 3261 16.3)
    instead of processing it as an endpoint does (RFC 4475 3.3.11 zeromf).
    """
    # Limits (RFC 3261 21.4.11, 21.4.12, 21.5.14), before anything large is looked at
    if len(req.uri) > max_uri:
        raise PeerError(414, "Request-URI Too Long", f"{len(req.uri)} characters")
    bound = req.header_bytes_at_most()
    if (bound is None or bound > max_header_bytes) and _header_bytes(req) > max_header_bytes:
        raise PeerError(513, "Message Too Large", "header block too large")
    if len(req.body) > max_body:
        raise PeerError(413, "Request Entity Too Large", f"body of {len(req.body)} bytes")

    # Syntax and mandatory headers: 400 (RFC 3261 8.1.1, 8.2; RFC 4475 3.1.2 and 3.3.1 insuf).
    # The message's header index knows each canonically named header and which ones repeat.
    seen = req._header_index()
    missing = [name for name in MANDATORY_HEADERS if name not in seen]
    if missing:
        raise _bad("missing " + ", ".join(missing))
    repeats = req._repeats
    if repeats:
        repeated = [name for name in SINGLE_HEADERS if name in repeats]
        if repeated:
            raise _bad("more than one " + ", ".join(repeated))  # RFC 4475 multi01
    number, method = req.cseq
    if number >= 2**31:
        # RFC 3261 8.1.1.5: "MUST be less than 2**31" (RFC 4475 scalar02)
        raise _bad(f"CSeq number {number} out of range")
    if method != req.method:
        # RFC 3261 8.1.1.5 (RFC 4475 mismatch01, mismatch02; 501 would also do for the latter)
        raise _bad(f"CSeq method {method} does not match {req.method}")
    if not _CALL_ID.fullmatch(req.call_id):
        raise _bad("bad Call-ID")
    for via in req.vias:
        _check_via(via)  # RFC 4475 badinv01, transports
    headers = req.headers  # below, values by their index position: the names are known
    to = _check_address(headers[seen["To"]][1])  # RFC 4475 quotbal, badaspec, baddn
    _check_address(headers[seen["From"]][1])
    if "Contact" in seen:
        for value in req.header_values("Contact"):
            if value != "*":
                _check_address(value)  # RFC 4475 regbadct
    position = seen.get("Max-Forwards")
    max_forwards = None if position is None else headers[position][1]
    if max_forwards is not None and not _is_digits(max_forwards):
        raise _bad(f"bad Max-Forwards {max_forwards[:20]!r}")
    position = seen.get("Date")
    date = None if position is None else headers[position][1]
    if date is not None and not _DATE.fullmatch(date):
        raise _bad(f"bad Date {date[:40]!r}")  # RFC 4475 baddate (RFC 3261 20.17: GMT only)
    if req.body and "Content-Type" not in seen:
        raise _bad("body without Content-Type")  # RFC 3261 20.15
    if req.method == "REGISTER" and to.uri.partition(":")[0].lower() not in DEFAULT_SCHEMES:
        # RFC 3261 10.2: the address-of-record is a SIP or SIPS URI (RFC 4475 unksm2)
        raise _bad("REGISTER for a non-SIP address-of-record")

    # RFC 3261 8.2.2.1: Request-URI scheme we do not serve (RFC 4475 unkscm, novelsc)
    scheme = req.uri.partition(":")[0].lower()
    if scheme not in schemes:
        raise PeerError(416, "Unsupported URI Scheme", scheme)
    check_sip_uri(req.uri, request_uri=True)  # RFC 4475 escruri; RFC 5118 ipv6-bad

    # RFC 3261 16.3 step 3 is a proxy's rule; an endpoint processes the request (RFC 4475
    # 3.3.11: "as if the Max-Forwards field value were still positive")
    if proxy and max_forwards is not None and int(max_forwards) == 0:
        raise PeerError(483, "Too Many Hops")

    # RFC 3261 8.2.2.3: Require, except on ACK and CANCEL (RFC 4475 bext01). Proxy-Require is
    # for proxies (20.29): a UAS ignores it.
    if "Require" in seen and req.method not in ("ACK", "CANCEL"):
        ours = {option.lower() for option in supported}
        unsupported = tuple(
            option for option in req.header_values("Require") if option.lower() not in ours
        )
        if unsupported:
            raise UnsupportedExtension(unsupported)


def validate_response(resp: SipResponse) -> None:
    """Raise PeerError(400) if a UAC must discard ``resp`` (RFC 3261 8.1.3.3, 18.1.2)."""
    seen: dict[str, int] = {}
    for name, _value in resp.headers:
        seen[name] = seen.get(name, 0) + 1
    missing = [name for name in MANDATORY_HEADERS if name not in seen]
    if missing:
        raise _bad("missing " + ", ".join(missing))
    repeated = [name for name in SINGLE_HEADERS if seen.get(name, 0) > 1]
    if repeated:
        raise _bad("more than one " + ", ".join(repeated))
    vias = resp.vias
    if len(vias) != 1:
        # RFC 3261 8.1.3.3: "more than one Via ... the UAC SHOULD discard" (RFC 4475 bcast)
        raise _bad("response with more than one Via")
    _check_via(vias[0])
    resp.cseq  # noqa: B018 - raises for a CSeq out of range (RFC 4475 scalarlg)
    parse_name_addr(resp.header("To") or "")
    parse_name_addr(resp.header("From") or "")
    for value in resp.header_values("Warning"):
        # RFC 3261 20.43: warn-code is 3DIGIT (RFC 4475 scalarlg has 1812)
        code = value.split(" ", 1)[0]
        if len(code) != 3 or not code.isdigit():
            raise _bad(f"bad Warning code {code[:10]!r}")
    retry_after = resp.header("Retry-After")
    if retry_after is not None:
        delta = retry_after.split(";", 1)[0].split("(", 1)[0].strip()
        # RFC 3261 20.33: delta-seconds, a 32-bit value (RFC 4475 scalarlg)
        if not _DIGITS.fullmatch(delta) or int(delta) >= 2**32:
            raise _bad(f"bad Retry-After {retry_after[:30]!r}")
