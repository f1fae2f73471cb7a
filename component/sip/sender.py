"""MESSAGEs from the features out to the SIP side (``SipPort``, via ``SipSide``).

Requests go through the proxy (``sip.proxy``); the features see only the final status. Text is
``text/plain``, or CPIM (RFC 3862) when it carries an IMDN request or the time it was written
(DESIGN 4.3); typing is an RFC 3994 isComposing body; notifications are RFC 5438 IMDN in CPIM.
CPIM and isComposing go only to a client whose OPTIONS ``Accept`` lists them (see
:mod:`component.sip.media`); one that answers 415 to CPIM anyway gets the same text again as
``text/plain`` at once. Both answers are remembered for ``cache_time``.
"""

from __future__ import annotations

import datetime
import secrets
import time
from collections.abc import Callable
from typing import Protocol

from component.logs import get_logger
from component.sip.media import MediaSupport, accepts
from component.sip.transactions import CallbackSender
from component.values import ImdnAsk, ImdnStatus
from sipside import cpim, iscomposing
from sipside import imdn as rfc5438
from sipside.endpoint import (
    CALL_ID_MARK,
    TAG_MARK,
    Final,
    FinalHandler,
    RequestTemplate,
    make_request,
)
from sipside.errors import TransactionTimeout, TransportError
from sipside.headers import quote_warning
from sipside.message import SipRequest, SipResponse, new_call_id, new_tag
from sipside.peer import Peer

log = get_logger("component.sip.sender")

PLAIN = "text/plain; charset=UTF-8"
#: Status the features see for what was not sent because the recipient does not take it.
NOT_SENT = 415
CPIM = cpim.CPIM_CONTENT_TYPE
TYPING = iscomposing.ISCOMPOSING_CONTENT_TYPE

_DISPOSITIONS = {
    ImdnStatus.DELIVERED: (rfc5438.NotificationKind.DELIVERY, rfc5438.Disposition.DELIVERED),
    ImdnStatus.FAILED: (rfc5438.NotificationKind.DELIVERY, rfc5438.Disposition.FAILED),
    ImdnStatus.DISPLAYED: (rfc5438.NotificationKind.DISPLAY, rfc5438.Disposition.DISPLAYED),
}


# Conversations whose plain-text MESSAGE is kept written out, its own values left open.
TEMPLATES = 1024

# A late message to a client without CPIM says when it was written once it waited this long.
LATE_NOTE_AFTER = 60.0


def _utc(when: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(when, datetime.UTC).replace(microsecond=0)


class MessageEndpoint(CallbackSender, Protocol):
    """What the sender uses of the endpoint (``sipside.endpoint.Endpoint``): ``send`` and these.

    A protocol, not that class: compiled, a parameter of a class's type admits only that class,
    and the tests hand the sender their own endpoints."""

    def template(self, request: SipRequest, peer: Peer | None = None) -> RequestTemplate | None:
        """``request`` written out once, for :meth:`send_templated` to fill in."""
        ...

    def send_templated(
        self, template: RequestTemplate, tag: str, call_id: str, body: bytes, done: FinalHandler
    ) -> bool:
        """Send a request made from ``template``; False when it must take :meth:`send`."""
        ...

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        """Send ``request`` and await its final response."""
        ...


class SipSender:
    """Sends MESSAGEs in the endpoint's client transactions; the features see the status."""

    def __init__(
        self,
        endpoint: MessageEndpoint,
        *,
        cache_time: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.support = MediaSupport(cache_time)
        # (From, To) -> the MESSAGE template, None where the endpoint makes none (Digest)
        self._templates: dict[tuple[str, str], RequestTemplate | None] = {}

    async def send_text(
        self,
        *,
        from_uri: str,
        to_uri: str,
        body: str,
        from_display: str | None = None,
        imdn: ImdnAsk | None = None,
        sent_at: float | None = None,
    ) -> int:
        """A MESSAGE through the proxy; the final status, 408/503 for timeouts/failures.

        With ``imdn`` or ``sent_at`` the text goes in CPIM to a recipient that takes CPIM, else
        as plain text (receipts quietly off, DESIGN 4.3); so after a 415 to CPIM.
        """
        payload = body.encode("utf-8")
        if (imdn is None and sent_at is None) or not await self._takes(from_uri, to_uri, CPIM):
            plain = self._stamped(body, sent_at).encode("utf-8")
            return _status(await self._send(from_uri, to_uri, PLAIN, plain, from_display))
        headers: tuple[tuple[str, str], ...]
        if imdn is not None:
            notify = ["positive-delivery", "negative-delivery"] if imdn.delivery else []
            notify += ["display"] if imdn.display else []
            when = imdn.sent_at if imdn.sent_at is not None else sent_at or self.clock()
            headers = imdn_request_headers(imdn.message_id, when, tuple(notify))
        else:
            assert sent_at is not None
            headers = (("DateTime", cpim.format_datetime(_utc(sent_at))),)
        wrapped = cpim.build(cpim.wrap(from_uri, to_uri, payload, PLAIN, headers))
        answer = await self._send(from_uri, to_uri, CPIM, wrapped, from_display)
        if _refused(answer, CPIM):
            self.support.remember(to_uri, CPIM, False, self.clock())
            log.info("sip_media_refused", sip_uri=to_uri, media=CPIM)
            plain = self._stamped(body, sent_at).encode("utf-8")
            return _status(await self._send(from_uri, to_uri, PLAIN, plain, from_display))
        return _status(answer)

    def start_text(
        self, *, from_uri: str, to_uri: str, body: str, done: Callable[[int], None]
    ) -> bool:
        """``send_text`` of plain text without a task: the MESSAGE is written now and ``done``
        gets its final status later (never before this returns); False when the endpoint is
        closing, for ``send_text`` to answer."""

        def final(answer: Final) -> None:
            done(_status(_outcome(answer, to_uri)))

        pair, templates = (from_uri, to_uri), self._templates
        template = templates[pair] if pair in templates else self._template(from_uri, to_uri)
        payload = body.encode("utf-8")
        try:
            if template is not None and self.endpoint.send_templated(
                template, new_tag(), new_call_id(), payload, final
            ):
                return True
            headers = [("Content-Type", PLAIN)]
            self.endpoint.send(self._build("MESSAGE", from_uri, to_uri, headers, payload), final)
        except TransportError:
            return False
        return True

    def _template(self, from_uri: str, to_uri: str) -> RequestTemplate | None:
        """The plain-text MESSAGE from ``from_uri`` to ``to_uri`` as a template, kept."""
        headers = [("Content-Type", PLAIN)]
        marked = self._build(
            "MESSAGE", from_uri, to_uri, headers, b"", tag=TAG_MARK, call_id=CALL_ID_MARK
        )
        template = self.endpoint.template(marked)
        if len(self._templates) >= TEMPLATES:
            self._templates.clear()
        self._templates[from_uri, to_uri] = template
        return template

    def _stamped(self, body: str, sent_at: float | None) -> str:
        """DESIGN 4.3 for a client without CPIM: a message that waited long says when it was
        written in its text, since it cannot carry a CPIM DateTime."""
        if sent_at is None or self.clock() - sent_at < LATE_NOTE_AFTER:
            return body
        return f"[sent {_utc(sent_at):%Y-%m-%d %H:%M} UTC] {body}"

    async def send_composing(
        self, *, from_uri: str, to_uri: str, active: bool, refresh: int | None
    ) -> int:
        """RFC 3994 isComposing, active with ``refresh`` or idle; 415 unsent for a client
        that does not take it."""
        if not await self._takes(from_uri, to_uri, TYPING):
            return NOT_SENT
        state = iscomposing.ComposingState.ACTIVE if active else iscomposing.ComposingState.IDLE
        doc = iscomposing.IsComposing(state, refresh if active else None, "text/plain")
        answer = await self._send(from_uri, to_uri, TYPING, iscomposing.encode(doc), None)
        if _refused(answer, TYPING):
            self.support.remember(to_uri, TYPING, False, self.clock())
            log.info("sip_media_refused", sip_uri=to_uri, media=TYPING)
        return _status(answer)

    async def send_notification(
        self, *, from_uri: str, to_uri: str, message_id: str, sent_at: float, status: ImdnStatus
    ) -> int:
        """An RFC 5438 notification in CPIM, from the address the message was sent to; its
        recipient asked for it in CPIM, so it takes CPIM unless it said otherwise since."""
        if self.support.takes(to_uri, CPIM, self.clock()) is False:
            return NOT_SENT
        kind, disposition = _DISPOSITIONS[status]
        note = rfc5438.DispositionNotification(
            message_id, _utc(sent_at), kind, disposition, recipient_uri=from_uri
        )
        message = rfc5438.notification_message(
            note, from_uri, to_uri, secrets.token_hex(8), _utc(self.clock())
        )
        body = cpim.build(message)
        answer = await self._send(from_uri, to_uri, CPIM, body, None)
        return _status(answer)

    async def _takes(self, from_uri: str, to_uri: str, media: str) -> bool:
        """Whether ``to_uri`` takes ``media``: known, or asked with an OPTIONS (RFC 3261 11).

        The answer's Accept is remembered for both media types. An answer that says nothing
        of the recipient (404 or 480 while it is offline) is not remembered, and the message
        goes as plain text. No answer at all (a client or proxy that drops OPTIONS) is
        remembered as plain text: asking again would cost every message a transaction timeout.
        """
        known = self.support.takes(to_uri, media, self.clock())
        if known is not None:
            return known
        answer = await self._request("OPTIONS", from_uri, to_uri, [], b"", None)
        if isinstance(answer, int):
            for kind in (CPIM, TYPING):
                self.support.remember(to_uri, kind, False, self.clock())
            log.info("sip_media_probe_unanswered", sip_uri=to_uri, status=answer)
            return False
        if answer.status >= 300 and answer.status not in (405, 501):
            return False
        accept = answer.header("Accept") if answer.status < 300 else ""
        now = self.clock()
        for kind in (CPIM, TYPING):
            self.support.remember(to_uri, kind, accept is not None and accepts(accept, kind), now)
        log.info("sip_media_probed", sip_uri=to_uri, status=answer.status, accept=accept)
        return bool(self.support.takes(to_uri, media, now))

    async def _send(
        self, from_uri: str, to_uri: str, content_type: str, body: bytes, display: str | None
    ) -> SipResponse | int:
        headers = [("Content-Type", content_type)]
        return await self._request("MESSAGE", from_uri, to_uri, headers, body, display)

    async def _request(
        self,
        method: str,
        from_uri: str,
        to_uri: str,
        headers: list[tuple[str, str]],
        body: bytes,
        display: str | None,
    ) -> SipResponse | int:
        request = self._build(method, from_uri, to_uri, headers, body, display)
        return await self._answer(request, to_uri)

    @staticmethod
    def _build(
        method: str,
        from_uri: str,
        to_uri: str,
        headers: list[tuple[str, str]],
        body: bytes,
        display: str | None = None,
        *,
        tag: str | None = None,
        call_id: str | None = None,
    ) -> SipRequest:
        shown = f'"{quote_warning(display)}" ' if display else ""
        return make_request(
            method,
            to_uri,
            from_=f"{shown}<{from_uri}>;tag={tag or new_tag()}",
            to=f"<{to_uri}>",
            call_id=call_id or new_call_id(),
            headers=headers,
            body=body,
        )

    async def options(self, uri: str, from_uri: str) -> int:
        """OPTIONS to ``uri`` (RFC 3261 11), a health check; the final status as for MESSAGE."""
        headers = [("Accept", "application/sdp")]
        return _status(await self._request("OPTIONS", from_uri, uri, headers, b"", None))

    async def _answer(self, request: SipRequest, to_uri: str) -> SipResponse | int:
        """The final response, or 408/503 for a timeout or a transport failure."""
        try:
            return await self.endpoint.request(request)
        except (TransactionTimeout, TransportError) as exc:
            return _outcome(exc, to_uri)


def imdn_request_headers(
    message_id: str, sent_at: float, notify: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    """CPIM headers of a message with its IMDN identity (and DateTime), asking ``notify``."""
    if not notify:
        return (("DateTime", cpim.format_datetime(_utc(sent_at))),)
    return rfc5438.request_headers(message_id, _utc(sent_at), notify)


def _outcome(final: Final, to_uri: str) -> SipResponse | int:
    """The final response, or 408/503 for a timeout or a transport failure."""
    if isinstance(final, TransactionTimeout):
        return 408
    if isinstance(final, TransportError):
        log.info("sip_send_failed", sip_uri=to_uri, error=str(final))
        return 503
    return final


def _status(answer: SipResponse | int) -> int:
    return answer if isinstance(answer, int) else answer.status


def _refused(answer: SipResponse | int, media: str) -> bool:
    """A 415 whose Accept (if any) lacks ``media``: the recipient does not take it."""
    if isinstance(answer, int) or answer.status != 415:
        return False
    return not accepts(answer.header("Accept"), media)
