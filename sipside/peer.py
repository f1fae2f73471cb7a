"""Where a SIP message came from or goes to: transport plus address."""

from __future__ import annotations

from dataclasses import dataclass

from sipside.fastpath import fast_frozen_init


@dataclass(frozen=True, slots=True, init=False, eq=False)
class Peer:
    """A transport-level address: ``transport`` is "udp", "tcp" or "tls"; ``host`` an IP literal
    without brackets; ``port`` the port number."""

    transport: str
    host: str
    port: int

    # Written out (not generated) so that compiled they are native: see fast_frozen_init.
    def __init__(self, transport: str, host: str, port: int) -> None:
        self.transport = transport  # type: ignore[misc]
        self.host = host  # type: ignore[misc]
        self.port = port  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Peer):
            return NotImplemented
        return (
            self.port == other.port
            and self.host == other.host
            and (self.transport == other.transport)
        )

    def __hash__(self) -> int:
        return hash((self.transport, self.host, self.port))

    @property
    def reliable(self) -> bool:
        """Stream transports deliver reliably: no retransmissions (RFC 3261 17.1.2.2)."""
        return self.transport != "udp"

    def hostport(self) -> str:
        """The ``host:port`` form used in Via sent-by and Contact, IPv6 in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.transport}:{self.hostport()}"


fast_frozen_init(Peer)  # built per datagram: the plain frozen __init__ is slow
