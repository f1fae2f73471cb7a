"""The wire side of the endpoint: listen specs and URI routing, the trusted source networks, the
asyncio datagram and stream protocols, TLS contexts, and the raw answer to a request too broken
to parse.

Nothing here owns a transaction or a timer: the protocols hand every message to callbacks of
the :class:`~sipside.endpoint.Endpoint` that created them (:class:`StreamHooks`), which keeps
the dependency one way (endpoint -> transport).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, cast

import structlog

from sipside.errors import LocalError, PeerError, TransportError
from sipside.framing import PONG, FramingError, KeepAlive, StreamFramer
from sipside.headers import quote_warning
from sipside.message import reason_phrase
from sipside.peer import Peer

log = structlog.get_logger("sipside.transport")

# What a response to an unparsable request copies, and the compact forms of those names
_MANDATORY = ("Via", "From", "To", "Call-ID", "CSeq")
_COMPACT = {"v": "Via", "f": "From", "t": "To", "i": "Call-ID"}
_MAX_DATAGRAM = 65536  # a UDP payload is at most 65,507 bytes


def parse_listen(spec: str) -> Peer:
    """Parse ``udp:127.0.0.1:5070``, ``tls:[::1]:5071`` into a Peer; ValueError names the fault."""
    transport, sep, rest = spec.partition(":")
    transport = transport.lower()
    if not sep or transport not in ("udp", "tcp", "tls"):
        raise ValueError(f"{spec!r}: expected udp:, tcp: or tls: followed by HOST:PORT")
    if rest.startswith("["):
        host, bracket, port_text = rest[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise ValueError(f"{spec!r}: IPv6 address must be written [ADDR]:PORT")
        port_text = port_text[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ValueError(f"{spec!r}: missing :PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{spec!r}: host must be an IP address, not {host!r}") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{spec!r}: port must be 0-65535")
    return Peer(transport, host, int(port_text))


def peer_for_uri(uri: str) -> Peer:
    """Where to send a request for a ``sip:``/``sips:`` URI with an IP host (no DNS, RFC 3263
    lookups are the proxy's job): transport from ``;transport=``, default port 5060/5061."""
    scheme, _, rest = uri.partition(":")
    scheme = scheme.lower()
    if scheme not in ("sip", "sips"):
        raise LocalError(f"cannot route to {uri!r}: not a sip: URI")
    rest = rest.split("?", 1)[0]
    hostpart, *params = rest.split(";")
    hostpart = hostpart.rsplit("@", 1)[-1]
    transport = "tls" if scheme == "sips" else "udp"
    for param in params:
        name, _, value = param.partition("=")
        if name.lower() == "transport" and value.lower() in ("udp", "tcp", "tls"):
            transport = value.lower()
    if hostpart.startswith("["):
        host, _, tail = hostpart[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif hostpart.count(":") == 1:
        host, port_text = hostpart.split(":")
    else:
        host, port_text = hostpart, ""
    default = 5061 if transport == "tls" else 5060
    try:
        if not _is_ip_address(host):
            raise ValueError(host)
        port = int(port_text) if port_text else default
    except ValueError:
        raise LocalError(f"cannot route to {uri!r}: host must be an IP address") from None
    return Peer(transport, host, port)


@functools.lru_cache(maxsize=1024)
def _is_ip_address(host: str) -> bool:
    """Is ``host`` an IP address? Asked per in-dialog request (a NOTIFY to each of thousands of
    watchers) of a few hosts: ``ipaddress`` parsing was 13% of a NOTIFY's CPU in process."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class StreamHooks:
    """What a stream connection reports to the endpoint that owns it."""

    max_buffer: int  # bytes a framer may hold while a message is incomplete
    now: Callable[[], float]
    received: Callable[[bytes, Peer], None]  # one complete message from ``peer``
    opened: Callable[[StreamConnection], None]  # connected; ``peer`` is known
    closed: Callable[[StreamConnection], None]
    framing_failed: Callable[[StreamConnection, PeerError], None]  # about to be closed


class Burst(Protocol):
    """Told around the handling of datagrams read together (one wake-up's drain), so that
    what their handling writes elsewhere (one stream write per datagram) can be written once at
    the end. Never around a lone datagram: nothing waits for a burst that has no second one."""

    def begin(self) -> None:
        """Datagrams read together are about to be handled."""

    def end(self) -> None:
        """They were (also when one's handling raised)."""


class DatagramSocket(asyncio.DatagramProtocol):
    """One bound UDP socket; each datagram goes to ``received`` with its source.

    asyncio reads one datagram per readiness event, so under load every datagram costs an
    event-loop iteration (a select() and its bookkeeping). After each datagram this reads what
    else is already queued on the socket, up to ``DRAIN`` more, without waiting.

    At a low rate the socket is empty after the datagram asyncio read, and the read that says
    so (a recvfrom() failing with EAGAIN, and its exception) is wasted. So the drain is skipped
    when the previous datagram came more than ``DRAIN_GAP`` ago: one that is queued all the
    same is not lost, the event loop hands it over in its next iteration.
    """

    DRAIN: ClassVar[int] = (
        16  # datagrams read per wake-up besides asyncio's own: others' turn comes soon
    )
    DRAIN_GAP: ClassVar[float] = 0.001  # seconds; slower than 1,000 datagrams/s: no drain

    def __init__(
        self,
        local: Peer,
        received: Callable[[bytes, Peer], None],
        burst: Burst | None = None,
    ) -> None:
        self.local = local
        self.received = received
        # Told when a drain starts and ends, so that what the handling of its datagrams writes
        # elsewhere can go out together (see Burst).
        self.burst = burst
        self.transport: asyncio.DatagramTransport | None = None
        # A second handle on the transport's socket (same file description, so non-blocking
        # too), for reading without another wake-up; asyncio's own handle is not to be read.
        self._reader: socket.socket | None = None
        self._last_at = -1.0  # time.monotonic() of the previous datagram; -1: none yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        sock = transport.get_extra_info("socket")
        self._reader = sock.dup() if sock is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        now = time.monotonic()
        previous = self._last_at
        self._last_at = now
        if previous >= 0.0 and now - previous > self.DRAIN_GAP:
            # A lone datagram: nothing else is likely queued.
            self.received(data, Peer("udp", addr[0], addr[1]))
            return
        burst = self.burst
        if burst is None:
            self.received(data, Peer("udp", addr[0], addr[1]))
            self._drain()
            return
        burst.begin()
        try:
            self.received(data, Peer("udp", addr[0], addr[1]))
            self._drain()
        finally:
            burst.end()

    def _drain(self) -> None:
        for _ in range(self.DRAIN):
            reader = self._reader
            if reader is None or self.transport is None or self.transport.is_closing():
                return
            try:
                data, addr = reader.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return  # nothing more queued
            except OSError as exc:
                self.error_received(exc)
                return
            self.received(data, Peer("udp", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the transaction's timers handle the loss.
        log.debug("udp_error_received", error=str(exc))


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, either direction, framed by Content-Length."""

    def __init__(self, transport_name: str, hooks: StreamHooks) -> None:
        self.hooks = hooks
        self.transport_name = transport_name
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self.framer = StreamFramer(hooks.max_buffer)
        self.last_used = 0.0
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        addr = transport.get_extra_info("peername")
        self.peer = Peer(self.transport_name, addr[0], addr[1])
        self.last_used = self.hooks.now()
        self.hooks.opened(self)
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.transport is not None
        self.last_used = self.hooks.now()
        for event in self.framer.feed(data):
            if isinstance(event, KeepAlive):
                self.transport.write(PONG)  # RFC 5626 3.5.1
            elif isinstance(event, FramingError):
                # RFC 3261 18.3: framing is lost; the only safe thing is to close the connection.
                self.hooks.framing_failed(self, event.error)
                self.transport.close()
                return
            else:
                self.hooks.received(event, self.peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.hooks.closed(self)
        if not self.ready.done():
            self.ready.set_exception(TransportError(f"connection lost: {exc}"))

    def write(self, data: bytes) -> None:
        """Send bytes on the connection, counting it as used."""
        assert self.transport is not None
        self.last_used = self.hooks.now()
        self.transport.write(data)


class TrustedSources:
    """The networks whose hosts may send us requests, with a bounded cache of verdicts by host
    (a proxy sends from a handful of addresses, and parsing one costs more than the lookup)."""

    __slots__ = ("_verdicts", "networks")

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self._verdicts: dict[str, bool] = {}

    def allows(self, host: str) -> bool:
        """Whether ``host`` (an IP literal) is inside one of the networks."""
        known = self._verdicts.get(host)
        if known is None:
            known = self._verdicts[host] = self._check(host)
            if len(self._verdicts) > 4096:
                self._verdicts.clear()
        return known

    def _check(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)


def server_tls_context(cert: str | None, key: str | None) -> ssl.SSLContext:
    """The context of a ``tls:`` listener; LocalError without a certificate and key."""
    if not cert or not key:
        raise LocalError("tls: listener needs tls_cert and tls_key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def client_tls_context(verify: bool) -> ssl.SSLContext:
    """The context of an outgoing TLS connection; ``verify=False`` accepts any certificate."""
    ctx = ssl.create_default_context()
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def unparsable_answer(
    data: bytes, exc: PeerError, extra: Iterable[tuple[str, str]] = ()
) -> bytes | None:
    """RFC 3261 8.2: the response to a broken request if its Via can be read at all, copying
    whichever of From, To, Call-ID and CSeq it has (RFC 4475 3.3.1 asks for a 400 even without
    them); None for a response or a request without Via, to be dropped (16.3, 18.1.2). Also the
    answer to a request refused before it is parsed (``extra``: its Retry-After)."""
    headers = _salvage_headers(data)
    if headers is None:
        return None
    status = exc.status if exc.status >= 400 else 400
    lines = [f"SIP/2.0 {status} {reason_phrase(status)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if exc.warning:
        lines.append(f'Warning: 399 sipxmpp "{quote_warning(exc.warning)}"')
    lines += [f"{name}: {value}" for name, value in extra]
    lines += ["Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def _salvage_headers(data: bytes) -> list[tuple[str, str]] | None:
    """The headers a response must copy (RFC 3261 8.2.6.2), read leniently from a request that
    did not parse; None when it is not a request or has no Via to answer along."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
    lines = head.split("\r\n")
    if not lines or lines[0].startswith("SIP/"):
        return None
    found: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            continue
        key = name.strip()
        canonical = _COMPACT.get(key.lower()) or next(
            (m for m in _MANDATORY if m.lower() == key.lower()), None
        )
        if canonical is not None:
            found.setdefault(canonical, []).append(value.strip())
    if "Via" not in found:
        return None
    salvaged = [("Via", v) for v in found["Via"]]
    # RFC 4475 3.3.1: a request missing From, To or Call-ID still gets its 400; the fields it
    # lacks cannot be copied, and the client matches the response by Via branch and CSeq.
    salvaged += [(name, found[name][0]) for name in _MANDATORY[1:] if name in found]
    if any("\x00" in v or "\ufffd" in v for _, v in salvaged):
        return None
    return salvaged
