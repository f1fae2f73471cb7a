"""Events with several listeners, connected while the gateway is built (``app.py``).

Two features meet here without holding each other: presence emits, messaging and the chat
rooms listen. One failing listener does not keep the others from hearing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from component.logs import get_logger
from component.ports import UserStateListener

log = get_logger("component.runtime")


def _tell_each(calls: Iterable[Callable[[], None]], event: str, aor: str) -> None:
    for call in calls:
        try:
            call()
        except Exception:
            log.exception(event, sip_uri=aor)


class UserOnlineSignal:
    """Implements the ``UserOnline`` port by telling every connected listener in turn."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[str], None]] = []

    def connect(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(aor)`` on every ``user_online``."""
        self._listeners.append(listener)

    def user_online(self, aor: str) -> None:
        """Tell each listener that ``aor`` came online."""
        calls = (partial(listener, aor) for listener in self._listeners)
        _tell_each(calls, "user_online_listener_failed", aor)


class UserStateSignal:
    """Implements the ``UserStateListener`` port by telling every connected listener in turn."""

    def __init__(self) -> None:
        self._listeners: list[UserStateListener] = []

    def connect(self, listener: UserStateListener) -> None:
        """Tell ``listener`` of every ``user_state``."""
        self._listeners.append(listener)

    def user_state(self, aor: str, online: bool, show: str | None, status: str | None) -> None:
        """Tell each listener what ``aor`` now looks like."""
        calls = (partial(x.user_state, aor, online, show, status) for x in self._listeners)
        _tell_each(calls, "user_state_listener_failed", aor)
