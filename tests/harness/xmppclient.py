"""slixmpp test clients: an XMPP user (c2s) and a bare component that stands in for the gateway.

Both put every message and presence stanza into asyncio queues through their own handler:
slixmpp's `message` event skips stanzas without a body, and its coroutine handlers may run out
of order (SERVERS.md). Both connect to 127.0.0.1 explicitly: the test domains do not resolve.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from slixmpp import JID, ClientXMPP, ComponentXMPP
from slixmpp.stanza import Message, Presence
from slixmpp.types import MessageTypes
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from tests.harness.values import LOOPBACK

_MUC_USER_NS = "http://jabber.org/protocol/muc#user"


class _Queues:
    """The queues and waiting helpers shared by the client and the component."""

    def _init_queues(self, stream: Any) -> None:
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.presences: asyncio.Queue[Presence] = asyncio.Queue()
        # Plain callbacks run in stream order, unlike slixmpp's coroutine event handlers.
        stream.register_handler(Callback("harness messages", StanzaPath("message"), self._put))
        stream.register_handler(Callback("harness presences", StanzaPath("presence"), self._put))

    def _put(self, stanza: StanzaBase) -> None:
        if isinstance(stanza, Message):
            self.messages.put_nowait(stanza)
        elif isinstance(stanza, Presence):
            self.presences.put_nowait(stanza)

    async def next_message(self, timeout: float = 10.0, with_body: bool = False) -> Message:
        """The next message stanza of any type (errors included); optionally only with a body."""
        while True:
            msg = await asyncio.wait_for(self.messages.get(), timeout)
            if not with_body or msg["body"]:
                return msg

    async def next_presence(self, timeout: float = 10.0, ptype: str | None = None) -> Presence:
        """The next presence stanza; with ptype, skip others until one of that type."""
        while True:
            pres = await asyncio.wait_for(self.presences.get(), timeout)
            if ptype is None or pres["type"] == ptype:
                return pres


async def _wait_session(stream: Any, host: str, port: int, timeout: float) -> None:
    """Connect and wait for session_start; fail early on auth or connection failure."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def ok(_: Any) -> None:
        if not done.done():
            done.set_result(None)

    def failed(reason: Any) -> None:
        if not done.done():
            done.set_exception(ConnectionError(f"XMPP session failed: {reason}"))

    stream.add_event_handler("session_start", ok)
    for event in ("failed_all_auth", "connection_failed", "stream_error"):
        stream.add_event_handler(event, failed)
    stream.connect(host=host, port=port)
    try:
        await asyncio.wait_for(done, timeout)
    finally:
        stream.del_event_handler("session_start", ok)
        for event in ("failed_all_auth", "connection_failed", "stream_error"):
            stream.del_event_handler(event, failed)


class XmppClient(ClientXMPP, _Queues):
    """A user of the test XMPP server, logged in over plaintext c2s on loopback."""

    def __init__(self, jid: str, password: str, register: bool = False) -> None:
        # SERVERS.md: PLAIN/SCRAM must be allowed without TLS (the plugin reads this config
        # when ClientXMPP registers it, so it goes in here); no direct TLS, no STARTTLS (the
        # test servers have no certificates).
        super().__init__(
            jid,
            password,
            plugin_config={
                "feature_mechanisms": {"unencrypted_plain": True, "unencrypted_scram": True}
            },
        )
        self.enable_direct_tls = False
        self.enable_starttls = False
        self.enable_plaintext = True
        for plugin in ("xep_0030", "xep_0004", "xep_0045", "xep_0199"):
            self.register_plugin(plugin)
        if register:
            # In-band registration (XEP-0077) before logging in: one round trip, where
            # `ejabberdctl register` boots an Erlang VM (about a second) per account.
            self.register_plugin("xep_0077", {"create_account": True})
            self.add_event_handler("register", self._register_account)
        self._init_queues(self)

    async def _register_account(self, _form: Any) -> None:
        iq = self.Iq()
        iq["type"] = "set"
        iq["register"]["username"] = self.boundjid.user
        iq["register"]["password"] = self.password
        await iq.send()  # type: ignore[no-untyped-call]

    async def start(self, port: int, host: str = LOOPBACK, timeout: float = 15.0) -> None:
        """Log in, fetch the roster, become available, and wait until the server saw that."""
        await _wait_session(self, host, port, timeout)
        await self.get_roster(timeout=timeout)
        self.send_presence()
        # A round trip after the presence: the server handles one stream in order, so once the
        # ping is answered this resource is available and messages to the bare JID reach it.
        await self.plugin["xep_0199"].send_ping(JID(self.boundjid.domain), timeout=timeout)

    async def stop(self) -> None:
        """Close the stream (bounded wait: a server that is down must not hang teardown)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.disconnect(), 5)

    def send_chat(self, to: str, body: str, mtype: MessageTypes = "chat") -> None:
        """Send a message with a body."""
        self.send_message(mto=JID(to), mbody=body, mtype=mtype)

    def subscribe(self, to: str) -> None:
        """Ask for the presence of `to`."""
        self.send_presence(pto=JID(to), ptype="subscribe")

    def approve(self, to: str) -> None:
        """Let `to` see this user's presence."""
        self.send_presence(pto=JID(to), ptype="subscribed")

    def unsubscribe(self, to: str) -> None:
        """Stop watching `to`."""
        self.send_presence(pto=JID(to), ptype="unsubscribe")

    async def join_room(
        self, room: str, nick: str, history: int = 0, timeout: float = 10.0
    ) -> Presence:
        """Join a MUC room (without history by default); unlock it if we created it.

        Prosody keeps a new room locked until its owner configures it (SERVERS.md): a fresh
        room (status 201) gets the instant-room form.
        """
        pres, _subject, _occupants, _history = await self.plugin["xep_0045"].join_muc_wait(
            JID(room), nick, maxstanzas=history, timeout=timeout
        )
        codes = {int(s) for s in pres["muc"]["status_codes"]}
        if 201 in codes:
            form = self.plugin["xep_0004"].make_form(ftype="submit")  # type: ignore[no-untyped-call]
            await self.plugin["xep_0045"].set_room_config(JID(room), form, timeout=timeout)
        return pres

    def send_groupchat(self, room: str, body: str) -> None:
        """Send a message to a room."""
        self.send_message(mto=JID(room), mbody=body, mtype="groupchat")


class XmppComponent(ComponentXMPP, _Queues):
    """A bare XEP-0114 component: what the gateway looks like to the XMPP server."""

    def __init__(self, domain: str, secret: str) -> None:
        super().__init__(domain, secret)  # type: ignore[no-untyped-call]
        self._init_queues(self)

    async def start(self, port: int, host: str = LOOPBACK, timeout: float = 15.0) -> None:
        """Connect and complete the handshake."""
        await _wait_session(self, host, port, timeout)

    async def stop(self) -> None:
        """Close the component stream."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.disconnect(), 5)
