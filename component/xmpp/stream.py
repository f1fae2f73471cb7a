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

CORK_LIMIT = 64  # replies gathered during one read before they are written (Stream.write_text)

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
        # While one read is handled, what the link writes is gathered here (see write_text);
        # None between reads.
        self._corked: list[str] | None = None
        self.add_event_handler("session_start", link._on_session_start)
        self.add_event_handler("disconnected", link._on_disconnected)
        self.add_event_handler("stream_error", link._on_stream_error)

    def data_received(self, data: bytes | str) -> None:
        # Under a flood most stanzas of a read are refused, and a send per error reply cost as
        # much as parsing and refusing the stanza (about 5 us each), besides a TCP segment each
        # for the server: the replies to one read go out together. Nothing waits for them in
        # between: a read is handled in one synchronous call, in order.
        self._corked = []
        try:
            super().data_received(data)
        finally:
            self._flush()
            self._corked = None

    def write_text(self, text: str) -> None:
        """Write stanzas to the transport (the caller checked it is open): at once, or while a
        read is handled, with the other replies to it (every ``CORK_LIMIT`` stanzas and at its
        end, so an answer waits for at most that many stanzas' handling, not a whole read's)."""
        corked = self._corked
        if corked is None:
            if self.transport is not None:
                self.transport.write(text.encode())
            return
        corked.append(text)
        if len(corked) >= CORK_LIMIT:
            self._flush()

    def cork(self) -> bool:
        """Gather what is written until :meth:`uncork`; False (and nothing to undo) when writes
        are gathered already, as while a read is handled."""
        if self._corked is not None:
            return False
        self._corked = []
        return True

    def uncork(self) -> None:
        """Write what was gathered since :meth:`cork`, in one write."""
        self._flush()
        self._corked = None

    def send_raw(self, data: str | bytes) -> None:
        self._flush()  # slixmpp's own writes (a stream error, the stream's end) go after ours
        super().send_raw(data)

    def abort(self) -> None:
        self._flush()  # the replies to the stanzas before a stream's end still go
        super().abort()

    def _flush(self) -> None:
        corked = self._corked
        if not corked:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write("".join(corked).encode())
        corked.clear()

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
