"""Event state publication (RFC 3903), sans-IO: the publisher (EPA) and the compositor (ESC).

``Publisher`` keeps one piece of event state published: the initial PUBLISH with a body, the
SIP-ETag from the 2xx, refreshes with SIP-If-Match and no body before expiry, modifications,
removal with ``Expires: 0``, a fresh start after 412, a retry with Min-Expires after 423.
``PublicationStore`` is the server side: it answers PUBLISH requests, keeps publications by
entity-tag, expires them, and tells the application whose state changed.
"""

from __future__ import annotations

import enum
import heapq
import secrets
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from sipside.dialog import Dialog, DialogFields, dialog_fields, dialog_from
from sipside.digest import DigestClient
from sipside.errors import PeerError
from sipside.events import (
    OutgoingRequests,
    SendRequest,
    SendResponse,
    expires_value,
    granted_expires,
    min_expires_retry,
    parse_event,
    refresh_delay,
    respond,
    resume_at,
    retry_after_value,
)
from sipside.message import SipRequest, SipResponse

__all__ = [
    "Publication",
    "PublicationChanged",
    "PublicationEffect",
    "PublicationRemoved",
    "PublicationStore",
    "PublishFailed",
    "Published",
    "Publisher",
    "PublisherSnapshot",
    "PublisherState",
    "StoreEffect",
    "Unpublished",
]


# -- publisher (EPA, RFC 3903 4) ---------------------------------------------------------


class PublisherState(enum.Enum):
    """Where our publication stands."""

    IDLE = "idle"  # nothing published (never, removed, or lost)
    PUBLISHING = "publishing"  # initial PUBLISH in flight
    PUBLISHED = "published"
    REMOVING = "removing"


class _Op(enum.Enum):
    INITIAL = "initial"
    REFRESH = "refresh"
    MODIFY = "modify"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class Published:
    """The ESC holds our state under ``etag`` for ``expires`` seconds."""

    etag: str
    expires: int


@dataclass(frozen=True, slots=True)
class Unpublished:
    """Our state is removed from the ESC (after ``remove``)."""


@dataclass(frozen=True, slots=True)
class PublishFailed:
    """A PUBLISH failed; nothing of ours is published any more."""

    status: int
    retry_after: int | None = None


PublicationEffect = SendRequest | Published | Unpublished | PublishFailed


@dataclass(frozen=True, slots=True, kw_only=True)
class PublisherSnapshot(DialogFields):
    """Everything a ``Publisher`` needs to resume after a restart, as primitives.

    The dialog fields are those of the unconfirmed dialog that numbers our PUBLISH requests;
    ``remote_target`` is the Request-URI.
    """

    state: str
    event: str
    expires: int
    etag: str | None
    body: bytes
    content_type: str | None
    refresh_at: float | None


class Publisher:
    """Keeps one piece of event state published at an ESC (RFC 3903 4)."""

    __slots__ = (
        "_body",
        "_content_type",
        "_etag",
        "_event",
        "_expires",
        "_next",
        "_offset",
        "_refresh_at",
        "_requests",
        "state",
    )

    def __init__(
        self,
        *,
        local_uri: str,
        remote_uri: str,
        event: str = "presence",
        expires: int = 3600,
        request_uri: str | None = None,
        call_id: str | None = None,
        local_tag: str | None = None,
        route_set: Iterable[str] = (),
        refresh_offset: float = 0.0,
        digest: DigestClient | None = None,
    ) -> None:
        # PUBLISH is sent outside any dialog; an unconfirmed dialog numbers the requests.
        dialog = Dialog.unconfirmed(
            local_uri=local_uri,
            remote_uri=remote_uri,
            request_uri=request_uri,
            call_id=call_id,
            local_tag=local_tag,
            route_set=route_set,
        )
        # At most one PUBLISH is in flight (RFC 3903 4.1).
        self._requests = OutgoingRequests[_Op](dialog, digest)
        self._event = event
        self._expires = expires
        self._offset = refresh_offset
        self.state = PublisherState.IDLE
        self._etag: str | None = None
        self._body = b""
        self._content_type: str | None = None
        self._next: _Op | None = None
        self._refresh_at: float | None = None

    @property
    def etag(self) -> str | None:
        """The entity-tag of our published state, if any."""
        return self._etag

    def _send(self, op: _Op, now: float) -> list[PublicationEffect]:
        headers = [("Event", self._event)]
        headers.append(("Expires", "0" if op is _Op.REMOVE else str(self._expires)))
        if op is not _Op.INITIAL and self._etag is not None:
            headers.append(("SIP-If-Match", self._etag))
        # RFC 3903 4.1: initial and modify carry the state; refresh and remove carry none.
        body = self._body if op in (_Op.INITIAL, _Op.MODIFY) else b""
        if body and self._content_type:
            headers.append(("Content-Type", self._content_type))
        send = self._requests.send("PUBLISH", op, headers, body)
        self._refresh_at = None
        if op is _Op.INITIAL:
            self.state = PublisherState.PUBLISHING
        elif op is _Op.REMOVE:
            self.state = PublisherState.REMOVING
        return [send]

    def publish(self, body: bytes, content_type: str, now: float) -> list[PublicationEffect]:
        """Publish new state: the initial PUBLISH, or a modification of ours."""
        self._body, self._content_type = body, content_type
        op = _Op.MODIFY if self._etag is not None else _Op.INITIAL
        if self._requests.awaiting():
            # RFC 3903 4.1: no new PUBLISH until the previous one completed; latest wins.
            self._next = _Op.MODIFY
            return []
        return self._send(op, now)

    def remove(self, now: float) -> list[PublicationEffect]:
        """Remove our state from the ESC (RFC 3903 4.5: Expires 0 with SIP-If-Match)."""
        if self._requests.awaiting():
            self._next = _Op.REMOVE
            return []
        if self._etag is None:
            self.state = PublisherState.IDLE
            return []
        return self._send(_Op.REMOVE, now)

    def handle_response(self, response: SipResponse, now: float) -> list[PublicationEffect]:
        """A final response to our PUBLISH."""
        if response.status < 200:
            return []
        match self._requests.answer(response):
            case SendRequest() as retry:
                return [retry]  # RFC 3261 22.2: the challenge answered
            case _Op() as op:
                return self._on_final(op, response, now)
        return []

    def _on_final(self, op: _Op, response: SipResponse, now: float) -> list[PublicationEffect]:
        status = response.status
        if 200 <= status < 300:
            return self._on_success(op, response, now)
        if status == 412 and op is not _Op.REMOVE:
            # RFC 3903 4.4: the ESC lost our entity-tag; publish the full state afresh.
            self._etag = None
            return self._send(_Op.INITIAL, now)
        if status == 423:
            # RFC 3903 4.2 / RFC 3261 21.4.17: ask again with at least Min-Expires.
            minimum = min_expires_retry(response, self._expires)
            if minimum is not None:
                self._expires = minimum
                return self._send(op, now)
        return self._on_failure(op, status, retry_after_value(response))

    def handle_timeout(self, cseq: int, now: float) -> list[PublicationEffect]:
        """Our PUBLISH with CSeq ``cseq`` got no final response."""
        op = self._requests.timed_out(cseq)
        if op is None:
            return []
        return self._on_failure(op, 408, None)

    def _on_success(self, op: _Op, response: SipResponse, now: float) -> list[PublicationEffect]:
        effects: list[PublicationEffect] = []
        if op is _Op.REMOVE:
            self._etag = None
            self.state = PublisherState.IDLE
            effects.append(Unpublished())
        else:
            expires = granted_expires(response, self._expires)
            # RFC 3903 4.1: every 2xx carries the entity-tag to use next time.
            self._etag = response.header("SIP-ETag") or self._etag
            if self._etag is None:
                self.state = PublisherState.IDLE
                return [PublishFailed(response.status)]
            self.state = PublisherState.PUBLISHED
            self._refresh_at = now + refresh_delay(expires, self._offset)
            effects.append(Published(self._etag, expires))
        if self._next is not None:
            queued, self._next = self._next, None
            if queued is _Op.REMOVE:
                effects += self.remove(now)
            elif self._etag is not None:
                effects += self._send(_Op.MODIFY, now)
            else:
                effects += self._send(_Op.INITIAL, now)
        return effects

    def _on_failure(self, op: _Op, status: int, retry_after: int | None) -> list[PublicationEffect]:
        self._etag = None
        self._refresh_at = None
        self.state = PublisherState.IDLE
        queued, self._next = self._next, None
        if op is _Op.REMOVE or queued is _Op.REMOVE:
            return [Unpublished()]
        return [PublishFailed(status, retry_after)]

    def next_deadline(self) -> float | None:
        """When the next refresh is due."""
        return None if self._requests.awaiting() else self._refresh_at

    def handle_timer(self, now: float) -> list[PublicationEffect]:
        """Refresh before expiry (RFC 3903 4.3: SIP-If-Match, no body)."""
        due = self._refresh_at is not None and now >= self._refresh_at
        if due and not self._requests.awaiting():
            return self._send(_Op.REFRESH, now)
        return []

    def snapshot(self) -> PublisherSnapshot:
        """The state to persist (a PUBLISH in flight is redone after restore)."""
        return PublisherSnapshot(
            **dialog_fields(self._requests.dialog),
            state=self.state.value,
            event=self._event,
            expires=self._expires,
            etag=self._etag,
            body=self._body,
            content_type=self._content_type,
            refresh_at=self._refresh_at,
        )

    @classmethod
    def restore(
        cls,
        snap: PublisherSnapshot,
        now: float,
        *,
        spread: float = 0.0,
        refresh_offset: float = 0.0,
        digest: DigestClient | None = None,
    ) -> Publisher:
        """Rebuild after a restart; overdue refreshes are due at ``now + spread``."""
        pub = cls(
            local_uri=snap.local_uri,
            remote_uri=snap.remote_uri,
            event=snap.event,
            expires=snap.expires,
            refresh_offset=refresh_offset,
            digest=digest,
        )
        pub._requests.dialog = dialog_from(snap)
        pub._etag, pub._body, pub._content_type = snap.etag, snap.body, snap.content_type
        if snap.etag is not None:
            # Whatever was in flight is redone as a refresh; a 412 turns it into a new publish.
            pub.state = PublisherState.PUBLISHED
            pub._refresh_at = resume_at(snap.refresh_at, now, spread)
        return pub


# -- compositor (ESC, RFC 3903 6) --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Publication:
    """One publication held by the ESC for an entity and event package."""

    entity: str
    event: str
    etag: str
    body: bytes
    content_type: str | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class PublicationChanged:
    """A publication was created, refreshed or modified; ``state_changed`` is False on refresh."""

    publication: Publication
    previous_etag: str | None
    state_changed: bool


@dataclass(frozen=True, slots=True)
class PublicationRemoved:
    """A publication ended: ``reason`` is "removed" (Expires 0) or "expired"."""

    publication: Publication
    reason: str


StoreEffect = SendResponse | PublicationChanged | PublicationRemoved


def _new_etag() -> str:
    return secrets.token_hex(8)


class PublicationStore:
    """The ESC's publications: answers PUBLISH (RFC 3903 6) and expires them."""

    __slots__ = (
        "_by_etag",
        "_content_types",
        "_default",
        "_events",
        "_heap",
        "_max",
        "_min",
        "_new_etag",
    )

    def __init__(
        self,
        *,
        events: Collection[str] = ("presence",),
        min_expires: int = 60,
        max_expires: int = 3600,
        default_expires: int = 3600,
        content_types: Collection[str] | None = None,
        etag_factory: Callable[[], str] = _new_etag,
    ) -> None:
        self._events = tuple(events)
        self._min, self._max, self._default = min_expires, max_expires, default_expires
        self._content_types = None if content_types is None else tuple(content_types)
        self._new_etag = etag_factory
        self._by_etag: dict[str, Publication] = {}
        # (expires_at, etag); stale entries are skipped when popped.
        self._heap: list[tuple[float, str]] = []

    def publications(self, entity: str, event: str) -> list[Publication]:
        """Every live publication of ``entity`` for ``event`` (the ESC composes them)."""
        return [p for p in self._by_etag.values() if p.entity == entity and p.event == event]

    def handle_publish(
        self, request: SipRequest, now: float, *, entity: str | None = None
    ) -> list[StoreEffect]:
        """Answer a PUBLISH; ``entity`` is the caller's key for the Request-URI's resource."""
        key = entity if entity is not None else request.uri
        try:
            return self._handle(request, key, now)
        except PeerError as exc:
            extra = [("Allow-Events", ", ".join(self._events))] if exc.status == 489 else []
            if exc.status == 415 and self._content_types is not None:
                extra = [("Accept", ", ".join(self._content_types))]
            if exc.status == 423:
                extra = [("Min-Expires", str(self._min))]
            return [respond(request, exc.status, extra)]

    def _handle(self, request: SipRequest, entity: str, now: float) -> list[StoreEffect]:
        # RFC 3903 6 step 2: unknown or missing event package -> 489.
        event = parse_event(request.header("Event"))
        if event.package.lower() not in {e.lower() for e in self._events}:
            raise PeerError(489, "Bad Event", f"event package {event.package} not supported")
        package = event.package.lower()
        # Step 3: SIP-If-Match must name a publication of this entity and event.
        if_match = request.header("SIP-If-Match")
        old: Publication | None = None
        if if_match is not None:
            old = self._by_etag.get(if_match.strip())
            if old is None or old.entity != entity or old.event != package:
                raise PeerError(412, "Conditional Request Failed", "unknown entity-tag")
        # Step 4: Expires bounds.
        expires = expires_value(request, self._default)
        if 0 < expires < self._min:
            raise PeerError(423, "Interval Too Brief")
        expires = min(expires, self._max)
        content_type = request.header("Content-Type")
        if request.body and self._content_types is not None:
            media = (content_type or "").split(";")[0].strip().lower()
            if media not in {c.lower() for c in self._content_types}:
                raise PeerError(415, "Unsupported Media Type", f"cannot compose {media!r}")
        if old is None:
            # Step 5: an initial PUBLISH must carry state.
            if not request.body:
                raise PeerError(400, "Bad Request", "initial PUBLISH without a body")
            if expires == 0:
                raise PeerError(400, "Bad Request", "initial PUBLISH with Expires 0")
            return self._store(request, entity, package, None, expires, now)
        del self._by_etag[old.etag]
        if expires == 0:
            # RFC 3903 6 step 6: Expires 0 removes the publication.
            ok = respond(request, 200, [("Expires", "0")])
            return [ok, PublicationRemoved(old, "removed")]
        return self._store(request, entity, package, old, expires, now)

    def _store(
        self,
        request: SipRequest,
        entity: str,
        event: str,
        old: Publication | None,
        expires: int,
        now: float,
    ) -> list[StoreEffect]:
        etag = self._new_etag()
        while etag in self._by_etag:
            etag = self._new_etag()
        if request.body or old is None:
            body, content_type, changed = request.body, request.header("Content-Type"), True
        else:
            # A refresh keeps the state (RFC 3903 4.3) but gets a new entity-tag.
            body, content_type, changed = old.body, old.content_type, False
        pub = Publication(entity, event, etag, body, content_type, now + expires)
        self._by_etag[etag] = pub
        heapq.heappush(self._heap, (pub.expires_at, etag))
        headers = [("SIP-ETag", etag), ("Expires", str(expires))]
        return [
            respond(request, 200, headers),
            PublicationChanged(pub, old.etag if old else None, changed),
        ]

    def next_deadline(self) -> float | None:
        """When the earliest publication expires."""
        while self._heap:
            at, etag = self._heap[0]
            pub = self._by_etag.get(etag)
            if pub is not None and pub.expires_at == at:
                return at
            heapq.heappop(self._heap)
        return None

    def handle_timer(self, now: float) -> list[StoreEffect]:
        """Remove every publication whose time ran out (RFC 3903 6)."""
        effects: list[StoreEffect] = []
        while (at := self.next_deadline()) is not None and at <= now:
            _, etag = heapq.heappop(self._heap)
            effects.append(PublicationRemoved(self._by_etag.pop(etag), "expired"))
        return effects

    def snapshot(self) -> tuple[Publication, ...]:
        """All live publications, for the store."""
        return tuple(self._by_etag.values())

    def restore(self, publications: Iterable[Publication]) -> None:
        """Load publications saved by ``snapshot`` (expired ones go at the next timer)."""
        for pub in publications:
            self._by_etag[pub.etag] = pub
            heapq.heappush(self._heap, (pub.expires_at, pub.etag))
