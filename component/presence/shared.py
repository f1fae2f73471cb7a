"""What the presence parts share (DESIGN 5): ports to the outside, reply routing, small helpers.

The presence core is split by who watches whom: ``presence_sipwatch`` (DESIGN 5.2),
``presence_xmppwatch`` (5.3) and ``presence_users`` (5.4), joined by ``presence.PresenceCore``.
They reach SIP, XMPP and the store only through the ports defined here, and route the outcome
of a request they sent back to its machine with a ``ReplyTo``.
"""

from __future__ import annotations

import base64
import enum
import heapq
import itertools
from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

from component.logs import get_logger
from component.ports import XmppPort
from component.store import ApprovalDirection, ApprovalState, JsonObject, StorePort
from component.values import Presence
from sipside import pidf
from sipside.dialog import DialogId, address_uri
from sipside.endpoint import peer_for_uri
from sipside.errors import LocalError
from sipside.message import SipRequest, SipResponse
from sipside.notifier import NotifierSnapshot
from sipside.peer import Peer
from sipside.subscription import SubscriberSnapshot

log = get_logger("component.presence")

__all__ = [
    "PIDF",
    "RESOURCE",
    "DeadlineHeap",
    "IncomingLike",
    "MachineKind",
    "ReplyTo",
    "is_approved",
    "peer_for",
    "send_presence",
    "snapshot_json",
]

PIDF = pidf.PIDF_CONTENT_TYPE  # sent bare: baresip refuses parameters (SERVERS.md)
RESOURCE = "sip"  # DESIGN 3.1: the resource of SIP users on XMPP


class MachineKind(enum.Enum):
    """Which of the core's machines a SIP transaction belongs to."""

    NOTIFIER = "notifier"
    SUBSCRIBER = "subscriber"


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """Where the outcome of a request the core sent goes back: machine kind, key, Call-ID."""

    kind: MachineKind
    key: DialogId | tuple[str, str]
    call_id: str


class SipPort(Protocol):
    """What the presence core needs of the SIP side (to be folded into ``component.ports``)."""

    def send_request(self, request: SipRequest, peer: Peer | None, reply: ReplyTo) -> None:
        """Send in a client transaction; report via ``on_sip_response`` / ``on_sip_timeout``."""
        ...

    def contact_for(self, transport: str) -> str:
        """Our Contact URI for ``transport``."""
        ...


class IncomingLike(Protocol):
    """An incoming SIP request to answer (``sipside.endpoint.IncomingRequest``)."""

    request: SipRequest
    source: Peer

    def send(self, response: SipResponse) -> None:
        """Send a final response."""
        ...


K = TypeVar("K", bound=Hashable)


class DeadlineHeap(Generic[K]):
    """The deadlines of many machines, earliest first: O(log n) to set, O(1) amortised to read.

    Each machine's current deadline is kept in a dict; the heap may hold stale entries for it
    (lazy invalidation, as ``sipside.txlayer`` does), skipped when they reach the top.
    """

    def __init__(self) -> None:
        self._current: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._seq = itertools.count()  # ties break by insertion, keys need not be ordered

    def __len__(self) -> int:
        return len(self._current)

    @property
    def entries(self) -> int:
        """Heap entries, stale ones included (for tests: the heap must not grow without end)."""
        return len(self._heap)

    def set(self, key: K, deadline: float | None) -> None:
        """``key``'s deadline is now ``deadline`` (None: it has none)."""
        if deadline is None:
            self._current.pop(key, None)
            return
        if self._current.get(key) == deadline:
            return
        self._current[key] = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), key))
        if len(self._heap) > 2 * len(self._current) + 64:
            # Mostly stale entries: rebuild so memory follows the live machines, not the churn.
            self._heap = [(t, next(self._seq), k) for k, t in self._current.items()]
            heapq.heapify(self._heap)

    def earliest(self) -> float | None:
        """The earliest deadline of any key, or None."""
        heap = self._heap
        while heap:
            deadline, _, key = heap[0]
            if self._current.get(key) == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float, limit: int | None = None) -> list[K]:
        """Remove and return the keys due at ``now``, earliest first (at most ``limit``).

        The caller runs each machine and ``set``s its new deadline.
        """
        due: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(due) < limit):
            deadline, _, key = heapq.heappop(heap)
            if self._current.get(key) == deadline:
                del self._current[key]
                due.append(key)
        return due


def send_presence(xmpp: XmppPort, presence: Presence) -> None:
    """Send ``presence`` on the XMPP link; a link that is down only costs a debug line."""
    if not xmpp.send_presence(presence):
        # Link down: the re-announce on link up (DESIGN 8) brings it across.
        log.debug("presence_not_sent", jid=presence.recipient, type=presence.type)


async def is_approved(
    store: StorePort, sip_jid: str, xmpp_jid: str, direction: ApprovalDirection
) -> bool:
    """True when the stored approval between the two JIDs, one way, is granted."""
    approval = await store.approval(sip_jid, xmpp_jid, direction)
    return approval is not None and approval.state is ApprovalState.APPROVED


def peer_for(request: SipRequest) -> Peer | None:
    """Where an in-dialog request goes: its first Route, else its remote target.

    A stock Kamailio does not relay an in-dialog request that carries no Route, so such
    requests go straight to the peer; an unroutable host name falls back to the proxy.
    """
    routes = request.header_values("Route")
    uri = address_uri(routes[0]) if routes else request.uri
    try:
        return peer_for_uri(uri)
    except LocalError:
        return None


def snapshot_json(snap: NotifierSnapshot | SubscriberSnapshot) -> JsonObject:
    """A machine's snapshot as the store keeps it: bytes as base64, tuples as lists (DESIGN 8)."""
    data: dict[str, Any] = asdict(snap)
    for name, value in data.items():
        if isinstance(value, bytes):
            data[name] = base64.b64encode(value).decode("ascii")
        elif isinstance(value, tuple):
            data[name] = list(value)
    return data
