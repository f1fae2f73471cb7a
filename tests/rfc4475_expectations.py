"""What the SIP stack does with each RFC 4475 and RFC 5118 torture message.

One row per file of ``shared/testdata/rfc4475`` (49) and ``shared/testdata/rfc5118`` (12): the
outcome of ``parse_message`` then ``validate_request`` (or ``validate_response``) for a UAS that
supports no extensions, and the same for the copy that :func:`rewrite_to_message` makes. The
expected values follow the RFC text for each message; where it allows a choice the note says
which one we took. The end-to-end tests send every message to a running endpoint with this
same table, so it stays plain data.

``status``: None when the stack accepts the message, else the status the UAS answers with (for
a response, any status means "discarded"). ``app_status``: for an accepted request, what the
gateway endpoint answers whatever the routing (405 for INVITE, 501 for an unknown method); None
when the application decides (OPTIONS, REGISTER, MESSAGE ... routing, 403/404).
``as_message_status``: the outcome of the MESSAGE copy, or "n/a" where the copy loses the point
of the test (responses, method and CSeq-method tests, registrar semantics).
``as_message_app_status``: what the MESSAGE application answers an accepted copy with when the
body alone decides (415 for SDP and other types, DESIGN 4.1), else None.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata"
RFC4475_DIR = TESTDATA / "rfc4475"
RFC5118_DIR = TESTDATA / "rfc5118"


@dataclass(frozen=True, slots=True)
class Expectation:
    """The expected outcome for one torture message (see the module docstring)."""

    status: int | None
    as_message_status: int | Literal["n/a"] | None
    note: str
    app_status: int | None = None
    as_message_app_status: int | None = None


NA: Literal["n/a"] = "n/a"
E = Expectation

EXPECTATIONS: dict[str, Expectation] = {
    # 3.1.1 valid messages: must parse and be handled
    "wsinv": E(None, None, "3.1.1.1 folding, odd whitespace, compact forms", 405, 415),
    "intmeth": E(None, NA, "3.1.1.2 unknown method of odd token chars: 501", 501),
    "esc01": E(None, None, "3.1.1.3 escapes in URIs kept as is", 405, 415),
    "escnull": E(None, None, "3.1.1.4 %00 in user parts: must never reach a JID"),
    "esc02": E(None, NA, "3.1.1.5 RE%47IST%45R is not REGISTER: unknown method 501", 501),
    "lwsdisp": E(None, None, "3.1.1.6 display name without space before <"),
    "longreq": E(None, None, "3.1.1.7 long values, 34 Vias, compact and odd-case names", 405, 415),
    "dblreq": E(None, None, "3.1.1.8 datagram holds a second message after CL 0: dropped"),
    "semiuri": E(None, None, "3.1.1.9 ';' in the user part; folded Accept list"),
    "transports": E(None, None, "3.1.1.10 SCTP and UNKNOWN Via transports are valid"),
    "mpart01": E(None, None, "3.1.1.11 multipart body with binary part, 553 bytes"),
    "unreason": E(None, NA, "3.1.1.12 response, UTF-8 reason phrase: valid"),
    "noreason": E(None, NA, "3.1.1.13 response with an empty reason phrase: valid"),
    # 3.1.2 invalid messages: 400 where a response is possible
    "badinv01": E(400, 400, "3.1.2.1 empty Via and Contact parameters"),
    "clerr": E(400, 400, "3.1.2.2 CL larger than the datagram (RFC 3261 18.3); on TCP it waits"),
    "scalar02": E(400, 400, "3.1.2.4 CSeq >2**32 (Max-Forwards 300, Expires huge tolerated)"),
    "scalarlg": E(400, NA, "3.1.2.5 response with CSeq, Retry-After, warn-code out of range: drop"),
    "quotbal": E(400, 400, "3.1.2.6 unterminated quote in To"),
    "ltgtruri": E(400, 400, "3.1.2.7 Request-URI in <>"),
    "lwsruri": E(400, 400, "3.1.2.8 whitespace inside the Request-URI"),
    "lwsstart": E(400, 400, "3.1.2.9 several spaces between start-line elements"),
    "trws": E(400, 400, "3.1.2.10 trailing whitespace after SIP/2.0"),
    "escruri": E(400, 400, "3.1.2.11 escaped headers in the Request-URI: rejected, not ignored"),
    "baddate": E(400, 400, "3.1.2.12 Date not in GMT: rejected (RFC allows ignoring it)"),
    "regbadct": E(400, 400, "3.1.2.13 Contact URI with '?' outside <>"),
    "badaspec": E(400, 400, "3.1.2.14 whitespace inside <> in To: rejected (RFC allows 400)"),
    "baddn": E(400, 400, "3.1.2.15 unquoted display names with commas"),
    "badvers": E(505, 505, "3.1.2.16 SIP/7.0: 505 Version Not Supported"),
    "mismatch01": E(400, NA, "3.1.2.17 CSeq method differs from the request method"),
    "mismatch02": E(400, NA, "3.1.2.18 unknown method, CSeq mismatch: 400 (RFC prefers 501)"),
    "bigcode": E(400, NA, "3.1.2.19 response code 4294967301: drop"),
    "ncl": E(400, 400, "3.1.2.3 negative Content-Length"),
    # 3.2 transaction layer
    "badbranch": E(400, 400, "3.2.1 branch is only z9hG4bK: 400 (RFC allows 2543 matching)"),
    # 3.3 application layer
    "insuf": E(400, 400, "3.3.1 missing To, From, Call-ID (and Max-Forwards)"),
    "unkscm": E(416, 416, "3.3.2 unknown Request-URI scheme"),
    "novelsc": E(416, 416, "3.3.3 soap.beep: a scheme we never serve"),
    "unksm2": E(400, NA, "3.3.4 REGISTER for a non-SIP address-of-record (RFC 3261 10.2)"),
    "bext01": E(420, 420, "3.3.5 Require unknown: 420 + Unsupported; Proxy-Require ignored"),
    "invut": E(None, None, "3.3.6 unknown Content-Type: the application answers 415", 405, 415),
    "regaut01": E(None, NA, "3.3.7 unknown Authorization scheme: registrar semantics"),
    "multi01": E(400, 400, "3.3.8 several To, From, Call-ID, CSeq, Max-Forwards"),
    "mcl01": E(400, 400, "3.3.9 two different Content-Length values; on TCP close"),
    "bcast": E(400, NA, "3.3.10 response with a second (broadcast) Via: discard (8.1.3.3)"),
    "zeromf": E(None, None, "3.3.11 Max-Forwards 0: an endpoint processes it (no 483)"),
    "cparam01": E(None, NA, "3.3.12 contact parameter outside <>: registrar semantics"),
    "cparam02": E(None, NA, "3.3.13 URI parameter inside <>: registrar semantics"),
    "regescrt": E(None, NA, "3.3.14 escaped Route in a Contact URI: registrar semantics"),
    "sdp01": E(None, NA, "3.3.15 Accept without SDP on an INVITE: 406 if it were served", 405),
    # 3.4 backward compatibility
    "inv2543": E(None, None, "3.4.1 RFC 2543 INVITE: no branch, tag, CL (UDP only)", 405, 415),
}

EXPECTATIONS_5118: dict[str, Expectation] = {
    "ipv6-good": E(None, None, "4.1 bracketed IPv6 Request-URI"),
    "ipv6-bad": E(400, 400, "4.2 IPv6 Request-URI without brackets"),
    "port-ambiguous": E(None, None, "4.3 [2001:db8::10:5070] is a valid address, no port"),
    "port-unambiguous": E(None, None, "4.4 [2001:db8::10]:5070"),
    "via-received-param-with-delim": E(None, None, "4.5 received=[...] accepted (BYE: 405)", 405),
    "via-received-param-no-delim": E(None, None, "4.5 received= without brackets accepted"),
    "ipv6-in-sdp": E(None, None, "4.6 IPv6 in SDP; CL short of the body: UDP", 405, 415),
    "mult-ip-in-header": E(None, None, "4.7 IPv4 and IPv6 Vias (BYE: 405)", 405),
    "mult-ip-in-sdp": E(None, None, "4.8 IPv4 and IPv6 in SDP; CL short: UDP", 405, 415),
    "ipv4-mapped-ipv6": E(None, None, "4.9 ::ffff:192.0.2.2; CL short: UDP", 405, 415),
    "ipv6-correct-abnf-2-colons": E(None, None, "4.10 2001:db8::192.0.2.1"),
    "ipv6-bug-abnf-3-colons": E(400, 400, "4.10 three colons: not an IPv6 address"),
}

# CSeq number, then the method to replace (folded values allowed, as in wsinv)
_CSEQ = re.compile(
    rb"(?im)(^cseq[ \t]*:[ \t]*(?:\r\n[ \t]+)?[0-9]+(?:[ \t]|\r\n[ \t])+[ \t]*)[^ \t\r\n]+"
)


def rewrite_to_message(raw: bytes) -> bytes:
    """The request ``raw`` with MESSAGE as method in the start line and in every CSeq.

    Only the header block is touched; every other byte (whitespace, body, trailing data)
    is kept. Responses are returned unchanged.
    """
    if raw.startswith(b"SIP/"):
        return raw
    end = raw.find(b"\r\n\r\n")
    head, tail = (raw[:end], raw[end:]) if end >= 0 else (raw, b"")
    space = head.find(b" ")
    if space < 0:
        return raw
    head = b"MESSAGE" + head[space:]
    return _CSEQ.sub(rb"\1MESSAGE", head) + tail


def load(name: str) -> bytes:
    """The raw bytes of a torture message by name (RFC 4475 ``.dat`` or RFC 5118 file)."""
    path = RFC4475_DIR / f"{name}.dat"
    return path.read_bytes() if path.exists() else (RFC5118_DIR / name).read_bytes()
