"""The ports the features talk to the outside through: one for the SIP side, one for XMPP.

Every feature (messaging, presence, rooms, transports, admin) uses these two Protocols and the
store port (``component.store.port``); the adapters in ``component.sip`` and ``component.xmpp``
implement them. Only our frozen values (``component.values``) cross them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from component.errors import Refusal
from component.values import ChatMessage, Presence, SipText

#: Seconds since the epoch; the features take it as a constructor argument, tests pass a fake.
Clock = Callable[[], float]


class XmppPort(Protocol):
    """What the features need of the XMPP link."""

    @property
    def connected(self) -> bool:
        """True while the component stream is up."""
        ...

    def send_message(self, msg: ChatMessage) -> bool:
        """Write a message to the stream; False when the link is down."""
        ...

    def send_presence(self, presence: Presence) -> bool:
        """Write a presence stanza; False when the link is down."""
        ...

    def refuse(self, stanza: ChatMessage | Presence, refusal: Refusal) -> bool:
        """Answer ``stanza`` (one we received) with the error ``refusal`` stands for; False when
        the link is down."""
        ...


class SipPort(Protocol):
    """What the features need of the SIP side."""

    async def send_text(
        self, *, from_uri: str, to_uri: str, body: str, from_display: str | None = None
    ) -> int:
        """Send a MESSAGE; the final status (408 for a timeout, 503 for a transport failure)."""
        ...


class UserOnline(Protocol):
    """Told when a SIP user comes online (DESIGN 5.4), so what waits for them goes at once."""

    def user_online(self, aor: str) -> None:
        """``aor`` is online now; the listener starts its own (owned) work."""
        ...


class RegistrarCommands(Protocol):
    """Commands SIP users send as MESSAGE to ``sip.registrar`` (DESIGN 5.4: online, away...)."""

    async def command(self, msg: SipText) -> str | None:
        """The notice text to answer with, or None when ``msg`` is no command."""
        ...
