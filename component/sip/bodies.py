"""SIP MESSAGE bodies to text and back (DESIGN 4.1), and SIP status -> XMPP error (RFC 7247 8)."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from sipside import cpim
from sipside.errors import PeerError
from sipside.xmlsafe import parse_media_type

ACCEPT = "text/plain, message/cpim, text/html"
MAX_TEXT = 65536


@dataclass(frozen=True, slots=True)
class DecodedBody:
    """A MESSAGE body as text, with the XHTML-IM form when the SIP side sent HTML."""

    text: str
    html: str | None = None


class UnsupportedMediaType(PeerError):
    """415 with the Accept header of what we do take (RFC 3261 21.4.13)."""

    def __init__(self, content_type: str) -> None:
        super().__init__(415, "Unsupported Media Type", f"cannot relay {content_type}")


def _text(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8")
    except (LookupError, UnicodeDecodeError):
        raise PeerError(400, "Bad Request", f"body is not valid {charset or 'UTF-8'}") from None


def decode_body(content_type: str | None, body: bytes) -> DecodedBody:
    """The text of a MESSAGE body; PeerError 415 for media we can't relay, 400 for bad text.

    One ``message/cpim`` wrapper is unwrapped (RFC 3862); a CPIM inside CPIM is refused rather
    than followed, so a hostile body can't make us recurse.
    """
    if len(body) > MAX_TEXT:
        raise PeerError(413, "Request Entity Too Large", f"body over {MAX_TEXT} bytes")
    media = parse_media_type(content_type or "text/plain")
    if media.essence == "message/cpim":
        inner = cpim.parse(body)
        media = parse_media_type(inner.content_type)
        body = inner.body
        if media.essence == "message/cpim":
            raise UnsupportedMediaType("message/cpim inside message/cpim")
    charset = media.charset
    if media.essence == "text/plain":
        return DecodedBody(_text(body, charset))
    if media.essence in ("text/html", "application/xhtml+xml"):
        markup = _text(body, charset)
        return DecodedBody(html_to_text(markup), xhtml_im_body(markup))
    raise UnsupportedMediaType(media.essence)


class _TextExtractor(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "li", "tr"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in self._BREAKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """HTML reduced to its visible text, for XMPP clients without XHTML-IM."""
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def xhtml_im_body(markup: str) -> str:
    """A safe XHTML-IM body: the visible text, escaped, line breaks kept (XEP-0071 allows a
    subset of XHTML; we pass no markup through rather than sanitise hostile HTML)."""
    lines = html_to_text(markup).split("\n")
    return "<br/>".join(html.escape(line, quote=False) for line in lines)


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


def xmpp_error_for_status(status: int) -> tuple[str, str]:
    """(condition, type) for a SIP failure response, by code then by class."""
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


# SIP answers that mean "try again later" rather than "never" (DESIGN 4.2).
RETRYABLE = frozenset({408, 480, 503})
