"""Errors of the SIP side, split as h11 does: the peer's mistakes and our own."""

from __future__ import annotations

from mypy_extensions import mypyc_attr


@mypyc_attr(allow_interpreted_subclasses=True)
class SipError(Exception):
    """Base class of every error raised by sipside."""


# The gateway refines it (a 415 that carries its Accept header); compiled (sipside/__init__.py),
# a class is closed to subclasses in pure Python unless it says otherwise.
@mypyc_attr(allow_interpreted_subclasses=True)
class PeerError(SipError):
    """The peer broke the protocol; answer its request with ``status``.

    ``warning`` is free text for a Warning header (RFC 3261 20.43) or a log line.
    """

    def __init__(self, status: int, reason: str, warning: str | None = None) -> None:
        super().__init__(f"{status} {reason}" + (f": {warning}" if warning else ""))
        self.status = status
        self.reason = reason
        self.warning = warning


def bad_body(format_name: str, warning: str) -> PeerError:
    """A 400 for a body that breaks the rules of its format; the warning names the format."""
    return PeerError(400, "Bad Request", f"{format_name}: {warning}")


class LocalError(SipError):
    """We broke the protocol or misused the API: a bug on our side, never the peer's."""


class TransportError(SipError):
    """A message could not be sent or a connection failed (RFC 3261 18.4)."""


class TransactionTimeout(SipError):
    """A client transaction ended without a final response (Timer F, RFC 3261 17.1.2.2)."""
