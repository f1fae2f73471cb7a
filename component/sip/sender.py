"""MESSAGEs from the features out to the SIP side (``SipPort.send_text``, via ``SipSide``).

Requests go through the proxy (``sip.proxy``); the features see only the final status.
"""

from __future__ import annotations

from typing import Protocol

from component.logs import get_logger
from sipside.endpoint import Endpoint, make_request
from sipside.errors import TransactionTimeout, TransportError
from sipside.headers import quote_warning
from sipside.message import SipRequest, new_call_id, new_tag

log = get_logger("component.sip.sender")


class TextSender(Protocol):
    """What ``SipSide`` needs to send MESSAGEs (``SipSender``; a fake in tests)."""

    async def send_text(
        self, *, from_uri: str, to_uri: str, body: str, from_display: str | None = None
    ) -> int:
        """Send a MESSAGE; its final status."""
        ...


class SipSender:
    """Sends MESSAGEs in the endpoint's client transactions; the features see the status."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    async def send_text(
        self, *, from_uri: str, to_uri: str, body: str, from_display: str | None = None
    ) -> int:
        """A MESSAGE through the proxy; the final status, 408/503 for timeouts/failures."""
        display = f'"{quote_warning(from_display)}" ' if from_display else ""
        request = make_request(
            "MESSAGE",
            to_uri,
            from_=f"{display}<{from_uri}>;tag={new_tag()}",
            to=f"<{to_uri}>",
            call_id=new_call_id(),
            headers=[("Content-Type", "text/plain; charset=UTF-8")],
            body=body.encode("utf-8"),
        )
        return await self._final_status(request, to_uri)

    async def options(self, uri: str, from_uri: str) -> int:
        """OPTIONS to ``uri`` (RFC 3261 11), a health check; the final status as for MESSAGE."""
        request = make_request(
            "OPTIONS",
            uri,
            from_=f"<{from_uri}>;tag={new_tag()}",
            to=f"<{uri}>",
            call_id=new_call_id(),
            headers=[("Accept", "application/sdp")],
        )
        return await self._final_status(request, uri)

    async def _final_status(self, request: SipRequest, to_uri: str) -> int:
        try:
            response = await self.endpoint.request(request)
        except TransactionTimeout:
            return 408
        except TransportError as exc:
            log.info("sip_send_failed", sip_uri=to_uri, error=str(exc))
            return 503
        return response.status
