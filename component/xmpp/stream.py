"""slixmpp's component stream with our own stanza entry, and the link's state and counters."""

from __future__ import annotations

import enum
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slixmpp import ComponentXMPP

from component.logs import get_logger
from component.xmpp.stanzas import NS_CLIENT, NS_COMPONENT

if TYPE_CHECKING:
    from component.xmpp.link import XmppLink

log = get_logger("component.xmpp")

_KINDS: dict[str, str] = {
    f"{{{ns}}}{kind}": kind
    for ns in (NS_COMPONENT, NS_CLIENT)
    for kind in ("message", "presence", "iq")
}


class LinkState(enum.Enum):
    """Where the link is in its life (one machine, driven by :meth:`XmppLink.run`)."""

    IDLE = "idle"  # run() not called yet
    CONNECTING = "connecting"  # TCP connect in progress
    HANDSHAKING = "handshaking"  # stream open, XEP-0114 handshake sent
    UP = "up"  # handshake accepted: stanzas flow
    BACKING_OFF = "backing_off"  # waiting before the next attempt
    STOPPED = "stopped"  # stop() called; run() returns


@dataclass(slots=True)
class LinkStats:
    """Counters of the link, for metrics and the admin commands."""

    stanzas_in: int = 0
    stanzas_out: int = 0
    errors_in: int = 0  # error stanzas received
    errors_out: int = 0  # error replies sent
    rejected_in: int = 0  # inbound stanzas refused (malformed, foreign, too big)
    rate_limited: int = 0  # inbound stanzas refused because their sender sent too many
    rejected_out: int = 0  # outbound stanzas refused (our bug)
    connects: int = 0  # handshakes accepted
    reconnects: int = 0  # attempts scheduled after a failure or loss
    unconfirmed: int = 0  # messages written to a link lost before the server confirmed them


class Stream(ComponentXMPP):
    """slixmpp's component stream with our own stanza entry and a synchronous ``send``."""

    def __init__(self, link: XmppLink, secret: str) -> None:
        super().__init__(link.component, secret)  # type: ignore[no-untyped-call]
        self._link = link
        self.add_event_handler("session_start", link._on_session_start)
        self.add_event_handler("disconnected", link._on_disconnected)
        self.add_event_handler("stream_error", link._on_stream_error)

    def _spawn_event(self, xml: ET.Element) -> None:
        kind = _KINDS.get(xml.tag)
        if kind is None:
            # The handshake reply and stream errors: slixmpp's own handlers deal with those.
            super()._spawn_event(xml)
            return
        try:
            self._link._dispatch(kind, xml)
        except RecursionError:
            self._link._reject_in(kind, xml, "recursion")
        except Exception:
            log.exception("xmpp_stanza_failed", kind=kind, id=attr(xml, "id"))

    def send(self, data: Any, use_filters: bool = True) -> None:
        # Only slixmpp itself calls this (handshake, stream errors): write at once instead of
        # going through its send queue, which we never start.
        if self.transport is None:
            return
        text = data if isinstance(data, str) else str(data)
        self.send_raw(text)


def attr(xml: ET.Element, name: str) -> str | None:
    """An attribute for a log line, cut short: never the stanza itself."""
    value = xml.get(name)
    return value[:120] if value is not None else None
