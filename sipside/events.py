"""The RFC 6665 event framework pieces shared by the subscriber (``sipside.subscription``),
the notifier (``sipside.notifier``) and the publication (``sipside.publication``) cores.

``Event`` and ``Subscription-State`` header values, the Expires, Min-Expires and Retry-After
readings, the requests a subscriber or publisher has in flight (``OutgoingRequests``, with the
digest retry of a challenged one), the refresh, re-subscribe and restart timing, and the
effects every one of these cores returns:
``SendRequest`` (the caller runs a client transaction and reports its outcome back),
``SendResponse`` (answer the request just handled), ``StateChanged`` (subscriber: the state the
notifier reported, or its local end) and ``SubscriptionEnded`` (notifier: forget it).
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sipside.dialog import Dialog
from sipside.digest import AuthenticationError, DigestClient, retry_with_credentials
from sipside.errors import PeerError
from sipside.fastpath import fast_frozen_init
from sipside.message import SipRequest, SipResponse, make_response

Tag = TypeVar("Tag")


class SubscriptionState(enum.StrEnum):
    """Subscription-State values (RFC 6665 4.1.3)."""

    PENDING = "pending"
    ACTIVE = "active"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True, init=False)
class SubscriptionStateHeader:
    """A parsed ``Subscription-State`` header; unknown states are kept as ``state=None``."""

    state: SubscriptionState | None
    expires: int | None = None
    reason: str | None = None
    retry_after: int | None = None

    # Written out (not generated) so that compiled it is native (one per NOTIFY sent).
    def __init__(
        self,
        state: SubscriptionState | None,
        expires: int | None = None,
        reason: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.state = state  # type: ignore[misc]
        self.expires = expires  # type: ignore[misc]
        self.reason = reason  # type: ignore[misc]
        self.retry_after = retry_after  # type: ignore[misc]

    def __str__(self) -> str:
        text = self.state.value if self.state else "pending"
        if self.reason:
            text += f";reason={self.reason}"
        if self.expires is not None:
            text += f";expires={self.expires}"
        if self.retry_after is not None:
            text += f";retry-after={self.retry_after}"
        return text


fast_frozen_init(SubscriptionStateHeader)


def _params(value: str) -> tuple[str, dict[str, str]]:
    head, *rest = value.split(";")
    params: dict[str, str] = {}
    for item in rest:
        name, _, val = item.partition("=")
        params[name.strip().lower()] = val.strip().strip('"')
    return head.strip(), params


def _int_param(params: dict[str, str], name: str) -> int | None:
    if name not in params:
        return None
    try:
        number = int(params[name])
    except ValueError:
        raise PeerError(400, "Bad Request", f"bad {name} parameter {params[name]!r}") from None
    if number < 0:
        raise PeerError(400, "Bad Request", f"negative {name} parameter")
    return number


def parse_subscription_state(value: str) -> SubscriptionStateHeader:
    """Parse ``active;expires=60`` or ``terminated;reason=probation;retry-after=30``."""
    head, params = _params(value)
    if not head:
        raise PeerError(400, "Bad Request", "empty Subscription-State")
    try:
        state: SubscriptionState | None = SubscriptionState(head.lower())
    except ValueError:
        # RFC 6665 4.1.3: unknown substate values are extensions; the caller keeps its state.
        state = None
    return SubscriptionStateHeader(
        state=state,
        expires=_int_param(params, "expires"),
        reason=params.get("reason") or None,
        retry_after=_int_param(params, "retry-after"),
    )


@dataclass(frozen=True, slots=True)
class EventHeader:
    """An ``Event`` header: the package and its optional ``id`` (RFC 6665 8.2.1)."""

    package: str
    id: str | None = None

    def __str__(self) -> str:
        return self.package + (f";id={self.id}" if self.id else "")

    def matches(self, other: EventHeader) -> bool:
        """Same package (compared without case, lenient with old clients) and same id."""
        return self.package.lower() == other.package.lower() and self.id == other.id


# Event values seen, each parsed once: nearly every subscription says "presence", and each
# one kept its own EventHeader and package string (105 bytes per resumed subscription,
# bench.presence_resume). Bounded: values past the first few are parsed every time.
_EVENTS: dict[str, EventHeader] = {}
_MAX_EVENTS = 32


def parse_event(value: str | None) -> EventHeader:
    """Parse an ``Event`` header; a missing or empty one is a 489 (RFC 6665 8.3.2).

    Equal values give one shared (frozen) ``EventHeader``."""
    if value is not None and (known := _EVENTS.get(value)) is not None:
        return known
    if value is None or not value.split(";")[0].strip():
        raise PeerError(489, "Bad Event", "missing Event header")
    head, params = _params(value)
    event = EventHeader(head, params.get("id") or None)
    if len(_EVENTS) < _MAX_EVENTS:
        _EVENTS[value] = event
    return event


def refresh_delay(expires: float, offset: float = 0.0) -> float:
    """Seconds after a grant of ``expires`` seconds at which to refresh it.

    RFC 6665 4.1.2.2 leaves the time open; we take max(expires - 32, expires / 2), moved
    earlier by ``offset`` (caller-chosen jitter that spreads many refreshes), never earlier
    than a quarter of the interval so a large offset cannot cause a refresh storm.
    """
    base = max(expires - 32.0, expires / 2.0)
    return max(expires / 4.0, min(base, base - offset))


def resume_at(saved: float | None, now: float, spread: float) -> float:
    """When work saved for time ``saved`` is due after a restart at ``now``: its own time while
    still ahead, else ``now + spread`` (chosen per machine, so a restart does not do it all at
    once)."""
    if saved is None or saved <= now:
        return now + spread
    return saved


def resubscribe_delay(reason: str | None, retry_after: int | None) -> float | None:
    """When the subscriber may subscribe again after ``terminated`` (RFC 6665 4.1.3).

    ``None`` means "do not retry" (rejected, noresource, invariant).
    """
    # deactivated and timeout invite an immediate retry, probation and giveup a later one;
    # unknown reasons are treated like a missing one. Retry-After is honoured for all.
    if reason in ("rejected", "noresource", "invariant"):
        return None
    return float(retry_after or 0)


@dataclass(frozen=True, slots=True, init=False)
class SendRequest:
    """Send this request in a new client transaction; report its outcome back."""

    request: SipRequest

    def __init__(self, request: SipRequest) -> None:  # native when compiled: see fast_frozen_init
        self.request = request  # type: ignore[misc]


fast_frozen_init(SendRequest)


@dataclass(frozen=True, slots=True, init=False)
class SendResponse:
    """Answer the request just handled with this response."""

    response: SipResponse

    def __init__(self, response: SipResponse) -> None:  # native when compiled: see fast_frozen_init
        self.response = response  # type: ignore[misc]


fast_frozen_init(SendResponse)


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The subscription's state as the subscriber now sees it.

    ``status`` is the SIP status when the subscription ended on a failed request.
    """

    state: SubscriptionState
    reason: str | None = None
    body: bytes = b""
    content_type: str | None = None
    retry_after: int | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True, init=False)
class SubscriptionEnded:
    """Notifier side: the subscription is over; the application forgets it."""

    reason: str

    def __init__(self, reason: str) -> None:  # native when compiled: see fast_frozen_init
        self.reason = reason  # type: ignore[misc]


fast_frozen_init(SubscriptionEnded)


SubscriptionEffect = SendRequest | SendResponse | StateChanged | SubscriptionEnded


def expires_value(message: SipRequest | SipResponse, default: int) -> int:
    """The Expires header as seconds (``default`` when absent); malformed -> PeerError 400."""
    value = message.header("Expires")
    if value is None:
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise PeerError(400, "Bad Request", f"bad Expires {value!r}") from None
    if number < 0:
        raise PeerError(400, "Bad Request", "negative Expires")
    return number


def granted_expires(response: SipResponse, requested: int) -> int:
    """The seconds a 2xx grants; a missing or malformed Expires grants what we asked for."""
    try:
        return expires_value(response, requested)
    except PeerError:
        return requested


def min_expires_retry(response: SipResponse, requested: int) -> int | None:
    """After a 423 (RFC 3261 21.4.17), the Min-Expires to ask again with; None when the
    header is missing, malformed or no higher than ``requested`` (asking again is pointless)."""
    try:
        minimum = int((response.header("Min-Expires") or "").strip())
    except ValueError:
        return None
    return minimum if minimum > requested else None


def adopt_auth_retry(number: int, pending: Collection[int], local_cseq: int) -> bool:
    """Is a response with CSeq ``number`` the answer to a retry someone else sent for us?

    An endpoint that answers a 401/407 itself resends with CSeq + 1 (RFC 3261 22.2) and hands
    back that final response. The core then adopts the new number, so its next request in
    the dialog stays above it (RFC 3261 12.2.1.1).
    """
    return number not in pending and number - 1 in pending and number > local_cseq


_NO_RETRIES: frozenset[int] = frozenset()


class OutgoingRequests(Generic[Tag]):
    """The requests a subscriber or publisher has in flight, numbered by its dialog: each sent
    preauthorized, matched to its final response, and resent once with digest credentials
    when challenged (RFC 3261 22.2: a second challenge means the credentials are wrong).

    ``Tag`` is what the machine wants back with the answer (why it sent the request).
    """

    __slots__ = ("_digest", "_pending", "_retried", "dialog")

    def __init__(self, dialog: Dialog, digest: DigestClient | None) -> None:
        self.dialog = dialog
        self._digest = digest
        self._pending: dict[int, tuple[Tag, SipRequest]] = {}
        # The CSeqs of our digest retries: none almost always. All share the empty frozenset
        # until one is made (an empty set of each subscriber's own was 216 bytes, tracemalloc).
        self._retried: frozenset[int] = _NO_RETRIES

    def send(
        self, method: str, tag: Tag, headers: list[tuple[str, str]], body: bytes = b""
    ) -> SendRequest:
        """The next request of the dialog, with credentials for the realms seen so far."""
        if self._digest is not None:
            headers += self._digest.preauthorize(method, self.dialog.remote_target, body)
        self.dialog, request = self.dialog.request(method, headers=headers, body=body)
        self._pending[request.cseq[0]] = (tag, request)
        return SendRequest(request)

    def awaiting(self, tag: Tag | None = None) -> bool:
        """Is a request (sent for ``tag``, or any) waiting for its final response?"""
        return any(tag is None or sent is tag for sent, _ in self._pending.values())

    def answer(self, response: SipResponse) -> Tag | SendRequest | None:
        """The tag of the request a final ``response`` answers (taken off the list), the
        retry to send when it is a challenge we can answer, or None when it answers nothing
        of ours (or is provisional)."""
        number, method = response.cseq
        if adopt_auth_retry(number, self._pending.keys(), self.dialog.local_cseq):
            self._pending[number] = self._pending.pop(number - 1)
            self.dialog = self.dialog.with_local_cseq(number)
        sent = self._pending.get(number)
        if sent is None or sent[1].method != method or response.status < 200:
            return None
        del self._pending[number]
        tag, request = sent
        if response.status in (401, 407):
            retry = self._with_credentials(request, response)
            if retry is not None:
                self._pending[retry.cseq[0]] = (tag, retry)
                return SendRequest(retry)
        return tag

    def timed_out(self, cseq: int) -> Tag | None:
        """The tag of the request with CSeq ``cseq`` that got no final response, if ours."""
        sent = self._pending.pop(cseq, None)
        return None if sent is None else sent[0]

    def _with_credentials(self, request: SipRequest, response: SipResponse) -> SipRequest | None:
        # Numbered as the dialog's next CSeq; None without digest, for a challenge we cannot
        # answer, or when ``request`` was already such a retry.
        if self._digest is None or request.cseq[0] in self._retried:
            return None
        number = self.dialog.local_cseq + 1
        try:
            retry = retry_with_credentials(self._digest, request, response, number)
        except AuthenticationError:
            return None
        self._retried |= {number}
        self.dialog = self.dialog.with_local_cseq(number)
        return retry


def retry_after_value(response: SipResponse) -> int | None:
    """The seconds of a Retry-After header (comment and parameters ignored), else None."""
    value = response.header("Retry-After")
    if value is None:
        return None
    try:
        return int(value.split(";")[0].split("(")[0].strip())
    except ValueError:
        return None


def respond(
    request: SipRequest, status: int, headers: Iterable[tuple[str, str]] = ()
) -> SendResponse:
    """The ``SendResponse`` effect answering ``request`` with ``status``."""
    return SendResponse(make_response(request, status, headers=headers))
