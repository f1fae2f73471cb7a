"""The harness itself: each real server starts from the repository's snippets and does its job.

These are the smoke tests every end-to-end test relies on: if one fails, the servers or the
snippets are broken, not the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent
from tests.harness.ports import free_port
from tests.harness.prosody import ProsodyServer
from tests.harness.rawsip import RawSipPeer, digest_authorization
from tests.harness.values import (
    COMPONENT_DOMAIN,
    COMPONENT_SECRET,
    GATEWAY_AUTH_PASSWORD,
    GATEWAY_AUTH_USER,
    JDOMAIN,
    SIP_DOMAIN,
)
from tests.harness.xmppclient import XmppClient, XmppComponent
from tests.harness.xmppserver import XmppServer

pytestmark = pytest.mark.slow

ClientFactory = Callable[[str], Awaitable[XmppClient]]
AgentFactory = Callable[[], Awaitable[PjsipAgent]]


# --- XMPP servers (each test runs on Prosody and on ejabberd) ---------------------------------


async def test_two_clients_exchange_a_message(xmpp_client_factory: ClientFactory) -> None:
    alice = await xmpp_client_factory("alice")
    bob = await xmpp_client_factory("bob")
    alice.send_chat(bob.boundjid.bare, "hello bob")
    msg = await bob.next_message(with_body=True)
    assert msg["body"] == "hello bob"
    assert msg["from"].bare == alice.boundjid.bare


async def test_component_receives_and_answers(
    xmpp_server: XmppServer, xmpp_client_factory: ClientFactory
) -> None:
    alice = await xmpp_client_factory("alice")
    component = XmppComponent(COMPONENT_DOMAIN, COMPONENT_SECRET)
    try:
        await component.start(xmpp_server.component_port)
        alice.send_chat(f"someone@{COMPONENT_DOMAIN}", "to the gateway")
        incoming = await component.next_message(with_body=True)
        assert incoming["body"] == "to the gateway"
        assert incoming["to"].bare == f"someone@{COMPONENT_DOMAIN}"
        assert incoming["from"] == alice.boundjid

        component.send_message(
            mto=incoming["from"],
            mfrom=f"someone@{COMPONENT_DOMAIN}/sip",
            mbody="from the gateway",
            mtype="chat",
        )
        answer = await alice.next_message(with_body=True)
        assert answer["body"] == "from the gateway"
        assert answer["from"].bare == f"someone@{COMPONENT_DOMAIN}"
    finally:
        await component.stop()


async def test_component_with_a_wrong_secret_is_refused(xmpp_server: XmppServer) -> None:
    component = XmppComponent(COMPONENT_DOMAIN, "not-the-secret")
    try:
        with pytest.raises((ConnectionError, TimeoutError)):
            await component.start(xmpp_server.component_port, timeout=5)
    finally:
        await component.stop()


async def test_room_join_and_groupchat(
    xmpp_server: XmppServer, xmpp_client_factory: ClientFactory
) -> None:
    alice = await xmpp_client_factory("alice")
    bob = await xmpp_client_factory("bob")
    room = f"harness{id(alice) % 100000}@{xmpp_server.muc_domain}"
    await alice.join_room(room, "alice")
    await bob.join_room(room, "bob")
    bob.send_groupchat(room, "hello room")
    for client in (alice, bob):
        msg = await client.next_message(with_body=True)
        assert msg["type"] == "groupchat"
        assert msg["body"] == "hello room"
        assert str(msg["from"]) == f"{room}/bob"


def test_restart_keeps_accounts(xmpp_server: XmppServer) -> None:
    xmpp_server.register("restarter", "pw")
    before = len(xmpp_server.start_times)
    xmpp_server.restart()
    assert len(xmpp_server.start_times) == before + 1

    async def login() -> None:
        client = XmppClient(xmpp_server.jid("restarter"), "pw")
        try:
            await client.start(xmpp_server.c2s_port)
        finally:
            await client.stop()

    asyncio.run(login())


# --- Kamailio and PJSIP -----------------------------------------------------------------------


@pytest.mark.parametrize(("alice_transport", "bob_transport"), [("udp", "tcp"), ("tcp", "udp")])
async def test_registered_agents_exchange_messages(
    kamailio: KamailioServer, pjsip_factory: AgentFactory, alice_transport: str, bob_transport: str
) -> None:
    # Two processes, as two phones would be.
    alice = await (await pjsip_factory()).add_account("alice", kamailio, transport=alice_transport)
    bob = await (await pjsip_factory()).add_account("bob", kamailio, transport=bob_transport)

    status = await alice.send_message(bob.uri, "hello bob")
    assert status.code == 200
    msg = await bob.next_message()
    assert (msg.body, msg.content_type) == ("hello bob", "text/plain")
    assert alice.uri in msg.from_uri
    via = msg.header("Via") or ""
    assert f"SIP/2.0/{bob_transport.upper()}" in via

    status = await bob.send_message(alice.uri, "hello alice", "text/plain; charset=UTF-8")
    assert status.code == 200
    assert (await alice.next_message()).body == "hello alice"


async def test_large_message_to_a_udp_user_goes_over_tcp(
    kamailio: KamailioServer, pjsip_factory: AgentFactory
) -> None:
    # RFC 3261 18.1.1 (Kamailio's udp_mtu): over 1300 bytes, the next hop is reached by TCP on
    # the port registered over UDP; the PJSIP agent listens on both there.
    alice = await (await pjsip_factory()).add_account("alice", kamailio)
    bob = await (await pjsip_factory()).add_account("bob", kamailio)
    body = "x" * 3000
    assert (await alice.send_message(bob.uri, body)).code == 200
    msg = await bob.next_message()
    assert msg.body == body
    assert (msg.header("Via") or "").startswith("SIP/2.0/TCP")


async def test_unregistered_user_gets_404(
    kamailio: KamailioServer, pjsip_agent: PjsipAgent
) -> None:
    alice = await pjsip_agent.add_account("alice", kamailio)
    status = await alice.send_message(f"sip:nobody@{SIP_DOMAIN}", "anyone?")
    assert status.code == 404
    # And after unregistering, alice is such a user too.
    bob = await pjsip_agent.add_account("bob", kamailio)
    assert (await alice.unregister()).expiration == 0
    assert (await bob.send_message(alice.uri, "gone?")).code == 404


@pytest.mark.parametrize(
    "target",
    [
        f"sip:bob*xmpp.test@{JDOMAIN}",
        "sip:room*conference.xmpp.test@jabber.sip.test",
        "sip:chan*irc.example.net@irc.xmpp.test",
    ],
)
async def test_gateway_domains_are_routed_to_the_gateway(
    kamailio_factory: Callable[..., KamailioServer], pjsip_agent: PjsipAgent, target: str
) -> None:
    gateway = await RawSipPeer.open()
    try:
        kamailio = kamailio_factory(gateway.port)
        alice = await pjsip_agent.add_account("alice", kamailio)
        sending = asyncio.create_task(alice.send_message(target, "to xmpp"))
        request = await gateway.next()
        assert request.method == "MESSAGE"
        assert request.uri == target  # RFC 3261 16.6: the proxy keeps the Request-URI
        assert request.body == "to xmpp"
        assert alice.uri in (request.header("From") or "")
        gateway.send(request.response(202, "Accepted"), request.source)
        assert (await sending).code == 202
    finally:
        gateway.close()


async def test_other_domains_are_not_relayed(
    kamailio_factory: Callable[..., KamailioServer], pjsip_agent: PjsipAgent
) -> None:
    gateway = await RawSipPeer.open()
    try:
        kamailio = kamailio_factory(gateway.port)
        alice = await pjsip_agent.add_account("alice", kamailio)
        status = await alice.send_message("sip:bob@elsewhere.example", "relay me")
        assert status.code == 403
        assert gateway.received.empty()
    finally:
        gateway.close()


async def test_copy_register_mode_copies_registrations_to_the_gateway(
    kamailio_factory: Callable[..., KamailioServer], pjsip_agent: PjsipAgent
) -> None:
    gateway = await RawSipPeer.open()
    try:
        kamailio = kamailio_factory(gateway.port, copy_register=True)
        registering = asyncio.create_task(pjsip_agent.add_account("alice", kamailio))
        copy = await gateway.next()
        assert copy.method == "REGISTER"
        assert "sip:alice@sip.test" in (copy.header("To") or "")
        gateway.send(copy.response(200, "OK"), copy.source)
        alice = await registering  # answered by the registrar, not by the gateway
        assert (await alice.unregister()).expiration == 0
        copy = await gateway.next()
        assert copy.method == "REGISTER"
        assert copy.header("Expires") == "0" or "expires=0" in (copy.header("Contact") or "")
    finally:
        gateway.close()


@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
async def test_challenge_mode_demands_credentials_from_the_gateway(
    kamailio_factory: Callable[..., KamailioServer], pjsip_agent: PjsipAgent, algorithm: str
) -> None:
    gateway = await RawSipPeer.open()
    try:
        kamailio = kamailio_factory(gateway.port, auth_gateway=True, auth_algorithm=algorithm)
        alice = await pjsip_agent.add_account("alice", kamailio)  # users are not challenged
        proxy = (kamailio.host, kamailio.port)
        sender = f"sip:bob*xmpp.test@{JDOMAIN}"

        gateway.send(gateway.request("MESSAGE", alice.uri, sender, alice.uri, "one"), proxy)
        challenge = await gateway.next()
        assert challenge.status == 407
        offer = challenge.header("Proxy-Authenticate") or ""
        assert f"algorithm={algorithm}" in offer

        wrong = digest_authorization(offer, "MESSAGE", alice.uri, GATEWAY_AUTH_USER, "wrong")
        gateway.send(
            gateway.request("MESSAGE", alice.uri, sender, alice.uri, "two", extra=(wrong,)), proxy
        )
        assert (await gateway.next()).status == 407

        right = digest_authorization(
            offer, "MESSAGE", alice.uri, GATEWAY_AUTH_USER, GATEWAY_AUTH_PASSWORD
        )
        gateway.send(
            gateway.request("MESSAGE", alice.uri, sender, alice.uri, "three", extra=(right,)),
            proxy,
        )
        assert (await gateway.next()).status == 200
        received = await alice.next_message()
        assert received.body == "three"
        assert received.header("Proxy-Authorization") is None  # consumed by the proxy
    finally:
        gateway.close()


async def test_presence_mode_serves_publish_and_subscribe(
    kamailio_factory: Callable[..., KamailioServer], pjsip_factory: AgentFactory
) -> None:
    kamailio = kamailio_factory(presence=True)
    alice = await (await pjsip_factory()).add_account("alice", kamailio, publish=True)
    bob = await (await pjsip_factory()).add_account("bob", kamailio)
    await alice.publish("busy", "in a meeting")
    await bob.subscribe(alice.uri)
    # The first NOTIFY may come before the publication is stored; wait for the busy one.
    for _ in range(10):
        state = await bob.next_buddy_state()
        if state.online and state.activity == "busy":
            break
    assert state.sub_state == "ACTIVE"
    assert (state.online, state.activity, state.note) == (True, "busy", "in a meeting")


def test_gateway_toml_matches_the_servers() -> None:
    from component.settings import load_settings

    xmpp, kamailio = ProsodyServer(), KamailioServer(gateway_port=free_port())
    try:
        path = xmpp.dir / "gateway.toml"
        path.write_text(gateway_toml(xmpp, kamailio))
        settings = load_settings(path)
        assert settings.xmpp.port == xmpp.component_port
        assert settings.sip.proxy == kamailio.uri
        assert {spec.port for spec in settings.sip.listen} == {kamailio.gateway_port}
    finally:
        xmpp.close()
        kamailio.close()


def test_a_crashed_server_is_started_again(xmpp_server: XmppServer) -> None:
    # What a segfault leaves behind: the process group is gone, the data dir stays.
    xmpp_server.process.stop()
    assert not xmpp_server.process.running
    assert xmpp_server.ensure_running()
    assert xmpp_server.process.running
    assert not xmpp_server.ensure_running()
    xmpp_server.register("survivor", "pw")
