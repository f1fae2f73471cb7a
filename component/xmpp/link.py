"""The XMPP adapter: one XEP-0114 component link to the XMPP server, on slixmpp's ComponentXMPP.

slixmpp does the TCP stream, the XML parser and the handshake; everything above that is ours,
because the gateway's budget (150 us of CPU per message per direction, DESIGN 8) is below what
slixmpp's stanza objects and plugins cost (SERVERS.md: ~156 us for a bare echo component).

- Inbound, :class:`Stream` takes each top-level ``<message>``/``<presence>``/``<iq>`` element
  straight from the parser, before slixmpp builds a stanza object, runs filters and matches
  handlers. That also keeps hostile stanzas (thousands of levels deep) away from slixmpp code
  that would ``str()`` them. Nothing raised here reaches slixmpp: a bad stanza is answered with
  an error or dropped with a log line, and the link stays up.
- Outbound stanzas are text formatted in :mod:`component.xmpp.stanzas` and written with
  ``send_raw``: no stanza objects, no send queue.
- The adapter answers disco#info, ping, version and XEP-0100 itself, for the component domain
  and every JID under it; the core sees only ChatMessage, Presence and StanzaError.
- Written is not delivered (DESIGN 8): each message written waits in :mod:`component.xmpp.acks`
  until a XEP-0199 ping written after it is answered; one ping covers a batch. When the link is
  lost, the unconfirmed messages go to ``on_unconfirmed`` (the durable queue), stamped with when
  they were first written, to be re-sent after reconnect with the same id and origin-id.
- :meth:`XmppLink.run` owns the connection: connect, handshake, wait for the loss, back off
  (capped exponential with jitter), repeat until :meth:`XmppLink.stop`. slixmpp's own
  reconnection is not used; a refused handshake backs off like any other failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Any

from component.addresses import Jid
from component.errors import Refusal, busy
from component.logs import get_logger
from component.ports import NO_METRICS, Metrics, RoomStanzas
from component.ratelimit import SourceBuckets
from component.values import ChatMessage, Presence, ServiceInfo, ServiceKind, StanzaError
from component.xmpp.acks import AckBarrier
from component.xmpp.adhoc import AdhocCommands
from component.xmpp.backoff import Backoff
from component.xmpp.confirm import Confirmations
from component.xmpp.iq import (
    NS_DISCO_INFO,
    NS_PING,
    DiscoIdentity,
    DiscoInfo,
    IqResponder,
    QueryFailed,
    parse_disco_info,
)
from component.xmpp.muc import (
    format_instant_room,
    format_invitation,
    parse_invitation,
    parse_room_message,
    parse_room_presence,
    service_info,
)
from component.xmpp.stanzas import (
    NS_MUC_USER,
    Rejected,
    error_for,
    format_error,
    format_iq,
    format_message,
    format_presence,
    jid_or_none,
    outbound_jids,
    parse_error,
    parse_message,
    parse_presence,
)
from component.xmpp.stanzas import (
    attr as format_attr,
)
from component.xmpp.stream import LinkState, LinkStats, Stream, attr
from sipside.errors import LocalError

__all__ = [
    "Backoff",
    "DiscoIdentity",
    "DiscoInfo",
    "LinkState",
    "LinkStats",
    "QueryFailed",
    "XmppLink",
]

log = get_logger("component.xmpp")

_ID_MARK = "sipxmpp-id"  # where a cached error reply takes the refused stanza's id
_MAX_FLOOD_REPLIES = 1000
_MUC_USER_X = f"{{{NS_MUC_USER}}}x"  # what marks a presence as a room occupant's


class XmppLink:
    """The component connection (XEP-0114) between the gateway core and the XMPP server."""

    def __init__(
        self,
        *,
        component: str,
        host: str,
        port: int,
        secret: str,
        on_message: Callable[[ChatMessage], None],
        on_error: Callable[[StanzaError], None],
        on_presence: Callable[[Presence], None],
        on_link: Callable[[bool], None] = lambda up: None,
        version: str = "0.1.0",
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        disco_features: Iterable[str] = (),
        gateway_jid_for: Callable[[str], str] | None = None,
        gateway_desc: str = "Enter the SIP address of the person you want to contact.",
        gateway_prompt: str = "SIP address",
        disco_items: Callable[[], list[tuple[str, str]]] | None = None,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        on_unconfirmed: Callable[[list[ChatMessage]], None] = lambda msgs: None,
        ack_batch: int = 256,
        ack_delay: float = 0.05,
        ping_timeout: float = 15.0,
        clock: Callable[[], float] = time.time,
        rate: SourceBuckets | None = None,
        metrics: Metrics = NO_METRICS,
        on_stray_answer: Callable[[str], None] | None = None,
    ) -> None:
        domain = jid_or_none(component)
        if domain is None or domain.local or domain.resource:
            raise LocalError(f"component {component!r} is not a bare domain JID")
        self.component = domain.domain
        self.host = host
        self.port = port
        self._secret = secret
        self._on_message = on_message
        self._on_error = on_error
        self._on_presence = on_presence
        self._on_link = on_link
        # DESIGN 9: an iq answer for none of our queries may be another instance's (ejabberd
        # hands any stanza to any connection of the domain): handed out as its XML.
        self._on_stray_answer = on_stray_answer
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self.backoff = Backoff(min_backoff, max_backoff)
        self.stats = LinkStats()
        self.state = LinkState.IDLE
        self._responder = IqResponder(
            component=self.component,
            version=version,
            extra_features=tuple(disco_features),
            gateway_jid_for=gateway_jid_for,
            gateway_desc=gateway_desc,
            gateway_prompt=gateway_prompt,
            disco_items=disco_items,
        )
        # DESIGN 8: each sender's stanzas (by bare JID) take a token before any work is done.
        self._rate = rate
        self._flood_replies: dict[tuple[str, str, str], tuple[str, str]] = {}
        self._stream: Stream | None = None
        self._corked: Stream | None = None  # the stream corked by begin(), until end()
        self._attempt: asyncio.Future[bool] | None = None
        self._handshake: asyncio.Future[bool] | None = None
        self._closed: asyncio.Event | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._footer_sent = False  # our </stream:stream> went: nothing more may be written
        self._stream_error: str | None = None
        # Our iq ids: a random prefix per process, so replies meant for an earlier instance of
        # the gateway (same domain after a restart) are never taken for ours.
        self._id_prefix = "sx" + secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)
        self._pending: dict[str, tuple[str, asyncio.Future[ET.Element]]] = {}
        # Chat rooms (DESIGN 6), given to run(): stanzas of rooms that SIP users are in, and
        # invitations, go there instead of to messaging and presence.
        self.rooms: RoomStanzas | None = None
        self.commands: AdhocCommands | None = None  # DESIGN 9 admin commands, given to run()
        self.metrics = metrics  # DESIGN 9: XMPP errors sent, by condition
        # DESIGN 8: the barrier pings the component's own domain. The server routes that iq back
        # to us, so it exists on every server and needs no answer: its arrival is the proof.
        self._on_unconfirmed = on_unconfirmed
        self._clock = clock
        self.confirmations = Confirmations(
            AckBarrier(
                id_prefix=self._id_prefix + "ack",
                batch_size=ack_batch,
                batch_delay=ack_delay,
                ping_timeout=ping_timeout,
            ),
            component=self.component,
            clock=clock,
            write_ping=self._write_ping,
            on_overdue=self._abort,
        )

    # --- batched writes ------------------------------------------------------------------------

    def begin(self) -> None:
        """SIP datagrams read together are about to be handled (sipside's ``Burst``): the
        stanzas their handling writes go out in one write, at :meth:`end`, instead of a
        stream write (and a TCP segment for the server to read) each."""
        stream = self._stream
        if stream is not None and stream.cork():
            self._corked = stream

    def end(self) -> None:
        """The datagrams were handled: write what they wrote."""
        stream, self._corked = self._corked, None
        if stream is not None:
            stream.uncork()

    # --- state ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The handshake is done and the stream is open."""
        return self.state is LinkState.UP

    @property
    def stopped(self) -> bool:
        """:meth:`run` has returned after :meth:`stop`."""
        return self.state is LinkState.STOPPED

    async def run(
        self, rooms: RoomStanzas | None = None, commands: AdhocCommands | None = None
    ) -> None:
        """Keep the link up until :meth:`stop`; after any loss, reconnect after a backoff.

        ``rooms`` takes the chat-room stanzas (the rooms are built after the link, which they
        send through).
        """
        if self.state is not LinkState.IDLE:
            raise LocalError("XmppLink.run() called twice")
        self.rooms, self.commands = rooms, commands
        while not self._stopping:
            self._attempt = asyncio.ensure_future(self._connect_once())
            try:
                was_up = await self._attempt
            except asyncio.CancelledError:
                if not self._stopping:
                    raise  # our owner cancelled run() itself
                break
            if self._stopping:
                break
            if was_up:
                self.backoff.reset()
            delay = self.backoff.next_delay()
            self.stats.reconnects += 1
            self.state = LinkState.BACKING_OFF
            log.info("xmpp_reconnect_scheduled", delay=round(delay, 3), host=self.host)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        self.state = LinkState.STOPPED

    async def stop(self) -> None:
        """Close the stream cleanly (``</stream:stream>``) and stop reconnecting."""
        self._stopping = True
        self._wake.set()
        stream = self._stream
        if self.state is LinkState.UP and stream is not None and stream.transport is not None:
            # What the server has not confirmed yet would be handed back as unconfirmed.
            await self.confirmations.flush(2.0)
            # Waits (bounded) for the server to close its side of the stream too; what is read
            # meanwhile cannot be answered (a server ignores what follows our stream's end), so
            # the handlers see writes fail and keep what they must (DESIGN 8).
            self._footer_sent = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.disconnect(wait=2.0, reason="stop"), 5.0)
        elif self._attempt is not None and not self._attempt.done():
            self._attempt.cancel()  # connecting or handshaking: nothing to close cleanly
        if self._closed is not None and stream is not None and stream.transport is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 5.0)

    async def _connect_once(self) -> bool:
        """One connection: returns True if the handshake succeeded (the link was up)."""
        stream = Stream(self, self._secret)
        self._stream = stream
        self._handshake = asyncio.get_running_loop().create_future()
        self._closed = asyncio.Event()
        self._stream_error = None
        self.state = LinkState.CONNECTING
        try:
            return await self._connect_and_wait(stream, self._handshake, self._closed)
        except asyncio.CancelledError:
            if stream.transport is not None:
                stream.abort()
            raise

    async def _connect_and_wait(
        self, stream: Stream, handshake: asyncio.Future[bool], closed: asyncio.Event
    ) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: stream, self.host, self.port),
                self._connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            log.warning("xmpp_connect_failed", host=self.host, port=self.port, error=str(exc))
            return False
        if self.state is LinkState.CONNECTING:  # the handshake may already be done by now
            self.state = LinkState.HANDSHAKING
        try:
            accepted = await asyncio.wait_for(asyncio.shield(handshake), self._handshake_timeout)
        except TimeoutError:
            accepted = False
            stream.abort()
        if not accepted:
            # Wrong secret (not-authorized), a conflict, or silence: back off like any failure.
            log.warning(
                "xmpp_handshake_refused",
                host=self.host,
                port=self.port,
                component=self.component,
                condition=self._stream_error or "timeout or closed",
            )
        await closed.wait()
        return accepted

    def _on_session_start(self, _event: Any) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(True)
        self.state = LinkState.UP
        self.stats.connects += 1
        log.info("xmpp_link_up", host=self.host, port=self.port, component=self.component)
        self._on_link(True)

    def _on_stream_error(self, error: Any) -> None:
        with contextlib.suppress(Exception):
            self._stream_error = str(error["condition"])[:80]

    def _on_disconnected(self, reason: Any) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_result(False)
        was_up = self.state is LinkState.UP
        self.state = LinkState.STOPPED if self._stopping else LinkState.CONNECTING
        for _jid, future in self._pending.values():
            if not future.done():
                future.set_exception(QueryFailed("remote-server-timeout", "XMPP link lost"))
        self._pending.clear()
        unconfirmed = self.confirmations.lost()
        if self._closed is not None:
            self._closed.set()
        if unconfirmed:
            self._hand_off(unconfirmed)
        if was_up:
            log.warning(
                "xmpp_link_down",
                host=self.host,
                reason=str(reason)[:200] if reason else None,
                stream_error=self._stream_error,
            )
            self._on_link(False)

    # --- outbound ------------------------------------------------------------------------------

    def _writable(self) -> Stream | None:
        # Never into a dead stream: what a closing transport takes is silently dropped.
        stream = self._stream
        if self.state is not LinkState.UP or stream is None or self._footer_sent:
            return None
        transport = stream.transport
        if transport is None or transport.is_closing():
            return None
        return stream

    def _write(self, text: str) -> bool:
        stream = self._writable()
        if stream is None:
            return False
        stream.write_text(text)
        self.stats.stanzas_out += 1
        return True

    def _ping_stanza(self, ping_id: str) -> str:
        return format_iq(
            "get", self.component, self.component, ping_id, f'<ping xmlns="{NS_PING}"/>'
        )

    def _write_ping(self, ping_id: str) -> bool:
        return self._write(self._ping_stanza(ping_id))

    def _abort(self) -> None:
        stream = self._stream
        if stream is not None and stream.transport is not None:
            stream.abort()

    def _hand_off(self, messages: list[ChatMessage]) -> None:
        self.stats.unconfirmed += len(messages)
        log.warning("xmpp_messages_unconfirmed", count=len(messages), host=self.host)
        try:
            self._on_unconfirmed(messages)
        except Exception:
            log.exception("xmpp_unconfirmed_lost", count=len(messages))

    def _checked(self, sender: str, recipient: str, kind: str) -> None:
        try:
            outbound_jids(sender, recipient, self.component)
        except LocalError as exc:
            self.stats.rejected_out += 1
            log.error("xmpp_stanza_rejected", direction="out", kind=kind, reason=str(exc))
            raise

    def send_message(self, msg: ChatMessage) -> bool:
        """Write a ``<message>``; True once written, False when the link is down.

        Raises LocalError for a stanza that must never be sent (foreign ``from``, bad JID).
        """
        self._checked(msg.sender, msg.recipient, "message")
        stream = self._writable()
        if stream is None:
            return False
        text = format_message(msg)
        ping_id = self.confirmations.written(msg)
        if ping_id is not None:
            # The barrier's ping, due now, goes in the same write as the message it covers.
            text += self._ping_stanza(ping_id)
            self.stats.stanzas_out += 1
        stream.write_text(text)
        self.stats.stanzas_out += 1
        return True

    def send_presence(self, p: Presence) -> bool:
        """Write a ``<presence>``; True once written, False when the link is down."""
        self._checked(p.sender, p.recipient, "presence")
        return self._write(format_presence(p))

    def send_error(self, err: StanzaError) -> bool:
        """Write an error reply to a stanza we received; True once written."""
        self._checked(err.sender, err.recipient, err.kind)
        if self._write(format_error(err)):
            self.stats.errors_out += 1
            self.metrics.xmpp_error(err.condition)
            return True
        return False

    def refuse(self, stanza: ChatMessage | Presence, refusal: Refusal) -> bool:
        """Answer ``stanza`` (one we received) with the error ``refusal`` stands for."""
        kind = "message" if isinstance(stanza, ChatMessage) else "presence"
        return self.send_error(
            error_for(
                refusal, kind, sender=stanza.recipient, recipient=stanza.sender, id_=stanza.id
            )
        )

    async def query_disco_info(self, jid: str, sender: str, timeout: float = 10.0) -> DiscoInfo:
        """XEP-0030 disco#info of ``jid``; raises QueryFailed on an error, a timeout or no link."""
        reply = await self._query(jid, sender, f'<query xmlns="{NS_DISCO_INFO}"/>', timeout)
        return parse_disco_info(jid, reply)

    async def discover_service(self, domain: str, timeout: float = 10.0) -> ServiceInfo:
        """Whether ``domain`` hosts chat rooms (XEP-0030 disco#info); an error, a timeout or no
        link is UNREACHABLE, with the condition."""
        try:
            reply = await self._query(
                domain, self.component, f'<query xmlns="{NS_DISCO_INFO}"/>', timeout
            )
        except QueryFailed as exc:
            return ServiceInfo(domain, ServiceKind.UNREACHABLE, exc.condition)
        return service_info(domain, reply)

    def send_invitation(
        self, sender: str, room: str, invitee: str, reason: str | None, msg_id: str
    ) -> bool:
        """A XEP-0045 7.8.2 mediated invitation through ``room``; False when the link is down."""
        self._checked(sender, room, "message")
        self._checked(sender, invitee, "message")
        return self._write(format_invitation(sender, room, invitee, reason, msg_id))

    def configure_instant_room(self, sender: str, room: str) -> bool:
        """Unlock a room we just created with its default configuration (XEP-0045 10.1.2).

        The answer is not waited for: a room that stays locked shows itself to its users.
        """
        self._checked(sender, room, "iq")
        return self._write(format_instant_room(sender, room, f"{self._id_prefix}{next(self._ids)}"))

    async def ping(self, jid: str, sender: str, timeout: float) -> bool:
        """XEP-0199 ping: True if ``jid`` answered (a result, or it does not implement ping)."""
        try:
            await self._query(jid, sender, f'<ping xmlns="{NS_PING}"/>', timeout)
        except QueryFailed as exc:
            # XEP-0199 4.2: an entity without ping support answers, so it is alive.
            return exc.condition == "feature-not-implemented"
        return True

    async def _query(self, jid: str, sender: str, payload: str, timeout: float) -> ET.Element:
        self._checked(sender, jid, "iq")
        target = jid_or_none(jid)
        assert target is not None  # checked above
        iq_id = f"{self._id_prefix}{next(self._ids)}"
        future: asyncio.Future[ET.Element] = asyncio.get_running_loop().create_future()
        self._pending[iq_id] = (target.full, future)
        try:
            if not self._write(format_iq("get", sender, jid, iq_id, payload)):
                raise QueryFailed("remote-server-timeout", "XMPP link down")
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise QueryFailed("remote-server-timeout", f"no answer in {timeout}s") from None
        finally:
            self._pending.pop(iq_id, None)

    # --- inbound -------------------------------------------------------------------------------

    def _dispatch(self, kind: str, xml: ET.Element) -> None:
        """Route one inbound stanza; called by the stream for each top-level element."""
        self.stats.stanzas_in += 1
        if self._rate is not None and not self._admitted(kind, xml):
            return
        stype = xml.get("type")
        sender = jid_or_none(xml.get("from") or "")
        recipient = jid_or_none(xml.get("to") or "")
        if sender is None or recipient is None or recipient.domain != self.component:
            self._refuse_address(kind, xml, stype, sender, recipient)
            return
        src, dst = sender.full, recipient.full
        if kind == "iq" and src == self.component and self._confirmed(xml):
            return
        try:
            if kind != "iq" and self.rooms is not None and self._room_stanza(kind, xml, src, dst):
                return
            if stype == "error":
                self._inbound_error(kind, xml, src, dst)
            elif kind == "message":
                self._on_message(parse_message(xml, src, dst))
            elif kind == "presence":
                self._on_presence(parse_presence(xml, src, dst))
            else:
                self._inbound_iq(xml, stype, src, recipient)
        except Refusal as exc:
            self._reject_in(kind, xml, exc.xmpp_condition)
            self._reply_error(kind, xml, dst, src, exc)

    def _admitted(self, kind: str, xml: ET.Element) -> bool:
        """Take a token for the stanza's sender (its bare JID, cut from the raw attribute);
        a sender with none left gets ``resource-constraint`` (type wait), counted and logged.

        Our own barrier pings, routed back by the server, are never limited. A broadcast (a
        presence change the server copies to every watcher, a room's groupchat and occupant
        presence copied to every occupant) counts per sender and recipient: one status change
        of a user with 1,000 SIP watchers is 1,000 stanzas from one sender, none of them a flood.
        """
        assert self._rate is not None
        raw = xml.get("from") or ""
        source = raw.partition("/")[0]
        if source == self.component:
            return True
        key = source
        stype = xml.get("type")
        if (kind == "presence" and stype in (None, "unavailable")) or (
            kind == "message" and stype == "groupchat"
        ):
            key = f"{source} {(xml.get('to') or '').partition('/')[0]}"
        verdict = self._rate.take(key, self._clock())
        if verdict.admitted:
            return True
        self.stats.rate_limited += 1
        if verdict.log:
            log.warning(
                "xmpp_stanza_rate_limited",
                kind=kind,
                sender=source[:120],
                refused=verdict.refused,
                total=self.stats.rate_limited,
            )
        # RFC 6120 8.3.1: errors and results are never answered. The server checked both
        # addresses before routing the stanza here; the reply only has to come from our own
        # domain (a foreign from would close the stream). Refusing must cost less than what it
        # saves: no JID parsing, and the error is formatted once per sender and address.
        to = xml.get("to") or ""
        if (
            raw
            and xml.get("type") not in ("error", "result")
            and to.partition("/")[0].rpartition("@")[2] == self.component
        ):
            head, tail = self._flood_reply(kind, to, raw, verdict.retry_after)
            if self._write(head + format_attr("id", xml.get("id")) + tail):
                self.stats.errors_out += 1
                self.metrics.xmpp_error("resource-constraint")
        return False

    def _flood_reply(self, kind: str, to: str, sender: str, retry_after: int) -> tuple[str, str]:
        """The ``resource-constraint`` error for a flooded stanza, split where its id goes."""
        key = (kind, to, sender)
        reply = self._flood_replies.get(key)
        if reply is None:
            refusal = busy("too many stanzas from this sender", retry_after)
            err = error_for(refusal, kind, sender=to, recipient=sender, id_=_ID_MARK)
            head, _, tail = format_error(err).partition(format_attr("id", _ID_MARK))
            if len(self._flood_replies) >= _MAX_FLOOD_REPLIES:
                self._flood_replies.clear()
            reply = self._flood_replies[key] = (head, tail)
        return reply

    def _room_stanza(self, kind: str, xml: ET.Element, src: str, dst: str) -> bool:
        """Hand a chat-room stanza to the rooms (DESIGN 6); False when it is none of theirs."""
        rooms = self.rooms
        assert rooms is not None
        stype = xml.get("type")
        if kind == "message" and stype != "error":
            invitation = parse_invitation(xml, src, dst)
            if invitation is not None:
                rooms.on_invitation(invitation)
                return True
        if not rooms.claims(src, dst):
            if kind == "message" and stype == "groupchat":
                if rooms.on_unclaimed(parse_room_message(xml, src, dst)):
                    return True  # maybe another instance's seat
                # A room nobody here is in any more: not a one-to-one chat either.
                self._reject_in(kind, xml, "groupchat from a room no SIP user is in")
                return True
            if kind == "presence" and xml.find(_MUC_USER_X) is not None:
                return rooms.on_unclaimed(parse_room_presence(xml, src, dst))
            return False
        if kind == "presence":
            rooms.on_room_presence(parse_room_presence(xml, src, dst))
        elif stype == "error":
            self.stats.errors_in += 1
            rooms.on_room_error(parse_error(xml, kind, src, dst))
        else:
            rooms.on_room_message(parse_room_message(xml, src, dst))
        return True

    def _refuse_address(self, kind: str, xml: ET.Element, stype: str | None, *jids: Any) -> None:
        sender, recipient = jids
        reason = "bad from" if sender is None else "bad to" if recipient is None else "foreign to"
        self._reject_in(kind, xml, reason)
        # RFC 6120 8.3.1: never answer an error with an error; without a valid from, nowhere to.
        if sender is None or stype in ("error", "result"):
            return
        refusal = Rejected("jid-malformed", "modify", reason)
        self._reply_error(kind, xml, self.component, sender.full, refusal)

    def _reject_in(self, kind: str, xml: ET.Element, reason: str) -> None:
        self.stats.rejected_in += 1
        log.info(
            "xmpp_stanza_rejected",
            direction="in",
            kind=kind,
            reason=reason,
            id=attr(xml, "id"),
            sender=attr(xml, "from"),
            recipient=attr(xml, "to"),
        )

    def _reply_error(
        self, kind: str, xml: ET.Element, src: str, dst: str, refusal: Refusal
    ) -> None:
        if xml.get("type") in ("error", "result"):  # RFC 6120 8.2.3, 8.3.1: never answered
            return
        err = error_for(refusal, kind, sender=src, recipient=dst, id_=xml.get("id"))
        if self._write(format_error(err)):
            self.stats.errors_out += 1
            self.metrics.xmpp_error(err.condition)

    def _inbound_error(self, kind: str, xml: ET.Element, src: str, dst: str) -> None:
        self.stats.errors_in += 1
        err = parse_error(xml, kind, src, dst)
        if kind == "iq" and self._settle(xml, src, err):
            return
        if kind == "iq" and self._on_stray_answer is not None:
            self._on_stray_answer(ET.tostring(xml, encoding="unicode"))
            return
        self._on_error(err)

    def _settle(self, xml: ET.Element, src: str, err: StanzaError | None) -> bool:
        """Complete a pending query of ours with this result or error; False if none matches.

        RFC 6120 8.2.3: the answer comes from the JID we asked (a server bouncing an error for
        it uses that JID too); anything else with our id is not the answer.
        """
        entry = self._pending.get(xml.get("id") or "")
        if entry is None or entry[0] != src:
            return False
        future = entry[1]
        if not future.done():
            if err is None:
                future.set_result(xml)
            else:
                future.set_exception(QueryFailed(err.condition, err.text))
        return True

    def take_stray_answer(self, text: str) -> bool:
        """An iq answer (result or error) another instance received but did not ask for: ours
        if it answers a pending query or barrier ping of this link (DESIGN 9)."""
        try:
            xml = ET.fromstring(text)
        except ET.ParseError:
            return False
        sender, recipient = jid_or_none(xml.get("from") or ""), jid_or_none(xml.get("to") or "")
        if xml.tag.rpartition("}")[2] != "iq" or sender is None or recipient is None:
            return False
        if sender.full == self.component and self._confirmed(xml):
            return True
        err = (
            parse_error(xml, "iq", sender.full, recipient.full)
            if xml.get("type") == "error"
            else None
        )
        return self._settle(xml, sender.full, err)

    def _confirmed(self, xml: ET.Element) -> bool:
        """Our own barrier ping, routed back by the server: all before it was processed."""
        iq_id = xml.get("id") or ""
        if not self.confirmations.barrier.is_ping(iq_id):
            return False
        self.confirmations.answered(iq_id)
        return True

    def _inbound_iq(self, xml: ET.Element, stype: str | None, src: str, to: Jid) -> None:
        if stype == "result":
            if not self._settle(xml, src, None):
                log.debug("xmpp_iq_result_unmatched", id=attr(xml, "id"), sender=src[:120])
                if self._on_stray_answer is not None:
                    self._on_stray_answer(ET.tostring(xml, encoding="unicode"))
            return
        if stype not in ("get", "set"):
            raise Rejected("bad-request", "modify", "iq type must be get, set, result or error")
        iq_id = xml.get("id")
        if not iq_id:
            raise Rejected("bad-request", "modify", "iq without id")
        if self.commands is not None and self.commands.take(xml, stype, src, to, self._write):
            return
        payload = self._responder.answer(xml, stype, to)
        self._write(format_iq("result", to.full, src, iq_id, payload))
