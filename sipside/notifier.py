"""The notifier side of RFC 6665 subscriptions, sans-IO.

A ``Notifier`` is created from an accepted initial SUBSCRIBE; it answers refreshes and
unsubscribes in its dialog, sends a NOTIFY for every state change (one at a time, later changes
coalesced into the next), ends the subscription on expiry, on ``terminate`` or when a NOTIFY
fails, and can be saved as a snapshot of primitives. Effects and header helpers are shared with
the subscriber and the publication in ``sipside.events``.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from sipside.dialog import Dialog, DialogFields, dialog_fields, dialog_from
from sipside.errors import PeerError
from sipside.events import (
    EventHeader,
    SendRequest,
    SendResponse,
    SubscriptionEffect,
    SubscriptionEnded,
    SubscriptionState,
    SubscriptionStateHeader,
    adopt_auth_retry,
    expires_value,
    parse_event,
    respond,
    retry_after_value,
)
from sipside.message import SipRequest, SipResponse, make_response, new_tag

__all__ = ["Notifier", "NotifierPolicy", "NotifierSnapshot", "NotifierState"]

# The CSeqs of our NOTIFYs in flight: none or one almost always. An idle notifier shares this
# empty frozenset; an empty set of its own costs 216 bytes per subscription (tracemalloc).
_NONE_OUTSTANDING: frozenset[int] = frozenset()


class NotifierState(enum.Enum):
    """States of a subscription we serve (RFC 6665 4.2)."""

    PENDING = "pending"  # accepted, waiting for the application's authorisation
    ACTIVE = "active"
    TERMINATED = "terminated"


@dataclass(frozen=True, slots=True)
class NotifierPolicy:
    """Expires bounds (RFC 6665 4.2.1.1) and the status for accepted SUBSCRIBEs.

    RFC 6665 8.3.1 deprecates 202; DESIGN 5.2 asks for it, so the caller chooses.
    """

    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    accept_status: int = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class NotifierSnapshot(DialogFields):
    """Everything a ``Notifier`` needs to resume after a restart, as primitives."""

    state: str
    contact: str
    event: str
    expires_at: float
    body: bytes
    content_type: str | None


class Notifier:
    """One subscription a remote subscriber holds with us (RFC 6665 4.2)."""

    __slots__ = (
        "_body",
        "_contact",
        "_content_type",
        "_dialog",
        "_event",
        "_expires_at",
        "_outstanding",
        "_policy",
        "_queued",
        "_retry_at",
        "state",
    )

    def __init__(
        self,
        dialog: Dialog,
        event: EventHeader,
        *,
        contact: str,
        expires_at: float,
        state: NotifierState = NotifierState.PENDING,
        body: bytes = b"",
        content_type: str | None = None,
        policy: NotifierPolicy | None = None,
    ) -> None:
        self._dialog = dialog
        self._event = event
        self._contact = contact
        self._expires_at = expires_at
        self.state = state
        self._body = body
        self._content_type = content_type
        self._policy = policy or NotifierPolicy()
        self._outstanding = _NONE_OUTSTANDING
        self._queued = False
        self._retry_at: float | None = None

    @property
    def dialog(self) -> Dialog:
        """The subscription's dialog; ``dialog.id`` is the key to route requests to it."""
        return self._dialog

    @property
    def expires_at(self) -> float:
        """When the subscription ends unless refreshed."""
        return self._expires_at

    @classmethod
    def accept(
        cls,
        request: SipRequest,
        now: float,
        *,
        events: Collection[str],
        contact: str,
        state: NotifierState = NotifierState.PENDING,
        body: bytes = b"",
        content_type: str | None = None,
        policy: NotifierPolicy | None = None,
        local_tag: str | None = None,
    ) -> tuple[Notifier | None, list[SubscriptionEffect]]:
        """Handle an initial SUBSCRIBE: the notifier (None if refused) and the effects.

        Effects are the response (2xx, or 489 / 423 / 400) and, when accepted, the immediate
        NOTIFY (RFC 6665 4.2.1.1). ``Expires: 0`` is a fetch: one terminated NOTIFY.
        """
        policy = policy or NotifierPolicy()
        try:
            event = parse_event(request.header("Event"))
            if event.package.lower() not in {e.lower() for e in events}:
                raise PeerError(489, "Bad Event", f"unsupported event package {event.package}")
            expires = expires_value(request, policy.default_expires)
            if 0 < expires < policy.min_expires:
                # RFC 6665 4.2.1.1 / RFC 3261 21.4.17: too brief -> 423 with Min-Expires.
                min_exp = ("Min-Expires", str(policy.min_expires))
                return None, [respond(request, 423, [min_exp])]
            expires = min(expires, policy.max_expires)
            tag = local_tag or new_tag()
            dialog = Dialog.from_uas(request, tag)
        except PeerError as exc:
            extra = [("Allow-Events", ", ".join(events))] if exc.status == 489 else []
            return None, [respond(request, exc.status, extra)]
        notifier = cls(
            dialog,
            event,
            contact=contact,
            expires_at=now + expires,
            state=state,
            body=body,
            content_type=content_type,
            policy=policy,
        )
        headers = [("Expires", str(expires)), ("Contact", f"<{contact}>")]
        response = make_response(request, policy.accept_status, to_tag=tag, headers=headers)
        effects: list[SubscriptionEffect] = [SendResponse(response)]
        if expires == 0:
            # RFC 6665 4.4.3: a fetch gets the current state in a terminated NOTIFY.
            return notifier, effects + notifier._end(now, "timeout", with_body=True)
        return notifier, effects + notifier._send_state(now)

    # -- NOTIFY sending ------------------------------------------------------------------

    def _notify(
        self, header: SubscriptionStateHeader, body: bytes, content_type: str | None
    ) -> SendRequest:
        headers = [
            ("Event", str(self._event)),
            ("Subscription-State", str(header)),
            ("Contact", f"<{self._contact}>"),
        ]
        if body and content_type:
            headers.append(("Content-Type", content_type))
        self._dialog, request = self._dialog.request("NOTIFY", headers=headers, body=body)
        self._outstanding |= {request.cseq[0]}
        return SendRequest(request)

    def _send_state(self, now: float) -> list[SubscriptionEffect]:
        if self._outstanding:
            # Only one NOTIFY in flight: the next one carries the latest state
            # (state-based packages such as presence only need the last state).
            self._queued = True
            return []
        self._queued = False
        self._retry_at = None
        remaining = max(0, int(self._expires_at - now))
        if self.state is NotifierState.ACTIVE:
            header = SubscriptionStateHeader(SubscriptionState.ACTIVE, expires=remaining)
            return [self._notify(header, self._body, self._content_type)]
        # RFC 6665 4.2.1.1: a pending subscription reveals no state.
        header = SubscriptionStateHeader(SubscriptionState.PENDING, expires=remaining)
        return [self._notify(header, b"", None)]

    def _end(
        self,
        now: float,
        reason: str,
        *,
        retry_after: int | None = None,
        with_body: bool = False,
    ) -> list[SubscriptionEffect]:
        # The final NOTIFY is never coalesced: it must go out even if another is in flight.
        body = self._body if with_body and self.state is NotifierState.ACTIVE else b""
        self.state = NotifierState.TERMINATED
        header = SubscriptionStateHeader(
            SubscriptionState.TERMINATED, reason=reason, retry_after=retry_after
        )
        return [self._notify(header, body, self._content_type), SubscriptionEnded(reason)]

    def activate(
        self, now: float, body: bytes | None = None, content_type: str | None = None
    ) -> list[SubscriptionEffect]:
        """The application authorised the subscriber: NOTIFY active (RFC 6665 4.2.1.1)."""
        if self.state is NotifierState.TERMINATED:
            return []
        self.state = NotifierState.ACTIVE
        return self.notify(now, body, content_type)

    def notify(
        self, now: float, body: bytes | None = None, content_type: str | None = None
    ) -> list[SubscriptionEffect]:
        """New state of the resource; sent at once when active, kept while pending."""
        if body is not None:
            self._body = body
        if content_type is not None:
            self._content_type = content_type
        if self.state is not NotifierState.ACTIVE:
            return []
        return self._send_state(now)

    def terminate(
        self, now: float, reason: str, *, retry_after: int | None = None
    ) -> list[SubscriptionEffect]:
        """End the subscription with ``reason`` (rejected, deactivated, noresource...)."""
        if self.state is NotifierState.TERMINATED:
            return []
        return self._end(now, reason, retry_after=retry_after)

    # -- requests and responses from the subscriber ----------------------------------

    def handle_subscribe(self, request: SipRequest, now: float) -> list[SubscriptionEffect]:
        """A SUBSCRIBE inside the dialog: refresh (RFC 6665 4.2.1.2) or unsubscribe (4.2.1.4)."""
        if self.state is NotifierState.TERMINATED or not self._dialog.matches(request):
            return [respond(request, 481)]
        try:
            event = parse_event(request.header("Event"))
            if not event.matches(self._event):
                raise PeerError(489, "Bad Event", "Event differs from the subscription's")
            dialog = self._dialog.receive(request, target_refresh=True)
            expires = expires_value(request, self._policy.default_expires)
        except PeerError as exc:
            return [respond(request, exc.status)]
        self._dialog = dialog
        if 0 < expires < self._policy.min_expires:
            return [respond(request, 423, [("Min-Expires", str(self._policy.min_expires))])]
        expires = min(expires, self._policy.max_expires)
        ok = respond(request, 200, [("Expires", str(expires)), ("Contact", f"<{self._contact}>")])
        if expires == 0:
            # RFC 6665 4.2.1.4: unsubscribing -> a final NOTIFY with "terminated".
            return [ok, *self._end(now, "timeout", with_body=True)]
        self._expires_at = now + expires
        return [ok, *self._send_state(now)]

    def handle_response(self, response: SipResponse, now: float) -> list[SubscriptionEffect]:
        """The final response to one of our NOTIFY requests."""
        number, method = response.cseq
        if adopt_auth_retry(number, self._outstanding, self._dialog.local_cseq):
            self._outstanding = (self._outstanding - {number - 1}) | {number}
            self._dialog = self._dialog.with_local_cseq(number)
        if method != "NOTIFY" or number not in self._outstanding or response.status < 200:
            return []
        self._outstanding = self._outstanding - {number} or _NONE_OUTSTANDING
        if self.state is NotifierState.TERMINATED:
            return []
        if response.status < 300:
            return self._send_state(now) if self._queued else []
        retry_after = retry_after_value(response)
        if retry_after is None or response.status == 481:
            # RFC 6665 4.2.2: a NOTIFY failing with an error (and no Retry-After) or a 481
            # removes the subscription; the subscriber is gone or no longer wants it.
            self.state = NotifierState.TERMINATED
            return [SubscriptionEnded(f"notify-failed-{response.status}")]
        self._queued = True
        self._retry_at = now + retry_after
        return []

    def handle_timeout(self, cseq: int, now: float) -> list[SubscriptionEffect]:
        """Our NOTIFY with CSeq ``cseq`` timed out: RFC 6665 4.2.2 removes the subscription."""
        if cseq not in self._outstanding:
            return []
        self._outstanding = self._outstanding - {cseq} or _NONE_OUTSTANDING
        if self.state is NotifierState.TERMINATED:
            return []
        self.state = NotifierState.TERMINATED
        return [SubscriptionEnded("notify-timeout")]

    # -- timers --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """Expiry, or the retry of a NOTIFY refused with Retry-After."""
        if self.state is NotifierState.TERMINATED:
            return None
        if self._retry_at is not None and not self._outstanding:
            return min(self._retry_at, self._expires_at)
        return self._expires_at

    def handle_timer(self, now: float) -> list[SubscriptionEffect]:
        """Expire the subscription (RFC 6665 4.2.2: reason=timeout) or retry a NOTIFY."""
        if self.state is NotifierState.TERMINATED:
            return []
        if now >= self._expires_at:
            return self._end(now, "timeout")
        if self._retry_at is not None and now >= self._retry_at and not self._outstanding:
            return self._send_state(now)
        return []

    # -- persistence ---------------------------------------------------------------------

    def snapshot(self) -> NotifierSnapshot:
        """The state to persist; NOTIFYs in flight are not kept."""
        return NotifierSnapshot(
            **dialog_fields(self._dialog),
            state=self.state.value,
            contact=self._contact,
            event=str(self._event),
            expires_at=self._expires_at,
            body=self._body,
            content_type=self._content_type,
        )

    def unchanged_since(self, saved: NotifierSnapshot) -> bool:
        """True when ``saved`` still holds this notifier's state, but for the body and a local
        CSeq at or below its own (a store keeps it ahead): nothing a restart needs has moved.

        Compared field by field without building a snapshot: it is asked after every NOTIFY
        sent or answered, and ``snapshot()`` was a third of that check's CPU.
        """
        d = self._dialog
        return (
            d.local_cseq <= saved.local_cseq
            and self._expires_at == saved.expires_at
            and self.state.value == saved.state
            and d.remote_cseq == saved.remote_cseq
            and d.remote_target == saved.remote_target
            and self._content_type == saved.content_type
            and d.call_id == saved.call_id
            and d.local_tag == saved.local_tag
            and d.remote_tag == saved.remote_tag
            and d.local_uri == saved.local_uri
            and d.remote_uri == saved.remote_uri
            and d.route_set == saved.route_set
            and d.secure == saved.secure
            and self._contact == saved.contact
            and str(self._event) == saved.event
        )

    @classmethod
    def restore(cls, snap: NotifierSnapshot, *, policy: NotifierPolicy | None = None) -> Notifier:
        """Rebuild a notifier after a restart; an expired one ends at the next ``handle_timer``."""
        return cls(
            dialog_from(snap),
            parse_event(snap.event),
            contact=snap.contact,
            expires_at=snap.expires_at,
            state=NotifierState(snap.state),
            body=snap.body,
            content_type=snap.content_type,
            policy=policy,
        )
