"""What the endpoint takes in: size limits on requests, and admission of a source.

Admission is the application's per-source policy (a rate limit, say), asked before a request
is parsed: refusing a flooding source must cost less than serving it, or the flood still
takes the time other sources' requests need. The endpoint answers a refused request with 503
and the Retry-After the policy gives, from the few headers it can read without parsing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sipside.errors import PeerError
from sipside.transport import unparsable_answer

#: Asked with a request's source host and the time before the request is parsed: None to
#: admit it, else the Retry-After (seconds) of the 503 it gets at once.
Admission = Callable[[str, float], int | None]


@dataclass(frozen=True, slots=True)
class EndpointLimits:
    """Size limits on incoming requests (RFC 3261 21.4.14, 21.4.15, 21.5.14)."""

    max_uri: int = 4096
    max_header_bytes: int = 16384
    max_body: int = 65536
    max_stream_buffer: int = 131072
    idle_timeout: float = 600.0


def refused_answer(data: bytes, retry_after: int) -> bytes | None:
    """503 + Retry-After to a request refused before parsing (None if it cannot be answered:
    no Via to send it along, RFC 3261 18.2.2)."""
    busy = PeerError(503, "Service Unavailable", "too many requests from this source")
    return unparsable_answer(data, busy, [("Retry-After", str(retry_after))])


__all__ = ["Admission", "EndpointLimits", "refused_answer"]
