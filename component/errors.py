"""The core's one refusal type: what to answer on each side when a request can't be served.

A feature raises :class:`Refusal` (or returns one); the SIP adapter turns it into a response with
its status, reason and a Warning header, the XMPP adapter into an error stanza with its
condition, type and text. Each edge translates once (STYLE 4); the core never builds either.
"""

from __future__ import annotations


class Refusal(Exception):
    """A request refused on purpose: SIP status + reason + warning, XMPP condition + text.

    ``text`` is the human explanation used for both the SIP Warning header and the XMPP
    ``<text/>``; ``retry_after`` (seconds) adds a Retry-After header on the SIP side.
    """

    def __init__(
        self,
        sip_status: int,
        sip_reason: str,
        xmpp_condition: str,
        text: str = "",
        *,
        xmpp_type: str = "cancel",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(f"{sip_status} {sip_reason}" + (f": {text}" if text else ""))
        self.sip_status = sip_status
        self.sip_reason = sip_reason
        self.xmpp_condition = xmpp_condition
        self.xmpp_type = xmpp_type
        self.text = text
        self.retry_after = retry_after


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
