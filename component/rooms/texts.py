"""The words of the room notices (DESIGN 4.4, 6): short, human, naming the room concerned.

Pure functions from what happened to a sentence. The conditions are XEP-0045's error
conditions for a join (7.2.6 - 7.2.10) and RFC 6120's for an unreachable service; the status
codes are XEP-0045's registry (15.6.2).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# XEP-0045 15.6.2 status codes the core acts on.
SELF = 110  # this presence is about you
CREATED = 201  # a new room was created
NICK_ASSIGNED = 210  # the service assigned or changed your nick
NEW_NICK = 303  # nick change (unavailable with the new nick in <item nick>)
BANNED = 301
KICKED = 307
AFFILIATION_LOST = 321  # removed: affiliation changed
MEMBERS_ONLY_NOW = 322  # removed: the room became members-only
SHUTDOWN = 332  # removed: the service is shutting down

#: Join errors the user can do nothing about by retrying now, so a stored seat is dropped.
PERMANENT_JOIN_ERRORS = frozenset(
    {
        "forbidden",
        "registration-required",
        "not-authorized",
        "item-not-found",
        "not-allowed",
        "jid-malformed",
        "not-acceptable",
        "conflict",
    }
)


@dataclass(frozen=True, slots=True)
class Occupant:
    """One occupant as the room last showed it to a SIP user."""

    nick: str
    role: str = "participant"
    affiliation: str = "none"
    show: str | None = None
    real_jid: str | None = None


def join_failure(
    room: str, nick: str, condition: str, text: str | None, *, password_given: bool
) -> str:
    """Why a join was refused, in words (XEP-0045 7.2.6 - 7.2.10, 7.2.13)."""
    match condition:
        case "conflict":
            why = f"the nick {nick!r} is already in use there; try /join with another nick"
        case "registration-required":
            why = "it is members-only and you are not a member"
        case "forbidden":
            why = "you are banned from it"
        case "not-authorized":
            why = (
                "the password is wrong"
                if password_given
                else "it needs a password; send /join NICK PASSWORD"
            )
        case "item-not-found" | "not-allowed" | "gone":
            why = "it does not exist and cannot be created"
        case "service-unavailable":
            why = "it is full (or the service refused new occupants)"
        case "not-acceptable" | "jid-malformed":
            why = f"the nick {nick!r} is not accepted there (it may need your registered nick)"
        case "remote-server-not-found" | "remote-server-timeout" | "timeout":
            why = "its service is unreachable"
        case _:
            why = condition.replace("-", " ")
    detail = f" ({text})" if text else ""
    return f"Could not join {room}: {why}{detail}."


def joined(
    room: str,
    nick: str,
    occupants: int,
    subject: str | None,
    *,
    created: bool = False,
    nick_assigned: bool = False,
) -> str:
    """The join worked: nick, occupant count (yourself included) and the topic."""
    if created:
        first = f"You created the room {room} and joined it as {nick}."
    elif nick_assigned:
        first = f"You joined {room}; the room gave you the nick {nick}."
    else:
        first = f"You joined {room} as {nick}."
    people = "No one else is here" if occupants <= 1 else f"{occupants} occupants, you included"
    topic = f" Topic: {subject}" if subject else ""
    return f"{first} {people}.{topic} Send /help for commands."


def removed(
    room: str,
    codes: Iterable[int],
    *,
    actor: str | None = None,
    reason: str | None = None,
    destroyed: bool = False,
    alternate_venue: str | None = None,
) -> str:
    """Why the room let a SIP user go: kick, ban, membership, destruction, shutdown."""
    code_set = set(codes)
    by = f" by {actor}" if actor else ""
    because = f": {reason}" if reason else "."
    if destroyed:
        venue = f" It moved to {alternate_venue}." if alternate_venue else ""
        because = f": {reason}." if reason else "."
        return f"The room {room} was destroyed{because}{venue}"
    if BANNED in code_set:
        return f"You were banned from {room}{by}{because}"
    if KICKED in code_set:
        return f"You were kicked from {room}{by}{because}"
    if AFFILIATION_LOST in code_set:
        return f"You were removed from {room}: your membership was taken away."
    if MEMBERS_ONLY_NOW in code_set:
        return f"You were removed from {room}: it is now members-only."
    if SHUTDOWN in code_set:
        return f"You were removed from {room}: the chat service is shutting down."
    return f"You are no longer in {room}{because}"


def nick_forced(room: str, nick: str) -> str:
    """The service changed a SIP user's nick (status 210, or a 303 we did not ask for)."""
    return f"The room {room} changed your nick to {nick}."


def nick_changed(room: str, nick: str) -> str:
    """A ``/nick`` worked."""
    return f"You are now {nick} in {room}."


def left(room: str) -> str:
    """A ``/leave`` worked."""
    return f"You left {room}."


def topic(room: str, subject: str | None, by: str | None = None) -> str:
    """The subject of a room, shown on ``/topic`` or when it changes (XEP-0045 8.1)."""
    if by:
        return (
            f"{by} set the topic of {room}: {subject}"
            if subject
            else f"{by} cleared the topic of {room}."
        )
    return f"Topic of {room}: {subject}" if subject else f"{room} has no topic."


def who(room: str, occupants: Iterable[Occupant]) -> str:
    """The occupant list, moderators first, with roles (and away/busy where shown)."""
    order = {"moderator": 0, "participant": 1, "visitor": 2}
    listed = sorted(occupants, key=lambda o: (order.get(o.role, 3), o.nick.casefold()))
    parts = []
    for occ in listed:
        extra = [occ.role] if occ.role != "participant" else []
        if occ.affiliation in ("owner", "admin"):
            extra.append(occ.affiliation)
        if occ.show in ("away", "xa", "dnd"):
            extra.append({"away": "away", "xa": "away", "dnd": "busy"}[occ.show])
        parts.append(f"{occ.nick} ({', '.join(extra)})" if extra else occ.nick)
    return f"In {room} ({len(parts)}): {', '.join(parts)}."


def invitation(
    room: str, inviter: str, reason: str | None, password: str | None, room_uri: str
) -> str:
    """An XMPP user invites a SIP user (XEP-0249 or XEP-0045 7.8.2)."""
    why = f' ("{reason}")' if reason else ""
    how = f"/join NICK {password}" if password else "/join"
    return (
        f"{inviter} invites you to the room {room}{why}. "
        f"To join, reply {how} (this message comes from the room's address {room_uri})."
    )


def invitation_refused(room: str, invitee: str, condition: str, text: str | None) -> str:
    """The room (or its service) refused a SIP user's ``/invite`` (XEP-0045 7.8.2)."""
    match condition:
        case "forbidden" | "not-allowed" | "not-authorized":
            why = "the room does not let you invite (it may allow only moderators or members)"
        case "jid-malformed" | "item-not-found" | "bad-request":
            why = f"{invitee} is not a valid address there"
        case "remote-server-not-found" | "remote-server-timeout" | "service-unavailable":
            why = f"{invitee} could not be reached"
        case _:
            why = condition.replace("-", " ")
    detail = f" ({text})" if text else ""
    return f"Your invitation of {invitee} to {room} was refused: {why}{detail}."


def not_member(room: str) -> str:
    """A room message or command that needs a seat, from someone without one."""
    return f"You are not in {room}. Send /join to join it."


def message_not_sent(room: str, why: str) -> str:
    """A message that waited for a join which failed, or that the room refused."""
    return f"Your message to {room} was not sent: {why}"


def not_a_room_service(domain: str) -> str:
    """Disco said ``domain`` hosts no chat rooms (DESIGN 3.2)."""
    return f"{domain} is not a chat room service."


def transport_down(domain: str, rooms: list[str]) -> str:
    """A transport hosting the user's rooms stopped answering (DESIGN 9)."""
    return (
        f"The transport {domain} is down: you are out of {', '.join(sorted(rooms))} until it is "
        "back, then the gateway rejoins you."
    )


def transport_up(domain: str, rooms: list[str]) -> str:
    """A transport is back; the user's rooms on it are being rejoined (DESIGN 9)."""
    return f"The transport {domain} is back up: rejoining {', '.join(sorted(rooms))}."
