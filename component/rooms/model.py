"""The chat-room core's values (DESIGN 6): what comes in from a room, and the effects going out.

Inbound values carry what the XMPP adapter reads from MUC stanzas (XEP-0045) beyond the general
``Presence`` and ``ChatMessage``: affiliation, role, status codes, actor, reason, the destroy
element, invitations. Outbound, joins and room messages reuse ``Presence`` and ``ChatMessage``;
what those cannot say (a mediated invitation, an instant-room configuration, a disco query) has
an effect of its own. The core returns lists of effects; a driver carries them out in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from component.values import (
    ChatMessage,
    Membership,
    Presence,
    RoomInvitation,
    RoomMessage,
    RoomPresence,
    ServiceInfo,
    ServiceKind,
    SipText,
)

__all__ = [
    "Membership",
    "RoomInvitation",
    "RoomMessage",
    "RoomPresence",
    "ServiceInfo",
    "ServiceKind",
]

# --- inbound -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SipUserState:
    """A SIP user's own presence (DESIGN 5.4) as rooms show it: ``online`` False is offline."""

    aor: str
    online: bool = True
    show: str | None = None  # away, xa, dnd, chat
    status: str | None = None


@dataclass(frozen=True, slots=True)
class SeatKey:
    """One SIP user in one room: the key of the core's tables."""

    aor: str
    room: str


# --- outbound ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendPresence:
    """Write this presence to the XMPP stream (joins, nick changes, leaving, show/status)."""

    presence: Presence


@dataclass(frozen=True, slots=True)
class SendMessage:
    """Write this message to the XMPP stream (groupchat, subject change, private message).

    The adapter also puts ``message.id`` in an XEP-0359 origin-id, so the reflection is known.
    """

    message: ChatMessage


@dataclass(frozen=True, slots=True)
class SendInvitation:
    """A XEP-0045 7.8.2 mediated invitation: ``<message to=room><x muc#user><invite to=...>``.

    ``id`` is the message's id: the room's error for it (not allowed, a bad invitee) comes back
    with it and is told to the SIP user.
    """

    sender: str
    room: str
    invitee: str
    id: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ConfigureInstantRoom:
    """Accept the default configuration of a room we just created (XEP-0045 10.1.2)."""

    sender: str
    room: str


@dataclass(frozen=True, slots=True)
class DiscoverService:
    """Ask ``domain`` for disco#info; the answer comes back as ``ServiceInfo``."""

    domain: str


@dataclass(frozen=True, slots=True)
class SendSip:
    """A MESSAGE to a SIP user (room message or private message). Per room and SIP user the
    driver sends them one at a time in the order given (DESIGN 4.2), queueing when offline."""

    text: SipText
    room: str


@dataclass(frozen=True, slots=True)
class Notice:
    """A notice to a SIP user (DESIGN 4.4); from ``sip.registrar`` unless ``from_uri`` is set
    (an invitation comes from the room's address so that replying ``/join`` joins)."""

    aor: str
    text: str
    from_uri: str | None = None
    from_display: str | None = None


@dataclass(frozen=True, slots=True)
class SaveMembership:
    """Store this seat (insert or replace)."""

    membership: Membership


@dataclass(frozen=True, slots=True)
class DeleteMembership:
    """Forget this seat: the SIP user left, was kicked, banned, or the room is gone."""

    aor: str
    room: str


@dataclass(frozen=True, slots=True)
class PassToChat:
    """Not a room after all (disco said so): relay as a one-to-one chat message (DESIGN 4.1)."""

    text: SipText


Effect = (
    SendPresence
    | SendMessage
    | SendInvitation
    | ConfigureInstantRoom
    | DiscoverService
    | SendSip
    | Notice
    | SaveMembership
    | DeleteMembership
    | PassToChat
)


def bare(jid: str) -> str:
    """The bare part of a JID: ``room@service/nick`` -> ``room@service``."""
    return jid.split("/", 1)[0]


def resource(jid: str) -> str | None:
    """The resource of a JID (a nick for an occupant), or None."""
    _, slash, rest = jid.partition("/")
    return rest if slash else None


@dataclass(frozen=True, slots=True)
class RoomsConfig:
    """The ``[muc]`` and timer settings the room core works with (DESIGN 6, 10)."""

    nick_prefix: bool = True  # muc.nick_prefix: "nick: " before each room message
    auto_join: bool = True  # muc.auto_join: a message to a room one is not in joins first
    history: int = 0  # muc.history: stanzas of history on a join the user asked for
    cache_time: float = 600.0  # timers.cache_time: how long a disco answer holds
    join_timeout: float = 30.0  # no answer from the room by then: service unreachable
    disco_timeout: float = 20.0
    subject_wait: float = 3.0  # after the self-presence, how long the subject may take
    pending_limit: float = 90.0  # timers.delay_time: how long a message waits for its room
    rejoin_retry: float = 60.0  # first retry of a rejoin that failed for a passing reason
    rejoin_retry_max: float = 900.0
    resource: str = "sip"  # DESIGN 3.1: the resource of SIP users' component JIDs
