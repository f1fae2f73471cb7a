"""SIP users watching XMPP entities (DESIGN 5.2): who may see whom, and what they see.

``SipWatchers`` decides a ``WatchRequest`` (the target must be an XMPP entity; approved watches
start active with its presence, others pending while the XMPP user is asked with
``<presence type="subscribe">``), keeps the XMPP entities' presence (one entry per resource,
stored so a restart and a new watcher see it), and asks the SIP side to NOTIFY, activate or end
the watches. The dialogs themselves live in ``component.sip.watch_dialogs``.
"""

from __future__ import annotations

from component.addresses import XmppTarget
from component.errors import not_found
from component.logs import get_logger
from component.presence.approvals import RESOURCE, Ports, is_approved, send_presence
from component.presence.translate import SHOW_VALUES, XmppPresence, XmppPresenceSet, pidf_for_xmpp
from component.store import ApprovalDirection, ApprovalState, PresenceRecord, RosterApproval
from component.values import Presence, Watch, WatchAnswer, WatchRequest
from sipside.pidf import PresenceDocument

log = get_logger("component.presence")

__all__ = ["SipWatchers"]

# Cached presence of this many XMPP entities at most; the store holds it all.
_CACHE_LIMIT = 50_000


def _resource(jid: str) -> str | None:
    _, slash, resource = jid.partition("/")
    return resource if slash else None


class SipWatchers:
    """The decisions about SIP watchers of XMPP entities (DESIGN 5.2)."""

    def __init__(self, ports: Ports) -> None:
        self.book, self.sip, self.xmpp, self.store = ports.book, ports.sip, ports.xmpp, ports.store
        self._xmpp_presence: dict[str, XmppPresenceSet] = {}
        self._documents: dict[str, PresenceDocument] = {}  # of each entity's presence set

    # --- the SIP user's side --------------------------------------------------------------

    async def watch_requested(self, request: WatchRequest) -> WatchAnswer:
        """Who is who, and whether the watch starts active (with the entity's presence)."""
        target = self.book.classify_request_uri(request.target_uri)
        if not isinstance(target, XmppTarget) or target.nick:
            raise not_found("presence is served for XMPP users only")
        watch = Watch(self.book.jid_for_sip_uri(request.watcher_uri), target.jid)
        approved = await is_approved(
            self.store, watch.watcher_jid, watch.target_jid, ApprovalDirection.SIP_WATCHES_XMPP
        )
        document = await self.document_of(target.jid) if approved else None
        return WatchAnswer(watch, request.watcher_uri, document)

    async def watch_started(self, answer: WatchAnswer, now: float) -> None:
        """An accepted watch: probe the entity if approved, else ask the XMPP user."""
        watch = answer.watch
        if answer.approved:
            # The server then sends the entity's current presence (RFC 6121 4.3).
            self._probe(watch)
            return
        await self.store.save_approval(
            RosterApproval(
                watch.watcher_jid,
                watch.target_jid,
                ApprovalDirection.SIP_WATCHES_XMPP,
                ApprovalState.PENDING,
                now,
            )
        )
        send_presence(
            self.xmpp,
            Presence(sender=watch.watcher_jid, recipient=watch.target_jid, type="subscribe"),
        )

    async def watch_ended(self, watch: Watch, now: float) -> None:
        """The watcher's last dialog with the entity ended: unsubscribe on XMPP too."""
        await self.store.delete_approval(
            watch.watcher_jid, watch.target_jid, ApprovalDirection.SIP_WATCHES_XMPP
        )
        send_presence(
            self.xmpp,
            Presence(sender=watch.watcher_jid, recipient=watch.target_jid, type="unsubscribe"),
        )

    def _probe(self, watch: Watch) -> None:
        # RFC 6121 4.3: a probe from the SIP user's full JID brings the target's presence.
        me = f"{watch.watcher_jid}/{RESOURCE}"
        send_presence(self.xmpp, Presence(sender=me, recipient=watch.target_jid, type="probe"))

    # --- the XMPP entity's side -----------------------------------------------------------

    async def on_xmpp_state(self, presence: Presence, bob: str, watcher: str, now: float) -> None:
        """RFC 6121 4.4: Bob's availability changed -> NOTIFY his SIP watchers."""
        current = await self._presence_set(bob)
        resource = _resource(presence.sender)
        available = presence.type is None
        show = presence.show if presence.show in SHOW_VALUES else None
        priority = max(-128, min(127, presence.priority))
        status = presence.status
        known = next((p for p in current if p.resource == resource), None)
        # The server sends a change once per watcher JID: only the first one writes. The known
        # entry (always available) is compared field by field: the rest build nothing.
        if available:
            changed = known is None or not (
                known.show == show and known.status == status and known.priority == priority
            )
        else:
            changed = known is not None
        if available and changed:
            await self.store.save_presence(
                PresenceRecord(
                    bob,
                    resource or "",
                    available=True,
                    show=show,
                    status=status,
                    priority=priority,
                    updated_at=now,
                )
            )
        elif changed:
            await self.store.clear_presence(bob, resource or "")
        if changed:
            update = XmppPresence(resource, available, show, status, priority)
            self._xmpp_presence[bob] = current.updated(update)
            self._documents.pop(bob, None)
        await self.sip.notify_watch(Watch(watcher, bob), await self.document_of(bob), now)

    async def approved(self, bob: str, watcher: str, now: float) -> None:
        """Bob approved the SIP watcher (RFC 6121 3.1.5): NOTIFY active, probe his presence."""
        await self.store.save_approval(
            RosterApproval(
                watcher, bob, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, now
            )
        )
        watch = Watch(watcher, bob)
        await self.sip.activate_watch(watch, await self.document_of(bob), now)
        self._probe(watch)

    async def refused(self, bob: str, watcher: str, now: float) -> None:
        """Bob refused or cancelled: NOTIFY terminated;reason=rejected (RFC 6665 4.2.2)."""
        await self.store.save_approval(
            RosterApproval(
                watcher, bob, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.REFUSED, now
            )
        )
        await self.sip.end_watch(Watch(watcher, bob), "rejected", now, pending_only=False)

    async def bounced(self, bob: str, watcher: str, now: float) -> None:
        """Our subscribe bounced (no such user, server down): pending watches end."""
        await self.sip.end_watch(Watch(watcher, bob), "noresource", now, pending_only=True)

    def on_link_up(self) -> None:
        """Probe every XMPP entity an active SIP watcher watches, once per pair."""
        for watch in self.sip.active_watches():
            self._probe(watch)

    # --- the entities' presence -----------------------------------------------------------

    async def _presence_set(self, jid: str) -> XmppPresenceSet:
        # The cache mirrors the store's rows for ``jid`` (we are their only writer), which is
        # what lets ``on_xmpp_state`` skip writes that change nothing.
        cached = self._xmpp_presence.get(jid)
        if cached is not None:
            return cached
        found = XmppPresenceSet()
        for record in await self.store.presence_of(jid):
            if record.available:
                show = record.show if record.show in SHOW_VALUES else None
                found = found.updated(
                    XmppPresence(
                        record.resource or None, True, show, record.status, record.priority
                    )
                )
        if len(self._xmpp_presence) >= _CACHE_LIMIT:
            self._xmpp_presence.clear()  # a mirror: it refills from the store
            self._documents.clear()
        self._xmpp_presence[jid] = found
        return found

    async def document_of(self, jid: str) -> PresenceDocument:
        """The PIDF document of an XMPP entity's presence, as its SIP watchers see it (5.1)."""
        document = self._documents.get(jid)
        if document is None:
            presences = await self._presence_set(jid)
            document = pidf_for_xmpp(self.book.sip_uri_for_jid(jid), presences)
            self._documents[jid] = document
        return document
