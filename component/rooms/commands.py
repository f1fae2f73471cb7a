"""What a SIP user's MESSAGE to a room address asks for (DESIGN 6): a command or words to say.

``parse_room_text`` turns the body into one value. ``/me`` is not a command: it is the IRC-style
action that XMPP clients show as such (XEP-0245), so it goes to the room as it is, and ``//``
at the start sends a text that begins with ``/`` (the second slash is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

HELP_TEXT = (
    "Room commands (send them to the room's address): "
    "/join [nick] [password] joins; "
    "/leave (or /exit, /part) [reason] leaves; "
    "/nick NEW changes your nick; "
    "/topic [TEXT] shows or sets the topic; "
    "/who lists the occupants; "
    "/invite ADDRESS [reason] invites a SIP or XMPP user; "
    "/help shows this. Anything else is said in the room; "
    "write to nick*room*service for a private message."
)


@dataclass(frozen=True, slots=True)
class Say:
    """Words for the room (a groupchat message)."""

    body: str


@dataclass(frozen=True, slots=True)
class Join:
    """``/join [nick] [password]``."""

    nick: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    """``/leave``, ``/exit`` or ``/part``, with an optional reason for the room."""

    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ChangeNick:
    """``/nick new``."""

    nick: str


@dataclass(frozen=True, slots=True)
class Topic:
    """``/topic text`` sets the subject; ``/topic`` alone shows it."""

    text: str | None = None


@dataclass(frozen=True, slots=True)
class Who:
    """``/who``: the occupants and their roles."""


@dataclass(frozen=True, slots=True)
class Help:
    """``/help``."""


@dataclass(frozen=True, slots=True)
class Invite:
    """``/invite <sip uri or jid> [reason]``."""

    address: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A command we know used wrongly, or one we don't know; ``text`` says which."""

    text: str


RoomCommand = Say | Join | Leave | ChangeNick | Topic | Who | Help | Invite | BadCommand

_LEAVE = frozenset({"leave", "exit", "part", "quit"})


def parse_room_text(body: str) -> RoomCommand:
    """The command in a MESSAGE body sent to a room address, or ``Say`` for anything else."""
    text = body.strip()
    if text.startswith("//"):
        return Say(body.lstrip()[1:])
    if not text.startswith("/") or text.lower().startswith("/me ") or text.lower() == "/me":
        return Say(body)
    name, _, rest = text[1:].partition(" ")
    name = name.lower()
    rest = rest.strip()
    args = rest.split()
    if name in _LEAVE:
        return Leave(rest or None)
    match name:
        case "join":
            if len(args) > 2:
                return BadCommand("Use /join [nick] [password].")
            return Join(nick=args[0] if args else None, password=args[1] if len(args) > 1 else None)
        case "nick":
            if not rest:
                return BadCommand("Use /nick NEWNICK.")
            return ChangeNick(rest)
        case "topic" | "subject":
            return Topic(rest or None)
        case "who" | "names" | "list":
            return Who()
        case "help" | "?":
            return Help()
        case "invite":
            if not args:
                return BadCommand("Use /invite ADDRESS [reason], e.g. /invite sip:bob@example.org.")
            reason = rest[len(args[0]) :].strip()
            return Invite(args[0], reason or None)
        case _:
            return BadCommand(f"Unknown command /{name}. Send /help for the list.")
