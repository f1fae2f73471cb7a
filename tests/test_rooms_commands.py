"""Room command parsing and the wording of room notices, table-driven."""

from __future__ import annotations

import pytest

from component.rooms import texts
from component.rooms.commands import (
    BadCommand,
    ChangeNick,
    Help,
    Invite,
    Join,
    Leave,
    RoomCommand,
    Say,
    Topic,
    Who,
    parse_room_text,
)


@pytest.mark.parametrize(
    ("body", "command"),
    [
        ("hello", Say("hello")),
        ("  hello  ", Say("  hello  ")),
        ("/me waves", Say("/me waves")),
        ("/ME", Say("/ME")),
        ("//join is a command", Say("/join is a command")),
        ("/join", Join()),
        ("/join nick", Join("nick")),
        ("/join nick secret", Join("nick", "secret")),
        ("/JOIN nick secret", Join("nick", "secret")),
        ("/join a b c", BadCommand("Use /join [nick] [password].")),
        ("/leave", Leave()),
        ("/exit", Leave()),
        ("/part", Leave()),
        ("/part gone fishing", Leave("gone fishing")),
        ("/nick new one", ChangeNick("new one")),
        ("/nick", BadCommand("Use /nick NEWNICK.")),
        ("/topic", Topic()),
        ("/topic Lunch at noon", Topic("Lunch at noon")),
        ("/who", Who()),
        ("/help", Help()),
        ("/invite sip:bob@sip.test", Invite("sip:bob@sip.test")),
        ("/invite carol@xmpp.test come  along", Invite("carol@xmpp.test", "come  along")),
        ("/dance", BadCommand("Unknown command /dance. Send /help for the list.")),
    ],
)
def test_parse_room_text(body: str, command: RoomCommand) -> None:
    assert parse_room_text(body) == command


def test_invite_without_address_is_explained() -> None:
    parsed = parse_room_text("/invite")
    assert isinstance(parsed, BadCommand) and "/invite ADDRESS" in parsed.text


@pytest.mark.parametrize(
    ("codes", "kw", "text"),
    [
        ((307,), {}, "You were kicked from r@s."),
        ((307,), {"actor": "mod", "reason": "rude"}, "You were kicked from r@s by mod: rude"),
        ((301,), {}, "You were banned from r@s."),
        ((301, 307), {}, "You were banned from r@s."),
        ((321,), {}, "You were removed from r@s: your membership was taken away."),
        ((322,), {}, "You were removed from r@s: it is now members-only."),
        ((332,), {}, "You were removed from r@s: the chat service is shutting down."),
        ((), {}, "You are no longer in r@s."),
        ((), {"destroyed": True}, "The room r@s was destroyed."),
    ],
)
def test_removal_texts(codes: tuple[int, ...], kw: dict, text: str) -> None:  # type: ignore[type-arg]
    assert texts.removed("r@s", codes, **kw) == text


@pytest.mark.parametrize(
    ("occupants", "text"),
    [
        (1, "You joined r@s as me. No one else is here. Send /help for commands."),
        (2, "You joined r@s as me. 2 occupants, you included. Send /help for commands."),
    ],
)
def test_joined_text(occupants: int, text: str) -> None:
    assert texts.joined("r@s", "me", occupants, None) == text


def test_every_permanent_join_error_has_its_own_words() -> None:
    for condition in texts.PERMANENT_JOIN_ERRORS:
        text = texts.join_failure("r@s", "me", condition, None, password_given=False)
        assert condition.replace("-", " ") not in text or condition == "conflict", condition
