"""The one asyncio adapter of the SIP side: sockets, the clock and timers around the cores.

It owns UDP, TCP and TLS listeners, stream connections (reused both ways), the transaction
layer and its single timer. Incoming requests go to one application callback with a
``respond`` handle; outgoing requests are ``await endpoint.request(...)`` and return the final
response, answering Digest challenges on the way (or ``endpoint.send(..., done)`` hands it to a
callback, for callers that need no task per request). OPTIONS goes to the application as well:
only it knows which Request-URIs it serves (RFC 3261 11.2).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from sipside.digest import AuthenticationError, DigestClient, retry_with_credentials
from sipside.errors import LocalError, PeerError, TransactionTimeout, TransportError
from sipside.headers import Via, quote_warning, remember_via
from sipside.limits import Admission, EndpointLimits, refused_answer
from sipside.message import (
    SipMessage,
    SipRequest,
    SipResponse,
    make_request,
    make_response,
    new_branch,
    new_tag,
    parse_message,
)
from sipside.peer import Peer
from sipside.timers import TimerConfig
from sipside.transaction import (
    AnyServerKey,
    ClientKey,
    DeliverRequest,
    DeliverResponse,
    Discarded,
    Effect,
    Failed,
    Stray,
    Terminated,
    Transmit,
)
from sipside.transport import (
    Burst,
    DatagramSocket,
    StreamConnection,
    StreamHooks,
    TrustedSources,
    client_tls_context,
    parse_listen,
    peer_for_uri,
    server_tls_context,
    unparsable_answer,
)
from sipside.txlayer import TransactionLayer
from sipside.validate import UnsupportedExtension, validate_request

log = structlog.get_logger("sipside.endpoint")

# RFC 3261 18.1.1: a request within 200 bytes of the path MTU (1500) goes over a congestion
# controlled transport; 1300 is the RFC's figure for an unknown MTU.
UDP_MAX_REQUEST = 1300
MAX_DATAGRAM = 65535
ANSWERED_METHODS = ("MESSAGE", "SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER", "OPTIONS")
ALLOW = ", ".join(ANSWERED_METHODS)
KNOWN_METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "PRACK", "UPDATE", "INFO", "REFER", *ANSWERED_METHODS}
)


class IncomingRequest:
    """A request handed to the application; answer it once with ``respond``."""

    __slots__ = ("_endpoint", "_key", "answered", "request", "source")

    def __init__(
        self, endpoint: Endpoint, key: AnyServerKey, request: SipRequest, source: Peer
    ) -> None:
        self._endpoint = endpoint
        self._key = key
        self.request = request
        self.source = source
        self.answered = False

    def respond(
        self,
        status: int,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        to_tag: str | None = None,
    ) -> SipResponse:
        """Send the final (or 100) response through the server transaction.

        RFC 3261 8.2.6.2: a response other than 100 to a request without a To tag carries
        one of ours (a new one unless ``to_tag`` names the dialog's).
        """
        if to_tag is None and status > 100:
            to_tag = new_tag()
        response = make_response(
            self.request, status, reason, to_tag=to_tag, headers=headers, body=body
        )
        self.send(response)
        return response

    def send(self, response: SipResponse) -> None:
        """Send a response built by the application."""
        if response.status >= 200:
            if self.answered:
                raise LocalError(f"request answered twice ({response.status})")
            self.answered = True
        self._endpoint._send_response(self._key, response)


RequestHandler = Callable[[IncomingRequest], None]
Final = SipResponse | TransactionTimeout | TransportError
"""How a client transaction ends: its final response, or why none came."""
FinalHandler = Callable[[Final], None]


# Where a template's per-request values go; nothing a request of ours holds otherwise.
TAG_MARK = "\x00tag\x00"
CALL_ID_MARK = "\x00call-id\x00"
_BRANCH_MARK = "z9hG4bK\x00branch\x00"


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """A request as the endpoint writes it, cut where each request's own values go: the top
    Via's branch, the From tag, the Call-ID and the Content-Length (``Endpoint.template``)."""

    method: str
    peer: Peer
    pieces: tuple[bytes, bytes, bytes, bytes]  # before the branch, tag, Call-ID, length


@dataclass(slots=True)
class _Pending:
    done: FinalHandler
    request: SipRequest | None  # as the caller gave it: a Digest retry is built from it
    peer: Peer
    retried: bool  # the Digest retry: its own 401/407 is final


@dataclass(slots=True)
class Stats:
    """Counters for metrics."""

    requests_in: int = 0
    requests_out: int = 0
    responses_in: int = 0
    responses_out: int = 0
    parse_errors: int = 0
    rejected: int = 0
    timeouts: int = 0
    transport_errors: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


class Endpoint:
    """A SIP endpoint: listeners, transactions, and the application's handler."""

    def __init__(
        self,
        listen: Iterable[str],
        handler: RequestHandler | None = None,
        *,
        timers: TimerConfig | None = None,
        trusted: Iterable[str] = ("127.0.0.0/8", "::1/128"),
        outbound_proxy: str | None = None,
        digest: DigestClient | None = None,
        limits: EndpointLimits | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_verify: bool = False,
        user_agent: str = "sipxmpp",
        supported: frozenset[str] = frozenset(),
        admit: Admission | None = None,
    ) -> None:
        self.listen = [parse_listen(s) for s in listen]
        if handler is not None:
            self.handler = handler
        self.admit = admit
        self.limits = limits or EndpointLimits()
        self.trusted = TrustedSources(trusted)
        self.proxy = peer_for_uri(outbound_proxy) if outbound_proxy else None
        self.digest = digest
        self.user_agent = user_agent
        self.supported = supported
        self.stats = Stats()
        self._layer = TransactionLayer(timers)
        self._tls_cert, self._tls_key, self._tls_verify = tls_cert, tls_key, tls_verify
        self._udp: dict[int, DatagramSocket] = {}  # address family -> socket of that family
        self._burst: Burst | None = None
        self._local: dict[str, Peer] = {}  # transport -> our bound address for Via/Contact
        self._servers: list[asyncio.Server] = []
        self._streams: dict[Peer, StreamConnection] = {}
        self._connecting: dict[Peer, asyncio.Task[StreamConnection]] = {}
        self._pending: dict[ClientKey, _Pending] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._instant: float | None = None  # the time of the message being dispatched
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._sending = False  # inside send(): a final outcome now waits for the next loop turn
        self._hooks = StreamHooks(
            self.limits.max_stream_buffer,
            self._now,
            self._on_message,
            self._stream_opened,
            self._stream_closed,
            self._stream_framing_failed,
        )

    def set_burst(self, burst: Burst | None) -> None:
        """Tell ``burst`` when UDP datagrams read in one wake-up are handled together."""
        self._burst = burst
        for udp in self._udp.values():
            udp.burst = burst

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self, handler: RequestHandler | None = None) -> None:
        """Bind every listener, requests to ``handler``; bound ports are in ``local_peers``."""
        if handler is not None:
            self.handler = handler
        loop = self._loop = asyncio.get_running_loop()
        for spec in self.listen:
            family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
            if spec.transport == "udp":
                transport, protocol = await loop.create_datagram_endpoint(
                    lambda spec=spec: DatagramSocket(  # type: ignore[misc]
                        spec, self._on_datagram, self._burst
                    ),
                    local_addr=(spec.host, spec.port),
                    family=family,
                )
                port = transport.get_extra_info("sockname")[1]
                self._udp.setdefault(family, protocol)
            else:
                tls = spec.transport == "tls"
                ctx = server_tls_context(self._tls_cert, self._tls_key) if tls else None
                name = spec.transport
                server = await loop.create_server(
                    lambda name=name: StreamConnection(name, self._hooks),
                    host=spec.host,
                    port=spec.port,
                    family=family,
                    ssl=ctx,
                    reuse_address=True,
                )
                self._servers.append(server)
                port = server.sockets[0].getsockname()[1]
            self._local.setdefault(spec.transport, Peer(spec.transport, spec.host, port))
        self._sweeper = loop.create_task(self._sweep_idle())
        log.info("sip_endpoint_started", listen=[str(p) for p in self._local.values()])

    async def close(self) -> None:
        """Stop listening, fail pending requests and close every connection."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in self._connecting.values():
            task.cancel()
        for server in self._servers:
            server.close()
        pending, self._pending = list(self._pending.values()), {}
        for entry in pending:
            self._final(entry, TransportError("endpoint closed"))
        for stream in list(self._streams.values()):
            if stream.transport is not None:
                stream.transport.close()
        for udp in self._udp.values():
            if udp.transport is not None:
                udp.transport.close()
        if self._timer is not None:
            self._timer.cancel()
        for server in self._servers:
            await server.wait_closed()

    @property
    def local_peers(self) -> dict[str, Peer]:
        """Our bound address per transport ("udp", "tcp", "tls")."""
        return dict(self._local)

    def contact_for(self, transport: str = "udp", user: str | None = None) -> str:
        """A Contact URI that reaches this endpoint over ``transport``."""
        local = self._local.get(transport) or next(iter(self._local.values()))
        userpart = f"{user}@" if user else ""
        param = "" if local.transport == "udp" else f";transport={local.transport}"
        scheme = "sips" if local.transport == "tls" else "sip"
        return f"{scheme}:{userpart}{local.hostport()}{param}"

    @property
    def transactions(self) -> tuple[int, int]:
        """Live (client, server) transactions, for metrics."""
        return self._layer.client_count, self._layer.server_count

    # --- outgoing requests ---------------------------------------------------------------------

    async def request(self, request: SipRequest, peer: Peer | None = None) -> SipResponse:
        """Send ``request`` (no Via needed) and return its final response.

        The destination is ``peer``, else the outbound proxy, else the Request-URI's host. A
        401/407 is answered once with the endpoint's Digest credentials. Raises
        TransactionTimeout or TransportError when no final response comes.
        """
        future: asyncio.Future[Final] = asyncio.get_running_loop().create_future()
        self.send(request, lambda final: None if future.done() else future.set_result(final), peer)
        final = await future
        if isinstance(final, SipResponse):
            return final
        raise final

    def send(self, request: SipRequest, done: FinalHandler, peer: Peer | None = None) -> None:
        """:meth:`request` without a task: ``done`` gets the final response, or the
        TransactionTimeout or TransportError, once; never before this returns.

        Raises TransportError at once when the endpoint is closing.
        """
        if self._closing:
            raise TransportError("endpoint is closing")
        dest = peer or self._route_peer(request) or self.proxy or peer_for_uri(request.uri)
        self._sending = True
        try:
            self._send_once(_Pending(done, request, dest, self.digest is None), request)
        finally:
            self._sending = False

    def _final(self, pending: _Pending, final: Final) -> None:
        """Hand the outcome of ``pending`` to its caller, answering a challenge once first."""
        digest = self.digest
        request = pending.request
        if (
            not pending.retried
            and isinstance(final, SipResponse)
            and final.status in (401, 407)
            and digest is not None
            and request is not None
        ):
            try:
                retry = retry_with_credentials(digest, request, final, request.cseq[0] + 1)
            except AuthenticationError as exc:
                log.warning("sip_auth_unanswerable", uri=request.uri, error=str(exc))
            else:
                self._send_once(_Pending(pending.done, request, pending.peer, True), retry)
                return
        if self._sending:
            # Failed before send() returned: the caller hears of it from the loop, not from
            # inside its own call.
            assert self._loop is not None
            self._loop.call_soon(self._call_done, pending.done, final)
            return
        self._call_done(pending.done, final)

    def template(self, request: SipRequest, peer: Peer | None = None) -> RequestTemplate | None:
        """``request`` (with :data:`TAG_MARK` in its From and :data:`CALL_ID_MARK` as its Call-ID,
        no body) as :meth:`send` would write it, for :meth:`send_templated` to fill in; None when
        requests must take :meth:`send` (Digest credentials to answer challenges with)."""
        if self.digest is not None or self._closing:
            return None
        dest = peer or self._route_peer(request) or self.proxy or peer_for_uri(request.uri)
        written, dest, _ = self._with_our_headers(request, dest, _BRANCH_MARK)
        data = bytes(written)
        head, _, rest = data.partition(_BRANCH_MARK.encode())
        middle, _, rest = rest.partition(TAG_MARK.encode())
        before_call_id, _, rest = rest.partition(CALL_ID_MARK.encode())
        length, end = b"Content-Length: ", b"0\r\n\r\n"
        if not (middle and before_call_id and rest.endswith(length + end)) or request.body:
            raise LocalError("a request template needs the tag and Call-ID marks and no body")
        pieces = (head + b"z9hG4bK", middle, before_call_id, rest[: -len(end)])
        return RequestTemplate(request.method, dest, pieces)

    def send_templated(
        self, template: RequestTemplate, tag: str, call_id: str, body: bytes, done: FinalHandler
    ) -> bool:
        """:meth:`send` of ``template`` with its own From tag, Call-ID and body, written without
        building the request; False when it must take :meth:`send` (a body too large for UDP).
        Raises TransportError at once when the endpoint is closing."""
        if self._closing:
            raise TransportError("endpoint is closing")
        dest = template.peer
        if dest.transport == "udp" and len(body) + 600 > UDP_MAX_REQUEST and "tcp" in self._local:
            return False  # RFC 3261 18.1.1: over TCP, with a Via that says so
        loop = self._loop
        assert loop is not None, "Endpoint.start() first"
        random = new_branch()[7:]
        head, middle, before_call_id, before_length = template.pieces
        data = b"".join(
            (
                head,
                random.encode(),
                middle,
                tag.encode(),
                before_call_id,
                call_id.encode(),
                before_length,
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        # No Via remembered for the answer: the next hop fills in the rport our Via asks for
        # (RFC 3581), so the answer's Via is never the text written; it is parsed afresh.
        branch = "z9hG4bK" + random
        self._sending = True
        try:
            key, effects = self._layer.send_written(
                ClientKey(branch, template.method), data, dest, loop.time()
            )
            self._pending[key] = _Pending(done, None, dest, True)
            self.stats.requests_out += 1
            self._run(effects)
        finally:
            self._sending = False
        return True

    @staticmethod
    def _call_done(done: FinalHandler, final: Final) -> None:
        try:
            done(final)
        except Exception:
            # The caller's bug: the transaction layer's own effects still run.
            log.exception("sip_final_handler_failed")

    @staticmethod
    def _route_peer(request: SipRequest) -> Peer | None:
        """RFC 3261 8.1.2 / 12.2.1.1: a request with a route set goes to its first Route."""
        if request.header("Route") is None:
            return None  # most requests: no list of values made and split to find that out
        routes = request.header_values("Route")
        if not routes:
            return None
        first = routes[0].strip()
        uri = first[1 : first.index(">")] if first.startswith("<") and ">" in first else first
        return peer_for_uri(uri)

    def _send_once(self, pending: _Pending, request: SipRequest) -> None:
        request, dest, via = self._with_our_headers(request, pending.peer, new_branch())
        remember_via(
            request.headers[0][1], via
        )  # the transaction layer and the response look it up
        loop = self._loop
        assert loop is not None, "Endpoint.start() first"
        key, effects = self._layer.send_request(request, dest, loop.time())
        self._pending[key] = pending
        self.stats.requests_out += 1
        self._run(effects)

    def _with_our_headers(
        self, request: SipRequest, dest: Peer, branch: str
    ) -> tuple[SipRequest, Peer, Via]:
        """``request`` as it goes to ``dest`` (or over TCP, RFC 3261 18.1.1), with our Via."""
        data_len = len(request.body) + 600  # headers of our own requests stay well under this
        if dest.transport == "udp" and data_len > UDP_MAX_REQUEST and "tcp" in self._local:
            dest = Peer("tcp", dest.host, dest.port)  # RFC 3261 18.1.1
        local = self._local.get(dest.transport)
        if local is None:
            raise LocalError(f"no {dest.transport} listener to send {request.method} to {dest}")
        host = f"[{local.host}]" if ":" in local.host else local.host
        transport = dest.transport.upper()
        via = Via(transport, host, local.port, (("branch", branch), ("rport", None)))
        via_text = f"SIP/2.0/{transport} {host}:{local.port};branch={branch};rport"  # str(via)
        # One copy with all our headers, as add_header would place them: Via first, then the
        # request's own, then Max-Forwards and User-Agent unless it has them.
        headers = (("Via", via_text), *request.headers)
        if request.header("Max-Forwards") is None:
            headers += (("Max-Forwards", "70"),)
        if request.header("User-Agent") is None:
            headers += (("User-Agent", self.user_agent),)
        return SipRequest(request.method, request.uri, headers, request.body), dest, via

    # --- incoming bytes ------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, source: Peer) -> None:
        if data[:1] in (b"\r", b"\n", b"") and not data.strip(b"\r\n"):
            return  # RFC 5626 keep-alive over UDP
        self._on_message(data, source)

    def _on_message(self, data: bytes, source: Peer) -> None:
        admit = self.admit
        if admit is not None and not data.startswith(b"SIP/"):
            retry_after = admit(source.host, self._now())
            if retry_after is not None:
                self.stats.rejected += 1
                answer = refused_answer(data, retry_after)
                if answer is not None:
                    self._transmit(answer, source, None)
                return
        try:
            message = parse_message(data)
        except PeerError as exc:
            self.stats.parse_errors += 1
            self._answer_unparsable(data, source, exc)
            return
        if isinstance(message, SipResponse):
            self.stats.responses_in += 1
        else:
            self.stats.requests_in += 1
        now = self._now()
        try:
            # The handler answers most requests within _run, before _arm_timer reads the timers.
            effects = self._layer.receive(message, source, now, answer_first=True)
        except PeerError as exc:
            self.stats.parse_errors += 1
            self._answer_unparsable(data, source, exc)
            return
        # A handler that answers at once answers at this same instant: one clock read for both.
        self._instant = now
        try:
            self._run(effects)
            armed = self._timer_at
            if armed is not None and now >= armed + self._layer.config.slack / 2:
                self._timers_due(now)
        finally:
            self._instant = None

    def _answer_unparsable(self, data: bytes, source: Peer, exc: PeerError) -> None:
        log.info("sip_message_rejected", peer=str(source), status=exc.status, error=str(exc))
        answer = unparsable_answer(data, exc)
        if answer is not None:
            self._transmit(answer, source, None)  # RFC 3261 18.2.2

    def _stream_opened(self, stream: StreamConnection) -> None:
        assert stream.peer is not None
        self._streams[stream.peer] = stream

    def _stream_closed(self, stream: StreamConnection) -> None:
        if stream.peer is not None and self._streams.get(stream.peer) is stream:
            del self._streams[stream.peer]

    def _stream_framing_failed(self, stream: StreamConnection, error: PeerError) -> None:
        log.warning("stream_framing_failed", peer=str(stream.peer), error=str(error))
        self.stats.parse_errors += 1

    # --- effects -------------------------------------------------------------------------------

    def _run(self, effects: list[Effect]) -> None:
        for effect in effects:
            match effect:
                case Transmit(data=data, peer=peer, key=key):
                    self._transmit(data, peer, key)
                case DeliverRequest(key=key, request=request, source=source):
                    self._deliver(key, request, source)
                case DeliverResponse(key=key, response=response):
                    if response.status >= 200:
                        pending = self._pending.pop(key, None)
                        if pending is not None:
                            self._final(pending, response)
                case Failed(key=key, error=error):
                    if isinstance(error, TransactionTimeout):
                        self.stats.timeouts += 1
                    else:
                        self.stats.transport_errors += 1
                    pending = self._pending.pop(key, None)  # type: ignore[arg-type]
                    if pending is not None:
                        self._final(pending, error)
                case Terminated(key=key):
                    self._pending.pop(key, None)  # type: ignore[arg-type]
                case Stray(message=message, source=source, reason=reason):
                    log.debug(
                        "sip_stray_dropped",
                        peer=str(source),
                        reason=reason,
                        call_id=_call_id(message),
                    )
                case Discarded(response=response, reason=reason):
                    log.debug("sip_response_discarded", status=response.status, reason=reason)
        self._arm_timer()

    def _deliver(self, key: AnyServerKey, request: SipRequest, source: Peer) -> None:
        method = request.method
        if method == "ACK":
            return
        incoming = IncomingRequest(self, key, request, source)
        try:
            self._screen(request, source)
        except UnsupportedExtension as unsupported:
            self.stats.rejected += 1
            incoming.respond(420, headers=[("Unsupported", ", ".join(unsupported.options))])
            return
        except PeerError as exc:
            self.stats.rejected += 1
            extra = [("Allow", ALLOW)] if exc.status == 405 else []
            if exc.warning:
                extra.append(("Warning", f'399 sipxmpp "{quote_warning(exc.warning)}"'))
            incoming.respond(exc.status, exc.reason, headers=extra)
            return
        try:
            self.handler(incoming)
        except PeerError as exc:
            if not incoming.answered:
                incoming.respond(exc.status, exc.reason)
        except Exception:
            log.exception("sip_handler_failed", method=method, call_id=request.call_id)
            if not incoming.answered:
                incoming.respond(500, "Internal Server Error")

    def _screen(self, request: SipRequest, source: Peer) -> None:
        """The checks every request passes before the application sees it."""
        if not self.trusted.allows(source.host):
            raise PeerError(403, "Forbidden", "source address not trusted")
        validate_request(
            request,
            supported=self.supported,
            max_uri=self.limits.max_uri,
            max_header_bytes=self.limits.max_header_bytes,
            max_body=self.limits.max_body,
        )
        method = request.method
        if method == "INVITE":
            raise PeerError(405, "Method Not Allowed", "sessions are not supported")
        if method not in ANSWERED_METHODS:
            if method in KNOWN_METHODS:
                raise PeerError(405, "Method Not Allowed")
            raise PeerError(501, "Not Implemented")

    def _send_response(self, key: AnyServerKey, response: SipResponse) -> None:
        self.stats.responses_out += 1
        self.stats.by_status[response.status] = self.stats.by_status.get(response.status, 0) + 1
        self._run(self._layer.send_response(key, response, self._now()))

    def _transmit(self, data: bytes, peer: Peer, key: Any) -> None:
        if peer.transport == "udp":
            family = socket.AF_INET6 if ":" in peer.host else socket.AF_INET
            udp = self._udp.get(family)
            if udp is None or udp.transport is None:
                self._transport_failed(key, TransportError(f"no UDP socket for {peer}"))
                return
            udp.transport.sendto(data, (peer.host, peer.port))
            return
        stream = self._streams.get(peer)
        if stream is not None and stream.transport is not None:
            stream.write(data)
            return
        loop = self._loop
        assert loop is not None
        task = self._connecting.get(peer)
        if task is None:
            task = loop.create_task(self._connect(peer))
            self._connecting[peer] = task
        task.add_done_callback(lambda t: self._after_connect(t, data, peer, key))

    async def _connect(self, peer: Peer) -> StreamConnection:
        loop = self._loop
        assert loop is not None
        try:
            ctx = client_tls_context(self._tls_verify) if peer.transport == "tls" else None
            _, stream = await asyncio.wait_for(
                loop.create_connection(
                    lambda: StreamConnection(peer.transport, self._hooks),
                    peer.host,
                    peer.port,
                    ssl=ctx,
                ),
                timeout=self._layer.config.t1 * 64,
            )
            await stream.ready
            # Register under the address we dialled too, which is what later sends look up.
            self._streams[peer] = stream
            return stream
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            raise TransportError(f"cannot connect to {peer}: {exc}") from exc
        finally:
            self._connecting.pop(peer, None)

    def _after_connect(
        self, task: asyncio.Task[StreamConnection], data: bytes, peer: Peer, key: Any
    ) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            error = exc if isinstance(exc, TransportError) else TransportError(str(exc))
            self._transport_failed(key, error)
            return
        task.result().write(data)

    def _transport_failed(self, key: Any, error: TransportError) -> None:
        log.info("sip_transport_failed", error=str(error))
        if key is None:
            return
        self._run(self._layer.transport_error(key, error, self._now()))

    # --- timers --------------------------------------------------------------------------------

    def _now(self) -> float:
        instant = self._instant
        if instant is not None:
            return instant
        loop = self._loop
        return loop.time() if loop is not None else 0.0

    def _arm_timer(self) -> None:
        deadline = self._layer.next_deadline()
        armed = self._timer_at
        if armed is not None and (deadline is None or armed <= deadline):
            # The armed timer fires no later than needed; when it fires early it finds nothing
            # due and re-arms. Cheaper than re-arming each time the earliest deadline moves
            # out, which it does with every answered transaction.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self._loop is not None:
            # Late by the slack: every deadline due by then fires in the same wake-up.
            when = deadline + self._layer.config.slack
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._run(self._layer.handle_timer(self._now()))

    def _timers_due(self, now: float) -> None:
        """Fire the timers due by ``now`` in a pass awake for a datagram anyway.

        The loop timer is armed ``slack`` after the earliest deadline, so that the deadlines
        due by then fire in one wake-up; under steady traffic a datagram comes in that window
        (Timer J of the transactions answered 32 s before falls due all the time), and firing
        them there, once the deadline is half the slack old, spares that wake-up. The loop
        timer moves to the next deadline, in _run."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None
        self._run(self._layer.handle_timer(now))

    async def _sweep_idle(self) -> None:
        """Close stream connections idle longer than the limit (read-side idle limit)."""
        limit = self.limits.idle_timeout
        while True:
            await asyncio.sleep(min(limit, 30.0))
            cutoff = self._now() - limit
            for stream in list(self._streams.values()):
                if stream.last_used < cutoff and stream.transport is not None:
                    log.debug("sip_stream_idle_closed", peer=str(stream.peer))
                    stream.transport.close()


def _call_id(message: SipMessage) -> str | None:
    try:
        return message.call_id
    except PeerError:
        return None


__all__ = [
    "ALLOW",
    "ANSWERED_METHODS",
    "CALL_ID_MARK",
    "TAG_MARK",
    "Admission",
    "Endpoint",
    "EndpointLimits",
    "Final",
    "FinalHandler",
    "IncomingRequest",
    "RequestHandler",
    "RequestTemplate",
    "Stats",
    "make_request",
    "parse_listen",
    "peer_for_uri",
]
