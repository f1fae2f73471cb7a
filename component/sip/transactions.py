"""Our client transactions for presence: each answered by callback, its outcome back to its dialog.

A dialog module sends a request with a ``Deliver`` callback, the routing of its outcome: the
final response, or None when none came (a timeout, or the path failed). The endpoint's
callback hands the outcome to the serialised core: run at once when the core is idle (the usual
2xx to a NOTIFY is done there, in the pass its answer came, with no task), else queued behind
the outcomes before it and run in order in one call. While the driver stops, a transaction cut
short by our own shutdown (the endpoint closing under it) is "not sent", never a peer's
timeout: nothing is deleted from the store because we stop (DESIGN 8).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, Protocol, cast

from component.logs import get_logger
from sipside.errors import TransactionTimeout, TransportError
from sipside.message import SipRequest, SipResponse
from sipside.peer import Peer

log = get_logger("component.sip.transactions")

__all__ = [
    "DONE",
    "CallbackSender",
    "ClientTransactions",
    "Deliver",
    "RequestSender",
    "Sends",
    "Serial",
]

#: Where the outcome of a request goes: (final response or None, now). It may do its part at
#: once and return ``DONE``, or return what is left to await (a coroutine function's call is
#: all left to await): the driver then runs the rest in the core.
Deliver = Callable[[SipResponse | None, float], Awaitable[None]]


class _Done:
    """An awaitable that is already done: what a ``Deliver`` that finished at once returns."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        yield from ()


DONE: Awaitable[None] = _Done()


class RequestSender(Protocol):
    """What presence needs of ``sipside.endpoint.Endpoint``."""

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        """Send ``request`` and return its final response."""
        ...

    def contact_for(self, transport: str = "udp", user: str | None = None) -> str:
        """A Contact URI that reaches us over ``transport``."""
        ...


class CallbackSender(Protocol):
    """An endpoint that hands a request's outcome to a callback (``Endpoint.send``)."""

    def send(
        self,
        request: SipRequest,
        done: Callable[[SipResponse | TransactionTimeout | TransportError], None],
        peer: Peer | None = None,
    ) -> None:
        """Send ``request``; ``done`` gets its final response or why none came, once, never
        before this returns. Raises TransportError at once when the endpoint is closing."""
        ...


class Serial(Protocol):
    """What transactions need of the serialised core driver (``component.runtime``)."""

    @property
    def closing(self) -> bool:
        """True once stopping began."""
        ...

    def own(self, work: Coroutine[Any, Any, None]) -> object:
        """Run ``work`` as a task the driver waits for when it stops."""
        ...

    def begin_transaction(self) -> None:
        """A transaction starts: counted in flight until ``answered`` or ``unanswered`` (new
        work pauses beyond a bound; stopping waits for it)."""
        ...

    def answered(self, work: Callable[[float], Awaitable[None]]) -> None:
        """A transaction ended: ``work(now)`` runs in the core after the answers before it
        (at once when the core is idle; what it returns other than ``DONE`` is awaited in the
        core)."""
        ...

    def unanswered(self) -> None:
        """A transaction ended with nothing to run (not sent because we stop)."""
        ...

    async def call(self, work: Callable[[float], Awaitable[None]]) -> None:
        """Run ``work(now)`` alone in the core."""
        ...


class Sends(Protocol):
    """How a dialog module sends a request (``ClientTransactions``, or a fake in tests)."""

    def send(self, request: SipRequest, peer: Peer | None, deliver: Deliver) -> None:
        """Send ``request`` (to ``peer``, else through the proxy); ``deliver`` its outcome."""
        ...

    def contact_for(self, transport: str) -> str:
        """Our Contact URI for ``transport``."""
        ...


class ClientTransactions:
    """Runs presence's client transactions on the endpoint (implements ``Sends``).

    An endpoint with ``send`` (``CallbackSender``) answers each by callback; one with only
    ``request`` (a test's fake) gets a task per request that awaits it.
    """

    def __init__(self, endpoint: RequestSender, serial: Serial) -> None:
        self.endpoint = endpoint
        self.serial = serial
        # What a runtime-checkable protocol would check; this module runs compiled, where
        # protocols are not.
        by_callback = hasattr(endpoint, "send")
        self._by_callback = cast(CallbackSender, endpoint) if by_callback else None

    def send(self, request: SipRequest, peer: Peer | None, deliver: Deliver) -> None:
        """Run a client transaction; its outcome goes to ``deliver`` in the core."""
        self.serial.begin_transaction()

        def done(final: SipResponse | TransactionTimeout | TransportError) -> None:
            self._done(request, final, deliver)

        sender = self._by_callback
        if sender is None:
            self.serial.own(self._await(request, peer, done))
            return
        try:
            sender.send(request, done, peer)
        except TransportError as exc:  # the endpoint is closing
            self._done(request, exc, deliver)

    def contact_for(self, transport: str) -> str:
        """Our Contact for ``transport`` (the endpoint's bound address)."""
        return self.endpoint.contact_for(transport)

    async def _await(
        self,
        request: SipRequest,
        peer: Peer | None,
        done: Callable[[SipResponse | TransactionTimeout | TransportError], None],
    ) -> None:
        final: SipResponse | TransactionTimeout | TransportError
        try:
            final = await self.endpoint.request(request, peer)
        except (TransactionTimeout, TransportError) as exc:
            final = exc
        except asyncio.CancelledError:
            self.serial.unanswered()  # cut short by stop: not sent
            raise
        done(final)

    def _done(
        self,
        request: SipRequest,
        final: SipResponse | TransactionTimeout | TransportError,
        deliver: Deliver,
    ) -> None:
        response: SipResponse | None = None
        if isinstance(final, SipResponse):
            response = final
        elif isinstance(final, TransportError) and self.serial.closing:
            # Our own shutdown closed the endpoint: the request was not sent, the peer did
            # not fail. The stored subscription stays; the restarted gateway goes on.
            log.info("presence_request_unsent", call_id=request.call_id, error=str(final))
            self.serial.unanswered()
            return
        else:
            log.info("presence_request_failed", call_id=request.call_id, error=str(final))
        self.serial.answered(lambda now: deliver(response, now))
