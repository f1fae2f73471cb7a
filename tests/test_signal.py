"""The events presence emits to messaging and the chat rooms: every listener hears, in order."""

from __future__ import annotations

from component.runtime.signal import UserOnlineSignal, UserStateSignal


class Rooms:
    def __init__(self) -> None:
        self.heard: list[tuple[str, bool, str | None, str | None]] = []

    def user_state(self, aor: str, online: bool, show: str | None, status: str | None) -> None:
        self.heard.append((aor, online, show, status))


class Broken:
    def user_state(self, aor: str, online: bool, show: str | None, status: str | None) -> None:
        raise RuntimeError("listener bug")


def test_user_state_reaches_every_listener_past_a_failing_one() -> None:
    signal, first, last = UserStateSignal(), Rooms(), Rooms()
    for listener in (first, Broken(), last):
        signal.connect(listener)
    signal.user_state("sip:alice@sip.test", True, "away", "lunch")
    signal.user_state("sip:alice@sip.test", False, None, None)
    expected = [
        ("sip:alice@sip.test", True, "away", "lunch"),
        ("sip:alice@sip.test", False, None, None),
    ]
    assert first.heard == expected
    assert last.heard == expected


def test_user_online_reaches_every_listener_past_a_failing_one() -> None:
    signal, heard = UserOnlineSignal(), list[str]()

    def broken(aor: str) -> None:
        raise RuntimeError("listener bug")

    signal.connect(heard.append)
    signal.connect(broken)
    signal.connect(lambda aor: heard.append(aor.upper()))
    signal.user_online("sip:bob@sip.test")
    assert heard == ["sip:bob@sip.test", "SIP:BOB@SIP.TEST"]
