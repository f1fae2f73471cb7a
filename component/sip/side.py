"""The SIP side the features see: ``component.ports.SipPort``, and presence requests in as values.

``SipSide`` implements the one ``SipPort``: MESSAGEs out through ``SipSender`` (DESIGN 4), and
presence's dialogs (DESIGN 5) as values. It is also the one object the SIP gate hands SUBSCRIBE,
NOTIFY, PUBLISH and REGISTER to (``handle_request``): it runs them through the serialised core
driver and dispatches each to the module that owns its dialogs (``watch_dialogs`` 5.2,
``presence_subscriptions`` 5.3, ``publications`` 5.4), which tell the presence core what SIP
said.
Overload (DESIGN 8): a new SUBSCRIBE or PUBLISH that would wait behind ``max_waiting``
requests, or that arrives while stopping, is refused with 503 and Retry-After.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from component.addresses import AddressBook
from component.errors import busy
from component.logs import get_logger
from component.ports import MessageSender, SipPort
from component.presence.core import PresenceCore
from component.sip.dialog_state import DialogParts
from component.sip.presence_subscriptions import PresenceSubscriptions
from component.sip.publications import Publications
from component.sip.transactions import Sends, Serial
from component.sip.watch_dialogs import Answerable, WatchDialogs
from component.store import StorePort, XmppWatcherSubscription
from component.values import ImdnAsk, ImdnStatus, SipSubscription, SubscribeOutcome, Watch
from sipside.message import SipRequest
from sipside.pidf import PresenceDocument

log = get_logger("component.sip")

__all__ = ["PRESENCE_METHODS", "TIMER_BATCH", "Incoming", "ResumeState", "SipSide"]

PRESENCE_METHODS = ("SUBSCRIBE", "NOTIFY", "PUBLISH", "REGISTER")
# Dialogs fired per ``handle_timer`` call: the driver calls again at once while more are due,
# and other work (answers, stanzas) gets the lock in between.
TIMER_BATCH = 200
_RETRY_AFTER = 5  # seconds a refused SUBSCRIBE/PUBLISH is asked to wait (RFC 3261 20.33)


class Incoming(Answerable, Protocol):
    """An incoming request (``sipside.endpoint.IncomingRequest``)."""

    answered: bool

    def respond(
        self, status: int, reason: str | None = None, *, headers: Iterable[tuple[str, str]] = ()
    ) -> Any:
        """Send a final response built from the request."""
        ...


class Driver(Serial, Protocol):
    """What the SIP side needs of the serialised core driver."""

    @property
    def closed(self) -> bool:
        """True once stopped: the core is not called any more."""
        ...


@dataclass(frozen=True, slots=True)
class ResumeState:
    """What ``SipSide.resume_stored`` found: counts, and the subscriptions to rebuild."""

    sip_watchers: int
    publications: int
    subscriptions: tuple[XmppWatcherSubscription, ...]


def _creates_work(request: SipRequest) -> bool:
    """A request that starts something new: an initial SUBSCRIBE, or a PUBLISH."""
    return request.method == "PUBLISH" or (request.method == "SUBSCRIBE" and not request.to_tag)


class SipSide:
    """SIP presence requests in, presence's dialogs out (implements ``SipPort``).

    ``presence`` builds the presence core with this object as its SIP port; the dialog modules
    then tell that core what SIP said.
    """

    def __init__(
        self,
        book: AddressBook,
        *,
        driver: Driver,
        transactions: Sends,
        sender: MessageSender,
        store: StorePort,
        presence: Callable[[SipPort], PresenceCore],
        max_waiting: int = 500,
        expires: int = 3600,
        restore_spread: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.driver = driver
        self.sender = sender
        self.max_waiting = max_waiting
        self._requests = 0  # SIP requests waiting for (or holding) the core
        self.presence = presence(self)
        parts = DialogParts(book, self.presence, transactions, store)
        self.watches = WatchDialogs(parts)
        self.subscriptions = PresenceSubscriptions(
            parts,
            expires=expires,
            restore_spread=restore_spread,
            rng=rng or random.Random(),
        )
        self.publications = Publications(events=self.presence, store=store)

    @property
    def requests_waiting(self) -> int:
        """SIP requests waiting for (or holding) the core: what ``max_waiting`` bounds."""
        return self._requests

    # --- requests in ----------------------------------------------------------------------

    async def handle_request(self, incoming: Incoming) -> None:
        """Answer a SUBSCRIBE/NOTIFY/PUBLISH/REGISTER, after awaiting the serialised core.

        Raises ``Refusal`` (503 busy) or ``PeerError`` for the gate to answer with.
        """
        request = incoming.request
        if self.driver.closed or (
            _creates_work(request) and (self.driver.closing or self._requests >= self.max_waiting)
        ):
            log.info(
                "presence_request_refused",
                method=request.method,
                call_id=request.call_id,
                waiting=self._requests,
            )
            raise busy("presence is overloaded or stopping", _RETRY_AFTER)
        self._requests += 1
        try:
            await self.driver.call(lambda now: self.on_request(incoming, now))
        finally:
            self._requests -= 1
        if not incoming.answered:
            # Only when the driver stopped meanwhile: a fallback, never normal.
            incoming.respond(500, "Internal Server Error")

    async def on_request(self, incoming: Answerable, now: float) -> None:
        """Dispatch a request to the module owning its dialogs; peer errors propagate."""
        match incoming.request.method:
            case "SUBSCRIBE":
                await self.watches.on_subscribe(incoming, now)
            case "NOTIFY":
                await self.subscriptions.on_notify(incoming, now)
            case "PUBLISH":
                await self.publications.on_publish(incoming, now)
            case "REGISTER":
                await self.publications.on_register(incoming, now)
            case _:
                raise AssertionError(f"not a presence request: {incoming.request.method}")

    # --- SipPort ------------------------------------------------------------------------

    async def send_text(
        self,
        *,
        from_uri: str,
        to_uri: str,
        body: str,
        from_display: str | None = None,
        imdn: ImdnAsk | None = None,
        sent_at: float | None = None,
    ) -> int:
        """See ``SipPort``: a MESSAGE through the proxy, its final status."""
        return await self.sender.send_text(
            from_uri=from_uri,
            to_uri=to_uri,
            body=body,
            from_display=from_display,
            imdn=imdn,
            sent_at=sent_at,
        )

    def start_text(
        self, *, from_uri: str, to_uri: str, body: str, done: Callable[[int], None]
    ) -> bool:
        """See ``SipPort``."""
        return self.sender.start_text(from_uri=from_uri, to_uri=to_uri, body=body, done=done)

    async def send_composing(
        self, *, from_uri: str, to_uri: str, active: bool, refresh: int | None
    ) -> int:
        """See ``SipPort``."""
        return await self.sender.send_composing(
            from_uri=from_uri, to_uri=to_uri, active=active, refresh=refresh
        )

    async def send_notification(
        self, *, from_uri: str, to_uri: str, message_id: str, sent_at: float, status: ImdnStatus
    ) -> int:
        """See ``SipPort``."""
        return await self.sender.send_notification(
            from_uri=from_uri, to_uri=to_uri, message_id=message_id, sent_at=sent_at, status=status
        )

    async def notify_watch(self, watch: Watch, document: PresenceDocument, now: float) -> None:
        """See ``SipPort``."""
        await self.watches.notify(watch, document, now)

    async def activate_watch(self, watch: Watch, document: PresenceDocument, now: float) -> None:
        """See ``SipPort``."""
        await self.watches.activate(watch, document, now)

    async def end_watch(self, watch: Watch, reason: str, now: float, *, pending_only: bool) -> None:
        """See ``SipPort``."""
        await self.watches.end(watch, reason, now, pending_only=pending_only)

    def active_watches(self) -> list[Watch]:
        """See ``SipPort``."""
        return self.watches.active_watches()

    async def subscribe(self, sub: SipSubscription, now: float) -> SubscribeOutcome:
        """See ``SipPort``."""
        return await self.subscriptions.subscribe(sub, now)

    async def unsubscribe(self, watcher_jid: str, sip_aor: str, now: float) -> None:
        """See ``SipPort``."""
        await self.subscriptions.unsubscribe(watcher_jid, sip_aor, now)

    # --- timers, restart (DESIGN 8) -------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` has work (cheap: each part keeps a heap)."""
        # Asked after every call into presence (twice a NOTIFY): no generator, no tuple.
        earliest = self.watches.next_deadline()
        for other in (self.subscriptions.next_deadline(), self.publications.next_deadline()):
            if other is not None and (earliest is None or other < earliest):
                earliest = other
        return earliest

    async def handle_timer(self, now: float, limit: int = TIMER_BATCH) -> None:
        """Fire up to ``limit`` due dialogs: notifier expiry, subscriber refresh/expiry,
        resubscribe; then expired publications. ``next_deadline`` stays due if more are left."""
        ran = await self.watches.handle_timer(now, limit)
        await self.subscriptions.handle_timer(now, max(0, limit - ran))
        await self.publications.handle_timer(now)

    async def resume(self, now: float) -> tuple[int, int, int]:
        """Rebuild notifiers, subscribers and publications from the store after a restart.

        Returns the counts (SIP watchers, XMPP watchers, publications).
        """
        return await self.resume_subscribers(await self.resume_stored(), now)

    async def resume_stored(self) -> ResumeState:
        """``resume``, first part (the slow one): notifiers, publications, stored subscribers."""
        sip_watchers = await self.watches.restore()
        subscriptions = await self.subscriptions.load()
        publications = await self.publications.restore()
        return ResumeState(sip_watchers, publications, tuple(subscriptions))

    async def resume_subscribers(self, state: ResumeState, now: float) -> tuple[int, int, int]:
        """``resume``, second part: the subscribers, their overdue refreshes spread from ``now``
        (a fresh ``now``, so a long first part does not make them all overdue at once)."""
        xmpp_watchers = await self.subscriptions.rebuild(state.subscriptions, now)
        log.info(
            "presence_resumed",
            sip_watchers=state.sip_watchers,
            xmpp_watchers=xmpp_watchers,
            publications=state.publications,
        )
        return state.sip_watchers, xmpp_watchers, state.publications

    def counts(self) -> dict[str, int]:
        """Live dialogs: SIP watchers, XMPP watchers, publications."""
        return {
            "sip_watchers": len(self.watches.dialogs),
            "xmpp_watchers": len(self.subscriptions.held),
            "publications": self.publications.count(),
        }
