"""Our client transactions for presence: each in an owned task, its outcome back to its dialog.

A dialog module sends a request with a ``Deliver`` callback, the routing of its outcome: the
final response, or None when none came (a timeout, or the path failed). The callback runs as a
serialised call into the core. While the driver stops, a transaction cut short by our own
shutdown (the endpoint closing under it) is "not sent", never a peer's timeout: nothing is
deleted from the store because we stop (DESIGN 8).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from component.logs import get_logger
from sipside.errors import TransactionTimeout, TransportError
from sipside.message import SipRequest, SipResponse
from sipside.peer import Peer

log = get_logger("component.sip.transactions")

__all__ = ["ClientTransactions", "Deliver", "RequestSender", "Sends", "Serial"]

#: Where the outcome of a request goes: (final response or None, now).
Deliver = Callable[[SipResponse | None, float], Awaitable[None]]


class RequestSender(Protocol):
    """What presence needs of ``sipside.endpoint.Endpoint``."""

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        """Send ``request`` and return its final response."""
        ...

    def contact_for(self, transport: str = "udp", user: str | None = None) -> str:
        """A Contact URI that reaches us over ``transport``."""
        ...


class Serial(Protocol):
    """What transactions need of the serialised core driver (``component.runtime``)."""

    @property
    def closing(self) -> bool:
        """True once stopping began."""
        ...

    def own_transaction(self, work: Coroutine[Any, Any, None]) -> object:
        """Run a transaction ``work`` as a task the driver waits for when it stops, counted in
        flight until it ends (new work pauses beyond a bound)."""
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
    """Runs presence's client transactions on the endpoint (implements ``Sends``)."""

    def __init__(self, endpoint: RequestSender, serial: Serial) -> None:
        self.endpoint = endpoint
        self.serial = serial

    def send(self, request: SipRequest, peer: Peer | None, deliver: Deliver) -> None:
        """Run a client transaction in an owned task; its outcome goes to ``deliver``."""
        self.serial.own_transaction(self._run(request, peer, deliver))

    def contact_for(self, transport: str) -> str:
        """Our Contact for ``transport`` (the endpoint's bound address)."""
        return self.endpoint.contact_for(transport)

    async def _run(self, request: SipRequest, peer: Peer | None, deliver: Deliver) -> None:
        response: SipResponse | None = None
        try:
            response = await self.endpoint.request(request, peer)
        except TransportError as exc:
            if self.serial.closing:
                # Our own shutdown closed the endpoint: the request was not sent, the peer did
                # not fail. The stored subscription stays; the restarted gateway goes on.
                log.info("presence_request_unsent", call_id=request.call_id, error=str(exc))
                return
            log.info("presence_request_failed", call_id=request.call_id, error=str(exc))
        except TransactionTimeout as exc:
            log.info("presence_request_failed", call_id=request.call_id, error=str(exc))
        await self.serial.call(lambda now: deliver(response, now))
