"""The durable message queue (DESIGN 8): what can't be delivered now waits in the store.

A message is stored when its recipient is out of reach (SIP 408/480/503/timeout, a 404 for a
user seen online before, the XMPP link down). It is retried with backoff and at once when its
recipient comes online, delivered late (XMPP with a XEP-0203 delay stamp, SIP with its original
text), or failed after ``delay_time``: the SIP sender gets a notice, the XMPP sender an error
stanza. Order holds per conversation: while one of a conversation's messages is stored, its
later ones are stored behind it (:meth:`DurableQueue.holds`) and tried after it, never before.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable, Iterable

from component.addresses import AddressBook, AddressError, bare_jid, sip_user_and_host
from component.errors import RETRYABLE, Refusal, busy, refusal_for_sip_status
from component.logs import get_logger
from component.messaging.conversations import Pair
from component.ports import NO_METRICS, Clock, Metrics, Outcome, SipPort, Way, XmppPort
from component.store import (
    MessageDirection,
    MessageState,
    NewMessage,
    QueuedMessage,
    StorePort,
    StoreUnavailable,
)
from component.values import ChatMessage, ImdnAsk

log = get_logger("component.messaging")

RETRY_AFTER = 30  # seconds, when a message can be neither written nor stored, or we are busy
LINK_RETRY = 5.0  # seconds before a stored SIP -> XMPP message is tried again on a dead link
_MAX_SEEN = 50_000  # home users known to be "seen before", to skip the store lookup


class DurableQueue:
    """Stores, retries, delivers late or fails the messages that could not go at once."""

    def __init__(
        self,
        book: AddressBook,
        xmpp: XmppPort,
        sip: SipPort,
        store: StorePort,
        *,
        clock: Clock,
        delay_time: float,
        instance: str,
        per_recipient: int,
        counters: dict[str, int],
        notice: Callable[[str, str], Awaitable[None]],
        relayed: Callable[[ChatMessage, str], None],
        new_id: Callable[[], str],
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.book, self.xmpp, self.sip, self.store = book, xmpp, sip, store
        self.clock = clock
        self.delay_time = delay_time
        self.instance = instance
        self.per_recipient = per_recipient
        self.counters = counters
        self._notice = notice
        self._relayed = relayed
        self._new_id = new_id
        self.metrics = metrics
        # Messages this process stored and not yet finished, per conversation: while a
        # conversation has any, its new messages are stored behind them. ``_mine``: their ids
        # (what an earlier run stored does not count here; see ``stored_earlier``).
        self._held: dict[Pair, int] = {}
        self._mine: set[int] = set()
        # Conversations asked about messages an earlier run stored, and those found with some:
        # held until a retry pass has sent all of them.
        self._checked: set[Pair] = set()
        self._earlier: set[Pair] = set()
        # No earlier run left anything waiting (``resume``): no conversation needs asking.
        self._fresh = True
        self._seen: set[str] = set()

    # --- storing --------------------------------------------------------------------------

    def holds(self, pair: Pair) -> bool:
        """Whether earlier messages of ``pair`` wait in the store: then new ones wait too."""
        return pair in self._held or pair in self._earlier

    async def resume(self) -> None:
        """At start: whether an earlier run (one stopped by SIGTERM, or whose link was down)
        left messages waiting; only then are conversations asked (``stored_earlier``)."""
        try:
            counts = await self.store.counts()
        except StoreUnavailable:
            self._fresh = False  # unknown: ask
            return
        self._fresh = counts.queued + counts.inflight == 0

    def unchecked(self, pair: Pair) -> bool:
        """Whether ``pair`` may have messages an earlier run stored, not asked about yet."""
        return not self._fresh and pair not in self._checked

    async def stored_earlier(self, pair: Pair) -> bool:
        """Whether messages of ``pair`` that an earlier run stored still wait; asked once per
        conversation and run, before its first message goes."""
        if not self.unchecked(pair):
            return False
        try:
            waiting = await self.store.messages_for_recipient(pair[1])
        except StoreUnavailable:
            return False
        if len(self._checked) >= _MAX_SEEN:
            self._checked.clear()
        self._checked.add(pair)
        if any(pair_of(queued) == pair for queued in waiting):
            self._earlier.add(pair)
            return True
        return False

    async def put(self, message: NewMessage, *, capped: bool = True) -> Refusal | None:
        """Store ``message``; the refusal for its sender when it can't be (cap, store down).

        ``capped=False`` for messages already taken in, stored only because the gateway
        stops (DESIGN 8): the per-recipient cap is for new ones.
        """
        try:
            if capped:
                waiting = await self.store.messages_for_recipient(message.recipient)
                if len(waiting) >= self.per_recipient:
                    who = _readable(message.recipient)
                    return busy(
                        f"{len(waiting)} messages already wait for {who}, the most kept for "
                        "one recipient; this one was not queued",
                        RETRY_AFTER,
                    )
            stored = await self.store.enqueue_message(message)
        except StoreUnavailable:
            return busy("the message store is unavailable", RETRY_AFTER)
        self._mine.add(stored.id)
        pair = pair_of(message)
        self._held[pair] = self._held.get(pair, 0) + 1
        self.counters["queued"] += 1
        self.metrics.message(Way(message.direction), Outcome.QUEUED)
        return None

    def for_sip(
        self,
        msg: ChatMessage,
        from_uri: str,
        to_uri: str,
        reason: str,
        ask: ImdnAsk | None = None,
    ) -> NewMessage:
        """The stored form of an XMPP message to a SIP user, with its IMDN request."""
        now = self.clock()
        return NewMessage(
            MessageDirection.XMPP_TO_SIP,
            msg.sender,
            to_uri,
            msg.body or "",
            "text/plain",
            created_at=now,
            deliver_by=now + self.delay_time,
            next_attempt_at=now + backoff(0, self.delay_time),
            extra={
                "from_uri": from_uri,
                "to_jid": msg.recipient,
                "id": msg.id,
                "reason": reason,
                "imdn": None if ask is None else [ask.message_id, ask.delivery, ask.display],
            },
        )

    # --- what a SIP answer means ----------------------------------------------------------

    async def is_offline(self, status: int, aor: str) -> bool:
        """480/408/503 and a 404 for a home user seen before mean "not now" (DESIGN 4.2)."""
        if status in RETRYABLE:
            return True
        if status == 404 and self._is_home(aor):
            try:
                return await self.store.user_seen_before(aor)
            except StoreUnavailable:
                # Unknown without the store: treated as "not now", so storing it is tried
                # and, the store being down, the sender is told to retry (resource-constraint).
                return True
        return False

    def knows_user(self, aor: str) -> bool:
        """Whether :meth:`saw_user` has nothing to do for ``aor`` (seen, or not a home user)."""
        return aor in self._seen or not self._is_home(aor)

    async def saw_user(self, aor: str) -> None:
        """A MESSAGE to ``aor`` got a 2xx: the user exists, so a later 404 means offline.

        Recorded as seen but not online: a delivered message says nothing of a registration,
        and an online mark would hide the user's next REGISTER from presence (DESIGN 5.4).
        """
        if self.knows_user(aor):
            return
        try:
            if not await self.store.user_seen_before(aor):
                await self.store.mark_user_seen(aor, self.clock())
                await self.store.set_user_offline(aor)
                log.info("sip_user_seen", sip_uri=aor, by="delivered message")
        except StoreUnavailable:
            return
        if len(self._seen) >= _MAX_SEEN:
            self._seen.clear()
        self._seen.add(aor)

    def _is_home(self, aor: str) -> bool:
        try:
            return sip_user_and_host(aor)[1] == self.book.sip_domain
        except AddressError:
            return False

    # --- retrying -------------------------------------------------------------------------

    async def retry_due(self, limit: int = 100) -> int:
        """Try every due stored message once; expire what is past ``delay_time``."""
        now = self.clock()
        for expired in await self.store.expire_messages(now):
            self._finished(expired)
            await self._give_up(expired)
        claimed = await self.store.claim_due_messages(now, limit, self.instance)
        await self._attempt_all(claimed, again=True)
        return len(claimed)

    async def flush_recipient(self, recipient: str) -> None:
        """A SIP user came online: retry what waits for them at once (DESIGN 8)."""
        claimed = await self.store.claim_messages_for_recipient(
            recipient, self.clock(), self.instance
        )
        await self._attempt_all(claimed, again=True)

    async def _attempt_all(self, claimed: Iterable[QueuedMessage], *, again: bool) -> bool:
        """Each conversation's messages in the order they came, one after the other; False
        when one of them had to wait."""
        by_pair: dict[Pair, list[QueuedMessage]] = {}
        for queued in sorted(claimed, key=lambda m: m.id):
            by_pair.setdefault(pair_of(queued), []).append(queued)
        cleared: dict[str, set[Pair]] = {}
        went = True
        for pair, messages in by_pair.items():
            if not await self._attempt_pair(messages):
                went = False
            elif self.holds(pair):
                cleared.setdefault(messages[0].recipient, set()).add(pair)
        # Messages stored behind these while they were being sent: their turn is now. Once
        # all of them went, nothing an earlier run stored holds these conversations any more.
        for recipient, pairs in cleared.items() if again else ():
            more = await self.store.claim_messages_for_recipient(
                recipient, self.clock(), self.instance
            )
            if await self._attempt_all(more, again=False):
                self._earlier -= pairs
        return went

    async def _attempt_pair(self, messages: list[QueuedMessage]) -> bool:
        """Try one conversation's claimed messages in order; False when one had to wait."""
        first = messages[0]
        earlier = await self._earlier_waiting(first)
        if earlier is not None:
            # An earlier message of the conversation is not in this batch: it goes first.
            for queued in messages:
                await self.store.reschedule(queued.id, earlier, queued.last_error)
            return False
        for index, queued in enumerate(messages):
            next_at = await self._attempt(queued)
            if next_at is not None:
                for later in messages[index + 1 :]:
                    await self.store.reschedule(later.id, next_at, later.last_error)
                return False
        return True

    async def _earlier_waiting(self, first: QueuedMessage) -> float | None:
        """When the earliest waiting message of ``first``'s conversation before it is due."""
        pair, now = pair_of(first), self.clock()
        for queued in await self.store.messages_for_recipient(first.recipient):
            if queued.id < first.id and queued.deliver_by > now and pair_of(queued) == pair:
                return max(queued.next_attempt_at, now)
        return None

    async def _attempt(self, queued: QueuedMessage) -> float | None:
        """One try; None when the message is finished, else when it is due again."""
        now = self.clock()
        extra = queued.extra
        if queued.direction is MessageDirection.SIP_TO_XMPP:
            stanza = ChatMessage(
                sender=str(extra.get("from_jid") or self.book.jid_for_sip_uri(queued.sender)),
                recipient=queued.recipient,
                body=queued.body,
                id=extra.get("id") or self._new_id(),  # a re-send keeps its id (DESIGN 8)
                html=extra.get("html"),
                receipt_request=bool(extra.get("receipt")),
                markable=bool(extra.get("markable")),
                delay_stamp=extra.get("stamp") or _stamp(queued.created_at),
                delay_from=self.book.component,
            )
            if self.xmpp.send_message(stanza):
                self._relayed(stanza, queued.sender)
                self.metrics.message(Way.TO_XMPP, Outcome.DELIVERED)
                await self.store.mark_delivered(queued.id, now)
                self._finished(queued)
                return None
            next_at = min(now + LINK_RETRY, queued.deliver_by)
            await self.store.reschedule(queued.id, next_at, "xmpp link down")
            return next_at
        # DESIGN 4.3: late, so the SIP user sees when it was written (CPIM DateTime).
        imdn = extra.get("imdn")
        ask = None if not imdn else ImdnAsk(str(imdn[0]), queued.created_at, *map(bool, imdn[1:]))
        status = await self.sip.send_text(
            from_uri=str(extra.get("from_uri")),
            to_uri=queued.recipient,
            body=queued.body,
            from_display=extra.get("from_display"),  # a room message's speaker (DESIGN 6)
            imdn=ask,
            sent_at=queued.created_at,
        )
        if status < 300:
            await self.store.mark_delivered(queued.id, now)
            self._finished(queued)
            self.counters["xmpp_to_sip"] += 1
            self.metrics.message(Way.TO_SIP, Outcome.DELIVERED)
            log.info("message_delivered_late", jid=queued.sender, sip_uri=queued.recipient)
            await self.saw_user(queued.recipient)
            return None
        if await self.is_offline(status, queued.recipient):
            next_at = min(now + backoff(queued.attempts, self.delay_time), queued.deliver_by)
            await self.store.reschedule(queued.id, next_at, f"SIP {status}")
            return next_at
        await self.store.mark_failed(queued.id, f"SIP {status}", now)
        self._finished(queued)
        self.counters["failed"] += 1
        self.metrics.message(Way.TO_SIP, Outcome.FAILED)
        refusal = refusal_for_sip_status(status)
        log.info(
            "message_rejected",
            jid=queued.sender,
            sip_uri=queued.recipient,
            status=status,
            condition=refusal.xmpp_condition,
        )
        self._refuse_queued(queued, refusal)
        return None

    async def _give_up(self, queued: QueuedMessage) -> None:
        """Past ``delay_time``: the sender is told, with the reason."""
        self.counters["failed"] += 1
        self.metrics.message(Way(queued.direction), Outcome.FAILED)
        log.info(
            "message_expired",
            sender=queued.sender,
            recipient=queued.recipient,
            reason=queued.last_error,
        )
        wait = f"{self.delay_time:g} s"
        if queued.direction is MessageDirection.XMPP_TO_SIP:
            refusal = unavailable(
                f"not delivered: {_readable(queued.recipient)} stayed out of reach for {wait}"
            )
            self._refuse_queued(queued, refusal)
        else:
            await self._notice(
                queued.sender,
                f"Your message to {bare_jid(queued.recipient)} was not delivered: "
                f"the XMPP service was unreachable for {wait}.",
            )

    def _refuse_queued(self, queued: QueuedMessage, refusal: Refusal) -> None:
        """Tell the XMPP sender of a stored message it failed; a room's message (DESIGN 6) has
        no one to tell (an error to the room would remove the SIP user from it)."""
        if queued.extra.get("room"):
            log.info("room_message_expired", sip_uri=queued.recipient, room=queued.sender)
            return
        self.xmpp.refuse(queued_stanza(queued), refusal)

    def _finished(self, queued: QueuedMessage) -> None:
        if queued.id not in self._mine:
            return  # stored by an earlier run: it never held anything in this one
        self._mine.discard(queued.id)
        pair = pair_of(queued)
        left = self._held.get(pair, 0) - 1
        if left > 0:
            self._held[pair] = left
        else:
            self._held.pop(pair, None)

    # --- the operator's hand (DESIGN 9 ad-hoc commands) -----------------------------------

    async def retry_now(self, message_id: int) -> bool:
        """Make a waiting message due now and try what is due; False if it waits no more."""
        queued = await self._waiting(message_id)
        if queued is None:
            return False
        await self.store.reschedule(queued.id, self.clock(), queued.last_error)
        await self.retry_due()
        return True

    async def drop(self, message_id: int, reason: str) -> bool:
        """Fail a waiting message now and tell its sender ``reason``; False if it waits no more.

        Nothing accepted is lost silently (DESIGN 8): the sender hears of it as of an expiry.
        """
        queued = await self._waiting(message_id)
        if queued is None:
            return False
        await self.store.mark_failed(queued.id, reason, self.clock())
        self._finished(queued)
        self.metrics.message(Way(queued.direction), Outcome.FAILED)
        self.counters["failed"] += 1
        log.info("message_dropped", sender=queued.sender, recipient=queued.recipient, reason=reason)
        text = f"not delivered: {reason}"
        if queued.direction is MessageDirection.XMPP_TO_SIP:
            self._refuse_queued(queued, unavailable(text))
        else:
            await self._notice(
                queued.sender, f"Your message to {bare_jid(queued.recipient)} was {text}."
            )
        return True

    async def _waiting(self, message_id: int) -> QueuedMessage | None:
        """The queued (not inflight) message ``message_id``, if it still waits."""
        for queued in await self.store.waiting_messages():
            if queued.id == message_id:
                return queued if queued.state is MessageState.QUEUED else None
        return None


def pair_of(message: NewMessage | QueuedMessage) -> Pair:
    """The conversation a stored message belongs to: (sender, bare recipient)."""
    if message.direction is MessageDirection.XMPP_TO_SIP:
        return (bare_jid(message.sender), message.recipient)
    return (message.sender, bare_jid(message.recipient))


def backoff(attempt: int, delay_time: float) -> float:
    """Seconds before the next try: 5, 10, 20 ... capped at a third of the delay time."""
    return float(min(5 * 2**attempt, max(delay_time / 3, 5)))


def unavailable(text: str) -> Refusal:
    """The XMPP sender's answer when a SIP user stayed out of reach (DESIGN 4.2)."""
    return Refusal(480, "Temporarily Unavailable", "recipient-unavailable", text, xmpp_type="wait")


def queued_stanza(queued: QueuedMessage) -> ChatMessage:
    """The XMPP message a stored XMPP -> SIP message came as, to answer it with an error."""
    extra = queued.extra
    return ChatMessage(
        sender=queued.sender,
        recipient=str(extra.get("to_jid")),
        body=None,
        id=extra.get("id"),
    )


def _readable(address: str) -> str:
    """``alice@sip.test`` for ``sip:alice@sip.test``; a JID as it is."""
    return address.removeprefix("sip:")


def _stamp(when: float) -> str:
    """XEP-0082 date-time, as XEP-0203 delay stamps want it."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
