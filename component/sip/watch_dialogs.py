"""The dialogs in which SIP users watch XMPP entities (DESIGN 5.2): the gateway as RFC 6665
notifier.

``WatchDialogs`` answers a SUBSCRIBE to an XMPP entity's SIP address with one ``Notifier`` per
dialog, after asking presence (a ``WatchRequest``) whether the watch starts active or pending,
and carries out what presence asks of a watch (NOTIFY a change, activate, terminate) in every
dialog of the pair. Each notifier is written to the store when a field a restart needs changes
(``dialog_state``), and ``restore`` rebuilds them after a restart (DESIGN 8).

It scales to many watchers: dialogs are indexed by (watcher, target) and by target, deadlines
sit in one heap, a target's PIDF is encoded once per change, and a NOTIFY costs a store write
only once per ``CSEQ_RESERVE`` requests.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

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
from component.sip.transactions import DONE
from component.store import SipWatcherSubscription, StoreUnavailable, SubscriptionState
from component.values import Watch, WatchRequest
from sipside import pidf
from sipside.dialog import DialogId, address_uri
from sipside.endpoint import peer_for_uri
from sipside.errors import LocalError
from sipside.message import SipRequest, SipResponse, make_response
from sipside.notifier import Notifier, NotifierPolicy, NotifierSnapshot, NotifierState
from sipside.peer import Peer
from sipside.subscription import SendRequest, SendResponse, SubscriptionEffect, SubscriptionEnded

log = get_logger("component.sip.watch_dialogs")

__all__ = ["PIDF", "Answerable", "WatchDialog", "WatchDialogs", "peer_for"]

# Stored subscriptions read at a time on a restart. A page's rows and what decoding them makes
# are freed once it is done; the dialogs made meanwhile sit between them in the allocator's
# pools, which the process keeps: smaller pages, less memory kept (bench.presence_resume,
# 20,000 resumed: 1,608 B of RSS per subscription with pages of 1,000, about 1,420 with 200).
RESTORE_PAGE = 200
PIDF = pidf.PIDF_CONTENT_TYPE  # sent bare: baresip refuses parameters (SERVERS.md)


class Answerable(Protocol):
    """An incoming request to answer (``sipside.endpoint.IncomingRequest``)."""

    request: SipRequest
    source: Peer

    def send(self, response: SipResponse) -> None:
        """Send a final response."""
        ...


def peer_for(request: SipRequest) -> Peer | None:
    """Where an in-dialog request goes: its first Route, else its remote target.

    A stock Kamailio does not relay an in-dialog request that carries no Route, so such
    requests go straight to the peer; an unroutable host name falls back to the proxy.
    """
    routes = request.header_values("Route")
    uri = address_uri(routes[0]) if routes else request.uri
    try:
        return peer_for_uri(uri)
    except LocalError:
        return None


@dataclass(slots=True, eq=False)  # compared by identity: the indexes hold the same object
class WatchDialog:
    """One dialog of a watch: the notifier, who is who, and what the store has.

    The watcher's AOR is almost always the dialog's remote URI in angle brackets (the From
    of its SUBSCRIBE without tag): then it is read from there (``own_aor`` None) rather than
    kept a second time (68 bytes per resumed subscription, bench.presence_resume).
    """

    notifier: Notifier
    watch: Watch
    own_aor: str | None
    saved: NotifierSnapshot | None = None

    @classmethod
    def of(
        cls,
        notifier: Notifier,
        watch: Watch,
        watcher_aor: str,
        saved: NotifierSnapshot | None = None,
    ) -> WatchDialog:
        """The dialog of ``notifier``, keeping ``watcher_aor`` only if its remote URI lacks it."""
        remote = notifier.dialog.remote_uri
        derived = len(remote) == len(watcher_aor) + 2 and remote == f"<{watcher_aor}>"
        return cls(notifier, watch, None if derived else watcher_aor, saved)

    @property
    def watcher_aor(self) -> str:
        """The watcher's SIP address of record."""
        aor = self.own_aor
        return self.notifier.dialog.remote_uri[1:-1] if aor is None else aor


def _listed(held: WatchDialog | list[WatchDialog] | None) -> list[WatchDialog]:
    """The dialogs of one ``_by_watch`` entry, as a new list (safe to run while it changes)."""
    if held is None:
        return []
    return list(held) if isinstance(held, list) else [held]


def _dialog_key(key: DialogId) -> str:
    return f"{key.call_id};{key.local_tag};{key.remote_tag}"


class WatchDialogs:
    """The notifiers of SIP watchers of XMPP entities, keyed by dialog (DESIGN 5.2)."""

    def __init__(self, parts: DialogParts) -> None:
        self.book, self.events = parts.book, parts.events
        self.transactions, self.store = parts.transactions, parts.store
        # RFC 6665 8.3.1 deprecates 202, DESIGN 5.2 asks for it.
        self.policy = NotifierPolicy(accept_status=202)
        self.dialogs: dict[DialogId, WatchDialog] = {}
        # A watch has one dialog almost always: held as such (a list of one costs 120 bytes,
        # tracemalloc), a list only for a watch with several.
        self._by_watch: dict[Watch, WatchDialog | list[WatchDialog]] = {}
        self._watched: Counter[str] = Counter()  # dialogs per target, for ``_bodies``
        self._deadlines: DeadlineHeap[DialogId] = DeadlineHeap()
        # The PIDF of each watched target's last document: encoded once per change.
        self._bodies: dict[str, tuple[pidf.PresenceDocument, bytes]] = {}

    # --- SUBSCRIBE in ---------------------------------------------------------------------

    async def on_subscribe(self, incoming: Answerable, now: float) -> None:
        """A SUBSCRIBE to an XMPP entity: a new dialog, or a refresh of one we hold."""
        request = incoming.request
        if request.to_tag:
            key = DialogId(request.call_id, request.to_tag, request.from_tag or "")
            dialog = self.dialogs.get(key)
            if dialog is None:
                # RFC 6665 4.2.1.2: a refresh for a subscription we do not know.
                incoming.send(make_response(request, 481))
                return
            await self._step(dialog, dialog.notifier.handle_subscribe(request, now), now, incoming)
            return
        watcher_aor = address_uri(request.header("From") or "")
        answer = await self.events.watch_requested(WatchRequest(watcher_aor, request.uri))
        doc = answer.document
        notifier, effects = Notifier.accept(
            request,
            now,
            events=("presence",),
            contact=self.transactions.contact_for(incoming.source.transport),
            state=NotifierState.ACTIVE if doc is not None else NotifierState.PENDING,
            body=self._body(answer.watch.target_jid, doc) if doc is not None else b"",
            content_type=PIDF if doc is not None else None,
            policy=self.policy,
        )
        if notifier is None:
            await self._run(None, effects, now, incoming)
            return
        dialog = WatchDialog.of(notifier, answer.watch, answer.watcher_uri)
        self._add(dialog)
        try:
            await self._run(dialog, effects, now, incoming)
        except StoreUnavailable:
            self._remove(dialog.notifier.dialog.id)  # refused (503): the watcher tries again
            raise
        log.info(
            "sip_watcher_subscribed",
            sip_uri=answer.watcher_uri,
            jid=answer.watch.target_jid,
            approved=answer.approved,
        )
        if notifier.state is not NotifierState.TERMINATED:  # not a fetch (Expires: 0)
            await self.events.watch_started(answer, now)

    # --- what presence asks (the SipPort part of watches) -------------------------

    def _of(self, watch: Watch) -> list[WatchDialog]:
        """The dialogs of ``watch`` (a copy, safe to run)."""
        return _listed(self._by_watch.get(watch))

    async def notify(self, watch: Watch, document: pidf.PresenceDocument, now: float) -> None:
        """NOTIFY ``document`` in every dialog of ``watch``."""
        dialogs = self._of(watch)
        body = self._body(watch.target_jid, document) if dialogs else b""
        for dialog in dialogs:
            await self._run(dialog, dialog.notifier.notify(now, body, PIDF), now)

    async def activate(self, watch: Watch, document: pidf.PresenceDocument, now: float) -> None:
        """NOTIFY active with ``document`` in every dialog of ``watch``."""
        dialogs = self._of(watch)
        body = self._body(watch.target_jid, document) if dialogs else b""
        for dialog in dialogs:
            await self._run(dialog, dialog.notifier.activate(now, body, PIDF), now)

    async def end(self, watch: Watch, reason: str, now: float, *, pending_only: bool) -> None:
        """NOTIFY terminated;reason=``reason`` in the (pending) dialogs of ``watch``."""
        for dialog in self._of(watch):
            if not pending_only or dialog.notifier.state is NotifierState.PENDING:
                await self._run(dialog, dialog.notifier.terminate(now, reason), now)

    def active_watches(self) -> list[Watch]:
        """Each watch with at least one active dialog."""
        return [
            watch
            for watch, dialogs in self._by_watch.items()
            if any(d.notifier.state is NotifierState.ACTIVE for d in _listed(dialogs))
        ]

    def _body(self, target_jid: str, document: pidf.PresenceDocument) -> bytes:
        cached = self._bodies.get(target_jid)
        if cached is not None and (cached[0] is document or cached[0] == document):
            return cached[1]
        body = pidf.encode(document)
        if target_jid in self._watched:
            self._bodies[target_jid] = (document, body)  # kept only while someone watches
        return body

    # --- the dialogs --------------------------------------------------------------------

    def _add(self, dialog: WatchDialog) -> None:
        key = dialog.notifier.dialog.id
        self._remove(key)  # a dialog of the same key would otherwise stay in the indexes
        self.dialogs[key] = dialog
        held = self._by_watch.get(dialog.watch)
        if held is None:
            self._by_watch[dialog.watch] = dialog
        elif isinstance(held, list):
            held.append(dialog)
        else:
            self._by_watch[dialog.watch] = [held, dialog]
        self._watched[dialog.watch.target_jid] += 1
        self._deadlines.set(key, dialog.notifier.next_deadline())

    def _remove(self, key: DialogId) -> None:
        dialog = self.dialogs.pop(key, None)
        self._deadlines.set(key, None)
        if dialog is None:
            return
        watch = dialog.watch
        held = self._by_watch.get(watch)
        if held is dialog or (isinstance(held, list) and dialog in held):  # by identity
            if isinstance(held, list):
                held.remove(dialog)
                if len(held) == 1:
                    self._by_watch[watch] = held[0]
            else:
                del self._by_watch[watch]
            self._watched[watch.target_jid] -= 1
            if self._watched[watch.target_jid] <= 0:
                del self._watched[watch.target_jid]
                # Nobody watches the target any more: its body would only take memory.
                self._bodies.pop(watch.target_jid, None)

    async def _step(
        self,
        dialog: WatchDialog,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: Answerable | None = None,
    ) -> None:
        """Run a dialog's effects; the last dialog of a watch ended by the watcher or by expiry
        is news for presence."""
        await self._run(dialog, effects, now, incoming)
        if dialog.notifier.state is NotifierState.TERMINATED and not self._of(dialog.watch):
            await self.events.watch_ended(dialog.watch, now)

    async def _run(
        self,
        dialog: WatchDialog | None,
        effects: Iterable[SubscriptionEffect],
        now: float,
        incoming: Answerable | None = None,
    ) -> None:
        if incoming is None:
            await self._sent(dialog, effects)
            return
        ended, responses, requests = self._sorted(dialog, effects)
        # DESIGN 8: a SUBSCRIBE is answered (and its first NOTIFY sent) once its dialog is
        # stored; a store that is down raises here and the gate answers 503 instead.
        await self._persist(dialog, ended)
        for response in responses:
            incoming.send(response)
        self._send_all(dialog, requests)

    def _sent(
        self, dialog: WatchDialog | None, effects: Iterable[SubscriptionEffect]
    ) -> Awaitable[None]:
        """Our own effects: the NOTIFYs go out now (even if storing fails, and in CSeq order
        with any sent after); what is returned stores the dialog."""
        ended, _, requests = self._sorted(dialog, effects)
        self._send_all(dialog, requests)
        return self._persist(dialog, ended)

    def _sorted(
        self, dialog: WatchDialog | None, effects: Iterable[SubscriptionEffect]
    ) -> tuple[bool, list[SipResponse], list[SipRequest]]:
        """Whether the dialog ended, the responses and the requests among ``effects``."""
        ended = False
        responses: list[SipResponse] = []
        requests: list[SipRequest] = []
        for effect in effects:
            match effect:
                case SendResponse(response):
                    responses.append(response)
                case SendRequest(request) if dialog is not None:
                    requests.append(request)
                case SubscriptionEnded(reason):
                    ended = True
                    if dialog is not None:
                        log.info("sip_watcher_ended", sip_uri=dialog.watcher_aor, reason=reason)
        return ended, responses, requests

    def _send_all(self, dialog: WatchDialog | None, requests: list[SipRequest]) -> None:
        for request in requests:
            assert dialog is not None
            self._send(dialog.notifier.dialog.id, request)

    async def _persist(self, dialog: WatchDialog | None, ended: bool) -> None:
        """Store (or delete) ``dialog`` after its effects, when its stored form changed."""
        if dialog is None:
            return
        key = dialog.notifier.dialog.id
        if ended or dialog.notifier.state is NotifierState.TERMINATED:
            self._remove(key)
            await self.store.delete_sip_watcher_subscription(_dialog_key(key))
            return
        if self.dialogs.get(key) is dialog:
            self._deadlines.set(key, dialog.notifier.next_deadline())
        if dialog.saved is not None and dialog.notifier.unchanged_since(dialog.saved):
            return  # e.g. the 2xx to a NOTIFY, or a NOTIFY within the CSeq reserve
        snap = dialog.notifier.snapshot()
        # The body is not needed: ``restore`` rebuilds it from the target's stored presence.
        if not needs_saving(dialog.saved, snap, ignore=("body",)):
            return  # e.g. the 2xx to a NOTIFY, or a NOTIFY within the CSeq reserve
        saved = reserved(snap)
        await self.store.save_sip_watcher_subscription(
            SipWatcherSubscription(
                dialog_id=_dialog_key(key),
                watcher_aor=dialog.watcher_aor,
                target_jid=dialog.watch.target_jid,
                state=SubscriptionState(dialog.notifier.state.value),
                dialog=snapshot_json(saved),
                expires_at=dialog.notifier.expires_at,
            )
        )
        dialog.saved = saved  # only once written: a failed write is tried again next time

    def _send(self, key: DialogId, request: SipRequest) -> None:
        cseq = request.cseq[0]

        def deliver(response: SipResponse | None, now: float) -> Awaitable[None]:
            # At once (the driver calls it in the answer's pass when the core is idle): the
            # usual 2xx is done here; a NOTIFY it owes goes out here, its storing is returned.
            dialog = self.dialogs.get(key)
            if dialog is None:
                return DONE
            notifier = dialog.notifier
            state, sip_dialog = notifier.state, notifier.dialog
            if response is None:
                effects = notifier.handle_timeout(cseq, now)
            elif response.call_id == key.call_id:
                effects = notifier.handle_response(response, now)
            else:
                return DONE
            if not effects and notifier.state is state and notifier.dialog is sip_dialog:
                # The usual 2xx: nothing a restart needs moved, so no snapshot to compare
                # (half the CPU of a NOTIFY's persistence checks); a retry time may have.
                self._deadlines.set(key, notifier.next_deadline())
                return DONE
            return self._sent(dialog, effects)

        self.transactions.send(request, peer_for(request), deliver)

    # --- timers, restart (DESIGN 8) -------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest notifier deadline (expiry, a NOTIFY owed)."""
        return self._deadlines.earliest()

    async def handle_timer(self, now: float, limit: int | None = None) -> int:
        """Fire up to ``limit`` notifiers that are due; returns how many ran."""
        due = self._deadlines.pop_due(now, limit)
        for key in due:
            dialog = self.dialogs.get(key)
            if dialog is not None:
                await self._step(dialog, dialog.notifier.handle_timer(now), now)
        return len(due)

    async def restore(self) -> int:
        """Rebuild the notifiers from the store; unreadable rows are dropped. Returns the count.
        Dialogs already held stay as they are (a takeover resumes only what it moved)."""
        held = {_dialog_key(key) for key in self.dialogs}
        # The target's presence, read and encoded once per target: its dialogs share the body.
        bodies: dict[str, bytes] = {}
        # The dialogs keep copies of the rows' strings (``fresh``): the rows are freed whole,
        # a page at a time (read here, not by an async generator: this module runs compiled).
        after: str | None = None
        while page := await self.store.sip_watcher_page(after, RESTORE_PAGE):
            after = page[-1].dialog_id
            for stored in page:
                if stored.dialog_id in held:
                    continue
                try:
                    snap = snapshot_from_json(NotifierSnapshot, stored.dialog)
                    # One string for all the target's watchers.
                    target = sys.intern(fresh(stored.target_jid))
                    # Each watcher's address is seen once here: the book's caches are left as
                    # they are.
                    watch = Watch(self.book.jid_for_sip_uri_once(stored.watcher_aor), target)
                    if snap.state == NotifierState.ACTIVE.value:
                        # The stored body may predate the last NOTIFY (see _run): the target's
                        # stored presence is the current one.
                        body = bodies.get(target)
                        if body is None:
                            document = await self.events.document_of(target)
                            body = bodies[target] = self._body(target, document)
                        snap = replace(snap, body=body, content_type=PIDF)
                    notifier = Notifier.restore(snap, policy=self.policy)
                except (KeyError, TypeError, ValueError, AddressError) as exc:
                    log.warning(
                        "subscription_unrestorable", dialog=stored.dialog_id, error=str(exc)
                    )
                    await self.store.delete_sip_watcher_subscription(stored.dialog_id)
                    continue
                dialog = WatchDialog.of(notifier, watch, stored.watcher_aor, saved=snap)
                if dialog.own_aor is not None:
                    dialog.own_aor = fresh(dialog.own_aor)
                self._add(dialog)
            del page
        return len(self.dialogs)
