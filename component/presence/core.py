"""Presence across the networks (DESIGN 5): the gateway's presence core and its routing.

``PresenceCore`` routes SUBSCRIBE / NOTIFY / PUBLISH / REGISTER, XMPP ``<presence>`` and the
outcomes of the requests it sent to the part that owns them: ``SipWatchers`` (SIP users watching
XMPP entities, 5.2), ``XmppWatchers`` (XMPP users watching SIP users, 5.3) and ``SipUsers``
(the SIP users' own state, 5.4). It talks to the outside only through the ports of
``component.presence.shared``. Every call takes ``now``; the asyncio driving (one timer,
owned tasks, serialised calls) is in ``component.runtime.presence_driver``. Every state change
is written to the store, and ``resume`` rebuilds the machines from it after a restart (DESIGN 8).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from component.addresses import AddressBook, AddressError
from component.errors import Refusal
from component.logs import get_logger
from component.ports import XmppPort
from component.presence.shared import (
    IncomingLike,
    MachineKind,
    ReplyTo,
    SipPort,
)
from component.presence.sip_users import HELP_TEXT, SipUsers, UserState
from component.presence.sip_watches_xmpp import SipWatch, SipWatchers
from component.presence.xmpp_watches_sip import HeldSubscription, XmppWatchers
from component.sip.answers import refusal_headers
from component.store import StorePort, XmppWatcherSubscription
from component.values import Presence, SipText
from sipside.dialog import DialogId
from sipside.errors import PeerError
from sipside.message import SipResponse, make_response

log = get_logger("component.presence")

# Machines fired per ``handle_timer`` call: the runtime calls again at once while more are due,
# and other work (answers, stanzas) gets the lock in between.
TIMER_BATCH = 200

__all__ = [
    "HELP_TEXT",
    "TIMER_BATCH",
    "IncomingLike",
    "MachineKind",
    "PresenceCore",
    "ReplyTo",
    "ResumeState",
    "UserState",
]


@dataclass(frozen=True, slots=True)
class ResumeState:
    """What ``PresenceCore.resume_stored`` found: counts, and the subscriptions to rebuild."""

    sip_watchers: int
    publications: int
    subscriptions: tuple[XmppWatcherSubscription, ...]


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0]


class PresenceCore:
    """Presence both ways between SIP and XMPP users (DESIGN 5), with persistence (DESIGN 8)."""

    def __init__(
        self,
        book: AddressBook,
        *,
        sip: SipPort,
        xmpp: XmppPort,
        store: StorePort,
        sip_server: bool = True,
        priority: int = 9,
        expires: int = 3600,
        restore_spread: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.book = book
        self.sip = sip
        self.xmpp = xmpp
        self.store = store
        self.on_user_online: Callable[[str], None] | None = None
        self.users = SipUsers(
            book, xmpp=xmpp, store=store, priority=priority, user_online=self._user_online
        )
        self.sip_watchers = SipWatchers(book, sip=sip, xmpp=xmpp, store=store)
        self.xmpp_watchers = XmppWatchers(
            book,
            sip=sip,
            xmpp=xmpp,
            store=store,
            users=self.users,
            sip_server=sip_server,
            expires=expires,
            restore_spread=restore_spread,
            rng=rng or random.Random(),
        )

    def _user_online(self, aor: str) -> None:
        if self.on_user_online is not None:
            self.on_user_online(aor)

    # The live machines by key, for tests and introspection.
    @property
    def _watches(self) -> dict[DialogId, SipWatch]:
        return self.sip_watchers.watches

    @property
    def _held(self) -> dict[tuple[str, str], HeldSubscription]:
        return self.xmpp_watchers.held

    # --- SIP requests in ------------------------------------------------------------------

    async def on_sip_request(self, incoming: IncomingLike, now: float) -> None:
        """Answer SUBSCRIBE, NOTIFY, PUBLISH or REGISTER; peer errors are answered here, once."""
        request = incoming.request
        try:
            match request.method:
                case "SUBSCRIBE":
                    await self.sip_watchers.on_subscribe(incoming, now)
                case "NOTIFY":
                    await self.xmpp_watchers.on_notify(incoming, now)
                case "PUBLISH":
                    await self.users.on_publish(incoming, now)
                case "REGISTER":
                    await self.users.on_register(incoming, now)
                case _:
                    incoming.send(make_response(request, 405, headers=[("Allow", "SUBSCRIBE")]))
        except (PeerError, Refusal) as exc:
            status, reason, headers = refusal_headers(exc)
            incoming.send(make_response(request, status, reason, headers=headers))

    # --- XMPP presence in -----------------------------------------------------------------

    async def on_presence(self, presence: Presence, now: float) -> None:
        """A ``<presence>`` addressed to a component JID."""
        recipient = _bare(presence.recipient)
        sender = _bare(presence.sender)
        try:
            await self._on_presence(presence, sender, recipient, now)
        except AddressError as exc:
            # A component JID that names no SIP user (e.g. the bare domain): nothing to do.
            log.info("presence_unroutable", jid=presence.recipient, error=str(exc))

    async def _on_presence(
        self, presence: Presence, sender: str, recipient: str, now: float
    ) -> None:
        # Availability and answers to our subscribe concern SIP watchers of the sender (5.2);
        # requests and probes concern XMPP watchers of the SIP user addressed (5.3).
        match presence.type:
            case None | "unavailable":
                await self.sip_watchers.on_xmpp_state(presence, sender, recipient, now)
            case "subscribed":
                await self.sip_watchers.approved(sender, recipient, now)
            case "unsubscribed":
                await self.sip_watchers.refused(sender, recipient, now)
            case "error":
                await self.sip_watchers.bounced(sender, recipient, now)
            case "subscribe":
                await self.xmpp_watchers.subscribe(sender, recipient, now)
            case "unsubscribe":
                await self.xmpp_watchers.unsubscribe(sender, recipient, now)
            case "probe":
                await self.xmpp_watchers.probe(sender, recipient)
            case _:
                log.debug("presence_ignored", jid=presence.sender, type=presence.type)

    # --- SIP users' own state (DESIGN 5.4) ------------------------------------------------

    async def went_online(self, aor: str, now: float) -> None:
        """A SIP user is online: their best known state to every approved XMPP watcher."""
        await self.users.went_online(aor, now)

    async def went_offline(self, aor: str, now: float) -> None:
        """A SIP user is offline: unavailable to every approved XMPP watcher."""
        await self.users.went_offline(aor, now)

    async def command(self, msg: SipText, now: float) -> str | None:
        """A command MESSAGE to ``sip.registrar``: the notice text, None if not a command."""
        return await self.users.command(msg, now)

    async def sweep(self, now: float) -> None:
        """The sleep_time sweep: registrations that ran out make their users offline."""
        await self.users.sweep(now)

    # --- outcomes of our requests, timers -------------------------------------------------

    async def on_sip_response(self, reply: ReplyTo, response: SipResponse, now: float) -> None:
        """The final response to a request sent with ``reply``."""
        if response.call_id != reply.call_id:
            return
        match reply.key:
            case DialogId() as key:
                await self.sip_watchers.on_response(key, response, now)
            case (str(), str()) as pair:
                await self.xmpp_watchers.on_response(pair, reply.call_id, response, now)

    async def on_sip_timeout(self, reply: ReplyTo, cseq: int, now: float) -> None:
        """A request sent with ``reply`` got no final response (timeout or transport error)."""
        match reply.key:
            case DialogId() as key:
                await self.sip_watchers.on_timeout(key, cseq, now)
            case (str(), str()) as pair:
                await self.xmpp_watchers.on_timeout(pair, reply.call_id, cseq, now)

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` has work (cheap: each part keeps a heap)."""
        times = (
            self.sip_watchers.next_deadline(),
            self.xmpp_watchers.next_deadline(),
            self.users.next_deadline(),
        )
        return min((t for t in times if t is not None), default=None)

    async def handle_timer(self, now: float, limit: int = TIMER_BATCH) -> None:
        """Fire up to ``limit`` due machines: notifier expiry, subscriber refresh/expiry,
        resubscribe; then expired publications. ``next_deadline`` stays due if more are left."""
        ran = await self.sip_watchers.handle_timer(now, limit)
        await self.xmpp_watchers.handle_timer(now, max(0, limit - ran))
        await self.users.handle_timer(now)

    # --- restart and reconnect (DESIGN 8) -------------------------------------------------

    async def resume(self, now: float) -> tuple[int, int, int]:
        """Rebuild notifiers, subscribers and publications from the store after a restart.

        Returns the counts (SIP watchers, XMPP watchers, publications).
        """
        return await self.resume_subscribers(await self.resume_stored(), now)

    async def resume_stored(self) -> ResumeState:
        """``resume``, first part (the slow one): notifiers, publications, stored subscribers."""
        sip_watchers = await self.sip_watchers.restore()
        subscriptions = await self.xmpp_watchers.load()
        publications = await self.users.restore({sub.sip_aor for sub in subscriptions})
        return ResumeState(sip_watchers, publications, tuple(subscriptions))

    async def resume_subscribers(self, state: ResumeState, now: float) -> tuple[int, int, int]:
        """``resume``, second part: the subscribers, their overdue refreshes spread from ``now``
        (a fresh ``now``, so a long first part does not make them all overdue at once)."""
        xmpp_watchers = await self.xmpp_watchers.rebuild(state.subscriptions, now)
        log.info(
            "presence_resumed",
            sip_watchers=state.sip_watchers,
            xmpp_watchers=xmpp_watchers,
            publications=state.publications,
        )
        return state.sip_watchers, xmpp_watchers, state.publications

    async def on_link_up(self, now: float) -> None:
        """The XMPP link is (back) up: re-announce SIP users, probe watched XMPP users."""
        await self.link_up_begin(now)
        while await self.link_up_step(now, None):
            pass

    async def link_up_begin(self, now: float) -> None:
        """``on_link_up`` in steps, first: probe watched XMPP users, plan the re-announce."""
        self.sip_watchers.on_link_up()
        await self.users.plan_reannounce()

    async def link_up_step(self, now: float, limit: int | None) -> bool:
        """Re-announce up to ``limit`` SIP users; True while some are left."""
        return await self.users.reannounce(now, limit)

    def counts(self) -> dict[str, int]:
        """Live machines: SIP watchers, XMPP watchers, publications."""
        return {
            "sip_watchers": len(self.sip_watchers.watches),
            "xmpp_watchers": len(self.xmpp_watchers.held),
            "publications": self.users.count(),
        }
