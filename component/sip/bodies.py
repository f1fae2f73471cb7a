"""SIP MESSAGE bodies to text and back (DESIGN 4.1)."""

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
