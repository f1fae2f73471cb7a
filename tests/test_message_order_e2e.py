"""Bursts and the retry queue end to end (DESIGN 4.2, 8): slixmpp -> Prosody -> gateway ->
Kamailio -> PJSIP, every server real and on loopback. Prosody only: the rules are the router's,
the XMPP server only carries the stanzas."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.conftest import XMPP_PASSWORD
from tests.gateway_fixture import RunningGateway, component_jid, gateway_behind_kamailio, wait_until
from tests.harness.kamailio import KamailioServer
from tests.harness.pjsip import PjsipAgent, SipAccount
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer

pytestmark = pytest.mark.slow

_numbers = itertools.count(1)


@pytest.fixture
async def world(
    tmp_path: Path, prosody: XmppServer, kamailio_factory: Callable[..., KamailioServer]
) -> AsyncIterator[tuple[RunningGateway, KamailioServer]]:
    """Kamailio in front of a running gateway connected to the XMPP server under test."""
    async with gateway_behind_kamailio(tmp_path, prosody.component_port, kamailio_factory) as w:
        yield w


@pytest.fixture
async def bob(prosody: XmppServer) -> AsyncIterator[XmppClient]:
    """A fresh XMPP user, registered in-band and logged in."""
    client = XmppClient(prosody.jid(f"burst{next(_numbers)}"), XMPP_PASSWORD, register=True)
    await client.start(prosody.c2s_port)
    yield client
    await client.stop()


def _component_jid(account: SipAccount) -> str:
    return component_jid(account.uri)


def _errors(client: XmppClient) -> list[str]:
    """Conditions of the error stanzas the client has received and not read yet."""
    errors = []
    while not client.messages.empty():
        msg = client.messages.get_nowait()
        if msg["type"] == "error":
            errors.append(str(msg["error"]["condition"]))
    return errors


async def test_burst_of_50_arrives_complete_and_in_order(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    bob: XmppClient,
) -> None:
    running, kamailio = world
    alice = await pjsip_agent.add_account(f"order{next(_numbers)}", kamailio)
    bodies = [f"burst {n:02}" for n in range(50)]
    for body in bodies:
        bob.send_chat(_component_jid(alice), body)
    got = [(await alice.next_message(timeout=30)).body for _ in bodies]
    assert got == bodies
    assert _errors(bob) == []
    assert running.gateway is not None and running.gateway.router.counters["refused"] == 0


async def test_404_after_a_delivered_message_is_retried(
    world: tuple[RunningGateway, KamailioServer],
    pjsip_agent: PjsipAgent,
    bob: XmppClient,
) -> None:
    running, kamailio = world
    alice = await pjsip_agent.add_account(f"grace{next(_numbers)}", kamailio)
    bob.send_chat(_component_jid(alice), "first")
    assert (await alice.next_message(timeout=15)).body == "first"
    assert (await alice.unregister()).code == 200
    # Kamailio now answers 404: for a user who got a message before, that means offline.
    bob.send_chat(_component_jid(alice), "while away")
    store = running.store
    assert store is not None
    await wait_until(
        lambda: running.gateway is not None and running.gateway.router.counters["queued"] >= 1, 15
    )
    [waiting] = await store.messages_for_recipient(alice.uri)
    assert waiting.body == "while away"
    assert _errors(bob) == []
    # Back online: the retry (backoff, no copied REGISTER here) delivers it.
    assert (await alice.register()).code == 200
    assert (await alice.next_message(timeout=30)).body == "while away"
    assert _errors(bob) == []
