"""SIP users' own presence (DESIGN 5.4): registrations, publications and the registrar's commands.

``SipUsers`` decides what a SIP user of the home domain looks like to XMPP: online or offline
from third-party REGISTERs (``Registration``) and the sleep_time sweep, richer state from what
they PUBLISH (``SipUserPublished``; the publications live in ``component.sip.publications``),
or what the user typed to ``sip.registrar``. Every change is stored
as the user's last known presence and sent to each approved XMPP watcher; ``state_of`` and
``presence_to`` serve the watchers of DESIGN 5.3 from the same state.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import replace

from component.addresses import HomeUser
from component.errors import Refusal, not_found
from component.logs import get_logger
from component.ports import UserOnline, UserStateListener
from component.presence.approvals import RESOURCE, Ports, send_presence
from component.presence.translate import XmppPresence, xmpp_for_pidf
from component.store import ApprovalDirection, ApprovalState, PresenceRecord
from component.values import Presence, Registration, SipText, SipUserPublished, SipUserUnpublished
from sipside.pidf import PresenceDocument

log = get_logger("component.presence")

__all__ = ["HELP_TEXT", "SipUsers", "UserState"]

HELP_TEXT = (
    "Commands: online, offline, away [text], dnd [text], help. "
    "They set the presence your XMPP contacts see."
)


class UserState(enum.Enum):
    """What a SIP user asked to look like with a command to ``sip.registrar`` (DESIGN 5.4)."""

    ONLINE = "online"
    OFFLINE = "offline"
    AWAY = "away"
    DND = "dnd"


_COMMAND_REPLY = {
    UserState.ONLINE: "You are online for your XMPP contacts.",
    UserState.OFFLINE: "You are offline for your XMPP contacts.",
    UserState.AWAY: "You are away for your XMPP contacts.",
    UserState.DND: "You are busy (do not disturb) for your XMPP contacts.",
}


class SipUsers:
    """The presence SIP users show on XMPP, and who gets told of it (DESIGN 5.4)."""

    def __init__(
        self,
        ports: Ports,
        *,
        priority: int,
        user_online: UserOnline,
        user_state: UserStateListener,
    ) -> None:
        self.book, self.xmpp, self.store = ports.book, ports.xmpp, ports.store
        self.priority = priority
        self.user_online = user_online
        # The last state written per SIP user's JID: a presence server repeats the same state
        # in every NOTIFY to every watcher, and a write that changes nothing is skipped.
        self._remembered: dict[str, XmppPresence] = {}
        self._reannounce: deque[tuple[str, tuple[str, bool]]] = deque()
        # DESIGN 6: chat rooms show the SIP users' state.
        self.user_state = user_state

    # --- what SIP said ------------------------------------------------------------------

    async def registered(self, registration: Registration, now: float) -> None:
        """A third-party REGISTER: Expires > 0 is online, 0 is offline (DESIGN 5.4)."""
        aor = registration.aor
        seen = await self.store.seen_user(aor)
        was_online = seen is not None and seen.online
        if registration.expires > 0:
            await self.store.mark_user_seen(aor, now, registration.contact, registration.expires)
            if not was_online:
                await self.went_online(aor, now)
        elif was_online:
            await self.store.set_user_offline(aor)
            await self.went_offline(aor, now)

    async def published(self, news: SipUserPublished | SipUserUnpublished, now: float) -> None:
        """A SIP user's published state changed (RFC 3903): the new state to the watchers."""
        jid = self.book.jid_for_sip_uri(news.aor)
        match news:
            case SipUserPublished(aor, document):
                await self.store.mark_user_seen(aor, now)
                state = self.state_from_document(document)
                await self.announce(jid, state, now)
                if state.available:
                    self.shown_online(jid)
            case SipUserUnpublished(_, document, remaining) if remaining:
                await self.announce(jid, self.state_from_document(document), now)
            case SipUserUnpublished(aor):
                # No published state any more: what the registration says (RFC 3903 6: gone).
                self._remembered.pop(jid, None)
                await self.store.clear_presence(jid)
                seen = await self.store.seen_user(aor)
                await self.announce(jid, self.plain_state(seen is not None and seen.online), now)

    def home_user(self, uri: str) -> HomeUser:
        """The home-domain user ``uri`` names; refused with 404 otherwise."""
        target = self.book.classify_request_uri(uri)
        if not isinstance(target, HomeUser):
            raise not_found("not a user of the home SIP domain")
        return target

    # --- online, offline, commands --------------------------------------------------------

    async def went_online(self, aor: str, now: float) -> None:
        """A SIP user is online: their best known state to every approved XMPP watcher."""
        jid = self.book.jid_for_sip_uri(aor)
        state = await self.state_of(jid, aor)
        if not state.available:
            state = self.plain_state(True)
        log.info("sip_user_online", sip_uri=aor)
        await self.announce(jid, state, now)
        self.user_online.user_online(aor)

    async def went_offline(self, aor: str, now: float) -> None:
        """A SIP user is offline: unavailable to every approved XMPP watcher."""
        jid = self.book.jid_for_sip_uri(aor)
        log.info("sip_user_offline", sip_uri=aor)
        await self.announce(jid, self.plain_state(False), now)

    async def command(self, msg: SipText, now: float) -> str | None:
        """A command MESSAGE to ``sip.registrar``: the notice text, None if not a command."""
        word, _, rest = msg.body.strip().partition(" ")
        if word.lower() == "help":
            return HELP_TEXT
        try:
            state = UserState(word.lower())
            user = self.home_user(msg.from_uri)
        except (ValueError, Refusal):
            return None
        status = rest.strip() or None
        show = {UserState.AWAY: "away", UserState.DND: "dnd"}.get(state)
        available = state is not UserState.OFFLINE
        if available:
            await self.store.mark_user_seen(user.uri, now)
        else:
            await self.store.set_user_offline(user.uri)
        presence = XmppPresence(RESOURCE, available, show, status, self.priority)
        await self.announce(user.jid, presence, now)
        if available:
            self.user_online.user_online(user.uri)
        return _COMMAND_REPLY[state]

    async def sweep(self, now: float) -> None:
        """The sleep_time sweep: registrations that ran out make their users offline."""
        for user in await self.store.expire_registrations(now):
            await self.went_offline(user.aor, now)

    # --- the state, and telling the watchers ----------------------------------------------

    def plain_state(self, available: bool) -> XmppPresence:
        """Available or not, with nothing more known: no show, no status."""
        return XmppPresence(RESOURCE, available, priority=self.priority)

    def state_from_document(self, document: PresenceDocument | None) -> XmppPresence:
        """A SIP user's PIDF as their state; no (or an unreadable) document is unavailable."""
        if document is None:
            return self.plain_state(False)
        return xmpp_for_pidf(document, self.priority, RESOURCE)

    async def state_of(self, jid: str, aor: str) -> XmppPresence:
        """A SIP user's last known state: stored presence, else its registration."""
        for record in await self.store.presence_of(jid):
            state = XmppPresence(
                RESOURCE, record.available, record.show, record.status, record.priority
            )
            self._remembered.setdefault(jid, state)  # what the store holds: no need to rewrite
            return replace(state, priority=self.priority)
        seen = await self.store.seen_user(aor)
        return self.plain_state(seen is not None and seen.online)

    async def remember(self, sip_jid: str, state: XmppPresence, now: float) -> bool:
        """Store ``state`` as the SIP user's last known presence (answers probes, DESIGN 8);
        False when it is what was stored already."""
        if self._remembered.get(sip_jid) == state:
            return False
        await self.store.save_presence(
            PresenceRecord(
                sip_jid,
                "",
                available=state.available,
                show=state.show,
                status=state.status,
                priority=state.priority,
                updated_at=now,
            )
        )
        self._remembered[sip_jid] = state  # only once written: a failed write is retried
        return True

    def shown_online(self, sip_jid: str) -> None:
        """A PUBLISH or the presence server shows the SIP user available: messaging records
        them as seen (a later 404 means offline, DESIGN 4.2) and retries what waits for them."""
        self.user_online.user_online(self.book.sip_uri_for_component_jid(sip_jid))

    async def announce(self, sip_jid: str, state: XmppPresence, now: float) -> None:
        """Remember ``state`` and send it to every approved XMPP watcher of ``sip_jid``."""
        await self.remember(sip_jid, state, now)
        self._tell_state(sip_jid, state)
        for approval in await self.store.approvals(sip_jid=sip_jid):
            if (
                approval.direction is ApprovalDirection.XMPP_WATCHES_SIP
                and approval.state is ApprovalState.APPROVED
            ):
                send_presence(self.xmpp, self.presence_to(sip_jid, approval.xmpp_jid, state))

    def _tell_state(self, sip_jid: str, state: XmppPresence) -> None:
        aor = self.book.sip_uri_for_component_jid(sip_jid)
        self.user_state.user_state(aor, state.available, state.show, state.status)

    def presence_to(self, sip_jid: str, watcher: str, state: XmppPresence) -> Presence:
        """The ``<presence>`` that shows ``state`` of a SIP user to one XMPP watcher."""
        return Presence(
            sender=f"{sip_jid}/{RESOURCE}",
            recipient=watcher,
            type=None if state.available else "unavailable",
            show=state.show if state.available else None,
            status=state.status,
            priority=self.priority,
        )

    async def on_link_up(self, now: float) -> None:
        """Re-announce every online SIP user, and those XMPP users watch (DESIGN 8)."""
        await self.plan_reannounce()
        await self.reannounce(now)

    async def plan_reannounce(self) -> None:
        """List the SIP users to re-announce after the link came up; ``reannounce`` sends."""
        todo: dict[str, tuple[str, bool]] = {}  # JID -> (AOR, registered online)
        for user in await self.store.online_users():
            todo.setdefault(self.book.jid_for_sip_uri(user.aor), (user.aor, True))
        for approval in await self.store.approvals():
            jid = approval.sip_jid
            if jid in todo or approval.direction is not ApprovalDirection.XMPP_WATCHES_SIP:
                continue
            todo[jid] = (self.book.sip_uri_for_component_jid(jid), False)
        self._reannounce = deque(todo.items())

    async def reannounce(self, now: float, limit: int | None = None) -> bool:
        """Announce up to ``limit`` planned users (online ones, and watched ones available);
        True while some are left, so a caller can let other work in between."""
        done = 0
        while self._reannounce and (limit is None or done < limit):
            jid, (aor, online) = self._reannounce.popleft()
            done += 1
            state = await self.state_of(jid, aor)
            if online or state.available:
                await self.announce(jid, state, now)
        return bool(self._reannounce)
