"""Chat messages across the gateway (DESIGN 4): routing, error mapping, the retry queue.

The router sees only our own values (``SipText``, ``ChatMessage``...) and talks to the world
through ports: XMPP, SIP, the store and the registrar commands. What it refuses it raises or
hands on as a :class:`~component.errors.Refusal`; the adapters turn that into a SIP response or
an error stanza. The SIP -> XMPP hot path is synchronous: :meth:`MessageRouter.answer_now`
answers 202 in the same call once the message is written to a live XMPP stream; only what must
wait (a registrar command, storing while the link is down) goes to ``answer_later``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, replace

from component.addresses import (
    AddressBook,
    AddressError,
    HomeUser,
    Registrar,
    XmppTarget,
    bare_jid,
)
from component.errors import Refusal, busy, not_found, refusal_for_sip_status
from component.logs import debug_enabled, get_logger
from component.messaging.conversations import Conversations, Pair, QueueFull
from component.messaging.notifications import Notifications
from component.messaging.retry import RETRY_AFTER, DurableQueue
from component.ports import (
    NO_METRICS,
    Clock,
    Metrics,
    Outcome,
    RegistrarCommands,
    RoomTexts,
    SipPort,
    Way,
    XmppPort,
)
from component.runtime.tasks import TaskOwner
from component.store import MessageDirection, NewMessage, StorePort, StoreUnavailable
from component.values import ChatMessage, ImdnAsk, SipAnswer, SipText, StanzaError
from sipside.fastpath import fast_frozen_init

log = get_logger("component.messaging")

_MAX_TRACKED = 20000  # stanza ids remembered to map XMPP errors back to SIP senders
ACCEPTED = SipAnswer(202, "Accepted")


@dataclass(frozen=True, slots=True, init=False)
class _Sent:
    """A stanza we sent for a SIP user: where to report an XMPP error about it."""

    sip_sender: str
    recipient: str

    # Written out (not generated) so that compiled it is native: see fast_frozen_init.
    def __init__(self, sip_sender: str, recipient: str) -> None:
        self.sip_sender = sip_sender  # type: ignore[misc]
        self.recipient = recipient  # type: ignore[misc]


fast_frozen_init(_Sent)  # built per message: the plain frozen __init__ is slow


@dataclass(frozen=True, slots=True, init=False)
class _Outgoing:
    """An XMPP message waiting for its turn, with the SIP addresses it goes between."""

    msg: ChatMessage  # its body the SIP text (corrections and links said in words)
    from_uri: str
    to_uri: str
    ask: ImdnAsk | None = None  # the IMDN request it carries (DESIGN 4.3)

    # Written out (not generated) so that compiled it is native: see fast_frozen_init.
    def __init__(
        self,
        msg: ChatMessage,
        from_uri: str,
        to_uri: str,
        ask: ImdnAsk | None = None,
    ) -> None:
        self.msg = msg  # type: ignore[misc]
        self.from_uri = from_uri  # type: ignore[misc]
        self.to_uri = to_uri  # type: ignore[misc]
        self.ask = ask  # type: ignore[misc]


fast_frozen_init(_Outgoing)  # built per message: the plain frozen __init__ is slow


class MessageRouter:
    """Routes chat messages both ways and keeps the promise that nothing accepted is lost.

    Implements the ``UserOnline`` port: a SIP user coming online gets what waits for them.
    ``rooms`` takes MESSAGEs to room addresses first (DESIGN 6). ``max_inflight`` bounds the
    MESSAGEs in flight, ``queue`` the XMPP messages waiting for their turn, ``per_recipient``
    the stored messages for one recipient (DESIGN 8).
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
        rooms: RoomTexts | None = None,
        instance: str = "",
        max_inflight: int = 20,
        queue: int = 10_000,
        queue_per_sender: int | None = None,
        per_recipient: int = 100,
        notifications: Notifications | None = None,
        metrics: Metrics = NO_METRICS,
    ) -> None:
        self.book = book
        self.xmpp = xmpp
        self.sip = sip
        self.store = store
        self.clock = clock
        self.delay_time = delay_time
        self.instance = instance or f"gw-{os.getpid()}"
        self.commands = commands
        self.metrics = metrics  # DESIGN 9: messages each way by outcome
        self._tasks = TaskOwner("message_task_failed")
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._sent: OrderedDict[str, _Sent] = OrderedDict()
        self.counters = {
            "sip_to_xmpp": 0,
            "xmpp_to_sip": 0,
            "queued": 0,
            "failed": 0,
            "refused": 0,
        }
        self.conversations: Conversations[_Outgoing] = Conversations(
            max_inflight=max_inflight, capacity=queue, per_sender=queue_per_sender
        )
        self._idle = asyncio.Event()
        self._idle.set()
        # The MESSAGE in flight per conversation (to store it if it has no answer by the end
        # of a drain), whether XMPP messages are still taken in (not after SIGTERM), and the
        # conversations whose MESSAGE in flight was stored unanswered when the drain ended.
        self._inflight: dict[Pair, _Outgoing] = {}
        self._accepting = True
        self._abandoned: set[Pair] = set()
        self.queue = DurableQueue(
            book,
            xmpp,
            sip,
            store,
            clock=clock,
            delay_time=delay_time,
            instance=self.instance,
            per_recipient=per_recipient,
            counters=self.counters,
            notice=self.notice,
            relayed=self._track,
            new_id=self._new_id,
            metrics=metrics,
        )
        # DESIGN 6: MESSAGEs to room and occupant addresses go to the chat rooms; only what
        # they pass back is one-to-one chat. None: a gateway without rooms (tests).
        self.rooms = rooms
        # DESIGN 4.3: typing, receipts and read markers; ids kept at least delay_time.
        self.notes = notifications or Notifications(xmpp, sip, clock=clock, keep=delay_time)
        self.counters.update(requeued=0, unconfirmed_dropped=0)  # DESIGN 8: link lost

    # --- SIP -> XMPP (DESIGN 4.1) ---------------------------------------------------------------

    def answer_now(self, msg: SipText) -> SipAnswer | None:
        """The hot path: 202 once ``msg`` is written to a live XMPP stream, or a raised Refusal;
        None when the answer must wait (:meth:`answer_later`)."""
        if msg.composing is not None or msg.notification is not None:
            return self._not_text(msg)
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
        pair = _xmpp_pair(msg, stanza)
        if self.queue.holds(pair) or self.queue.unchecked(pair):
            return None
        return ACCEPTED if self._relay(msg, stanza) else None

    async def answer_later(self, msg: SipText) -> SipAnswer:
        """The answer to ``msg`` that may wait: a registrar command, or storing the message
        while the XMPP link is down or earlier ones of its conversation are stored (202 once
        stored, DESIGN 4.1); raises Refusal."""
        if await self._taken_by_rooms(msg):
            return ACCEPTED
        route = self._route(msg)
        if route is None:
            return await self._command(msg)
        stanza = self._stanza(msg, *route)
        pair = _xmpp_pair(msg, stanza)
        if self.queue.holds(pair) or await self.queue.stored_earlier(pair):
            return await self._store_for_xmpp(msg, stanza)  # behind what waits, in order
        if self._relay(msg, stanza):
            return ACCEPTED
        return await self._store_for_xmpp(msg, stanza)

    def _not_text(self, msg: SipText) -> SipAnswer:
        """Typing or an IMDN notification (DESIGN 4.3): relayed now or dropped, never stored."""
        route = self._route(msg)
        if route is None:
            return SipAnswer(200, "OK")  # typing to the registrar: nobody to tell
        target, sender = route
        return self.notes.on_sip(msg, target.full_jid, f"{sender}/sip")

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
        stanza = ChatMessage(
            sender=f"{sender}/sip",
            recipient=target.full_jid,
            body=msg.body,
            id=self._new_id(),
            html=msg.html,
        )
        return self.notes.dress(msg, stanza)

    def _relay(self, msg: SipText, stanza: ChatMessage) -> bool:
        if not self.xmpp.send_message(stanza):
            return False
        self._track(stanza, msg.from_uri)
        self.counters["sip_to_xmpp"] += 1
        self.metrics.message(Way.TO_XMPP, Outcome.DELIVERED)
        # One line per delivered message cost 11-14% of the gateway's CPU at full load; the
        # counters say how many went, refusals and failures are still logged at info.
        if debug_enabled():
            log.debug(
                "message_relayed", call_id=msg.call_id, sip_uri=msg.from_uri, jid=stanza.recipient
            )
        return True

    async def _store_for_xmpp(self, msg: SipText, stanza: ChatMessage) -> SipAnswer:
        """The link is down, or the conversation waits: 202 only once stored (DESIGN 4.1)."""
        now = self.clock()
        reason = "xmpp link down" if not self.xmpp.connected else "behind a stored message"
        message = NewMessage(
            MessageDirection.SIP_TO_XMPP,
            msg.from_uri,
            stanza.recipient,
            msg.body,
            "text/plain",
            created_at=now,
            deliver_by=now + self.delay_time,
            next_attempt_at=now,
            extra={
                "from_jid": stanza.sender,
                "html": msg.html,
                "id": stanza.id,
                "receipt": stanza.receipt_request,
                "markable": stanza.markable,
            },
        )
        refusal = await self.queue.put(message)
        if refusal is not None:
            self.counters["refused"] += 1
            self.metrics.message(Way.TO_XMPP, Outcome.REFUSED)
            log.warning(
                "message_refused",
                call_id=msg.call_id,
                sip_uri=msg.from_uri,
                jid=stanza.recipient,
                reason=refusal.text,
            )
            raise refusal
        log.info(
            "message_queued",
            call_id=msg.call_id,
            sip_uri=msg.from_uri,
            jid=stanza.recipient,
            reason=reason,
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

    def on_xmpp_error(self, err: StanzaError, *, notify: bool = True) -> Awaitable[None] | None:
        """An error came back for a stanza we sent: tell the SIP sender (DESIGN 4.1, 4.4), and
        send the IMDN ``failed`` it asked for (4.3) unless ``notify`` is off (an error another
        instance received, which did that). None when there is nothing to tell the sender."""
        sent = self._sent.pop(err.id, None) if err.id else None
        failed = self.notes.on_xmpp_error(err) if notify else None
        if failed is not None:
            self._tasks.own(self.notes.tell_failed(failed))
        if sent is None:
            log.info("xmpp_error_unmatched", jid=err.sender, condition=err.condition)
            return None
        self.counters["failed"] += 1
        self.metrics.message(Way.TO_XMPP, Outcome.FAILED)
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
        """Relay an XMPP message to its SIP user, in order within its conversation.

        Up to ``max_inflight`` MESSAGEs are in flight, one per conversation; the rest wait in
        a bounded queue, and only a full queue refuses (DESIGN 8). What can't go now is stored
        and retried. The first await comes after the message took its place in line, so
        messages handled in the order they arrived keep that order.
        """
        work = self.take_xmpp_message(msg)
        if work is not None:
            await work

    def take_xmpp_message(self, msg: ChatMessage) -> Awaitable[None] | None:
        """:meth:`on_xmpp_message` without a task for what needs none: ``msg`` takes its place
        in line (or is refused) now, and what must be awaited is returned (the sending that
        starts with it, a chat state or receipt), None when nothing is.

        At full load most messages wait behind their conversation's MESSAGE in flight: those
        cost no task and no event-loop turn of their own. Plain text that may go now goes on
        the SIP side's callback path (``start_text``): nothing to await either.
        """
        if msg.type == "error":
            return None
        if msg.type == "groupchat":
            self.refuse_groupchat_to_person(msg)
            return None
        text = self.notes.text_of(msg)
        if not self._accepting:
            if text is None:
                return None  # a chat state or a receipt is never kept for later (DESIGN 4.3)
            # DESIGN 8 SIGTERM: the sender is told to try again, as SIP senders get 503; read
            # after the stream's end went out, it can no longer be told, and the server counts
            # it delivered: it waits in the store for the next start.
            if self.xmpp.refuse(msg, busy("gateway stopping, try again", RETRY_AFTER)):
                self._refused(msg, "resource-constraint", "stopping")
                return None
            return self._keep_for_next_run(msg, text)
        try:
            from_uri, to_uri = self._uris(msg)
        except AddressError as exc:
            self._refuse(msg, exc, "bad address")
            return None
        if text is None:
            # DESIGN 4.3: a chat state, a receipt or a read marker; never queued.
            return self.notes.on_xmpp(msg, from_uri, to_uri)
        pair = (bare_jid(msg.sender), to_uri)
        outgoing = self._outgoing(msg, text, from_uri, to_uri)
        try:
            starts = self.conversations.offer(pair, outgoing)
        except QueueFull as full:
            refusal = busy(f"gateway busy: {full}, try again", RETRY_AFTER)
            self._refuse(msg, refusal, "queue full")
            return None
        self._idle.clear()
        return self._start(starts)

    def refuse_groupchat_to_person(self, msg: ChatMessage) -> None:
        """A ``groupchat`` message addressed to a SIP user's JID: an error, not silence.

        Groupchat that a chat room sends to a SIP user who joined it is room traffic, and goes
        to the rooms core before this is called; what reaches here was addressed to a person.
        """
        refusal = Refusal(
            406,
            "Not Acceptable",
            "not-acceptable",
            "a groupchat message goes to a chat room; send it to a person as type chat",
            xmpp_type="modify",
        )
        self._refuse(msg, refusal, "groupchat to a person")

    def _keep_for_next_run(self, msg: ChatMessage, text: str) -> Awaitable[None] | None:
        """Store ``msg``, read as the link closed, for the next start to send (in order: what
        the drain stored of its conversation went before it)."""
        try:
            from_uri, to_uri = self._uris(msg)
        except AddressError:
            log.info("message_dropped_at_close", jid=msg.sender, recipient=msg.recipient)
            return None
        outgoing = self._outgoing(msg, text, from_uri, to_uri)
        return self._store_for_sip(outgoing, "read as the link closed", capped=False)

    def _uris(self, msg: ChatMessage) -> tuple[str, str]:
        """The SIP From and To of an XMPP message to a SIP user; raises AddressError."""
        to_uri = self.book.sip_uri_for_component_jid(bare_jid(msg.recipient))
        return self.book.sip_uri_for_jid(msg.sender), to_uri

    def _outgoing(self, msg: ChatMessage, text: str, from_uri: str, to_uri: str) -> _Outgoing:
        """``msg`` as the MESSAGE it becomes, with the notifications it asks for."""
        ask = self.notes.ask_for(msg, from_uri, to_uri)
        # dataclasses.replace costs 7 us a message; most texts are the body as it came
        relayed = msg if text == msg.body else replace(msg, body=text)
        return _Outgoing(relayed, from_uri, to_uri, ask)

    def _refuse(self, msg: ChatMessage, refusal: Refusal, reason: str) -> None:
        """Answer ``msg`` with an error stanza; every refusal is logged and counted."""
        self.xmpp.refuse(msg, refusal)
        self._refused(msg, refusal.xmpp_condition, reason)

    def _refused(self, msg: ChatMessage, condition: str, reason: str) -> None:
        self.counters["refused"] += 1
        self.metrics.message(Way.TO_SIP, Outcome.REFUSED)
        log.info(
            "message_refused",
            jid=msg.sender,
            recipient=msg.recipient,
            condition=condition,
            reason=reason,
        )

    def _start(self, starts: list[tuple[Pair, _Outgoing]]) -> Awaitable[None] | None:
        """Send what may start: on the SIP side's path without a task when it takes the
        message, else in a task of its own; the first such task's work is returned to be
        awaited, the others are owned."""
        work: Awaitable[None] | None = None
        for pair, outgoing in starts:
            self._inflight[pair] = outgoing
            if self._send_now(pair, outgoing):
                continue
            turn = self._take_turn(pair, outgoing)
            if work is None:
                work = turn
            else:
                self._tasks.own(turn)
        return work

    def _send_now(self, pair: Pair, outgoing: _Outgoing) -> bool:
        """Plain text of a conversation with nothing stored goes without a task; its final
        status comes to :meth:`_answered`. False when it must take the general path."""
        if outgoing.ask is not None or self.queue.holds(pair) or self.queue.unchecked(pair):
            return False
        try:
            return self.sip.start_text(
                from_uri=outgoing.from_uri,
                to_uri=outgoing.to_uri,
                body=outgoing.msg.body or "",
                done=lambda status: self._answered(pair, outgoing, status),
            )
        except Exception:
            log.exception("message_send_failed", jid=outgoing.msg.sender, sip_uri=pair[1])
            return False  # the general path tries it again, and decides

    def _answered(self, pair: Pair, outgoing: _Outgoing, status: int) -> None:
        """The final status of a MESSAGE sent by :meth:`_send_now`."""
        try:
            rest = self._outcome(pair, outgoing, status)
        except Exception:
            log.exception("message_send_failed", jid=outgoing.msg.sender, sip_uri=pair[1])
            rest = None
        if rest is None:
            self._turn_done(pair)
        else:
            self._tasks.own(self._take_turn(pair, outgoing, rest))

    async def _take_turn(
        self, pair: Pair, outgoing: _Outgoing, rest: Awaitable[None] | None = None
    ) -> None:
        """Send ``outgoing`` (or finish what its answer left, ``rest``); then the next of its
        conversation may go."""
        try:
            await (self._send_to_sip(pair, outgoing) if rest is None else rest)
        except Exception:
            log.exception("message_send_failed", jid=outgoing.msg.sender, sip_uri=pair[1])
        finally:
            self._turn_done(pair)

    def _turn_done(self, pair: Pair) -> None:
        """``pair``'s MESSAGE in flight is done with: each final answer lets the next of the
        conversation go."""
        self._inflight.pop(pair, None)
        starts = self.conversations.done(pair)
        # Idle: nothing in flight, and nothing waiting that may still start.
        conversations = self.conversations
        if not conversations.inflight and not (conversations.waiting and self._accepting):
            self._idle.set()
        work = self._start(starts) if starts else None
        if work is not None:
            self._tasks.own(work)

    async def _send_to_sip(self, pair: Pair, outgoing: _Outgoing) -> None:
        msg, from_uri, to_uri = outgoing.msg, outgoing.from_uri, outgoing.to_uri
        if self.queue.holds(pair) or await self.queue.stored_earlier(pair):
            # An earlier message of this conversation waits in the store: this one waits too.
            await self._store_for_sip(outgoing, "behind a stored message")
            return
        status = await self.sip.send_text(
            from_uri=from_uri, to_uri=to_uri, body=msg.body or "", imdn=outgoing.ask
        )
        rest = self._outcome(pair, outgoing, status)
        if rest is not None:
            await rest

    def _outcome(self, pair: Pair, outgoing: _Outgoing, status: int) -> Awaitable[None] | None:
        """Act on the final status of ``outgoing``'s MESSAGE; what must be awaited (storing
        it, asking the store), None when nothing is."""
        msg, to_uri = outgoing.msg, outgoing.to_uri
        if pair in self._abandoned:
            # Stored unanswered when the drain ended: the stored copy is its fate now.
            self._abandoned.discard(pair)
            log.info("message_answered_after_drain", jid=msg.sender, sip_uri=to_uri, status=status)
            return None
        if status < 300:
            self.counters["xmpp_to_sip"] += 1
            self.metrics.message(Way.TO_SIP, Outcome.DELIVERED)
            if debug_enabled():
                log.debug("message_relayed", jid=msg.sender, sip_uri=to_uri, status=status)
            return None if self.queue.knows_user(to_uri) else self.queue.saw_user(to_uri)
        return self._not_delivered(outgoing, status)

    async def _not_delivered(self, outgoing: _Outgoing, status: int) -> None:
        """A final status of 300 or more: stored when the user is offline, else refused."""
        msg, to_uri = outgoing.msg, outgoing.to_uri
        if await self.queue.is_offline(status, to_uri):
            await self._store_for_sip(outgoing, f"SIP {status}")
            return
        self.counters["failed"] += 1
        self.metrics.message(Way.TO_SIP, Outcome.FAILED)
        refusal = refusal_for_sip_status(status)
        log.info(
            "message_rejected",
            jid=msg.sender,
            sip_uri=to_uri,
            status=status,
            condition=refusal.xmpp_condition,
        )
        self.xmpp.refuse(msg, refusal)

    async def _store_for_sip(
        self, outgoing: _Outgoing, reason: str, *, capped: bool = True
    ) -> None:
        msg, from_uri, to_uri = outgoing.msg, outgoing.from_uri, outgoing.to_uri
        stored = self.queue.for_sip(msg, from_uri, to_uri, reason, outgoing.ask)
        refusal = await self.queue.put(stored, capped=capped)
        if refusal is not None:
            self._refuse(msg, refusal, f"not stored ({reason})")
            return
        log.info("message_queued", jid=msg.sender, sip_uri=to_uri, reason=reason)

    # --- notices (DESIGN 4.4) -------------------------------------------------------------------

    async def notice(self, aor: str, text: str) -> None:
        """A short MESSAGE from ``sip.registrar`` telling a SIP user what happened."""
        status = await self.sip.send_text(
            from_uri=self.book.registrar, to_uri=aor, body=text, from_display="XMPP gateway"
        )
        if status >= 300:
            log.info("notice_undelivered", sip_uri=aor, status=status)

    # --- the queue (DESIGN 8) -------------------------------------------------------------------

    async def resume(self) -> None:
        """Before the first request: learn whether an earlier run left messages waiting, so
        that new ones of those conversations, both ways, go behind them (DESIGN 8)."""
        await self.queue.resume()

    async def retry_due(self, limit: int = 100) -> int:
        """Try every due stored message once; expire what is past ``delay_time``."""
        return await self.queue.retry_due(limit)

    def user_online(self, aor: str) -> None:
        """The ``UserOnline`` port: ``aor`` is seen (a later 404 means offline, DESIGN 4.2),
        and what waits for them is retried now, as owned work."""
        self._tasks.own(self._came_online(aor))

    async def _came_online(self, aor: str) -> None:
        # Whoever said so (a REGISTER, a PUBLISH, the presence server's NOTIFY, a command),
        # the user exists: recorded as seen, not as registered (see DurableQueue.saw_user).
        await self.queue.saw_user(aor)
        await self.flush_recipient(aor)

    async def flush_recipient(self, recipient: str) -> None:
        """A SIP user came online: retry what waits for them at once (DESIGN 8)."""
        await self.queue.flush_recipient(recipient)

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
                "receipt": msg.receipt_request,
                "markable": msg.markable,
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
                self.metrics.message(Way.TO_XMPP, Outcome.FAILED)
                log.warning("message_lost", sip_uri=sip_sender, jid=msg.recipient, reason=str(exc))
                await self.notice(
                    sip_sender,
                    f"Your message to {bare_jid(msg.recipient)} may not have been delivered: "
                    "the XMPP service went away.",
                )
                continue
            self.counters["requeued"] += 1
            self.metrics.message(Way.TO_XMPP, Outcome.QUEUED)
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

    async def settle(self, timeout: float) -> None:
        """Wait (up to ``timeout``) until nothing is in flight or waits and no owned work is
        left; unlike :meth:`drain`, the router keeps taking messages."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        await self._tasks.wait(max(deadline - loop.time(), 0.0))

    def stop_accepting(self) -> None:
        """SIGTERM (DESIGN 8): XMPP messages from now on get ``resource-constraint``."""
        self._accepting = False

    async def drain(self, timeout: float) -> None:
        """SIGTERM (DESIGN 8): nothing new starts; the MESSAGEs in flight get ``timeout`` for
        their final answer; then what is still unanswered and everything that waits in memory
        is stored, each conversation in order, for the next start to send.

        What waited was taken in already, so the per-recipient cap does not refuse it. A
        MESSAGE stored unanswered may have arrived (at-least-once, like the XMPP link's).
        """
        self._accepting = False
        self.conversations.pause()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        stored = 0
        for pair, outgoing in list(self._inflight.items()):
            self._abandoned.add(pair)
            await self._store_for_sip(outgoing, "gateway stopping, unanswered", capped=False)
            stored += 1
        for _, outgoing in self.conversations.take_waiting():
            await self._store_for_sip(outgoing, "gateway stopping", capped=False)
            stored += 1
        log.info("messages_drained", stored=stored, unanswered=len(self._abandoned))
        await self._tasks.wait(max(deadline - loop.time(), 0.0))

    def _new_id(self) -> str:
        return f"sx{self._prefix}{next(self._ids)}"


def _xmpp_pair(msg: SipText, stanza: ChatMessage) -> Pair:
    """The conversation of a SIP -> XMPP message, as the retry queue names it."""
    return (msg.from_uri, bare_jid(stanza.recipient))
