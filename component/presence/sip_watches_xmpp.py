"""SIP users watching XMPP entities (DESIGN 5.2): the gateway as RFC 6665 notifier.

``SipWatchers`` accepts a SUBSCRIBE to an XMPP entity's SIP address, keeps one ``Notifier``
per dialog, asks the XMPP user for approval with ``<presence type="subscribe">`` and turns the
XMPP entity's presence into PIDF NOTIFYs (one tuple per resource, DESIGN 5.1). Every notifier
is written to the store when a field that matters after a restart changes, and ``restore``
rebuilds them after a restart (DESIGN 8).

It scales to many watchers: watches are indexed by (watcher, target) and by target, deadlines
sit in one heap, the PIDF of a target is encoded once per change, and a NOTIFY costs a store
write only once per ``CSEQ_RESERVE`` requests (the stored CSeq runs ahead of the one in use).
"""

from __future__ import annotations

import base64
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, replace
from typing import TypeVar

from component.addresses import AddressBook, AddressError, XmppTarget
from component.logs import get_logger
from component.ports import XmppPort
from component.presence.shared import (
    PIDF,
    RESOURCE,
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
from component.presence.translate import SHOW_VALUES, XmppPresence, XmppPresenceSet, pidf_for_xmpp
from component.store import (
    ApprovalDirection,
    ApprovalState,
    JsonObject,
    SipWatcherSubscription,
    StorePort,
    SubscriptionState,
)
from component.values import Presence
from sipside import pidf
from sipside.dialog import DialogId, address_uri
from sipside.errors import PeerError
from sipside.message import SipResponse, make_response
from sipside.notifier import Notifier, NotifierPolicy, NotifierSnapshot, NotifierState
from sipside.subscription import SendRequest, SendResponse, SubscriptionEffect, SubscriptionEnded

log = get_logger("component.presence")

__all__ = ["CSEQ_RESERVE", "SipWatch", "SipWatchers"]

# The stored CSeq of a dialog runs this far ahead of the one in use, so a NOTIFY costs a store
# write only once per CSEQ_RESERVE requests; after a crash the dialog continues above every CSeq
# it used. RFC 3261 12.2.2: a UAS must accept a CSeq more than one higher than the last.
CSEQ_RESERVE = 64

# (watcher's bare JID, target's bare JID)
_Pair = tuple[str, str]


@dataclass(slots=True)
class SipWatch:
    """A SIP user watching an XMPP entity: the notifier, who is who, and what the store has."""

    notifier: Notifier
    watcher_jid: str
    watcher_aor: str
    target_jid: str
    saved: NotifierSnapshot | None = None

    @property
    def pair(self) -> _Pair:
        """(watcher JID, target JID): the index the XMPP side looks watches up by."""
        return (self.watcher_jid, self.target_jid)


def _dialog_key(key: DialogId) -> str:
    return f"{key.call_id};{key.local_tag};{key.remote_tag}"


def _resource(jid: str) -> str | None:
    _, slash, resource = jid.partition("/")
    return resource if slash else None


_N = TypeVar("_N", bound=Hashable)


def _unindex(index: dict[_N, dict[DialogId, SipWatch]], name: _N, key: DialogId) -> None:
    dialogs = index.get(name)
    if dialogs is not None:
        dialogs.pop(key, None)
        if not dialogs:
            del index[name]


def _needs_saving(saved: NotifierSnapshot | None, snap: NotifierSnapshot) -> bool:
    """True when ``snap`` differs from the stored one in a field a restart needs.

    The body is not one: ``restore`` rebuilds it from the stored presence of the target. The
    local CSeq only counts once it passes the reserve written with the last save.
    """
    if saved is None or snap.local_cseq > saved.local_cseq:
        return True
    return replace(snap, local_cseq=saved.local_cseq, body=saved.body) != saved


def _notifier_snapshot(data: JsonObject) -> NotifierSnapshot:
    values = dict(data)
    values["body"] = base64.b64decode(values["body"])
    values["route_set"] = tuple(values["route_set"])
    return NotifierSnapshot(**values)


class SipWatchers:
    """The notifiers of SIP watchers of XMPP entities, keyed by dialog (DESIGN 5.2)."""

    def __init__(
        self, book: AddressBook, *, sip: SipPort, xmpp: XmppPort, store: StorePort
    ) -> None:
        self.book = book
        self.sip = sip
        self.xmpp = xmpp
        self.store = store
        # RFC 6665 8.3.1 deprecates 202, DESIGN 5.2 asks for it.
        self.policy = NotifierPolicy(accept_status=202)
        self.watches: dict[DialogId, SipWatch] = {}
        # The indexes an XMPP stanza looks watches up by: (watcher, target) and target.
        self._by_pair: dict[_Pair, dict[DialogId, SipWatch]] = {}
        self._by_target: dict[str, dict[DialogId, SipWatch]] = {}
        self._deadlines: DeadlineHeap[DialogId] = DeadlineHeap()
        self._xmpp_presence: dict[str, XmppPresenceSet] = {}
        self._bodies: dict[str, bytes] = {}  # the PIDF of each target's current presence set

    # --- SUBSCRIBE in ---------------------------------------------------------------------

    async def on_subscribe(self, incoming: IncomingLike, now: float) -> None:
        """A SUBSCRIBE to an XMPP entity: a new dialog, or a refresh of one we hold."""
        request = incoming.request
        if request.to_tag:
            key = DialogId(request.call_id, request.to_tag, request.from_tag or "")
            watch = self.watches.get(key)
            if watch is None:
                # RFC 6665 4.2.1.2: a refresh for a subscription we do not know.
                incoming.send(make_response(request, 481))
                return
            await self._step(watch, watch.notifier.handle_subscribe(request, now), now, incoming)
            return
        target = self.book.classify_request_uri(request.uri)
        if not isinstance(target, XmppTarget) or target.nick:
            raise PeerError(404, "Not Found", "presence is served for XMPP users only")
        watcher_aor = address_uri(request.header("From") or "")
        watcher_jid = self.book.jid_for_sip_uri(watcher_aor)
        approved = await is_approved(
            self.store, watcher_jid, target.jid, ApprovalDirection.SIP_WATCHES_XMPP
        )
        body = await self._pidf_of(target.jid) if approved else b""
        notifier, effects = Notifier.accept(
            request,
            now,
            events=("presence",),
            contact=self.sip.contact_for(incoming.source.transport),
            state=NotifierState.ACTIVE if approved else NotifierState.PENDING,
            body=body,
            content_type=PIDF if approved else None,
            policy=self.policy,
        )
        if notifier is None:
            await self._run(None, effects, now, incoming)
            return
        watch = SipWatch(notifier, watcher_jid, watcher_aor, target.jid)
        self._add(watch)
        log.info("sip_watcher_subscribed", sip_uri=watcher_aor, jid=target.jid, approved=approved)
        await self._run(watch, effects, now, incoming)
        if notifier.state is NotifierState.TERMINATED:
            return  # a fetch (Expires: 0)
        if approved:
            # The server then sends Bob's current presence (RFC 6121 4.3).
            self._probe(watcher_jid, target.jid)
        else:
            await self.store.set_approval(
                watcher_jid,
                target.jid,
                ApprovalDirection.SIP_WATCHES_XMPP,
                ApprovalState.PENDING,
                now,
            )
            send_presence(
                self.xmpp, Presence(sender=watcher_jid, recipient=target.jid, type="subscribe")
            )

    async def _maybe_unsubscribe_xmpp(self, gone: SipWatch) -> None:
        """The last dialog of a watcher for a target ended: unsubscribe on XMPP too."""
        if self._between(gone.watcher_jid, gone.target_jid):
            return
        await self.store.delete_approval(
            gone.watcher_jid, gone.target_jid, ApprovalDirection.SIP_WATCHES_XMPP
        )
        send_presence(
            self.xmpp,
            Presence(sender=gone.watcher_jid, recipient=gone.target_jid, type="unsubscribe"),
        )

    def _probe(self, watcher_jid: str, target_jid: str) -> None:
        # RFC 6121 4.3: a probe from the SIP user's full JID brings the target's presence.
        me = f"{watcher_jid}/{RESOURCE}"
        send_presence(self.xmpp, Presence(sender=me, recipient=target_jid, type="probe"))

    def _between(self, watcher_jid: str, target_jid: str) -> list[SipWatch]:
        """The dialogs in which ``watcher_jid`` watches ``target_jid`` (a copy, safe to run)."""
        return list(self._by_pair.get((watcher_jid, target_jid), {}).values())

    def watching(self, target_jid: str) -> list[SipWatch]:
        """Every dialog in which a SIP user watches ``target_jid``."""
        return list(self._by_target.get(target_jid, {}).values())

    def _add(self, watch: SipWatch) -> None:
        key = watch.notifier.dialog.id
        self.watches[key] = watch
        self._by_pair.setdefault(watch.pair, {})[key] = watch
        self._by_target.setdefault(watch.target_jid, {})[key] = watch
        self._deadlines.set(key, watch.notifier.next_deadline())

    def _remove(self, key: DialogId) -> None:
        watch = self.watches.pop(key, None)
        self._deadlines.set(key, None)
        if watch is None:
            return
        _unindex(self._by_pair, watch.pair, key)
        _unindex(self._by_target, watch.target_jid, key)
        if watch.target_jid not in self._by_target:
            # Nobody watches the target any more: its cached presence would only take memory.
            self._xmpp_presence.pop(watch.target_jid, None)
            self._bodies.pop(watch.target_jid, None)

    # --- the XMPP entity's side -----------------------------------------------------------

    async def on_xmpp_state(self, presence: Presence, bob: str, watcher: str, now: float) -> None:
        """RFC 6121 4.4: Bob's availability changed -> NOTIFY his SIP watchers."""
        current = await self._presence_set(bob)
        resource = _resource(presence.sender)
        available = presence.type is None
        show = presence.show if presence.show in SHOW_VALUES else None
        priority = max(-128, min(127, presence.priority))
        update = XmppPresence(resource, available, show, presence.status, priority)
        known = next((p for p in current if p.resource == resource), None)
        # The server sends a change once per watcher JID: only the first one writes.
        changed = known != update if available else known is not None
        if available and changed:
            await self.store.set_presence(
                bob,
                resource or "",
                available=True,
                now=now,
                show=show,
                status=presence.status,
                priority=priority,
            )
        elif changed:
            await self.store.clear_presence(bob, resource or "")
        if changed:
            self._xmpp_presence[bob] = current.updated(update)
            self._bodies.pop(bob, None)
        body = await self._pidf_of(bob)
        for watch in self._between(watcher, bob):
            await self._run(watch, watch.notifier.notify(now, body, PIDF), now)

    async def approved(self, bob: str, watcher: str, now: float) -> None:
        """Bob approved the SIP watcher (RFC 6121 3.1.5): NOTIFY active, probe his presence."""
        await self.store.set_approval(
            watcher, bob, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.APPROVED, now
        )
        body = await self._pidf_of(bob)
        for watch in self._between(watcher, bob):
            await self._run(watch, watch.notifier.activate(now, body, PIDF), now)
        self._probe(watcher, bob)

    async def refused(self, bob: str, watcher: str, now: float) -> None:
        """Bob refused or cancelled: NOTIFY terminated;reason=rejected (RFC 6665 4.2.2)."""
        await self.store.set_approval(
            watcher, bob, ApprovalDirection.SIP_WATCHES_XMPP, ApprovalState.REFUSED, now
        )
        for watch in self._between(watcher, bob):
            await self._run(watch, watch.notifier.terminate(now, "rejected"), now)

    async def bounced(self, bob: str, watcher: str, now: float) -> None:
        """Our subscribe bounced (no such user, server down): pending watches end."""
        for watch in self._between(watcher, bob):
            if watch.notifier.state is NotifierState.PENDING:
                await self._run(watch, watch.notifier.terminate(now, "noresource"), now)

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
        self._xmpp_presence[jid] = found
        return found

    async def _pidf_of(self, jid: str) -> bytes:
        body = self._bodies.get(jid)
        if body is None:
            presences = await self._presence_set(jid)
            body = pidf.encode(pidf_for_xmpp(self.book.sip_uri_for_jid(jid), presences))
            if jid in self._by_target:
                self._bodies[jid] = body  # kept only while someone watches
        return body

    # --- the notifiers' effects, outcomes and timers --------------------------------------

    async def _step(
        self,
        watch: SipWatch,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: IncomingLike | None = None,
    ) -> None:
        """Run a watch's effects; a dialog that ended by the watcher or by expiry leaves XMPP."""
        await self._run(watch, effects, now, incoming)
        if watch.notifier.state is NotifierState.TERMINATED:
            await self._maybe_unsubscribe_xmpp(watch)

    async def _run(
        self,
        watch: SipWatch | None,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: IncomingLike | None = None,
    ) -> None:
        ended = False
        for effect in effects:
            match effect:
                case SendResponse(response):
                    if incoming is not None:
                        incoming.send(response)
                case SendRequest(request) if watch is not None:
                    key = watch.notifier.dialog.id
                    reply = ReplyTo(MachineKind.NOTIFIER, key, key.call_id)
                    self.sip.send_request(request, peer_for(request), reply)
                case SubscriptionEnded(reason):
                    ended = True
                    if watch is not None:
                        log.info("sip_watcher_ended", sip_uri=watch.watcher_aor, reason=reason)
        if watch is None:
            return
        key = watch.notifier.dialog.id
        if ended or watch.notifier.state is NotifierState.TERMINATED:
            self._remove(key)
            await self.store.delete_sip_watcher_subscription(_dialog_key(key))
            return
        if self.watches.get(key) is watch:
            self._deadlines.set(key, watch.notifier.next_deadline())
        snap = watch.notifier.snapshot()
        if not _needs_saving(watch.saved, snap):
            return  # e.g. the 2xx to a NOTIFY, or a NOTIFY within the CSeq reserve
        saved = replace(snap, local_cseq=snap.local_cseq + CSEQ_RESERVE)
        watch.saved = saved
        await self.store.save_sip_watcher_subscription(
            SipWatcherSubscription(
                dialog_id=_dialog_key(key),
                watcher_aor=watch.watcher_aor,
                target_jid=watch.target_jid,
                state=SubscriptionState(watch.notifier.state.value),
                dialog=snapshot_json(saved),
                expires_at=watch.notifier.expires_at,
            )
        )

    async def on_response(self, key: DialogId, response: SipResponse, now: float) -> None:
        """The final response to a NOTIFY of the dialog ``key``."""
        watch = self.watches.get(key)
        if watch is not None:
            await self._run(watch, watch.notifier.handle_response(response, now), now)

    async def on_timeout(self, key: DialogId, cseq: int, now: float) -> None:
        """A NOTIFY of the dialog ``key`` got no final response."""
        watch = self.watches.get(key)
        if watch is not None:
            await self._run(watch, watch.notifier.handle_timeout(cseq, now), now)

    def next_deadline(self) -> float | None:
        """The earliest notifier deadline (expiry, a NOTIFY owed)."""
        return self._deadlines.earliest()

    async def handle_timer(self, now: float, limit: int | None = None) -> int:
        """Fire up to ``limit`` notifiers that are due; returns how many ran.

        An expired dialog may unsubscribe on XMPP.
        """
        due = self._deadlines.pop_due(now, limit)
        for key in due:
            watch = self.watches.get(key)
            if watch is not None:
                await self._step(watch, watch.notifier.handle_timer(now), now)
        return len(due)

    # --- restart and reconnect (DESIGN 8) -------------------------------------------------

    async def restore(self) -> int:
        """Rebuild the notifiers from the store; unreadable rows are dropped. Returns the count."""
        for stored in await self.store.sip_watcher_subscriptions():
            try:
                snap = _notifier_snapshot(stored.dialog)
                watcher_jid = self.book.jid_for_sip_uri(stored.watcher_aor)
                if snap.state == NotifierState.ACTIVE.value:
                    # The stored body may predate the last NOTIFY (see _needs_saving): the
                    # target's stored presence is the current one.
                    snap = replace(
                        snap, body=await self._pidf_of(stored.target_jid), content_type=PIDF
                    )
                notifier = Notifier.restore(snap, policy=self.policy)
            except (KeyError, TypeError, ValueError, AddressError) as exc:
                log.warning("subscription_unrestorable", dialog=stored.dialog_id, error=str(exc))
                await self.store.delete_sip_watcher_subscription(stored.dialog_id)
                continue
            watch = SipWatch(
                notifier, watcher_jid, stored.watcher_aor, stored.target_jid, saved=snap
            )
            self._add(watch)
        return len(self.watches)

    def on_link_up(self) -> None:
        """Probe every XMPP entity an active SIP watcher watches, once per pair."""
        for (watcher_jid, target_jid), dialogs in self._by_pair.items():
            if any(w.notifier.state is NotifierState.ACTIVE for w in dialogs.values()):
                self._probe(watcher_jid, target_jid)
