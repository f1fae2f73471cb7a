"""XMPP users watching SIP users (DESIGN 5.3): the gateway as RFC 6665 subscriber.

``XmppWatchers`` turns ``<presence type="subscribe">`` to a SIP user's component JID into a
SUBSCRIBE to the SIP user through the proxy, keeps one ``Subscriber`` per (XMPP watcher, SIP
user), and turns the NOTIFYs into ``subscribed`` / ``unsubscribed`` and presence. Terminations
that invite another try (timeout, deactivated, a transient failure) subscribe again later.
Without a SIP presence server the state of DESIGN 5.4 answers instead. Every subscriber is
written to the store, and ``restore`` resumes them after a restart (DESIGN 8).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass

from component.addresses import AddressBook, AddressError
from component.events import Presence
from component.logs import get_logger
from component.presence_ports import (
    PIDF,
    IncomingLike,
    MachineKind,
    ReplyTo,
    SipPort,
    XmppPort,
    is_approved,
    peer_for,
    send_presence,
    snapshot_json,
)
from component.presence_users import SipUsers
from component.store import (
    ApprovalDirection,
    ApprovalState,
    JsonObject,
    StorePort,
    SubscriptionState,
    XmppWatcherSubscription,
)
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

__all__ = ["TRANSIENT_RETRY", "HeldSubscription", "XmppWatchers"]

_NO_RETRY = frozenset({"rejected", "noresource", "invariant"})
_TRANSIENT = frozenset({408, 480, 500, 503, 504})  # RFC 3261 21: worth another try later
TRANSIENT_RETRY = 30.0

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

    @property
    def pair(self) -> _Pair:
        """The key the subscription is held under."""
        return (self.watcher_jid, self.sip_aor)


def _subscriber_snapshot(data: JsonObject) -> SubscriberSnapshot:
    values = dict(data)
    values["route_set"] = tuple(values["route_set"])
    values["accept"] = tuple(values["accept"])
    return SubscriberSnapshot(**values)


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
        await self.store.save_xmpp_watcher_subscription(
            XmppWatcherSubscription(
                watcher_jid=held.watcher_jid,
                sip_aor=held.sip_aor,
                state=_stored_state(sub.state),
                dialog=snapshot_json(sub.snapshot()),
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
        times = [
            h.retry_at if h.retry_at is not None else h.subscriber.next_deadline()
            for h in self.held.values()
        ]
        return min((t for t in times if t is not None), default=None)

    async def handle_timer(self, now: float) -> None:
        """Refresh or expire due subscribers; subscribe again where a retry fell due."""
        for held in list(self.held.values()):
            if held.retry_at is not None:
                if held.retry_at <= now:
                    await self._start(held.watcher_jid, held.sip_jid, held.sip_aor, now)
                continue
            due = held.subscriber.next_deadline()
            if due is not None and due <= now:
                await self._run(held, held.subscriber.handle_timer(now), now)

    # --- restart (DESIGN 8) ---------------------------------------------------------------

    async def restore(self, now: float) -> int:
        """Rebuild the subscribers from the store; returns the count.

        Refreshes that fell due while we were down are spread over ``restore_spread`` seconds,
        so thousands of them do not leave in one burst.
        """
        for sub in await self.store.xmpp_watcher_subscriptions():
            if sub.dialog is None:
                continue  # the SUBSCRIBE never got an answer; re-created on the next subscribe
            try:
                subscriber = Subscriber.restore(
                    _subscriber_snapshot(sub.dialog),
                    now,
                    spread=self.rng.uniform(0.0, self.restore_spread),
                    refresh_offset=self.rng.uniform(0.0, 10.0),
                )
                sip_jid = self.book.jid_for_sip_uri(sub.sip_aor)
            except (KeyError, TypeError, ValueError, AddressError) as exc:
                log.warning("subscription_unrestorable", jid=sub.watcher_jid, error=str(exc))
                await self.store.delete_xmpp_watcher_subscription(sub.watcher_jid, sub.sip_aor)
                continue
            held = HeldSubscription(subscriber, sub.watcher_jid, sip_jid, sub.sip_aor)
            self.held[held.pair] = held
            self._index(held)
        return len(self.held)

    def watched_aors(self) -> set[str]:
        """The SIP users some XMPP user subscribes to."""
        return {h.sip_aor for h in self.held.values()}
