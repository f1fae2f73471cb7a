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

Why the identity maps are in memory, not in the store: an entry lives ``keep`` seconds (at
least ``delay_time``, while the message itself may still be delivered, plus ``cache_time`` for
a late read marker) and is as cheap to lose as a notification is: after a restart a late
receipt is logged and dropped, never misdelivered. The ids of messages waiting in the durable
queue are stored with them (and their IMDN request), so a stored message keeps its identity.
The maps are bounded (oldest first out), so a flood of receipt requests cannot grow memory.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from component.addresses import bare_jid
from component.errors import Refusal
from component.logs import get_logger
from component.ports import Clock, SipPort, XmppPort
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


@dataclass(frozen=True, slots=True)
class FromXmpp:
    """An XMPP message relayed to SIP that asked for notifications (keyed by recipient AOR and
    IMDN Message-ID, as the recipient's notification names it)."""

    xmpp_sender: str  # full JID: where receipts go
    component_jid: str  # the SIP user's JID the message was sent to
    stanza_id: str
    ask: ImdnAsk


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
    message with its notification request. Sees only values and the two ports.
    """

    def __init__(
        self,
        xmpp: XmppPort,
        sip: SipPort,
        *,
        clock: Clock,
        keep: float,
        typing_refresh: int = TYPING_REFRESH,
    ) -> None:
        self.xmpp = xmpp
        self.sip = sip
        self.clock = clock
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
        self.counters = {"chat_states": 0, "receipts": 0, "dropped": 0}

    # --- SIP -> XMPP ----------------------------------------------------------------------------

    def dress(self, msg: SipText, stanza: ChatMessage) -> ChatMessage:
        """The stanza of a SIP text, with ``<request/>``/``<markable/>`` when IMDN asked, and
        the typing it ends forgotten (a message implies idle, RFC 3994 3.3)."""
        self.typing_to_xmpp.pop((stanza.sender, stanza.recipient), None)
        ask = msg.imdn
        if ask is None or stanza.id is None:
            return stanza
        self.from_sip.put(
            stanza.id,
            FromSip(msg.from_uri, msg.to_uri, bare_jid(stanza.recipient), ask),
            self.clock(),
        )
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
        """The SIP recipient's IMDN about a message from XMPP: a receipt, a marker, an error."""
        now = self.clock()
        key = (from_uri, news.message_id)
        sent = self.from_xmpp.get(key, now)
        if sent is None or news.status is ImdnStatus.PROCESSED:
            log.info("imdn_unmatched", sip_uri=from_uri, message_id=news.message_id[:80])
            return
        sender = sent.component_jid
        if news.status is ImdnStatus.FAILED:
            self.from_xmpp.pop(key, now)
            stub = ChatMessage(sent.xmpp_sender, sender, None, id=sent.stanza_id)
            self.xmpp.refuse(stub, _not_delivered(from_uri))
            return
        if news.status is ImdnStatus.DELIVERED and sent.ask.delivery:
            receipt = ChatMessage(
                sender, sent.xmpp_sender, None, id=self._new_id(), receipt_for=sent.stanza_id
            )
        elif news.status is ImdnStatus.DISPLAYED and sent.ask.display:
            self.from_xmpp.pop(key, now)
            receipt = ChatMessage(
                sender, sent.xmpp_sender, None, id=self._new_id(), displayed_for=sent.stanza_id
            )
        else:
            return
        if self.xmpp.send_message(receipt):
            self.counters["receipts"] += 1

    def on_xmpp_error(self, err: StanzaError) -> FromSip | None:
        """An error for a stanza we sent: the SIP message it was, when it asked for negative
        delivery notifications (the caller sends the IMDN ``failed``)."""
        if err.id is None:
            return None
        sent = self.from_sip.pop(err.id, self.clock())
        return sent if sent is not None and sent.ask.delivery else None

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
        sent = self.from_sip.get(marked, now)
        if sent is None or sent.xmpp_recipient != bare_jid(msg.sender):
            log.info("xmpp_marker_unmatched", jid=msg.sender, id=marked[:80])
            return
        if msg.receipt_for is not None and sent.ask.delivery:
            await self._notify(sent, ImdnStatus.DELIVERED)
            if not sent.ask.display:
                self.from_sip.pop(marked, now)
        elif msg.displayed_for is not None and sent.ask.display:
            self.from_sip.pop(marked, now)
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
        self.from_xmpp.put(
            (to_uri, message_id), FromXmpp(msg.sender, msg.recipient, msg.id, ask), now
        )
        return ask

    def text_of(self, msg: ChatMessage) -> str | None:
        """:func:`sip_text_of` ``msg``, quoting the message a correction replaces if known."""
        corrected, now, sender = None, self.clock(), bare_jid(msg.sender)
        if msg.replaces is not None:
            corrected = self.texts.get((sender, msg.replaces), now)
        if msg.body is not None and msg.id is not None:
            self.texts.put((sender, msg.id), msg.body, now)
        return sip_text_of(msg, corrected)

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
