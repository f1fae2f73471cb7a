"""Stanzas that reach the instance not holding the state they concern (DESIGN 9).

On ejabberd every instance is active and any stanza may land on any of them, but a room seat
and the NOTIFY dialogs of a SIP user watching an XMPP user live in the memory of the instance
that owns them. ``Forwarding`` sends such a stanza, as our own value, to its owner, which
handles it as if it had come on its own link:

- a chat-room stanza for a seat another instance holds (known from the seat rows' owner
  column, refreshed every half ``check_time``, and from the announcement an instance
  broadcasts before it sends a join, so the room's answer finds it before the row exists);
- an XMPP user's presence change, or its answer to a SIP user's request to watch it, to every
  other instance holding a SIP user's subscription to it (the subscription rows' owners,
  cached for ``cache_time``); this instance handles it too, for the watchers it holds;
- an iq answer (result or error) for none of this instance's queries, to all the others: the
  one that asked takes it; the same for an error to a chat message none of this instance's
  sent (the one that sent it tells the SIP sender).

Forwards go out in arrival order, one transaction per owner and round. A forwarded stanza is
never forwarded again, except after its owner died: a notification to a dead instance reaches
no one, so each room stanza forwarded to an owner carries a sequence number and is kept until
the owner acknowledges it (an ``Ack`` per round, naming the highest number handed to its
seats) or ``keep`` seconds pass; the instance that takes over a dead one's seats hands the
unacknowledged ones to the seats it now holds (``replay``: a stanza the dead one handled just
before dying, its acknowledgement not yet sent, may so reach the SIP user twice, never not at
all). On SQLite there is one instance and nothing is built.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

from component.addresses import AddressBook, AddressError, bare_jid
from component.logs import get_logger
from component.ports import Clock, RoomStanzas
from component.runtime.rooms_driver import RoomsXmpp
from component.store import SeatOwner, StoreError, StorePort
from component.values import (
    ChatMessage,
    Presence,
    RoomInvitation,
    RoomMessage,
    RoomPresence,
    ServiceInfo,
    StanzaError,
)

log = get_logger("component.runtime.forwarding")


@dataclass(frozen=True, slots=True)
class IqAnswer:
    """An iq result or error that answers none of this instance's queries: maybe another's
    (a disco#info before a join, a barrier ping), so it goes to all (the XML as received);
    ``origin`` is the instance that received it (a broadcast comes back to its sender too)."""

    xml: str
    origin: str


@dataclass(frozen=True, slots=True)
class StrayError:
    """An error for a chat message none of this instance's sent (``StanzaError``'s fields):
    maybe another instance's, so it goes to all; ``origin`` received it."""

    sender: str
    recipient: str
    id: str | None
    condition: str
    type: str
    text: str | None
    origin: str

    def error(self) -> StanzaError:
        """The error as received."""
        return StanzaError(
            self.sender, self.recipient, self.id, self.condition, self.type, self.text
        )


@dataclass(frozen=True, slots=True)
class Ack:
    """Instance ``origin`` handed every room stanza up to number ``upto`` that the receiver of
    this forwarded to it."""

    origin: str
    upto: int


Forwarded = Presence | RoomPresence | RoomMessage | StanzaError | IqAnswer | StrayError
_KINDS: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Presence,
        RoomPresence,
        RoomMessage,
        StanzaError,
        SeatOwner,
        IqAnswer,
        StrayError,
        Ack,
    )
}
_FOR_WATCHERS = (None, "unavailable", "subscribed", "unsubscribed")
"""What an XMPP user's presence tells SIP users watching it: changes, and the answer to the
watch (which the instance holding the watch's dialog turns into its NOTIFY)."""
ALL = "*"
"""The outbox's target for what goes to every other instance."""
_OUTBOX_LIMIT = 10_000
_ROOM_KINDS = (RoomPresence, RoomMessage, StanzaError)
ANNOUNCED_FOR = 60.0
"""Seconds an announced seat counts without a row: a join's answer comes well within it."""


class Bus(Protocol):
    """Texts between instances (``component.store.notify.PgBus``)."""

    async def send(self, instance: str | None, texts: list[str]) -> None:
        """To ``instance``, or to every instance (None), together and in order."""
        ...

    async def listen(self, handler: Callable[[str], None]) -> None:
        """Until cancelled: hand each text sent to this instance or to all to ``handler``."""
        ...


Value = Forwarded | SeatOwner | Ack


def encode(value: Value, origin: str | None = None, seq: int | None = None) -> str:
    """``value`` as a JSON text; a room stanza also names the instance that forwards it and
    its number, for the acknowledgement."""
    body = {f.name: getattr(value, f.name) for f in fields(value)}
    doc: dict[str, Any] = {"k": type(value).__name__, "v": body}
    if origin is not None and seq is not None:
        doc["o"], doc["n"] = origin, seq
    return json.dumps(doc, separators=(",", ":"))


def decode_sent(text: str) -> tuple[Value, str | None, int | None]:
    """The value ``encode`` made ``text`` of, with its sender and number when it has them;
    ``ValueError`` for anything else."""
    try:
        doc = json.loads(text)
        cls = _KINDS[doc["k"]]
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in doc["v"].items()}
        value: Value = cls(**values)
        origin, seq = doc.get("o"), doc.get("n")
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a forwarded value: {exc!r}") from None
    if not (isinstance(origin, str) and isinstance(seq, int)):
        origin, seq = None, None
    return value, origin, seq


def decode(text: str) -> Value:
    """The value ``encode`` made ``text`` of; ``ValueError`` for anything else."""
    return decode_sent(text)[0]


class Seats:
    """Which instance holds each SIP user's seat: the seat rows' owners, re-read by
    ``refresh``, and the seats instances announced before their joins went out."""

    def __init__(
        self, store: StorePort, bus: Bus, instance: str, *, book: AddressBook, clock: Clock
    ) -> None:
        self.store, self.bus, self.instance, self.book, self.clock = (
            store,
            bus,
            instance,
            book,
            clock,
        )
        self._rows: dict[tuple[str, str], str] = {}  # (aor, room) -> owner
        self._announced: dict[tuple[str, str], tuple[str, float]] = {}

    def owner(self, sender: str, recipient: str) -> str | None:
        """The other instance holding the seat a stanza from ``sender`` (the room or an
        occupant) to ``recipient`` (a SIP user) concerns; None when none or this one."""
        try:
            key = (self.book.sip_uri_for_component_jid(bare_jid(recipient)), bare_jid(sender))
        except AddressError:
            return None
        owner = self._rows.get(key)
        if owner is None and (announced := self._announced.get(key)) is not None:
            owner, at = announced
            if at < self.clock() - ANNOUNCED_FOR:
                del self._announced[key]
                return None
        return None if owner == self.instance else owner

    def aor_of(self, jid: str) -> str | None:
        """The SIP user of a component JID, None for anything else."""
        try:
            return self.book.sip_uri_for_component_jid(bare_jid(jid))
        except AddressError:
            return None

    def heard(self, seat: SeatOwner) -> None:
        """Another instance announced a seat."""
        if seat.owner != self.instance:
            self._announced[(seat.sip_aor, seat.room_jid)] = (seat.owner, self.clock())

    async def announce(self, aor: str, room: str) -> None:
        """Tell every instance this one holds ``aor``'s seat in ``room`` (before the join goes
        out, so the room's answer is forwarded here wherever it lands)."""
        try:
            await self.bus.send(None, [encode(SeatOwner(aor, room, self.instance))])
        except StoreError as exc:
            log.warning("seat_announcement_failed", aor=aor, room=room, reason=str(exc))

    def forget(self, dead: str) -> None:
        """``dead``'s seats are no longer its own (taken over): nothing more is forwarded to
        it before the next ``refresh`` says who holds them now."""
        self._rows = {key: owner for key, owner in self._rows.items() if owner != dead}
        self._announced = {k: v for k, v in self._announced.items() if v[0] != dead}

    async def refresh(self) -> None:
        """Re-read the seat rows' owners (takeovers move them)."""
        rows = await self.store.seat_owners()
        self._rows = {(r.sip_aor, r.room_jid): r.owner for r in rows}


class Forwarding:
    """Routes stanzas about state another live instance holds to it (see the module).

    It is the ``RoomStanzas`` the XMPP link hands room stanzas to, in front of the local
    ``rooms``; ``on_presence`` stands in front of the local ``presence`` handler.
    """

    def __init__(
        self,
        seats: Seats,
        *,
        rooms: RoomStanzas,
        presence: Callable[[Presence], None],
        answers: Callable[[str], bool],
        errors: Callable[[StanzaError], None],
        refresh: float,
        cache_time: float = 1.0,
        keep: float = 10.0,
    ) -> None:
        self.seats = seats
        self.store, self.bus, self.instance = seats.store, seats.bus, seats.instance
        self.clock = seats.clock
        self.rooms = rooms
        self.presence = presence
        self.answers = answers
        self.errors = errors
        self.refresh = refresh
        self.cache_time = cache_time
        self._watchers: dict[str, tuple[list[str], float]] = {}  # jid -> owners, when read
        self._outbox: deque[tuple[str | None, Forwarded]] = deque()
        self.keep = keep
        self._seq = 0
        self._kept: deque[tuple[int, float, str, Forwarded]] = deque()  # number, when, owner
        self._acks: dict[str, int] = {}  # instance -> highest number handed here, to ack
        self._wake = asyncio.Event()
        self.forwarded = 0
        self.received = 0

    # --- RoomStanzas, in front of the local rooms ------------------------------------------

    def claims(self, sender: str, recipient: str) -> bool:
        """A seat here, or one another instance holds."""
        if self.rooms.claims(sender, recipient):
            return True
        return self.seats.owner(sender, recipient) is not None

    def on_room_presence(self, presence: RoomPresence) -> None:
        """To the local seat, or forwarded to the owner's."""
        if self._forwards(presence, presence.sender, presence.recipient):
            return
        self.rooms.on_room_presence(presence)

    def on_room_message(self, message: RoomMessage) -> None:
        """To the local seat, or forwarded to the owner's."""
        if self._forwards(message, message.sender, message.recipient):
            return
        self.rooms.on_room_message(message)

    def on_room_error(self, error: StanzaError) -> None:
        """To the local seat, or forwarded to the owner's."""
        if self._forwards(error, error.sender, error.recipient):
            return
        self.rooms.on_room_error(error)

    def on_invitation(self, invitation: RoomInvitation) -> None:
        """Any instance tells the SIP user (no seat yet)."""
        self.rooms.on_invitation(invitation)

    def on_unclaimed(self, stanza: RoomPresence | RoomMessage) -> bool:
        """A room's stanza for a seat no instance is known to hold yet: to every other
        instance. The room's answer to a join may land here before the joining instance's
        announcement (the NOTIFY on the database and the stanza through the XMPP server race);
        the one holding the seat takes it, the others drop it."""
        self._queue(ALL, stanza)
        return True

    def _forwards(self, value: Forwarded, sender: str, recipient: str) -> bool:
        if self.rooms.claims(sender, recipient):
            return False
        owner = self.seats.owner(sender, recipient)
        if owner is None:
            return False
        self._queue(owner, value)
        return True

    # --- presence ----------------------------------------------------------------------------

    def on_presence(self, presence: Presence) -> None:
        """Handled here; a change of an XMPP user's presence, or the answer to a SIP user's
        request to watch it, also goes to the other instances holding SIP users' subscriptions
        to it."""
        self.presence(presence)
        if presence.type in _FOR_WATCHERS and not presence.muc:
            self._queue(None, presence)

    async def _watcher_owners(self, jid: str) -> list[str]:
        now = self.clock()
        cached = self._watchers.get(jid)
        if cached is not None and cached[1] > now - self.cache_time:
            return cached[0]
        owners = [o for o in await self.store.watcher_owners(jid) if o != self.instance]
        if len(self._watchers) > _OUTBOX_LIMIT:
            self._watchers.clear()
        self._watchers[jid] = (owners, now)
        return owners

    def on_stray_answer(self, xml: str) -> None:
        """An iq answer none of this instance's queries waits for: to every other instance."""
        self._queue(ALL, IqAnswer(xml, self.instance))

    def on_stray_error(self, err: StanzaError) -> None:
        """An error for a chat message this instance did not send: to every other instance."""
        stray = StrayError(
            err.sender, err.recipient, err.id, err.condition, err.type, err.text, self.instance
        )
        self._queue(ALL, stray)

    # --- sending and receiving ---------------------------------------------------------------

    def _queue(self, owner: str | None, value: Forwarded) -> None:
        """``owner`` None: a presence, whose owners are looked up in order; ``ALL``: to every
        other instance."""
        if len(self._outbox) >= _OUTBOX_LIMIT:
            log.warning("forward_dropped", kind=type(value).__name__, waiting=len(self._outbox))
            return
        self._outbox.append((owner, value))
        self._wake.set()

    def _keep(self, owner: str, value: Forwarded) -> int:
        """Keep a room stanza forwarded to ``owner`` until acknowledged; its number."""
        self._seq += 1
        now = self.clock()
        self._kept.append((self._seq, now, owner, value))
        limit = now - self.keep
        while self._kept and (self._kept[0][1] < limit or len(self._kept) > _OUTBOX_LIMIT):
            self._kept.popleft()
        return self._seq

    @property
    def unacknowledged(self) -> int:
        """Room stanzas forwarded and not yet acknowledged by their owners."""
        return len(self._kept)

    def _acked(self, ack: Ack) -> None:
        self._kept = deque(e for e in self._kept if not (e[2] == ack.origin and e[0] <= ack.upto))

    def replay(self, dead: str) -> int:
        """The room stanzas forwarded to ``dead`` that it did not acknowledge (it may never
        have handled them): handed, in arrival order, to the seats this instance now holds
        (or on to whoever holds them now). Called once the dead one's seats were taken over
        and restored here; returns how many."""
        again = [value for _, _, owner, value in self._kept if owner == dead]
        again += [value for owner, value in self._outbox if owner == dead]  # not sent yet
        self._kept = deque(entry for entry in self._kept if entry[2] != dead)
        self._outbox = deque(entry for entry in self._outbox if entry[0] != dead)
        self.seats.forget(dead)
        for value in again:
            match value:
                case RoomPresence():
                    self.on_room_presence(value)
                case RoomMessage():
                    self.on_room_message(value)
                case StanzaError():
                    self.on_room_error(value)
        if again:
            log.warning("forwards_replayed", dead=dead, count=len(again))
        return len(again)

    async def _send_round(self) -> None:
        """Everything queued, grouped by owner in arrival order, one send per owner."""
        batches: dict[str, list[str]] = {}
        while self._outbox:
            owner, value = self._outbox.popleft()
            if owner is not None:
                owners = [owner]
            else:
                assert isinstance(value, Presence)
                try:
                    owners = await self._watcher_owners(bare_jid(value.sender))
                except StoreError as exc:
                    log.warning("forward_lookup_failed", jid=value.sender, reason=str(exc))
                    continue
            for name in owners:
                if name != ALL and isinstance(value, _ROOM_KINDS):
                    text = encode(value, self.instance, self._keep(name, value))
                elif isinstance(value, _ROOM_KINDS):
                    text = encode(value, self.instance)  # its own comes back: see _received
                else:
                    text = encode(value)
                batches.setdefault(name, []).append(text)
        acks, self._acks = self._acks, {}
        for name, upto in acks.items():
            batches.setdefault(name, []).append(encode(Ack(self.instance, upto)))
        for name, texts in batches.items():
            try:
                await self.bus.send(None if name == ALL else name, texts)
                self.forwarded += len(texts)
                log.info("stanzas_forwarded", to=name, count=len(texts))
            except StoreError as exc:
                log.warning("forward_failed", instance=name, count=len(texts), reason=str(exc))

    def _received(self, text: str) -> None:
        try:
            value, origin, seq = decode_sent(text)
        except ValueError as exc:
            log.warning("forward_unreadable", reason=str(exc))
            return
        self.received += 1
        if origin is not None and seq is not None:
            self._acks[origin] = max(seq, self._acks.get(origin, 0))
            self._wake.set()
        match value:
            case Ack():
                self._acked(value)
            case SeatOwner():
                self.seats.heard(value)
            case Presence():
                self.presence(value)
            case IqAnswer(xml, origin) if origin != self.instance:
                self.answers(xml)
            case IqAnswer():
                pass
            case StrayError() if value.origin != self.instance:
                self.errors(value.error())
            case StrayError():
                pass
            case RoomPresence() | RoomMessage() | StanzaError() if origin == self.instance:
                pass  # its own broadcast of a stanza for a seat it did not know (on_unclaimed)
            case RoomPresence() | RoomMessage() | StanzaError() if not self.rooms.claims(
                value.sender, value.recipient
            ):
                if seq is not None:  # sent here as the seat's owner: the seat is gone
                    log.info("forward_seat_gone", sender=value.sender, recipient=value.recipient)
            case RoomPresence():
                self.rooms.on_room_presence(value)
            case RoomMessage():
                self.rooms.on_room_message(value)
            case StanzaError():
                self.rooms.on_room_error(value)

    async def reread(self) -> None:
        """Re-read who holds what: every ``refresh`` seconds, and at once after a takeover (a
        stanza for a seat just taken over must not be forwarded to the dead instance)."""
        await self.seats.refresh()
        self._watchers.clear()

    async def run(self) -> None:
        """Until cancelled: listen, send what is queued, re-read the seats' owners every
        ``refresh`` seconds."""
        listener = asyncio.create_task(self.bus.listen(self._received))
        loop = asyncio.get_running_loop()
        next_refresh = loop.time()
        try:
            while True:
                if loop.time() >= next_refresh:
                    try:
                        await self.reread()
                    except StoreError as exc:
                        log.debug("forward_refresh_skipped", reason=str(exc))
                    next_refresh = loop.time() + self.refresh
                try:
                    async with asyncio.timeout(max(next_refresh - loop.time(), 0.0)):
                        await self._wake.wait()
                except TimeoutError:
                    continue
                self._wake.clear()
                await self._send_round()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)


class SeatAnnouncing:
    """The rooms' XMPP port (``RoomsXmpp``) that announces a seat before its join goes out;
    what the rooms send meanwhile waits behind the join, in order."""

    def __init__(
        self, xmpp: RoomsXmpp, seats: Seats, own: Callable[[Awaitable[None]], object]
    ) -> None:
        self.xmpp = xmpp
        self.seats = seats
        self._own = own
        self._held: deque[Callable[[], object]] | None = None

    def _send(self, write: Callable[[], bool]) -> bool:
        if self._held is None:
            return write()
        self._held.append(write)
        return True

    def send_presence(self, presence: Presence) -> bool:
        """A join is announced first; anything else is written at once unless a join waits."""
        aor = self.seats.aor_of(presence.sender) if presence.muc else None
        if aor is None:
            return self._send(lambda: self.xmpp.send_presence(presence))
        if self._held is None:
            self._held = deque()
            self._own(self._flush())
        room = bare_jid(presence.recipient)
        self._held.append(lambda: self.seats.announce(aor, room))
        self._held.append(lambda: self.xmpp.send_presence(presence))
        return True

    async def _flush(self) -> None:
        held = self._held
        assert held is not None
        try:
            while held:
                step = held.popleft()()
                if isinstance(step, Awaitable):
                    await step
        finally:
            self._held = None

    def send_message(self, msg: ChatMessage) -> bool:
        """Written in order behind a waiting join."""
        return self._send(lambda: self.xmpp.send_message(msg))

    def send_invitation(
        self, sender: str, room: str, invitee: str, reason: str | None, msg_id: str
    ) -> bool:
        """Written in order behind a waiting join."""
        return self._send(lambda: self.xmpp.send_invitation(sender, room, invitee, reason, msg_id))

    def configure_instant_room(self, sender: str, room: str) -> bool:
        """Written in order behind a waiting join."""
        return self._send(lambda: self.xmpp.configure_instant_room(sender, room))

    async def discover_service(self, domain: str, timeout: float = 10.0) -> ServiceInfo:
        """Asked at once."""
        return await self.xmpp.discover_service(domain, timeout)
