"""Where a SIP message came from or goes to: transport plus address."""

from __future__ import annotations

from dataclasses import dataclass

from sipside.fastpath import fast_frozen_init


@dataclass(frozen=True, slots=True)
class Peer:
    """A transport-level address: ``transport`` is "udp", "tcp" or "tls"; ``host`` an IP literal
    without brackets; ``port`` the port number."""

    transport: str
    host: str
    port: int

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
