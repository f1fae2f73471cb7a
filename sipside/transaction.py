"""RFC 3261 non-INVITE client and server transactions as pure state machines (sans-IO).

The client follows RFC 3261 17.1.2 (figure 6), the server 17.2.2 (figure 8), both amended by
RFC 4320 (no 408 to a non-INVITE request, no early 100 Trying over UDP). Every input takes ``now``
and returns a list of effects; ``next_deadline()`` says when ``handle_timer`` is due next. Nothing
here reads a clock, touches a socket or schedules a task: ``sipside.txlayer`` owns the
transactions and the endpoint does the I/O.

The gateway does not do INVITE, so there are no INVITE transactions (timers A-D, G-I).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sipside.errors import LocalError, TransactionTimeout, TransportError
from sipside.fastpath import fast_frozen_init
from sipside.message import SipMessage, SipRequest, SipResponse, make_response
from sipside.peer import Peer
from sipside.timers import TimerConfig

# --- transaction keys: our own small hashable values, never library objects (STYLE 5) ---------


@dataclass(frozen=True, slots=True, init=False, eq=False)
class ClientKey:
    """A client transaction: top Via branch plus CSeq method (RFC 3261 17.1.3)."""

    branch: str
    method: str

    # The methods of the hot classes here are written out (not generated) so that compiled
    # they are native: see fast_frozen_init.
    def __init__(self, branch: str, method: str) -> None:
        self.branch = branch  # type: ignore[misc]
        self.method = method  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClientKey):
            return NotImplemented
        return self.branch == other.branch and self.method == other.method

    def __hash__(self) -> int:
        return hash((self.branch, self.method))


fast_frozen_init(ClientKey)


@dataclass(frozen=True, slots=True, init=False, eq=False)
class ServerKey:
    """A server transaction of an RFC 3261 peer: branch, top Via sent-by, method (17.2.3)."""

    branch: str
    host: str
    port: int | None
    method: str

    def __init__(self, branch: str, host: str, port: int | None, method: str) -> None:
        self.branch = branch  # type: ignore[misc]
        self.host = host  # type: ignore[misc]
        self.port = port  # type: ignore[misc]
        self.method = method  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServerKey):
            return NotImplemented
        return (
            self.branch == other.branch
            and self.method == other.method
            and self.port == other.port
            and self.host == other.host
        )

    def __hash__(self) -> int:
        return hash((self.branch, self.host, self.port, self.method))


fast_frozen_init(ServerKey)


@dataclass(frozen=True, slots=True)
class LegacyServerKey:
    """A server transaction of an RFC 2543 peer (no magic cookie): the fallback of 17.2.3."""

    uri: str
    to_tag: str | None
    from_tag: str | None
    call_id: str
    cseq: int
    method: str
    via: str


fast_frozen_init(LegacyServerKey)


TransactionKey = ClientKey | ServerKey | LegacyServerKey
AnyServerKey = ServerKey | LegacyServerKey

# --- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
class Transmit:
    """Send ``data`` to ``peer``; report a failure with ``transport_error(key, ...)``."""

    data: bytes
    peer: Peer
    key: TransactionKey

    def __init__(self, data: bytes, peer: Peer, key: TransactionKey) -> None:
        self.data = data  # type: ignore[misc]
        self.peer = peer  # type: ignore[misc]
        self.key = key  # type: ignore[misc]


fast_frozen_init(Transmit)


@dataclass(frozen=True, slots=True, init=False)
class DeliverResponse:
    """A response for the application that started the client transaction ``key``."""

    key: ClientKey
    response: SipResponse

    def __init__(self, key: ClientKey, response: SipResponse) -> None:
        self.key = key  # type: ignore[misc]
        self.response = response  # type: ignore[misc]


fast_frozen_init(DeliverResponse)


@dataclass(frozen=True, slots=True, init=False)
class DeliverRequest:
    """A new request for the application; answer it with ``send_response(key, ...)``."""

    key: AnyServerKey
    request: SipRequest
    source: Peer

    def __init__(self, key: AnyServerKey, request: SipRequest, source: Peer) -> None:
        self.key = key  # type: ignore[misc]
        self.request = request  # type: ignore[misc]
        self.source = source  # type: ignore[misc]


fast_frozen_init(DeliverRequest)


@dataclass(frozen=True, slots=True)
class Failed:
    """The transaction ended without success: TransactionTimeout or TransportError."""

    key: TransactionKey
    error: TransactionTimeout | TransportError


fast_frozen_init(Failed)


@dataclass(frozen=True, slots=True, init=False)
class Terminated:
    """The transaction is over; its key is forgotten."""

    key: TransactionKey

    def __init__(self, key: TransactionKey) -> None:
        self.key = key  # type: ignore[misc]


fast_frozen_init(Terminated)


@dataclass(frozen=True, slots=True)
class Discarded:
    """A response the application asked to send was not sent (too late, or too early)."""

    key: TransactionKey
    response: SipResponse
    reason: str


fast_frozen_init(Discarded)


@dataclass(frozen=True, slots=True)
class Stray:
    """An incoming message that matched no transaction and was dropped; for logging only."""

    message: SipMessage
    source: Peer
    reason: str


fast_frozen_init(Stray)


Effect = Transmit | DeliverResponse | DeliverRequest | Failed | Terminated | Discarded | Stray

# --- client transaction (RFC 3261 17.1.2, figure 6) --------------------------------------------


class ClientState(enum.Enum):
    """States of the non-INVITE client transaction (RFC 3261 figure 6)."""

    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


class ClientTransaction:
    """A non-INVITE client transaction: sends and retransmits one request, delivers responses."""

    __slots__ = ("_config", "_data", "_e_at", "_e_interval", "_end_at", "key", "peer", "state")

    def __init__(
        self, key: ClientKey, request: SipRequest | bytes, peer: Peer, config: TimerConfig
    ) -> None:
        self.key = key
        self.peer = peer
        self.state = ClientState.TRYING
        self._config = config
        # Serialised once: every retransmission sends the very same bytes (RFC 3261 17.1.2.2).
        self._data = request if isinstance(request, bytes) else bytes(request)
        self._e_at: float | None = None
        self._e_interval = 0.0
        # Timer F while Trying/Proceeding, Timer K while Completed; None until start().
        self._end_at: float | None = None

    def start(self, now: float) -> list[Effect]:
        """Send the request for the first time and arm Timers E and F."""
        if self._end_at is not None or self.state is not ClientState.TRYING:
            raise LocalError(f"client transaction {self.key} started twice")
        # RFC 3261 17.1.2.2: entering Trying, Timer F is set to 64*T1 ...
        self._end_at = now + self._config.timer_f
        if not self.peer.reliable:
            # ... and, for an unreliable transport, Timer E to T1.
            self._e_interval = self._config.timer_e()
            self._e_at = now + self._e_interval
        return [Transmit(self._data, self.peer, self.key)]

    def receive_response(self, response: SipResponse, now: float) -> list[Effect]:
        """A response matched to this transaction (RFC 3261 17.1.3) arrived."""
        if self._end_at is None and self.state is ClientState.TRYING:
            raise LocalError(f"client transaction {self.key} got a response before start()")
        match self.state:
            case ClientState.TRYING | ClientState.PROCEEDING if response.status < 200:
                # RFC 3261 17.1.2.2: a provisional response moves Trying to Proceeding and is
                # passed to the TU; in Proceeding further provisionals also go to the TU.
                self.state = ClientState.PROCEEDING
                return [DeliverResponse(self.key, response)]
            case ClientState.TRYING | ClientState.PROCEEDING:
                # RFC 3261 17.1.2.2: a final response in Trying or Proceeding goes to the TU and
                # the transaction enters Completed, with Timer K = T4 (unreliable) or 0.
                self.state = ClientState.COMPLETED
                self._e_at = None
                effects: list[Effect] = [DeliverResponse(self.key, response)]
                timer_k = self._config.timer_k(self.peer.reliable)
                if timer_k == 0:
                    effects.extend(self._terminate())
                else:
                    self._end_at = now + timer_k
                return effects
            case ClientState.COMPLETED | ClientState.TERMINATED:
                # RFC 3261 17.1.2.2: Completed exists to absorb retransmitted final responses;
                # the TU sees exactly one final response.
                return []
        raise AssertionError(self.state)  # pragma: no cover

    def handle_timer(self, now: float) -> list[Effect]:
        """Fire whichever of Timers E, F and K are due at ``now``."""
        end_at = self._end_at
        if end_at is None or self.state is ClientState.TERMINATED:
            return []
        if self.state is ClientState.COMPLETED:
            # RFC 3261 17.1.2.2: Timer K fires in Completed -> Terminated.
            return self._terminate() if now >= end_at else []
        if now >= end_at:
            # RFC 3261 17.1.2.2: Timer F fires in Trying or Proceeding -> inform the TU of the
            # timeout and terminate. No 408 is made up: the TU gets Failed (RFC 4320 4.2 spirit).
            error = TransactionTimeout(f"no final response within {self._config.timer_f:g} s")
            return [Failed(self.key, error), *self._terminate()]
        e_at = self._e_at
        if e_at is None or now < e_at:
            return []
        if self.state is ClientState.TRYING:
            # RFC 3261 17.1.2.2: Timer E fires in Trying -> retransmit, E = MIN(2*E, T2).
            interval = self._config.timer_e(self._e_interval)
        else:
            # RFC 3261 17.1.2.2: Timer E fires in Proceeding -> retransmit, E = T2.
            interval = self._config.t2
        self._e_interval = interval
        e_at += interval
        if e_at <= now:
            # The caller is late: send once and rearm from now rather than in a burst.
            e_at = now + interval
        self._e_at = e_at
        return [Transmit(self._data, self.peer, self.key)]

    def transport_error(self, error: TransportError, now: float) -> list[Effect]:
        """The transport could not send the request (RFC 3261 17.1.4)."""
        if self.state in (ClientState.TRYING, ClientState.PROCEEDING):
            # RFC 3261 17.1.4: inform the TU of the failure and go to Terminated.
            return [Failed(self.key, error), *self._terminate()]
        return []

    @property
    def terminated(self) -> bool:
        """True once the transaction is over and may be forgotten."""
        return self.state is ClientState.TERMINATED

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must be called next, or None if no timer runs."""
        if self.state is ClientState.TERMINATED:
            return None
        e_at = self._e_at
        if e_at is not None and self.state is not ClientState.COMPLETED:
            end_at = self._end_at
            return e_at if end_at is None or e_at < end_at else end_at
        return self._end_at

    def _terminate(self) -> list[Effect]:
        self.state = ClientState.TERMINATED
        self._e_at = None
        self._end_at = None
        return [Terminated(self.key)]


# --- server transaction (RFC 3261 17.2.2, figure 8) --------------------------------------------


class ServerState(enum.Enum):
    """States of the non-INVITE server transaction (RFC 3261 figure 8)."""

    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


class ServerTransaction:
    """A non-INVITE server transaction: absorbs retransmitted requests, caches the response.

    ``peer`` is where responses go (RFC 3261 18.2.2), already resolved by the caller. With
    ``auto_trying`` and an unreliable transport, an unanswered request gets one 100 Trying at
    the earliest time RFC 4320 4.1 allows. If the application never answers, the transaction
    gives up after 64*T1 (the client's Timer F has fired by then) with Failed and Terminated.
    """

    __slots__ = (
        "_auto_trying",
        "_config",
        "_end_at",
        "_last",
        "_request",
        "_trying_at",
        "key",
        "peer",
        "state",
    )

    def __init__(
        self,
        key: AnyServerKey,
        request: SipRequest,
        peer: Peer,
        config: TimerConfig,
        now: float,
        *,
        auto_trying: bool = True,
    ) -> None:
        # RFC 3261 17.2.2: the transaction is created in Trying by the request that starts it.
        self.key = key
        self.peer = peer
        self.state = ServerState.TRYING
        self._config = config
        self._request: SipRequest | None = request  # kept only until the final response
        self._last: bytes | None = None  # the response re-sent to retransmissions
        # RFC 4320 4.1: the earliest time a 100 may go out over an unreliable transport.
        self._trying_at = now + config.trying_delay
        self._auto_trying = auto_trying and not peer.reliable
        # Not an RFC 3261 timer: a guard so an unanswered request cannot leak.
        self._end_at = now + config.timer_f

    def receive_request(self, now: float) -> list[Effect]:
        """A retransmission of the request arrived (matched by RFC 3261 17.2.3)."""
        match self.state:
            case ServerState.TRYING | ServerState.TERMINATED:
                # RFC 3261 17.2.2: retransmissions in Trying are discarded; the TU has it.
                return []
            case ServerState.PROCEEDING | ServerState.COMPLETED:
                # RFC 3261 17.2.2: in Proceeding the last provisional, in Completed the final
                # response is passed to the transport again.
                assert self._last is not None
                return [Transmit(self._last, self.peer, self.key)]
        raise AssertionError(self.state)  # pragma: no cover

    def send_response(self, response: SipResponse, now: float) -> list[Effect]:
        """The application answers; raises LocalError for responses RFC 4320 forbids."""
        status = response.status
        if not 100 <= status <= 699:
            raise LocalError(f"invalid response status {status}")
        if status == 408:
            # RFC 4320 4.2: a transaction-stateful element MUST NOT send 408 to a non-INVITE
            # request; the client's Timer F has the same effect. To let a request time out,
            # do not answer it: the transaction is forgotten after 64*T1.
            raise LocalError("408 to a non-INVITE request is forbidden (RFC 4320 4.2)")
        if 100 < status < 200:
            # RFC 4320 4.1: no provisional other than 100 to a non-INVITE request.
            raise LocalError(f"provisional {status} to a non-INVITE request (RFC 4320 4.1)")
        match self.state:
            case ServerState.COMPLETED | ServerState.TERMINATED:
                # RFC 3261 17.2.2: further final responses in Completed MUST be discarded.
                return [Discarded(self.key, response, f"transaction {self.state.value}")]
            case ServerState.TRYING | ServerState.PROCEEDING if status == 100:
                if not self.peer.reliable and now < self._trying_at:
                    # RFC 4320 4.1: no 100 over UDP before the client's Timer E reaches T2.
                    return [Discarded(self.key, response, "100 too early (RFC 4320 4.1)")]
                return self._send_provisional(bytes(response))
            case ServerState.TRYING | ServerState.PROCEEDING:
                # RFC 3261 17.2.2: a final response enters Completed; Timer J = 64*T1 over
                # unreliable transports, 0 (i.e. Terminated at once) over reliable ones.
                self.state = ServerState.COMPLETED
                self._request = None
                data = self._last = bytes(response)
                effects: list[Effect] = [Transmit(data, self.peer, self.key)]
                timer_j = self._config.timer_j(self.peer.reliable)
                if timer_j == 0:
                    effects.extend(self._terminate())
                else:
                    self._end_at = now + timer_j
                return effects
        raise AssertionError(self.state)  # pragma: no cover

    def handle_timer(self, now: float) -> list[Effect]:
        """Fire Timer J, the automatic 100 or the unanswered-request guard, if due."""
        match self.state:
            case ServerState.COMPLETED if now >= self._end_at:
                # RFC 3261 17.2.2: Timer J fires in Completed -> Terminated.
                return self._terminate()
            case ServerState.TRYING | ServerState.PROCEEDING if now >= self._end_at:
                error = TransactionTimeout(
                    f"no response from the application within {self._config.timer_f:g} s"
                )
                return [Failed(self.key, error), *self._terminate()]
            case ServerState.TRYING if self._auto_trying and now >= self._trying_at:
                # RFC 4320 4.1: 100 Trying is allowed now that the client's Timer E is T2; it
                # stops the client's retransmissions from doubling up on a slow answer.
                assert self._request is not None
                return self._send_provisional(bytes(make_response(self._request, 100)))
        return []

    def transport_error(self, error: TransportError, now: float) -> list[Effect]:
        """The transport could not send a response (RFC 3261 17.2.4)."""
        if self.state is ServerState.TERMINATED:
            return []
        # RFC 3261 17.2.4: inform the TU of the failure and move to Terminated.
        return [Failed(self.key, error), *self._terminate()]

    @property
    def terminated(self) -> bool:
        """True once the transaction is over and may be forgotten."""
        return self.state is ServerState.TERMINATED

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must be called next, or None if no timer runs."""
        if self.state is ServerState.TERMINATED:
            return None
        if self.state is ServerState.TRYING and self._auto_trying:
            return min(self._trying_at, self._end_at)
        return self._end_at

    def _send_provisional(self, data: bytes) -> list[Effect]:
        # RFC 3261 17.2.2: a provisional from the TU moves Trying to Proceeding; in Proceeding
        # any further provisional is sent too, and the last one is re-sent to retransmissions.
        self.state = ServerState.PROCEEDING
        self._last = data
        return [Transmit(data, self.peer, self.key)]

    def _terminate(self) -> list[Effect]:
        self.state = ServerState.TERMINATED
        self._request = None
        self._last = None
        return [Terminated(self.key)]
