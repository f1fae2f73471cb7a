"""The gateway's own values: what the adapters hand to the core and the core asks them to send.

Stanzas stop at the XMPP adapter and SIP messages at the SIP adapter; in between, only these
frozen dataclasses travel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sipside.fastpath import fast_frozen_init
from sipside.pidf import PresenceDocument

# --- XMPP side -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
class ChatMessage:
    """A ``<message>`` in either direction. JIDs are strings already validated by the adapter
    (inbound) or built by the address book (outbound)."""

    sender: str
    recipient: str
    body: str | None
    id: str | None = None
    type: str = "chat"  # chat, normal, groupchat, headline, error
    thread: str | None = None
    subject: str | None = None
    html: str | None = None  # XHTML-IM body (XEP-0071), inner XML
    chat_state: str | None = None  # XEP-0085: active, composing, paused, inactive, gone
    receipt_request: bool = False  # XEP-0184 <request/>
    receipt_for: str | None = None  # XEP-0184 <received id=.../>
    delay_stamp: str | None = None  # XEP-0203 stamp (ISO 8601) for stored messages
    delay_from: str | None = None
    origin_id: str | None = None  # XEP-0359, kept by a room when it reflects a message
    markable: bool = False  # XEP-0333 <markable/>
    displayed_for: str | None = None  # XEP-0333 <displayed id=.../>
    replaces: str | None = None  # XEP-0308 <replace id=.../>: corrects that message
    link: str | None = None  # XEP-0066 <x xmlns="jabber:x:oob"><url> (XEP-0363 uploads)

    # Written out (not generated) so that compiled it is native: see fast_frozen_init.
    def __init__(
        self,
        sender: str,
        recipient: str,
        body: str | None,
        id: str | None = None,
        type: str = "chat",
        thread: str | None = None,
        subject: str | None = None,
        html: str | None = None,
        chat_state: str | None = None,
        receipt_request: bool = False,
        receipt_for: str | None = None,
        delay_stamp: str | None = None,
        delay_from: str | None = None,
        origin_id: str | None = None,
        markable: bool = False,
        displayed_for: str | None = None,
        replaces: str | None = None,
        link: str | None = None,
    ) -> None:
        self.sender = sender  # type: ignore[misc]
        self.recipient = recipient  # type: ignore[misc]
        self.body = body  # type: ignore[misc]
        self.id = id  # type: ignore[misc]
        self.type = type  # type: ignore[misc]
        self.thread = thread  # type: ignore[misc]
        self.subject = subject  # type: ignore[misc]
        self.html = html  # type: ignore[misc]
        self.chat_state = chat_state  # type: ignore[misc]
        self.receipt_request = receipt_request  # type: ignore[misc]
        self.receipt_for = receipt_for  # type: ignore[misc]
        self.delay_stamp = delay_stamp  # type: ignore[misc]
        self.delay_from = delay_from  # type: ignore[misc]
        self.origin_id = origin_id  # type: ignore[misc]
        self.markable = markable  # type: ignore[misc]
        self.displayed_for = displayed_for  # type: ignore[misc]
        self.replaces = replaces  # type: ignore[misc]
        self.link = link  # type: ignore[misc]


fast_frozen_init(ChatMessage)  # built per message: the plain frozen __init__ is slow


@dataclass(frozen=True, slots=True)
class StanzaError:
    """An XMPP error (RFC 6120 8.3) that came in for, or goes out about, a stanza."""

    sender: str
    recipient: str
    id: str | None
    condition: str  # e.g. item-not-found, recipient-unavailable
    type: str = "cancel"  # cancel, wait, modify, auth
    text: str | None = None
    kind: str = "message"  # message, presence, iq


@dataclass(frozen=True, slots=True, init=False)
class Presence:
    """A ``<presence>`` in either direction (RFC 6121). ``type`` None means available."""

    sender: str
    recipient: str
    type: str | None = None  # None, unavailable, subscribe, subscribed, unsubscribe,
    # unsubscribed, probe, error
    show: str | None = None  # chat, away, xa, dnd
    status: str | None = None
    priority: int = 0
    id: str | None = None
    muc: bool = False  # carries the MUC join element (XEP-0045)
    muc_history: int | None = None
    muc_password: str | None = None
    muc_status_codes: tuple[int, ...] = ()
    muc_nick: str | None = None
    error_condition: str | None = None

    # Written out (not generated) so that compiled it is native: one per stanza received.
    def __init__(
        self,
        sender: str,
        recipient: str,
        type: str | None = None,
        show: str | None = None,
        status: str | None = None,
        priority: int = 0,
        id: str | None = None,
        muc: bool = False,
        muc_history: int | None = None,
        muc_password: str | None = None,
        muc_status_codes: tuple[int, ...] = (),
        muc_nick: str | None = None,
        error_condition: str | None = None,
    ) -> None:
        self.sender = sender  # type: ignore[misc]
        self.recipient = recipient  # type: ignore[misc]
        self.type = type  # type: ignore[misc]
        self.show = show  # type: ignore[misc]
        self.status = status  # type: ignore[misc]
        self.priority = priority  # type: ignore[misc]
        self.id = id  # type: ignore[misc]
        self.muc = muc  # type: ignore[misc]
        self.muc_history = muc_history  # type: ignore[misc]
        self.muc_password = muc_password  # type: ignore[misc]
        self.muc_status_codes = muc_status_codes  # type: ignore[misc]
        self.muc_nick = muc_nick  # type: ignore[misc]
        self.error_condition = error_condition  # type: ignore[misc]


fast_frozen_init(Presence)


# --- chat rooms (DESIGN 6) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoomPresence:
    """A ``<presence>`` from ``room@service/nick`` (XEP-0045 7.2, 7.6, 9, 10.9) or its error.

    ``type`` None is available, ``"unavailable"`` a departure, ``"error"`` a refused join or
    nick change (``error_condition``, ``error_text``). ``item_nick`` is the new nick of a 303.
    """

    sender: str  # room@service/nick
    recipient: str  # the SIP user's component JID with resource
    type: str | None = None
    show: str | None = None
    status: str | None = None
    status_codes: tuple[int, ...] = ()
    affiliation: str | None = None  # owner, admin, member, outcast, none
    role: str | None = None  # moderator, participant, visitor, none
    real_jid: str | None = None  # <item jid=...> in non-anonymous rooms
    item_nick: str | None = None
    actor: str | None = None  # nick or JID of whoever kicked or banned
    reason: str | None = None
    destroyed: bool = False  # <destroy/> inside the muc#user element (XEP-0045 10.9)
    alternate_venue: str | None = None
    error_condition: str | None = None
    error_text: str | None = None


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """A ``<message>`` from a room or one of its occupants addressed to a SIP user.

    Groupchat (room messages, subject changes, status messages from the room itself) or chat
    (private message through the room). ``origin_id`` is XEP-0359, which a room keeps when it
    reflects a message to its sender; ``delay_stamp`` marks history (XEP-0203).
    """

    sender: str  # room@service/nick, or room@service for the room itself
    recipient: str
    body: str | None
    type: str = "groupchat"
    subject: str | None = None
    id: str | None = None
    origin_id: str | None = None
    delay_stamp: str | None = None
    status_codes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class RoomInvitation:
    """An invitation to a room: XEP-0249 (direct, from the inviter) or XEP-0045 7.8.2
    (mediated, from the room, naming the inviter in ``<invite from=...>``)."""

    room: str
    inviter: str
    invitee: str  # the SIP user's component JID
    reason: str | None = None
    password: str | None = None
    mediated: bool = False


class ServiceKind(enum.Enum):
    """What service discovery said about a domain (XEP-0030 disco#info)."""

    MUC = "muc"  # identity conference/text or feature http://jabber.org/protocol/muc
    OTHER = "other"  # answered, but no chat-room service
    UNREACHABLE = "unreachable"  # remote-server-not-found, timeout...


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """The answer to a ``DiscoverService``; the core caches it for ``cache_time``."""

    domain: str
    kind: ServiceKind
    detail: str | None = None  # the error condition when unreachable


@dataclass(frozen=True, slots=True)
class Membership:
    """A SIP user's seat in a room, as stored to rejoin after a restart (DESIGN 6); the
    password too, since a password room cannot be rejoined without it."""

    aor: str
    room: str
    nick: str
    password: str | None = None


# --- SIP side ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False)
class SipText:
    """An instant message on the SIP side (RFC 3428 MESSAGE), body already decoded to text."""

    from_uri: str
    to_uri: str
    body: str
    content_type: str = "text/plain"
    call_id: str | None = None
    from_display: str | None = None
    html: str | None = None
    composing: Composing | None = None  # an RFC 3994 isComposing body instead of text
    imdn: ImdnAsk | None = None  # the CPIM wrapper asked for notifications (RFC 5438)
    notification: ImdnNews | None = None  # an RFC 5438 notification instead of text
    sent_at: float | None = None  # CPIM DateTime, seconds since the epoch

    # Written out (not generated) so that compiled it is native: see fast_frozen_init.
    def __init__(
        self,
        from_uri: str,
        to_uri: str,
        body: str,
        content_type: str = "text/plain",
        call_id: str | None = None,
        from_display: str | None = None,
        html: str | None = None,
        composing: Composing | None = None,
        imdn: ImdnAsk | None = None,
        notification: ImdnNews | None = None,
        sent_at: float | None = None,
    ) -> None:
        self.from_uri = from_uri  # type: ignore[misc]
        self.to_uri = to_uri  # type: ignore[misc]
        self.body = body  # type: ignore[misc]
        self.content_type = content_type  # type: ignore[misc]
        self.call_id = call_id  # type: ignore[misc]
        self.from_display = from_display  # type: ignore[misc]
        self.html = html  # type: ignore[misc]
        self.composing = composing  # type: ignore[misc]
        self.imdn = imdn  # type: ignore[misc]
        self.notification = notification  # type: ignore[misc]
        self.sent_at = sent_at  # type: ignore[misc]


fast_frozen_init(SipText)  # built per message: the plain frozen __init__ is slow


@dataclass(frozen=True, slots=True)
class Composing:
    """An RFC 3994 composing indication: ``active`` (typing, for ``refresh`` seconds) or idle."""

    active: bool
    refresh: int | None = None


@fast_frozen_init
@dataclass(frozen=True, slots=True)
class ImdnAsk:
    """A message's RFC 5438 identity and the notifications its sender wants (DESIGN 4.3)."""

    message_id: str
    sent_at: float | None  # CPIM DateTime, which a notification must repeat
    delivery: bool = True  # positive-delivery, negative-delivery (XEP-0184)
    display: bool = False  # display (XEP-0333 markable)


class ImdnStatus(enum.Enum):
    """What an RFC 5438 notification says of a message (its status element)."""

    DELIVERED = "delivered"
    DISPLAYED = "displayed"
    FAILED = "failed"  # failed, forbidden, error
    PROCESSED = "processed"  # processed, stored: never asked for, so dropped


@dataclass(frozen=True, slots=True)
class ImdnNews:
    """An RFC 5438 notification about ``message_id``, sent at ``sent_at``."""

    message_id: str
    status: ImdnStatus
    sent_at: float


@dataclass(frozen=True, slots=True)
class SipAnswer:
    """The final response the core gives a SIP request."""

    status: int
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


# --- presence (DESIGN 5) -------------------------------------------------------------------------
# Presence documents cross between the presence core and the SIP adapter as parsed PIDF
# (``sipside.pidf.PresenceDocument``, frozen values): the adapter turns bytes into documents and
# back, ``component.presence.translate`` turns documents into XMPP presence and back.


@dataclass(frozen=True, slots=True, init=False, eq=False)
class Watch:
    """A SIP user (by component JID) watching an XMPP entity (bare JID), DESIGN 5.2."""

    watcher_jid: str
    target_jid: str

    # Written out (not generated) so that compiled they are native: one per NOTIFY, a key.
    def __init__(self, watcher_jid: str, target_jid: str) -> None:
        self.watcher_jid = watcher_jid  # type: ignore[misc]
        self.target_jid = target_jid  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Watch):
            return NotImplemented
        return self.watcher_jid == other.watcher_jid and self.target_jid == other.target_jid

    def __hash__(self) -> int:
        return hash((self.watcher_jid, self.target_jid))


fast_frozen_init(Watch)


@dataclass(frozen=True, slots=True)
class WatchRequest:
    """A SIP user asks to watch an XMPP entity: a SUBSCRIBE that starts a dialog."""

    watcher_uri: str  # the From address of record
    target_uri: str  # the Request-URI


@dataclass(frozen=True, slots=True)
class WatchAnswer:
    """The core's answer to a ``WatchRequest``: active with the entity's document, or pending."""

    watch: Watch
    watcher_uri: str
    document: PresenceDocument | None  # None: pending until the XMPP user decides

    @property
    def approved(self) -> bool:
        """True when the watch starts active."""
        return self.document is not None


@dataclass(frozen=True, slots=True)
class SipSubscription:
    """An XMPP user watching a SIP user through the SIP presence server (DESIGN 5.3)."""

    watcher_jid: str  # the XMPP watcher's bare JID
    watcher_uri: str  # their SIP address (From of our SUBSCRIBE)
    sip_jid: str  # the SIP user's component JID
    sip_aor: str


@dataclass(frozen=True, slots=True)
class _SubscriptionNews:
    """What the SIP presence server said of one XMPP watcher's subscription to a SIP user."""

    watcher_jid: str
    sip_jid: str


@dataclass(frozen=True, slots=True)
class SubscriptionActive(_SubscriptionNews):
    """The SIP presence server lets the watcher see the SIP user, in this state (None: empty)."""

    document: PresenceDocument | None


@dataclass(frozen=True, slots=True)
class SubscriptionPending(_SubscriptionNews):
    """The SIP presence server has not decided yet (RFC 6665 4.1.3 pending)."""


@dataclass(frozen=True, slots=True)
class SubscriptionRefused(_SubscriptionNews):
    """The subscription ended for good: rejected, no such user, or the SUBSCRIBE failed."""


PresenceServerNews = SubscriptionActive | SubscriptionPending | SubscriptionRefused


class SubscribeOutcome(enum.Enum):
    """What asking the SIP side to subscribe did."""

    STARTED = "started"  # a new SUBSCRIBE left
    PENDING = "pending"  # one is live and not decided yet: nothing to do
    ACTIVE = "active"  # one is live and active: the watcher may be told again


@dataclass(frozen=True, slots=True)
class Registration:
    """A third-party REGISTER copied to the gateway (DESIGN 5.4)."""

    aor: str  # the home user's address of record (from To)
    contact: str | None  # None: ``Contact: *`` (remove all)
    expires: int  # 0: offline


@dataclass(frozen=True, slots=True)
class SipUserPublished:
    """A SIP user's published state changed (RFC 3903 PUBLISH): the document now in force."""

    aor: str
    document: PresenceDocument | None


@dataclass(frozen=True, slots=True)
class SipUserUnpublished:
    """A publication was removed or expired; ``remaining`` if another one is still in force,
    with its document (None: empty or unreadable)."""

    aor: str
    document: PresenceDocument | None
    remaining: bool
