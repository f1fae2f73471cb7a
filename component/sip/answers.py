"""Refusals as SIP responses: the one place a core refusal or a peer error becomes an answer.

Every part of the SIP adapter refuses through :func:`refuse`, so there is one Warning format
(RFC 3261 20.43: ``399 sipxmpp "text"``) and one mapping of ``Refusal`` and sipside's
``PeerError`` to a status line and headers; a core's other answers (``SipAnswer``) go out
through :func:`send_answer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from component.errors import Refusal
from component.values import SipAnswer
from sipside.errors import PeerError
from sipside.headers import quote_warning

Headers = list[tuple[str, str]]


class Respondable(Protocol):
    """An incoming request that can still be answered (``sipside.endpoint.IncomingRequest``)."""

    def respond(
        self, status: int, reason: str | None = None, *, headers: Iterable[tuple[str, str]] = ()
    ) -> Any:
        """Send a final response."""
        ...


def warning(text: str | None) -> Headers:
    """A Warning header carrying ``text`` (none for an empty text)."""
    if not text:
        return []
    return [("Warning", f'399 sipxmpp "{quote_warning(text)}"')]


def refusal_headers(exc: Refusal | PeerError) -> tuple[int, str | None, Headers]:
    """(status, reason, headers) for a core refusal or a peer's protocol error."""
    if isinstance(exc, Refusal):
        headers = warning(exc.text)
        if exc.retry_after is not None:
            headers.append(("Retry-After", str(exc.retry_after)))
        return exc.sip_status, exc.sip_reason or None, headers
    return exc.status, exc.reason, warning(exc.warning)


def refuse(incoming: Respondable, exc: Refusal | PeerError) -> None:
    """Answer ``incoming`` with the response ``exc`` stands for."""
    status, reason, headers = refusal_headers(exc)
    incoming.respond(status, reason, headers=headers)


def send_answer(incoming: Respondable, answer: SipAnswer) -> None:
    """Answer ``incoming`` with the core's ``answer``."""
    incoming.respond(answer.status, answer.reason, headers=answer.headers)
