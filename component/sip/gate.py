"""The gateway's SIP adapter: requests from the endpoint to the core, MESSAGEs from the core out.

SIP messages stop here: the core gets ``SipText`` and answers ``SipAnswer``; errors raised by
body decoding (PeerError with a status) are translated to responses once, in ``handle``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from component.logs import get_logger
from component.runtime.tasks import TaskOwner
from component.sip.bodies import ACCEPT, UnsupportedMediaType, decode_body
from component.store import StoreUnavailable
from component.values import SipAnswer, SipText
from sipside.endpoint import Endpoint, IncomingRequest, make_request
from sipside.errors import PeerError, TransactionTimeout, TransportError
from sipside.message import new_call_id, new_tag, parse_name_addr

log = get_logger("component.sip.gate")


class MessageCore(Protocol):
    """The part of the core that takes SIP MESSAGEs."""

    def on_sip_message(self, msg: SipText) -> SipAnswer | Awaitable[SipAnswer]:
        """Answer now, or return an awaitable answer."""
        ...


# Other methods (SUBSCRIBE, NOTIFY, PUBLISH, REGISTER) go to a handler the presence side sets;
# it returns None when it answered the request itself.
OtherHandler = Callable[[IncomingRequest], Awaitable[SipAnswer] | SipAnswer | None]


class SipGate:
    """Owns the endpoint's request handler and implements the core's ``SipSender`` port."""

    def __init__(self, endpoint: Endpoint, *, max_pending: int = 1000) -> None:
        self.endpoint = endpoint
        self.core: MessageCore | None = None
        self.others: dict[str, OtherHandler] = {}
        self.accepting = True
        self.max_pending = max_pending
        self._tasks = TaskOwner("sip_request_task_failed")
        endpoint.handler = self.handle

    # --- incoming ------------------------------------------------------------------------------

    def handle(self, incoming: IncomingRequest) -> None:
        """The endpoint's single request handler."""
        request = incoming.request
        # In-dialog requests (a NOTIFY for a subscription we hold) still reach their handler
        # while stopping: it decides, and answering them keeps the subscription alive.
        in_dialog = request.to_tag is not None and request.method in self.others
        if self.core is None or not (self.accepting or in_dialog):
            # DESIGN 8: stopping (SIGTERM) or not ready: refuse, the sender retries later.
            incoming.respond(503, headers=[("Retry-After", "30")])
            return
        if len(self._tasks) >= self.max_pending:
            # DESIGN 8 overload: refuse before starting work we could not finish.
            incoming.respond(503, headers=[("Retry-After", "5")])
            return
        answer: SipAnswer | Awaitable[SipAnswer] | None
        try:
            if request.method == "MESSAGE":
                answer = self.core.on_sip_message(self._sip_text(incoming))
            else:
                other = self.others.get(request.method)
                if other is None:
                    status = 489 if request.method in ("SUBSCRIBE", "PUBLISH") else 405
                    incoming.respond(status)
                    return
                answer = other(incoming)
        except UnsupportedMediaType as exc:
            incoming.respond(415, headers=[("Accept", ACCEPT), *_warning(exc)])
            return
        except PeerError as exc:
            incoming.respond(exc.status, exc.reason, headers=_warning(exc))
            return
        if answer is None:
            return  # the handler answered by itself
        if isinstance(answer, SipAnswer):
            self._answer(incoming, answer)
            return
        self._tasks.own(self._finish(incoming, answer))

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

    async def _finish(self, incoming: IncomingRequest, answer: Awaitable[SipAnswer]) -> None:
        try:
            result = await answer
        except PeerError as exc:
            result = SipAnswer(exc.status, exc.reason)
        except StoreUnavailable as exc:
            log.warning("sip_request_refused", call_id=incoming.request.call_id, reason=str(exc))
            result = SipAnswer(503, "Service Unavailable", (("Retry-After", "30"),))
        except Exception:
            log.exception("sip_request_failed", call_id=incoming.request.call_id)
            result = SipAnswer(500, "Internal Server Error")
        self._answer(incoming, result)

    @staticmethod
    def _answer(incoming: IncomingRequest, answer: SipAnswer) -> None:
        if not incoming.answered:
            incoming.respond(answer.status, answer.reason, headers=answer.headers)

    async def drain(self, timeout: float) -> None:
        """Wait for requests being answered (SIGTERM path)."""
        await self._tasks.wait(timeout)

    # --- outgoing: the core's SipSender port ---------------------------------------------------

    async def send_text(
        self, *, from_uri: str, to_uri: str, body: str, from_display: str | None = None
    ) -> int:
        """A MESSAGE through the proxy; the final status, 408/503 for timeouts/failures."""
        display = f'"{_quote(from_display)}" ' if from_display else ""
        request = make_request(
            "MESSAGE",
            to_uri,
            from_=f"{display}<{from_uri}>;tag={new_tag()}",
            to=f"<{to_uri}>",
            call_id=new_call_id(),
            headers=[("Content-Type", "text/plain; charset=UTF-8")],
            body=body.encode("utf-8"),
        )
        try:
            response = await self.endpoint.request(request)
        except TransactionTimeout:
            return 408
        except TransportError as exc:
            log.info("sip_send_failed", sip_uri=to_uri, error=str(exc))
            return 503
        return response.status


def _warning(exc: PeerError) -> list[tuple[str, str]]:
    if not exc.warning:
        return []
    return [("Warning", f'399 sipxmpp "{_quote(exc.warning)}"')]


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


__all__ = ["SipGate"]
