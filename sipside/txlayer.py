"""The transaction layer: owns every non-INVITE transaction, matches messages to them (sans-IO).

``TransactionLayer`` is what the endpoint talks to. Requests go out through ``send_request``;
every parsed message from the network goes to ``receive``; the application answers through
``send_response``; the endpoint re-arms one timer at ``next_deadline()`` and calls
``handle_timer``. Each call returns a list of effects (``sipside.transaction``). Timers live in a
single heap with lazy deletion, so a tick costs O(log n) per due transaction and nothing for the
others; terminated transactions are forgotten at once.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools

from sipside.errors import LocalError, PeerError, TransportError
from sipside.headers import Via, remember_via
from sipside.message import SipMessage, SipRequest, SipResponse, make_response, new_tag
from sipside.peer import Peer
from sipside.timers import TimerConfig
from sipside.transaction import (
    AnyServerKey,
    ClientKey,
    ClientTransaction,
    DeliverRequest,
    DeliverResponse,
    Discarded,
    Effect,
    Failed,
    LegacyServerKey,
    ServerKey,
    ServerTransaction,
    Stray,
    Terminated,
    TransactionKey,
    Transmit,
)

__all__ = [
    "MAGIC_COOKIE",
    "AnyServerKey",
    "ClientKey",
    "DeliverRequest",
    "DeliverResponse",
    "Discarded",
    "Effect",
    "Failed",
    "LegacyServerKey",
    "ServerKey",
    "Stray",
    "Terminated",
    "TransactionKey",
    "TransactionLayer",
    "Transmit",
]

# RFC 3261 8.1.1.7: branches of RFC 3261 elements start with this; others are RFC 2543 peers.
MAGIC_COOKIE = "z9hG4bK"

# RFC 3261 8.2.2.2: From tag, Call-ID, CSeq number and method of a request without To tag.
_MergeKey = tuple[str | None, str, int, str]
_Transaction = ClientTransaction | ServerTransaction


class TransactionLayer:
    """All client and server transactions of one endpoint, keyed by our own hashable keys."""

    def __init__(self, config: TimerConfig | None = None, *, auto_trying: bool = True) -> None:
        self._config = config if config is not None else TimerConfig()
        self._auto_trying = auto_trying
        self._clients: dict[ClientKey, ClientTransaction] = {}
        self._servers: dict[AnyServerKey, ServerTransaction] = {}
        self._merge: dict[_MergeKey, AnyServerKey] = {}
        self._merge_of: dict[AnyServerKey, _MergeKey] = {}
        # (deadline, tie-breaker, key); entries go stale when a deadline moves and are skipped.
        self._heap: list[tuple[float, int, TransactionKey]] = []
        self._seq = itertools.count()
        # next_deadline() remembered while no transaction's deadline moved in a way that could
        # change it; the endpoint asks after every batch of effects.
        self._next: float | None = None
        self._next_known = False
        # New server transactions received with answer_first whose deadline is not in the heap
        # yet: scheduled when answered, or by whatever next reads or fires the timers
        # (next_deadline, handle_timer, transport_error), whichever comes first.
        self._unscheduled: dict[AnyServerKey, ServerTransaction] = {}

    @property
    def config(self) -> TimerConfig:
        """The timer values every transaction of this layer uses."""
        return self._config

    @property
    def client_count(self) -> int:
        """Live client transactions (for metrics)."""
        return len(self._clients)

    @property
    def server_count(self) -> int:
        """Live server transactions (for metrics)."""
        return len(self._servers)

    @property
    def scheduled_timers(self) -> int:
        """Timer heap entries, stale ones included (for metrics and leak tests)."""
        return len(self._heap)

    def __contains__(self, key: object) -> bool:
        return key in self._clients or key in self._servers

    # --- outgoing requests ---------------------------------------------------------------------

    def send_request(
        self, request: SipRequest, peer: Peer, now: float
    ) -> tuple[ClientKey, list[Effect]]:
        """Start a client transaction; the request must carry a top Via with a fresh branch."""
        if request.method in ("INVITE", "ACK"):
            raise LocalError(f"{request.method} transactions are not supported")
        top = _top_via(request)
        branch = top.branch if top is not None else None
        return self.send_written(ClientKey(branch or "", request.method), request, peer, now)

    def send_written(
        self, key: ClientKey, request: SipRequest | bytes, peer: Peer, now: float
    ) -> tuple[ClientKey, list[Effect]]:
        """:meth:`send_request` of a request already written out (``request`` its bytes, whose
        top Via carries ``key.branch``): one that the sender wrote from a template."""
        if not key.branch.startswith(MAGIC_COOKIE):
            # RFC 3261 8.1.1.7: our requests always carry a cookie branch in a top Via.
            raise LocalError(f"request without a z9hG4bK branch in its top Via: {key.branch!r}")
        if key in self._clients:
            raise LocalError(f"branch reused by a live client transaction: {key}")
        tx = ClientTransaction(key, request, peer, self._config)
        effects = tx.start(now)
        self._clients[key] = tx
        self._settle(tx, None)
        return key, effects

    # --- incoming messages ---------------------------------------------------------------------

    def receive(
        self, message: SipMessage, source: Peer, now: float, *, answer_first: bool = False
    ) -> list[Effect]:
        """Match a message from ``source`` to its transaction, or create a server transaction.

        Raises PeerError for a request that lacks what transactions are keyed on (Via, Call-ID,
        CSeq); the caller answers or drops it. Unusable responses become Stray effects.

        ``answer_first``: the caller hands a new request to an application that usually answers
        it at once, before the timers are read again (the endpoint). The new transaction's
        first deadline then goes into the timer heap only if it is still unanswered when they
        are: an answered one would leave a stale entry behind, and moving it would make
        ``next_deadline`` walk the heap. Timers fire the same either way.
        """
        if isinstance(message, SipResponse):
            return self._receive_response(message, source, now)
        return self._receive_request(message, source, now, answer_first)

    def _receive_response(self, response: SipResponse, source: Peer, now: float) -> list[Effect]:
        try:
            top = _top_via(response)
            method = response.cseq[1]
        except PeerError as exc:
            return [Stray(response, source, f"unusable response: {exc}")]
        branch = top.branch if top is not None else None
        if branch is None:
            return [Stray(response, source, "response without a Via branch")]
        # RFC 3261 17.1.3: a response matches by the top Via branch and the CSeq method.
        tx = self._clients.get(ClientKey(branch, method))
        if tx is None:
            # RFC 3261 17.1.3 / 18.1.2: a response matching no transaction is dropped.
            return [Stray(response, source, "no matching client transaction")]
        before = tx.next_deadline()
        effects = tx.receive_response(response, now)
        self._settle(tx, before)
        return effects

    def _receive_request(
        self, request: SipRequest, source: Peer, now: float, answer_first: bool
    ) -> list[Effect]:
        if request.method == "ACK":
            # We never answer INVITE, so an ACK can only be stray (RFC 3261 17.2.3 would match
            # it to an INVITE server transaction); it gets no transaction and no response.
            return [Stray(request, source, "ACK without an INVITE transaction")]
        top = request.top_via
        if top is None:
            # RFC 3261 8.1.1.7: Via is mandatory; without it no response can be routed.
            raise PeerError(400, "Bad Request", "missing Via header")
        key = _server_key(request, top)
        tx = self._servers.get(key)
        if tx is not None:
            # RFC 3261 17.2.3: a retransmission; the transaction re-sends its last response and
            # the application does not see the request again.
            return tx.receive_request(now)
        merge_key: _MergeKey | None = None
        if request.to_tag is None:
            number, method = request.cseq
            merge_key = (request.from_tag, request.call_id, number, method)
        request, reply_to = _stamp_via(request, top, source)
        tx = ServerTransaction(
            key, request, reply_to, self._config, now, auto_trying=self._auto_trying
        )
        self._servers[key] = tx
        if merge_key is not None:
            original = self._merge.get(merge_key)
            if original is not None:
                # RFC 3261 8.2.2.2: same From tag, Call-ID and CSeq as a request in an ongoing
                # transaction but a different transaction: a merged request (it forked and
                # came back). Answer 482 through its own transaction, so retransmissions of it
                # get the cached 482, and do not deliver it.
                response = make_response(request, 482, to_tag=new_tag())
                effects = tx.send_response(response, now)
                self._settle(tx, None)
                reason = f"merged request (RFC 3261 8.2.2.2), answered 482; first was {original}"
                return [Stray(request, source, reason), *effects]
            self._merge[merge_key] = key
            self._merge_of[key] = merge_key
        if answer_first:
            self._unscheduled[key] = tx
        else:
            self._settle(tx, None)
        return [DeliverRequest(key, request, source)]

    # --- application answers, timers, transport failures --------------------------------------

    def send_response(self, key: AnyServerKey, response: SipResponse, now: float) -> list[Effect]:
        """Answer the request of server transaction ``key``; the response goes where RFC 3261
        18.2.2 says. Raises LocalError for responses RFC 4320 forbids (408, 1xx but 100)."""
        tx = self._servers.get(key)
        if tx is None:
            # Terminated already (the 64*T1 guard, or a transport error): the client is gone.
            return [Discarded(key, response, "no such server transaction")]
        unscheduled = key in self._unscheduled
        before = None if unscheduled else tx.next_deadline()
        effects = tx.send_response(response, now)  # may raise: then it stays unscheduled
        if unscheduled:
            del self._unscheduled[key]
        self._settle(tx, before)
        return effects

    def handle_timer(self, now: float) -> list[Effect]:
        """Fire every timer due at ``now``."""
        self._schedule_new()
        heap = self._heap
        effects: list[Effect] = []
        self._next_known = False
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            tx = self._lookup(key)
            if tx is None or tx.next_deadline() != deadline:
                continue  # stale: the transaction moved on or is gone
            effects.extend(tx.handle_timer(now))
            # Passing the popped deadline as "before" means an unchanged deadline is not pushed
            # again, so this loop always ends.
            self._settle(tx, deadline)
        return effects

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` must be called, or None when nothing is pending."""
        if self._unscheduled:
            self._schedule_new()
        if self._next_known:
            return self._next
        heap = self._heap
        found: float | None = None
        while heap:
            deadline, _, key = heap[0]
            tx = self._lookup(key)
            if tx is not None and tx.next_deadline() == deadline:
                found = deadline
                break
            heapq.heappop(heap)
        self._next, self._next_known = found, True
        return found

    def transport_error(
        self, key: TransactionKey, error: TransportError, now: float
    ) -> list[Effect]:
        """Sending a Transmit of transaction ``key`` failed (RFC 3261 17.1.4, 17.2.4)."""
        self._schedule_new()
        tx = self._lookup(key)
        if tx is None:
            return []
        before = tx.next_deadline()
        effects = tx.transport_error(error, now)
        self._settle(tx, before)
        return effects

    # --- bookkeeping -----------------------------------------------------------------------------

    def _schedule_new(self) -> None:
        """Put the deadlines of the new server transactions not answered yet in the heap."""
        unscheduled = self._unscheduled
        if unscheduled:
            for tx in unscheduled.values():
                self._settle(tx, None)
            unscheduled.clear()

    def _lookup(self, key: TransactionKey) -> _Transaction | None:
        if isinstance(key, ClientKey):
            return self._clients.get(key)
        return self._servers.get(key)

    def _settle(self, tx: _Transaction, before: float | None) -> None:
        """Forget a terminated transaction, or schedule its new deadline if it moved.

        ``before`` is the transaction's deadline before the change (None for a new one).
        """
        if tx.terminated:
            self._next_known = False  # its deadline may have been the earliest
            if isinstance(tx, ClientTransaction):
                del self._clients[tx.key]
            else:
                del self._servers[tx.key]
                merge_key = self._merge_of.pop(tx.key, None)
                if merge_key is not None and self._merge.get(merge_key) == tx.key:
                    del self._merge[merge_key]
            return
        deadline = tx.next_deadline()
        if deadline == before:
            return
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, next(self._seq), tx.key))
        if self._next_known:
            known = self._next
            if before is not None and (known is None or before <= known):
                self._next_known = False  # the earliest deadline may just have moved away
            elif deadline is not None and (known is None or deadline < known):
                self._next = deadline


def _top_via(message: SipMessage) -> Via | None:
    """The first Via value, parsing no other (the hot path needs only this one)."""
    return message.top_via


def _server_key(request: SipRequest, top: Via) -> AnyServerKey:
    """The key of the server transaction a request belongs to (RFC 3261 17.2.3)."""
    branch = top.branch
    if branch is not None and branch.startswith(MAGIC_COOKIE):
        # RFC 3261 17.2.3: branch, sent-by and method identify the transaction.
        return ServerKey(branch, top.host.lower(), top.port, request.method)
    # RFC 3261 17.2.3: RFC 2543 fallback on Request-URI, To tag, From tag, Call-ID, CSeq, top Via.
    number, method = request.cseq
    return LegacyServerKey(
        request.uri, request.to_tag, request.from_tag, request.call_id, number, method, str(top)
    )


def _same_host(sent_by: str, address: str) -> bool:
    host = sent_by.strip("[]")
    if host.lower() == address.lower():
        return True
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(address)
    except ValueError:
        return False  # a host name never equals the IP literal a packet came from


def _stamp_via(request: SipRequest, top: Via, source: Peer) -> tuple[SipRequest, Peer]:
    """Add received/rport to the top Via and work out where responses go.

    RFC 3261 18.2.1: received is added when sent-by differs from the source address. RFC 3581
    section 4: an rport parameter is filled with the source port, and received is then added
    even if it equals sent-by. A received or rport value the peer wrote itself is overwritten,
    so responses can never be steered to a third party.
    """
    has_rport = has_received = False
    params: list[tuple[str, str | None]] = []  # the others, kept in order
    for param in top.params:
        lname = param[0].lower()
        if lname == "rport":
            has_rport = True
        elif lname == "received":
            has_received = True
        else:
            params.append(param)
    if has_rport or has_received or not _same_host(top.host, source.host):
        params.append(("received", source.host))
        if has_rport:
            params.append(("rport", str(source.port)))
        top = Via(top.transport, top.host, top.port, tuple(params))
        request = _replace_top_via(request, top)
    if source.reliable:
        # RFC 3261 18.2.2: over a reliable transport the response goes back on the connection
        # the request came in on.
        return request, source
    # RFC 3261 18.2.2 with RFC 3581 4: over UDP, to the received address (the source) and to
    # the source port if rport was asked for, else to the sent-by port (default 5060).
    port = source.port if has_rport else (top.port or 5060)
    return request, source if port == source.port else Peer(source.transport, source.host, port)


def _replace_top_via(request: SipRequest, top: Via) -> SipRequest:
    """A copy with the first Via value rewritten in place; other headers and order untouched."""
    text = str(top)
    # the Via was parsed and only gained received/rport: parsing the new text gives it back
    remember_via(text, top)
    return request.with_top_via(text)
