"""The core's one refusal type: what to answer on each side when a request can't be served.

A feature raises :class:`Refusal` (or returns one); the SIP adapter turns it into a response with
its status, reason and a Warning header, the XMPP adapter into an error stanza with its
condition, type and text. Each edge translates once (STYLE 4); the core never builds either.
The other way round, :func:`refusal_for_sip_status` says what a SIP failure answered to one of
our requests means for the XMPP sender.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass


@dataclass(eq=False)
class Refusal(Exception):
    """A request refused on purpose: SIP status + reason + warning, XMPP condition + text.

    ``text`` is the human explanation used for both the SIP Warning header and the XMPP
    ``<text/>``; ``retry_after`` (seconds) adds a Retry-After header on the SIP side.
    """

    sip_status: int
    sip_reason: str
    xmpp_condition: str
    text: str = ""
    _: KW_ONLY
    xmpp_type: str = "cancel"
    retry_after: int | None = None

    def __str__(self) -> str:
        return f"{self.sip_status} {self.sip_reason}" + (f": {self.text}" if self.text else "")


def malformed(text: str) -> Refusal:
    """A badly formed address or request: SIP 400, XMPP jid-malformed."""
    return Refusal(400, "Bad Request", "jid-malformed", text, xmpp_type="modify")


def not_found(text: str) -> Refusal:
    """Nothing here by that name: SIP 404, XMPP item-not-found."""
    return Refusal(404, "Not Found", "item-not-found", text)


def forbidden(text: str) -> Refusal:
    """Not allowed (DESIGN 3.4: the gateway is not an open relay): SIP 403, XMPP forbidden."""
    return Refusal(403, "Forbidden", "forbidden", text, xmpp_type="auth")


def busy(text: str, retry_after: int) -> Refusal:
    """Overloaded or stopping (DESIGN 8): SIP 503 + Retry-After, XMPP resource-constraint."""
    return Refusal(
        503,
        "Service Unavailable",
        "resource-constraint",
        text,
        xmpp_type="wait",
        retry_after=retry_after,
    )


# RFC 7247 section 8 (SIP response -> XMPP error condition), with DESIGN 4.2's choices where
# the issue text settles them (413 -> not-acceptable, 603 -> forbidden).
_CONDITIONS: dict[int, tuple[str, str]] = {
    400: ("bad-request", "modify"),
    401: ("not-authorized", "auth"),
    402: ("payment-required", "auth"),
    403: ("forbidden", "auth"),
    404: ("item-not-found", "cancel"),
    405: ("not-allowed", "cancel"),
    406: ("not-acceptable", "modify"),
    407: ("registration-required", "auth"),
    408: ("remote-server-timeout", "wait"),
    410: ("gone", "cancel"),
    413: ("not-acceptable", "modify"),
    414: ("jid-malformed", "modify"),
    415: ("not-acceptable", "modify"),
    416: ("jid-malformed", "modify"),
    420: ("feature-not-implemented", "cancel"),
    421: ("not-acceptable", "modify"),
    423: ("resource-constraint", "wait"),
    480: ("recipient-unavailable", "wait"),
    481: ("item-not-found", "cancel"),
    482: ("not-acceptable", "cancel"),
    483: ("not-acceptable", "cancel"),
    484: ("item-not-found", "cancel"),
    485: ("item-not-found", "cancel"),
    486: ("recipient-unavailable", "wait"),
    488: ("not-acceptable", "modify"),
    493: ("bad-request", "modify"),
    500: ("internal-server-error", "wait"),
    501: ("feature-not-implemented", "cancel"),
    502: ("remote-server-not-found", "cancel"),
    503: ("service-unavailable", "wait"),
    504: ("remote-server-timeout", "wait"),
    505: ("not-acceptable", "cancel"),
    513: ("policy-violation", "modify"),
    600: ("service-unavailable", "cancel"),
    603: ("forbidden", "auth"),
    604: ("item-not-found", "cancel"),
    606: ("not-acceptable", "cancel"),
}


def _condition_for_sip_status(status: int) -> tuple[str, str]:
    found = _CONDITIONS.get(status)
    if found is not None:
        return found
    if 300 <= status < 400:
        return ("redirect", "modify")
    if 400 <= status < 500:
        return ("bad-request", "modify")
    if 500 <= status < 600:
        return ("internal-server-error", "wait")
    return ("service-unavailable", "cancel")


def refusal_for_sip_status(status: int) -> Refusal:
    """What a SIP failure response to our request means for the XMPP sender (RFC 7247 8).

    The text names the SIP status; the SIP fields carry it on for logs and tests.
    """
    condition, kind = _condition_for_sip_status(status)
    return Refusal(status, "", condition, f"SIP {status}", xmpp_type=kind)


# SIP answers that mean "try again later" rather than "never" (DESIGN 4.2).
RETRYABLE = frozenset({408, 480, 503})
