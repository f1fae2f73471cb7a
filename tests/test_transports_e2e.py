"""Alias transports end to end (DESIGN 3.3, 9): PJSIP <-> Kamailio <-> gateway <-> Prosody <->
biboumi <-> ngIRCd <-> a raw IRC client, every server real and on loopback.

A SIP user talks to an IRC nick (``sip:nick*server@irc.xmpp.test``) and in an IRC channel
(``sip:%23chan*server@irc.xmpp.test``, joined like a chat room); biboumi's connection chatter
reaches them as one notice; with biboumi stopped the transport is marked down, MESSAGEs to it
get 480 with Retry-After and a notice, and the channel's members are told once; started again,
the channel is rejoined. The gateway's own domain lists the transport in disco#items and shows
the SIP proxy's health as its presence.
"""

from __future__ import annotations

import asyncio
import itertools
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID

from tests.gateway_fixture import RunningGateway, component_jid, gateway_behind_kamailio, wait_until
from tests.harness.biboumi import Biboumi, ProsodyWithTransport
from tests.harness.ircd import IrcClient, IrcLine, IrcServer
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent, ReceivedMessage, SipAccount
from tests.harness.rawsip import RawSipPeer
from tests.harness.values import ALIAS_DOMAIN, COMPONENT_DOMAIN, LOOPBACK, SIP_DOMAIN
from tests.harness.xmppclient import XmppClient

pytestmark = pytest.mark.slow

CHECK_TIME = 1.0
REGISTRAR = f"sip:jabber_gateway@{SIP_DOMAIN}"
IRC_SERVER = LOOPBACK  # biboumi's server part: #chan%127.0.0.1@irc.xmpp.test
CHATTER_FROM = f"{IRC_SERVER}@{ALIAS_DOMAIN}"
_numbers = itertools.count(1)

World = tuple[RunningGateway, KamailioServer]


@pytest.fixture(scope="module")
def irc_prosody() -> Iterator[ProsodyWithTransport]:
    """A Prosody of this module's own, declaring biboumi's component beside the gateway's."""
    server = ProsodyWithTransport()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def ircd() -> Iterator[IrcServer]:
    server = IrcServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def biboumi(irc_prosody: ProsodyWithTransport, ircd: IrcServer) -> Iterator[Biboumi]:
    transport = Biboumi(irc_prosody.component_port)
    transport.start()
    yield transport
    transport.close()


@pytest.fixture
async def world(
    tmp_path: Path,
    irc_prosody: ProsodyWithTransport,
    biboumi: Biboumi,
    kamailio_factory: Callable[..., KamailioServer],
) -> AsyncIterator[World]:
    async with gateway_behind_kamailio(
        tmp_path,
        irc_prosody.component_port,
        kamailio_factory,
        timers={"check_time": CHECK_TIME},
        sip={"aliases": {ALIAS_DOMAIN: "%"}, "t1": 0.1},
    ) as w:
        yield w


@pytest.fixture
async def irc_user(ircd: IrcServer) -> AsyncIterator[IrcClient]:
    client = IrcClient(f"ircbob{next(_numbers)}")
    await client.connect(ircd)
    yield client
    await client.close()


# --- helpers ---------------------------------------------------------------------------------


def _addr(from_header: str) -> str:
    text = from_header
    if "<" in text:
        text = text.split("<", 1)[1].split(">", 1)[0]
    return urllib.parse.unquote(text.split(";", 1)[0].strip())


def _nick_uri(nick: str) -> str:
    return f"sip:{nick}*{IRC_SERVER}@{ALIAS_DOMAIN}"


def _channel_uri(channel: str) -> str:
    return f"sip:%23{channel.lstrip('#')}*{IRC_SERVER}@{ALIAS_DOMAIN}"


async def _sip_user(
    agent: PjsipAgent, kamailio: KamailioServer, biboumi: Biboumi, ircd: IrcServer
) -> SipAccount:
    account = await agent.add_account(f"sipirc{next(_numbers)}", kamailio)
    # biboumi keeps IRC server ports per user: this user reaches the test's ngIRCd directly.
    biboumi.set_irc_port(component_jid(account.uri), IRC_SERVER, ircd.port)
    return account


class Inbox:
    """Every MESSAGE a SIP account receives, kept so a test can look back at all of them."""

    def __init__(self, account: SipAccount) -> None:
        self.account = account
        self.seen: list[ReceivedMessage] = []

    async def wait(
        self, match: Callable[[ReceivedMessage], bool], timeout: float = 20.0
    ) -> ReceivedMessage:
        for msg in self.seen:
            if match(msg):
                return msg
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            try:
                msg = await self.account.next_message(timeout=max(left, 0.01))
            except TimeoutError:
                seen = [f"{_addr(m.from_uri)}: {m.body}" for m in self.seen]
                raise AssertionError(f"no matching MESSAGE; seen: {seen}") from None
            self.seen.append(msg)
            if match(msg):
                return msg

    async def settle(self, seconds: float) -> None:
        """Take in whatever arrives within ``seconds``."""
        with pytest.raises(AssertionError):
            await self.wait(lambda m: False, seconds)

    def notices(self, contains: str) -> list[str]:
        return [m.body for m in self.seen if _addr(m.from_uri) == REGISTRAR and contains in m.body]

    def from_address(self, uri: str) -> list[str]:
        return [m.body for m in self.seen if _addr(m.from_uri) == urllib.parse.unquote(uri)]


def _privmsg(to: str, text: str) -> Callable[[IrcLine], bool]:
    return lambda ln: ln.command == "PRIVMSG" and ln.params == (to, text)


# --- the tests -------------------------------------------------------------------------------


async def test_channel_joined_like_a_room_and_nick_chat_both_ways_one_chatter_notice(
    world: World,
    pjsip_agent: PjsipAgent,
    biboumi: Biboumi,
    ircd: IrcServer,
    irc_user: IrcClient,
) -> None:
    _, kamailio = world
    channel = f"#chan{next(_numbers)}"
    await irc_user.join(channel)
    alice = await _sip_user(pjsip_agent, kamailio, biboumi, ircd)
    inbox = Inbox(alice)
    # The channel: the first MESSAGE joins it (muc.auto_join) and is then said there.
    status = await alice.send_message(_channel_uri(channel), "hello channel")
    assert status.code == 202
    said = await irc_user.wait_for(_privmsg(channel, "hello channel"), 20)
    assert said.nick is not None
    room = f"{channel}%{IRC_SERVER}@{ALIAS_DOMAIN}"
    await inbox.wait(lambda m: _addr(m.from_uri) == REGISTRAR and f"You joined {room}" in m.body)
    irc_user.say(channel, "hi from IRC")
    got = await inbox.wait(lambda m: m.body.endswith("hi from IRC"))
    assert _addr(got.from_uri) == urllib.parse.unquote(_channel_uri(channel))
    assert got.body == f"{irc_user.nick}: hi from IRC"

    # The nick: biboumi is connected to the IRC server now, so private messages go through.
    status = await alice.send_message(_nick_uri(irc_user.nick), "hello from SIP")
    assert status.code == 202
    await irc_user.wait_for(_privmsg(irc_user.nick, "hello from SIP"), 20)
    irc_user.say(said.nick, "hello from IRC")
    reply = await inbox.wait(lambda m: m.body == "hello from IRC")
    # The reply comes From the alias address of the IRC nick, which replies reach.
    assert _addr(reply.from_uri) == f"sip:{irc_user.nick}*{IRC_SERVER}@{ALIAS_DOMAIN}"
    status = await alice.send_message(_addr(reply.from_uri), "and back again")
    assert status.code == 202
    await irc_user.wait_for(_privmsg(irc_user.nick, "and back again"), 20)

    # biboumi's connection steps and the server's MOTD: one notice, nothing from its address.
    await inbox.wait(lambda m: f"{CHATTER_FROM} says:" in m.body, 20)
    await inbox.settle(4.0)
    chatter = inbox.notices(f"{CHATTER_FROM} says:")
    assert len(chatter) == 1, [m.body for m in inbox.seen]
    assert "Connect" in chatter[0]
    assert inbox.from_address(f"sip:{IRC_SERVER}@{ALIAS_DOMAIN}") == []


async def test_transport_down_refused_at_once_members_told_once_then_rejoined(
    world: World,
    pjsip_agent: PjsipAgent,
    biboumi: Biboumi,
    ircd: IrcServer,
    irc_user: IrcClient,
) -> None:
    running, kamailio = world
    gateway = running.gateway
    assert gateway is not None
    channel = f"#down{next(_numbers)}"
    await irc_user.join(channel)
    alice = await _sip_user(pjsip_agent, kamailio, biboumi, ircd)
    inbox = Inbox(alice)
    assert (await alice.send_message(_channel_uri(channel), "before")).code == 202
    await irc_user.wait_for(_privmsg(channel, "before"), 20)
    await wait_until(lambda: not gateway.transport_board.is_down(ALIAS_DOMAIN), 10)

    biboumi.stop()
    loop = asyncio.get_running_loop()
    stopped = loop.time()
    await wait_until(lambda: gateway.transport_board.is_down(ALIAS_DOMAIN), 4 * CHECK_TIME + 5)
    # Marked down within two check intervals (plus one probe's answer time).
    assert loop.time() - stopped <= 2 * CHECK_TIME + 1.5
    stored = await gateway.store.transport_status(ALIAS_DOMAIN)
    assert stored is not None and not stored.up and stored.detail

    status = await alice.send_message(_nick_uri(irc_user.nick), "while down")
    assert (status.code, status.reason) == (480, "Temporarily Unavailable")
    await inbox.wait(
        lambda m: (
            _addr(m.from_uri) == REGISTRAR
            and "irc.xmpp.test is down" in m.body
            and "try again later" in m.body
        )
    )
    # Straight to the gateway, to see the Retry-After Kamailio may not pass on.
    raw = await RawSipPeer.open()
    try:
        sip_port = int(str(running.settings.sip.listen[0]).rsplit(":", 1)[1])
        raw.send(
            raw.request("MESSAGE", _nick_uri(irc_user.nick), alice.uri, _nick_uri("x"), "hi"),
            (LOOPBACK, sip_port),
        )
        answer = await raw.next(5.0)
    finally:
        raw.close()
    assert answer.status == 480
    assert answer.header("Retry-After") == str(int(CHECK_TIME))

    await inbox.settle(3 * CHECK_TIME)
    told = inbox.notices("is down: you are out of")
    assert len(told) == 1 and channel in told[0]

    mark = len(irc_user.lines)
    biboumi.start()
    await inbox.wait(lambda m: "is back up: rejoining" in m.body and channel in m.body)
    await wait_until(lambda: not gateway.transport_board.is_down(ALIAS_DOMAIN), 10)
    # The gateway joins the channel again: IRC sees the SIP user's nick come back.
    await irc_user.wait_for(
        lambda ln: ln.command == "JOIN" and ln.nick != irc_user.nick, 20, since=mark
    )
    assert (await alice.send_message(_channel_uri(channel), "after")).code == 202
    await irc_user.wait_for(_privmsg(channel, "after"), 20)
    assert len(inbox.notices("is down: you are out of")) == 1


async def _gateway_items(client: XmppClient) -> list[tuple[str, str]]:
    items = await client.plugin["xep_0030"].get_items(jid=JID(COMPONENT_DOMAIN), timeout=5)
    return [(str(jid), name or "") for jid, _node, name in items["disco_items"]["items"]]


async def _gateway_presence(client: XmppClient, show: str, timeout: float = 30.0) -> Any:
    """The next presence from the gateway's domain with ``show`` ("" for available)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        pres = await client.next_presence(timeout=max(deadline - loop.time(), 0.01))
        ours = str(pres["from"]) == COMPONENT_DOMAIN and pres["type"] in ("available", show)
        if ours and (pres["show"] or "") == show:
            return pres


async def test_gateway_domain_lists_transports_and_shows_sip_health(
    world: World, irc_prosody: ProsodyWithTransport, biboumi: Biboumi
) -> None:
    _, kamailio = world
    carol = XmppClient(f"carol{next(_numbers)}@{irc_prosody.domain}", "pw", register=True)
    await carol.start(irc_prosody.c2s_port)
    try:
        # XEP-0100 is still served on the component domain.
        iq = carol.make_iq_get(queryxmlns="jabber:iq:gateway", ito=COMPONENT_DOMAIN)
        answer = await iq.send(timeout=5)  # type: ignore[no-untyped-call]
        assert "SIP address" in str(answer)

        async def listed(state: str) -> bool:
            return (ALIAS_DOMAIN, f"Transport {ALIAS_DOMAIN} ({state})") in (
                await _gateway_items(carol)
            )

        await _until(lambda: listed("up"), 10)
        carol.subscribe(COMPONENT_DOMAIN)
        available = await _gateway_presence(carol, "")
        assert "answers" in str(available["status"])

        kamailio.stop()
        away = await _gateway_presence(carol, "xa")
        assert "does not answer OPTIONS" in str(away["status"])
        kamailio.start()
        await _gateway_presence(carol, "")

        biboumi.stop()
        await _until(lambda: listed("down"), 4 * CHECK_TIME + 5)
    finally:
        await carol.stop()


async def _until(check: Callable[[], Any], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.2)
