"""SIP requests in: from the endpoint to the message core and the presence side.

The endpoint hands every request to :meth:`SipGate.handle`. A MESSAGE becomes a ``SipText`` for
the message core, which answers at once on the hot path (202 once written to the XMPP stream)
or later; SUBSCRIBE, NOTIFY, PUBLISH and REGISTER go to the presence side, which answers them
itself; OPTIONS is answered here, from what the Request-URI addresses. Before any of that, a
source over its rate limit gets 503 (:mod:`component.ratelimit`). Whatever either raises
(a core ``Refusal``, a peer's ``PeerError``) becomes a response here, through
:mod:`component.sip.answers`; anything unexpected becomes 500 with a log line.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol

from component.addresses import AddressBook, AddressError, HomeUser, sip_user_and_host
from component.errors import Refusal, busy, not_found
from component.logs import get_logger
from component.ratelimit import SourceBuckets
from component.runtime.tasks import TaskOwner
from component.sip.answers import refuse, send_answer, warning
from component.sip.bodies import ACCEPT, UnsupportedMediaType, decode_body
from component.sip.side import Incoming
from component.store import StoreUnavailable
from component.values import SipAnswer, SipText
from sipside.endpoint import ANSWERED_METHODS
from sipside.errors import LocalError, PeerError
from sipside.message import parse_name_addr
from sipside.transport import peer_for_uri

log = get_logger("component.sip.gate")

#: The methods of SIP presence (RFC 6665, 3903) and registration copies (DESIGN 5.4).
PRESENCE_METHODS = frozenset({"SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER"})
RETRY_LATER = 30  # seconds: stopping (SIGTERM) or the store is down; a restarted gateway serves
RETRY_SOON = 5  # seconds: too many requests being answered right now
LOG_EVERY = 100  # one log line per this many refusals of a kind (a flood writes few lines)


def proxy_hosts(proxy: str) -> frozenset[str]:
    """The address requests relayed by the outbound proxy ``proxy`` (a URI, or "") come from.

    Only an IP host counts: the endpoint resolves no names (and neither does this)."""
    if not proxy:
        return frozenset()
    try:
        return frozenset({peer_for_uri(proxy).host})
    except LocalError:
        return frozenset()


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

    async def handle_request(self, incoming: Incoming) -> None:
        """Answer ``incoming``; may raise Refusal or PeerError before answering."""
        ...


class SipGate:
    """The endpoint's one request handler: routes each request and owns the work it starts.

    Without ``presence`` the gateway serves no presence: SUBSCRIBE and PUBLISH get 489 (RFC 6665
    8.3.1, RFC 3903 11.1), NOTIFY and REGISTER 405. ``rate`` limits requests per source: by
    address in :meth:`admit_source`, which the endpoint asks before parsing; for a request
    relayed by one of ``proxies`` (hosts), whose address everyone behind the proxy shares, by
    its sender's From URI here (out-of-dialog requests only). Refusals are counted in
    ``refusals`` by reason.
    """

    def __init__(
        self,
        messages: MessageCore,
        presence: PresenceRequests | None = None,
        *,
        book: AddressBook,
        max_pending: int = 1000,
        rate: SourceBuckets | None = None,
        proxies: frozenset[str] = frozenset(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.messages = messages
        self.presence = presence
        self.book = book
        self.accepting = True
        self.max_pending = max_pending
        self.rate = rate
        self.proxies = proxies
        self.clock = clock
        self.refusals: Counter[str] = Counter()
        # RFC 3261 20.5: Allow lists what is not answered 405 (NOTIFY and REGISTER need presence).
        served = ANSWERED_METHODS if presence else ("MESSAGE", "SUBSCRIBE", "PUBLISH", "OPTIONS")
        self.allow = ", ".join(served)
        self._tasks = TaskOwner("sip_request_task_failed")

    def handle(self, incoming: Incoming) -> None:
        """Answer ``incoming`` now, or start the owned work that will."""
        request = incoming.request
        method = request.method
        presence = self.presence if method in PRESENCE_METHODS else None
        # In-dialog requests (a NOTIFY for a subscription we hold) still reach presence while
        # stopping: it decides, and answering them keeps the subscription alive.
        in_dialog = request.to_tag is not None
        if not (self.accepting or (presence is not None and in_dialog)):
            # DESIGN 8: stopping (SIGTERM): refuse, the sender retries later.
            self._refuse_busy(incoming, "stopping", RETRY_LATER)
            return
        # DESIGN 8: a flooding sender behind the proxy is refused before any work is done for
        # it (other sources already were, by address, in admit_source). In-dialog requests
        # (NOTIFYs of our subscriptions) are not limited: they answer our own requests.
        if (
            self.rate is not None
            and not in_dialog
            and incoming.source.host in self.proxies
            and not self._admit_sender(incoming)
        ):
            return
        if len(self._tasks) >= self.max_pending:
            # DESIGN 8 overload: refuse before starting work we could not finish.
            self._refuse_busy(incoming, "busy", RETRY_SOON)
            return
        work: Awaitable[SipAnswer | None]
        try:
            if method == "OPTIONS":
                self._answer_options(incoming)
                return
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
                if method in ("SUBSCRIBE", "PUBLISH"):
                    incoming.respond(489)
                else:
                    incoming.respond(405, headers=[("Allow", self.allow)])  # RFC 3261 21.4.6
                return
        except UnsupportedMediaType as unsupported:
            incoming.respond(415, headers=[("Accept", ACCEPT), *warning(unsupported.warning)])
            return
        except (Refusal, PeerError) as exc:
            refuse(incoming, exc)
            return
        self._tasks.own(self._finish(incoming, work))

    def admit_source(self, host: str, now: float) -> int | None:
        """The endpoint's admission check (``sipside.limits.Admission``), before parsing: None
        to admit a request from ``host``, else the Retry-After of the 503 the endpoint sends.

        Parsing and the transaction cost more than anything after them, so a flooding address
        is refused here, where refusing is cheap. The proxy's requests are admitted: they are
        limited per sender in :meth:`handle`, once the From header is known.
        """
        if self.rate is None or host in self.proxies:
            return None
        verdict = self.rate.take(host, now)
        if verdict.admitted:
            return None
        self._count_limited(host, verdict.refused, verdict.log)
        return verdict.retry_after

    def _admit_sender(self, incoming: Incoming) -> bool:
        """Take a token for the sender of a request relayed by the proxy; 503 if none."""
        assert self.rate is not None
        # validated before it got here; should it still not parse, the proxy's address it is
        # (try, not contextlib.suppress: this runs for every relayed request)
        try:
            sender = parse_name_addr(incoming.request.header("From") or "").uri
        except PeerError:
            sender = incoming.source.host
        verdict = self.rate.take(sender, self.clock())
        if verdict.admitted:
            return True
        self._count_limited(sender, verdict.refused, verdict.log, incoming.request.call_id)
        refuse(incoming, busy("too many requests from this source", verdict.retry_after))
        return False

    def _count_limited(
        self, source: str, refused: int, log_it: bool, call_id: str | None = None
    ) -> None:
        self.refusals["rate_limited"] += 1
        if log_it:
            log.warning("sip_request_rate_limited", source=source, refused=refused, call_id=call_id)

    def _refuse_busy(self, incoming: Incoming, reason: str, retry_after: int) -> None:
        """503 + Retry-After for ``reason`` (stopping, busy); counted, one line per LOG_EVERY."""
        self.refusals[reason] += 1
        count = self.refusals[reason]
        if count % LOG_EVERY == 1:
            log.warning(
                "sip_request_refused",
                reason=reason,
                refused=count,
                peer=str(incoming.source),
                call_id=incoming.request.call_id,
            )
        refuse(incoming, busy("", retry_after))

    def _answer_options(self, incoming: Incoming) -> None:
        """RFC 3261 11.2: 200 with Allow and Accept for an address the gateway serves.

        A Request-URI without a user part is the gateway itself (keep-alive probes). An
        address of the jdomain, an alias or the registrar is served; one that cannot be
        mapped does not exist here (404); a home user is the proxy's (404) and another domain
        is not relayed (403, DESIGN 3.4).
        """
        uri = incoming.request.uri
        try:
            user, _host = sip_user_and_host(uri)
            target = None if user is None else self.book.classify_request_uri(uri)
        except AddressError as exc:
            refuse(incoming, exc if exc.sip_status == 403 else not_found(exc.text))
            return
        if isinstance(target, HomeUser):
            refuse(incoming, not_found("not an address of the XMPP side"))
            return
        incoming.respond(200, headers=[("Allow", self.allow), ("Accept", ACCEPT)])

    def _sip_text(self, incoming: Incoming) -> SipText:
        request = incoming.request
        content_type = request.header("Content-Type")
        decoded = decode_body(content_type, request.body)
        from_header = request.header("From") or ""
        try:
            from_addr = parse_name_addr(from_header)
        except PeerError:
            raise PeerError(400, "Bad Request", "unreadable From") from None
        return SipText(
            from_uri=from_addr.uri,
            to_uri=request.uri,
            body=decoded.text,
            content_type=content_type or "text/plain",
            call_id=request.call_id,
            from_display=from_addr.display or None,
            html=decoded.html,
            composing=decoded.composing,
            imdn=decoded.imdn,
            notification=decoded.notification,
            sent_at=decoded.sent_at,
        )

    async def _finish(self, incoming: Incoming, work: Awaitable[SipAnswer | None]) -> None:
        """Await the slow path; a handler that answered itself returns None."""
        call_id = incoming.request.call_id
        try:
            answer = await work
        except (Refusal, PeerError) as exc:
            if not incoming.answered:
                refuse(incoming, exc)
            return
        except StoreUnavailable:
            # DESIGN 8: acceptance needed a write the database could not take; the health
            # state logs the outage once, so this is counted and logged one in LOG_EVERY.
            if not incoming.answered:
                self._refuse_busy(incoming, "store_unavailable", RETRY_LATER)
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


__all__ = ["PRESENCE_METHODS", "MessageCore", "PresenceRequests", "SipGate", "proxy_hosts"]
