"""XMPP users watching SIP users (DESIGN 5.3): the gateway as RFC 6665 subscriber.

``XmppWatchers`` turns ``<presence type="subscribe">`` to a SIP user's component JID into a
SUBSCRIBE to the SIP user through the proxy, keeps one ``Subscriber`` per (XMPP watcher, SIP
user), and turns the NOTIFYs into ``subscribed`` / ``unsubscribed`` and presence. Terminations
that invite another try (timeout, deactivated, a transient failure) subscribe again later.
Without a SIP presence server the state of DESIGN 5.4 answers instead. A subscriber is written
to the store when a field a restart needs changes, and ``restore`` resumes them after a restart
(DESIGN 8), with the refreshes that fell due while we were down spread at a bounded rate.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from component.addresses import AddressBook, AddressError
from component.logs import get_logger
from component.ports import XmppPort
from component.presence.shared import (
    PIDF,
    DeadlineHeap,
    IncomingLike,
    MachineKind,
    ReplyTo,
    SipPort,
    is_approved,
    peer_for,
    send_presence,
    snapshot_json,
)
from component.presence.sip_users import SipUsers
from component.store import (
    ApprovalDirection,
    ApprovalState,
    JsonObject,
    StorePort,
    SubscriptionState,
    XmppWatcherSubscription,
)
from component.values import Presence
from sipside.message import SipResponse, make_response
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

log = get_logger("component.presence")

__all__ = ["RESTORE_RATE", "TRANSIENT_RETRY", "HeldSubscription", "XmppWatchers"]

_NO_RETRY = frozenset({"rejected", "noresource", "invariant"})
_TRANSIENT = frozenset({408, 480, 500, 503, 504})  # RFC 3261 21: worth another try later
TRANSIENT_RETRY = 30.0
# Overdue refreshes after a restart leave at most this many per second (on average): the
# spread window grows with their number beyond ``restore_spread``.
RESTORE_RATE = 100.0
# The stored CSeq runs this far ahead (see presence_sipwatch.CSEQ_RESERVE, RFC 3261 12.2.2).
_CSEQ_RESERVE = 64
# A NOTIFY's "expires" counts down in whole seconds, so each one moves the refresh time a
# little; moves this small are not worth a store write (the refresh leaves well before expiry).
_TIME_SLACK = 5.0

# (XMPP watcher's bare JID, SIP user's AOR): one subscription per pair.
_Pair = tuple[str, str]


@dataclass(slots=True)
class HeldSubscription:
    """An XMPP user watching a SIP user: our subscriber, or a resubscribe owed at ``retry_at``."""

    subscriber: Subscriber
    watcher_jid: str
    sip_jid: str
    sip_aor: str
    unsubscribing: bool = False
    retry_at: float | None = None
    saved: SubscriberSnapshot | None = None

    @property
    def pair(self) -> _Pair:
        """The key the subscription is held under."""
        return (self.watcher_jid, self.sip_aor)


def _subscriber_snapshot(data: JsonObject) -> SubscriberSnapshot:
    values = dict(data)
    values["route_set"] = tuple(values["route_set"])
    values["accept"] = tuple(values["accept"])
    return SubscriberSnapshot(**values)


def _moved(saved: float | None, now: float | None) -> bool:
    if saved is None or now is None:
        return saved is not now
    return abs(saved - now) > _TIME_SLACK


def _needs_saving(saved: SubscriberSnapshot | None, snap: SubscriberSnapshot) -> bool:
    """True when ``snap`` differs from the stored one in a field a restart needs.

    The remote CSeq is not one (a restarted subscriber accepts the next NOTIFY either way);
    the local CSeq counts once it passes the stored reserve, times once they move noticeably.
    """
    if saved is None or snap.local_cseq > saved.local_cseq:
        return True
    if _moved(saved.expires_at, snap.expires_at) or _moved(saved.refresh_at, snap.refresh_at):
        return True
    same = replace(
        snap,
        local_cseq=saved.local_cseq,
        remote_cseq=saved.remote_cseq,
        expires_at=saved.expires_at,
        refresh_at=saved.refresh_at,
    )
    return same != saved


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


class XmppWatchers:
    """The subscribers of XMPP watchers of SIP users, keyed by (watcher, AOR) (DESIGN 5.3)."""

    def __init__(
        self,
        book: AddressBook,
        *,
        sip: SipPort,
        xmpp: XmppPort,
        store: StorePort,
        users: SipUsers,
        sip_server: bool,
        expires: int,
        restore_spread: float,
        rng: random.Random,
    ) -> None:
        self.book = book
        self.sip = sip
        self.xmpp = xmpp
        self.store = store
        self.users = users
        self.sip_server = sip_server
        self.expires = expires
        self.restore_spread = restore_spread
        self.rng = rng
        self.held: dict[_Pair, HeldSubscription] = {}
        # (Call-ID, our tag) of each subscriber's dialog, to find it from a NOTIFY.
        self._by_dialog: dict[tuple[str, str], _Pair] = {}
        self._deadlines: DeadlineHeap[_Pair] = DeadlineHeap()

    # --- what Bob asks on XMPP ------------------------------------------------------------

    async def subscribe(self, bob: str, sip_jid: str, now: float) -> None:
        """Bob asks to see a SIP user's presence (DESIGN 5.3)."""
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        if not self.sip_server:
            # DESIGN 5.3: no presence server on the SIP side: approve and derive the state.
            await self._grant(bob, sip_jid, now, again=True)
            await self._send_state(bob, sip_jid, aor)
            return
        held = self.held.get((bob, aor))
        if held is not None and not held.unsubscribing and held.retry_at is None:
            if held.subscriber.state is SubscriberState.ACTIVE:
                # A repeated request for a live subscription: confirm it again.
                send_presence(self.xmpp, Presence(sender=sip_jid, recipient=bob, type="subscribed"))
                await self._send_state(bob, sip_jid, aor)
            return
        await self.store.set_approval(
            sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.PENDING, now
        )
        await self._start(bob, sip_jid, aor, now)

    async def unsubscribe(self, bob: str, sip_jid: str, now: float) -> None:
        """Bob no longer watches the SIP user: SUBSCRIBE Expires: 0 (RFC 6665 4.1.2.3)."""
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        await self.store.delete_approval(sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP)
        held = self.held.get((bob, aor))
        if held is None:
            return
        held.unsubscribing = True
        if held.retry_at is not None:
            await self._drop(held)
            return
        await self._run(held, held.subscriber.unsubscribe(now), now)

    async def probe(self, bob: str, sip_jid: str) -> None:
        """RFC 6121 4.3: answer a probe from the last known state, if Bob is approved."""
        if not await is_approved(self.store, sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP):
            return
        await self._send_state(bob, sip_jid, self.book.sip_uri_for_component_jid(sip_jid))

    async def _send_state(self, bob: str, sip_jid: str, aor: str) -> None:
        state = await self.users.state_of(sip_jid, aor)
        send_presence(self.xmpp, self.users.presence_to(sip_jid, bob, state))

    async def _grant(self, bob: str, sip_jid: str, now: float, *, again: bool = False) -> None:
        """Approve Bob (RFC 6121 3.1.5); ``subscribed`` goes once, or ``again`` on request."""
        news = not await is_approved(self.store, sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP)
        if news:
            await self.store.set_approval(
                sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.APPROVED, now
            )
        if news or again:
            send_presence(self.xmpp, Presence(sender=sip_jid, recipient=bob, type="subscribed"))

    async def _start(self, bob: str, sip_jid: str, aor: str, now: float) -> None:
        subscriber = Subscriber(
            local_uri=f"<{self.book.sip_uri_for_jid(bob)}>",
            remote_uri=f"<{aor}>",
            contact=self.sip.contact_for("udp"),
            event="presence",
            expires=self.expires,
            accept=(PIDF,),
            # Spread refreshes of many subscriptions over a few seconds.
            refresh_offset=self.rng.uniform(0.0, 10.0),
        )
        old = self.held.get((bob, aor))
        if old is not None:
            self._forget_dialog(old)
        held = HeldSubscription(subscriber, bob, sip_jid, aor)
        self.held[held.pair] = held
        self._index(held)
        log.info("xmpp_watcher_subscribing", jid=bob, sip_uri=aor)
        await self._run(held, subscriber.start(now), now)

    # --- what the SIP presence server says ------------------------------------------------

    async def on_notify(self, incoming: IncomingLike, now: float) -> None:
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
        """What the SIP presence server said, as XMPP presence to Bob (DESIGN 5.3)."""
        bob, sip_jid = held.watcher_jid, held.sip_jid
        match change.state:
            case SipSubState.ACTIVE:
                await self._grant(bob, sip_jid, now)
                state = self.users.state_from_pidf(change.body, change.content_type)
                await self.users.remember(sip_jid, state, now)
                send_presence(self.xmpp, self.users.presence_to(sip_jid, bob, state))
            case SipSubState.PENDING:
                pass  # RFC 6665 4.1.3: not decided yet; Bob waits (DESIGN 5.3)
            case SipSubState.TERMINATED:
                await self._ended(held, change, now)

    async def _ended(self, held: HeldSubscription, change: StateChanged, now: float) -> None:
        bob, sip_jid = held.watcher_jid, held.sip_jid
        if held.unsubscribing:
            return
        if change.status in _TRANSIENT:
            # The presence server or the path is down for now: not Bob's refusal, try later.
            delay: float | None = float(change.retry_after or TRANSIENT_RETRY)
        elif change.reason in _NO_RETRY or (change.status is not None and change.status >= 400):
            delay = None
        else:
            delay = resubscribe_delay(change.reason, change.retry_after)
        if delay is None:
            # RFC 6665 4.1.3 rejected/noresource, or the SUBSCRIBE failed: Bob is refused.
            await self.store.set_approval(
                sip_jid, bob, ApprovalDirection.XMPP_WATCHES_SIP, ApprovalState.REFUSED, now
            )
            send_presence(self.xmpp, Presence(sender=sip_jid, recipient=bob, type="unsubscribed"))
            return
        # RFC 6665 4.1.3 timeout/deactivated/probation: subscribe again after the delay.
        held.retry_at = now + max(delay, 1.0)

    # --- the subscribers' effects, outcomes and timers ------------------------------------

    async def _run(
        self,
        held: HeldSubscription,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: IncomingLike | None = None,
    ) -> None:
        sub = held.subscriber
        for effect in effects:
            match effect:
                case SendResponse(response):
                    if incoming is not None:
                        incoming.send(response)
                case SendRequest(request):
                    peer = peer_for(request) if sub.dialog.confirmed else None
                    reply = ReplyTo(MachineKind.SUBSCRIBER, held.pair, sub.dialog.call_id)
                    self.sip.send_request(request, peer, reply)
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
        if not _needs_saving(held.saved, snap):
            return  # e.g. a NOTIFY that only repeats the state, or a 2xx to a refresh
        saved = replace(snap, local_cseq=snap.local_cseq + _CSEQ_RESERVE)
        held.saved = saved
        await self.store.save_xmpp_watcher_subscription(
            XmppWatcherSubscription(
                watcher_jid=held.watcher_jid,
                sip_aor=held.sip_aor,
                state=_stored_state(sub.state),
                dialog=snapshot_json(saved),
                expires_at=sub.expires_at,
            )
        )

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

    def _current(self, pair: _Pair, call_id: str) -> HeldSubscription | None:
        # A reply for a subscriber since replaced (resubscribe) is stale: its dialog is gone.
        held = self.held.get(pair)
        return held if held is not None and held.subscriber.dialog.call_id == call_id else None

    async def on_response(
        self, pair: _Pair, call_id: str, response: SipResponse, now: float
    ) -> None:
        """The final response to a SUBSCRIBE sent for ``pair`` in the dialog ``call_id``."""
        held = self._current(pair, call_id)
        if held is not None:
            await self._run(held, held.subscriber.handle_response(response, now), now)

    async def on_timeout(self, pair: _Pair, call_id: str, cseq: int, now: float) -> None:
        """A SUBSCRIBE sent for ``pair`` got no final response."""
        held = self._current(pair, call_id)
        if held is not None:
            await self._run(held, held.subscriber.handle_timeout(cseq, now), now)

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

    async def restore(self, now: float) -> int:
        """Rebuild the subscribers from the store; returns the count (``load`` + ``rebuild``)."""
        return await self.rebuild(await self.load(), now)

    async def load(self) -> list[XmppWatcherSubscription]:
        """The stored subscriptions ``rebuild`` resumes.

        Rows without a dialog never got an answer; the next subscribe re-creates them.
        """
        return [sub for sub in await self.store.xmpp_watcher_subscriptions() if sub.dialog]

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
        for slot, (sub, dialog) in zip(slots, rows, strict=True):
            try:
                snap = _subscriber_snapshot(dialog)
                subscriber = Subscriber.restore(
                    snap,
                    now,
                    spread=(slot + self.rng.random()) * window / len(rows),
                    refresh_offset=self.rng.uniform(0.0, 10.0),
                )
                sip_jid = self.book.jid_for_sip_uri(sub.sip_aor)
            except (KeyError, TypeError, ValueError, AddressError) as exc:
                log.warning("subscription_unrestorable", jid=sub.watcher_jid, error=str(exc))
                await self.store.delete_xmpp_watcher_subscription(sub.watcher_jid, sub.sip_aor)
                continue
            held = HeldSubscription(subscriber, sub.watcher_jid, sip_jid, sub.sip_aor, saved=snap)
            self.held[held.pair] = held
            self._index(held)
            self._deadlines.set(held.pair, _deadline(held))
        return len(self.held)
