"""Chat rooms for SIP users (DESIGN 6): the sans-IO core joining SIP users' seats to XMPP rooms.

``RoomsCore`` takes our values in (``SipText`` from SIP users, ``RoomPresence``, ``RoomMessage``,
``RoomInvitation``, ``ServiceInfo`` and ``StanzaError`` from XMPP, ``SipUserState`` from
presence) with ``now``, and returns the effects of ``component.rooms.model`` for a driver to
carry out in order. It keeps one ``Seat`` per SIP user and room, the disco cache, and the SIP
messages that wait for a disco answer. ``next_deadline`` and ``handle_timer`` drive its timers.

A room sends each message to every occupant, so every SIP user in a room gets their own copy
addressed to their own component JID; the core only maps each copy to its SIP user.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable

from component.addresses import AddressBook, AddressError, HomeUser, XmppTarget, sip_user_and_host
from component.errors import Refusal, not_found
from component.rooms import commands, texts
from component.rooms.model import (
    Effect,
    Membership,
    Notice,
    PassToChat,
    RoomInvitation,
    RoomMessage,
    RoomPresence,
    RoomsConfig,
    SeatKey,
    ServiceInfo,
    ServiceKind,
    SipUserState,
    bare,
    resource,
)
from component.rooms.seat import Seat, SeatState
from component.rooms.services import ServiceDirectory
from component.values import SipText, StanzaError


class RoomsCore:
    """Every SIP user's seats in XMPP rooms, driven by values and ``now``."""

    def __init__(
        self, book: AddressBook, config: RoomsConfig | None = None, *, id_prefix: str = ""
    ) -> None:
        self.book = book
        self.config = config or RoomsConfig()
        self.seats: dict[SeatKey, Seat] = {}
        self.services = ServiceDirectory(
            cache_time=self.config.cache_time, disco_timeout=self.config.disco_timeout
        )
        self.users: dict[str, SipUserState] = {}
        self.link_is_up = False
        self._parked: dict[str, list[SipText]] = {}  # domain -> messages waiting for disco
        self._invited: dict[SeatKey, str | None] = {}  # the password an invitation gave
        self._ids = itertools.count(1)
        self._id_prefix = id_prefix or f"mr{os.urandom(3).hex()}-"

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    # --- who is who -------------------------------------------------------------------------

    def _aor_of(self, sip_uri: str) -> str:
        """The SIP user's AOR in the one form the core keys on."""
        return self.book.sip_uri_for_component_jid(self.book.jid_for_sip_uri(sip_uri))

    def _occupant_jid(self, aor: str) -> str:
        # DESIGN 3.1: stanzas from a SIP user come from its component JID, resource /sip.
        return f"{self.book.jid_for_sip_uri(aor)}/{self.config.resource}"

    def _user(self, aor: str) -> SipUserState:
        return self.users.get(aor) or SipUserState(aor)

    def _key_for_stanza(self, sender: str, recipient: str) -> SeatKey | None:
        try:
            aor = self.book.sip_uri_for_component_jid(bare(recipient))
        except AddressError:
            return None
        return SeatKey(aor, bare(sender))

    def claims(self, sender: str, recipient: str) -> bool:
        """True when a stanza from ``sender`` to ``recipient`` is a room's, for this core."""
        if not self.seats:
            # No SIP user sits in a room: nothing to map. Every inbound presence and message
            # is asked about, one per SIP watcher of a status change (bench.presence).
            return False
        key = self._key_for_stanza(sender, recipient)
        return key is not None and key in self.seats

    def service_kind(self, domain: str, now: float) -> ServiceKind | None:
        """What disco said about ``domain`` (cached), None if not known yet."""
        return self.services.kind(domain, now)

    def seats_of(self, aor: str) -> list[Seat]:
        """The seats of one SIP user."""
        return [seat for key, seat in self.seats.items() if key.aor == aor]

    # --- SIP users' messages to room and occupant addresses ---------------------------------

    def on_sip_text(self, msg: SipText, now: float) -> list[Effect]:
        """A MESSAGE to a jdomain address that may be a room or an occupant (DESIGN 3.2, 6).

        Raises ``Refusal`` for what can be refused at once (a bad address, an occupant address
        on a service known not to host rooms); later outcomes are notices.
        """
        try:
            aor = self._aor_of(msg.from_uri)
            target = self.book.xmpp_target_for_sip_uri(msg.to_uri)
        except AddressError as exc:
            raise Refusal(exc.sip_status, exc.sip_reason, exc.xmpp_condition, exc.text) from None
        if "@" not in target.jid:
            return [PassToChat(msg)]
        # DESIGN 3.3: a transport hosts rooms and people under one domain (biboumi's
        # #chan%server and nick%server), so disco#info on the address itself tells them apart.
        domain = target.jid if target.transport is not None else target.jid.partition("@")[2]
        if SeatKey(aor, target.jid) in self.seats:
            return self._dispatch(msg, aor, target, ServiceKind.MUC, now, deferred=False)
        kind = self.services.kind(domain, now)
        if kind is None:
            self._parked.setdefault(domain, []).append(msg)
            return list(self.services.ask(domain, now))
        return self._dispatch(msg, aor, target, kind, now, deferred=False)

    def is_plain_chat(self, msg: SipText, target: XmppTarget, now: float) -> bool:
        """True when ``msg`` to ``target`` is one-to-one chat, decided without building
        effects: the hot path of every MESSAGE that is not for a room.

        That is what :meth:`on_sip_text` would pass back (``PassToChat``) for a two-part
        address whose domain disco (cached) said hosts no rooms, a body that is no room
        command, and a sender with no seat there; anything else takes the long way.
        """
        if target.nick is not None:
            return False
        jid = target.jid
        if "@" not in jid:
            return True
        if msg.body.lstrip().startswith("/"):
            return False
        domain = jid if target.transport is not None else jid.partition("@")[2]
        kind = self.services.kind(domain, now)
        if kind is None or kind is ServiceKind.MUC:
            return False
        return not (self.seats and SeatKey(self._aor_of(msg.from_uri), jid) in self.seats)

    def is_parked(self, msg: SipText) -> bool:
        """True while ``msg`` (this very value) waits for a disco answer."""
        return any(m is msg for waiting in self._parked.values() for m in waiting)

    def on_service_info(self, info: ServiceInfo, now: float) -> list[Effect]:
        """A disco#info answer (XEP-0030): the messages that waited for it go on."""
        self.services.answer(info, now)
        return self._release(info.domain, info.kind, now)

    def _release(self, domain: str, kind: ServiceKind, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for msg in self._parked.pop(domain, []):
            aor = self._aor_of(msg.from_uri)
            target = self.book.xmpp_target_for_sip_uri(msg.to_uri)
            effects += self._dispatch(msg, aor, target, kind, now, deferred=True)
        return effects

    def _dispatch(
        self,
        msg: SipText,
        aor: str,
        target: XmppTarget,
        kind: ServiceKind,
        now: float,
        *,
        deferred: bool,
    ) -> list[Effect]:
        domain = target.jid.partition("@")[2]
        command = commands.parse_room_text(msg.body)
        room_form = target.nick is None and isinstance(command, commands.Say)
        if kind is not ServiceKind.MUC:
            if room_form:
                return [PassToChat(msg)]  # a person (or we cannot tell): chat as usual
            if kind is ServiceKind.UNREACHABLE:
                why = f"Could not reach {domain} to find out whether it hosts chat rooms."
            else:
                why = texts.not_a_room_service(domain)
            if not deferred:
                refusal = not_found(why)
                if kind is ServiceKind.UNREACHABLE:
                    refusal = Refusal(504, "Server Time-out", "remote-server-timeout", why)
                raise refusal
            return [Notice(aor, why)]
        if target.nick is not None:
            return self._to_occupant(msg, aor, target, command, now)
        return self._to_room(msg, aor, target.jid, command, now)

    def _to_occupant(
        self,
        msg: SipText,
        aor: str,
        target: XmppTarget,
        command: commands.RoomCommand,
        now: float,
    ) -> list[Effect]:
        key = SeatKey(aor, target.jid)
        seat = self.seats.get(key)
        nick = target.nick or self._default_nick(aor)
        if seat is None:
            # DESIGN 6: a MESSAGE to the occupant address joins under that nick; a /join in its
            # body may bring the password. The body is the request to join, not room talk.
            password = command.password if isinstance(command, commands.Join) else None
            return self._join(aor, target.jid, nick, password, now)
        if target.nick in ("", seat.nick) or nick == seat.requested_nick:
            return self._to_room(msg, aor, target.jid, command, now)
        if seat.state is not SeatState.JOINED:
            return [Notice(aor, texts.message_not_sent(seat.room, "you are not in the room yet."))]
        return seat.private(nick, msg)

    def _to_room(
        self, msg: SipText, aor: str, room: str, command: commands.RoomCommand, now: float
    ) -> list[Effect]:
        key = SeatKey(aor, room)
        seat = self.seats.get(key)
        joined = seat is not None and seat.state is SeatState.JOINED
        match command:
            case commands.Say():
                if seat is None:
                    if not self.config.auto_join:
                        return [Notice(aor, texts.not_member(room))]
                    effects = self._join(aor, room, self._default_nick(aor), None, now)
                    seat = self.seats.get(key)
                    if seat is None:
                        why = "you could not join it (see the previous notice)."
                        return [*effects, Notice(aor, texts.message_not_sent(room, why))]
                    return effects + seat.say(msg, now)
                effects = seat.say(msg, now)
                if seat.state is SeatState.DETACHED and self.link_is_up:
                    effects = seat.join(self._user(aor), now, silent=True) + effects
                return effects
            case commands.Join(nick, password):
                return self._join_command(aor, room, seat, nick, password, now)
            case commands.Leave(reason):
                if seat is None:
                    return [Notice(aor, texts.not_member(room))]
                del self.seats[key]
                return seat.leave(reason)
            case commands.Help():
                return [Notice(aor, commands.HELP_TEXT)]
            case commands.BadCommand(text):
                return [Notice(aor, text)]
        if seat is None or not joined:
            return [Notice(aor, texts.not_member(room))]
        match command:
            case commands.ChangeNick(nick):
                if (bad := self._bad_nick(room, nick)) is not None:
                    return [Notice(aor, bad)]
                return seat.change_nick(nick)
            case commands.Topic(None):
                return [Notice(aor, texts.topic(room, seat.subject))]
            case commands.Topic(str(subject)):
                return seat.set_topic(subject)
            case commands.Who():
                return [Notice(aor, texts.who(room, seat.roster.values()))]
            case commands.Invite(address, reason):
                return self._invite(seat, address, reason)
        raise AssertionError(f"unhandled room command {command!r}")  # pragma: no cover

    # --- joining and leaving ----------------------------------------------------------------

    def _default_nick(self, aor: str) -> str:
        # DESIGN 6: without a nick, the SIP user part is the nick.
        user, _ = sip_user_and_host(aor)
        return user or aor

    def _bad_nick(self, room: str, nick: str) -> str | None:
        try:
            self.book.sip_uri_for_jid(f"{room}/{nick}", occupant=True)
        except AddressError as exc:
            return f"{nick!r} cannot be a nick in {room}: {exc.text}"
        return None

    def _join(
        self, aor: str, room: str, nick: str, password: str | None, now: float
    ) -> list[Effect]:
        if (bad := self._bad_nick(room, nick)) is not None:
            return [Notice(aor, bad)]
        key = SeatKey(aor, room)
        if password is None:
            password = self._invited.get(key)
        self._invited.pop(key, None)
        seat = Seat(
            key,
            occupant_jid=self._occupant_jid(aor),
            nick=nick,
            password=password,
            config=self.config,
            book=self.book,
            new_id=self._new_id,
        )
        self.seats[key] = seat
        if not self.link_is_up:
            # Joined when the link comes up; until then the seat waits, detached.
            seat.silent = False
            return []
        return seat.join(self._user(aor), now, silent=False)

    def _join_command(
        self,
        aor: str,
        room: str,
        seat: Seat | None,
        nick: str | None,
        password: str | None,
        now: float,
    ) -> list[Effect]:
        if seat is None:
            return self._join(aor, room, nick or self._default_nick(aor), password, now)
        if seat.state in (SeatState.JOINING, SeatState.REJOINING):
            return [Notice(aor, f"Already joining {room} as {seat.nick}; wait for the result.")]
        if seat.state is SeatState.DETACHED:
            seat.nick = nick or seat.nick
            seat.password = password or seat.password
            return seat.join(self._user(aor), now, silent=False) if self.link_is_up else []
        if nick and nick != seat.nick:
            if (bad := self._bad_nick(room, nick)) is not None:
                return [Notice(aor, bad)]
            return seat.change_nick(nick)
        return [Notice(aor, f"You are already in {room} as {seat.nick}.")]

    def _invite(self, seat: Seat, address: str, reason: str | None) -> list[Effect]:
        try:
            invitee = self._invitee_jid(address)
        except AddressError as exc:
            return [Notice(seat.key.aor, f"Cannot invite {address}: {exc.text}.")]
        text = f"Invitation to {seat.room} sent to {address}."
        return [seat.invite(invitee, address, reason), Notice(seat.key.aor, text)]

    def _invitee_jid(self, address: str) -> str:
        """``/invite`` takes a SIP URI (a home user or a jdomain address) or a bare JID."""
        if address.lower().startswith(("sip:", "sips:", "<")):
            target = self.book.classify_request_uri(address)
            if isinstance(target, HomeUser):
                return target.jid
            if isinstance(target, XmppTarget) and target.nick is None:
                return target.jid
            raise AddressError(404, "Not Found", "item-not-found", "not a user's address")
        if "@" not in address or "/" in address:
            raise AddressError(400, "Bad Request", "jid-malformed", "give user@domain or sip:...")
        self.book.sip_uri_for_jid(address)  # validates, and refuses a JID with no way back
        return address

    # --- from the rooms ---------------------------------------------------------------------

    def on_room_presence(self, p: RoomPresence, now: float) -> list[Effect]:
        """A presence from a room to a SIP user (self-presence, occupants, errors)."""
        key = self._key_for_stanza(p.sender, p.recipient)
        seat = self.seats.get(key) if key is not None else None
        if seat is None:
            return []  # a room we left, or never were in
        if p.type != "error":
            self.services.learn(seat.room.partition("@")[2], ServiceKind.MUC, now)
        return self._reap(seat, seat.on_presence(p, now))

    def on_room_message(self, m: RoomMessage, now: float) -> list[Effect]:
        """A groupchat or private message from a room to a SIP user."""
        key = self._key_for_stanza(m.sender, m.recipient)
        seat = self.seats.get(key) if key is not None else None
        if seat is None:
            return []
        return self._reap(seat, seat.on_message(m))

    def on_message_error(self, err: StanzaError, now: float) -> list[Effect]:
        """An error for a message a seat sent (groupchat, subject, private message)."""
        key = self._key_for_stanza(err.sender, err.recipient)
        seat = self.seats.get(key) if key is not None else None
        if seat is None or err.id is None or not seat.is_own(err.id):
            return []
        said = seat.sent.get(err.id) == "message"
        effects = seat.on_error(err.id, err.condition, err.text)
        if (
            said
            and err.condition == "not-acceptable"
            and resource(err.sender) is None
            and self.link_is_up
        ):
            # XEP-0045 7.4: the room does not know us (it restarted): rejoin quietly.
            effects += seat.join(self._user(seat.key.aor), now, silent=True)
        return effects

    def on_invitation(self, inv: RoomInvitation, now: float) -> list[Effect]:
        """An invitation for a SIP user (XEP-0249, XEP-0045 7.8.2) becomes a notice sent from
        the room's address, so that replying ``/join`` joins."""
        try:
            aor = self.book.sip_uri_for_component_jid(bare(inv.invitee))
        except AddressError:
            return []
        room = bare(inv.room)
        inviter = bare(inv.inviter)
        if inviter == room:
            # A semi-anonymous room names the inviter by occupant JID: the nick is all we have.
            inviter = f"{resource(inv.inviter) or 'someone'} in {room}"
        elif inviter.partition("@")[2] == self.book.component:
            with contextlib.suppress(AddressError):
                inviter = self.book.sip_uri_for_component_jid(inviter)
        try:
            room_uri: str | None = self.book.sip_uri_for_jid(room)
        except AddressError:
            room_uri = None
        self.services.learn(room.partition("@")[2], ServiceKind.MUC, now)
        self._invited[SeatKey(aor, room)] = inv.password
        text = texts.invitation(room, inviter, inv.reason, inv.password, room_uri or room)
        return [Notice(aor, text, from_uri=room_uri, from_display=f"Invitation to {room}")]

    def _reap(self, seat: Seat, effects: list[Effect]) -> list[Effect]:
        if seat.state is SeatState.GONE:
            self.seats.pop(seat.key, None)
        return effects

    # --- the SIP users' presence (DESIGN 5.4, 6) --------------------------------------------

    def on_user_state(self, state: SipUserState, now: float) -> list[Effect]:
        """A SIP user's presence changed: every room they are in sees it."""
        try:
            aor = self._aor_of(state.aor)
        except AddressError:
            return []
        self.users[aor] = SipUserState(aor, state.online, state.show, state.status)
        effects: list[Effect] = []
        for seat in self.seats_of(aor):
            effects += seat.follow(self.users[aor])
        return effects

    # --- restart, link up and down (DESIGN 6, 8) --------------------------------------------

    def restore(self, memberships: Iterable[Membership], now: float) -> list[Effect]:
        """Seats from the store after a restart; rejoined at once if the link is up."""
        effects: list[Effect] = []
        for member in memberships:
            key = SeatKey(member.aor, member.room)
            if key in self.seats:
                continue
            seat = Seat(
                key,
                occupant_jid=self._occupant_jid(member.aor),
                nick=member.nick,
                password=member.password,
                config=self.config,
                book=self.book,
                new_id=self._new_id,
                stored=True,
            )
            self.seats[key] = seat
            if self.link_is_up:
                effects += seat.join(self._user(member.aor), now, silent=True)
        return effects

    def link_up(self, now: float) -> list[Effect]:
        """The component stream is up: (re)join every seat, quietly for stored ones."""
        self.link_is_up = True
        effects: list[Effect] = []
        for seat in list(self.seats.values()):
            if seat.state is SeatState.DETACHED:
                quiet = seat.stored and seat.silent
                effects += seat.join(self._user(seat.key.aor), now, silent=quiet)
        return effects

    def link_down(self, now: float) -> list[Effect]:
        """The component stream is gone: every seat waits detached, messages wait with it."""
        self.link_is_up = False
        for seat in self.seats.values():
            if seat.state in (SeatState.JOINING,):
                seat.silent = False
            elif seat.state in (SeatState.JOINED, SeatState.REJOINING):
                seat.silent = True
            seat.detach()
        return []

    # --- transports going down and coming back (DESIGN 9) -----------------------------------

    def _seats_on(self, domain: str) -> list[Seat]:
        return [seat for seat in self.seats.values() if seat.room.partition("@")[2] == domain]

    def transport_down(self, domain: str, now: float) -> list[Effect]:
        """A transport stopped answering: its seats wait detached; each member is told once."""
        told: dict[str, list[str]] = {}
        for seat in self._seats_on(domain):
            if seat.state in (SeatState.JOINED, SeatState.REJOINING):
                seat.silent = True
            seat.detach()
            told.setdefault(seat.key.aor, []).append(seat.room)
        return [Notice(aor, texts.transport_down(domain, rooms)) for aor, rooms in told.items()]

    def transport_up(self, domain: str, now: float) -> list[Effect]:
        """A transport answers again: its seats are rejoined, and each member is told."""
        effects: list[Effect] = []
        told: dict[str, list[str]] = {}
        for seat in self._seats_on(domain):
            if seat.state is SeatState.DETACHED and self.link_is_up:
                effects += seat.join(self._user(seat.key.aor), now, silent=True)
                told.setdefault(seat.key.aor, []).append(seat.room)
        notices: list[Effect] = [
            Notice(aor, texts.transport_up(domain, rooms)) for aor, rooms in told.items()
        ]
        return notices + effects

    # --- timers -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` next has work, or None."""
        times = [seat.deadline for seat in self.seats.values()]
        times.append(self.services.deadline)
        return min((t for t in times if t is not None), default=None)

    def handle_timer(self, now: float) -> list[Effect]:
        """Disco and join timeouts, deferred joined notices, retries of failed rejoins."""
        effects: list[Effect] = []
        for domain in self.services.timed_out(now):
            effects += self._release(domain, ServiceKind.UNREACHABLE, now)
        for seat in list(self.seats.values()):
            effects += self._reap(seat, seat.on_timer(now))
            if self.link_is_up and seat.retry_due(now):
                effects += seat.join(self._user(seat.key.aor), now, silent=True)
        return effects
