"""The metrics port and the figures read at scrape time (DESIGN 9), with fakes; the exposition
parsed back with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from component.admin.model import GatewayStats
from component.http.metrics import GatewayMetrics, Readings
from component.http.status import StatusServer
from component.messaging.router import MessageRouter
from component.ports import Outcome, Part, Way
from component.runtime.health import Health
from component.runtime.loop_lag import LoopLag
from component.store import (
    MembershipState,
    MessageDirection,
    NewMessage,
    StoreCounts,
    StoreUnavailable,
)
from component.store.memory import MemoryStore
from component.store.records import RoomMembership
from component.transports.board import TransportBoard
from component.values import ChatMessage, SipText
from component.xmpp.stream import LinkState, LinkStats
from sipside.endpoint import Stats as EndpointStats
from tests.harness.ports import free_port
from tests.harness.values import LOOPBACK
from tests.test_messaging import BOOK, Clock, FakeCommands, FakeSip, FakeXmpp, _answer

T0 = 1_700_000_000.0
BOARD = TransportBoard(["irc.xmpp.test", "slack.xmpp.test"], check_time=20)
BOARD.probed("irc.xmpp.test", "remote-server-timeout", T0)


class FakeEndpoint:
    def __init__(self) -> None:
        self.stats = EndpointStats(by_status={202: 5, 200: 2, 404: 1, 503: 3})
        self.transactions = (2, 1)


class FakeLink:
    def __init__(self) -> None:
        self.state = LinkState.UP
        self.stats = LinkStats(reconnects=3, rate_limited=6)


class FakeGate:
    def __init__(self) -> None:
        self.refusals: Counter[str] = Counter(rate_limited=4)


def _health() -> Health:
    health = Health()
    for part in Part:
        health.report(part, True, "test")
    return health


def _readings(store: MemoryStore, metrics: GatewayMetrics, lag: LoopLag | None = None) -> Readings:
    return Readings(
        metrics,
        store=store,
        sip=FakeEndpoint(),
        link=FakeLink(),
        gate=FakeGate(),
        lag=lag or LoopLag(),
        transports=BOARD,
        clock=lambda: T0 + 30,
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus-client: (name, labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _stocked(store: MemoryStore) -> None:
    for created in (T0, T0 + 10):
        await store.enqueue_message(
            NewMessage(
                MessageDirection.XMPP_TO_SIP,
                "bob@xmpp.test/pc",
                "sip:alice@sip.test",
                "hi",
                "text/plain",
                created,
                created + 90,
                created,
            )
        )
    for aor, room in (("sip:alice@sip.test", "a@muc.test"), ("sip:carol@sip.test", "a@muc.test")):
        await store.save_membership(RoomMembership(aor, room, "n", MembershipState.JOINED))
    await store.save_membership(
        RoomMembership("sip:alice@sip.test", "b@muc.test", "n", MembershipState.JOINING)
    )


async def test_counts_and_store_figures_in_the_exposition(memory_store: MemoryStore) -> None:
    await _stocked(memory_store)
    metrics = GatewayMetrics(_health())
    metrics.message(Way.TO_XMPP, Outcome.DELIVERED)
    metrics.message(Way.TO_XMPP, Outcome.DELIVERED)
    metrics.message(Way.TO_SIP, Outcome.REFUSED)
    metrics.xmpp_error("service-unavailable")
    metrics.link(True, T0)
    stats = await _readings(memory_store, metrics).snapshot()
    samples = _samples(metrics.exposition(stats).decode())

    def value(name: str, **labels: str) -> float:
        return samples[name, tuple(sorted(labels.items()))]

    assert value("sipxmpp_messages_total", direction="sip_to_xmpp", outcome="delivered") == 2
    assert value("sipxmpp_messages_total", direction="xmpp_to_sip", outcome="refused") == 1
    assert value("sipxmpp_messages_total", direction="xmpp_to_sip", outcome="failed") == 0
    assert value("sipxmpp_xmpp_errors_sent_total", condition="service-unavailable") == 1
    assert value("sipxmpp_sip_responses_sent_total", **{"class": "2xx"}) == 7
    assert value("sipxmpp_sip_responses_sent_total", **{"class": "5xx"}) == 3
    assert value("sipxmpp_sip_requests_refused_total", reason="rate_limited") == 4
    assert value("sipxmpp_sip_transactions", kind="client") == 2
    assert value("sipxmpp_xmpp_link_state", state="up") == 1
    assert value("sipxmpp_xmpp_link_state", state="backing_off") == 0
    assert value("sipxmpp_xmpp_link_reconnects_total") == 3
    assert value("sipxmpp_xmpp_stanzas_rate_limited_total") == 6
    assert value("sipxmpp_xmpp_link_up_seconds") == 30
    assert value("sipxmpp_queue_depth") == 2
    assert value("sipxmpp_queue_oldest_age_seconds") == 30
    assert value("sipxmpp_subscriptions", direction="sip_watches_xmpp") == 0
    assert value("sipxmpp_rooms") == 2
    assert value("sipxmpp_room_occupants") == 3
    assert value("sipxmpp_transport_state", transport="irc.xmpp.test", state="down") == 1
    assert value("sipxmpp_transport_state", transport="irc.xmpp.test", state="up") == 0
    assert value("sipxmpp_transport_state", transport="slack.xmpp.test", state="unknown") == 1
    assert value("sipxmpp_database_up") == 1
    assert ("sipxmpp_event_loop_lag_seconds", ()) in samples
    [irc, slack] = stats.transports
    assert (irc.state, irc.since, irc.detail) == ("down", T0, "remote-server-timeout")
    assert slack.state == "unknown"


class DownStore(MemoryStore):
    async def counts(self) -> StoreCounts:
        raise StoreUnavailable("database down")


async def test_store_down_leaves_out_the_store_figures_only() -> None:
    metrics = GatewayMetrics(_health())
    stats = await _readings(DownStore(), metrics).snapshot()
    assert not stats.store_read
    names = {name for name, _ in _samples(metrics.exposition(stats).decode())}
    assert {"sipxmpp_messages_total", "sipxmpp_sip_transactions"} <= names
    assert "sipxmpp_transport_state" in names  # the transports' states are not the store's
    assert not names & {"sipxmpp_queue_depth", "sipxmpp_rooms", "sipxmpp_subscriptions"}


async def test_the_router_counts_each_way_and_outcome(memory_store: MemoryStore) -> None:
    metrics = GatewayMetrics(_health())
    xmpp, sip, clock = FakeXmpp(), FakeSip(403, 480), Clock()
    router = MessageRouter(
        BOOK,
        xmpp,
        sip,
        memory_store,
        FakeCommands(),
        clock=clock,
        delay_time=90.0,
        metrics=metrics,
    )
    assert (
        await _answer(
            router, SipText("sip:alice@sip.test", "sip:bob*xmpp.test@jabber.sip.test", "a")
        )
    ).status == 202
    xmpp.connected = False
    await _answer(router, SipText("sip:alice@sip.test", "sip:bob*xmpp.test@jabber.sip.test", "b"))
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/pc", "alice@sip.xmpp.test", "c"))
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/pc", "carol@sip.xmpp.test", "d"))
    await router.on_xmpp_message(ChatMessage("bob@xmpp.test/pc", "dave@sip.xmpp.test", "e"))
    await router.on_xmpp_message(
        ChatMessage("bob@xmpp.test/pc", "alice@sip.xmpp.test", "f", type="groupchat")
    )
    assert metrics.messages == {
        (Way.TO_XMPP, Outcome.DELIVERED): 1,
        (Way.TO_XMPP, Outcome.QUEUED): 1,
        (Way.TO_SIP, Outcome.FAILED): 1,  # 403
        (Way.TO_SIP, Outcome.QUEUED): 1,  # 480
        (Way.TO_SIP, Outcome.DELIVERED): 1,  # 200
        (Way.TO_SIP, Outcome.REFUSED): 1,  # groupchat to a person
    }
    # The queued one goes once the link is back, and is counted delivered then.
    xmpp.connected = True
    await router.retry_due()
    assert metrics.messages[Way.TO_XMPP, Outcome.DELIVERED] == 2


async def test_loop_lag_sees_a_blocked_loop() -> None:
    lag = LoopLag(interval=0.01)
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.02)
    time.sleep(0.2)  # the loop is blocked: the lag's timer fires at least this late
    await asyncio.sleep(0.05)
    task.cancel()
    assert lag.worst >= 0.15


@pytest.fixture
async def served(memory_store: MemoryStore) -> AsyncIterator[tuple[GatewayMetrics, str]]:
    health = _health()
    metrics = GatewayMetrics(health)
    server = StatusServer(
        health,
        metrics,
        host=LOOPBACK,
        port=free_port(),
        readings=_readings(memory_store, metrics),
    )
    await server.start()
    try:
        yield metrics, f"http://{LOOPBACK}:{server.port}/metrics"
    finally:
        await server.close()


async def test_metrics_endpoint_reads_at_each_scrape(served: tuple[GatewayMetrics, str]) -> None:
    metrics, url = served
    async with aiohttp.ClientSession() as client:
        async with client.get(url) as response:
            assert response.status == 200
            first = _samples(await response.text())
        metrics.message(Way.TO_SIP, Outcome.DELIVERED)
        async with client.get(url) as response:
            second = _samples(await response.text())
    key = ("sipxmpp_messages_total", (("direction", "xmpp_to_sip"), ("outcome", "delivered")))
    assert (first[key], second[key]) == (0, 1)


def test_stats_lookups_default_to_zero() -> None:
    assert GatewayStats(now=T0).message_count(Way.TO_SIP, Outcome.FAILED) == 0
