"""SIP MESSAGE bodies to text and back (DESIGN 4.1), and what else a MESSAGE may carry (4.3):
an RFC 3994 isComposing document, an RFC 5438 IMDN request in its CPIM wrapper, an IMDN
notification, the CPIM DateTime of when it was written."""

from __future__ import annotations

import datetime
import html
import re
from dataclasses import dataclass
from html.parser import HTMLParser

from component.values import Composing, ImdnAsk, ImdnNews, ImdnStatus
from sipside import cpim, imdn, iscomposing
from sipside.errors import PeerError
from sipside.fastpath import fast_frozen_init
from sipside.xmlsafe import parse_media_type

ACCEPT = "text/plain, message/cpim, text/html, application/im-iscomposing+xml"
MAX_TEXT = 65536


@dataclass(frozen=True, slots=True, init=False)
class DecodedBody:
    """A MESSAGE body as text, with the XHTML-IM form when the SIP side sent HTML."""

    text: str
    html: str | None = None
    composing: Composing | None = None
    imdn: ImdnAsk | None = None
    notification: ImdnNews | None = None
    sent_at: float | None = None

    # Written out (not generated) so that compiled it is native: see fast_frozen_init.
    def __init__(
        self,
        text: str,
        html: str | None = None,
        composing: Composing | None = None,
        imdn: ImdnAsk | None = None,
        notification: ImdnNews | None = None,
        sent_at: float | None = None,
    ) -> None:
        self.text = text  # type: ignore[misc]
        self.html = html  # type: ignore[misc]
        self.composing = composing  # type: ignore[misc]
        self.imdn = imdn  # type: ignore[misc]
        self.notification = notification  # type: ignore[misc]
        self.sent_at = sent_at  # type: ignore[misc]


fast_frozen_init(DecodedBody)  # built per message: the plain frozen __init__ is slow


# RFC 5438 statuses as the core sees them; processed and stored (never asked for) say nothing.
_STATUS = {
    imdn.Disposition.DELIVERED: ImdnStatus.DELIVERED,
    imdn.Disposition.DISPLAYED: ImdnStatus.DISPLAYED,
    imdn.Disposition.FAILED: ImdnStatus.FAILED,
    imdn.Disposition.FORBIDDEN: ImdnStatus.FAILED,
    imdn.Disposition.ERROR: ImdnStatus.FAILED,
    imdn.Disposition.PROCESSED: ImdnStatus.PROCESSED,
    imdn.Disposition.STORED: ImdnStatus.PROCESSED,
}


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
    ask: ImdnAsk | None = None
    sent_at: float | None = None
    if media.essence == "message/cpim":
        inner = cpim.parse(body)
        media = parse_media_type(inner.content_type)
        body = inner.body
        if media.essence == "message/cpim":
            raise UnsupportedMediaType("message/cpim inside message/cpim")
        when = inner.date_time()
        sent_at = None if when is None else _epoch(when)
        if media.essence == imdn.IMDN_CONTENT_TYPE:
            return DecodedBody("", notification=_news(body, inner.content_type), sent_at=sent_at)
        ask = _ask(inner, sent_at)
    charset = media.charset
    if media.essence == "text/plain":
        return DecodedBody(_text(body, charset), imdn=ask, sent_at=sent_at)
    if media.essence in ("text/html", "application/xhtml+xml"):
        markup = _text(body, charset)
        return DecodedBody(html_to_text(markup), xhtml_im_body(markup), imdn=ask, sent_at=sent_at)
    if media.essence == iscomposing.ISCOMPOSING_CONTENT_TYPE:
        doc = iscomposing.decode(body, media.essence)
        active = doc.state is iscomposing.ComposingState.ACTIVE
        return DecodedBody("", composing=Composing(active, doc.refresh))
    raise UnsupportedMediaType(media.essence)


def _epoch(when: datetime.datetime) -> float:
    """Seconds since the epoch; a DateTime without an offset is taken as UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def _ask(message: cpim.CpimMessage, sent_at: float | None) -> ImdnAsk | None:
    """The notifications a CPIM message asks for (RFC 5438 6), as the core sees them."""
    request = imdn.requested(message)
    if request is None:
        return None
    wanted = request.notifications
    delivery = bool(wanted & {"positive-delivery", "negative-delivery"})
    if not (delivery or "display" in wanted):
        return None  # processing only: nothing XMPP can answer
    return ImdnAsk(request.message_id, sent_at, delivery=delivery, display="display" in wanted)


def _news(body: bytes, content_type: str) -> ImdnNews:
    """An IMDN notification as the core sees it."""
    note = imdn.decode_notification(body, content_type)
    return ImdnNews(note.message_id, _STATUS[note.status], _epoch(note.date_time))


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
