"""The ports the features talk to the outside through: one for the SIP side, one for XMPP.

Every feature (messaging, presence, rooms, transports, admin) uses these two Protocols and the
store port (``component.store.port``); the adapters in ``component.sip`` and ``component.xmpp``
implement them. Only our frozen values (``component.values``) cross them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from component.errors import Refusal
from component.values import (
    ChatMessage,
    ImdnAsk,
    ImdnStatus,
    Presence,
    PresenceServerNews,
    Registration,
    RoomInvitation,
    RoomMessage,
    RoomPresence,
    SipSubscription,
    SipText,
    SipUserPublished,
    SipUserUnpublished,
    StanzaError,
    SubscribeOutcome,
    Watch,
    WatchAnswer,
    WatchRequest,
)
from sipside.pidf import PresenceDocument

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


class MessageSender(Protocol):
    """The MESSAGEs of the SIP side (DESIGN 4, 4.3): what ``SipPort`` offers for chat, and all
    the SIP adapter's sender does."""

    async def send_text(
        self,
        *,
        from_uri: str,
        to_uri: str,
        body: str,
        from_display: str | None = None,
        imdn: ImdnAsk | None = None,
        sent_at: float | None = None,
    ) -> int:
        """Send a MESSAGE; the final status (408 for a timeout, 503 for a transport failure).

        ``imdn`` asks the recipient for notifications, ``sent_at`` says when it was written
        (DESIGN 4.3); a recipient that takes neither gets the plain text."""
        ...

    def start_text(
        self, *, from_uri: str, to_uri: str, body: str, done: Callable[[int], None]
    ) -> bool:
        """``send_text`` of plain text without a task: the MESSAGE goes now and ``done`` gets
        its final status later, never before this returns; False when it cannot go this way
        (then ``send_text`` does it)."""
        ...

    async def send_composing(
        self, *, from_uri: str, to_uri: str, active: bool, refresh: int | None
    ) -> int:
        """Tell ``to_uri`` that ``from_uri`` is typing (for ``refresh`` s) or stopped (RFC 3994);
        the final status, 415 when the recipient takes no typing notifications."""
        ...

    async def send_notification(
        self, *, from_uri: str, to_uri: str, message_id: str, sent_at: float, status: ImdnStatus
    ) -> int:
        """An RFC 5438 notification about ``message_id`` to its sender ``to_uri``."""
        ...


class SipPort(MessageSender, Protocol):
    """What the features need of the SIP side: MESSAGEs (DESIGN 4), and presence's dialogs as
    values (DESIGN 5). Watches (5.2) are addressed by who watches whom, every dialog of the
    pair at once; subscriptions at the SIP presence server (5.3) by the XMPP watcher and the
    SIP user."""

    async def notify_watch(self, watch: Watch, document: PresenceDocument, now: float) -> None:
        """The watched entity's presence changed: NOTIFY it in every dialog of ``watch``."""
        ...

    async def activate_watch(self, watch: Watch, document: PresenceDocument, now: float) -> None:
        """The XMPP user approved: NOTIFY active with ``document`` in every dialog of ``watch``."""
        ...

    async def end_watch(self, watch: Watch, reason: str, now: float, *, pending_only: bool) -> None:
        """NOTIFY terminated;reason=``reason`` in the dialogs of ``watch`` (only pending ones)."""
        ...

    def active_watches(self) -> list[Watch]:
        """Each pair with at least one active dialog."""
        ...

    async def subscribe(self, sub: SipSubscription, now: float) -> SubscribeOutcome:
        """SUBSCRIBE at the SIP presence server, unless a live subscription already exists."""
        ...

    async def unsubscribe(self, watcher_jid: str, sip_aor: str, now: float) -> None:
        """End the subscription of ``watcher_jid`` to ``sip_aor`` (SUBSCRIBE Expires: 0)."""
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


class PresenceEvents(Protocol):
    """What the SIP side tells presence (DESIGN 5), and the little it asks."""

    async def watch_requested(self, request: WatchRequest) -> WatchAnswer:
        """A new watch: who is who and its state; raises ``Refusal`` to refuse it."""
        ...

    async def watch_started(self, answer: WatchAnswer, now: float) -> None:
        """The watch of ``answer`` was accepted (not a mere fetch)."""
        ...

    async def watch_ended(self, watch: Watch, now: float) -> None:
        """The last dialog of ``watch`` ended by the watcher or by expiry."""
        ...

    async def document_of(self, target_jid: str) -> PresenceDocument:
        """The XMPP entity's current presence, as watchers are notified of it."""
        ...

    async def presence_server_said(self, news: PresenceServerNews, now: float) -> None:
        """The SIP presence server's word on a subscription we hold."""
        ...

    def home_user(self, uri: str) -> str:
        """The AOR of the home-domain user ``uri`` names (PUBLISH, REGISTER); else ``Refusal``."""
        ...

    async def published(self, news: SipUserPublished | SipUserUnpublished, now: float) -> None:
        """A SIP user's published state changed."""
        ...

    async def registered(self, registration: Registration, now: float) -> None:
        """A third-party REGISTER of a home-domain user, already answered."""
        ...


class UserStateListener(Protocol):
    """Told of every change of a SIP user's own presence (DESIGN 5.4), so chat rooms show it."""

    def user_state(self, aor: str, online: bool, show: str | None, status: str | None) -> None:
        """``aor`` now looks like this; the listener starts its own (owned) work."""
        ...


class RoomStanzas(Protocol):
    """Where the XMPP adapter hands chat-room stanzas (DESIGN 6): those of rooms that SIP users
    are in (``claims``), and invitations for SIP users."""

    def claims(self, sender: str, recipient: str) -> bool:
        """True when a stanza from ``sender`` to ``recipient`` belongs to a SIP user's seat."""
        ...

    def on_room_presence(self, presence: RoomPresence) -> None:
        """A presence (or presence error) from a room occupant."""
        ...

    def on_room_message(self, message: RoomMessage) -> None:
        """A groupchat or private message from a room or an occupant."""
        ...

    def on_room_error(self, error: StanzaError) -> None:
        """An error for a message a SIP user sent to a room or an occupant."""
        ...

    def on_invitation(self, invitation: RoomInvitation) -> None:
        """An invitation for a SIP user (XEP-0249 or XEP-0045 7.8.2)."""
        ...

    def on_unclaimed(self, stanza: RoomPresence | RoomMessage) -> bool:
        """A room's stanza by its form (a MUC presence, a groupchat) for a SIP user no seat
        here is known for: True when taken (passed on to wherever the seat may be), False to
        treat it as no room's."""
        ...


class RoomTexts(Protocol):
    """What messaging asks the chat rooms about a SIP MESSAGE to a jdomain address (DESIGN 6)."""

    def take_text(self, msg: SipText) -> bool | None:
        """True: a room matter, taken (answer 202); False: one-to-one chat; None: unknown until
        service discovery answers (await ``settle_text``). May raise ``Refusal``."""
        ...

    def waiting(self, msg: SipText) -> bool:
        """True when ``take_text`` returned None for ``msg`` and it is not settled yet."""
        ...

    async def settle_text(self, msg: SipText) -> bool:
        """For a waiting ``msg``: True when the rooms took it, False when it is chat after all."""
        ...


class Part(enum.StrEnum):
    """A part of the gateway whose state the health endpoint reports (DESIGN 9)."""

    DATABASE = "database"
    XMPP = "xmpp"
    SIP = "sip"


class HealthReport(Protocol):
    """Where adapters and features report a part going down or coming back up."""

    def report(self, part: Part, up: bool, detail: str = "") -> None:
        """``part`` is up (True) or down (False); ``detail`` says why, for the log."""
        ...


class Way(enum.StrEnum):
    """Which way a chat message goes across the gateway (a metrics label)."""

    TO_XMPP = "sip_to_xmpp"
    TO_SIP = "xmpp_to_sip"


class Outcome(enum.StrEnum):
    """What became of a chat message (a metrics label): each message ends counted once as
    delivered, failed or refused; queued counts it entering the retry queue on the way."""

    DELIVERED = "delivered"
    QUEUED = "queued"
    FAILED = "failed"
    REFUSED = "refused"


class Metrics(Protocol):
    """Where the pieces count what happens (DESIGN 9); gauges are read at scrape time instead."""

    def message(self, way: Way, outcome: Outcome) -> None:
        """One chat message went ``way`` with ``outcome``."""
        ...

    def xmpp_error(self, condition: str) -> None:
        """One XMPP error stanza was sent, with this RFC 6120 condition."""
        ...

    def link(self, up: bool, now: float) -> None:
        """The XMPP component link came up or went down at ``now``."""
        ...


class NoMetrics:
    """A ``Metrics`` that counts nothing (tests and tools that build pieces alone)."""

    def message(self, way: Way, outcome: Outcome) -> None:
        """Nothing is counted."""

    def xmpp_error(self, condition: str) -> None:
        """Nothing is counted."""

    def link(self, up: bool, now: float) -> None:
        """Nothing is recorded."""


NO_METRICS: Metrics = NoMetrics()
