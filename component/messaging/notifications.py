"""Beyond plain text (DESIGN 4.3): typing, delivery and read receipts, corrections and links.

| XMPP | SIP |
|---|---|
| XEP-0085 ``composing`` | RFC 3994 isComposing ``active`` with ``refresh`` |
| ``paused``, ``active``, ``inactive``, ``gone`` | ``idle`` (an expired ``active`` is ``paused``) |
| XEP-0184 ``<request/>`` / ``<received/>`` | RFC 5438 positive/negative-delivery, delivered |
| XEP-0333 ``<markable/>`` / ``<displayed/>`` | RFC 5438 display, displayed |
| error stanza, final SIP failure | IMDN ``failed``, error stanza |
| XEP-0308 correction, XEP-0066 link | a text that says so, the URL in the text |

Chat states are never queued: one that cannot go now is dropped (stale typing is noise), and
a body-less state never becomes a chat message. :class:`Notifications` keeps who was told
"typing" until when (:meth:`Notifications.expire` ends it, called by a sweep), and the
identities of messages that asked for notifications, in both directions, so a notification
always names the message the other side knows.

Identities live ``keep`` seconds (at least ``delay_time``, while the message itself may still
be delivered, plus ``cache_time`` for a late read marker), in the store's
``message_identity`` table with a bounded in-memory map in front (oldest first out, so a flood
of receipt requests cannot grow memory). Only messages that asked for a notification are
written, never on the message's own path: writes go in batches from a task of their own (one
transaction per batch, the next batch gathered while one is written). A notification that
misses memory asks the store, so one that comes after a restart, or reaches another instance
sharing the PostgreSQL database (DESIGN 9), names the right message. When the database is
down the gateway goes on with memory alone: identities it could not write are logged and
counted, never a reason to fail a message; a lookup that fails is a notification dropped, as
an unmatched one is. A sweep deletes expired rows. The last notification a message asked for
forgets its identity, in the store too; another instance's memory may still hold it until
``keep`` runs out. The ids of messages waiting in the durable queue are also stored with them.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from component.addresses import bare_jid
from component.errors import Refusal
from component.logs import get_logger
from component.ports import Clock, SipPort, XmppPort
from component.runtime.tasks import TaskOwner
from component.store import (
    IdentityKey,
    MessageDirection,
    MessageIdentity,
    StoreError,
    StorePort,
)
from component.values import (
    ChatMessage,
    ImdnAsk,
    ImdnNews,
    ImdnStatus,
    SipAnswer,
    SipText,
    StanzaError,
)

log = get_logger("component.messaging.notifications")

K = TypeVar("K")
V = TypeVar("V")

#: RFC 3994 3.2: seconds an ``active`` we send stays valid; XMPP says nothing more until the
#: user stops, so when it runs out without news the SIP side is told ``idle``.
TYPING_REFRESH = 60
#: RFC 3994 3.3: an ``active`` without ``refresh`` lapses after 120 s.
DEFAULT_REFRESH = 120
#: A longer ``refresh`` from a SIP client is cut to this: typing is kept only so long.
MAX_REFRESH = 300
MAX_ENTRIES = 50_000
_QUOTE = 60  # characters of the corrected message quoted in a correction
_IMDN_ID = re.compile(r"[\x21-\x7e]{1,256}")  # RFC 5438 Message-ID: visible ASCII
OK = SipAnswer(200, "OK")


class Recent(Generic[K, V]):
    """A bounded map whose entries expire ``keep`` seconds after they were put."""

    def __init__(self, keep: float, max_entries: int = MAX_ENTRIES) -> None:
        self.keep = keep
        self.max_entries = max_entries
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def put(self, key: K, value: V, now: float) -> None:
        """Remember ``value`` for ``keep`` seconds; the oldest entry goes when full."""
        self._items.pop(key, None)
        self._items[key] = (now + self.keep, value)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def get(self, key: K, now: float) -> V | None:
        """The value of ``key`` while it has not expired."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[0] <= now:
            del self._items[key]
            return None
        return item[1]

    def pop(self, key: K, now: float) -> V | None:
        """Take ``key`` out, returning its value while it had not expired."""
        value = self.get(key, now)
        self._items.pop(key, None)
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class FromSip:
    """A SIP message relayed to XMPP that asked for notifications (keyed by our stanza id)."""

    sip_sender: str  # where notifications go
    sent_to: str  # the address it was sent to: notifications come from there (RFC 5438 6)
    xmpp_recipient: str  # bare JID that may answer
    ask: ImdnAsk

    def identity(self, stanza_id: str, expires_at: float) -> MessageIdentity:
        """The stored form, keyed by the stanza id the XMPP recipient knows."""
        ask = self.ask
        return MessageIdentity(
            MessageDirection.SIP_TO_XMPP,
            self.xmpp_recipient,
            stanza_id,
            self.sip_sender,
            ask.message_id,
            self.sent_to,
            ask.sent_at,
            ask.delivery,
            ask.display,
            expires_at,
        )

    @classmethod
    def of(cls, stored: MessageIdentity) -> FromSip:
        """The in-memory form of a stored identity."""
        ask = ImdnAsk(stored.sender_id, stored.sent_at, stored.delivery, stored.display)
        return cls(stored.sender, stored.sent_to, stored.recipient, ask)


@dataclass(frozen=True, slots=True)
class FromXmpp:
    """An XMPP message relayed to SIP that asked for notifications (keyed by recipient AOR and
    IMDN Message-ID, as the recipient's notification names it)."""

    xmpp_sender: str  # full JID: where receipts go
    component_jid: str  # the SIP user's JID the message was sent to
    stanza_id: str
    ask: ImdnAsk

    def identity(self, to_uri: str, expires_at: float) -> MessageIdentity:
        """The stored form, keyed by the recipient's AOR and the IMDN Message-ID."""
        ask = self.ask
        return MessageIdentity(
            MessageDirection.XMPP_TO_SIP,
            to_uri,
            ask.message_id,
            self.xmpp_sender,
            self.stanza_id,
            self.component_jid,
            ask.sent_at,
            ask.delivery,
            ask.display,
            expires_at,
        )

    @classmethod
    def of(cls, stored: MessageIdentity) -> FromXmpp:
        """The in-memory form of a stored identity."""
        ask = ImdnAsk(stored.recipient_id, stored.sent_at, stored.delivery, stored.display)
        return cls(stored.sender, stored.sent_to, stored.sender_id, ask)


def sip_text_of(msg: ChatMessage, corrected: str | None = None) -> str | None:
    """The SIP text of an XMPP message: its body, a XEP-0308 correction said so in words, a
    XEP-0066 link in the text; None when there is no text at all (a chat state, a receipt).

    A XEP-0461 reply's body already carries its fallback quote: it goes as it is.
    """
    body = msg.body
    if msg.link and (body is None or msg.link not in body):
        body = msg.link if not body else f"{body}\n{msg.link}"
    if body is None:
        return None
    if msg.replaces is not None:
        if corrected:
            short = corrected if len(corrected) <= _QUOTE else corrected[: _QUOTE - 1] + "…"
            return f'Correction of "{short}": {body}'
        return f"Correction of the previous message: {body}"
    return body


class Notifications:
    """Chat states and IMDN <-> XEP-0184/0333 across the gateway (DESIGN 4.3).

    The message router hands it what is not plain chat, and asks it to dress a relayed
    message with its notification request. Sees only values and the ports; without a
    ``store``, identities are kept in memory only.
    """

    def __init__(
        self,
        xmpp: XmppPort,
        sip: SipPort,
        *,
        clock: Clock,
        keep: float,
        typing_refresh: int = TYPING_REFRESH,
        store: StorePort | None = None,
        shared: bool = False,
    ) -> None:
        self.xmpp = xmpp
        self.shared = shared  # other instances may relay a conversation's stanzas (DESIGN 9)
        self.sip = sip
        self.clock = clock
        self.keep = keep
        self.store = store
        self.typing_refresh = typing_refresh
        self.from_sip: Recent[str, FromSip] = Recent(keep)
        self.from_xmpp: Recent[tuple[str, str], FromXmpp] = Recent(keep)
        self.texts: Recent[tuple[str, str], str] = Recent(keep)  # corrected messages' text
        # Who was told "typing", until when: (from, to) as that side names them.
        self.typing_to_sip: dict[tuple[str, str], float] = {}
        self.typing_to_xmpp: dict[tuple[str, str], float] = {}
        # Pairs with a state in flight to SIP -> the state waiting for it to be answered.
        self._inflight: dict[tuple[str, str], bool | None] = {}
        self._prefix = os.urandom(4).hex()
        self._ids = 0
        self.counters = {
            "chat_states": 0,
            "receipts": 0,
            "dropped": 0,
            "identities_stored": 0,
            "identities_unstored": 0,  # the database was down: memory only
            "identities_found": 0,  # a notification that missed memory, mapped by the store
        }
        # Identities waiting to be written, and keys to forget, in the next batch; the task
        # writing batches while there are any.
        self._unsaved: dict[IdentityKey, MessageIdentity] = {}
        self._forgotten: set[IdentityKey] = set()
        self._writer: asyncio.Task[None] | None = None
        self._store_failing = False
        self._tasks = TaskOwner("notification_task_failed")

    # --- SIP -> XMPP ----------------------------------------------------------------------------

    def dress(self, msg: SipText, stanza: ChatMessage) -> ChatMessage:
        """The stanza of a SIP text, with ``<request/>``/``<markable/>`` when IMDN asked, and
        the typing it ends forgotten (a message implies idle, RFC 3994 3.3)."""
        self.typing_to_xmpp.pop((stanza.sender, stanza.recipient), None)
        ask = msg.imdn
        if ask is None or stanza.id is None:
            return stanza
        sent, now = FromSip(msg.from_uri, msg.to_uri, bare_jid(stanza.recipient), ask), self.clock()
        self.from_sip.put(stanza.id, sent, now)
        self._save(sent.identity(stanza.id, now + self.keep))
        return replace(stanza, receipt_request=ask.delivery, markable=ask.display)

    def on_sip(self, msg: SipText, recipient: str, sender: str) -> SipAnswer:
        """An isComposing or an IMDN notification from ``sender`` (JID) to ``recipient``."""
        if msg.composing is not None:
            return self._sip_composing(msg, recipient, sender)
        if msg.notification is not None:
            self._sip_notification(msg.notification, msg.from_uri)
        return OK

    def _sip_composing(self, msg: SipText, recipient: str, sender: str) -> SipAnswer:
        assert msg.composing is not None
        pair, now = (sender, recipient), self.clock()
        if msg.composing.active:
            refresh = min(msg.composing.refresh or DEFAULT_REFRESH, MAX_REFRESH)
            self.typing_to_xmpp[pair] = now + refresh
            self._state_to_xmpp(pair, "composing")
        elif self.typing_to_xmpp.pop(pair, None) is not None:
            self._state_to_xmpp(pair, "active")
        return OK

    def _state_to_xmpp(self, pair: tuple[str, str], state: str) -> None:
        sender, recipient = pair
        message = ChatMessage(sender, recipient, None, id=self._new_id(), chat_state=state)
        if self.xmpp.send_message(message):  # never queued: a dead link drops it
            self.counters["chat_states"] += 1
        else:
            self.counters["dropped"] += 1

    def _sip_notification(self, news: ImdnNews, from_uri: str) -> None:
        """The SIP recipient's IMDN about a message from XMPP: a receipt, a marker, an error.

        One that misses memory is looked up in the store by a task of its own: the answer to
        the notification (200) does not wait for the database."""
        sent = self.from_xmpp.get((from_uri, news.message_id), self.clock())
        if news.status is ImdnStatus.PROCESSED:
            sent = None  # never asked for
        elif sent is None and self.store is not None:
            self._tasks.own(self._sip_notification_stored(news, from_uri))
            return
        self._answer_sip_notification(news, from_uri, sent)

    async def _sip_notification_stored(self, news: ImdnNews, from_uri: str) -> None:
        stored = await self._stored(MessageDirection.XMPP_TO_SIP, news.message_id, from_uri)
        sent = None if stored is None else FromXmpp.of(stored)
        if sent is not None:
            self.from_xmpp.put((from_uri, news.message_id), sent, self.clock())
        self._answer_sip_notification(news, from_uri, sent)

    def _answer_sip_notification(
        self, news: ImdnNews, from_uri: str, sent: FromXmpp | None
    ) -> None:
        if sent is None:
            log.info("imdn_unmatched", sip_uri=from_uri, message_id=news.message_id[:80])
            return
        key = (from_uri, news.message_id)
        sender = sent.component_jid
        if news.status is ImdnStatus.FAILED:
            self._forget_from_xmpp(key)
            stub = ChatMessage(sent.xmpp_sender, sender, None, id=sent.stanza_id)
            self.xmpp.refuse(stub, _not_delivered(from_uri))
            return
        if news.status is ImdnStatus.DELIVERED and sent.ask.delivery:
            receipt = ChatMessage(
                sender, sent.xmpp_sender, None, id=self._new_id(), receipt_for=sent.stanza_id
            )
        elif news.status is ImdnStatus.DISPLAYED and sent.ask.display:
            self._forget_from_xmpp(key)
            receipt = ChatMessage(
                sender, sent.xmpp_sender, None, id=self._new_id(), displayed_for=sent.stanza_id
            )
        else:
            return
        if self.xmpp.send_message(receipt):
            self.counters["receipts"] += 1

    def _forget_from_xmpp(self, key: tuple[str, str]) -> None:
        self.from_xmpp.pop(key, self.clock())
        self._forget(IdentityKey(MessageDirection.XMPP_TO_SIP, *key))

    def on_xmpp_error(self, err: StanzaError) -> FromSip | None:
        """An error for a stanza we sent: the SIP message it was, when it asked for negative
        delivery notifications (the caller sends the IMDN ``failed``)."""
        if err.id is None:
            return None
        sent = self.from_sip.pop(err.id, self.clock())
        if sent is None:
            if self.store is not None:
                self._tasks.own(self._xmpp_error_stored(err.id))
            return None
        self._forget(IdentityKey(MessageDirection.SIP_TO_XMPP, sent.xmpp_recipient, err.id))
        return sent if sent.ask.delivery else None

    async def _xmpp_error_stored(self, stanza_id: str) -> None:
        """:meth:`on_xmpp_error` for a stanza memory does not know: a restart, or another
        instance sent it. Any recipient: the error may come from its server."""
        stored = await self._stored(MessageDirection.SIP_TO_XMPP, stanza_id, None)
        if stored is None:
            return
        self._forget(stored.key)
        if stored.delivery:
            await self.tell_failed(FromSip.of(stored))

    async def tell_failed(self, sent: FromSip) -> None:
        """IMDN ``failed`` to the SIP sender of a message XMPP refused (RFC 5438 negative)."""
        await self._notify(sent, ImdnStatus.FAILED)

    # --- XMPP -> SIP ----------------------------------------------------------------------------

    async def on_xmpp(self, msg: ChatMessage, from_uri: str, to_uri: str) -> None:
        """A body-less XMPP message to a SIP user: a receipt, a read marker, a chat state."""
        if msg.receipt_for is not None or msg.displayed_for is not None:
            await self._xmpp_marker(msg)
            return
        if msg.chat_state is None:
            return
        pair, now = (from_uri, to_uri), self.clock()
        if msg.chat_state == "composing":
            self.typing_to_sip[pair] = now + self.typing_refresh
            await self._state_to_sip(pair, active=True)
        elif self.typing_to_sip.pop(pair, None) is not None:
            await self._state_to_sip(pair, active=False)
        elif msg.chat_state == "paused" and self.shared:
            # XEP-0085: paused comes only after composing, which another instance relayed
            # (DESIGN 9: ejabberd picks a connection per stanza).
            await self._state_to_sip(pair, active=False)

    async def _state_to_sip(self, pair: tuple[str, str], *, active: bool) -> None:
        """One state in flight per pair: a state that comes meanwhile replaces any that waits
        (only the latest is news), and goes once the one in flight is answered, never before
        it (a proxy's workers reorder requests in flight at once)."""
        if pair in self._inflight:
            self._inflight[pair] = active
            return
        self._inflight[pair] = None
        try:
            wanted: bool | None = active
            while wanted is not None:
                if not await self._send_state(pair, active=wanted):
                    break  # what waited is dropped too
                wanted, self._inflight[pair] = self._inflight[pair], None
        finally:
            del self._inflight[pair]

    async def _send_state(self, pair: tuple[str, str], *, active: bool) -> bool:
        from_uri, to_uri = pair
        status = await self.sip.send_composing(
            from_uri=from_uri,
            to_uri=to_uri,
            active=active,
            refresh=self.typing_refresh if active else None,
        )
        if status < 300:
            self.counters["chat_states"] += 1
            return True
        # Never queued, never retried: a client that takes no typing (415) hears no more of
        # it (the SIP side remembers that), and stale typing is noise.
        self.counters["dropped"] += 1
        self.typing_to_sip.pop(pair, None)
        return False

    async def _xmpp_marker(self, msg: ChatMessage) -> None:
        """``<received/>`` or ``<displayed/>`` for a message from SIP: an IMDN back to its
        sender, if it asked for that and the marker comes from whom it was sent to."""
        now = self.clock()
        marked = msg.receipt_for or msg.displayed_for
        assert marked is not None
        marker_from = bare_jid(msg.sender)
        sent = self.from_sip.get(marked, now)
        if sent is None and self.store is not None:
            stored = await self._stored(MessageDirection.SIP_TO_XMPP, marked, marker_from)
            if stored is not None:
                sent = FromSip.of(stored)
                self.from_sip.put(marked, sent, now)
        if sent is None or sent.xmpp_recipient != marker_from:
            log.info("xmpp_marker_unmatched", jid=msg.sender, id=marked[:80])
            return
        key = IdentityKey(MessageDirection.SIP_TO_XMPP, marker_from, marked)
        if msg.receipt_for is not None and sent.ask.delivery:
            if not sent.ask.display:
                self.from_sip.pop(marked, now)
                self._forget(key)
            await self._notify(sent, ImdnStatus.DELIVERED)
        elif msg.displayed_for is not None and sent.ask.display:
            self.from_sip.pop(marked, now)
            self._forget(key)
            await self._notify(sent, ImdnStatus.DISPLAYED)

    async def _notify(self, sent: FromSip, status: ImdnStatus) -> None:
        ask = sent.ask
        when = ask.sent_at if ask.sent_at is not None else self.clock()
        code = await self.sip.send_notification(
            from_uri=sent.sent_to,
            to_uri=sent.sip_sender,
            message_id=ask.message_id,
            sent_at=when,
            status=status,
        )
        self.counters["receipts" if code < 300 else "dropped"] += 1
        log.info("imdn_sent", sip_uri=sent.sip_sender, status=status.value, answer=code)

    def ask_for(self, msg: ChatMessage, from_uri: str, to_uri: str) -> ImdnAsk | None:
        """The IMDN request for an XMPP message to SIP that asked for a receipt or markers,
        remembered so the recipient's notification finds the stanza (None: it asked none).

        The IMDN Message-ID is the XEP-0359 origin-id when it is one RFC 5438 allows, else
        one of ours; either way the notification maps back to the stanza id.
        """
        self.typing_to_sip.pop((from_uri, to_uri), None)
        if not (msg.receipt_request or msg.markable) or msg.id is None:
            return None
        origin = msg.origin_id
        message_id = origin if origin and _IMDN_ID.fullmatch(origin) else self._new_id()
        now = self.clock()
        ask = ImdnAsk(message_id, now, delivery=msg.receipt_request, display=msg.markable)
        sent = FromXmpp(msg.sender, msg.recipient, msg.id, ask)
        self.from_xmpp.put((to_uri, message_id), sent, now)
        self._save(sent.identity(to_uri, now + self.keep))
        return ask

    def text_of(self, msg: ChatMessage) -> str | None:
        """:func:`sip_text_of` ``msg``, quoting the message a correction replaces if known."""
        corrected, now, sender = None, self.clock(), bare_jid(msg.sender)
        if msg.replaces is not None:
            corrected = self.texts.get((sender, msg.replaces), now)
        if msg.body is not None and msg.id is not None:
            self.texts.put((sender, msg.id), msg.body, now)
        return sip_text_of(msg, corrected)

    # --- the store behind the identity maps ------------------------------------------------------

    def _save(self, identity: MessageIdentity) -> None:
        """Write ``identity`` with the next batch (never on the caller's path)."""
        if self.store is None:
            return
        if len(self._unsaved) >= MAX_ENTRIES:
            # A database that hangs rather than fails: memory still maps it, bounded as ever.
            self.counters["identities_unstored"] += 1
            return
        self._unsaved[identity.key] = identity
        self._forgotten.discard(identity.key)
        self._start_writer()

    def _forget(self, key: IdentityKey) -> None:
        """Delete ``key``'s identity with the next batch: its last notification came."""
        if self.store is None:
            return
        self._unsaved.pop(key, None)
        self._forgotten.add(key)
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = self._tasks.own(self._write())

    async def _write(self) -> None:
        """Write batches until none is left: what comes while one is written is the next."""
        store = self.store
        assert store is not None
        try:
            while self._unsaved or self._forgotten:
                saved, self._unsaved = list(self._unsaved.values()), {}
                forgotten, self._forgotten = list(self._forgotten), set()
                try:
                    await store.write_message_identities(saved, forgotten)
                except StoreError as exc:
                    # Memory still maps them on this instance until keep runs out.
                    self.counters["identities_unstored"] += len(saved)
                    if not self._store_failing:
                        self._store_failing = True
                        log.warning(
                            "message_identities_not_stored", count=len(saved), error=str(exc)
                        )
                    continue
                self.counters["identities_stored"] += len(saved)
                if self._store_failing:
                    self._store_failing = False
                    log.info("message_identities_stored_again", count=len(saved))
        finally:
            self._writer = None

    async def _stored(
        self, direction: MessageDirection, recipient_id: str, recipient: str | None
    ) -> MessageIdentity | None:
        """The stored identity a notification names, if any; None when the store fails."""
        store = self.store
        if store is None:
            return None
        try:
            found = await store.message_identity(direction, recipient_id, self.clock(), recipient)
        except StoreError as exc:
            log.info("message_identity_lookup_failed", id=recipient_id[:80], error=str(exc))
            return None
        if found is not None:
            self.counters["identities_found"] += 1
        return found

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the identities still to be written and the lookups in
        flight (at shutdown, before the store closes)."""
        await self._tasks.wait(timeout)

    async def expire_stored(self) -> int:
        """Delete the stored identities whose ``keep`` ran out (called by a sweep)."""
        if self.store is None:
            return 0
        return await self.store.expire_message_identities(self.clock())

    # --- time -----------------------------------------------------------------------------------

    async def expire(self) -> None:
        """End typing nobody refreshed: XMPP hears ``paused`` for an isComposing ``active``
        that lapsed, SIP hears ``idle`` when an XMPP ``composing`` outlived its refresh."""
        now = self.clock()
        for pair in [p for p, until in self.typing_to_xmpp.items() if until <= now]:
            del self.typing_to_xmpp[pair]
            self._state_to_xmpp(pair, "paused")
        for pair in [p for p, until in self.typing_to_sip.items() if until <= now]:
            del self.typing_to_sip[pair]
            await self._state_to_sip(pair, active=False)

    def _new_id(self) -> str:
        self._ids += 1
        return f"sn{self._prefix}{self._ids}"


def _not_delivered(sip_uri: str) -> Refusal:
    """The error an XMPP sender gets when the SIP recipient's IMDN says ``failed``."""
    return Refusal(
        480,
        "Temporarily Unavailable",
        "recipient-unavailable",
        f"{sip_uri.removeprefix('sip:')} reports the message was not delivered",
        xmpp_type="cancel",
    )
