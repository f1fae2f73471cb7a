"""Two gateway processes on one PostgreSQL database (DESIGN 9), end to end.

- ejabberd, both instances active on one component domain, Kamailio's dispatcher snippet in
  front: messages both ways for several SIP users spread over both; one instance killed with
  SIGKILL amid a stream: every MESSAGE answered 2xx reaches the XMPP user or its sender gets a
  failure notice, and the survivor takes over the dead one's rows.
- Prosody, a second instance standing by (Prosody refuses its connection): killing the first
  makes the second the active one, and it takes over the first one's state.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from component.store import migrate
from tests.conftest import XMPP_PASSWORD
from tests.gateway_fixture import component_jid, wait_until
from tests.harness.gateway import gateway_toml
from tests.harness.kamailio import KamailioServer
from tests.harness.ports import free_port
from tests.harness.rawsip import RawSipPeer
from tests.harness.values import JDOMAIN, LOOPBACK, SIP_DOMAIN
from tests.harness.xmppclient import XmppClient
from tests.harness.xmppserver import XmppServer
from tests.test_faults import GatewayProcess, SipSide, XmppSide, _register
from tests.test_store import scratch_postgres_database

pytestmark = pytest.mark.slow

CHECK = 2.0  # check_time: dead after 4 s without a heartbeat
USERS = 6
EACH = 10


@pytest.fixture
def pg() -> Iterator[str]:
    """A fresh PostgreSQL database of the test's own, at the newest schema, dropped after."""
    with scratch_postgres_database("sipxmpp_scale") as url:
        migrate.upgrade(url)
        yield url


def _instance(
    tmp_path: Path, name: str, xmpp: XmppServer, kamailio: KamailioServer, url: str, port: int
) -> GatewayProcess:
    """Instance ``name`` listening on ``port``, sharing ``url`` with the others."""
    text = gateway_toml(
        xmpp,
        kamailio,
        url,
        f'\n[gateway]\ninstance = "{name}"\n[timers]\ncheck_time = {CHECK}\nsleep_time = 0.5\n',
    ).replace(f':{kamailio.gateway_port}"', f':{port}"')
    config = tmp_path / f"{name}.toml"
    config.write_text(text)
    return GatewayProcess(config, log_level="debug")  # one line per relayed message


def _kill(gateway: GatewayProcess) -> None:
    proc = gateway.process.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def _took_over(survivor: GatewayProcess, dead: str) -> bool:
    """The survivor logged taking over ``dead``'s state."""
    return any(
        "instance_state_taken_over" in line and dead in line for line in survivor.log().splitlines()
    )


def _relayed(gateway: GatewayProcess) -> int:
    return gateway.log().count("message_relayed")


async def test_two_active_instances_on_ejabberd_share_and_survive_a_kill(
    tmp_path: Path,
    ejabberd: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
    pg: str,
) -> None:
    ports = [free_port(), free_port()]
    kamailio = kamailio_factory(ports[0], instances=ports)
    a = _instance(tmp_path, "gw-a", ejabberd, kamailio, pg, ports[0])
    b = _instance(tmp_path, "gw-b", ejabberd, kamailio, pg, ports[1])
    bob = XmppSide(XmppClient(ejabberd.jid(f"scale{secrets.token_hex(3)}"), XMPP_PASSWORD, True))
    await bob.client.start(ejabberd.c2s_port)
    sip = SipSide(await RawSipPeer.open())
    listener = asyncio.create_task(sip.listen())
    users = [f"sip:scale{n}{secrets.token_hex(2)}@{SIP_DOMAIN}" for n in range(USERS)]
    to_bob = f"sip:{bob.client.boundjid.user}*{bob.client.boundjid.domain}@{JDOMAIN}"
    try:
        a.start()
        b.start()
        await a.up()
        await b.up()
        for user in users:
            await _register(sip, kamailio, user)

        def send_from(user: str, body: str) -> str:
            call_id = f"m-{secrets.token_hex(6)}"
            request = sip.peer.request("MESSAGE", to_bob, user, to_bob, body, call_id=call_id)
            sip.peer.send(request, (LOOPBACK, kamailio.port))
            return f"{call_id}@{LOOPBACK}"

        # Both ways, several users: the dispatcher's hash and ejabberd spread them.
        calls = [send_from(u, f"{i}:{n}") for n, u in enumerate(users) for i in range(EACH)]
        for user in users:
            for i in range(EACH):
                bob.send(component_jid(user), f"x{i}:{user}")
        await wait_until(lambda: all(sip.answers.get(c) for c in calls), 30)
        assert all(200 <= sip.answers[c] < 300 for c in calls)
        await wait_until(lambda: (bob.take(), len(bob.bodies) >= USERS * EACH)[1], 30)
        await wait_until(lambda: len(sip.notices) >= USERS * EACH, 30)
        assert sorted(bob.bodies) == sorted(f"{i}:{n}" for n in range(USERS) for i in range(EACH))
        assert _relayed(a) > 0 and _relayed(b) > 0  # both instances carried messages

        # A stream through the dispatcher; gw-a killed in the middle of it.
        bob.bodies.clear()
        notices_before = len(sip.notices)
        streamed: list[tuple[str, str]] = []
        for i in range(60):
            user = users[i % USERS]
            body = f"s{i:03}"
            streamed.append((send_from(user, body), body))
            if i == 30:
                _kill(a)
            await asyncio.sleep(0.02)
        await wait_until(lambda: all(sip.answers.get(c) for c, _ in streamed), 60)
        accepted = [body for call, body in streamed if 200 <= sip.answers[call] < 300]
        # The survivor takes over gw-a within two check_time intervals of its last beat, plus
        # one check; the messages gw-a answered are then retried from the shared queue.
        await wait_until(lambda: _took_over(b, "gw-a"), 10 * CHECK)

        def settled() -> bool:
            bob.take()
            told = "\n".join(sip.notices[notices_before:])
            return all(body in bob.bodies or body in told for body in accepted)

        await wait_until(settled, 60)
        assert len(accepted) >= 30  # the dispatcher kept answering through the survivor
    finally:
        listener.cancel()
        await bob.client.stop()
        for gateway in (a, b):
            gateway.process.close()


async def test_prosody_standby_takes_over_when_the_active_one_dies(
    tmp_path: Path,
    prosody: XmppServer,
    kamailio_factory: Callable[..., KamailioServer],
    pg: str,
) -> None:
    ports = [free_port(), free_port()]
    kamailio = kamailio_factory(ports[0], instances=ports)
    a = _instance(tmp_path, "gw-a", prosody, kamailio, pg, ports[0])
    b = _instance(tmp_path, "gw-b", prosody, kamailio, pg, ports[1])
    bob = XmppSide(XmppClient(prosody.jid(f"standby{secrets.token_hex(3)}"), XMPP_PASSWORD, True))
    await bob.client.start(prosody.c2s_port)
    sip = SipSide(await RawSipPeer.open())
    listener = asyncio.create_task(sip.listen())
    carol = f"sip:standby{secrets.token_hex(2)}@{SIP_DOMAIN}"
    try:
        a.start()
        await a.up()
        b.start()
        # gw-b is refused (conflict) while gw-a holds the component domain: it keeps retrying.
        await wait_until(lambda: "gateway_started" in b.log(), 30)
        await asyncio.sleep(2 * CHECK)  # a few refused attempts
        assert "xmpp_link_up" not in b.log()
        await _register(sip, kamailio, carol)
        bob.send(component_jid(carol), "before")
        await wait_until(lambda: "before" in sip.notices, 20)
        _kill(a)
        await b.up(timeout=10 * CHECK)  # active within check_time of the link drop (+ startup)
        await wait_until(lambda: _took_over(b, "gw-a"), 10 * CHECK)
        bob.send(component_jid(carol), "after")
        await wait_until(lambda: "after" in sip.notices, 20)
    finally:
        listener.cancel()
        await bob.client.stop()
        for gateway in (a, b):
            gateway.process.close()
