"""Typing, receipts, read markers, corrections and late messages end to end (DESIGN 4.3):
PJSIP (its typing indications) and a raw SIP user agent (IMDN, which PJSIP does not send)
behind Kamailio, the gateway, Prosody or ejabberd, and slixmpp clients. Runs once per XMPP
server."""

from __future__ import annotations

import asyncio
import datetime
import secrets
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sipside import cpim, imdn
from tests.conftest import XMPP_PASSWORD
from tests.gateway_fixture import (
    RunningGateway,
    component_jid,
    gateway_behind_kamailio,
    prepared_db,
)
from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent
from tests.harness.ports import free_port
from tests.harness.rawsip import RawSip, RawSipPeer
from tests.harness.values import LOOPBACK, SIP_DOMAIN
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer
from tests.test_faults import GatewayProcess

pytestmark = pytest.mark.slow

ClientFactory = Callable[[str], Awaitable[XmppClient]]
NS_RECEIPTS = "urn:xmpp:receipts"
NS_MARKERS = "urn:xmpp:chat-markers:0"
NS_STATES = "http://jabber.org/protocol/chatstates"
_users = iter(range(1, 10_000))


@pytest.fixture
async def world(
    tmp_path: Path,
    xmpp_server: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
) -> AsyncIterator[tuple[RunningGateway, KamailioServer]]:
    """Kamailio in front of a running gateway connected to the XMPP server under test."""
    async with gateway_behind_kamailio(tmp_path, xmpp_server.component_port, kamailio_factory) as w:
        yield w


@pytest.fixture
async def carol(world: tuple[RunningGateway, KamailioServer]) -> AsyncIterator[RawUser]:
    """A SIP user on a raw UDP socket, registered at Kamailio."""
    user = await RawUser.register(world[1])
    try:
        yield user
    finally:
        user.close()


class RawUser:
    """A SIP user agent on a raw UDP socket, registered at Kamailio: it sees every byte, and
    answers OPTIONS with an Accept that lists CPIM and isComposing (RFC 3261 11.2)."""

    ACCEPT = "Accept: text/plain, message/cpim, application/im-iscomposing+xml"

    def __init__(self, peer: RawSipPeer, kamailio: KamailioServer, user: str) -> None:
        self.peer = peer
        self.proxy = (LOOPBACK, kamailio.port)
        self.uri = f"sip:{user}@{SIP_DOMAIN}"
        self._stash: list[RawSip] = []
        self.options = 0  # OPTIONS answered

    @classmethod
    async def register(cls, kamailio: KamailioServer) -> RawUser:
        user = cls(await RawSipPeer.open(), kamailio, f"carol{next(_users)}")
        user.send(
            "REGISTER",
            f"sip:{SIP_DOMAIN}",
            to_uri=user.uri,
            extra=("Expires: 300",),
        )
        assert (await user.response()).status == 200
        return user

    def send(
        self,
        method: str,
        uri: str,
        *,
        to_uri: str | None = None,
        body: bytes = b"",
        content_type: str = "text/plain",
        extra: tuple[str, ...] = (),
    ) -> None:
        data = self.peer.request(
            method, uri, self.uri, to_uri or uri, "", content_type, extra=extra
        )
        if body:  # the harness writes text bodies; CPIM is bytes with CRLFs of its own
            head = data.decode().replace("Content-Length: 0", f"Content-Type: {content_type}")
            data = (
                head.rstrip("\r\n").encode() + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            )
            data += body
        self.peer.send(data, self.proxy)

    async def _next(self, wanted: Callable[[RawSip], bool], timeout: float) -> RawSip:
        for index, msg in enumerate(self._stash):
            if wanted(msg):
                return self._stash.pop(index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.peer.next(max(deadline - loop.time(), 0.01))
            if msg.method == "OPTIONS":
                self.options += 1
                self.peer.send(msg.response(200, "OK", self.ACCEPT), msg.source)
            elif wanted(msg):
                return msg
            else:
                self._stash.append(msg)

    async def response(self, timeout: float = 10.0) -> RawSip:
        """The next final response."""
        return await self._next(lambda m: m.status >= 200, timeout)

    async def message(
        self, timeout: float = 10.0, answer: tuple[int, str, str] = (200, "OK", "")
    ) -> RawSip:
        """The next MESSAGE received, answered with ``answer``."""
        msg = await self._next(lambda m: m.method == "MESSAGE", timeout)
        self.peer.send(msg.response(*answer), msg.source)
        return msg

    async def no_message(self, seconds: float) -> None:
        """Nothing but CRLF keep-alives arrives for ``seconds``."""
        with pytest.raises(TimeoutError):
            got = await self._next(lambda m: m.method == "MESSAGE", seconds)
            raise AssertionError(f"unexpected MESSAGE: {got.body[:200]!r}")

    def close(self) -> None:
        self.peer.close()


def _uri_of(client: XmppClient) -> str:
    user, domain = str(client.boundjid.bare).split("@")
    return f"sip:{user}*{domain}@jabber.sip.test"


def _send(client: XmppClient, to: str, body: str | None, *children: str, id_: str = "") -> str:
    """A chat message with extra child elements (given as XML text); its id."""
    msg = client.make_message(mto=to, mbody=body, mtype="chat")
    msg["id"] = id_ or secrets.token_hex(6)
    for child in children:
        msg.xml.append(ET.fromstring(child))
    msg.send()
    return str(msg["id"])


async def _stanza(client: XmppClient, sender: str, want: Callable[[Any], bool]) -> Any:
    """The next message from ``sender`` (bare) that ``want`` accepts; others are skipped."""
    while True:
        msg = await client.next_message(timeout=15)
        if str(msg["from"].bare) == sender and want(msg):
            return msg


def _child(msg: Any, ns: str, name: str) -> ET.Element | None:
    child: ET.Element | None = msg.xml.find(f"{{{ns}}}{name}")
    return child


def _has_child(ns: str, name: str) -> Callable[[Any], bool]:
    """A ``_stanza`` filter: messages with a ``name`` element of namespace ``ns``."""
    return lambda msg: _child(msg, ns, name) is not None


def _cpim(msg: RawSip) -> cpim.CpimMessage:
    assert (msg.header("Content-Type") or "").startswith("message/cpim"), msg.header("Content-Type")
    return cpim.parse(msg.body.encode())


def _notification(
    about: cpim.CpimMessage, status: imdn.Disposition, sender: str, recipient: str
) -> bytes:
    request = imdn.requested(about)
    assert request is not None and request.date_time is not None
    kind = imdn.NotificationKind.DISPLAY
    if status in (imdn.Disposition.DELIVERED, imdn.Disposition.FAILED):
        kind = imdn.NotificationKind.DELIVERY
    note = imdn.DispositionNotification(request.message_id, request.date_time, kind, status)
    now = datetime.datetime.now(datetime.UTC)
    return cpim.build(imdn.notification_message(note, sender, recipient, secrets.token_hex(6), now))


# --- typing -------------------------------------------------------------------------------------


async def test_typing_both_ways_with_pjsip(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
) -> None:
    _, kamailio = world
    alice = await pjsip_agent.add_account(f"alice{next(_users)}", kamailio)
    bob = await xmpp_client_factory("bob")
    alice_jid = component_jid(alice.uri)
    # PJSIP types: XEP-0085 composing, then active when it stops
    await alice.send_typing(_uri_of(bob), True)
    first = await _stanza(
        bob, alice_jid, lambda m: m.xml.find(f"{{{NS_STATES}}}composing") is not None
    )
    assert not first["body"]
    await alice.send_typing(_uri_of(bob), False)
    await _stanza(bob, alice_jid, lambda m: m.xml.find(f"{{{NS_STATES}}}active") is not None)
    # Bob types: PJSIP's typing indication on, then off when he pauses
    _send(bob, alice_jid, None, f"<composing xmlns='{NS_STATES}'/>")
    sender, typing = await alice.next_typing(timeout=15)
    assert typing and _uri_of(bob) in sender
    _send(bob, alice_jid, None, f"<paused xmlns='{NS_STATES}'/>")
    assert (await alice.next_typing(timeout=15))[1] is False
    # a chat state never becomes a chat message
    bob.send_chat(alice_jid, "after typing")
    assert (await alice.next_message()).body == "after typing"


async def test_lapsed_sip_typing_is_paused(
    carol: RawUser, xmpp_client_factory: ClientFactory
) -> None:
    bob = await xmpp_client_factory("bob")
    body = (
        b"<?xml version='1.0' encoding='UTF-8'?>"
        b"<isComposing xmlns='urn:ietf:params:xml:ns:im-iscomposing'>"
        b"<state>active</state><refresh>1</refresh></isComposing>"
    )
    carol.send("MESSAGE", _uri_of(bob), body=body, content_type="application/im-iscomposing+xml")
    assert (await carol.response()).status == 200
    sender = component_jid(carol.uri)
    await _stanza(bob, sender, lambda m: _child(m, NS_STATES, "composing") is not None)
    # no refresh within 1 s: the gateway says paused
    paused = await _stanza(bob, sender, lambda m: _child(m, NS_STATES, "paused") is not None)
    assert not paused["body"]


# --- receipts and read markers -------------------------------------------------------------------


async def test_receipt_and_read_marker_xmpp_to_sip(
    carol: RawUser, xmpp_client_factory: ClientFactory
) -> None:
    bob = await xmpp_client_factory("bob")
    carol_jid = component_jid(carol.uri)
    sent_id = _send(
        bob,
        carol_jid,
        "did you read this?",
        f"<request xmlns='{NS_RECEIPTS}'/>",
        f"<markable xmlns='{NS_MARKERS}'/>",
    )
    got = await carol.message()
    wrapper = _cpim(got)
    assert wrapper.text() == "did you read this?"
    request = imdn.requested(wrapper)
    assert request is not None
    assert request.notifications == {"positive-delivery", "negative-delivery", "display"}
    for status, name in (
        (imdn.Disposition.DELIVERED, "received"),
        (imdn.Disposition.DISPLAYED, "displayed"),
    ):
        note = _notification(wrapper, status, carol.uri, _uri_of(bob))
        carol.send("MESSAGE", _uri_of(bob), body=note, content_type="message/cpim")
        assert (await carol.response()).status == 200
        ns = NS_RECEIPTS if name == "received" else NS_MARKERS
        marker = await _stanza(bob, carol_jid, _has_child(ns, name))
        assert _child(marker, ns, name).get("id") == sent_id  # type: ignore[union-attr]
        assert not marker["body"]


async def test_receipt_and_read_marker_sip_to_xmpp(
    carol: RawUser, xmpp_client_factory: ClientFactory
) -> None:
    bob = await xmpp_client_factory("bob")
    when = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    headers = imdn.request_headers(
        "carol-msg-1", when, ("positive-delivery", "negative-delivery", "display")
    )
    wrapped = cpim.wrap(carol.uri, _uri_of(bob), b"please confirm", extra_headers=headers)
    carol.send("MESSAGE", _uri_of(bob), body=cpim.build(wrapped), content_type="message/cpim")
    assert (await carol.response()).status == 202
    msg = await _stanza(bob, component_jid(carol.uri), lambda m: bool(m["body"]))
    assert msg["body"] == "please confirm"
    assert _child(msg, NS_RECEIPTS, "request") is not None
    assert _child(msg, NS_MARKERS, "markable") is not None
    for ns, name, disposition in (
        (NS_RECEIPTS, "received", imdn.Disposition.DELIVERED),
        (NS_MARKERS, "displayed", imdn.Disposition.DISPLAYED),
    ):
        _send(bob, str(msg["from"]), None, f"<{name} xmlns='{ns}' id='{msg['id']}'/>")
        got = await carol.message()
        wrapper = _cpim(got)
        # from the address the original was sent to
        assert wrapper.sender() == _uri_of(bob)
        assert _uri_of(bob) in (got.header("From") or "")
        note = imdn.decode_notification(wrapper.body, wrapper.content_type)
        assert (note.message_id, note.date_time, note.status) == (
            "carol-msg-1",
            when,
            disposition,
        )


async def test_negative_receipts(carol: RawUser, xmpp_client_factory: ClientFactory) -> None:
    bob = await xmpp_client_factory("bob")
    # an unregistered SIP user: the final SIP failure is an error stanza for the receipt request
    sent_id = _send(
        bob, "never-registered@sip.xmpp.test", "anyone?", f"<request xmlns='{NS_RECEIPTS}'/>"
    )
    err = await _stanza(bob, "never-registered@sip.xmpp.test", lambda m: m["type"] == "error")
    assert err["id"] == sent_id and err["error"]["condition"] == "item-not-found"
    # a registered one whose client says failed: an error stanza too
    carol_jid = component_jid(carol.uri)
    sent_id = _send(bob, carol_jid, "this fails", f"<request xmlns='{NS_RECEIPTS}'/>")
    wrapper = _cpim(await carol.message())
    note = _notification(wrapper, imdn.Disposition.FAILED, carol.uri, _uri_of(bob))
    carol.send("MESSAGE", _uri_of(bob), body=note, content_type="message/cpim")
    assert (await carol.response()).status == 200
    err = await _stanza(bob, carol_jid, lambda m: m["type"] == "error")
    assert err["id"] == sent_id and err["error"]["condition"] == "recipient-unavailable"


async def test_415_falls_back_to_plain_text_and_is_remembered(
    carol: RawUser, xmpp_client_factory: ClientFactory
) -> None:
    bob = await xmpp_client_factory("bob")
    carol_jid = component_jid(carol.uri)
    refuse = (415, "Unsupported Media Type", "Accept: text/plain")
    _send(bob, carol_jid, "first", f"<request xmlns='{NS_RECEIPTS}'/>")
    assert (await carol.message(answer=refuse)).header("Content-Type") == "message/cpim"
    again = await carol.message()
    assert (again.header("Content-Type") or "").startswith("text/plain")
    assert again.body == "first"  # the same message at once, nothing lost
    _send(bob, carol_jid, "second", f"<request xmlns='{NS_RECEIPTS}'/>")
    second = await carol.message()
    assert (second.header("Content-Type") or "").startswith("text/plain")
    assert second.body == "second"
    # isComposing refused once: no more typing to that client
    _send(bob, carol_jid, None, f"<composing xmlns='{NS_STATES}'/>")
    typing = await carol.message(answer=refuse)
    assert typing.header("Content-Type") == "application/im-iscomposing+xml"
    _send(bob, carol_jid, None, f"<paused xmlns='{NS_STATES}'/>")
    _send(bob, carol_jid, None, f"<composing xmlns='{NS_STATES}'/>")
    bob.send_chat(carol_jid, "third")
    third = await carol.message()
    assert third.body == "third"  # the typing in between never reached the client


# --- corrections and late messages ---------------------------------------------------------------


async def test_correction_reaches_sip_as_text_that_says_so(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
) -> None:
    _, kamailio = world
    alice = await pjsip_agent.add_account(f"alice{next(_users)}", kamailio)
    bob = await xmpp_client_factory("bob")
    alice_jid = component_jid(alice.uri)
    first = _send(bob, alice_jid, "meet at 5")
    assert (await alice.next_message()).body == "meet at 5"
    _send(
        bob, alice_jid, "meet at 6", f"<replace xmlns='urn:xmpp:message-correct:0' id='{first}'/>"
    )
    assert (await alice.next_message()).body == 'Correction of "meet at 5": meet at 6'
    _send(
        bob,
        alice_jid,
        "a photo",
        "<x xmlns='jabber:x:oob'><url>https://upload.xmpp.test/p.jpg</url></x>",
    )
    assert (await alice.next_message()).body == "a photo\nhttps://upload.xmpp.test/p.jpg"


async def test_late_message_carries_its_original_time(
    carol: RawUser, xmpp_client_factory: ClientFactory
) -> None:
    bob = await xmpp_client_factory("bob")
    _send(bob, component_jid(carol.uri), "written before you came back")
    first = await carol.message(answer=(480, "Temporarily Unavailable", ""))
    assert (first.header("Content-Type") or "").startswith("text/plain")
    first_seen = datetime.datetime.now(datetime.UTC)
    late = await carol.message(timeout=30)  # the retry queue's next attempt
    late_seen = datetime.datetime.now(datetime.UTC)
    wrapper = _cpim(late)
    assert wrapper.text() == "written before you came back"
    written = wrapper.date_time()
    assert written is not None
    # the time it was written (before the first attempt), not the time of the retry
    assert written <= first_seen
    assert late_seen - written > datetime.timedelta(seconds=1)


async def test_client_without_cpim_gets_plain_text_for_receipt_requests(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
) -> None:
    """PJSIP takes any body and would show a CPIM wrapper as text; its OPTIONS Accept lacks
    message/cpim, so a receipt request reaches it as plain text (receipts quietly off)."""
    _, kamailio = world
    alice = await pjsip_agent.add_account(f"alice{next(_users)}", kamailio)
    bob = await xmpp_client_factory("bob")
    _send(bob, component_jid(alice.uri), "receipt please", f"<request xmlns='{NS_RECEIPTS}'/>")
    got = await alice.next_message()
    assert got.body == "receipt please"
    assert got.content_type.startswith("text/plain")


# --- identities across a restart of the gateway process (DESIGN 4.3, 8) -------------------------


async def test_receipts_name_the_message_after_a_gateway_restart(
    tmp_path: Path, prosody: XmppServer, kamailio_factory: Callable[..., KamailioServer]
) -> None:
    """Both ways: a message asking for receipts is relayed, the gateway process is TERMed and
    started again, then the receipts and markers come, and name the original message."""
    kamailio = kamailio_factory(free_port())
    config = tmp_path / "gateway.toml"
    config.write_text(gateway_toml(prosody, kamailio, prepared_db(tmp_path)))
    gateway = GatewayProcess(config)
    bob = XmppClient(prosody.jid(f"idbob{next(_users)}"), XMPP_PASSWORD, register=True)
    carol: RawUser | None = None
    try:
        gateway.start()
        await gateway.up()
        await bob.start(prosody.c2s_port)
        carol = await RawUser.register(kamailio)
        carol_jid = component_jid(carol.uri)
        # XMPP -> SIP, asking for a receipt and a read marker
        sent_id = _send(
            bob,
            carol_jid,
            "read me after the restart",
            f"<request xmlns='{NS_RECEIPTS}'/>",
            f"<markable xmlns='{NS_MARKERS}'/>",
        )
        wrapper = _cpim(await carol.message())
        assert wrapper.text() == "read me after the restart"
        # SIP -> XMPP, asking for delivery and display notifications
        when = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        headers = imdn.request_headers(
            "carol-restart-1", when, ("positive-delivery", "negative-delivery", "display")
        )
        wrapped = cpim.wrap(carol.uri, _uri_of(bob), b"confirm later", extra_headers=headers)
        carol.send("MESSAGE", _uri_of(bob), body=cpim.build(wrapped), content_type="message/cpim")
        assert (await carol.response()).status == 202
        relayed = await _stanza(bob, carol_jid, lambda m: bool(m["body"]))
        assert _child(relayed, NS_RECEIPTS, "request") is not None

        proc = gateway.terminate()
        while proc.poll() is None:
            await asyncio.sleep(0.05)
        gateway.start()
        await gateway.up()

        # SIP -> XMPP -> notifications: the SIP user's IMDNs become markers naming sent_id
        for status, ns, name in (
            (imdn.Disposition.DELIVERED, NS_RECEIPTS, "received"),
            (imdn.Disposition.DISPLAYED, NS_MARKERS, "displayed"),
        ):
            note = _notification(wrapper, status, carol.uri, _uri_of(bob))
            carol.send("MESSAGE", _uri_of(bob), body=note, content_type="message/cpim")
            assert (await carol.response()).status == 200
            marker = await _stanza(bob, carol_jid, _has_child(ns, name))
            assert _child(marker, ns, name).get("id") == sent_id  # type: ignore[union-attr]
        # XMPP markers become IMDNs naming carol's Message-ID and DateTime
        for ns, name, disposition in (
            (NS_RECEIPTS, "received", imdn.Disposition.DELIVERED),
            (NS_MARKERS, "displayed", imdn.Disposition.DISPLAYED),
        ):
            _send(bob, str(relayed["from"]), None, f"<{name} xmlns='{ns}' id='{relayed['id']}'/>")
            got = _cpim(await carol.message())
            note_back = imdn.decode_notification(got.body, got.content_type)
            assert (note_back.message_id, note_back.date_time, note_back.status) == (
                "carol-restart-1",
                when,
                disposition,
            )
        log = gateway.log()
        assert "xmpp_marker_unmatched" not in log and "imdn_unmatched" not in log
    finally:
        if carol is not None:
            carol.close()
        await bob.stop()
        gateway.process.close()
