"""Presence across the networks (DESIGN 5): the gateway's presence decisions.

``PresenceCore`` takes XMPP ``<presence>`` and what the SIP side says (as values: a watch was
requested or ended, the SIP presence server's word, a publication, a registration) and routes
each to the part that decides: ``SipWatchers`` (SIP users watching XMPP entities, 5.2),
``XmppWatchers`` (XMPP users watching SIP users, 5.3) and ``SipUsers`` (the SIP users' own
state, 5.4). It acts through ports only: ``SipPort``, ``XmppPort``, the store, and
``UserOnline``. SIP dialogs, their timers and their persistence are the SIP adapter's
(``component.sip.side``); the asyncio driving is ``component.runtime.presence_driver``'s.
"""

from __future__ import annotations

from component.addresses import AddressBook, AddressError, bare_jid
from component.logs import get_logger
from component.ports import SipPort, UserOnline, UserStateListener, XmppPort
from component.presence.approvals import Ports
from component.presence.sip_users import HELP_TEXT, SipUsers, UserState
from component.presence.sip_watches_xmpp import SipWatchers
from component.presence.xmpp_watches_sip import XmppWatchers
from component.store import StorePort
from component.values import (
    Presence,
    PresenceServerNews,
    Registration,
    SipText,
    SipUserPublished,
    SipUserUnpublished,
    Watch,
    WatchAnswer,
    WatchRequest,
)
from sipside.pidf import PresenceDocument

log = get_logger("component.presence")

__all__ = ["HELP_TEXT", "PresenceCore", "UserState"]


class PresenceCore:
    """Presence both ways between SIP and XMPP users (DESIGN 5); implements ``PresenceEvents``."""

    def __init__(
        self,
        book: AddressBook,
        *,
        sip: SipPort,
        xmpp: XmppPort,
        store: StorePort,
        user_online: UserOnline,
        user_state: UserStateListener,
        sip_server: bool = True,
        priority: int = 9,
    ) -> None:
        ports = Ports(book, sip, xmpp, store)
        self.users = SipUsers(
            ports, priority=priority, user_online=user_online, user_state=user_state
        )
        self.sip_watchers = SipWatchers(ports)
        self.xmpp_watchers = XmppWatchers(ports, users=self.users, sip_server=sip_server)

    # --- XMPP presence in -----------------------------------------------------------------

    async def on_presence(self, presence: Presence, now: float) -> None:
        """A ``<presence>`` addressed to a component JID."""
        recipient = bare_jid(presence.recipient)
        sender = bare_jid(presence.sender)
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

    # --- what the SIP side says (PresenceEvents) ------------------------------------------

    async def watch_requested(self, request: WatchRequest) -> WatchAnswer:
        """A SIP user asks to watch an XMPP entity (5.2); raises ``Refusal`` to refuse."""
        return await self.sip_watchers.watch_requested(request)

    async def watch_started(self, answer: WatchAnswer, now: float) -> None:
        """A watch was accepted: probe, or ask the XMPP user."""
        await self.sip_watchers.watch_started(answer, now)

    async def watch_ended(self, watch: Watch, now: float) -> None:
        """The watcher's last dialog with the entity ended."""
        await self.sip_watchers.watch_ended(watch, now)

    async def document_of(self, target_jid: str) -> PresenceDocument:
        """An XMPP entity's presence as PIDF (5.1)."""
        return await self.sip_watchers.document_of(target_jid)

    async def presence_server_said(self, news: PresenceServerNews, now: float) -> None:
        """The SIP presence server's word on a subscription we hold (5.3)."""
        await self.xmpp_watchers.presence_server_said(news, now)

    def home_user(self, uri: str) -> str:
        """The AOR of the home-domain user ``uri`` names; raises ``Refusal`` otherwise."""
        return self.users.home_user(uri).uri

    async def published(self, news: SipUserPublished | SipUserUnpublished, now: float) -> None:
        """A SIP user's published state changed (5.4)."""
        await self.users.published(news, now)

    async def registered(self, registration: Registration, now: float) -> None:
        """A third-party REGISTER (5.4)."""
        await self.users.registered(registration, now)

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

    # --- reconnect (DESIGN 8) -------------------------------------------------------------

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
