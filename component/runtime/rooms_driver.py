"""The asyncio driver of chat rooms (DESIGN 6): calls ``RoomsCore`` and carries out its effects.

The core is synchronous, so each call into it and the hand-out of its effects happen in one
step of the event loop: calls are serialised by construction, and effects leave in the order
the core gave them. Stanzas are written at once; what must be awaited goes to owned work:

- SIP MESSAGEs (room messages, private messages, notices) go through one lane per SIP user,
  one MESSAGE in flight at a time, so a room's messages reach the user in the room's order
  (DESIGN 4.2: the proxy reorders transactions in flight to one user). A room message the user
  cannot take now (offline, DESIGN 4.2) goes to the retry queue, and so does every later one
  for that user until they are back and the queue holds none of their room messages any more,
  so the order is kept across the queue too.
- Memberships are written by one store worker, in order.
- Service discovery runs as owned queries; the answer goes back into the core.
- One timer task sleeps until the core's next deadline or until a call may have moved it.

It implements the ports the other parts use: ``RoomStanzas`` (XMPP adapter), ``RoomTexts``
(messaging), ``UserStateListener`` (presence).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from component.addresses import AddressBook, AddressError, XmppTarget
from component.errors import RETRYABLE
from component.logs import get_logger
from component.ports import Clock, SipPort
from component.rooms.core import RoomsCore
from component.rooms.model import (
    ConfigureInstantRoom,
    DeleteMembership,
    DiscoverService,
    Effect,
    Notice,
    PassToChat,
    SaveMembership,
    SendInvitation,
    SendMessage,
    SendPresence,
    SendSip,
    SipUserState,
)
from component.rooms.ports import RoomStore
from component.runtime.tasks import TaskOwner
from component.store import MessageDirection, NewMessage, StorePort, StoreUnavailable
from component.values import (
    ChatMessage,
    Presence,
    RoomInvitation,
    RoomMessage,
    RoomPresence,
    ServiceInfo,
    SipText,
    StanzaError,
)
from sipside.errors import LocalError

log = get_logger("component.runtime.rooms")

__all__ = ["RoomsDriver", "RoomsXmpp"]

_MAX_SLEEP = 60.0
NOTICE_DISPLAY = "XMPP gateway"


class RoomsXmpp(Protocol):
    """What the room driver needs of the XMPP link (``component.xmpp.link.XmppLink``)."""

    def send_message(self, msg: ChatMessage) -> bool:
        """Write a message; False when the link is down."""
        ...

    def send_presence(self, presence: Presence) -> bool:
        """Write a presence; False when the link is down."""
        ...

    def send_invitation(
        self, sender: str, room: str, invitee: str, reason: str | None, msg_id: str
    ) -> bool:
        """Write a mediated invitation with id ``msg_id``; False when the link is down."""
        ...

    def configure_instant_room(self, sender: str, room: str) -> bool:
        """Unlock a room we created; False when the link is down."""
        ...

    async def discover_service(self, domain: str, timeout: float = 10.0) -> ServiceInfo:
        """disco#info of ``domain`` as a ServiceInfo (UNREACHABLE on any failure)."""
        ...


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """One MESSAGE of a SIP user's lane; ``room`` set for room talk, None for a notice."""

    text: SipText
    room: str | None


class RoomsDriver:
    """Drives ``RoomsCore``: adapters' input in, effects out, a timer, start and stop."""

    def __init__(
        self,
        core: RoomsCore,
        *,
        book: AddressBook,
        xmpp: RoomsXmpp,
        sip: SipPort,
        store: StorePort,
        memberships: RoomStore,
        clock: Clock,
        delay_time: float,
    ) -> None:
        self.core = core
        self.book = book
        self.xmpp = xmpp
        self.sip = sip
        self.store = store
        self.memberships = memberships
        self.clock = clock
        self.delay_time = delay_time
        self._tasks = TaskOwner("rooms_task_failed")
        self._lanes: dict[str, deque[_Outgoing]] = {}
        self._offline: set[str] = set()  # SIP users whose room messages go to the queue
        # Back online, but room messages may still wait in the queue: later ones go behind.
        self._returning: set[str] = set()
        self._states: dict[str, SipUserState] = {}
        self._writes: deque[Effect] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._waiters: dict[int, tuple[SipText, asyncio.Future[bool]]] = {}
        self._wake = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._stopping = False

    # --- effects ------------------------------------------------------------------------------

    def _run(self, effects: list[Effect]) -> None:
        for effect in effects:
            try:
                self._carry_out(effect)
            except LocalError as exc:  # our bug (a JID that must not be sent); the rest goes on
                log.error("rooms_effect_failed", effect=type(effect).__name__, error=str(exc))
        self._settle_waiters()
        self._wake.set()

    def _carry_out(self, effect: Effect) -> None:
        match effect:
            case SendPresence(presence):
                self.xmpp.send_presence(presence)
            case SendMessage(message):
                # XEP-0359: the room keeps the origin-id when it reflects our message.
                self.xmpp.send_message(replace(message, origin_id=message.id))
            case SendInvitation(sender, room, invitee, msg_id, reason):
                self.xmpp.send_invitation(sender, room, invitee, reason, msg_id)
            case ConfigureInstantRoom(sender, room):
                self.xmpp.configure_instant_room(sender, room)
            case DiscoverService(domain):
                self._tasks.own(self._discover(domain))
            case SendSip(text, room):
                self._queue_sip(_Outgoing(text, room))
            case Notice(aor, body, from_uri, from_display):
                text = SipText(
                    from_uri=from_uri or self.book.registrar,
                    to_uri=aor,
                    body=body,
                    from_display=from_display or NOTICE_DISPLAY,
                )
                self._queue_sip(_Outgoing(text, None))
            case SaveMembership() | DeleteMembership():
                self._writes.append(effect)
                if self._writer is None or self._writer.done():
                    self._writer = self._tasks.own(self._write_memberships())
            case PassToChat(text):
                self._resolve(text, taken=False)

    def _call(self, step: Callable[[float], list[Effect]]) -> None:
        """One call into the core, its effects carried out at once."""
        if self._stopping:
            return
        self._run(step(self.clock()))

    # --- SIP lanes ----------------------------------------------------------------------------

    def _queue_sip(self, item: _Outgoing) -> None:
        aor = item.text.to_uri
        lane = self._lanes.get(aor)
        if lane is None:
            lane = self._lanes[aor] = deque()
            lane.append(item)
            self._tasks.own(self._send_lane(aor, lane))
        else:
            lane.append(item)

    async def _send_lane(self, aor: str, lane: deque[_Outgoing]) -> None:
        try:
            while lane:
                item = lane[0]
                try:
                    await self._send_one(aor, item)
                except Exception:
                    log.exception("room_message_failed", sip_uri=aor)
                lane.popleft()
        finally:
            if self._lanes.get(aor) is lane:
                del self._lanes[aor]

    async def _send_one(self, aor: str, item: _Outgoing) -> None:
        text = item.text
        if item.room is not None and await self._keeps_waiting(aor):
            await self._store(item)
            return
        status = await self.sip.send_text(
            from_uri=text.from_uri, to_uri=aor, body=text.body, from_display=text.from_display
        )
        if status < 300:
            return
        # DESIGN 4.2: 480/408/503, and a 404 for a user seen before, mean "not now". A room
        # member has been seen by definition (they joined by sending a MESSAGE), and DESIGN 6
        # keeps an offline member in the room with their room messages queued.
        if item.room is not None and (status in RETRYABLE or status == 404):
            self._offline.add(aor)
            await self._store(item)
            return
        log.info("room_message_undelivered", sip_uri=aor, room=item.room, status=status)

    async def _keeps_waiting(self, aor: str) -> bool:
        """Whether a room message for ``aor`` goes to the queue rather than out now: the user
        is offline, or is back while earlier room messages still wait there."""
        if aor in self._offline:
            return True
        if aor not in self._returning:
            return False
        try:
            waiting = await self.store.messages_for_recipient(aor)
        except StoreUnavailable:
            return False
        if any(queued.extra.get("room") for queued in waiting):
            return True
        self._returning.discard(aor)
        return False

    def _back_online(self, aor: str) -> None:
        if aor in self._offline:
            self._offline.discard(aor)
            self._returning.add(aor)

    async def _store(self, item: _Outgoing) -> None:
        text, now = item.text, self.clock()
        try:
            await self.store.enqueue_message(
                NewMessage(
                    MessageDirection.XMPP_TO_SIP,
                    item.room or text.from_uri,
                    text.to_uri,
                    text.body,
                    "text/plain",
                    created_at=now,
                    deliver_by=now + self.delay_time,
                    next_attempt_at=now + 5.0,
                    extra={
                        "from_uri": text.from_uri,
                        "from_display": text.from_display,
                        "room": item.room,
                    },
                )
            )
        except StoreUnavailable as exc:
            log.warning("room_message_lost", sip_uri=text.to_uri, room=item.room, error=str(exc))
            return
        log.info("room_message_queued", sip_uri=text.to_uri, room=item.room)

    # --- memberships --------------------------------------------------------------------------

    async def _write_memberships(self) -> None:
        while self._writes:
            effect = self._writes.popleft()
            try:
                match effect:
                    case SaveMembership(membership):
                        await self.memberships.save_membership(membership)
                    case DeleteMembership(aor, room):
                        await self.memberships.delete_membership(aor, room)
            except StoreUnavailable as exc:
                log.warning("room_membership_not_stored", error=str(exc))

    # --- service discovery and SIP texts (RoomTexts) -----------------------------------------

    async def _discover(self, domain: str) -> None:
        info = await self.xmpp.discover_service(domain, timeout=self.core.config.disco_timeout)
        log.info("room_service_discovered", domain=domain, kind=info.kind.value)
        self._call(lambda now: self.core.on_service_info(info, now))

    def take_text(self, msg: SipText) -> bool | None:
        """``RoomTexts``: a MESSAGE to a jdomain or transport address through the room core."""
        try:
            target = self.book.classify_request_uri(msg.to_uri)
        except AddressError:
            return False  # messaging refuses it with the right words
        if not isinstance(target, XmppTarget):
            return False
        now = self.clock()
        if self.core.is_plain_chat(msg, target, now):
            return False
        effects = self.core.on_sip_text(msg, now)
        passed = any(isinstance(e, PassToChat) and e.text is msg for e in effects)
        if not passed and self.core.is_parked(msg):
            future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._waiters[id(msg)] = (msg, future)
        self._run([e for e in effects if not (isinstance(e, PassToChat) and e.text is msg)])
        if passed:
            return False
        return None if id(msg) in self._waiters else True

    def waiting(self, msg: SipText) -> bool:
        """``RoomTexts``: ``msg`` waits for service discovery."""
        entry = self._waiters.get(id(msg))
        return entry is not None and entry[0] is msg

    async def settle_text(self, msg: SipText) -> bool:
        """``RoomTexts``: True once the rooms took ``msg``, False when it is chat after all."""
        entry = self._waiters.get(id(msg))
        if entry is None or entry[0] is not msg:
            return True
        try:
            return await entry[1]
        finally:
            self._waiters.pop(id(msg), None)

    def _resolve(self, msg: SipText, *, taken: bool) -> None:
        entry = self._waiters.get(id(msg))
        if entry is None or entry[0] is not msg:
            log.info("room_text_passed_late", sip_uri=msg.from_uri)
            return
        if not entry[1].done():
            entry[1].set_result(taken)

    def _settle_waiters(self) -> None:
        for msg, future in list(self._waiters.values()):
            if not future.done() and not self.core.is_parked(msg):
                future.set_result(True)

    # --- XMPP stanzas (RoomStanzas) -----------------------------------------------------------

    def claims(self, sender: str, recipient: str) -> bool:
        """``RoomStanzas``: the stanza belongs to a SIP user's seat."""
        return self.core.claims(sender, recipient)

    def on_room_presence(self, presence: RoomPresence) -> None:
        """``RoomStanzas``: a presence from a room."""
        self._call(lambda now: self.core.on_room_presence(presence, now))

    def on_room_message(self, message: RoomMessage) -> None:
        """``RoomStanzas``: a message from a room or an occupant."""
        self._call(lambda now: self.core.on_room_message(message, now))

    def on_room_error(self, error: StanzaError) -> None:
        """``RoomStanzas``: an error for something a seat sent."""
        self._call(lambda now: self.core.on_message_error(error, now))

    def on_invitation(self, invitation: RoomInvitation) -> None:
        """``RoomStanzas``: an invitation for a SIP user."""
        self._call(lambda now: self.core.on_invitation(invitation, now))

    def on_unclaimed(self, stanza: RoomPresence | RoomMessage) -> bool:
        """``RoomStanzas``: one instance holds every seat there is, so none is elsewhere."""
        return False

    # --- SIP users' presence, the link ------------------------------------------------------

    def user_state(self, aor: str, online: bool, show: str | None, status: str | None) -> None:
        """``UserStateListener``: the rooms show the SIP user's state (DESIGN 5.4, 6).

        A user who goes offline (REGISTER expiry, the ``offline`` command, a closed PUBLISH)
        stays a member, and their room messages wait in the queue until they are back; one
        who is out of reach without saying so answers so, with the same result (``_send_one``).
        """
        if online:
            self._back_online(aor)
        else:
            self._offline.add(aor)
        state = SipUserState(aor, online, show, status)
        if self._states.get(aor) == state:
            return  # a refresh that changes nothing: the rooms saw it already
        self._states[aor] = state
        self._call(lambda now: self.core.on_user_state(state, now))

    def user_online(self, aor: str) -> None:
        """``UserOnline``: room messages go to the user directly again once the queue, which
        messaging flushes now, holds none of theirs."""
        self._back_online(aor)

    def on_link(self, up: bool) -> None:
        """The XMPP link came up (rejoin every seat) or went down (seats wait, detached)."""
        self._call(self.core.link_up if up else self.core.link_down)

    def transport_changed(self, domain: str, up: bool) -> None:
        """A transport went down (its seats wait, members are told) or came back (rejoined)."""
        core = self.core
        self._call(lambda now: (core.transport_up if up else core.transport_down)(domain, now))

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Restore the stored seats (rejoined when the link comes up), start the timer."""
        await self.restore()
        self._timer = asyncio.create_task(self._timer_loop(), name="rooms-timer")

    async def restore(self) -> None:
        """Take the stored seats this instance owns and does not hold yet (at start, and after
        taking over a dead instance's seats, DESIGN 9): rejoined quietly while the link is up."""
        try:
            stored = await self.memberships.list_memberships()
        except StoreUnavailable as exc:
            log.warning("room_memberships_not_restored", error=str(exc))
            stored = []
        self._call(lambda now: self.core.restore(stored, now))
        log.info("rooms_restored", seats=len(stored))

    async def stop(self, timeout: float = 5.0) -> None:
        """Take no new input, let MESSAGEs and writes in flight finish (up to ``timeout``)."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        for _msg, future in self._waiters.values():
            if not future.done():
                future.set_result(False)  # relayed as chat: nothing is dropped
        await self._tasks.wait(timeout)
        pending = self._tasks.pending()
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _timer_loop(self) -> None:
        while not self._stopping:
            deadline = self.core.next_deadline()
            delay = _MAX_SLEEP if deadline is None else deadline - self.clock()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, _MAX_SLEEP)):
                        await self._wake.wait()
                continue
            try:
                self._call(self.core.handle_timer)
            except Exception:
                log.exception("rooms_timer_failed")
                await asyncio.sleep(1.0)
