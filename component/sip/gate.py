"""SIP requests in: from the endpoint to the message core and the presence side.

The endpoint hands every request to :meth:`SipGate.handle`. A MESSAGE becomes a ``SipText`` for
the message core, which answers at once on the hot path (202 once written to the XMPP stream)
or later; SUBSCRIBE, NOTIFY, PUBLISH and REGISTER go to the presence side, which answers them
itself. Whatever either raises (a core ``Refusal``, a peer's ``PeerError``) becomes a response
here, through :mod:`component.sip.answers`; anything unexpected becomes 500 with a log line.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from component.errors import Refusal, busy
from component.logs import get_logger
from component.runtime.tasks import TaskOwner
from component.sip.answers import refuse, send_answer, warning
from component.sip.bodies import ACCEPT, UnsupportedMediaType, decode_body
from component.store import StoreUnavailable
from component.values import SipAnswer, SipText
from sipside.endpoint import IncomingRequest
from sipside.errors import PeerError
from sipside.message import parse_name_addr

log = get_logger("component.sip.gate")

#: The methods of SIP presence (RFC 6665, 3903) and registration copies (DESIGN 5.4).
PRESENCE_METHODS = frozenset({"SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER"})
RETRY_LATER = 30  # seconds: stopping (SIGTERM) or the store is down; a restarted gateway serves
RETRY_SOON = 5  # seconds: too many requests being answered right now


class MessageCore(Protocol):
    """The part of the core that takes SIP MESSAGEs (``MessageRouter``)."""

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        """The answer when it needs no waiting, None when it does; may raise Refusal."""
        ...

    async def answer_later(self, msg: SipText) -> SipAnswer:
        """The answer after what must be awaited; may raise Refusal."""
        ...


class PresenceRequests(Protocol):
    """The presence side's entry for SUBSCRIBE, NOTIFY, PUBLISH and REGISTER."""

    async def handle_request(self, incoming: IncomingRequest) -> None:
        """Answer ``incoming``; may raise Refusal or PeerError before answering."""
        ...


class SipGate:
    """The endpoint's one request handler: routes each request and owns the work it starts.

    Without ``presence`` the gateway serves no presence: SUBSCRIBE and PUBLISH get 489 (RFC 6665
    8.3.1, RFC 3903 11.1), NOTIFY and REGISTER 405.
    """

    def __init__(
        self,
        messages: MessageCore,
        presence: PresenceRequests | None = None,
        *,
        max_pending: int = 1000,
    ) -> None:
        self.messages = messages
        self.presence = presence
        self.accepting = True
        self.max_pending = max_pending
        self._tasks = TaskOwner("sip_request_task_failed")

    def handle(self, incoming: IncomingRequest) -> None:
        """Answer ``incoming`` now, or start the owned work that will."""
        request = incoming.request
        method = request.method
        presence = self.presence if method in PRESENCE_METHODS else None
        # In-dialog requests (a NOTIFY for a subscription we hold) still reach presence while
        # stopping: it decides, and answering them keeps the subscription alive.
        if not (self.accepting or (presence is not None and request.to_tag is not None)):
            # DESIGN 8: stopping (SIGTERM): refuse, the sender retries later.
            refuse(incoming, busy("", RETRY_LATER))
            return
        if len(self._tasks) >= self.max_pending:
            # DESIGN 8 overload: refuse before starting work we could not finish.
            refuse(incoming, busy("", RETRY_SOON))
            return
        work: Awaitable[SipAnswer | None]
        try:
            if method == "MESSAGE":
                text = self._sip_text(incoming)
                answer = self.messages.answer_now(text)
                if answer is not None:
                    send_answer(incoming, answer)
                    return
                work = self.messages.answer_later(text)
            elif presence is not None:
                work = presence.handle_request(incoming)
            else:
                incoming.respond(489 if method in ("SUBSCRIBE", "PUBLISH") else 405)
                return
        except UnsupportedMediaType as exc:
            incoming.respond(415, headers=[("Accept", ACCEPT), *warning(exc.warning)])
            return
        except (Refusal, PeerError) as exc:
            refuse(incoming, exc)
            return
        self._tasks.own(self._finish(incoming, work))

    def _sip_text(self, incoming: IncomingRequest) -> SipText:
        request = incoming.request
        decoded = decode_body(request.header("Content-Type"), request.body)
        from_header = request.header("From") or ""
        try:
            from_addr = parse_name_addr(from_header)
        except PeerError:
            raise PeerError(400, "Bad Request", "unreadable From") from None
        return SipText(
            from_uri=from_addr.uri,
            to_uri=request.uri,
            body=decoded.text,
            content_type=request.header("Content-Type") or "text/plain",
            call_id=request.call_id,
            from_display=from_addr.display or None,
            html=decoded.html,
        )

    async def _finish(self, incoming: IncomingRequest, work: Awaitable[SipAnswer | None]) -> None:
        """Await the slow path; a handler that answered itself returns None."""
        call_id = incoming.request.call_id
        try:
            answer = await work
        except (Refusal, PeerError) as exc:
            if not incoming.answered:
                refuse(incoming, exc)
            return
        except StoreUnavailable as exc:
            log.warning("sip_request_refused", call_id=call_id, reason=str(exc))
            if not incoming.answered:
                refuse(incoming, busy("", RETRY_LATER))
            return
        except Exception:
            log.exception("sip_request_failed", call_id=call_id)
            answer = SipAnswer(500, "Internal Server Error")
        if incoming.answered:
            return
        if answer is None:
            log.error("sip_request_unanswered", call_id=call_id, method=incoming.request.method)
            answer = SipAnswer(500, "Internal Server Error")
        send_answer(incoming, answer)

    async def drain(self, timeout: float) -> None:
        """Wait for requests being answered (SIGTERM path)."""
        await self._tasks.wait(timeout)


__all__ = ["PRESENCE_METHODS", "MessageCore", "PresenceRequests", "SipGate"]
