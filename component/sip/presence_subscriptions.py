"""The subscriptions the gateway holds at the SIP presence server (DESIGN 5.3): the gateway as
RFC 6665 subscriber.

``PresenceSubscriptions`` SUBSCRIBEs to a SIP user through the proxy when presence asks (an XMPP
user wants to see them), keeps one ``Subscriber`` per (XMPP watcher, SIP user), and turns the
NOTIFYs and failures into what the server said (``SubscriptionActive`` with the PIDF document,
``SubscriptionPending``, ``SubscriptionRefused``). Terminations that invite another try
(timeout, deactivated, a transient failure) subscribe again later, without telling presence. A
subscriber is written to the store when a field a restart needs changes, and ``rebuild``
resumes them after a restart, the refreshes that fell due while we were down spread at a
bounded rate.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from component.addresses import AddressError
from component.logs import get_logger
from component.sip.deadlines import DeadlineHeap
from component.sip.dialog_state import (
    DialogParts,
    fresh,
    needs_saving,
    reserved,
    snapshot_from_json,
    snapshot_json,
)
from component.sip.watch_dialogs import PIDF, Answerable, peer_for
from component.store import SubscriptionState, XmppWatcherSubscription
from component.values import (
    SipSubscription,
    SubscribeOutcome,
    SubscriptionActive,
    SubscriptionPending,
    SubscriptionRefused,
)
from sipside import pidf
from sipside.errors import PeerError
from sipside.message import SipRequest, SipResponse, make_response
from sipside.peer import Peer
from sipside.subscription import (
    SendRequest,
    SendResponse,
    StateChanged,
    Subscriber,
    SubscriberSnapshot,
    SubscriberState,
    SubscriptionEffect,
    resubscribe_delay,
)
from sipside.subscription import SubscriptionState as SipSubState

log = get_logger("component.sip.presence_subscriptions")

__all__ = [
    "RESTORE_RATE",
    "TRANSIENT_RETRY",
    "HeldSubscription",
    "PresenceSubscriptions",
    "read_pidf",
]

_NO_RETRY = frozenset({"rejected", "noresource", "invariant"})
_TRANSIENT = frozenset({408, 480, 500, 503, 504})  # RFC 3261 21: worth another try later
TRANSIENT_RETRY = 30.0
# Overdue refreshes after a restart leave at most this many per second (on average): the
# spread window grows with their number beyond ``restore_spread``.
RESTORE_RATE = 100.0

# (XMPP watcher's bare JID, SIP user's AOR): one subscription per pair.
_Pair = tuple[str, str]


def read_pidf(body: bytes, content_type: str | None) -> pidf.PresenceDocument | None:
    """A PIDF body as a document; None for an empty or unreadable one (shown unavailable)."""
    if not body:
        # Kamailio's first NOTIFY before any PUBLISH has no body: unknown, shown offline.
        return None
    try:
        return pidf.decode(body, content_type)
    except PeerError as exc:
        log.info("notify_body_unreadable", error=str(exc))
        return None


@dataclass(slots=True)
class HeldSubscription:
    """An XMPP user watching a SIP user: our subscriber, or a resubscribe owed at ``retry_at``."""

    subscriber: Subscriber
    # (watcher, AOR): the key in every index, one tuple for all of them.
    pair: _Pair
    sip_jid: str
    unsubscribing: bool = False
    retry_at: float | None = None
    saved: SubscriberSnapshot | None = None

    @property
    def watcher_jid(self) -> str:
        """The XMPP user's bare JID."""
        return self.pair[0]

    @property
    def sip_aor(self) -> str:
        """The SIP user's AOR."""
        return self.pair[1]


def _deadline(held: HeldSubscription) -> float | None:
    return held.retry_at if held.retry_at is not None else held.subscriber.next_deadline()


def _stored_state(state: SubscriberState) -> SubscriptionState:
    match state:
        case SubscriberState.ACTIVE | SubscriberState.UNSUBSCRIBING:
            return SubscriptionState.ACTIVE
        case SubscriberState.TERMINATED:
            return SubscriptionState.TERMINATED
        case _:
            return SubscriptionState.PENDING


class PresenceSubscriptions:
    """Our subscribers at the SIP presence server, keyed by (watcher, AOR) (DESIGN 5.3)."""

    def __init__(
        self, parts: DialogParts, *, expires: int, restore_spread: float, rng: random.Random
    ) -> None:
        self.book, self.events = parts.book, parts.events
        self.transactions, self.store = parts.transactions, parts.store
        self.expires = expires
        self.restore_spread = restore_spread
        self.rng = rng
        self.held: dict[_Pair, HeldSubscription] = {}
        # (Call-ID, our tag) of each subscriber's dialog, to find it from a NOTIFY.
        self._by_dialog: dict[tuple[str, str], _Pair] = {}
        self._deadlines: DeadlineHeap[_Pair] = DeadlineHeap()

    # --- what presence asks ---------------------------------------------------------------

    async def subscribe(self, sub: SipSubscription, now: float) -> SubscribeOutcome:
        """SUBSCRIBE to ``sub.sip_aor`` for ``sub.watcher_jid``, unless one is live."""
        held = self.held.get((sub.watcher_jid, sub.sip_aor))
        if held is not None and not held.unsubscribing and held.retry_at is None:
            if held.subscriber.state is SubscriberState.ACTIVE:
                return SubscribeOutcome.ACTIVE
            return SubscribeOutcome.PENDING
        await self._start(sub.watcher_jid, sub.sip_jid, sub.sip_aor, now)
        return SubscribeOutcome.STARTED

    async def unsubscribe(self, watcher_jid: str, sip_aor: str, now: float) -> None:
        """SUBSCRIBE Expires: 0 in the subscription's dialog (RFC 6665 4.1.2.3)."""
        held = self.held.get((watcher_jid, sip_aor))
        if held is None:
            return
        held.unsubscribing = True
        if held.retry_at is not None:
            await self._drop(held)
            return
        await self._run(held, held.subscriber.unsubscribe(now), now)

    async def _start(self, watcher_jid: str, sip_jid: str, aor: str, now: float) -> None:
        subscriber = Subscriber(
            local_uri=f"<{self.book.sip_uri_for_jid(watcher_jid)}>",
            remote_uri=f"<{aor}>",
            contact=self.transactions.contact_for("udp"),
            event="presence",
            expires=self.expires,
            accept=(PIDF,),
            # Spread refreshes of many subscriptions over a few seconds.
            refresh_offset=self.rng.uniform(0.0, 10.0),
        )
        old = self.held.get((watcher_jid, aor))
        if old is not None:
            self._forget_dialog(old)
        # The watcher's JID repeats in each of its subscriptions: one string for all of them.
        held = HeldSubscription(subscriber, (sys.intern(watcher_jid), aor), sip_jid)
        self.held[held.pair] = held
        self._index(held)
        log.info("xmpp_watcher_subscribing", jid=watcher_jid, sip_uri=aor)
        await self._run(held, subscriber.start(now), now)

    # --- what the SIP presence server says ------------------------------------------------

    async def on_notify(self, incoming: Answerable, now: float) -> None:
        """A NOTIFY in one of our subscriptions' dialogs."""
        request = incoming.request
        pair = self._by_dialog.get((request.call_id, request.to_tag or ""))
        held = self.held.get(pair) if pair is not None else None
        if held is None:
            # RFC 6665 4.1.3: a NOTIFY for no subscription of ours.
            incoming.send(make_response(request, 481))
            return
        await self._run(held, held.subscriber.handle_notify(request, now), now, incoming)

    async def _changed(self, held: HeldSubscription, change: StateChanged, now: float) -> None:
        bob, sip_jid = held.watcher_jid, held.sip_jid
        match change.state:
            case SipSubState.ACTIVE:
                document = read_pidf(change.body, change.content_type)
                await self.events.presence_server_said(
                    SubscriptionActive(bob, sip_jid, document), now
                )
            case SipSubState.PENDING:
                # RFC 6665 4.1.3: not decided yet.
                await self.events.presence_server_said(SubscriptionPending(bob, sip_jid), now)
            case SipSubState.TERMINATED:
                await self._ended(held, change, now)

    async def _ended(self, held: HeldSubscription, change: StateChanged, now: float) -> None:
        if held.unsubscribing:
            return
        if change.status in _TRANSIENT:
            # The presence server or the path is down for now: not a refusal, try later.
            delay: float | None = float(change.retry_after or TRANSIENT_RETRY)
        elif change.reason in _NO_RETRY or (change.status is not None and change.status >= 400):
            delay = None
        else:
            delay = resubscribe_delay(change.reason, change.retry_after)
        if delay is None:
            # RFC 6665 4.1.3 rejected/noresource, or the SUBSCRIBE failed: refused for good.
            news = SubscriptionRefused(held.watcher_jid, held.sip_jid)
            await self.events.presence_server_said(news, now)
            return
        # RFC 6665 4.1.3 timeout/deactivated/probation: subscribe again after the delay.
        held.retry_at = now + max(delay, 1.0)

    # --- the subscribers' effects, outcomes and timers ------------------------------------

    async def _run(
        self,
        held: HeldSubscription,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: Answerable | None = None,
    ) -> None:
        sub = held.subscriber
        for effect in effects:
            match effect:
                case SendResponse(response):
                    if incoming is not None:
                        incoming.send(response)
                case SendRequest(request):
                    peer = peer_for(request) if sub.dialog.confirmed else None
                    self._send(held.pair, sub.dialog.call_id, request, peer)
                case StateChanged() as change:
                    await self._changed(held, change, now)
        if self.held.get(held.pair) is not held:
            return
        if held.retry_at is None and sub.state is SubscriberState.TERMINATED:
            await self._drop(held)
            return
        self._index(held)
        self._deadlines.set(held.pair, _deadline(held))
        snap = sub.snapshot()
        # The remote CSeq is not needed (a restarted subscriber accepts the next NOTIFY either
        # way); times count once they move noticeably.
        if not needs_saving(
            held.saved, snap, ignore=("remote_cseq",), slack=("expires_at", "refresh_at")
        ):
            return  # e.g. a NOTIFY that only repeats the state, or a 2xx to a refresh
        held.saved = saved = reserved(snap)
        await self.store.save_xmpp_watcher_subscription(
            XmppWatcherSubscription(
                watcher_jid=held.watcher_jid,
                sip_aor=held.sip_aor,
                state=_stored_state(sub.state),
                dialog=snapshot_json(saved),
                expires_at=sub.expires_at,
            )
        )

    def _send(self, pair: _Pair, call_id: str, request: SipRequest, peer: Peer | None) -> None:
        cseq = request.cseq[0]

        async def deliver(response: SipResponse | None, now: float) -> None:
            # A reply for a subscriber since replaced (resubscribe) is stale: its dialog is gone.
            held = self.held.get(pair)
            if held is None or held.subscriber.dialog.call_id != call_id:
                return
            if response is None:
                effects = held.subscriber.handle_timeout(cseq, now)
            elif response.call_id == call_id:
                effects = held.subscriber.handle_response(response, now)
            else:
                return
            await self._run(held, effects, now)

        self.transactions.send(request, peer, deliver)

    def _index(self, held: HeldSubscription) -> None:
        dialog = held.subscriber.dialog
        self._by_dialog[(dialog.call_id, dialog.local_tag)] = held.pair

    def _forget_dialog(self, held: HeldSubscription) -> None:
        dialog = held.subscriber.dialog
        self._by_dialog.pop((dialog.call_id, dialog.local_tag), None)

    async def _drop(self, held: HeldSubscription) -> None:
        self.held.pop(held.pair, None)
        self._deadlines.set(held.pair, None)
        self._forget_dialog(held)
        await self.store.delete_xmpp_watcher_subscription(held.watcher_jid, held.sip_aor)

    def next_deadline(self) -> float | None:
        """The earliest refresh, expiry or owed resubscribe."""
        return self._deadlines.earliest()

    async def handle_timer(self, now: float, limit: int | None = None) -> int:
        """Refresh or expire up to ``limit`` due subscribers, or subscribe again where a retry
        fell due; returns how many ran."""
        due = self._deadlines.pop_due(now, limit)
        for pair in due:
            held = self.held.get(pair)
            if held is None:
                continue
            if held.retry_at is not None:
                await self._start(held.watcher_jid, held.sip_jid, held.sip_aor, now)
            else:
                await self._run(held, held.subscriber.handle_timer(now), now)
        return len(due)

    # --- restart (DESIGN 8) ---------------------------------------------------------------

    async def load(self) -> list[XmppWatcherSubscription]:
        """The stored subscriptions ``rebuild`` resumes.

        Rows without a dialog never got an answer; the next subscribe re-creates them. Those
        already held stay as they are (a takeover resumes only what it moved).
        """
        return [
            sub
            for sub in await self.store.xmpp_watcher_subscriptions()
            if sub.dialog and (sub.watcher_jid, sub.sip_aor) not in self.held
        ]

    async def rebuild(self, stored: Sequence[XmppWatcherSubscription], now: float) -> int:
        """Resume ``stored`` subscriptions as of ``now``; returns the count held.

        Work that fell due while we were down is spread evenly over ``restore_spread`` seconds,
        or over a longer window if that would exceed ``RESTORE_RATE`` requests per second, so
        thousands of refreshes do not leave in one burst.
        """
        rows = [(sub, sub.dialog) for sub in stored if sub.dialog is not None]
        window = max(self.restore_spread, len(rows) / RESTORE_RATE)
        slots = list(range(len(rows)))
        self.rng.shuffle(slots)  # an even rate, in no particular order of watchers
        contact = self.transactions.contact_for("udp")
        for slot, (sub, dialog) in zip(slots, rows, strict=True):
            try:
                snap = snapshot_from_json(SubscriberSnapshot, dialog)
                if snap.contact != contact:
                    # Held by another instance that died (DESIGN 9), or our address changed:
                    # the notifier sends to the old Contact, so subscribe afresh from here.
                    sip_jid = self.book.jid_for_sip_uri(sub.sip_aor)
                    await self._start(sub.watcher_jid, sip_jid, sub.sip_aor, now)
                    continue
                subscriber = Subscriber.restore(
                    snap,
                    now,
                    spread=(slot + self.rng.random()) * window / len(rows),
                    refresh_offset=self.rng.uniform(0.0, 10.0),
                )
                # Copies of the row's strings (``fresh``): the rows are freed whole.
                pair = (sys.intern(fresh(sub.watcher_jid)), fresh(sub.sip_aor))
                sip_jid = self.book.jid_for_sip_uri(pair[1])
            except (KeyError, TypeError, ValueError, AddressError) as exc:
                log.warning("subscription_unrestorable", jid=sub.watcher_jid, error=str(exc))
                await self.store.delete_xmpp_watcher_subscription(sub.watcher_jid, sub.sip_aor)
                continue
            held = HeldSubscription(subscriber, pair, sip_jid, saved=snap)
            self.held[held.pair] = held
            self._index(held)
            self._deadlines.set(held.pair, _deadline(held))
        return len(self.held)
