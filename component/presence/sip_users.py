"""SIP users' own presence (DESIGN 5.4): REGISTER, PUBLISH and the registrar's commands.

``SipUsers`` decides what a SIP user of the home domain looks like to XMPP: online or offline
from third-party REGISTERs and the sleep_time sweep, richer state from PUBLISH (RFC 3903, kept
in a ``PublicationStore``), or what the user typed to ``sip.registrar``. Every change is stored
as the user's last known presence and sent to each approved XMPP watcher; ``state_of`` and
``presence_to`` serve the watchers of DESIGN 5.3 from the same state.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace

from component.addresses import AddressBook, HomeUser
from component.errors import Refusal
from component.logs import get_logger
from component.ports import XmppPort
from component.presence.shared import PIDF, RESOURCE, IncomingLike, send_presence
from component.presence.translate import XmppPresence, xmpp_for_pidf
from component.store import ApprovalDirection, ApprovalState, StorePort
from component.store import Publication as StoredPublication
from component.values import Presence, SipText
from sipside import pidf
from sipside.dialog import address_uri
from sipside.errors import PeerError
from sipside.message import make_response
from sipside.publication import (
    Publication,
    PublicationChanged,
    PublicationRemoved,
    PublicationStore,
)
from sipside.subscription import SendResponse

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


def _contact_expires(contact: str) -> int | None:
    # The parameters after the name-addr (RFC 3261 10.2.1.1 "expires" contact parameter).
    tail = contact[contact.rfind(">") + 1 :] if ">" in contact else contact
    for param in tail.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "expires" and value.strip().isdigit():
            return int(value.strip())
    return None


class SipUsers:
    """The presence SIP users show on XMPP, and who gets told of it (DESIGN 5.4)."""

    def __init__(
        self,
        book: AddressBook,
        *,
        xmpp: XmppPort,
        store: StorePort,
        priority: int,
        user_online: Callable[[str], None],
    ) -> None:
        self.book = book
        self.xmpp = xmpp
        self.store = store
        self.priority = priority
        self.user_online = user_online
        self.publications = PublicationStore(events=("presence",), content_types=(PIDF,))
        # The last state written per SIP user's JID: a presence server repeats the same state
        # in every NOTIFY to every watcher, and a write that changes nothing is skipped.
        self._remembered: dict[str, XmppPresence] = {}
        self._reannounce: deque[tuple[str, tuple[str, bool]]] = deque()

    # --- SIP requests in ------------------------------------------------------------------

    async def on_publish(self, incoming: IncomingLike, now: float) -> None:
        """RFC 3903 PUBLISH: the compositor keeps the PIDF, a change goes to the watchers."""
        request = incoming.request
        user = self.home_user(request.uri)
        if request.body:
            # Hostile or malformed PIDF is refused before the compositor keeps it (DESIGN 5.1).
            pidf.decode(request.body, request.header("Content-Type"))
        for effect in self.publications.handle_publish(request, now, entity=user.uri):
            match effect:
                case SendResponse(response):
                    incoming.send(response)
                case PublicationChanged(pub, previous, changed):
                    await self._save_publication(pub, previous)
                    if changed:
                        await self.store.mark_user_seen(user.uri, now)
                        await self.announce(
                            user.jid, self.state_from_pidf(pub.body, pub.content_type), now
                        )
                case PublicationRemoved(pub, _):
                    await self._publication_gone(pub, now)

    async def on_register(self, incoming: IncomingLike, now: float) -> None:
        """A third-party REGISTER: Expires > 0 is online, 0 is offline (DESIGN 5.4)."""
        request = incoming.request
        user = self.home_user(address_uri(request.header("To") or ""))
        contacts = request.header_values("Contact")
        if not contacts:
            # RFC 3261 10.2.3: a REGISTER without Contact only asks; it changes nothing.
            incoming.send(make_response(request, 200))
            return
        header = request.header("Expires")
        default = int(header) if header is not None and header.strip().isdigit() else 3600
        # RFC 3261 10.2.1.1: a contact's expires parameter overrides the Expires header.
        contact = address_uri(contacts[0]) if contacts and contacts[0].strip() != "*" else None
        param = _contact_expires(contacts[0]) if contact is not None else None
        expires = param if param is not None else default
        headers = [("Expires", str(expires))]
        if contact is not None:
            headers.append(("Contact", f"<{contact}>;expires={expires}"))
        incoming.send(make_response(request, 200, headers=headers))
        seen = await self.store.seen_user(user.uri)
        was_online = seen is not None and seen.online
        if expires > 0:
            await self.store.mark_user_seen(user.uri, now, contact, expires)
            if not was_online:
                await self.went_online(user.uri, now)
        elif was_online:
            await self.store.set_user_offline(user.uri)
            await self.went_offline(user.uri, now)

    def home_user(self, uri: str) -> HomeUser:
        """The home-domain user ``uri`` names; a 404 for the peer otherwise."""
        target = self.book.classify_request_uri(uri)
        if not isinstance(target, HomeUser):
            raise PeerError(404, "Not Found", "not a user of the home SIP domain")
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
        self.user_online(aor)

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
        except (ValueError, PeerError, Refusal):
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
            self.user_online(user.uri)
        return _COMMAND_REPLY[state]

    async def sweep(self, now: float) -> None:
        """The sleep_time sweep: registrations that ran out make their users offline."""
        for user in await self.store.expire_registrations(now):
            await self.went_offline(user.aor, now)

    # --- the state, and telling the watchers ----------------------------------------------

    def plain_state(self, available: bool) -> XmppPresence:
        """Available or not, with nothing more known: no show, no status."""
        return XmppPresence(RESOURCE, available, priority=self.priority)

    def state_from_pidf(self, body: bytes, content_type: str | None) -> XmppPresence:
        """A PIDF body as the SIP user's state; an empty or unreadable one is unavailable."""
        if not body:
            # Kamailio's first NOTIFY before any PUBLISH has no body: unknown, shown offline.
            return self.plain_state(False)
        try:
            doc = pidf.decode(body, content_type)
        except PeerError as exc:
            log.info("notify_body_unreadable", error=str(exc))
            return self.plain_state(False)
        return xmpp_for_pidf(doc, self.priority, RESOURCE)

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

    async def remember(self, sip_jid: str, state: XmppPresence, now: float) -> None:
        """Store ``state`` as the SIP user's last known presence (answers probes, DESIGN 8)."""
        if self._remembered.get(sip_jid) == state:
            return
        await self.store.set_presence(
            sip_jid,
            "",
            available=state.available,
            now=now,
            show=state.show,
            status=state.status,
            priority=state.priority,
        )
        self._remembered[sip_jid] = state  # only once written: a failed write is retried

    async def announce(self, sip_jid: str, state: XmppPresence, now: float) -> None:
        """Remember ``state`` and send it to every approved XMPP watcher of ``sip_jid``."""
        await self.remember(sip_jid, state, now)
        for approval in await self.store.approvals(sip_jid=sip_jid):
            if (
                approval.direction is ApprovalDirection.XMPP_WATCHES_SIP
                and approval.state is ApprovalState.APPROVED
            ):
                send_presence(self.xmpp, self.presence_to(sip_jid, approval.xmpp_jid, state))

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

    # --- publications (RFC 3903) ----------------------------------------------------------

    async def _save_publication(self, pub: Publication, previous: str | None) -> None:
        if previous is not None:
            await self.store.delete_publication(previous)
        await self.store.save_publication(
            StoredPublication(
                etag=pub.etag,
                entity=pub.entity,
                body=pub.body.decode("utf-8", "replace"),
                content_type=pub.content_type or PIDF,
                expires_at=pub.expires_at,
                event=pub.event,
            )
        )

    async def _publication_gone(self, pub: Publication, now: float) -> None:
        await self.store.delete_publication(pub.etag)
        jid = self.book.jid_for_sip_uri(pub.entity)
        left = self.publications.publications(pub.entity, pub.event)
        if left:
            await self.announce(
                jid, self.state_from_pidf(left[-1].body, left[-1].content_type), now
            )
            return
        # No published state any more: what the registration says (RFC 3903 6: gone).
        self._remembered.pop(jid, None)
        await self.store.clear_presence(jid)
        seen = await self.store.seen_user(pub.entity)
        await self.announce(jid, self.plain_state(seen is not None and seen.online), now)

    def next_deadline(self) -> float | None:
        """When the next publication expires."""
        return self.publications.next_deadline()

    async def handle_timer(self, now: float) -> None:
        """Expire publications that ran out (RFC 3903 6)."""
        for effect in self.publications.handle_timer(now):
            if isinstance(effect, PublicationRemoved):
                await self._publication_gone(effect.publication, now)

    async def restore(self, watched_aors: Iterable[str] = ()) -> int:
        """Reload publications after a restart (DESIGN 8); returns how many were kept.

        Every stored publication comes back, in one store query, whether or not its SIP user
        is registered or watched right now (``watched_aors`` is accepted for the caller's
        convenience and no longer needed).
        """
        kept = [
            Publication(
                entity=stored.entity,
                event=stored.event,
                etag=stored.etag,
                body=stored.body.encode("utf-8"),
                content_type=stored.content_type,
                expires_at=stored.expires_at,
            )
            for stored in await self.store.all_publications()
        ]
        self.publications.restore(kept)
        return len(kept)

    def count(self) -> int:
        """Live publications."""
        return len(self.publications.snapshot())
