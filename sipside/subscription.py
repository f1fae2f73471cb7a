"""The subscriber of SIP-specific event notification (RFC 6665 4.1): one subscription we hold.

The machine takes messages and ``now`` and returns the effects of ``sipside.events``:
``SendRequest`` (the caller runs a client transaction and reports its outcome with
``handle_response`` / ``handle_timeout``), ``SendResponse`` (answer the NOTIFY just handled) and
``StateChanged`` (the subscription state the notifier reported, or its local end). It exposes
``next_deadline`` / ``handle_timer`` and can be saved as a snapshot of primitives and restored
after a restart (DESIGN 8). The notifier machine is in ``sipside.notifier``; the header helpers
both share are in ``sipside.events`` and stay importable from here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace

from sipside.dialog import Dialog, DialogFields, address_uri, dialog_fields, dialog_from
from sipside.digest import DigestClient
from sipside.errors import LocalError, PeerError
from sipside.events import (
    EventHeader,
    OutgoingRequests,
    SendRequest,
    SendResponse,
    StateChanged,
    SubscriptionEffect,
    SubscriptionEnded,
    SubscriptionState,
    SubscriptionStateHeader,
    expires_value,
    granted_expires,
    min_expires_retry,
    parse_event,
    parse_subscription_state,
    refresh_delay,
    respond,
    resubscribe_delay,
    resume_at,
    retry_after_value,
)
from sipside.message import SipRequest, SipResponse

__all__ = [
    "NOTIFY_TIMEOUT_FACTOR",
    "EventHeader",
    "SendRequest",
    "SendResponse",
    "StateChanged",
    "Subscriber",
    "SubscriberSnapshot",
    "SubscriberState",
    "SubscriptionEffect",
    "SubscriptionEnded",
    "SubscriptionState",
    "SubscriptionStateHeader",
    "expires_value",
    "parse_event",
    "parse_subscription_state",
    "refresh_delay",
    "respond",
    "resubscribe_delay",
    "retry_after_value",
]

# RFC 6665 4.1.2.4: a subscriber waits 64*T1 for the first NOTIFY after the 2xx.
NOTIFY_TIMEOUT_FACTOR = 64

# Failure codes that end a subscription when they answer a refresh or a NOTIFY: RFC 6665
# 4.1.2.2 (481) and RFC 5057 5.1 (responses that destroy the usage, 408 = timeout).
_USAGE_ENDING = frozenset({404, 405, 408, 410, 416, 480, 481, 482, 483, 484, 485, 489, 501, 604})


class SubscriberState(enum.Enum):
    """States of a subscription we hold (RFC 6665 4.1)."""

    SUBSCRIBING = "subscribing"  # initial SUBSCRIBE sent, no 2xx and no NOTIFY yet
    ACCEPTED = "accepted"  # 2xx received, waiting for the first NOTIFY
    PENDING = "pending"
    ACTIVE = "active"
    UNSUBSCRIBING = "unsubscribing"  # Expires: 0 sent, waiting for the final NOTIFY
    TERMINATED = "terminated"


class _Kind(enum.Enum):
    INITIAL = "initial"
    REFRESH = "refresh"
    UNSUBSCRIBE = "unsubscribe"


@dataclass(frozen=True, slots=True, kw_only=True)
class SubscriberSnapshot(DialogFields):
    """Everything a ``Subscriber`` needs to resume after a restart, as primitives."""

    state: str
    request_uri: str
    contact: str
    event: str
    accept: tuple[str, ...]
    expires: int
    expires_at: float | None
    refresh_at: float | None


class Subscriber:
    """One subscription we hold to a remote notifier (RFC 6665 4.1)."""

    __slots__ = (
        "_accept",
        "_contact",
        "_event",
        "_expires",
        "_expires_at",
        "_notify_deadline",
        "_offset",
        "_refresh_at",
        "_request_uri",
        "_requests",
        "_resend_at",
        "_t1",
        "_unsubscribe_wanted",
        "state",
    )

    def __init__(
        self,
        *,
        local_uri: str,
        remote_uri: str,
        contact: str,
        event: str,
        expires: int = 3600,
        accept: Iterable[str] = (),
        request_uri: str | None = None,
        call_id: str | None = None,
        local_tag: str | None = None,
        route_set: Iterable[str] = (),
        refresh_offset: float = 0.0,
        t1: float = 0.5,
        digest: DigestClient | None = None,
    ) -> None:
        self._request_uri = request_uri or address_uri(remote_uri)
        dialog = Dialog.unconfirmed(
            call_id=call_id,
            local_tag=local_tag,
            local_uri=local_uri,
            remote_uri=remote_uri,
            request_uri=self._request_uri,
            route_set=route_set,
        )
        self._requests = OutgoingRequests[_Kind](dialog, digest)
        self._contact = contact
        try:
            self._event = parse_event(event)
        except PeerError as exc:
            raise LocalError(f"bad event package {event!r}") from exc
        self._accept = tuple(accept)
        self._expires = expires
        self._offset = refresh_offset
        self._t1 = t1
        self.state = SubscriberState.SUBSCRIBING
        self._expires_at: float | None = None
        self._refresh_at: float | None = None
        self._notify_deadline: float | None = None
        self._resend_at: float | None = None
        self._unsubscribe_wanted = False

    @property
    def dialog(self) -> Dialog:
        """The dialog (unconfirmed until the 2xx or the first NOTIFY)."""
        return self._requests.dialog

    @property
    def expires_at(self) -> float | None:
        """When the subscription runs out unless refreshed."""
        return self._expires_at

    # -- outgoing requests ---------------------------------------------------------------

    def _send(self, kind: _Kind, expires: int, now: float) -> list[SubscriptionEffect]:
        headers = [
            ("Contact", f"<{self._contact}>"),
            ("Event", str(self._event)),
            ("Expires", str(expires)),
        ]
        if self._accept:
            headers.append(("Accept", ", ".join(self._accept)))
        return [self._requests.send("SUBSCRIBE", kind, headers)]

    def start(self, now: float) -> list[SubscriptionEffect]:
        """The initial SUBSCRIBE (RFC 6665 4.1.2.1)."""
        self.state = SubscriberState.SUBSCRIBING
        self._resend_at = None
        return self._send(_Kind.INITIAL, self._expires, now)

    def unsubscribe(self, now: float) -> list[SubscriptionEffect]:
        """End the subscription with ``Expires: 0`` (RFC 6665 4.1.2.3)."""
        match self.state:
            case SubscriberState.TERMINATED | SubscriberState.UNSUBSCRIBING:
                return []
            case SubscriberState.SUBSCRIBING if not self.dialog.confirmed:
                # No dialog to send in yet: unsubscribe once the 2xx or a NOTIFY arrives.
                self._unsubscribe_wanted = True
                if self._resend_at is not None:
                    return self._terminate(now, reason="timeout")
                return []
        self.state = SubscriberState.UNSUBSCRIBING
        self._refresh_at = None
        self._notify_deadline = now + NOTIFY_TIMEOUT_FACTOR * self._t1
        return self._send(_Kind.UNSUBSCRIBE, 0, now)

    def _terminate(
        self,
        now: float,
        *,
        reason: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
        body: bytes = b"",
        content_type: str | None = None,
    ) -> list[SubscriptionEffect]:
        self.state = SubscriberState.TERMINATED
        self._expires_at = self._refresh_at = self._notify_deadline = self._resend_at = None
        return [
            StateChanged(
                SubscriptionState.TERMINATED, reason, body, content_type, retry_after, status
            )
        ]

    def _grant(self, expires: int, now: float) -> None:
        self._expires_at = now + expires
        self._refresh_at = now + refresh_delay(expires, self._offset)

    # -- responses to our SUBSCRIBEs -----------------------------------------------------

    def handle_response(self, response: SipResponse, now: float) -> list[SubscriptionEffect]:
        """A final (or provisional) response to one of our SUBSCRIBE requests."""
        match self._requests.answer(response):
            case SendRequest() as retry:
                return [retry]  # RFC 3261 22.2: the challenge answered
            case _Kind() as kind:
                return self._on_final(kind, response, now)
        return []

    def _on_final(self, kind: _Kind, response: SipResponse, now: float) -> list[SubscriptionEffect]:
        if response.status == 423 and kind is not _Kind.UNSUBSCRIBE:
            # RFC 6665 4.1.2.1 / RFC 3261 21.4.17: retry with at least Min-Expires.
            minimum = min_expires_retry(response, self._expires)
            if minimum is not None:
                self._expires = minimum
                return self._send(kind, minimum, now)
        if self.state is SubscriberState.TERMINATED:
            return []
        if 200 <= response.status < 300:
            return self._on_success(kind, response, now)
        return self._on_failure(kind, response.status, retry_after_value(response), now)

    def handle_timeout(self, cseq: int, now: float) -> list[SubscriptionEffect]:
        """The client transaction for CSeq ``cseq`` timed out (treated as 408)."""
        kind = self._requests.timed_out(cseq)
        if kind is None:
            return []
        if self.state is SubscriberState.TERMINATED:
            return []
        return self._on_failure(kind, 408, None, now)

    def _on_success(
        self, kind: _Kind, response: SipResponse, now: float
    ) -> list[SubscriptionEffect]:
        expires = granted_expires(response, self._expires)
        requests = self._requests
        match kind:
            case _Kind.INITIAL:
                if not requests.dialog.confirmed:
                    requests.dialog = requests.dialog.confirm(response)
                if self.state is SubscriberState.SUBSCRIBING:
                    # RFC 6665 4.1.2.4: the first NOTIFY must follow within 64*T1.
                    self.state = SubscriberState.ACCEPTED
                    self._notify_deadline = now + NOTIFY_TIMEOUT_FACTOR * self._t1
                self._grant(expires, now)
                if self._unsubscribe_wanted:
                    return self.unsubscribe(now)
            case _Kind.REFRESH:
                requests.dialog = requests.dialog.refresh_target(response)
                if self.state is not SubscriberState.UNSUBSCRIBING:
                    self._grant(expires, now)
            case _Kind.UNSUBSCRIBE:
                pass  # the final NOTIFY ends it, or the 64*T1 deadline set in unsubscribe()
        return []

    def _on_failure(
        self, kind: _Kind, status: int, retry_after: int | None, now: float
    ) -> list[SubscriptionEffect]:
        match kind:
            case _Kind.INITIAL | _Kind.UNSUBSCRIBE:
                return self._terminate(now, status=status, retry_after=retry_after)
            case _Kind.REFRESH if status in _USAGE_ENDING:
                return self._terminate(now, status=status, retry_after=retry_after)
            case _Kind.REFRESH:
                # RFC 6665 4.1.2.2: other failures leave the subscription valid until it
                # expires; the expiry timer ends it if no later refresh succeeds.
                if self._expires_at is not None:
                    self._refresh_at = None
                return []
        return []

    # -- NOTIFY ----------------------------------------------------------------------------

    def handle_notify(self, request: SipRequest, now: float) -> list[SubscriptionEffect]:
        """An incoming NOTIFY for this subscription: the answer to send plus state effects."""
        try:
            event = parse_event(request.header("Event"))
        except PeerError as exc:
            return [respond(request, exc.status)]
        if not event.matches(self._event):
            return [respond(request, 489)]
        dialog = self.dialog
        if (
            request.call_id != dialog.call_id
            or request.to_tag != dialog.local_tag
            or self.state is SubscriberState.TERMINATED
        ):
            return [respond(request, 481)]
        try:
            if not dialog.confirmed:
                # RFC 6665 4.1.2.4: the NOTIFY may come before the 2xx; it creates the dialog.
                created = Dialog.from_uas(request, dialog.local_tag)
                dialog = replace(
                    created,
                    local_uri=dialog.local_uri,
                    remote_uri=dialog.remote_uri,
                    local_cseq=dialog.local_cseq,
                )
            elif (request.from_tag or "") != dialog.remote_tag:
                # A NOTIFY from another fork: we keep one dialog per subscription.
                return [respond(request, 481)]
            else:
                dialog = dialog.receive(request, target_refresh=True)
            value = request.header("Subscription-State")
            if value is None:
                raise PeerError(400, "Bad Request", "NOTIFY without Subscription-State")
            sub = parse_subscription_state(value)
        except PeerError as exc:
            return [respond(request, exc.status)]
        self._requests.dialog = dialog
        effects: list[SubscriptionEffect] = [respond(request, 200)]
        content_type = request.header("Content-Type")
        match sub.state:
            case SubscriptionState.TERMINATED:
                # RFC 6665 4.1.3: the notifier ended it; the reason says if we may retry.
                return effects + self._terminate(
                    now,
                    reason=sub.reason,
                    retry_after=sub.retry_after,
                    body=request.body,
                    content_type=content_type,
                )
            case None:
                return effects  # unknown substate: keep ours (RFC 6665 4.1.3)
            case _ if self.state is SubscriberState.UNSUBSCRIBING:
                return effects  # state before our unsubscribe took effect
            case SubscriptionState.ACTIVE | SubscriptionState.PENDING as state:
                self.state = (
                    SubscriberState.ACTIVE
                    if state is SubscriptionState.ACTIVE
                    else SubscriberState.PENDING
                )
                self._notify_deadline = None
                if sub.expires is not None:
                    # RFC 6665 4.1.3: "expires" is the notifier's view of the time left.
                    self._grant(sub.expires, now)
                effects.append(StateChanged(state, sub.reason, request.body, content_type))
        if self._unsubscribe_wanted:
            effects += self.unsubscribe(now)
        return effects

    # -- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` has something to do, or None."""
        if self.state is SubscriberState.TERMINATED:
            return None
        times = [self._expires_at, self._notify_deadline, self._resend_at]
        if not self._requests.awaiting(_Kind.REFRESH):
            times.append(self._refresh_at)
        present = [t for t in times if t is not None]
        return min(present) if present else None

    def handle_timer(self, now: float) -> list[SubscriptionEffect]:
        """Fire whatever is due at ``now``: resend, refresh, NOTIFY wait or expiry."""
        if self.state is SubscriberState.TERMINATED:
            return []
        if self._resend_at is not None and now >= self._resend_at:
            return self.start(now)
        if self._notify_deadline is not None and now >= self._notify_deadline:
            # RFC 6665 4.1.2.4: no NOTIFY within 64*T1 -> the subscription failed; also ends
            # an unsubscribe whose final NOTIFY never came.
            return self._terminate(now, reason="timeout")
        if self._expires_at is not None and now >= self._expires_at:
            return self._terminate(now, reason="timeout")
        refreshing = self._requests.awaiting(_Kind.REFRESH)
        if self._refresh_at is not None and now >= self._refresh_at and not refreshing:
            self._refresh_at = None
            if self._unsubscribe_wanted:
                return self.unsubscribe(now)  # owed since before a restart
            return self._send(_Kind.REFRESH, self._expires, now)
        return []

    # -- persistence ---------------------------------------------------------------------

    def snapshot(self) -> SubscriberSnapshot:
        """The state to persist (pending transactions are not kept: they are redone)."""
        return SubscriberSnapshot(
            **dialog_fields(self.dialog),
            state=self.state.value,
            request_uri=self._request_uri,
            contact=self._contact,
            event=str(self._event),
            accept=self._accept,
            expires=self._expires,
            expires_at=self._expires_at,
            refresh_at=self._refresh_at,
        )

    @classmethod
    def restore(
        cls,
        snap: SubscriberSnapshot,
        now: float,
        *,
        spread: float = 0.0,
        refresh_offset: float = 0.0,
        t1: float = 0.5,
        digest: DigestClient | None = None,
    ) -> Subscriber:
        """Rebuild a subscriber after a restart; overdue work is due at ``now + spread``.

        ``spread`` is chosen by the caller per subscription (e.g. random in [0, 30]) so a
        restarted gateway does not refresh everything at once.
        """
        sub = cls(
            local_uri=snap.local_uri,
            remote_uri=snap.remote_uri,
            contact=snap.contact,
            event=snap.event,
            expires=snap.expires,
            accept=snap.accept,
            request_uri=snap.request_uri,
            refresh_offset=refresh_offset,
            t1=t1,
            digest=digest,
        )
        sub._requests.dialog = dialog_from(snap)
        sub.state = SubscriberState(snap.state)
        due = now + spread
        match sub.state:
            case SubscriberState.TERMINATED:
                pass
            case SubscriberState.SUBSCRIBING if not sub.dialog.confirmed:
                # The initial transaction died with the old process: send a new one.
                sub._resend_at = due
            case SubscriberState.UNSUBSCRIBING:
                sub.state = SubscriberState.ACTIVE
                sub._unsubscribe_wanted = True
                sub._refresh_at = due
            case _:
                # ACCEPTED after a restart: the first NOTIFY may have been lost with the
                # process, so refresh (which makes the notifier send a NOTIFY) instead.
                sub.state = (
                    SubscriberState.PENDING
                    if sub.state in (SubscriberState.ACCEPTED, SubscriberState.SUBSCRIBING)
                    else sub.state
                )
                sub._refresh_at = resume_at(snap.refresh_at, now, spread)
                # Keep the expiry after the refresh so its answer can still arrive.
                floor = sub._refresh_at + NOTIFY_TIMEOUT_FACTOR * t1
                sub._expires_at = max(snap.expires_at or floor, floor)
        return sub
