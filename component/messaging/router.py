"""Chat messages across the gateway (DESIGN 4): routing, error mapping, the retry queue.

The router sees only our own values (``SipText``, ``ChatMessage``...) and talks to the world
through ports: XMPP, SIP, the store and the registrar commands. What it refuses it raises or
hands on as a :class:`~component.errors.Refusal`; the adapters turn that into a SIP response or
an error stanza. The SIP -> XMPP hot path is synchronous: :meth:`MessageRouter.answer_now`
answers 202 in the same call once the message is written to a live XMPP stream; only what must
wait (a registrar command, storing while the link is down) goes to ``answer_later``.
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass

from component.addresses import (
    AddressBook,
    AddressError,
    HomeUser,
    Registrar,
    XmppTarget,
    bare_jid,
    sip_user_and_host,
)
from component.errors import RETRYABLE, Refusal, busy, not_found, refusal_for_sip_status
from component.logs import get_logger
from component.ports import Clock, RegistrarCommands, RoomTexts, SipPort, XmppPort
from component.runtime.tasks import TaskOwner
from component.store import (
    MessageDirection,
    NewMessage,
    QueuedMessage,
    StorePort,
    StoreUnavailable,
)
from component.values import ChatMessage, SipAnswer, SipText, StanzaError

log = get_logger("component.messaging")

RETRY_AFTER = 30  # seconds, when a message can be neither written nor stored, or we are busy
_MAX_TRACKED = 20000  # stanza ids remembered to map XMPP errors back to SIP senders
ACCEPTED = SipAnswer(202, "Accepted")


@dataclass(frozen=True, slots=True)
class _Sent:
    """A stanza we sent for a SIP user: where to report an XMPP error about it."""

    sip_sender: str
    recipient: str


class MessageRouter:
    """Routes chat messages both ways and keeps the promise that nothing accepted is lost.

    Implements the ``UserOnline`` port: a SIP user coming online gets what waits for them.
    """

    def __init__(
        self,
        book: AddressBook,
        xmpp: XmppPort,
        sip: SipPort,
        store: StorePort,
        commands: RegistrarCommands,
        *,
        clock: Clock,
        delay_time: float,
        instance: str = "",
        max_inflight: int = 20,
    ) -> None:
        self.book = book
        self.xmpp = xmpp
        self.sip = sip
        self.store = store
        self.clock = clock
        self.delay_time = delay_time
        self.instance = instance or f"gw-{os.getpid()}"
        self.max_inflight = max_inflight
        self.inflight = 0
        self.commands = commands
        self._tasks = TaskOwner("message_task_failed")
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._sent: OrderedDict[str, _Sent] = OrderedDict()
        self.counters = {"sip_to_xmpp": 0, "xmpp_to_sip": 0, "queued": 0, "failed": 0}
        # DESIGN 6: set once the chat rooms are built; MESSAGEs to room and occupant
        # addresses go there, and only what the rooms pass back is one-to-one chat.
        self.rooms: RoomTexts | None = None
        self.counters.update(requeued=0, unconfirmed_dropped=0)  # DESIGN 8: link lost

    # --- SIP -> XMPP (DESIGN 4.1) ---------------------------------------------------------------

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        """The hot path: 202 once ``msg`` is written to a live XMPP stream, or a raised Refusal;
        None when the answer must wait (:meth:`answer_later`)."""
        if self.rooms is not None:
            taken = self.rooms.take_text(msg)
            if taken is None:
                return None  # service discovery decides: answer_later
            if taken:
                return ACCEPTED
        route = self._route(msg)
        if route is None:
            return None
        stanza = self._stanza(msg, *route)
        return ACCEPTED if self._relay(msg, stanza) else None

    async def answer_later(self, msg: SipText) -> SipAnswer:
        """The answer to ``msg`` that may wait: a registrar command, or storing the message
        while the XMPP link is down (202 once stored, DESIGN 4.1); raises Refusal."""
        if await self._taken_by_rooms(msg):
            return ACCEPTED
        route = self._route(msg)
        if route is None:
            return await self._command(msg)
        stanza = self._stanza(msg, *route)
        if self._relay(msg, stanza):
            return ACCEPTED
        return await self._store_for_xmpp(msg, stanza)

    async def _taken_by_rooms(self, msg: SipText) -> bool:
        """A MESSAGE that waited for service discovery: True when it turned out a room's."""
        rooms = self.rooms
        return rooms is not None and rooms.waiting(msg) and await rooms.settle_text(msg)

    def _route(self, msg: SipText) -> tuple[XmppTarget, str] | None:
        """(recipient, sender JID) of a MESSAGE to relay; None for a registrar command."""
        target = self.book.classify_request_uri(msg.to_uri)
        if isinstance(target, Registrar):
            return None
        if isinstance(target, HomeUser):
            # Home users are the proxy's to reach; relaying would make us an open relay.
            raise not_found("not an address of the XMPP side")
        return target, self.book.jid_for_sip_uri(msg.from_uri)

    def _stanza(self, msg: SipText, target: XmppTarget, sender: str) -> ChatMessage:
        return ChatMessage(
            sender=f"{sender}/sip",
            recipient=target.full_jid,
            body=msg.body,
            id=self._new_id(),
            html=msg.html,
        )

    def _relay(self, msg: SipText, stanza: ChatMessage) -> bool:
        if not self.xmpp.send_message(stanza):
            return False
        self._track(stanza, msg.from_uri)
        self.counters["sip_to_xmpp"] += 1
        log.info("message_relayed", call_id=msg.call_id, sip_uri=msg.from_uri, jid=stanza.recipient)
        return True

    async def _store_for_xmpp(self, msg: SipText, stanza: ChatMessage) -> SipAnswer:
        """The link is down: 202 only once the message is stored durably (DESIGN 4.1)."""
        now = self.clock()
        message = NewMessage(
            MessageDirection.SIP_TO_XMPP,
            msg.from_uri,
            stanza.recipient,
            msg.body,
            "text/plain",
            created_at=now,
            deliver_by=now + self.delay_time,
            next_attempt_at=now,
            extra={"from_jid": stanza.sender, "html": msg.html},
        )
        try:
            await self.store.enqueue_message(message)
        except StoreUnavailable as exc:
            log.warning("message_refused", call_id=msg.call_id, reason=str(exc))
            raise busy("", RETRY_AFTER) from None
        self.counters["queued"] += 1
        log.info(
            "message_queued",
            call_id=msg.call_id,
            sip_uri=msg.from_uri,
            jid=stanza.recipient,
            reason="xmpp link down",
        )
        return ACCEPTED

    async def _command(self, msg: SipText) -> SipAnswer:
        reply = await self.commands.command(msg)
        if reply is None:
            reply = "Unknown command. Send 'help' for the list."
        await self.notice(msg.from_uri, reply)
        return SipAnswer(200, "OK")

    def _track(self, stanza: ChatMessage, sip_sender: str) -> None:
        if stanza.id is None:
            return
        sent = self._sent
        sent[stanza.id] = _Sent(sip_sender, stanza.recipient)
        if len(sent) > _MAX_TRACKED:
            sent.popitem(last=False)

    def on_xmpp_error(self, err: StanzaError) -> Awaitable[None] | None:
        """An error came back for a stanza we sent: tell the SIP sender (DESIGN 4.1, 4.4)."""
        sent = self._sent.pop(err.id, None) if err.id else None
        if sent is None:
            log.info("xmpp_error_unmatched", jid=err.sender, condition=err.condition)
            return None
        self.counters["failed"] += 1
        detail = f" ({err.text})" if err.text else ""
        text = (
            f"Your message to {bare_jid(sent.recipient)} was not delivered: "
            f"{err.condition.replace('-', ' ')}{detail}."
        )
        log.info(
            "message_bounced", sip_uri=sent.sip_sender, jid=sent.recipient, condition=err.condition
        )
        return self.notice(sent.sip_sender, text)

    # --- XMPP -> SIP (DESIGN 4.2) ---------------------------------------------------------------

    async def on_xmpp_message(self, msg: ChatMessage) -> None:
        """Relay an XMPP message to its SIP user; store and retry what can't go now."""
        if msg.body is None or msg.type in ("error", "groupchat"):
            return
        try:
            to_uri = self.book.sip_uri_for_component_jid(bare_jid(msg.recipient))
            from_uri = self.book.sip_uri_for_jid(msg.sender)
        except AddressError as exc:
            self.xmpp.refuse(msg, exc)
            return
        if self.inflight >= self.max_inflight:
            # DESIGN 8: bounded work; the sender is told to slow down.
            self.xmpp.refuse(msg, busy("gateway busy, try again", RETRY_AFTER))
            return
        self.inflight += 1
        try:
            status = await self.sip.send_text(from_uri=from_uri, to_uri=to_uri, body=msg.body)
        finally:
            self.inflight -= 1
        if status < 300:
            self.counters["xmpp_to_sip"] += 1
            log.info("message_relayed", jid=msg.sender, sip_uri=to_uri, status=status)
            return
        if await self._is_offline(status, to_uri):
            await self._store_for_sip(msg, from_uri, to_uri, status)
            return
        refusal = refusal_for_sip_status(status)
        log.info(
            "message_rejected",
            jid=msg.sender,
            sip_uri=to_uri,
            status=status,
            condition=refusal.xmpp_condition,
        )
        self.xmpp.refuse(msg, refusal)

    async def _is_offline(self, status: int, aor: str) -> bool:
        """480/408/503 and a 404 for a home user seen before mean "not now" (DESIGN 4.2)."""
        if status in RETRYABLE:
            return True
        if status == 404 and self._is_home(aor):
            try:
                return await self.store.user_seen_before(aor)
            except StoreUnavailable:
                return False
        return False

    def _is_home(self, aor: str) -> bool:
        try:
            return sip_user_and_host(aor)[1] == self.book.sip_domain
        except AddressError:
            return False

    async def _store_for_sip(
        self, msg: ChatMessage, from_uri: str, to_uri: str, status: int
    ) -> None:
        now = self.clock()
        message = NewMessage(
            MessageDirection.XMPP_TO_SIP,
            msg.sender,
            to_uri,
            msg.body or "",
            "text/plain",
            created_at=now,
            deliver_by=now + self.delay_time,
            next_attempt_at=now + _backoff(0, self.delay_time),
            extra={"from_uri": from_uri, "to_jid": msg.recipient, "id": msg.id},
        )
        try:
            await self.store.enqueue_message(message)
        except StoreUnavailable:
            self.xmpp.refuse(msg, _unavailable(f"SIP {status}"))
            return
        self.counters["queued"] += 1
        log.info("message_queued", jid=msg.sender, sip_uri=to_uri, status=status)

    # --- notices (DESIGN 4.4) -------------------------------------------------------------------

    async def notice(self, aor: str, text: str) -> None:
        """A short MESSAGE from ``sip.registrar`` telling a SIP user what happened."""
        status = await self.sip.send_text(
            from_uri=self.book.registrar, to_uri=aor, body=text, from_display="XMPP gateway"
        )
        if status >= 300:
            log.info("notice_undelivered", sip_uri=aor, status=status)

    # --- the queue (DESIGN 8) -------------------------------------------------------------------

    async def retry_due(self, limit: int = 100) -> int:
        """Try every due stored message once; expire what is past ``delay_time``."""
        now = self.clock()
        for expired in await self.store.expire_messages(now):
            await self._give_up(expired)
        claimed = await self.store.claim_due_messages(now, limit, self.instance)
        for queued in claimed:
            await self._attempt(queued)
        return len(claimed)

    def user_online(self, aor: str) -> None:
        """The ``UserOnline`` port: retry what waits for ``aor`` now, as owned work."""
        self._tasks.own(self.flush_recipient(aor))

    async def drain(self, timeout: float) -> None:
        """Wait for the work :meth:`user_online` started (SIGTERM path)."""
        await self._tasks.wait(timeout)

    async def flush_recipient(self, recipient: str) -> None:
        """A SIP user came online: retry what waits for them at once (DESIGN 8)."""
        now = self.clock()
        for queued in await self.store.claim_messages_for_recipient(recipient, now, self.instance):
            await self._attempt(queued)

    async def _attempt(self, queued: QueuedMessage) -> None:
        now = self.clock()
        extra = queued.extra
        if queued.direction is MessageDirection.SIP_TO_XMPP:
            stanza = ChatMessage(
                sender=str(extra.get("from_jid") or self.book.jid_for_sip_uri(queued.sender)),
                recipient=queued.recipient,
                body=queued.body,
                id=extra.get("id") or self._new_id(),  # a re-send keeps its id (DESIGN 8)
                html=extra.get("html"),
                delay_stamp=extra.get("stamp") or _stamp(queued.created_at),
                delay_from=self.book.component,
            )
            if self.xmpp.send_message(stanza):
                self._track(stanza, queued.sender)
                await self.store.mark_delivered(queued.id, now)
            else:
                await self.store.reschedule(queued.id, now + 5.0, "xmpp link down")
            return
        status = await self.sip.send_text(
            from_uri=str(extra.get("from_uri")), to_uri=queued.recipient, body=queued.body
        )
        if status < 300:
            await self.store.mark_delivered(queued.id, now)
        elif await self._is_offline(status, queued.recipient):
            next_at = now + _backoff(queued.attempts + 1, self.delay_time)
            await self.store.reschedule(queued.id, min(next_at, queued.deliver_by), f"SIP {status}")
        else:
            await self.store.mark_failed(queued.id, f"SIP {status}", now)
            self._refuse_queued(queued, refusal_for_sip_status(status))

    async def requeue_unconfirmed(self, messages: list[ChatMessage]) -> None:
        """The XMPP link was lost before the server confirmed ``messages`` (DESIGN 8): queue
        them to be re-sent after reconnect with the same id and stamp; the SIP sender, already
        answered 202, is told if one cannot be queued."""
        now = self.clock()
        for msg in messages:
            sip_sender = self._sip_sender_of(msg)
            if msg.body is None or sip_sender is None:  # typing and the like are never queued
                self.counters["unconfirmed_dropped"] += 1
                log.info("message_dropped", jid=msg.recipient, reason="unconfirmed, not queued")
                continue
            extra = {
                "from_jid": msg.sender,
                "html": msg.html,
                "id": msg.id,
                "stamp": msg.delay_stamp,
            }
            message = NewMessage(
                MessageDirection.SIP_TO_XMPP,
                sip_sender,
                msg.recipient,
                msg.body,
                "text/plain",
                created_at=now,
                deliver_by=now + self.delay_time,
                next_attempt_at=now,
                extra=extra,
            )
            try:
                await self.store.enqueue_message(message)
            except StoreUnavailable as exc:
                self.counters["failed"] += 1
                log.warning("message_lost", sip_uri=sip_sender, jid=msg.recipient, reason=str(exc))
                await self.notice(
                    sip_sender,
                    f"Your message to {bare_jid(msg.recipient)} may not have been delivered: "
                    "the XMPP service went away.",
                )
                continue
            self.counters["requeued"] += 1
            log.info("message_requeued", sip_uri=sip_sender, jid=msg.recipient, id=msg.id)

    def _sip_sender_of(self, msg: ChatMessage) -> str | None:
        """Who to tell about a stanza we sent: the SIP sender we tracked, else its author."""
        sent = self._sent.get(msg.id) if msg.id else None
        if sent is not None:
            return sent.sip_sender
        try:
            return self.book.sip_uri_for_component_jid(bare_jid(msg.sender))
        except AddressError:
            return None

    async def _give_up(self, queued: QueuedMessage) -> None:
        log.info(
            "message_expired",
            sender=queued.sender,
            recipient=queued.recipient,
            reason=queued.last_error,
        )
        if queued.direction is MessageDirection.XMPP_TO_SIP:
            refusal = _unavailable("not delivered within the delay time")
            self._refuse_queued(queued, refusal)
        else:
            await self.notice(
                queued.sender,
                f"Your message to {bare_jid(queued.recipient)} was not delivered: "
                "the XMPP service was unreachable.",
            )

    def _refuse_queued(self, queued: QueuedMessage, refusal: Refusal) -> None:
        """Tell the XMPP sender of a stored message it failed; a room's message (DESIGN 6) has
        no one to tell (an error to the room would remove the SIP user from it)."""
        if queued.extra.get("room"):
            log.info("room_message_expired", sip_uri=queued.recipient, room=queued.sender)
            return
        self.xmpp.refuse(_queued_stanza(queued), refusal)

    def _new_id(self) -> str:
        return f"sx{self._prefix}{next(self._ids)}"


def _backoff(attempt: int, delay_time: float) -> float:
    """Seconds before the next try: 5, 10, 20 ... capped at a third of the delay time."""
    return float(min(5 * 2**attempt, max(delay_time / 3, 5)))


def _unavailable(text: str) -> Refusal:
    """The XMPP sender's answer when a SIP user stayed out of reach (DESIGN 4.2)."""
    return Refusal(480, "Temporarily Unavailable", "recipient-unavailable", text, xmpp_type="wait")


def _queued_stanza(queued: QueuedMessage) -> ChatMessage:
    """The XMPP message a stored XMPP -> SIP message came as, to answer it with an error."""
    extra = queued.extra
    return ChatMessage(
        sender=queued.sender, recipient=str(extra.get("to_jid")), body=None, id=extra.get("id")
    )


def _stamp(when: float) -> str:
    """XEP-0082 date-time, as XEP-0203 delay stamps want it."""
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
