"""The gateway's own values: what the adapters hand to the core and the core asks them to send.

Stanzas stop at the XMPP adapter and SIP messages at the SIP adapter; in between, only these
frozen dataclasses travel.
"""

from __future__ import annotations

from dataclasses import dataclass

# --- XMPP side -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
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


# --- SIP side ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SipText:
    """An instant message on the SIP side (RFC 3428 MESSAGE), body already decoded to text."""

    from_uri: str
    to_uri: str
    body: str
    content_type: str = "text/plain"
    call_id: str | None = None
    from_display: str | None = None
    html: str | None = None


@dataclass(frozen=True, slots=True)
class SipAnswer:
    """The final response the core gives a SIP request."""

    status: int
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
