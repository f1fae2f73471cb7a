"""One SIP user's seat in one room (DESIGN 6): the join, the life in the room, the way out.

``Seat`` is a state machine over ``SeatState``; every input takes ``now`` and returns effects.
It knows one room as one SIP user sees it: the nick, the occupants the room announced to that
user, the subject, the messages waiting for the join, and the ids of the messages it sent so
that the room's reflection of them is not delivered back (XEP-0045 7.4: the room sends each
message to every occupant, the sender included).

States::

    JOINING --110--> JOINED --/leave, kick, ban, destroy--> GONE
    REJOINING --110--> JOINED      (silent: no history, no notice unless it fails)
    JOINING/REJOINING --error/timeout--> GONE (permanent) | DETACHED (passing, kept, retried)
    JOINED --link down, 332--> DETACHED --link up, retry--> REJOINING
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable

from component.addresses import AddressBook, AddressError
from component.rooms import texts
from component.rooms.model import (
    ConfigureInstantRoom,
    DeleteMembership,
    Effect,
    Membership,
    Notice,
    RoomMessage,
    RoomPresence,
    RoomsConfig,
    SaveMembership,
    SeatKey,
    SendInvitation,
    SendMessage,
    SendPresence,
    SendSip,
    SipUserState,
    resource,
)
from component.rooms.texts import Occupant
from component.values import ChatMessage, Presence, SipText

_SENT_IDS = 256  # reflections and errors arrive within seconds; enough for any burst
OFFLINE_STATUS = "offline (messages are kept)"
_INVITATION = "invitation for "  # what ``sent`` holds for a /invite, before the address


class SeatState(enum.Enum):
    """Where one SIP user stands in one room."""

    JOINING = "joining"  # the user asked; the outcome is told as a notice
    REJOINING = "rejoining"  # after a restart, link-up or retry; told only if it fails
    JOINED = "joined"
    DETACHED = "detached"  # a member the room does not see now (link down, service gone)
    GONE = "gone"  # left, removed or refused: the core forgets the seat


def show_for(user: SipUserState) -> tuple[str | None, str | None]:
    """The MUC show and status for a SIP user's state (DESIGN 6: presence follows 5.4).

    Offline is shown as extended away rather than unavailable: an unavailable occupant is no
    occupant, and the room would stop sending the messages the gateway keeps for the user.
    """
    if not user.online:
        return "xa", user.status or OFFLINE_STATUS
    return user.show, user.status


class Seat:
    """A SIP user's seat in a room and what the room showed that user."""

    def __init__(
        self,
        key: SeatKey,
        *,
        occupant_jid: str,
        nick: str,
        password: str | None,
        config: RoomsConfig,
        book: AddressBook,
        new_id: Callable[[], str],
        stored: bool = False,
    ) -> None:
        self.key = key
        self.occupant_jid = occupant_jid  # alice@sip.xmpp.test/sip, the sender of our stanzas
        self.nick = nick
        self.password = password
        self.config = config
        self.book = book
        self.new_id = new_id
        # The membership row as last written (None: no row), so a changed nick or password
        # is written again.
        self.saved: Membership | None = self.membership() if stored else None
        self.state = SeatState.DETACHED
        self.silent = True  # the current join was not asked for by the user
        self.roster: dict[str, Occupant] = {}
        self.subject: str | None = None
        self.pending: list[SipText] = []  # waiting for the join to end
        self.pending_deadline: float | None = None
        # Ids of the stanzas we sent, with what they were, for reflections and errors.
        self.sent: OrderedDict[str, str] = OrderedDict()
        self.requested_nick: str | None = None
        self.join_deadline: float | None = None
        self.announce_at: float | None = None
        self.retry_at: float | None = None
        self.retry_delay = config.rejoin_retry
        self.told_detached = False
        self._created = False
        self._nick_assigned = False
        self._subject_pending = False  # the join sequence's subject has not come yet

    # --- addresses ------------------------------------------------------------------------

    @property
    def room(self) -> str:
        """The room's bare JID."""
        return self.key.room

    @property
    def room_uri(self) -> str:
        """The room's SIP address, ``sip:room*service@jdomain`` (DESIGN 3.2)."""
        return self.book.sip_uri_for_jid(self.room)

    def occupant_uri(self, nick: str) -> str | None:
        """The SIP address of an occupant (DESIGN 3.2), None where the nick has no SIP form."""
        try:
            return self.book.sip_uri_for_jid(f"{self.room}/{nick}", occupant=True)
        except AddressError:
            return None

    def membership(self) -> Membership:
        """The stored form of this seat."""
        return Membership(self.key.aor, self.room, self.nick, self.password)

    @property
    def stored(self) -> bool:
        """True while a membership row exists for this seat."""
        return self.saved is not None

    def _save(self) -> list[Effect]:
        """Write the seat if its stored form changed (first join, nick, password)."""
        current = self.membership()
        if current == self.saved:
            return []
        self.saved = current
        return [SaveMembership(current)]

    @property
    def deadline(self) -> float | None:
        """The earliest time ``on_timer`` has something to do."""
        all_times = (self.join_deadline, self.announce_at, self.retry_at, self.pending_deadline)
        times = [t for t in all_times if t is not None]
        return min(times, default=None)

    # --- joining ----------------------------------------------------------------------------

    def join(self, user: SipUserState, now: float, *, silent: bool) -> list[Effect]:
        """Send the MUC join (XEP-0045 7.2.1) from the SIP user's component JID."""
        self.state = SeatState.REJOINING if silent else SeatState.JOINING
        self.silent = silent
        self.roster.clear()
        self._created = self._nick_assigned = False
        self._subject_pending = True
        self.join_deadline = now + self.config.join_timeout
        self.retry_at = None
        show, status = show_for(user)
        history = 0 if silent else self.config.history
        presence = Presence(
            sender=self.occupant_jid,
            recipient=f"{self.room}/{self.nick}",
            show=show,
            status=status,
            muc=True,
            muc_history=history,
            muc_password=self.password,
        )
        return [SendPresence(presence)]

    def detach(self) -> None:
        """The room no longer sees us (link down): keep the seat, rejoin later."""
        if self.state is not SeatState.GONE:
            self.state = SeatState.DETACHED
            self.join_deadline = self.announce_at = None
            self.roster.clear()

    def leave(self, reason: str | None) -> list[Effect]:
        """``/leave``: unavailable to the room (XEP-0045 7.14), forget the seat."""
        was = self.state
        self.state = SeatState.GONE
        effects: list[Effect] = []
        if was is not SeatState.DETACHED:
            effects.append(
                SendPresence(
                    Presence(
                        sender=self.occupant_jid,
                        recipient=f"{self.room}/{self.nick}",
                        type="unavailable",
                        status=reason,
                    )
                )
            )
        effects += self._forget()
        effects.append(Notice(self.key.aor, texts.left(self.room)))
        effects += self._fail_pending("you left the room")
        return effects

    def change_nick(self, nick: str) -> list[Effect]:
        """``/nick`` (XEP-0045 7.6): presence to the new occupant JID."""
        self.requested_nick = nick
        return [SendPresence(Presence(sender=self.occupant_jid, recipient=f"{self.room}/{nick}"))]

    def follow(self, user: SipUserState) -> list[Effect]:
        """The SIP user's presence changed: show it in the room (XEP-0045 7.7)."""
        if self.state is not SeatState.JOINED:
            return []
        show, status = show_for(user)
        presence = Presence(
            sender=self.occupant_jid,
            recipient=f"{self.room}/{self.nick}",
            show=show,
            status=status,
        )
        return [SendPresence(presence)]

    # --- talking ----------------------------------------------------------------------------

    def say(self, text: SipText, now: float) -> list[Effect]:
        """A groupchat message now, or once the join has ended (it is never dropped)."""
        if self.state is not SeatState.JOINED:
            self.pending.append(text)
            if self.pending_deadline is None:
                self.pending_deadline = now + self.config.pending_limit
            return []
        return [self._send(text.body, "groupchat", self.room, "message", html=text.html)]

    def private(self, nick: str, text: SipText) -> list[Effect]:
        """A private message to an occupant through the room (XEP-0045 7.5)."""
        return [
            self._send(
                text.body,
                "chat",
                f"{self.room}/{nick}",
                f"private message to {nick}",
                html=text.html,
            )
        ]

    def invite(self, invitee: str, address: str, reason: str | None) -> SendInvitation:
        """``/invite`` (XEP-0045 7.8.2): a mediated invitation through the room; ``address`` is
        how the user wrote the invitee, for the notice if the room refuses it."""
        msg_id = self._remember(f"{_INVITATION}{address}")
        return SendInvitation(self.occupant_jid, self.room, invitee, msg_id, reason)

    def set_topic(self, subject: str) -> list[Effect]:
        """``/topic text`` (XEP-0045 8.1): a groupchat message with only a subject."""
        return [self._send(None, "groupchat", self.room, "topic change", subject=subject)]

    def _send(
        self,
        body: str | None,
        kind: str,
        recipient: str,
        what: str,
        *,
        html: str | None = None,
        subject: str | None = None,
    ) -> SendMessage:
        msg_id = self._remember(what)
        return SendMessage(
            ChatMessage(
                sender=self.occupant_jid,
                recipient=recipient,
                body=body,
                id=msg_id,
                type=kind,
                html=html,
                subject=subject,
            )
        )

    def _remember(self, what: str) -> str:
        """A new stanza id, remembered with what it was sent for."""
        msg_id = self.new_id()
        self.sent[msg_id] = what
        if len(self.sent) > _SENT_IDS:
            self.sent.popitem(last=False)
        return msg_id

    def is_own(self, msg_id: str | None) -> bool:
        """True for the id of a stanza this seat sent (and still remembers)."""
        return msg_id is not None and msg_id in self.sent

    def on_error(self, msg_id: str, condition: str, text: str | None) -> list[Effect]:
        """The room refused something we sent (XEP-0045 7.4, 7.5, 8.1): tell the user."""
        what = self.sent.pop(msg_id, "message")
        if what.startswith(_INVITATION):
            invitee = what.removeprefix(_INVITATION)
            return [
                Notice(self.key.aor, texts.invitation_refused(self.room, invitee, condition, text))
            ]
        detail = f" ({text})" if text else ""
        if condition == "forbidden" and what == "topic change":
            why = "you may not change the topic here"
        elif condition in ("not-acceptable", "not-authorized") and what == "message":
            why = "the room does not count you as an occupant; send /join"
        elif condition == "item-not-found" and what.startswith("private"):
            why = f"{what.removeprefix('private message to ')} is not in the room"
        else:
            why = condition.replace("-", " ")
        return [Notice(self.key.aor, f"Your {what} in {self.room} failed: {why}{detail}.")]

    # --- from the room ----------------------------------------------------------------------

    def on_presence(self, p: RoomPresence, now: float) -> list[Effect]:
        """A presence from the room to this SIP user: self, another occupant, or an error."""
        nick = resource(p.sender) or ""
        if p.type == "error":
            return self._on_error(p.error_condition or "undefined-condition", p.error_text, now)
        if not nick:
            return []  # the room's own presence (ejabberd sends one, e.g. for its avatar)
        is_self = texts.SELF in p.status_codes or nick in (self.nick, self.requested_nick)
        if not is_self:
            self._track_occupant(nick, p)
            return []
        if p.type == "unavailable":
            return self._self_unavailable(nick, p)
        return self._self_available(nick, p, now)

    def _track_occupant(self, nick: str, p: RoomPresence) -> None:
        if p.type == "unavailable":
            gone = self.roster.pop(nick, None)
            if texts.NEW_NICK in p.status_codes and p.item_nick and gone is not None:
                self.roster[p.item_nick] = Occupant(
                    p.item_nick, gone.role, gone.affiliation, gone.show, gone.real_jid
                )
            return
        self.roster[nick] = Occupant(
            nick, p.role or "participant", p.affiliation or "none", p.show, p.real_jid
        )

    def _self_available(self, nick: str, p: RoomPresence, now: float) -> list[Effect]:
        effects: list[Effect] = []
        old = self.nick
        self.nick = nick
        self.roster[nick] = Occupant(
            nick, p.role or "participant", p.affiliation or "none", p.show, p.real_jid
        )
        if self.state in (SeatState.JOINING, SeatState.REJOINING):
            # XEP-0045 7.2.3: the self-presence (110) ends the join.
            joining_silently = self.state is SeatState.REJOINING
            self.state = SeatState.JOINED
            self.join_deadline = None
            self.retry_delay = self.config.rejoin_retry
            self.told_detached = False
            self._created = texts.CREATED in p.status_codes
            self._nick_assigned = texts.NICK_ASSIGNED in p.status_codes or nick != old
            if self._created:
                # XEP-0045 10.1.2: a new room stays locked until its owner accepts a config.
                effects.append(ConfigureInstantRoom(self.occupant_jid, self.room))
            effects += self._save()
            if joining_silently:
                if self._nick_assigned:
                    effects.append(Notice(self.key.aor, texts.nick_forced(self.room, nick)))
            else:
                self.announce_at = now + self.config.subject_wait
            pending, self.pending, self.pending_deadline = self.pending, [], None
            effects += [
                self._send(t.body, "groupchat", self.room, "message", html=t.html) for t in pending
            ]
            return effects
        if self.requested_nick == nick or (texts.NICK_ASSIGNED in p.status_codes and nick != old):
            effects += self._renamed(old, nick)
        return effects

    def _self_unavailable(self, nick: str, p: RoomPresence) -> list[Effect]:
        codes = p.status_codes
        if texts.NEW_NICK in codes and p.item_nick:
            # XEP-0045 7.6.3: unavailable with 303 for the old nick, then the new presence.
            self.roster.pop(nick, None)
            return self._renamed(nick, p.item_nick)
        if texts.SHUTDOWN in codes and not p.destroyed:
            # The service is going down, not throwing us out: rejoin when it is back.
            self.detach()
            return []
        if self.state is SeatState.GONE:
            return []
        self.state = SeatState.GONE
        text = texts.removed(
            self.room,
            codes,
            actor=p.actor,
            reason=p.reason,
            destroyed=p.destroyed,
            alternate_venue=p.alternate_venue,
        )
        return [
            Notice(self.key.aor, text),
            *self._forget(),
            *self._fail_pending("you are no longer in the room"),
        ]

    def _renamed(self, old: str, new: str) -> list[Effect]:
        asked = self.requested_nick == new
        self.requested_nick = None
        if new == self.nick and old == new:
            return []
        self.nick = new
        text = texts.nick_changed(self.room, new) if asked else texts.nick_forced(self.room, new)
        return [*self._save(), Notice(self.key.aor, text)]

    def _on_error(self, condition: str, text: str | None, now: float) -> list[Effect]:
        if self.state is SeatState.JOINED and self.requested_nick:
            # XEP-0045 7.6.3: the new nick was refused; the old one stays.
            wanted, self.requested_nick = self.requested_nick, None
            why = texts.join_failure(self.room, wanted, condition, text, password_given=False)
            return [
                Notice(self.key.aor, why.replace("Could not join", "Could not change your nick in"))
            ]
        if self.state not in (SeatState.JOINING, SeatState.REJOINING):
            return []
        return self._join_failed(condition, text, now)

    def _join_failed(self, condition: str, text: str | None, now: float) -> list[Effect]:
        self.join_deadline = None
        why = texts.join_failure(
            self.room, self.nick, condition, text, password_given=self.password is not None
        )
        if self.state is SeatState.REJOINING:
            why = why.replace("Could not join", "Could not rejoin", 1)
            if condition not in texts.PERMANENT_JOIN_ERRORS:
                # A passing failure: keep the seat and try again later, telling the user once.
                self.state = SeatState.DETACHED
                self.retry_at = now + self.retry_delay
                self.retry_delay = min(self.retry_delay * 2, self.config.rejoin_retry_max)
                effects: list[Effect] = []
                if not self.told_detached:
                    self.told_detached = True
                    effects.append(Notice(self.key.aor, f"{why} The gateway keeps trying."))
                return effects + self._fail_pending(why)
        self.state = SeatState.GONE
        return [Notice(self.key.aor, why), *self._forget(), *self._fail_pending(why)]

    def _forget(self) -> list[Effect]:
        if self.saved is None:
            return []
        self.saved = None
        return [DeleteMembership(self.key.aor, self.room)]

    def _fail_pending(self, why: str) -> list[Effect]:
        pending, self.pending, self.pending_deadline = self.pending, [], None
        if not pending:
            return []
        count = "1 message" if len(pending) == 1 else f"{len(pending)} messages"
        return [Notice(self.key.aor, texts.message_not_sent(self.room, f"{count} ({why})."))]

    def on_message(self, m: RoomMessage) -> list[Effect]:
        """A message from the room (or an occupant) to this SIP user."""
        nick = resource(m.sender)
        if m.type == "groupchat" and m.subject is not None:
            return self._on_subject(nick, m.subject)
        if m.type != "groupchat":
            return self._private(nick, m)
        if m.body is None or self.state is SeatState.GONE:
            return []
        own = self.is_own(m.id) or self.is_own(m.origin_id)
        if own or (nick is not None and nick == self.nick):
            # The room's reflection of our own message (XEP-0045 7.4).
            for sent_id in (m.id, m.origin_id):
                if sent_id is not None:
                    self.sent.pop(sent_id, None)
            return []
        if m.delay_stamp is not None and (self.silent or self.config.history == 0):
            return []  # history we did not ask for (a rejoin, or muc.history = 0)
        if nick is None:
            body = m.body  # the room itself speaking (status messages, XEP-0045 10.2.1)
        else:
            body = f"{nick}: {m.body}" if self.config.nick_prefix else m.body
        sip = SipText(from_uri=self.room_uri, to_uri=self.key.aor, body=body, from_display=nick)
        return [SendSip(sip, self.room)]

    def _private(self, nick: str | None, m: RoomMessage) -> list[Effect]:
        if not nick or m.body is None:
            return []
        from_uri = self.occupant_uri(nick)
        body = m.body
        if from_uri is None:
            # No SIP form for this nick: it still reaches the user, marked as private.
            from_uri, body = self.room_uri, f"(private) {nick}: {m.body}"
        sip = SipText(from_uri=from_uri, to_uri=self.key.aor, body=body, from_display=nick)
        return [SendSip(sip, self.room)]

    def _on_subject(self, nick: str | None, subject: str) -> list[Effect]:
        previous, self.subject = self.subject, subject or None
        first, self._subject_pending = self._subject_pending, False
        if self.announce_at is not None:
            # XEP-0045 7.2.15: the subject ends the join sequence; the joined notice says it.
            return self._announce()
        if first or self.state is not SeatState.JOINED or previous == self.subject:
            return []  # a rejoin's subject is no news; a repeat is none either
        return [Notice(self.key.aor, texts.topic(self.room, self.subject, by=nick or self.room))]

    def _announce(self) -> list[Effect]:
        self.announce_at = None
        text = texts.joined(
            self.room,
            self.nick,
            len(self.roster),
            self.subject,
            created=self._created,
            nick_assigned=self._nick_assigned,
        )
        return [Notice(self.key.aor, text)]

    def on_timer(self, now: float) -> list[Effect]:
        """Join timeouts and the joined notice that waited for a subject."""
        effects: list[Effect] = []
        if self.join_deadline is not None and now >= self.join_deadline:
            effects += self._join_failed("timeout", None, now)
        if self.announce_at is not None and now >= self.announce_at:
            effects += self._announce()
        if self.pending_deadline is not None and now >= self.pending_deadline:
            effects += self._fail_pending("the room could not be reached in time")
        return effects

    def retry_due(self, now: float) -> bool:
        """True when a passing rejoin failure should be tried again."""
        return (
            self.state is SeatState.DETACHED and self.retry_at is not None and now >= self.retry_at
        )
