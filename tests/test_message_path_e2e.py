"""The message path end to end (DESIGN 4): PJSIP <-> Kamailio <-> gateway <-> Prosody/ejabberd
<-> slixmpp clients, every server real and on loopback. Runs once per XMPP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_fixture import RunningGateway, component_jid, gateway_behind_kamailio, wait_until
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent, SipAccount
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

pytestmark = pytest.mark.slow

ClientFactory = Callable[[str], Awaitable[XmppClient]]
_sip_users = iter(range(1, 10_000))


@pytest.fixture
async def world(
    tmp_path: Path,
    xmpp_server: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
) -> AsyncIterator[tuple[RunningGateway, KamailioServer]]:
    """Kamailio in front of a running gateway connected to the XMPP server under test."""
    async with gateway_behind_kamailio(tmp_path, xmpp_server.component_port, kamailio_factory) as w:
        yield w


async def _sip_user(
    agent: PjsipAgent, kamailio: KamailioServer, transport: str = "udp"
) -> SipAccount:
    return await agent.add_account(f"alice{next(_sip_users)}", kamailio, transport=transport)


def _component_jid(account: SipAccount) -> str:
    return component_jid(account.uri)


def _sip_uri_of(client: XmppClient) -> str:
    user, domain = str(client.boundjid.bare).split("@")
    return f"sip:{user}*{domain}@jabber.sip.test"


async def _chat_from(client: XmppClient, sender_bare: str, timeout: float = 10.0) -> Any:
    """The next message with a body from ``sender_bare`` (skipping others)."""
    while True:
        msg = await client.next_message(timeout=timeout, with_body=True)
        if str(msg["from"].bare) == sender_bare:
            return msg


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_sip_to_xmpp_and_reply(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
    transport: str,
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio, transport)
    bob = await xmpp_client_factory("bob")
    text = "Grüße, 你好 <&>'\" ✓"
    status = await alice.send_message(_sip_uri_of(bob), text)
    assert status.code == 202
    msg = await _chat_from(bob, _component_jid(alice))
    assert msg["body"] == text
    assert msg["type"] == "chat"
    # replying to what arrived reaches the original sender
    msg.reply("and back: ÄÖÜ <ok>").send()
    got = await alice.next_message()
    assert got.body == "and back: ÄÖÜ <ok>"
    assert got.from_uri.strip("<>").startswith(_sip_uri_of(bob))


async def test_xmpp_to_sip_and_reply(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    bob = await xmpp_client_factory("bob")
    bob.send_chat(_component_jid(alice), "hello from xmpp & co")
    got = await alice.next_message()
    assert got.body == "hello from xmpp & co"
    assert "text/plain" in got.content_type
    from_uri = got.from_uri.strip("<>").split(";")[0]
    assert from_uri == _sip_uri_of(bob)
    status = await alice.send_message(from_uri, "reply to the From")
    assert status.code == 202
    reply = await _chat_from(bob, _component_jid(alice))
    assert reply["body"] == "reply to the From"


async def test_3kb_bodies_both_ways(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio, "tcp")
    bob = await xmpp_client_factory("bob")
    big = ("0123456789abcdef" * 200)[:3000] + " end"
    bob.send_chat(_component_jid(alice), big)
    got = await alice.next_message()
    assert got.body == big  # over 1300 bytes: the gateway sent it over TCP (RFC 3261 18.1.1)
    status = await alice.send_message(_sip_uri_of(bob), big)
    assert status.code == 202
    msg = await _chat_from(bob, _component_jid(alice))
    assert msg["body"] == big


async def test_unknown_xmpp_user_gives_sip_sender_a_notice(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_server: XmppServer,
) -> None:
    _, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    status = await alice.send_message("sip:nobody-here*xmpp.test@jabber.sip.test", "anyone?")
    assert status.code == 202
    notice = await alice.next_message(timeout=15)
    assert "sip:jabber_gateway@sip.test" in notice.from_uri
    assert "nobody-here@xmpp.test" in notice.body
    assert "not delivered" in notice.body


async def test_unregistered_sip_user_gives_xmpp_sender_an_error(
    world: tuple[RunningGateway, KamailioServer],
    xmpp_client_factory: ClientFactory,
) -> None:
    bob = await xmpp_client_factory("bob")
    bob.send_chat("never-registered@sip.xmpp.test", "hello?")
    while True:
        msg = await bob.next_message(timeout=15)
        if msg["type"] == "error":
            break
    assert msg["error"]["condition"] == "item-not-found"
    assert str(msg["from"].bare) == "never-registered@sip.xmpp.test"


async def test_gateway_restart_while_xmpp_server_stays_up(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
) -> None:
    running, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    bob = await xmpp_client_factory("bob")
    await running.stop()
    await running.start()
    status = await alice.send_message(_sip_uri_of(bob), "after gateway restart")
    assert status.code == 202
    assert (await _chat_from(bob, _component_jid(alice)))["body"] == "after gateway restart"
    bob.send_chat(_component_jid(alice), "xmpp side after restart")
    assert (await alice.next_message()).body == "xmpp side after restart"


async def test_xmpp_server_restart_while_gateway_stays_up(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    xmpp_server: XmppServer,
    xmpp_client_factory: ClientFactory,
) -> None:
    running, kamailio = world
    alice = await _sip_user(pjsip_agent, kamailio)
    gateway = running.gateway
    assert gateway is not None
    await asyncio.get_running_loop().run_in_executor(None, xmpp_server.restart)
    # the link comes back by itself (capped backoff), without a gateway restart
    await wait_until(lambda: gateway.xmpp.connected, 60)
    assert running.gateway is gateway
    bob = await xmpp_client_factory("bob")
    status = await alice.send_message(_sip_uri_of(bob), "after server restart")
    assert status.code == 202
    assert (await _chat_from(bob, _component_jid(alice)))["body"] == "after server restart"
    bob.send_chat(_component_jid(alice), "and back")
    assert (await alice.next_message()).body == "and back"
