"""One event, several listeners, connected while the gateway is built (``app.py``)."""

from __future__ import annotations

from collections.abc import Callable

from component.logs import get_logger

log = get_logger("component.runtime")


class UserOnlineSignal:
    """Implements the ``UserOnline`` port by telling every connected listener in turn.

    Two features meet here without holding each other: presence emits, messaging listens.
    """

    def __init__(self) -> None:
        self._listeners: list[Callable[[str], None]] = []

    def connect(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(aor)`` on every ``user_online``."""
        self._listeners.append(listener)

    def user_online(self, aor: str) -> None:
        """Tell each listener; one failing listener does not keep the others from hearing."""
        for listener in self._listeners:
            try:
                listener(aor)
            except Exception:
                log.exception("user_online_listener_failed", sip_uri=aor)
