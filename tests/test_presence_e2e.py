"""Presence end to end (DESIGN 5): PJSIP <-> Kamailio (presence server, registrar) <-> gateway
<-> Prosody/ejabberd <-> slixmpp clients, every server real and on loopback. Runs once per XMPP
server.

Presence arrives asynchronously and servers add presences of their own (a probe answer, a
re-announce), so the helpers wait for the first stanza or buddy state that matches and report
everything they skipped when none does.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.gateway_fixture import RunningGateway, gateway_settings, prepared_db, wait_until
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import BuddyState, PjsipAgent, SipAccount
from tests.harness.ports import free_port
from tests.harness.values import COMPONENT_DOMAIN, JDOMAIN, SIP_DOMAIN
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

pytestmark = pytest.mark.slow

ClientFactory = Callable[[str], Awaitable[XmppClient]]
World = tuple[RunningGateway, KamailioServer]
WorldFactory = Callable[..., Awaitable[World]]

REGISTRAR = f"sip:jabber_gateway@{SIP_DOMAIN}"
EXPIRES = 8  # registration lifetime in the expiry test; the harness's Kamailio accepts >= 5 s
_sip_users = itertools.count(1)


@pytest.fixture
async def world_factory(
    tmp_path: Path,
    xmpp_server: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
) -> AsyncIterator[WorldFactory]:
    """Make Kamailio plus a running gateway on the XMPP server under test; stopped afterwards.

    ``sip_server=True``: Kamailio runs its presence server and the gateway subscribes there
    (DESIGN 5.3). ``sip_server=False``: no presence server; Kamailio copies REGISTERs to the
    gateway, which derives the SIP users' state itself (DESIGN 5.4).
    """
    running: list[RunningGateway] = []

    async def make(*, sip_server: bool) -> World:
        sip_port = free_port()
        kamailio = kamailio_factory(sip_port, presence=sip_server, copy_register=not sip_server)
        settings = gateway_settings(
            xmpp_port=xmpp_server.component_port,
            sip_port=sip_port,
            proxy=kamailio.uri,
            db_url=prepared_db(tmp_path),
            presence={"sip_server": sip_server},
        )
        gateway = RunningGateway(settings)
        running.append(gateway)
        await gateway.start()
        return gateway, kamailio

    yield make
    for gateway in running:
        await gateway.stop()


# --- addresses ------------------------------------------------------------------------------


def _sip_name() -> str:
    return f"alice{next(_sip_users)}"


def _jid_of_sip_user(name: str) -> str:
    """DESIGN 3.1: sip:alice@sip.test is alice@sip.xmpp.test."""
    return f"{name}@{COMPONENT_DOMAIN}"


def _component_jid(account: SipAccount) -> str:
    return _jid_of_sip_user(account.uri.split(":", 1)[1].split("@", 1)[0])


def _sip_uri_of(client: XmppClient) -> str:
    """DESIGN 3.2: bob@xmpp.test is sip:bob*xmpp.test@jabber.sip.test."""
    user, domain = str(client.boundjid.bare).split("@")
    return f"sip:{user}*{domain}@{JDOMAIN}"


async def _bob(factory: ClientFactory) -> XmppClient:
    """An XMPP user who decides on subscription requests himself (slixmpp approves by default)."""
    bob = await factory("bob")
    bob.auto_authorize = None
    bob.auto_subscribe = False
    return bob


# --- waiting for what the other side sees ---------------------------------------------------


def _kind(pres: Any) -> str:
    """One word per presence: a type (subscribed, unavailable...), else the show or available.

    slixmpp's ``pres["type"]`` already folds it that way: an available presence reports its
    show (or "available") there.
    """
    return str(pres["type"])


async def _presence(
    client: XmppClient,
    sender: str,
    kind: str,
    status: str | None = None,
    timeout: float = 10.0,
) -> Any:
    """The first presence from ``sender`` (bare JID) of ``kind`` (and ``status``, if given)."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            pres = await client.next_presence(timeout=max(0.01, deadline - loop.time()))
        except TimeoutError:
            raise AssertionError(
                f"{client.boundjid.bare} saw no presence {kind!r} status {status!r} from "
                f"{sender} within {timeout} s; saw {seen}"
            ) from None
        if str(pres["from"].bare) != sender:
            continue
        seen.append(f"{_kind(pres)}/{pres['status']!r}")
        if _kind(pres) == kind and (status is None or pres["status"] == status):
            return pres


async def _no_presence(client: XmppClient, sender: str, status: str, quiet: float = 2.0) -> None:
    """Nothing with ``status`` from ``sender`` arrives within ``quiet`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + quiet
    while (left := deadline - loop.time()) > 0:
        try:
            pres = await client.next_presence(timeout=left)
        except TimeoutError:
            return
        got = str(pres["from"].bare) == sender and pres["status"] == status
        assert not got, f"presence {_kind(pres)} {status!r} from {sender} after the unsubscribe"


async def _buddy(
    account: SipAccount,
    uri: str,
    what: str,
    predicate: Callable[[BuddyState], bool],
    timeout: float = 10.0,
) -> BuddyState:
    """The first buddy state of ``uri`` (as PJSIP understood a NOTIFY) that satisfies it."""
    seen: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            state = await account.next_buddy_state(timeout=max(0.01, deadline - loop.time()))
        except TimeoutError:
            raise AssertionError(
                f"{account.uri} never saw {uri} {what} within {timeout} s; saw {seen}"
            ) from None
        if state.uri != uri:
            continue
        seen.append(
            f"{state.sub_state}/{state.status}/{state.activity}/{state.note!r}"
            f"/{state.term_code} {state.term_reason}"
        )
        if predicate(state):
            return state


def _online_with(activity: str, note: str) -> Callable[[BuddyState], bool]:
    return lambda s: s.online and s.activity == activity and s.note == note


# --- 1. an XMPP user watches a SIP user (DESIGN 5.3) -----------------------------------------

# (what alice publishes, her note) -> (what bob sees, its status); DESIGN 5.1 read backwards.
SIP_TO_XMPP_STATES = [
    ("online", "", "available", None),
    ("away", "at lunch", "away", "at lunch"),
    ("busy", "in a meeting", "dnd", "in a meeting"),
    ("offline", "", "unavailable", None),
    ("online", "back", "available", "back"),
]


async def test_xmpp_user_watches_sip_user(
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
    world_factory: WorldFactory,
) -> None:
    running, kamailio = await world_factory(sip_server=True)
    alice = await pjsip_agent.add_account(_sip_name(), kamailio, publish=True)
    bob = await _bob(xmpp_client_factory)
    alice_jid = _component_jid(alice)
    bob.subscribe(alice_jid)
    await _presence(bob, alice_jid, "subscribed")
    for published, note, kind, status in SIP_TO_XMPP_STATES:
        await alice.publish(published, note)
        await _presence(bob, alice_jid, kind, status)
    # PJSIP withdraws its publication when it unregisters: Kamailio's NOTIFY has no state left.
    state = await alice.unregister()
    assert state.code == 200
    await _presence(bob, alice_jid, "unavailable")
    gateway = running.gateway
    assert gateway is not None
    assert gateway.sip_side.counts()["xmpp_watchers"] == 1
    bob.unsubscribe(alice_jid)
    # The subscriber is dropped only once the SIP subscription is terminated (RFC 6665 4.1.2.3).
    await wait_until(lambda: gateway.sip_side.counts()["xmpp_watchers"] == 0, 10)
    assert await gateway.store.xmpp_watcher_subscriptions() == []
    assert (await alice.register()).code == 200
    await alice.publish("away", "after the unsubscribe")
    await _no_presence(bob, alice_jid, "after the unsubscribe")


# --- 2. a SIP user watches an XMPP user (DESIGN 5.2) -----------------------------------------

# (bob's show, his status) -> (what alice's PJSIP shows: activity, note)
XMPP_TO_SIP_STATES = [
    ("away", "walking the dog", "away", "walking the dog"),
    ("dnd", "in a call", "busy", "in a call"),
]


async def test_sip_user_watches_xmpp_user(
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
    world_factory: WorldFactory,
) -> None:
    running, kamailio = await world_factory(sip_server=True)
    alice = await pjsip_agent.add_account(_sip_name(), kamailio)
    bob = await _bob(xmpp_client_factory)
    bob_uri, alice_jid = _sip_uri_of(bob), _component_jid(alice)
    await alice.subscribe(bob_uri)
    await _presence(bob, alice_jid, "subscribe")
    pending = await _buddy(alice, bob_uri, "pending", lambda s: s.sub_state == "PENDING")
    assert not pending.online
    bob.approve(alice_jid)
    await _buddy(alice, bob_uri, "online", lambda s: s.online and s.sub_state == "ACTIVE")
    for show, status, activity, note in XMPP_TO_SIP_STATES:
        bob.send_presence(pshow=show, pstatus=status)
        await _buddy(alice, bob_uri, f"{activity} {note!r}", _online_with(activity, note))
    bob.send_presence(ptype="unavailable")
    await _buddy(alice, bob_uri, "offline", lambda s: not s.online and s.status == "offline")
    bob.send_presence()
    await _buddy(alice, bob_uri, "online again", lambda s: s.online and s.activity == "unknown")
    gateway = running.gateway
    assert gateway is not None
    assert gateway.sip_side.counts()["sip_watchers"] == 1
    await alice.unsubscribe(bob_uri)
    await _presence(bob, alice_jid, "unsubscribe")
    await wait_until(lambda: gateway.sip_side.counts()["sip_watchers"] == 0, 10)


async def test_xmpp_user_refuses_sip_watcher(
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
    world_factory: WorldFactory,
) -> None:
    running, kamailio = await world_factory(sip_server=True)
    alice = await pjsip_agent.add_account(_sip_name(), kamailio)
    bob = await _bob(xmpp_client_factory)
    bob_uri, alice_jid = _sip_uri_of(bob), _component_jid(alice)
    await alice.subscribe(bob_uri)
    await _presence(bob, alice_jid, "subscribe")
    bob.send_presence(pto=alice_jid, ptype="unsubscribed")
    # DESIGN 5.2: refusal -> NOTIFY terminated;reason=rejected.
    ended = await _buddy(alice, bob_uri, "terminated", lambda s: s.sub_state == "TERMINATED")
    assert ended.term_reason == "rejected"
    assert not ended.online
    gateway = running.gateway
    assert gateway is not None
    await wait_until(lambda: gateway.sip_side.counts()["sip_watchers"] == 0, 10)


# --- 3. both directions survive a gateway restart (DESIGN 5.3, 8) ----------------------------


async def test_subscriptions_survive_gateway_restart(
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
    world_factory: WorldFactory,
) -> None:
    running, kamailio = await world_factory(sip_server=True)
    alice = await pjsip_agent.add_account(_sip_name(), kamailio, publish=True)
    bob = await _bob(xmpp_client_factory)
    bob_uri, alice_jid = _sip_uri_of(bob), _component_jid(alice)
    bob.subscribe(alice_jid)
    await _presence(bob, alice_jid, "subscribed")
    await alice.subscribe(bob_uri)
    await _presence(bob, alice_jid, "subscribe")
    bob.approve(alice_jid)
    await _buddy(alice, bob_uri, "online", lambda s: s.online and s.sub_state == "ACTIVE")

    await running.stop()
    gateway = await running.start()
    counts = gateway.sip_side.counts()
    assert (counts["sip_watchers"], counts["xmpp_watchers"]) == (1, 1), counts

    await alice.publish("away", "after the restart")
    await _presence(bob, alice_jid, "away", "after the restart")
    bob.send_presence(pshow="dnd", pstatus="restarted too")
    await _buddy(alice, bob_uri, "busy after restart", _online_with("busy", "restarted too"))
    # Nobody had to subscribe again: the dialogs are the ones from before the restart.
    counts = gateway.sip_side.counts()
    assert (counts["sip_watchers"], counts["xmpp_watchers"]) == (1, 1), counts


# --- 4. online and offline from copied REGISTERs (DESIGN 5.4) -------------------------------


async def test_copied_register_makes_sip_user_online_and_offline(
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
    world_factory: WorldFactory,
) -> None:
    _, kamailio = await world_factory(sip_server=False)
    name = _sip_name()
    alice_jid = _jid_of_sip_user(name)
    bob = await _bob(xmpp_client_factory)
    bob.subscribe(alice_jid)
    # No presence server: the gateway approves at once (DESIGN 5.3); alice was never seen.
    await _presence(bob, alice_jid, "subscribed")
    await _presence(bob, alice_jid, "unavailable")
    alice = await pjsip_agent.add_account(name, kamailio)
    await _presence(bob, alice_jid, "available")
    assert (await alice.unregister()).code == 200
    await _presence(bob, alice_jid, "unavailable")
    assert (await alice.register()).code == 200
    await _presence(bob, alice_jid, "available")


async def test_registration_expiry_makes_sip_user_offline(
    pjsip_factory: Callable[[], Awaitable[PjsipAgent]],
    xmpp_client_factory: ClientFactory,
    world_factory: WorldFactory,
) -> None:
    _, kamailio = await world_factory(sip_server=False)
    # An agent of its own, killed below: a UA that vanishes without unregistering.
    agent = await pjsip_factory()
    alice = await agent.add_account(_sip_name(), kamailio, expires=EXPIRES)
    alice_jid = _component_jid(alice)
    bob = await _bob(xmpp_client_factory)
    bob.subscribe(alice_jid)
    await _presence(bob, alice_jid, "subscribed")
    await _presence(bob, alice_jid, "available")
    agent.proc.kill()
    # The gateway's sweep (sleep_time 1 s in the test settings) finds the expired registration.
    await _presence(bob, alice_jid, "unavailable", timeout=EXPIRES + 5)


# --- 5. commands to sip.registrar (DESIGN 5.4) ---------------------------------------------

# (command alice sends) -> (what bob sees, its status, a word of the notice alice gets)
COMMANDS = [
    ("away gone fishing", "away", "gone fishing", "away"),
    ("dnd do not call", "dnd", "do not call", "busy"),
    ("offline", "unavailable", None, "offline"),
    ("online", "available", None, "online"),
]


async def test_commands_to_the_registrar(
    pjsip_agent: PjsipAgent,
    xmpp_client_factory: ClientFactory,
    world_factory: WorldFactory,
) -> None:
    _, kamailio = await world_factory(sip_server=False)
    alice = await pjsip_agent.add_account(_sip_name(), kamailio)
    alice_jid = _component_jid(alice)
    bob = await _bob(xmpp_client_factory)
    bob.subscribe(alice_jid)
    await _presence(bob, alice_jid, "subscribed")
    await _presence(bob, alice_jid, "available")
    for command, kind, status, word in COMMANDS:
        answer = await alice.send_message(REGISTRAR, command)
        assert answer.code == 200, f"{command!r}: {answer.code} {answer.reason}"
        await _presence(bob, alice_jid, kind, status)
        notice = await alice.next_message()
        assert REGISTRAR in notice.from_uri
        assert word in notice.body, notice.body
    assert (await alice.send_message(REGISTRAR, "help")).code == 200
    notice = await alice.next_message()
    for name in ("online", "offline", "away", "dnd", "help"):
        assert name in notice.body, notice.body
    assert (await alice.send_message(REGISTRAR, "dance")).code == 200
    assert "Unknown command" in (await alice.next_message()).body
