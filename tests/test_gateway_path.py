"""The whole SIP -> XMPP chat path of a real gateway with fake transports (bench.gateway_path):
each MESSAGE gets one 202 and one stanza, a retransmission the same 202 and no second stanza,
in order, and the server's answer to the barrier's ping confirms what was written."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.gateway_path import GatewayPath, relayed_message
from sipside.message import SipResponse, parse_message


@pytest.fixture
async def path(tmp_path: Path) -> AsyncIterator[GatewayPath]:
    opened = await GatewayPath.open(tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


def _bodies(path: GatewayPath) -> list[str]:
    text = b"".join(path.server.written).decode()
    return [part.split("</body>", 1)[0] for part in text.split("<body>")[1:]]


async def test_each_message_one_202_and_one_stanza_in_order(path: GatewayPath) -> None:
    # The batch is cut by count, not by its deadline, however slowly this machine feeds it.
    now = time.time()
    path.gateway.xmpp.confirmations._clock = lambda: now
    path.feed([relayed_message(i, f"text {i}".encode()) for i in range(300)])
    assert _bodies(path) == [f"text {i}" for i in range(300)]
    statuses = [parse_message(data) for data in path.udp.sent]
    assert all(isinstance(r, SipResponse) and r.status == 202 for r in statuses)
    assert len(statuses) == 300
    barrier = path.gateway.xmpp.confirmations.barrier
    # the batch of 256 was pinged and the server's answer confirmed it
    assert barrier.confirmed == 256 and barrier.unconfirmed == 44


async def test_retransmission_gets_the_same_202_and_no_second_stanza(path: GatewayPath) -> None:
    first = relayed_message(1, b"once")
    path.feed([first, relayed_message(2, b"twice"), first])
    assert _bodies(path) == ["once", "twice"]
    assert len(path.udp.sent) == 3
    assert path.udp.sent[2] == path.udp.sent[0]  # RFC 3261 17.2.2: the cached final response
    response = parse_message(path.udp.sent[0])
    assert isinstance(response, SipResponse) and response.status == 202
    assert response.to_tag  # RFC 3261 8.2.6.2
    assert response.header("Call-ID") == "1f2e3d4c-5b6a-4798-000001"


async def test_messages_read_in_one_wakeup_reach_the_server_in_one_write(
    path: GatewayPath,
) -> None:
    # app.py tells the endpoint's UDP sockets to bracket a drain's datagrams with the link.
    link = path.gateway.xmpp
    assert path.gateway.endpoint._burst is link
    link.begin()
    path.feed([relayed_message(i, f"text {i}".encode()) for i in range(5)])
    assert len(path.udp.sent) == 5  # each 202 at once
    assert path.server.written == []  # the stanzas wait for the drain's end
    link.end()
    assert len(path.server.written) == 1
    assert _bodies(path) == [f"text {i}" for i in range(5)]
    assert link.confirmations.barrier.unconfirmed == 5  # written, waiting for a ping's answer
    # Outside a drain each stanza is written at once, as before.
    path.feed([relayed_message(5, b"text 5")])
    assert len(path.server.written) == 2


async def test_at_a_steady_rate_the_barrier_ping_goes_in_a_message_write(
    path: GatewayPath,
) -> None:
    # One MESSAGE every 5 ms, each in a wake-up of its own: the barrier's ping goes in the
    # write of the message before its deadline, not in a timer's wake-up and a write of its own.
    now = [500.0]
    link = path.gateway.xmpp
    link.confirmations._clock = lambda: now[0]
    for i in range(40):
        path.feed([relayed_message(i, f"text {i}".encode())])
        now[0] += 0.005
    assert _bodies(path) == [f"text {i}" for i in range(40)]
    assert len(path.server.written) == 40  # one write per message, pings included
    with_ping = [w for w in path.server.written if b"urn:xmpp:ping" in w]
    assert len(with_ping) >= 3 and all(w.startswith(b"<message ") for w in with_ping)
    barrier = link.confirmations.barrier
    assert barrier.pings_sent == len(with_ping) == barrier.pings_answered
    assert barrier.confirmed + barrier.unconfirmed == 40 and barrier.confirmed >= 30
